"""FLIP's speed claim (Li et al. 2022: masking half the patches trains ~2x faster, 75% ~3x; 3.7x for their ViT-L
run with unmasked tuning counted): training images/s and step time of pretrain_flip at several mask ratios, one
process, one run:

    python bench/flip_speed.py                                   # tiny preset, masks 0 / 0.5 / 0.75, CPU
    python bench/flip_speed.py --preset vit_b16 --batch 256 --precision bf16 --steps 20   # on a GPU
    python bench/flip_speed.py --masks 0,0.5 --batch 64 --repeats 3 --out bench/results/flip-speed-cpu.json

Each configuration is the job's task (`pretrain.flip.FLIPTask`: open_clip's CLIP, its patch dropout as the mask,
ClipLoss, the clamped temperature) inside the DeepSpeed engine the jobs use (the runtime's AdamW and generated
DeepSpeed config), `training_step` + `engine.backward` + `engine.step` on random uint8 images and random caption
tokens already on the device (data loading is bench/data_throughput.py's subject). `--warmup` untimed steps, then
`--steps` timed ones; the ratios are repeated `--repeats` times in rotating order (a shared machine's load drifts
between configurations; the median of the repeats is reported). Also reported: the task's counted training FLOPs
per image (FlopCounterMode), whose ratio is the speed-up masking could give if time followed FLOPs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import header, write_report  # noqa: E402 - after the path is set


def build(preset: str, mask: float, batch: int, precision: str, device: torch.device,
          model: list[tuple[str, Any]]) -> tuple[Any, Any]:
    """(task, DeepSpeed engine) of pretrain_flip at `preset`'s geometry with `model` overrides (model.KEY, value) and
    mask ratio, as the job builds them."""
    from launch.runtime import config as config_lib, engine as engine_lib
    from pretrain.flip import FLIP_ARCHS, FLIPConfig, FLIPTask

    torch.manual_seed(0)
    job = config_lib.build(FLIPConfig, [("data.train", "embedded:photos"), ("optim.max_steps", 1),
                                        ("data.batch_size", batch), ("engine.precision", precision),
                                        ("model.arch", preset), *model, ("model.mask_ratio", mask)], FLIP_ARCHS)
    task = FLIPTask(job.model)
    optimizer = engine_lib.build_optimizer(engine_lib.param_groups(task.param_groups(), job.optim.weight_decay),
                                           lr=1e-4, betas=job.optim.betas, eps=job.optim.eps,
                                           weight_decay=job.optim.weight_decay, on_gpu=device.type == "cuda",
                                           name="adamw", momentum=0.9, fused=job.optim.fused)
    config_lib.resolve(job, job="pretrain_flip", preset=preset, run_dir="", world_size=1, batches_per_epoch=None,
                       num_samples=None, device=device.type, precision=precision)
    engine = engine_lib.initialize(task.model, optimizer, config_lib.deepspeed_config(job, device.type == "cuda"))
    return task, engine


def measure(task: Any, engine: Any, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per optimizer step (mean over `steps` after `warmup`)."""
    cfg = task.cfg
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, generator=g).to(device)
    text = torch.randint(1, 49000, (batch, cfg.context_length), generator=g).to(device)
    data = {"image": images, "text": text}

    def step() -> None:
        loss, _ = task.training_step(engine, data)
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "vit_b16", "vit_l16"))
    parser.add_argument("--masks", default="0,0.5,0.75", help="comma-separated mask ratios (default 0,0.5,0.75)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model.* overrides of the preset's geometry, e.g. img_size=32 patch_size=4 (the quality "
                             "benchmark's flip claim)")
    parser.add_argument("--out", default="", help="JSON report path (default: print only)")
    args = parser.parse_args(argv)
    try:
        masks = [float(m) for m in args.masks.split(",")]
    except ValueError:
        parser.error(f"--masks={args.masks}: give comma-separated numbers in [0, 1), e.g. 0,0.5,0.75")
    if any(not 0 <= m < 1 for m in masks) or args.batch < 2 or args.steps < 1 or args.repeats < 1:
        parser.error("masks in [0, 1), --batch >= 2 (a contrastive batch), --steps and --repeats >= 1")
    from launch.runtime import distributed
    from launch.runtime.config import ConfigError, parse_override

    try:
        model = [(f"model.{k}", v) for k, v in (parse_override(item) for item in args.model)]
    except (ConfigError, ValueError) as e:
        parser.error(f"--model: {e}")

    device = distributed.init().device          # one rank: the process group DeepSpeed's engine needs
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")

    built = {m: build(args.preset, m, args.batch, precision, device, model) for m in masks}
    times: dict[float, list[float]] = {m: [] for m in masks}
    for r in range(args.repeats):
        order = masks[r % len(masks):] + masks[:r % len(masks)]        # rotate: no mask always runs first
        for m in order:
            task, engine = built[m]
            times[m].append(measure(task, engine, args.batch, args.steps, args.warmup, device))
            print(f"repeat {r + 1}/{args.repeats}  mask {m:.2f}: {times[m][-1]:.3f} s/step", flush=True)

    base = statistics.median(times[masks[0]])
    rows = []
    for m in masks:
        step_s = statistics.median(times[m])
        task = built[m][0]
        rows.append({"mask_ratio": m, "step_s": round(step_s, 4), "images_per_s": round(args.batch / step_s, 2),
                     "speedup": round(base / step_s, 3), "step_s_repeats": [round(t, 4) for t in times[m]],
                     "train_gflops_per_image": round(task.flops_per_sample() / 1e9, 4)})
    flops0 = rows[0]["train_gflops_per_image"]
    for row in rows:
        row["flops_ratio"] = round(flops0 / row["train_gflops_per_image"], 3)
    report = {**header(), "bench": "flip_speed", "preset": args.preset, "model": args.model, "batch": args.batch,
              "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "precision": precision,
              "threads": torch.get_num_threads(), "rows": rows}
    print(f"{'mask':>5} {'step s':>8} {'img/s':>8} {'speed-up':>9} {'FLOPs ratio':>12}")
    for row in rows:
        print(f"{row['mask_ratio']:>5.2f} {row['step_s']:>8.3f} {row['images_per_s']:>8.1f} {row['speedup']:>8.2f}x "
              f"{row['flops_ratio']:>11.2f}x")
    if args.out:
        write_report(report, Path(args.out))
    else:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
