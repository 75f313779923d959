"""Per-rank memory of MAE training under ZeRO stages 0-3, the ranks started by the deepspeed launcher as a job is:

    python bench/zero_memory.py [--preset vit_b16] [--ranks 2] [--batch 2] [--steps 2] [--stages 0 1 2 3]

For each stage the driver launches `deepspeed --num_gpus RANKS bench/zero_memory.py --worker --stage S` (on a
machine without GPUs, CPU ranks over gloo). Each rank builds `pretrain.mae.MAETask` at the preset, wraps it in the
DeepSpeed engine with the runtime's config (bf16 on GPU, fp32 on CPU) and AdamW, trains `--steps` steps, and reports:

* counted bytes this rank holds, by kind: parameters (ZeRO-3: its partition, `ds_tensor`), gradients left after the
  step's backward (module `.grad`s, plus DeepSpeed's flat gradient partitions), and optimizer states (AdamW's
  moments + the fp32 master copy the optimizer steps);
* peak memory: CUDA max allocated, or the process's peak RSS on CPU (includes activations, the Python runtime and
  allocator slack, so it moves less than the counted states);
* the ZeRO paper's expected model-state bytes per rank for the same parameter count (Rajbhandari et al. 2020, 16-bit
  training: 2 + 2 + 12 bytes per parameter, sharded by stage; fp32 training on CPU: weights 4, gradients 4, and
  AdamW 8 + the fp32 master 4, which DeepSpeed keeps under ZeRO >= 1 even for fp32).

Results go to a JSON file and a printed table; bench/RESULTS.md records them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import child_env, device_name, header, write_report  # noqa: E402 - after the path is set


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def counted_bytes(engine: Any) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states this rank holds (not shared views counted twice)."""
    from launch.runtime.engine import innermost_optimizer

    seen: set[int] = set()

    def once(t: torch.Tensor | None) -> int:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    params = 0
    for p in engine.module.parameters():
        params += once(p.ds_tensor) if hasattr(p, "ds_tensor") else once(p.data)
    grads = sum(once(p.grad) for p in engine.module.parameters())
    zero = engine.optimizer
    # DeepSpeed's gradient partitions and buckets (ZeRO-1/2: averaged_gradients + ipg_buffer; ZeRO-3: the
    # per-parameter grad partitions, which are views of one flat buffer, counted once through its storage)
    for name in ("averaged_gradients", "ipg_buffer", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
        held = getattr(zero, name, None)
        for group in (held.values() if isinstance(held, dict) else (held or [])):
            for t in group if isinstance(group, (list, tuple)) else [group]:
                grads += once(t) if torch.is_tensor(t) else 0
    opt = innermost_optimizer(zero)
    # the fp32 master tensors the optimizer steps: its param groups (ZeRO-0/1/2), or ZeRO-3's flat partitions,
    # which it puts into the groups only while stepping
    masters = [p for group in opt.param_groups for p in group["params"]]
    masters += list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
    states = 0
    for p in masters:
        states += once(p.data) + sum(once(v) for v in opt.state.get(p, {}).values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optimizer_states": states}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    from launch.runtime import distributed, engine as engine_lib
    from pretrain.mae import MAE_ARCHS, MAEConfig, MAETask

    world = distributed.init()
    distributed.seed_all(0)
    task = MAETask(MAEConfig(**MAE_ARCHS[args.preset]))
    n_params = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    bf16 = world.on_gpu
    groups = engine_lib.param_groups(task.param_groups(), 0.05)
    optimizer = engine_lib.build_optimizer(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05,
                                           on_gpu=world.on_gpu)
    zero: dict[str, Any] = {"stage": args.stage}
    if args.stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=world.on_gpu, reduce_bucket_size=int(5e8),
                    allgather_bucket_size=int(5e8))
    ds_config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": zero, "bf16": {"enabled": bf16}, "gradient_clipping": 0.0,
                 "data_types": {"grad_accum_dtype": "fp32"}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10 ** 12}
    engine = engine_lib.initialize(task.model, optimizer, ds_config)
    size = task.cfg.img_size
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=world.device)
    after_backward: dict[str, int] = {}
    for _ in range(args.steps):
        loss, _ = task.training_step(engine, {"image": images})
        engine.backward(loss)
        after_backward = counted_bytes(engine)
        engine.step()
    after_step = counted_bytes(engine)
    result = {"rank": world.rank, "stage": args.stage, "params_numel": n_params, "bf16": bf16,
              "params_bytes": after_step["params"], "grads_bytes": after_backward["grads"],
              "optimizer_states_bytes": after_step["optimizer_states"],
              "peak_memory_bytes": peak_memory_bytes(world.device), "loss": float(loss.item())}
    print("RESULT " + json.dumps(result), flush=True)


def expected_bytes(numel: int, stage: int, ranks: int, bf16: bool) -> dict[str, float]:
    """Model-state bytes per rank the ZeRO paper predicts: weights / gradients / optimizer states by stage."""
    weight, grad = (2, 2) if bf16 else (4, 4)
    states = 12 if (bf16 or stage > 0) else 8     # AdamW's two moments (+ the fp32 master under ZeRO or 16-bit)
    return {"params": numel * weight / (ranks if stage >= 3 else 1),
            "grads": numel * grad / (ranks if stage >= 2 else 1),
            "optimizer_states": numel * states / (ranks if stage >= 1 else 1)}


def launch(args: argparse.Namespace, stage: int) -> list[dict[str, Any]]:
    from launch.runtime.distributed import free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus", str(args.ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
            "--worker", "--stage", str(stage), "--preset", args.preset, "--batch", str(args.batch),
            "--steps", str(args.steps)]
    env = child_env()
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    if proc.returncode != 0 or len(rows) != args.ranks:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"ZeRO-{stage} run failed (exit {proc.returncode}): {' '.join(cmd)}")
    return sorted(rows, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_b16", choices=["tiny", "vit_b16", "vit_l16", "vit_h14"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="images per rank per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's argument
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    rows = {stage: launch(args, stage) for stage in args.stages}
    gib = 2 ** 30
    device = device_name()
    first = rows[args.stages[0]][0]
    print(f"MAE {args.preset} ({first['params_numel'] / 1e6:.1f}M trained parameters), {args.ranks} ranks, batch "
          f"{args.batch} per rank, {'bf16' if first['bf16'] else 'fp32'} on {device}; GiB per rank "
          f"(counted [expected]); peak = {'max allocated' if torch.cuda.is_available() else 'peak RSS'}")
    print(f"{'stage':>5} {'rank':>4} {'params':>15} {'grads':>15} {'optim states':>15} {'peak':>7}")
    for stage, per_rank in rows.items():
        expected = expected_bytes(per_rank[0]["params_numel"], stage, args.ranks, per_rank[0]["bf16"])
        for r in per_rank:
            r["expected_bytes"] = expected
            cells = [f"{r[k + '_bytes'] / gib:6.3f} [{expected[k] / gib:5.3f}]"
                     for k in ("params", "grads", "optimizer_states")]
            print(f"{stage:>5} {r['rank']:>4} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                  f"{r['peak_memory_bytes'] / gib:7.2f}")
    report = {**header(), "preset": args.preset, "ranks": args.ranks, "batch_per_rank": args.batch,
              "steps": args.steps, "results": {str(k): v for k, v in rows.items()}}
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    name = f"zero_memory-{args.preset}-{args.ranks}ranks-{kind}.json"
    write_report(report, args.out or ROOT / "bench" / "results" / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
