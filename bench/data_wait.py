"""Does the data stream keep up with training? The real job, run for a few steps at each loader worker count, and
the share of its step time spent waiting for the next batch (`perf/data_wait_frac`, logged by every job):

    python bench/data_wait.py [--job pretrain_mae] [--preset tiny] [--workers 0 1 2] [--steps 60] [-- key=value ...]
    python bench/data_wait.py --preset vit_b16 --workers 4 8 16 -- data.train=s3://bucket/imagenet-256/train
    python bench/data_wait.py --launcher "deepspeed --num_gpus 8" --preset vit_b16 --workers 8 16 -- data.train=...

Each run is `<launcher> launch/<job>.py --preset P data.num_workers=W optim.max_steps=S` (no validation, no
pictures, a log line every S/4 steps; anything after `--` is passed on). Its metrics.jsonl is read back; the first
logging window (process start, worker spin-up, the first shards opened) is left out and the rest averaged:
data-wait fraction, images/s and step time. The issue's goal is a data-wait fraction under 5% at the GPU figures;
the smallest worker count that reaches it, times the ranks per node, is the number of loader cores a node needs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import child_env, header, write_report  # noqa: E402 - after the path is set

GOAL = 0.05   # data-wait fraction the issue asks for


def run_command(launcher: str, job: str, preset: str, workers: int, steps: int, run_dir: Path,
                extra: list[str]) -> list[str]:
    every = max(1, steps // 4)
    return [*shlex.split(launcher), str(ROOT / "launch" / f"{job}.py"), "--preset", preset,
            f"data.num_workers={workers}", f"optim.max_steps={steps}", f"log.every={every}", "log.eval_every=0",
            "log.images_every=0", "data.val=", "ckpt.every=0", "ckpt.keep=1", f"run.dir={run_dir}",
            f"run.name=workers{workers}", *extra]


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean perf/* figures over the logging windows after the first (metrics.jsonl rows of one run)."""
    windows = [r for r in rows if "perf/data_wait_frac" in r]
    if len(windows) < 2:
        raise ValueError(f"{len(windows)} logging window(s) with perf/ figures; run more steps (at least 2 windows "
                         "are needed: the first one holds the start-up)")
    timed = windows[1:]

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    return {"data_wait_frac": mean("perf/data_wait_frac"), "images_per_s": mean("perf/images_per_s"),
            "step_time_s": mean("perf/step_time_s"), "windows": len(timed),
            **({"mfu": mean("perf/mfu")} if all("perf/mfu" in r for r in timed) else {})}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--job", default="pretrain_mae", help="a launch/<job>.py script (default pretrain_mae)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data.num_workers to try")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--launcher", default=sys.executable, help="command before the script (default: python)")
    parser.add_argument("--workdir", type=Path, default=None, help="run directories (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/data_wait-...json)")
    args = parser.parse_args(argv)
    if not (ROOT / "launch" / f"{args.job}.py").exists():
        parser.error(f"--job {args.job}: launch/{args.job}.py does not exist")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data-wait-"))
    env = child_env()
    results: dict[str, Any] = {}
    for workers in args.workers:
        cmd = run_command(args.launcher, args.job, args.preset, workers, args.steps, workdir, extra)
        print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the run with data.num_workers={workers} failed (exit {proc.returncode})")
        metrics = workdir / args.job / f"workers{workers}" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        results[str(workers)] = {**summarise(rows), "command": cmd}

    report = {**header(), "platform": platform.processor(), "job": args.job, "preset": args.preset,
              "steps": args.steps, "launcher": args.launcher, "overrides": extra, "goal": GOAL, "results": results}
    print(f"{args.job} --preset {args.preset}, {args.steps} steps, on {report['device']} ({os.cpu_count()} CPU cores)")
    print(f"{'workers':>8} {'data wait':>10} {'images/s':>10} {'step s':>8}  goal < {GOAL:.0%}")
    for workers, r in results.items():
        verdict = "met" if r["data_wait_frac"] < GOAL else "not met"
        print(f"{workers:>8} {r['data_wait_frac']:>10.1%} {r['images_per_s']:>10.1f} {r['step_time_s']:>8.4f}  "
              f"{verdict}")
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    write_report(report, args.out or ROOT / "bench" / "results" / f"data_wait-{args.job}-{args.preset}-{kind}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
