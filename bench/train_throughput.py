"""Training throughput of the MAE job against Hugging Face transformers' ViTMAEForPreTraining, same device, batch,
precision and model geometry, in one run:

    python bench/train_throughput.py [--preset tiny|vit_b16|vit_l16] [--batch 64] [--steps 20] [--warmup 5]
                                     [--precision auto|fp32|bf16] [--out FILE]

* ours: `pretrain.mae.MAETask` inside the DeepSpeed engine the jobs use (ZeRO-1, one rank, the runtime's AdamW),
  `training_step` + `engine.backward` + `engine.step`, uint8 images normalised on the device as in the job;
* peer: `transformers.ViTMAEForPreTraining` with the same widths, depths, heads, decoder, mask ratio and norm-pix
  loss, SDPA attention, `torch.optim.AdamW` (fused on CUDA), bf16 autocast on GPU — what a user would write.

Each side runs in its own process (clean peak memory), `--warmup` untimed steps then `--steps` timed ones, on random
images already on the device (data loading is bench/data_throughput.py's subject). Reported: images/s, step time,
peak memory (CUDA: max allocated; CPU: peak RSS of the process), MFU = model FLOPs per image (counted by
FlopCounterMode: forward + backward of the encoder on the visible patches and of the decoder) x images/s over the
device's measured matmul peak in that precision. Method coverage: MAE only so far (BEiT / DeiT / classification
rows are not measured yet).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` on `device` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_ours(preset: str, batch: int, steps: int, warmup: int, bf16: bool, device: torch.device,
             zero_stage: int = 1) -> dict[str, Any]:
    from launch.runtime import distributed, engine as engine_lib
    from pretrain.mae import MAE_ARCHS, MAEConfig, MAETask

    distributed.init()
    task = MAETask(MAEConfig(**MAE_ARCHS[preset]))
    groups = engine_lib.param_groups(task.param_groups(), 0.05)
    optimizer = engine_lib.build_optimizer(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05,
                                           on_gpu=device.type == "cuda", name="adamw", momentum=0.9)
    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": bf16}, "gradient_clipping": 0.0,
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 12}
    engine = engine_lib.initialize(task.model, optimizer, ds_config)
    size = task.cfg.img_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

    def step() -> None:
        loss, _ = task.training_step(engine, {"image": images})
        engine.backward(loss)
        engine.step()

    result = timed(step, steps, warmup, device)
    result["flops_per_image"] = task.flops_per_sample()
    return result


def run_peer(preset: str, batch: int, steps: int, warmup: int, bf16: bool, device: torch.device,
             zero_stage: int = 1) -> dict[str, Any]:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from pretrain.mae import MAE_ARCHS, MAEConfig

    cfg = MAEConfig(**MAE_ARCHS[preset])
    config = ViTMAEConfig(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                          intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size,
                          patch_size=cfg.patch_size, decoder_hidden_size=cfg.decoder_embed_dim,
                          decoder_num_hidden_layers=cfg.decoder_depth,
                          decoder_num_attention_heads=cfg.decoder_num_heads,
                          decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
                          mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, layer_norm_eps=1e-6,
                          attn_implementation="sdpa")
    model = ViTMAEForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  **({"fused": True} if device.type == "cuda" else {}))
    size = cfg.img_size
    images = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps, warmup, device)


def timed(step: Any, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"step_time_s": elapsed / steps, "peak_memory_gib": peak_memory_gib(device)}


def child(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    run = run_ours if args.side == "ours" else run_peer
    result = run(args.preset, args.batch, args.steps, args.warmup, bf16, device, args.zero_stage)
    result["images_per_s"] = args.batch / result["step_time_s"]
    print("RESULT " + json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "vit_b16", "vit_l16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3],
                        help="ZeRO stage of our engine (the jobs' default is 1; 0 without bf16 is plain data parallel)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        child(args)
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    results = {}
    for side in ("ours", "peer"):
        cmd = [sys.executable, __file__, "--side", side, "--preset", args.preset, "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
               "--zero-stage", str(args.zero_stage)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if
               device.type == "cuda" else "cpu")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[side] = json.loads(lines[-1][len("RESULT "):])
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(device, dtype)
    flops = results["ours"]["flops_per_image"]
    for side in results.values():
        side["mfu"] = flops * side["images_per_s"] / peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
              "torch_threads": torch.get_num_threads(), "preset": args.preset, "batch": args.batch,
              "precision": "bf16" if bf16 else "fp32", "steps": args.steps, "zero_stage": args.zero_stage, "matmul_peak_flops": peak,
              "results": results, "ratio_images_per_s": results["ours"]["images_per_s"] /
              results["peer"]["images_per_s"]}
    print(f"MAE {args.preset}, batch {args.batch}, {report['precision']} on {name} "
          f"(matmul peak {peak / 1e12:.2f} TFLOP/s, {flops / 1e9:.2f} GFLOP per image)")
    print(f"{'':8} {'images/s':>10} {'step s':>9} {'peak GiB':>9} {'MFU':>7}")
    for side, r in results.items():
        print(f"{side:8} {r['images_per_s']:10.1f} {r['step_time_s']:9.4f} {r['peak_memory_gib']:9.2f} "
              f"{100 * r['mfu']:6.1f}%")
    print(f"ours / peer images/s: {report['ratio_images_per_s']:.2f}x")
    out = args.out or ROOT / "bench" / "results" / f"train_throughput-{args.preset}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
