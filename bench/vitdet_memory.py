"""Peak memory and images/s of ViTDet's backbone, forward + backward, windowed against global attention:

    python bench/vitdet_memory.py [--device cpu|cuda] [--sizes 512,1024] [--batch 1] [--embed-dim D] [--depth L]
                                  [--heads H] [--window 14] [--global-blocks 2,5,8,11] [--dtype auto|fp32|bf16]
                                  [--warmup N] [--iters N] [--isolate spawn|fork] [--out FILE]

The model is finetune/vitdet.py's `ViTDetBackbone` (timm's `VisionTransformerSAM`, no neck) built by
`vitdet_from_config`, patch 16, absolute positions and decomposed relative positions on, two variants that differ in
attention only:

* windowed: ViTDet's, `--window` x `--window` token windows (the grid zero-padded to a multiple of the window) in
  every block but `--global-blocks` (default ViTDet's evenly spaced 4, `default_global_blocks`: 2, 5, 8, 11 of 12);
* global: every block attends over the whole grid (timm's window_size 0).

Defaults: on a CPU a small width, 192 wide x 12 deep x 3 heads (depth 12, so ViTDet's global blocks apply), fp32; on
a GPU ViT-B (768 x 12 x 12) under bf16 autocast. Each (size, attention) runs in its own process, so that the peak is
that configuration's alone: `--isolate spawn` (default) a fresh interpreter, `--isolate fork` (CPU only) a child
forked from this process after the imports and before any tensor maths (no OpenMP pool to inherit); the tests and the
GPU check's CPU rehearsal use fork. A step is forward, loss = mean of the squared feature map (fp32), backward,
gradients freed (`zero_grad(set_to_none=True)`, as a training step leaves them); `--warmup` untimed steps, then
`--iters` timed ones, each timed alone: images/s = batch / the median step time (a busy spell of a shared machine
moves the median less than the mean).

Peak memory, params + gradients + activations:
* CUDA: `torch.cuda.max_memory_allocated` with the peak reset after the model and the input are built (the input
  and the weights are in it; the process held nothing before the build);
* CPU: the process's resident high-water mark `VmHWM` (/proc/self/status) minus its resident set `VmRSS` just
  before the build (of the input and the model; torch imported, one small matmul run so that the thread pool exists),
  with the high-water mark reset right after the build by `echo 5 > /proc/self/clear_refs` (Linux >= 4.0; the
  build's temporaries are not counted). Where that reset is refused, `ru_maxrss` (the peak since the process
  started) is used instead and the report says so. Resident memory includes the allocator's slack, so the CPU
  figure is a little above the tensors' bytes.

Beside the measurements, counted per image from the geometry (no model needed): tokens, the attention-score elements
(every query-key pair, per head; timm's decomposed relative positions materialise a bias of the same size) and the
attention matmul FLOPs (q k^T and attn v: 4 L^2 D per sequence of L tokens), per block and in all, and the forward
matmul FLOPs of the whole backbone. Results go to a JSON file (bench/results/ by default) and a markdown table on
stdout; bench/RESULTS.md records them. Exit 2 for bad options, 1 when a configuration fails (a GPU out of memory
is a result, not a failure: that row says "out of memory").
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import child_env, header, write_report  # noqa: E402 - after the path is set
from finetune.vitdet import default_global_blocks, vitdet_from_config  # noqa: E402

PATCH = 16
ATTENTIONS = ("windowed", "global")
# the default widths: (embed_dim, depth, heads) per device
WIDTHS = {"cpu": (192, 12, 3), "cuda": (768, 12, 12)}
STEPS = {"cpu": (1, 5), "cuda": (3, 10)}   # (warm-up, timed) steps per device
MIB = 2 ** 20


class BadOption(Exception):
    """An option the user must change; the message is the paragraph printed."""


# --- what the geometry says ----------------------------------------------------------------------------------------

def block_counts(grid: int, dim: int, heads: int, window: int) -> dict[str, int]:
    """One block's attention on a grid x grid token map: window 0 = global. Per image: the sequences attention runs
    over, tokens per sequence, tokens after padding, query-key score elements over all heads, the FLOPs of q k^T and
    attn v (2 matmuls of 2 L^2 d per head, L tokens per sequence, d = dim / heads)."""
    if window:
        side = math.ceil(grid / window) * window      # timm's window_partition pads bottom/right with zeros
        sequences, length = (side // window) ** 2, window * window
    else:
        side, sequences, length = grid, 1, grid * grid
    return {"sequences": sequences, "tokens_per_sequence": length, "padded_tokens": side * side,
            "score_elements": heads * sequences * length ** 2, "attention_flops": 4 * sequences * length ** 2 * dim}


def model_counts(px: int, dim: int, depth: int, heads: int, window: int, global_blocks: tuple[int, ...],
                 mlp_ratio: float = 4.0) -> dict[str, Any]:
    """The whole backbone's counts per image (window 0: every block global): tokens, attention-score elements and
    attention FLOPs summed over the blocks, and the forward matmul FLOPs (patch embedding; per block qkv + proj on
    the padded tokens, the MLP on the grid's tokens, the attention matmuls)."""
    grid = px // PATCH
    windows = [0 if (not window or i in global_blocks) else window for i in range(depth)]
    per_block = [block_counts(grid, dim, heads, w) for w in windows]
    linear = sum(2 * 4 * dim * dim * b["padded_tokens"] + 2 * 2 * mlp_ratio * dim * dim * grid * grid
                 for b in per_block)
    attention = sum(b["attention_flops"] for b in per_block)
    out = {"grid": grid, "tokens": grid * grid,
           "global_blocks": windows.count(0),
           "score_elements": sum(b["score_elements"] for b in per_block), "attention_flops": attention,
           "forward_matmul_flops": int(2 * 3 * PATCH * PATCH * dim * grid * grid + linear + attention),
           "global_block": block_counts(grid, dim, heads, 0)}
    if window:
        out["windowed_block"] = block_counts(grid, dim, heads, window)
    return out


# --- one configuration, in its own process -------------------------------------------------------------------------

def proc_status_kib(field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark to its current resident set (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return proc_status_kib("VmHWM") <= proc_status_kib("VmRSS") + 1024
    except OSError:
        return False


def build(cfg: dict[str, Any], px: int, attention: str) -> torch.nn.Module:
    """ViTDet's backbone at `px` with `attention` (windowed: cfg's window and global blocks; global: window 0)."""
    windowed = attention == "windowed"
    return vitdet_from_config(dict(
        img_size=px, patch_size=PATCH, embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["heads"],
        mlp_ratio=4.0, qkv_bias=True, use_abs_pos=True, use_rel_pos=True,
        window_size=cfg["window"] if windowed else 0,
        global_attn_indexes=list(cfg["global_blocks"]) if windowed else [], neck_chans=0, num_classes=0,
        global_pool=""))


def measure(cfg: dict[str, Any], px: int, attention: str) -> dict[str, Any]:
    """Forward + backward of one configuration in this process: images/s and the peak memory above the process
    before the build (see the module docstring for how)."""
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated(device)
    else:
        w = torch.randn(256, 256, requires_grad=True)
        (w @ w).sum().backward()          # the thread pool and autograd engine exist before the baseline
        del w
        gc.collect()
        base = proc_status_kib("VmRSS") * 1024
    images = torch.randn(cfg["batch"], 3, px, px, device=device)
    model = build(cfg, px, attention).to(device).train()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        method = "torch.cuda.max_memory_allocated, reset after the build"
    else:
        method = ("VmHWM reset after the build (clear_refs 5) - VmRSS before the build" if reset_peak_rss() else
                  "ru_maxrss (peak since the process started; clear_refs refused) - VmRSS before the build")
    bf16 = cfg["dtype"] == "bf16"

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            features = model(images)                      # [N, D, H/16, W/16]
        loss = features.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    try:
        for _ in range(cfg["warmup"]):
            step()
        sync()
        times = []
        for _ in range(cfg["iters"]):   # each step timed alone: the median resists a busy spell of a shared machine
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:   # a result: this configuration does not fit
        return {"status": "out of memory", "error": str(e).splitlines()[0], "params_mib": params / MIB}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    elif method.startswith("VmHWM"):
        peak = proc_status_kib("VmHWM") * 1024 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    median = statistics.median(times)
    return {"status": "ok", "images_per_s": cfg["batch"] / median, "step_time_s": median,
            "step_times_s": times, "peak_memory_mib": peak / MIB, "params_mib": params / MIB,
            "memory_method": method, "threads": torch.get_num_threads(), "pid": os.getpid()}


def run_spawned(cfg: dict[str, Any], px: int, attention: str) -> dict[str, Any]:
    """`measure` in a fresh interpreter (this script with --worker)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**cfg, "px": px,
                                                                                 "attention": attention})]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{px} px {attention} exited {proc.returncode}: {tail[0]} (command: {shlex.join(cmd)})")
    return json.loads(lines[-1][len("RESULT "):])


def run_forked(cfg: dict[str, Any], px: int, attention: str) -> dict[str, Any]:
    """`measure` in a child forked from this process; the result comes back through a pipe."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: measure, write the JSON, leave without running the parent's cleanup
        code = 1
        try:
            os.close(read_fd)
            with os.fdopen(write_fd, "w") as f:
                f.write(json.dumps(measure(cfg, px, attention)))
            code = 0
        except BaseException:  # noqa: BLE001 - the child's error goes to stderr, its exit code says it failed
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not text:
        raise RuntimeError(f"{px} px {attention}: the forked child exited {code} (its traceback is above)")
    return json.loads(text)


# --- the driver ----------------------------------------------------------------------------------------------------

def int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BadOption(f"{name} {text!r} is not a comma-separated list of integers, e.g. {name} 512,1024") from None


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration every child runs, from the options and the device's defaults; BadOption if inconsistent."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise BadOption("--device cuda: no CUDA device is visible here; run on a GPU machine or use --device cpu")
    if device == "cuda" and args.isolate == "fork":
        raise BadOption("--isolate fork is for CPUs (CUDA does not survive a fork); use --isolate spawn on a GPU")
    dim, depth, heads = (v if v is not None else d for v, d in zip((args.embed_dim, args.depth, args.heads),
                                                                    WIDTHS[device]))
    warmup, iters = (v if v is not None else d for v, d in zip((args.warmup, args.iters), STEPS[device]))
    sizes = int_list(args.sizes, "--sizes")
    if not sizes or any(px < PATCH or px % PATCH for px in sizes):
        raise BadOption(f"--sizes {args.sizes}: every size must be a positive multiple of the patch ({PATCH} px), "
                        "e.g. --sizes 512,1024")
    if min(dim, depth, heads, args.batch, args.window, iters) < 1 or warmup < 0 or dim % heads:
        raise BadOption(f"--embed-dim {dim}, --depth {depth}, --heads {heads}, --batch {args.batch}, --window "
                        f"{args.window}, --iters {iters} must be >= 1 (--warmup >= 0) and the width divisible by the "
                        "heads; e.g. --embed-dim 192 --depth 12 --heads 3")
    blocks = default_global_blocks(depth) if args.global_blocks is None else int_list(args.global_blocks,
                                                                                     "--global-blocks")
    if any(not 0 <= i < depth for i in blocks) or len(set(blocks)) == depth:
        raise BadOption(f"--global-blocks {','.join(map(str, blocks))} with --depth {depth}: the indexes must lie in "
                        f"0..{depth - 1} and leave at least one windowed block (else the two models are the same); "
                        "give fewer, e.g. --global-blocks 1,3, or a larger --depth")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    return {"device": device, "sizes": list(sizes), "batch": args.batch, "embed_dim": dim, "depth": depth,
            "heads": heads, "window": args.window, "global_blocks": list(blocks), "dtype": dtype, "warmup": warmup,
            "iters": iters, "isolate": args.isolate}


def markdown(report: dict[str, Any]) -> str:
    """The results and the windowed / global ratios as markdown tables."""
    lines = ["| px | tokens | attention | images/s | peak MiB | score elements / image (M) | attention GFLOP fwd "
             "| all matmul GFLOP fwd |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for key, r in report["results"].items():
        c = r["counts"]
        measured = (f"{r['images_per_s']:.3g} | {r['peak_memory_mib']:.0f}" if r["status"] == "ok"
                    else f"{r['status']} | -")
        lines.append(f"| {r['px']} | {c['grid']}x{c['grid']} | {r['attention']} | {measured} | "
                     f"{c['score_elements'] / 1e6:.1f} | {c['attention_flops'] / 1e9:.1f} | "
                     f"{c['forward_matmul_flops'] / 1e9:.1f} |")
    lines += ["", "| px | windowed / global: images/s | peak memory | score elements | attention FLOPs "
              "| all matmul FLOPs |", "|---|---:|---:|---:|---:|---:|"]
    for px, q in report["ratios"].items():
        cells = [f"{q[k]:.2f}" if q.get(k) is not None else "-" for k in ("images_per_s", "peak_memory")]
        cells += [f"{q[k]:.3f}" for k in ("score_elements", "attention_flops", "forward_matmul_flops")]
        lines.append(f"| {px} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="512,1024", help="image sides in px, multiples of 16 (512,1024)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--embed-dim", type=int, default=None, help="width (CPU 192, CUDA 768)")
    parser.add_argument("--depth", type=int, default=None, help="blocks (12)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (CPU 3, CUDA 12)")
    parser.add_argument("--window", type=int, default=14, help="window side in tokens of the windowed model (14)")
    parser.add_argument("--global-blocks", default=None,
                        help="the windowed model's global blocks, e.g. 2,5,8,11 (default: ViTDet's 4 for the depth)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (CPU 1, CUDA 3)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (CPU 5, CUDA 10)")
    parser.add_argument("--isolate", default="spawn", choices=["spawn", "fork"],
                        help="each configuration in a fresh interpreter (spawn) or a forked child (fork, CPU only)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON report (default: bench/results/...)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:   # one configuration, spawned by the driver
        cfg = json.loads(args.worker)
        print("RESULT " + json.dumps(measure(cfg, cfg["px"], cfg["attention"])), flush=True)
        return 0
    try:
        cfg = resolve(args)
    except BadOption as e:
        print(f"vitdet_memory: {e} (exit 2)", file=sys.stderr)
        return 2
    run = run_forked if cfg["isolate"] == "fork" else run_spawned
    results: dict[str, dict[str, Any]] = {}
    try:
        for px in cfg["sizes"]:
            for attention in ATTENTIONS:
                window = cfg["window"] if attention == "windowed" else 0
                counts = model_counts(px, cfg["embed_dim"], cfg["depth"], cfg["heads"], window,
                                      tuple(cfg["global_blocks"]))
                r = run(cfg, px, attention)
                results[f"{px}/{attention}"] = {"px": px, "attention": attention, **r, "counts": counts}
                shown = (f"{r['images_per_s']:.3g} images/s, peak {r['peak_memory_mib']:.0f} MiB"
                         if r["status"] == "ok" else r["status"])
                print(f"{px} px {attention:<8} {shown}", flush=True)
    except RuntimeError as e:
        print(f"vitdet_memory: a configuration failed (exit 1): {e}", file=sys.stderr)
        return 1
    ratios: dict[str, dict[str, float | None]] = {}
    for px in cfg["sizes"]:
        w, g = results[f"{px}/windowed"], results[f"{px}/global"]
        ok = w["status"] == g["status"] == "ok"
        ratios[str(px)] = {
            "images_per_s": w["images_per_s"] / g["images_per_s"] if ok else None,
            "peak_memory": w["peak_memory_mib"] / g["peak_memory_mib"] if ok else None,
            **{k: w["counts"][k] / g["counts"][k] for k in ("score_elements", "attention_flops",
                                                             "forward_matmul_flops")}}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {**header(), "torch": torch.__version__, "config": cfg, "load_average_after": load,
              "command": shlex.join(["python", "bench/vitdet_memory.py", *(sys.argv[1:] if argv is None else argv)]),
              "results": results, "ratios": ratios}
    print(f"ViTDet backbone {cfg['embed_dim']} x {cfg['depth']} x {cfg['heads']} heads, patch {PATCH}, window "
          f"{cfg['window']}, global blocks {cfg['global_blocks']}, batch {cfg['batch']}, {cfg['dtype']} on "
          f"{report['device']}; forward + backward")
    print(markdown(report))
    name = f"vitdet_memory-{cfg['device']}-{cfg['embed_dim']}x{cfg['depth']}-b{cfg['batch']}.json"
    write_report(report, args.out or ROOT / "bench" / "results" / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
