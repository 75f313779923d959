"""What every benchmark's JSON report starts with (date, device, CPU count), and how it is written."""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def device_name() -> str:
    """The GPU's name when CUDA is present, else the CPU's (platform.processor(), "cpu" when it says nothing)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or "cpu"


def header() -> dict[str, Any]:
    """The fields every report begins with: UTC date, device name, CPU count."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(),
            "cpu_count": os.cpu_count()}


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that runs the project's code: the repository root put in front of
    PYTHONPATH, which keeps what was there (the GPU check's folder of installed wheels, for one)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path] if path else [root]), **extra}


def write_report(report: dict[str, Any], out: Path) -> Path:
    """`report` as indented JSON at `out` (folders created), announced on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
