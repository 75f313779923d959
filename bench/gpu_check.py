"""The prepared GPU check: every job for a few steps under the deepspeed launcher, MAE's throughput, MFU and memory
at scale against transformers, the data wait of the real job, and bf16 numerics, in one command that fits a short
window on one GPU (about 6 of its 8 minutes on one H100/H200):

    python bench/gpu_check.py OUT_DIR                      # on the GPU machine
    python bench/gpu_check.py OUT_DIR --cpu                # the same plan at tiny sizes on a CPU (the tests run it)
    python bench/gpu_check.py OUT_DIR --only mae,mae_resume,convert --budget 300
    python bench/gpu_check.py --list                       # the rows, their limits and what each needs

Before the window (here, with network): copy the wheels the GPU image lacks into the repository's git-ignored
folder .gpuwheels/ (`mkdir -p .gpuwheels && cp ../shared/gpu/wheels/*.whl .gpuwheels/`) and carry it. The check
installs them with `pip install --no-index --no-deps --target WORK/site` when deepspeed, webdataset, pycocotools or
braceexpand are missing (never from the network) and puts that folder on every row's PYTHONPATH.

The plan (rows run in dependency order; the functional rows up to --parallel at a time, the timing rows alone):
  data          embedded photos and digits, JPEG shards of the bundled photographs (data wait), COCO-style
                detection shards of painted squares (DETR), all generated on the machine
  mae           pretrain_mae (tiny), S steps in bf16, a checkpoint at S/2 and at S, TensorBoard, export
  mae_resume    the same run with run.resume=auto to 1.5 S: must resume at step S
  convert       convert_checkpoint of that run (features compared with the task's model)
  mae_zero2     engine.zero_stage=2;  mae_compile: engine.compile=true
  dvae, beit    train_dvae, then pretrain_beit on its tokenizer
  cls, deit     finetune_cls from the MAE export, then pretrain_deit with that classifier as its teacher
  detr, ipt     finetune_detr from the MAE export (pycocotools mAP), finetune_ipt
  numerics      MAE's and BEiT's loss in bf16 against fp32 on the same batch and weights (ViT-B/16 geometry)
  throughput_b16  bench/train_throughput.py: MAE ViT-B/16, batch 256, bf16, ours against ViTMAEForPreTraining
  throughput_l16  ours at ViT-L/16, batch 128: fits, memory, MFU
  data_wait     bench/data_wait.py: the real pretrain_mae vit_b16 job at batch 256 with 12 loader workers
  vitdet_memory bench/vitdet_memory.py: ViTDet's ViT-B backbone, forward + backward at 512 and 1024 px in bf16,
                windowed against global attention: images/s and peak memory, each in its own process
S is 20 on a GPU, 2 with --cpu. With --cpu the job rows run in processes forked from this one (the imports are paid
once: the tests keep it under a minute), compile uses the "eager" backend, and every size is tiny.

Every row is its own process group with its own time limit: a row past its limit is killed with all its children
and the next row starts; a row whose inputs failed is skipped; the --budget (default 480 s) stops starting rows
that cannot finish inside it. Writes OUT_DIR/gpu_check.json (every row: status, seconds, figures, first error line,
command), OUT_DIR/gpu_check.md (the same as tables) and OUT_DIR/logs.txt (the tail of every row's log). At the end
no process of the check is left (every process carries a marker in its environment; any still alive is killed).
Exit 0 when every row passed, 1 otherwise, 2 for a bad command line or missing wheels.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKER = "VITPRETRAIN_GPU_CHECK"   # in the environment of every process the check starts
NEEDED = ("deepspeed", "webdataset", "pycocotools", "braceexpand")   # what a bare GPU image lacks
WHEELS = ROOT / ".gpuwheels"       # git-ignored; the wheels from ../shared/gpu/wheels


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU plan and its CPU rehearsal."""

    gpu: bool
    steps: int                 # optimizer steps of every job row
    batch: int | None          # data.batch_size of the job rows (None: the presets')
    workers: int               # data.num_workers of the job rows
    compile_backend: str
    numerics_preset: str       # bench/train_throughput.py's GEOMETRY key
    numerics_batch: int
    throughput: tuple[str, int, str, int]    # (preset, batch) ours vs peer, then (preset, batch) ours only
    throughput_steps: tuple[int, int]        # timed steps, warm-up steps
    data_wait: tuple[str, int, int, int]     # preset, batch, loader workers, steps
    jpegs: tuple[int, int, int]              # images, long side, shards
    ipt_eval_images: int
    pretrain_val: bool         # validation in the pretraining rows (the finetuning rows always evaluate)
    precision: str             # engine.precision of the job rows
    timing_precision: str      # of the throughput and data-wait rows (on a CPU they only show the scripts work)
    small_val: bool            # cls / deit evaluate on 40 digits instead of the 360 of digits_val
    ipt_tasks: str             # model.tasks of the ipt row ("" = all six)
    shuffle_buffer: int        # data.shuffle_buffer of the job rows (0 = the default; the first batch waits for it)
    vitdet: tuple[str, ...]    # bench/vitdet_memory.py's options (the ViTDet backbone, windowed vs global attention)


GPU = Sizes(gpu=True, steps=20, batch=None, workers=4, compile_backend="inductor", numerics_preset="vit_b16",
            numerics_batch=64, throughput=("vit_b16", 256, "vit_l16", 128), throughput_steps=(20, 5),
            data_wait=("vit_b16", 256, 12, 40), jpegs=(4096, 500, 32), ipt_eval_images=8,
            pretrain_val=True, precision="bf16", timing_precision="bf16", small_val=False, ipt_tasks="",
            shuffle_buffer=0, vitdet=("--device", "cuda", "--sizes", "512,1024", "--dtype", "bf16"))
CPU = Sizes(gpu=False, steps=2, batch=8, workers=0, compile_backend="eager", numerics_preset="tiny",
            numerics_batch=4, throughput=("tiny", 8, "tiny", 8), throughput_steps=(2, 1),
            data_wait=("tiny", 8, 1, 8), jpegs=(32, 96, 4), ipt_eval_images=2,
            pretrain_val=False, precision="bf16", timing_precision="fp32", small_val=True,
            ipt_tasks="[denoise30,sr2]", shuffle_buffer=32,
            vitdet=("--device", "cpu", "--sizes", "64,128", "--embed-dim", "32", "--depth", "4", "--heads", "2",
                    "--window", "4", "--global-blocks", "1,3", "--warmup", "1", "--iters", "1", "--isolate", "fork"))


class RowFailed(Exception):
    """A row ran but its result is wrong; the message is the row's error line."""


@dataclass
class Row:
    name: str
    script: str                          # path relative to the repository root
    args: list[str]
    limit_s: float
    job: bool = False                    # a launch/ job: under the deepspeed launcher on a GPU
    needs: tuple[str, ...] = ()
    timing: bool = False                 # runs alone (throughput and data-wait figures)
    check: Callable[[Path], dict[str, Any]] | None = None   # the row's log -> figures; raises RowFailed
    result: dict[str, Any] = field(default_factory=dict)


# --- the plan ------------------------------------------------------------------------------------------------------

def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RowFailed(f"{path} was not written")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_figures(run_dir: Path, steps: int, export: str = "backbone") -> dict[str, Any]:
    """A job's own record: metrics.jsonl reached `steps` with a finite loss, and its export exists."""
    rows = [r for r in jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    if not rows or rows[-1].get("step") != steps:
        raise RowFailed(f"{run_dir}/metrics.jsonl: last logged step {rows[-1].get('step') if rows else None}, "
                        f"expected {steps}")
    losses = [r["train/loss"] for r in rows]
    if not all(math.isfinite(v) for v in losses):
        raise RowFailed(f"{run_dir}: non-finite train loss {losses}")
    from contracts.backbone import BACKBONE_EXPORT, WEIGHTS_NAME

    # a backbone is the timm folder export/ itself; other exports are export/<name>.safetensors
    weights = run_dir / "export" / (WEIGHTS_NAME if export == BACKBONE_EXPORT else f"{export}.safetensors")
    if not weights.is_file():
        raise RowFailed(f"{weights} was not written")
    last = rows[-1]
    figures = {"loss_first": losses[0], "loss_last": losses[-1], "step": last["step"]}
    for key in ("perf/images_per_s", "perf/mfu", "perf/data_wait_frac", "mem/cuda_max_allocated_gib",
                "mem/cpu_rss_gib"):
        if key in last:
            figures[key.split("/")[1]] = last[key]
    evals = [r for r in jsonl(run_dir / "metrics.jsonl") if any(k.startswith("val/") for k in r)]
    if evals:
        figures.update({k: v for k, v in evals[-1].items() if k.startswith("val/")})
    return figures


def plan(sizes: Sizes, work: Path, out: Path) -> list[Row]:
    s = sizes.steps
    runs, data = work / "runs", work / "data"
    common = [f"optim.max_steps={s}", f"log.every={max(1, s // 2)}", "log.eval_every=0", "log.images_every=0",
              "optim.warmup_steps=1", f"engine.precision={sizes.precision}", f"data.num_workers={sizes.workers}",
              f"run.dir={runs}", "ckpt.every=0"] + ([f"data.batch_size={sizes.batch}"] if sizes.batch else []) + (
        [f"data.shuffle_buffer={sizes.shuffle_buffer}"] if sizes.shuffle_buffer else [])
    digits_val = [f"data.val={data / 'digits_small'}"] if sizes.small_val else []

    no_val = [] if sizes.pretrain_val else ["data.val="]

    def job(name: str, script: str, *args: str, needs: tuple[str, ...] = ("data",), limit_s: float = 120,
            export: str = "backbone") -> Row:
        run_dir = runs / script / name
        return Row(name, f"launch/{script}.py", [*common, f"run.name={name}", *args], limit_s, job=True,
                   needs=needs, check=lambda log: job_figures(run_dir, s, export))

    mae_run = runs / "pretrain_mae" / "mae"
    mae_export = mae_run / "export"
    cls_export = runs / "finetune_cls" / "cls" / "export"

    def resumed(log: Path) -> dict[str, Any]:
        text = log.read_text(errors="replace")
        if f"step{s:08d}" not in text or "resuming from" not in text:
            raise RowFailed(f"did not resume from checkpoints/step{s:08d} (no 'resuming from ... step{s:08d}' line)")
        return job_figures(mae_run, s + s // 2)

    def converted(log: Path) -> dict[str, Any]:
        files = sorted(p.name for p in (work / "converted").iterdir()) if (work / "converted").is_dir() else []
        if "model.safetensors" not in files:
            raise RowFailed(f"{work / 'converted'} holds {files}, no model.safetensors")
        return {"files": files}

    def report(name: str) -> Callable[[Path], dict[str, Any]]:
        return lambda log: read_report(out / name)

    (tp_preset, tp_batch, tpl_preset, tpl_batch), (tsteps, twarm) = sizes.throughput, sizes.throughput_steps
    dw_preset, dw_batch, dw_workers, dw_steps = sizes.data_wait
    throughput = ["--method", "mae", "--precision", sizes.timing_precision, "--steps", str(tsteps), "--warmup",
                  str(twarm), *([] if sizes.gpu else ["--in-process"])]   # on a CPU: no imports per side
    return [
        Row("data", "bench/gpu_check.py", ["--make-data", str(data), "--sizes", "gpu" if sizes.gpu else "cpu"], 240,
            check=lambda log: json.loads((data / "made.json").read_text())),
        job("mae", "pretrain_mae", f"ckpt.every={max(1, s // 2)}", "ckpt.keep=2", f"log.images_every={s}", *no_val),
        Row("mae_resume", "launch/pretrain_mae.py",
            [*common, "run.name=mae", "run.resume=auto", f"optim.max_steps={s + s // 2}",
             f"ckpt.every={max(1, s // 2)}", "ckpt.keep=2", *no_val], 120, job=True, needs=("mae",), check=resumed),
        Row("convert", "launch/convert_checkpoint.py", [str(mae_run), "--out", str(work / "converted")], 90,
            needs=("mae_resume",), check=converted),
        job("mae_zero2", "pretrain_mae", "engine.zero_stage=2", *no_val),
        job("mae_compile", "pretrain_mae", "engine.compile=true", f"engine.compile_backend={sizes.compile_backend}",
            *no_val, limit_s=240),
        job("dvae", "train_dvae", *no_val, export="tokenizer"),
        job("beit", "pretrain_beit", f"tokenizer={runs / 'train_dvae' / 'dvae'}", *no_val, needs=("dvae",)),
        job("cls", "finetune_cls", f"model.init={mae_export}", *digits_val, needs=("mae",)),
        job("deit", "pretrain_deit", f"teacher={cls_export}", *digits_val, needs=("cls",)),
        job("detr", "finetune_detr", f"model.init={mae_export}", f"data.train={data / 'coco_train'}",
            f"data.val={data / 'coco_val'}", "model.num_classes=2", "model.scales=[128,160]", "model.max_size=200",
            "model.eval_size=160", *(["data.batch_size=2"] if sizes.batch else []), needs=("mae", "data")),
        job("ipt", "finetune_ipt", f"model.eval_images={sizes.ipt_eval_images}",
            *([f"model.tasks={sizes.ipt_tasks}"] if sizes.ipt_tasks else []), export="ipt"),
        Row("numerics", "bench/gpu_check.py", ["--numerics", str(out / "numerics.json"), "--preset",
                                               sizes.numerics_preset, "--batch", str(sizes.numerics_batch)], 120,
            check=report("numerics.json")),
        Row("throughput_b16", "bench/train_throughput.py",
            [*throughput, "--preset", tp_preset, "--batch", str(tp_batch), "--out", str(out / "throughput_b16.json")],
            180, timing=True, needs=(), check=report("throughput_b16.json")),
        Row("throughput_l16", "bench/train_throughput.py",
            [*throughput, "--preset", tpl_preset, "--batch", str(tpl_batch), "--no-peer",
             "--out", str(out / "throughput_l16.json")], 150, timing=True, check=report("throughput_l16.json")),
        Row("data_wait", "bench/data_wait.py",
            ["--launcher", "", "--preset", dw_preset, "--workers", str(dw_workers), "--steps", str(dw_steps),
             "--workdir", str(work / "data_wait"), "--out", str(out / "data_wait.json"), "--",
             f"data.train={data / 'jpeg' / 'shards'}", f"data.batch_size={dw_batch}",
             f"engine.precision={sizes.timing_precision}",
             "data.mode=resampled"], 180, timing=True, needs=("data",), check=report("data_wait.json")),
        Row("vitdet_memory", "bench/vitdet_memory.py", [*sizes.vitdet, "--out", str(out / "vitdet_memory.json")],
            150, timing=True, check=report("vitdet_memory.json")),
    ]


def read_report(path: Path) -> dict[str, Any]:
    """The figures a bench script's JSON report holds, for the summary."""
    if not path.is_file():
        raise RowFailed(f"{path} was not written")
    report = json.loads(path.read_text())
    if "results" not in report:
        return report
    figures: dict[str, Any] = {"device": report.get("device")}
    for side, r in report["results"].items():
        for key in ("images_per_s", "mfu", "peak_memory_gib", "peak_memory_mib", "step_time_s", "data_wait_frac"):
            if key in r:
                figures[f"{side}/{key}"] = r[key]
    if "ratio_images_per_s" in report:
        figures["ours/peer images/s"] = report["ratio_images_per_s"]
    for px, ratio in report.get("ratios", {}).items():   # bench/vitdet_memory.py: windowed / global at each size
        figures[f"{px} windowed/global images/s"] = ratio["images_per_s"]
        figures[f"{px} windowed/global peak memory"] = ratio["peak_memory"]
    return figures


# --- making the data -----------------------------------------------------------------------------------------------

def paint_squares_coco(folder: Path, n: int, seed: int) -> Path:
    """A COCO instances file over `n` noisy PNGs with 1-3 bright squares each, of two categories (ids 3 and 5)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    coco: dict[str, list] = {"images": [], "annotations": [],
                             "categories": [{"id": 3, "name": "amber"}, {"id": 5, "name": "cyan"}]}
    for i in range(n):
        w, h = int(rng.integers(120, 200)), int(rng.integers(120, 200))
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(16, 48))
            x, y, cat = int(rng.integers(0, w - side)), int(rng.integers(0, h - side)), int(rng.choice([3, 5]))
            pixels[y:y + side, x:x + side] = (255, 190, 0) if cat == 3 else (0, 190, 255)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "area": side * side,
                                        "bbox": [x, y, side, side], "category_id": cat, "iscrowd": 0})
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "instances.json").write_text(json.dumps(coco))
    return folder / "instances.json"


def make_data(data: Path, sizes: Sizes) -> dict[str, Any]:
    """Every dataset the plan reads, built before the job rows (which would otherwise build them concurrently)."""
    from bench.data_throughput import make_images, prepare
    from data_pipeline.embedded import ensure_built
    from data_pipeline.write import main as write_main

    made: dict[str, Any] = {}
    for name in ("photos", "photos_val", "digits", "digits_val"):
        t0 = time.perf_counter()
        ensure_built(name)
        made[f"embedded:{name} s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    n, long_side, shards = sizes.jpegs
    prepare(make_images(n, long_side), data / "jpeg", shards)
    made["jpeg shards s"] = round(time.perf_counter() - t0, 1)
    made["jpegs"] = n
    for split, count in (("train", 64 if sizes.gpu else 16), ("val", 16 if sizes.gpu else 8)):
        instances = paint_squares_coco(data / f"coco_{split}_images", count, seed=len(split))
        if write_main([str(instances), str(data / f"coco_{split}"), "--maxcount", str(count // 4), "--quiet"]) != 0:
            raise RowFailed(f"data_pipeline.write {instances} failed")
    if sizes.small_val:   # an ImageFolder of 4 digits per class (labels 0-9 in sorted order, as digits_val's)
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        for label in range(10):
            folder = data / "digits_small_images" / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(digits.images[digits.target == label][-4:]):
                pixels = (image * (255 / 16)).clip(0, 255).round().astype("uint8")   # as embedded:digits
                Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB").save(
                    folder / f"{i}.png")
        if write_main([str(data / "digits_small_images"), str(data / "digits_small"), "--maxcount", "10",
                       "--quiet"]) != 0:
            raise RowFailed("data_pipeline.write of the small digits set failed")
    (data / "made.json").write_text(json.dumps(made) + "\n")
    return made


# --- numerics ------------------------------------------------------------------------------------------------------

def numerics(out: Path, preset: str, batch: int) -> dict[str, Any]:
    """MAE's and BEiT's training loss with the weights and the batch in bf16 (as DeepSpeed's bf16 engine holds them)
    against fp32, same weights, batch and masking noise; relative difference |bf16 - fp32| / |fp32|."""
    import torch

    from bench.train_throughput import Switches, build_task, random_batch
    from bench.report import header
    from launch.runtime.loop import to_device

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {**header(), "preset": preset, "batch": batch}
    for method in ("mae", "beit"):
        torch.manual_seed(0)
        task = build_task(method, preset, Switches(), device)
        model = task.model.to(device)
        data = random_batch(method, preset, batch, device, getattr(task.train_transform, "mask", None))
        losses = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            copy_ = copy.deepcopy(model).to(dtype)
            torch.manual_seed(1)   # the same masking noise for both
            with torch.no_grad():
                loss, _ = task.training_step(copy_, to_device(data, device, dtype))
            losses[name] = float(loss.float())
        rel = abs(losses["bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-12)
        report[method] = {**losses, "rel_diff": rel}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    bad = [m for m in ("mae", "beit") if not report[m]["rel_diff"] < NUMERICS_TOLERANCE]
    if bad:
        raise RowFailed(f"bf16 loss differs from fp32 by more than {NUMERICS_TOLERANCE:.0%}: "
                        + ", ".join(f"{m} {report[m]['rel_diff']:.2%}" for m in bad))
    return report


NUMERICS_TOLERANCE = 0.02   # bf16 keeps 8 bits of mantissa: a few 1e-3 on a mean loss is expected


# --- packages ------------------------------------------------------------------------------------------------------

def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def install_wheels(wheels: Path, site: Path) -> str | None:
    """Install the wheels into `site` without the network when a needed package is missing; returns what it did,
    or None when a package is missing and there are no wheels."""
    missing = missing_packages()
    if not missing:
        return "all of " + ", ".join(NEEDED) + " already installed"
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *map(str, found)], check=True)
    sys.path.insert(0, str(site))
    still = missing_packages()
    if still:
        raise RowFailed(f"installed {len(found)} wheels from {wheels}, but {', '.join(still)} still cannot be imported")
    return f"installed {len(found)} wheels from {wheels} into {site} (missing were: {', '.join(missing)})"


# --- running rows --------------------------------------------------------------------------------------------------

def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1].strip()[:300] if lines else "(no output)"


def first_error_line(log: Path) -> str:
    """The first error the log reports: the exception line that ends its first traceback, else the first line that
    says error, else its last line."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            ending = next((x for x in lines[i + 1:] if x.strip() and not x[0].isspace()), line)
            return ending.strip()[:400]
        if any(word in line for word in ("Error", "ERROR", "error:", "FAILED", "Killed")):
            return line.strip()[:400]
    return last_line(log)


def kill_group(pid: int, leader_done: Callable[[], bool]) -> None:
    """SIGTERM to the row's process group, SIGKILL to whatever is left 5 s later. `leader_done` reaps the row's own
    process when it has exited (a zombie leader would keep the group alive)."""
    def alive() -> bool:
        leader_done()
        try:
            os.killpg(pid, 0)
            return True
        except ProcessLookupError:
            return False

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def kill_marked(nonce: str) -> list[int]:
    """Kill every process but this one whose environment carries this check's marker; returns their pids."""
    killed = []
    needle = f"{MARKER}={nonce}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


class Runner:
    """Starts rows as process groups (a command line, or a fork of this process that runs the script), waits with
    each row's limit, and records status, seconds, figures and the first error line."""

    def __init__(self, launcher: list[str], fork: bool, logs: Path, env: dict[str, str], timing_alone: bool = True
                 ) -> None:
        self.launcher, self.fork, self.logs, self.env = launcher, fork, logs, env
        self.timing_alone = timing_alone   # on a GPU; a CPU rehearsal's timings mean nothing
        self.procs: dict[int, subprocess.Popen] = {}
        self.codes: dict[int, int] = {}   # exit codes of reaped forks
        logs.mkdir(parents=True, exist_ok=True)

    def command(self, row: Row) -> list[str]:
        prefix = self.launcher if row.job else [sys.executable]
        if row.job and "deepspeed" in " ".join(self.launcher):
            from launch.runtime.distributed import free_port   # rows side by side: not the launcher's one port

            prefix = [*self.launcher, "--master_port", str(free_port())]
        return [*prefix, str(ROOT / row.script), *row.args]

    def start(self, row: Row) -> int:
        cmd = self.command(row)
        row.result = {"command": shlex.join(cmd)}
        log = open(self.logs / f"{row.name}.log", "wb")
        if not self.fork:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            self.procs[proc.pid] = proc
            return proc.pid
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid:
            log.close()
            return pid
        code = 1
        try:   # the child: its own session, output to the row's log, the script run as __main__
            os.setsid()
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            os.environ.clear(), os.environ.update(self.env)
            sys.argv = [str(ROOT / row.script), *row.args]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - whatever the script raised goes to its log, then the exit code
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)

    def poll(self, pid: int) -> int | None:
        """The row's exit code once it has exited (reaping it), else None."""
        if not self.fork:
            return self.procs[pid].poll()
        if pid not in self.codes:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return self.codes.get(pid)
            if done:
                self.codes[pid] = os.waitstatus_to_exitcode(status)
        return self.codes.get(pid)

    def run(self, rows: list[Row], parallel: int, budget_s: float, say: Callable[[str], None]) -> None:
        t_start = time.monotonic()
        by_name = {r.name: r for r in rows}
        pending = list(rows)
        running: dict[str, tuple[int, float, float]] = {}   # name -> pid, start, limit
        while pending or running:
            now = time.monotonic()
            for name, (pid, started, limit) in list(running.items()):
                code = self.poll(pid)
                if code is None and now - started < limit:
                    continue
                kill_group(pid, lambda: self.poll(pid) is not None)   # at its limit, or its children outlived it
                row = by_name[name]
                if code is None:
                    self.finish(row, "timeout", now - started, f"stopped at its limit of {limit:.0f} s; last line: "
                                + last_line(self.logs / f"{row.name}.log"))
                else:
                    self.finish(row, None, now - started, code=code)
                del running[name]
                say(self.line(row))
            for row in list(pending):
                failed = [n for n in row.needs if by_name[n].result.get("status") not in (None, "pass")]
                if failed:
                    pending.remove(row)
                    row.result = {"status": "skipped", "seconds": 0.0,
                                  "error": f"needs {', '.join(failed)}, which did not pass"}
                    say(self.line(row))
                    continue
                if not all(by_name[n].result.get("status") == "pass" for n in row.needs):
                    continue
                # timing rows run alone, after every functional row: nothing else loads the machine
                if self.timing_alone and row.timing and (running or any(not r.timing for r in pending)):
                    continue
                if len(running) >= parallel:
                    continue
                left = budget_s - (time.monotonic() - t_start)
                if left < min(row.limit_s, 30):
                    pending.remove(row)
                    row.result = {"status": "not run", "seconds": 0.0,
                                  "error": f"{left:.0f} s of the {budget_s:.0f} s budget left"}
                    say(self.line(row))
                    continue
                pending.remove(row)
                running[row.name] = (self.start(row), time.monotonic(), min(row.limit_s, left))
            time.sleep(0.1)

    def finish(self, row: Row, status: str | None, seconds: float, error: str = "", code: int = 0) -> None:
        log = self.logs / f"{row.name}.log"
        if status is None and code != 0:
            status, error = "fail", f"exit {code}: {first_error_line(log)}"
        figures = None
        if status is None:
            try:
                figures = row.check(log) if row.check else {}
                status = "pass"
            except (RowFailed, OSError, ValueError, KeyError) as e:
                status, error = "fail", f"{type(e).__name__}: {e}"
        row.result.update(status=status, seconds=round(seconds, 1), **({"figures": figures} if figures else {}),
                          **({"error": error} if error else {}))

    @staticmethod
    def line(row: Row) -> str:
        r = row.result
        return f"{row.name:<15} {r['status']:<8} {r.get('seconds', 0):6.1f} s  {r.get('error', '')}"


# --- the summary ---------------------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: dict[str, Any], rows: list[Row]) -> str:
    lines = [f"# GPU check, {report['date']}", "",
             f"{report['device']}; torch {report['torch']}, CUDA {report['cuda']}; {report['cpu_count']} CPU cores; "
             f"mode {report['mode']}; commit {report['commit']}; {report['seconds']:.0f} s in all.", "",
             f"Packages: {report['packages']}.", "",
             "| row | status | s | figures | first error line |", "|---|---|---:|---|---|"]
    for row in rows:
        r = row.result
        figures = ", ".join(f"{k} {fmt(v)}" for k, v in (r.get("figures") or {}).items()
                            if not isinstance(v, (dict, list)) and k not in ("date", "device", "cpu_count"))
        error = r.get("error", "").replace("|", "\\|")
        lines.append(f"| {row.name} | {r['status']} | {r.get('seconds', 0):.1f} | {figures} | {error} |")
    tp = next((r.result.get("figures") for r in rows if r.name == "throughput_b16"), None)
    if tp:
        lines += ["", "## MAE throughput (bench/train_throughput.py)", "",
                  "| side | images/s | MFU | peak GiB |", "|---|---:|---:|---:|"]
        for side in ("ours", "peer"):
            if f"{side}/images_per_s" in tp:
                lines.append(f"| {side} | {tp[f'{side}/images_per_s']:.1f} | {100 * tp[f'{side}/mfu']:.1f}% | "
                             f"{tp[f'{side}/peak_memory_gib']:.2f} |")
        if "ours/peer images/s" in tp:
            lines.append(f"\nours / peer images/s: {tp['ours/peer images/s']:.2f}x")
    lines.append("")
    return "\n".join(lines)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.json, gpu_check.md and logs.txt")
    parser.add_argument("--cpu", action="store_true", help="the same plan at tiny sizes on the CPU")
    parser.add_argument("--only", default="", help="comma-separated rows (their inputs are added)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no row starts (480)")
    parser.add_argument("--parallel", type=int, default=0, help="functional rows at a time (GPU 3, CPU 2)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help=f"wheels to install from ({WHEELS})")
    parser.add_argument("--work", type=Path, default=None, help="run dirs and data (default: a temporary folder)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    # the rows that run this script itself
    parser.add_argument("--make-data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", choices=["gpu", "cpu"], default="gpu", help=argparse.SUPPRESS)
    parser.add_argument("--numerics", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="vit_b16", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        if args.make_data:
            print(json.dumps(make_data(args.make_data, GPU if args.sizes == "gpu" else CPU)))
            return 0
        if args.numerics:
            print(json.dumps(numerics(args.numerics, args.preset, args.batch), indent=2))
            return 0
    except RowFailed as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1

    if args.cpu:
        # the rows are forked from this process: an OpenMP pool created here would be broken in every child (each
        # step ran ~40x slower), so this process and its rows keep one thread each (two rows share the 2 cores)
        os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available() and not args.list:
        print("gpu_check: no GPU here (exit 2): on a CPU run the rehearsal with --cpu", file=sys.stderr)
        return 2
    sizes = GPU if gpu else CPU
    work = args.work or (Path("WORK") if args.list else Path(tempfile.mkdtemp(prefix="gpu-check-")))
    out = args.out or work / "out"
    rows = plan(sizes, work, out)
    names = {r.name for r in rows}
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - names
        if unknown:
            parser.error(f"--only: unknown row(s) {', '.join(sorted(unknown))}; the rows are {', '.join(names)}")
        closure, todo = set(), list(wanted)
        while todo:   # a row's inputs run too
            name = todo.pop()
            if name not in closure:
                closure.add(name)
                todo += next(r.needs for r in rows if r.name == name)
        rows = [r for r in rows if r.name in closure]
    if args.list:
        for r in rows:
            print(f"{r.name:<15} {r.limit_s:5.0f} s  needs {','.join(r.needs) or '-':<14} {r.script} "
                  f"{shlex.join(r.args)}")
        return 0
    if args.out is None:
        parser.error("give the output folder: python bench/gpu_check.py OUT_DIR")

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    try:
        packages = install_wheels(args.wheels, site)
    except (RowFailed, subprocess.CalledProcessError) as e:
        print(f"gpu_check: installing the wheels from {args.wheels} failed (exit 1): {e}", file=sys.stderr)
        return 1
    if packages is None:
        print(f"gpu_check: {', '.join(missing_packages())} missing and no wheels in {args.wheels} (exit 2): copy them "
              "there first: mkdir -p .gpuwheels && cp ../shared/gpu/wheels/*.whl .gpuwheels/", file=sys.stderr)
        return 2
    nonce = uuid.uuid4().hex
    os.environ[MARKER] = nonce
    paths = [str(site)] if site.is_dir() else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])), "PYTHONUNBUFFERED": "1",
           "DS_ACCELERATOR": "cuda" if gpu else "cpu"}
    if not gpu and torch.cuda.is_available():   # --cpu on a GPU machine
        env["CUDA_VISIBLE_DEVICES"] = ""
    fork = not gpu
    if fork:   # what every forked row imports, paid once here
        os.environ.update(env)
        import deepspeed  # noqa: F401
        import timm  # noqa: F401

        import launch.jobs  # noqa: F401
        import launch.runtime  # noqa: F401
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1"] if gpu else [sys.executable]
    runner = Runner(launcher, fork, work / "logs", env, timing_alone=gpu)
    for row in rows:   # data_wait's runs use the job rows' launcher
        if row.name == "data_wait":
            row.args[row.args.index("--launcher") + 1] = shlex.join(launcher)
    device = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"gpu check on {device}: {len(rows)} rows, budget {args.budget:.0f} s, work dir {work}", flush=True)
    try:
        runner.run(rows, args.parallel or (3 if gpu else 2), args.budget, lambda line: print(line, flush=True))
    finally:
        leftovers = kill_marked(nonce)
    from bench.report import header

    report = {**header(), "mode": "gpu" if gpu else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
              "commit": commit(), "packages": packages, "seconds": time.monotonic() - t0,
              "leftover_processes_killed": leftovers,
              "rows": {r.name: r.result for r in rows}}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report, rows))
    with open(out / "logs.txt", "w") as f:
        for row in rows:
            log = work / "logs" / f"{row.name}.log"
            tail = log.read_text(errors="replace").splitlines()[-60:] if log.is_file() else []
            f.write(f"===== {row.name}: {row.result.get('status')} =====\n" + "\n".join(tail) + "\n")
    passed = sum(r.result.get("status") == "pass" for r in rows)
    print(f"{passed}/{len(rows)} rows passed in {report['seconds']:.0f} s; wrote {out / 'gpu_check.md'}, "
          f"{out / 'gpu_check.json'}, {out / 'logs.txt'}" + (f"; killed {len(leftovers)} leftover process(es)"
                                                              if leftovers else ""))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
