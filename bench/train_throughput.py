"""Training throughput of the project's jobs against what a user would otherwise write with Hugging Face
transformers, same device, batch, precision and model geometry, in one run:

    python bench/train_throughput.py [--method mae|beit|deit|cls] [--preset tiny|vit_b16|vit_l16] [--batch 64]
                                     [--steps 20] [--warmup 5] [--precision auto|fp32|bf16] [--zero-stage 1]
                                     [--compile] [--fused auto|on|off] [--no-fused-attention] [--grad-ckpt]
                                     [--grad-accum K] [--no-peer] [--repeats N] [--in-process] [--out FILE]
    python bench/train_throughput.py --switches [--method mae] ...   # the effect of each speed switch, ours only
                                     # (MAE adds a row with the encoder on all tokens but one: the visible-only gain)

* ours: the method's task (`pretrain.mae.MAETask`, `pretrain.beit.BEiTTask`, `pretrain.deit.DeiTTask`,
  `finetune.classification.ClassificationTask`) inside the DeepSpeed engine the jobs use (the runtime's AdamW,
  the DeepSpeed config the jobs generate for `--zero-stage` and the precision), `training_step` +
  `engine.backward` + `engine.step`, with the job's speed switches (`engine.compile`, `optim.fused`,
  `engine.fused_attention`, `model.grad_checkpointing`, `engine.grad_accum`) set from the flags;
* peer: the transformers model of the same method — `ViTMAEForPreTraining`, `BeitForMaskedImageModeling` (+ the
  same frozen dVAE tokenizer for its targets), `DeiTForImageClassificationWithTeacher` (+ the same frozen teacher,
  hard distillation as in the job: 0.5 CE(cls, y) + 0.5 CE(dist, teacher argmax); transformers ships the model but no
  distillation training), `ViTForImageClassification` — with the same widths, depths, heads, patch and image size,
  SDPA attention, `torch.optim.AdamW` (fused), bf16 autocast on GPU.

Both sides train without stochastic depth (transformers' ViT/DeiT have none). Each side runs in its own process
(clean peak memory), `--warmup` untimed steps then `--steps` timed ones, on random inputs already on the device (data
loading is bench/data_throughput.py's subject). Reported: images/s, step time, peak memory (CUDA: max allocated;
CPU: peak RSS of the process), MFU = the task's counted training FLOPs per image (FlopCounterMode, forward +
backward, plus the frozen tokenizer's / teacher's forward) x images/s over the device's measured matmul peak in
that precision.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import child_env, device_name, header, write_report  # noqa: E402 - after the path is set

METHODS = ("mae", "beit", "deit", "cls")
# the encoder every method trains at each preset (MAE's presets; the other methods use the same ViT)
GEOMETRY: dict[str, dict[str, int]] = {
    "tiny": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "vit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_l16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}
# the frozen models the BEiT targets and DeiT distillation need, per preset
TOKENIZER = {"tiny": dict(img_size=64, vocab_size=512, hidden=32, blocks_per_group=1, decoder_init=64),
             "vit_b16": dict(img_size=112), "vit_l16": dict(img_size=112)}   # the latter two: DALL-E's dVAE
TEACHER = {"tiny": "resnet18", "vit_b16": "regnety_160", "vit_l16": "regnety_160"}   # DeiT's teacher at scale
NUM_CLASSES = 1000


@dataclass(frozen=True)
class Switches:
    """Our job's speed switches (the config key each one is)."""

    compile: bool = False          # engine.compile
    fused: str = "auto"            # optim.fused: auto | on | off (the flag's spelling; the config key takes true/false)
    fused_attention: bool = True   # engine.fused_attention
    grad_ckpt: bool = False        # model.grad_checkpointing
    grad_accum: int = 1            # engine.grad_accum (the batch is split into this many micro-batches)
    mask_ratio: float = 0.0        # MAE only, > 0: model.mask_ratio (1/L puts L - 1 tokens through the encoder)
    precision: str = ""            # engine.precision for this row ("" = the run's --precision)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3, trials: int = 7
                ) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` on `device` (the MFU denominator): the best of `trials` timings
    of `repeats` matmuls, so that a slow spell of a shared machine does not lower the peak (and inflate MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * repeats / best


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


# --- the frozen helpers both sides share --------------------------------------------------------------------------

def build_tokenizer(preset: str, device: torch.device) -> torch.nn.Module:
    from pretrain.dvae import DiscreteVAE, DVAEConfig

    return DiscreteVAE(DVAEConfig(**TOKENIZER[preset])).to(device).eval().requires_grad_(False)


def build_teacher(preset: str, device: torch.device) -> Any:
    import timm

    from pretrain.deit import Teacher

    model = timm.create_model(TEACHER[preset], num_classes=NUM_CLASSES).to(device).eval().requires_grad_(False)
    return Teacher(model=model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), name=TEACHER[preset])


def random_batch(method: str, preset: str, batch: int, device: torch.device, beit_mask: Any = None) -> dict:
    """The batch each job's transforms hand the task: uint8 images for MAE (normalised on the device), normalised
    images + labels for DeiT / classification, normalised images + block masks + uint8 tokenizer view for BEiT."""
    size = GEOMETRY[preset]["img_size"]
    if method == "mae":
        return {"image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)}
    out = {"image": torch.randn(batch, 3, size, size, device=device)}
    if method in ("deit", "cls"):
        out["label"] = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    if method == "beit":
        side = TOKENIZER[preset]["img_size"]
        out["tokenizer_image"] = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=device)
        out["mask"] = torch.stack([beit_mask().flatten() for _ in range(batch)]).to(device=device, dtype=torch.int8)
    return out


# --- ours ----------------------------------------------------------------------------------------------------------

def build_task(method: str, preset: str, switches: Switches, device: torch.device) -> Any:
    g = GEOMETRY[preset]
    if method == "mae":
        from pretrain.mae import MAE_ARCHS, MAEConfig, MAETask

        arch = dict(MAE_ARCHS[preset], **({"mask_ratio": switches.mask_ratio} if switches.mask_ratio else {}))
        return MAETask(MAEConfig(**arch, grad_checkpointing=switches.grad_ckpt))
    if method == "beit":
        from pretrain.beit import BEiTConfig, BEiTTask

        tokenizer = build_tokenizer(preset, device)
        task = BEiTTask(BEiTConfig(**g, vocab_size=tokenizer.vocab_size, drop_path=0.0,
                                   grad_checkpointing=switches.grad_ckpt), load_tokenizer=False)
        # as if loaded from a tokenizer folder: its downsampling sets the tokenizer view (and its counted FLOPs)
        task.tokenizer, task.downsample = tokenizer, tokenizer.downsample
        task.tokenizer_size = task.cfg.grid * tokenizer.downsample
        return task
    if method == "deit":
        from pretrain.deit import DeiTConfig, DeiTTask

        teacher = build_teacher(preset, device)
        return DeiTTask(DeiTConfig(**g, num_classes=NUM_CLASSES, distill="hard", teacher=f"timm:{TEACHER[preset]}",
                                   teacher_weights="(random: built here, throughput only)", drop_path=0.0,
                                   mixup=0.0, cutmix=0.0, label_smoothing=0.0, repeats=1,
                                   grad_checkpointing=switches.grad_ckpt), load_teacher=lambda cfg: teacher)
    if method == "cls":
        from finetune.classification import ClassificationConfig, ClassificationTask

        return ClassificationTask(ClassificationConfig(**g, num_classes=NUM_CLASSES, global_pool="token",
                                                       drop_path=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                                                       grad_checkpointing=switches.grad_ckpt))
    raise ValueError(method)


def job_deepspeed_config(micro: int, grad_accum: int, zero_stage: int, bf16: bool, device: torch.device) -> dict:
    """The DeepSpeed config the jobs generate (`config.deepspeed_config`) for one rank with these engine settings."""
    from data_pipeline.stream import DataConfig
    from launch.runtime import config

    precision = "bf16" if bf16 else "fp32"
    engine = config.EngineConfig(zero_stage=zero_stage, grad_accum=grad_accum, precision=precision)
    cfg = config.JobConfig(data=DataConfig(train="(in memory)", batch_size=micro), model=None, engine=engine)
    cfg.derived = config.Derived(job="bench", preset="bench", run_dir="", world_size=1, global_batch=micro * grad_accum,
                                 lr=1e-4, total_steps=1, warmup_steps=0, batches_per_epoch=None, precision=precision,
                                 device=device.type)
    return config.deepspeed_config(cfg, on_gpu=device.type == "cuda")


def run_ours(method: str, preset: str, batch: int, steps: int, warmup: int, bf16: bool, device: torch.device,
             zero_stage: int, switches: Switches) -> dict[str, Any]:
    from launch.runtime import distributed, engine as engine_lib

    distributed.init()
    task = build_task(method, preset, switches, device)
    groups = engine_lib.param_groups(task.param_groups(), 0.05)
    optimizer = engine_lib.build_optimizer(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05,
                                           on_gpu=device.type == "cuda", name="adamw",
                                           fused={"auto": "auto", "on": True, "off": False}[switches.fused])
    engine_lib.set_fused_attention(task.model, switches.fused_attention)
    if batch % switches.grad_accum:
        raise SystemExit(f"--batch {batch} is not a multiple of --grad-accum {switches.grad_accum}")
    micro = batch // switches.grad_accum
    ds_config = job_deepspeed_config(micro, switches.grad_accum, zero_stage, bf16, device)
    engine = engine_lib.initialize(task.model, optimizer, ds_config)
    if switches.compile:
        engine_lib.compile_model(engine)
    beit_mask = getattr(task.train_transform, "mask", None)
    batches = [random_batch(method, preset, micro, device, beit_mask) for _ in range(switches.grad_accum)]
    dtype = torch.bfloat16 if bf16 else torch.float32
    batches = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()} for b in batches]

    def step() -> None:
        for micro_batch in batches:
            loss, _ = task.training_step(engine, micro_batch)
            engine.backward(loss)
            engine.step()

    result = timed(step, steps, warmup, device)
    result["flops_per_image"] = task.flops_per_sample()
    return result


# --- the peer ------------------------------------------------------------------------------------------------------

def peer_model(method: str, preset: str) -> torch.nn.Module:
    import transformers as tf

    g = GEOMETRY[preset]
    common = dict(hidden_size=g["embed_dim"], num_hidden_layers=g["depth"], num_attention_heads=g["num_heads"],
                  intermediate_size=4 * g["embed_dim"], image_size=g["img_size"], patch_size=g["patch_size"],
                  layer_norm_eps=1e-6, attn_implementation="sdpa")
    if method == "mae":
        from pretrain.mae import MAE_ARCHS, MAEConfig

        cfg = MAEConfig(**MAE_ARCHS[preset])
        return tf.ViTMAEForPreTraining(tf.ViTMAEConfig(
            **common, decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
            decoder_num_attention_heads=cfg.decoder_num_heads,
            decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), mask_ratio=cfg.mask_ratio,
            norm_pix_loss=cfg.norm_pix_loss))
    if method == "beit":
        # BEiT-style: q/v biases (transformers' default), shared relative position bias, LayerScale 0.1, mask token
        return tf.BeitForMaskedImageModeling(tf.BeitConfig(
            **common, vocab_size=TOKENIZER[preset].get("vocab_size", 8192), use_mask_token=True,
            use_shared_relative_position_bias=True, use_relative_position_bias=False, layer_scale_init_value=0.1,
            use_mean_pooling=False))
    if method == "deit":
        return tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**common, num_labels=NUM_CLASSES))
    if method == "cls":
        return tf.ViTForImageClassification(tf.ViTConfig(**common, num_labels=NUM_CLASSES))
    raise ValueError(method)


def run_peer(method: str, preset: str, batch: int, steps: int, warmup: int, bf16: bool, device: torch.device,
             zero_stage: int, switches: Switches) -> dict[str, Any]:
    from pretrain.beit import BEiTConfig, make_mask_generator
    from pretrain.masking import VISIBLE

    model = peer_model(method, preset).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    tokenizer = build_tokenizer(preset, device) if method == "beit" else None
    teacher = build_teacher(preset, device).model if method == "deit" else None
    beit_mask = make_mask_generator(BEiTConfig(**GEOMETRY[preset], vocab_size=8)) if method == "beit" else None
    data = random_batch(method, preset, batch, device, beit_mask)
    images = data["image"].float() if method != "mae" else torch.randn(data["image"].shape, device=device)

    def loss_of() -> torch.Tensor:
        if method == "mae":
            return model(pixel_values=images).loss
        if method == "cls":
            return model(pixel_values=images, labels=data["label"]).loss
        if method == "beit":
            with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
                codes = tokenizer.get_codebook_indices(data["tokenizer_image"].float() / 255).flatten(1)
            masked = data["mask"] != VISIBLE
            return model(pixel_values=images, bool_masked_pos=masked, labels=codes[masked]).loss
        with torch.no_grad():
            teacher_labels = teacher(images).argmax(-1)
        out = model(pixel_values=images)
        return 0.5 * F.cross_entropy(out.cls_logits.float(), data["label"]) + \
            0.5 * F.cross_entropy(out.distillation_logits.float(), teacher_labels)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps, warmup, device)


def timed(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
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


# --- driver --------------------------------------------------------------------------------------------------------

def measure(side: str, args: argparse.Namespace, switches: Switches, device: torch.device) -> dict[str, Any]:
    """One side's run in this process: step time, images/s, peak memory and the precision it ran in."""
    bf16 = is_bf16(switches.precision or args.precision, device)
    run = run_ours if side == "ours" else run_peer
    result = run(args.method, args.preset, args.batch, args.steps, args.warmup, bf16, device, args.zero_stage,
                 switches)
    return {**result, "images_per_s": args.batch / result["step_time_s"], "precision": "bf16" if bf16 else "fp32"}


def child(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("RESULT " + json.dumps(measure(args.side, args, switches_of(args), device)))


def switches_of(args: argparse.Namespace) -> Switches:
    return Switches(compile=args.compile, fused=args.fused, fused_attention=args.fused_attention,
                    grad_ckpt=args.grad_ckpt, grad_accum=args.grad_accum, mask_ratio=args.mask_ratio)


def switch_flags(s: Switches) -> list[str]:
    flags = ["--fused", s.fused, "--grad-accum", str(s.grad_accum)]
    flags += ["--compile"] if s.compile else []
    flags += [] if s.fused_attention else ["--no-fused-attention"]
    flags += ["--grad-ckpt"] if s.grad_ckpt else []
    flags += ["--mask-ratio", str(s.mask_ratio)] if s.mask_ratio else []
    return flags


def is_bf16(precision: str, device: torch.device) -> bool:
    """--precision auto is what the jobs resolve: bf16 on a GPU, fp32 on a CPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def run_side(side: str, args: argparse.Namespace, switches: Switches, device: torch.device) -> dict[str, Any]:
    if args.in_process:   # no fresh process per side: the peak memory is this process's, the figures a smoke test's
        return measure(side, args, switches, device)
    cmd = [sys.executable, __file__, "--side", side, "--method", args.method, "--preset", args.preset,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--precision", switches.precision or args.precision, "--zero-stage", str(args.zero_stage),
           *switch_flags(switches)]
    env = child_env(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{side} failed: {' '.join(cmd)}")
    return json.loads(lines[-1][len("RESULT "):])


def repeated(runs: list[tuple[str, str, Switches]], args: argparse.Namespace, device: torch.device
             ) -> dict[str, dict[str, Any]]:
    """Each (row, side, switches) run `args.repeats` times, the rows interleaved (a slow spell of the machine hits
    them alike); a row reports its median run by images/s and keeps every run's images/s."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in runs}
    for _ in range(args.repeats):
        for name, side, switches in runs:
            results[name].append(run_side(side, args, switches, device))
    rows = {}
    for name, tries in results.items():
        ranked = sorted(tries, key=lambda r: r["images_per_s"])
        rows[name] = {**ranked[len(ranked) // 2], "images_per_s_runs": [r["images_per_s"] for r in tries]}
    return rows


SWITCH_ROWS: dict[str, Switches] = {
    "baseline (the jobs' defaults)": Switches(),
    "engine.compile=true": Switches(compile=True),
    "optim.fused=off": Switches(fused="off"),
    "engine.fused_attention=false": Switches(fused_attention=False),
    "model.grad_checkpointing=true": Switches(grad_ckpt=True),
    "engine.grad_accum=2 (same images per step)": Switches(grad_accum=2),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="mae", choices=METHODS)
    parser.add_argument("--preset", default="tiny", choices=list(GEOMETRY))
    parser.add_argument("--batch", type=int, default=64, help="images per optimizer step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3],
                        help="ZeRO stage of our engine (the jobs' default is 1; 0 without bf16 is plain data parallel)")
    parser.add_argument("--compile", action="store_true", help="engine.compile=true")
    parser.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="optim.fused")
    parser.add_argument("--no-fused-attention", dest="fused_attention", action="store_false",
                        help="engine.fused_attention=false")
    parser.add_argument("--grad-ckpt", action="store_true", help="model.grad_checkpointing=true")
    parser.add_argument("--grad-accum", type=int, default=1, help="engine.grad_accum")
    parser.add_argument("--mask-ratio", type=float, default=0.0, help="MAE: model.mask_ratio (0 = the preset's)")
    parser.add_argument("--switches", action="store_true",
                        help="ours only, once per speed switch (each alone against the defaults)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="measure ours only")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every row, interleaved; each row reports its median (default 1)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="run the sides in this process (a smoke test: memory figures are not per side)")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        child(args)
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = is_bf16(args.precision, device)
    if args.switches:
        switch_rows = dict(SWITCH_ROWS)
        if args.method == "mae":  # what dropping the masked tokens from the encoder saves
            tokens = (GEOMETRY[args.preset]["img_size"] // GEOMETRY[args.preset]["patch_size"]) ** 2
            switch_rows[f"encoder on {tokens - 1} of {tokens} tokens (mask_ratio 1/{tokens})"] = \
                Switches(mask_ratio=1 / tokens)
        other = "fp32" if bf16 else "bf16"
        if not (other == "bf16" and args.zero_stage == 0):  # the jobs refuse 16-bit precision without ZeRO
            switch_rows[f"engine.precision={other}"] = Switches(precision=other)
        runs = [(name, "ours", s) for name, s in switch_rows.items()]
    else:
        runs = [("ours", "ours", switches_of(args))] + ([("peer", "peer", switches_of(args))] if args.peer else [])
    rows = repeated(runs, args, device)
    peaks = {p: matmul_peak(device, {"bf16": torch.bfloat16, "fp32": torch.float32}[p])
             for p in sorted({row["precision"] for row in rows.values()})}
    peak = peaks["bf16" if bf16 else "fp32"]
    flops = next(iter(rows.values()))["flops_per_image"]
    for row in rows.values():  # the peer does the same work as ours; a switch row counts its own model's FLOPs
        row["mfu"] = row.get("flops_per_image", flops) * row["images_per_s"] / peaks[row["precision"]]
    name = device_name()
    first = next(iter(rows.values()))["images_per_s"]
    report = {**header(), "method": args.method, "preset": args.preset, "batch": args.batch,
              "precision": "bf16" if bf16 else "fp32", "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
              "zero_stage": args.zero_stage, "switches": {} if args.switches else vars(switches_of(args)),
              "matmul_peak_flops": peak, "matmul_peak_flops_by_precision": peaks, "flops_per_image": flops,
              "results": rows}
    if "peer" in rows:
        report["ratio_images_per_s"] = rows["ours"]["images_per_s"] / rows["peer"]["images_per_s"]
    print(f"{args.method.upper()} {args.preset}, batch {args.batch}, {report['precision']}, ZeRO-{args.zero_stage} on "
          f"{name} (matmul peak {peak / 1e12:.2f} TFLOP/s, {flops / 1e9:.2f} GFLOP per image)")
    width = max(len(k) for k in rows) + 2
    print(f"{'':{width}} {'images/s':>10} {'step s':>9} {'peak GiB':>9} {'MFU':>7} {'vs first':>9}")
    for key, r in rows.items():
        print(f"{key:{width}} {r['images_per_s']:10.1f} {r['step_time_s']:9.4f} {r['peak_memory_gib']:9.2f} "
              f"{100 * r['mfu']:6.1f}% {r['images_per_s'] / first:8.2f}x")
    if "ratio_images_per_s" in report:
        print(f"ours / peer images/s: {report['ratio_images_per_s']:.2f}x")
    kind = "switches" if args.switches else f"zero{args.zero_stage}"
    filename = f"train_throughput-{args.method}-{args.preset}-{device.type}-{kind}.json"
    write_report(report, args.out or ROOT / "bench" / "results" / filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
