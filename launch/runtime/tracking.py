"""What a run reports: TensorBoard (run_dir/tb), metrics.jsonl, and a compact console line; rank 0 writes.

Scalar tags (one row of metrics.jsonl per logged step, same names):
  train/loss (mean over ranks and the steps since the last row), train/lr, train/grad_norm, train/epoch,
  perf/images_per_s (global), perf/images_per_s_per_rank, perf/step_time_s, perf/data_wait_frac (time waiting for
  the next batch / step time), perf/mfu (GPUs whose peak is known), mem/cuda_max_allocated_gib (GPU) or
  mem/cpu_rss_gib (CPU), data/skipped/<reason> (cumulative, all ranks), val/<metric>, and a task's detail groups
  val/<group>/<name> (e.g. finetune_detr's val/ap_per_class/<category>): in TensorBoard and metrics.jsonl, left out
  of the console's evaluation line and of the HParams metrics (`headline`).
Images: images/<name> from task.images. Text: config (the resolved YAML). HParams at the end.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.shards import redact_credentials

logger = logging.getLogger(__name__)

# Dense peak FLOP/s per device for 16-bit matmuls (bf16/fp16); fp32 runs use TF32, half of it on these parts.
# Matched in order against torch.cuda.get_device_name() (vendor datasheets; the table torchtitan uses).
PEAK_FLOPS_16BIT: list[tuple[str, float]] = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),     # SXM
    ("H200", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of one device for `precision`, or None when the device is not in the table."""
    for key, peak in PEAK_FLOPS_16BIT:
        if key in device_name:
            return peak if precision in ("bf16", "fp16") else peak / 2
    return None


def memory_gib(device: torch.device) -> tuple[str, float]:
    """(tag, GiB): CUDA peak allocated since the last call on GPUs, the process's resident set on CPUs."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return "mem/cuda_max_allocated_gib", value
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return "mem/cpu_rss_gib", pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # not Linux: the peak resident set (kilobytes on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return "mem/cpu_rss_gib", peak / (2**30 if sys.platform == "darwin" else 2**20)


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere; DeepSpeed's own logger kept to warnings (it prints its whole config)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactCredentials) for f in handler.filters):
            handler.addFilter(RedactCredentials())


class RedactCredentials(logging.Filter):
    """Every log line passes through `redact_credentials`: a URL's password or signed-query token never reaches
    the console or a log file, whichever module logs it (data workers included: they inherit the handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_credentials(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Tracker:
    """TensorBoard + metrics.jsonl + console on the main rank; a no-op on the others."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0) -> None:
        """`resume_step` > 0: a resumed run; what the earlier run logged after that step is dropped."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            jsonl = run_dir / "metrics.jsonl"
            if resume_step and jsonl.exists():
                rows = [r for r in jsonl.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
                jsonl.write_text("".join(r + "\n" for r in rows))
            # purge_step: TensorBoard hides what the earlier run logged after the resume step
            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"),
                                        purge_step=resume_step + 1 if resume_step else None)
            self._jsonl = open(jsonl, "a", buffering=1)

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text, 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        if self.writer:
            for name, img in images.items():
                self.writer.add_image(f"images/{name}", img.detach().float().clamp(0, 1).cpu(), step)

    def progress(self, step: int, total: int, values: dict[str, float], eta_s: float) -> None:
        loss = values.get("train/loss")  # absent when every micro-batch of the window was non-finite (skipped)
        parts = [f"step {step}/{total}", f"loss {loss:.4f}" if loss is not None else "loss skipped",
                 f"lr {values['train/lr']:.3g}", f"{values['perf/images_per_s']:.1f} img/s"]
        if "perf/mfu" in values:
            parts.append(f"mfu {100 * values['perf/mfu']:.1f}%")
        parts.append(f"eta {format_duration(eta_s)}")
        logger.info("  ".join(parts))

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            # run_name="." keeps the hparams event file in tb/ itself, next to the scalars
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self._jsonl:
            self._jsonl.close()


def headline(values: dict[str, float]) -> dict[str, float]:
    """The values whose tag is section/name (train/loss, val/map), without the detail groups section/group/name
    (val/ap_per_class/<category>, data/skipped/<reason>): what the console line and the HParams table show."""
    return {k: v for k, v in values.items() if k.count("/") <= 1}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1} (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
