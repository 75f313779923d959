"""DeepSpeed checkpoints with the run's position, RNG states and resolved config; resume and pruning.

Layout: run_dir/checkpoints/step00000100/ (DeepSpeed's files, all ranks write their shards, then COMPLETE) and
run_dir/checkpoints/latest (the newest complete tag). Client state holds only plain Python types and tensors, so the
model-states file loads with `torch.load(..., weights_only=True)`:
  step, data: {epoch, batch_in_epoch}, world_size, config (the resolved config as a dict),
  rng: one entry per rank {torch, numpy, python, cuda?} (DeepSpeed writes client state from rank 0 only, so every
  rank's state is gathered into it), skipped: one Counter per rank of skipped samples.

Atomicity: a save first removes the tag's COMPLETE marker (a re-save over a partial one), all ranks write, a barrier
waits for every rank's files, then rank 0 writes COMPLETE and only then moves `latest` to the tag, each by writing a
temporary file and renaming it (atomic on POSIX). A kill at any moment leaves `latest` on a complete checkpoint;
resume takes `latest` if complete, else the newest complete tag, and says which. Pruning keeps the `keep` newest
complete checkpoints, removes partial ones older than the newest complete one, and never removes that one.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launch.runtime import distributed
from launch.runtime.config import ConfigError

logger = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step(\d+)$")
# The checkpoint ckpt.best_metric keeps: never pruned (not a step tag), never named by `latest`.
BEST_TAG = "best"
# The file holding module weights and client state: one per checkpoint, or one per rank under ZeRO-3.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def model_states_file(tag_dir: Path) -> Path:
    """Rank 0's model-states file of a checkpoint (module weights and the client state)."""
    for name in MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states ({' or '.join(MODEL_STATES)})")


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and lists (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": [version, list(internal), gauss_next],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


COMPLETE_MARKER = "COMPLETE"
LATEST = "latest"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE_MARKER).is_file()


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, keep: int, rank: int,
         local_rank: int, tag: str | None = None) -> Path:
    """Save on ALL ranks (DeepSpeed's collective save), mark it complete, move `latest`, prune to the `keep` newest
    complete ones (0 = keep all). See the module docstring for the order that makes it atomic.

    `tag` names a checkpoint outside the step sequence (BEST_TAG): `latest` is left pointing where it was.
    """
    named = tag is not None
    tag = tag or tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0:
        (tag_dir / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(tag_dir / UNIVERSAL, ignore_errors=True)  # converted from the files about to be replaced
    distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    distributed.barrier()  # every rank's files are on disk
    if rank == 0:
        _write_atomic(tag_dir / COMPLETE_MARKER, json.dumps({"step": step, "world_size": client_state.get(
            "world_size"), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        if not named:
            _write_atomic(ckpt_dir / LATEST, tag)
    distributed.barrier()
    if keep > 0 and local_rank == 0:
        prune(ckpt_dir, keep)
    distributed.barrier()
    return tag_dir


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints in ckpt_dir (complete or not), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: the one `latest` names if it is complete, else the newest complete tag (a
    kill between a save's files and its marker, or an older run's DeepSpeed `latest`), logging the fallback."""
    named = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    if named and is_complete(ckpt_dir / named):
        return named
    complete = [tag for _, tag in list_tags(ckpt_dir) if is_complete(ckpt_dir / tag)]
    if complete:
        logger.warning("checkpoints: %s is %s; the newest complete checkpoint is %s",
                       f"'latest' -> {named}" if named else "there is no 'latest'",
                       "incomplete (killed during its save?)" if named and (ckpt_dir / named).is_dir() else "missing",
                       complete[-1])
        return complete[-1]
    if named and (ckpt_dir / named).is_dir() and _written_before_markers(ckpt_dir / named):
        return named  # a run saved before this runtime wrote markers (DeepSpeed wrote `latest` after its files)
    return None


def _written_before_markers(tag_dir: Path) -> bool:
    """A checkpoint written by a version of this runtime without COMPLETE markers (DeepSpeed's own `latest`)."""
    try:
        states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True, mmap=True)
    except (FileNotFoundError, RuntimeError, OSError):
        return False
    return isinstance(states.get("config"), dict) and "skipped" not in states


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Keep the `keep` newest complete checkpoints; remove older complete ones and partial ones older than the
    newest complete one (leftovers of a killed save). The newest complete checkpoint is never removed."""
    tags = list_tags(ckpt_dir)
    complete = [tag for _, tag in tags if is_complete(ckpt_dir / tag)]
    if keep <= 0 or not complete:
        return []
    kept = set(complete[-keep:])
    newest_step = int(TAG_PATTERN.match(complete[-1]).group(1))
    removed = [tag for step, tag in tags if tag not in kept and (tag in complete or step < newest_step)]
    for tag in removed:
        # on a shared file system every node's local rank 0 may race here: a vanished folder is fine
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    if removed:
        logger.info("checkpoints: removed %s (ckpt.keep=%d)", ", ".join(removed), keep)
    return removed


def resume_target(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(load_dir, tag) to resume from, or None for a fresh start.

    resume: "none"; "auto" (ckpt_dir's newest complete checkpoint, None when there is none yet); a checkpoints
    folder; or one checkpoint's folder (its parent is the load dir, its name the tag).
    """
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if any((path / name).is_file() for name in MODEL_STATES):
        if not is_complete(path) and not _written_before_markers(path):
            raise ConfigError(f"run.resume={resume}: this checkpoint is incomplete (no {COMPLETE_MARKER} marker: its "
                              "save was interrupted); pass its checkpoints folder to take the newest complete one")
        return path.parent, path.name
    if path.is_dir():
        tag = latest_tag(path)
        if tag is None:
            raise ConfigError(f"run.resume={resume}: no complete checkpoint in this folder")
        return path, tag
    raise ConfigError(f"run.resume={resume}: neither a checkpoints folder nor a checkpoint folder")


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file that pickles something other than tensors, plain types and DeepSpeed's own classes."""


def deepspeed_classes(files: list[Path]) -> list[type]:
    """The classes the files pickle besides tensors, refusing any that is not one of DeepSpeed's checkpoint classes.

    DeepSpeed's optimizer states pickle a few of its own classes (ZeroStageEnum, LossScaler, fragment_address); a
    file that names anything else (a function, another package's class) was not written by it and is never
    unpickled: resuming and converting check every file of a checkpoint with this before anything loads it.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    classes: dict[str, type] = {}
    for f in files:
        try:
            names = get_unsafe_globals_in_checkpoint(f)
        except Exception as e:  # noqa: BLE001 - not a torch file at all
            raise UnsafeCheckpointError(f"{f} is not a readable torch checkpoint file ({type(e).__name__}: {e})")
        for name in names:
            module, _, attr = name.rpartition(".")
            obj = None
            if module.startswith("deepspeed."):
                with contextlib.suppress(ImportError, AttributeError):
                    obj = getattr(importlib.import_module(module), attr)
            if not isinstance(obj, type):
                raise UnsafeCheckpointError(
                    f"{f} pickles {name}, which is not one of DeepSpeed's checkpoint classes: refusing to unpickle "
                    "it (a checkpoint from elsewhere, or tampered with; only tensors and DeepSpeed's states load)")
            classes[name] = obj
    return list(classes.values())


def check_safe(tag_dir: Path) -> None:
    """Every .pt file of a checkpoint pickles only tensors, plain types and DeepSpeed's classes (see above)."""
    deepspeed_classes(sorted(tag_dir.glob("*.pt")))


def check_resumable(tag_dir: Path, cfg: dict[str, Any], world_size: int) -> None:
    """Refuse, with a clear message, a checkpoint this job cannot load: another model, another ZeRO stage, or a
    ZeRO checkpoint from a different number of ranks. Reads only the client state (memory-mapped)."""
    states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True, mmap=True)
    saved = states.get("config")
    if not isinstance(saved, dict):
        return  # not written by this runtime: let DeepSpeed try
    errors = [f"model.{k}={saved['model'].get(k)!r} there, {v!r} now" for k, v in cfg["model"].items()
              if saved.get("model", {}).get(k) != v]
    stage, saved_stage = cfg["engine"]["zero_stage"], saved.get("engine", {}).get("zero_stage")
    if saved_stage != stage:
        errors.append(f"engine.zero_stage={saved_stage} there, {stage} now")
    if errors:
        raise ConfigError(f"cannot resume from {tag_dir}: " + "; ".join(errors)
                          + " (run.resume=none starts over, run.name=NEW starts a separate run)")


UNIVERSAL = "universal"


def saved_world_size(tag_dir: Path) -> int | None:
    states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=True, mmap=True)
    return states.get("world_size")


def to_universal(tag_dir: Path, rank: int) -> tuple[Path, str]:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (every parameter's fp32 weights and optimizer
    states as whole tensors, which any number of ranks can partition again) in tag_dir/universal, once (rank 0;
    every rank waits). Returns the (load_dir, tag) to load it with `checkpoint.load_universal` set."""
    out = tag_dir / UNIVERSAL
    if rank == 0 and not is_complete(out):
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(None):
            ds_to_universal.main(args)
        _write_atomic(out / COMPLETE_MARKER, "{}\n")
        logger.info("resume: converted %s to DeepSpeed's universal checkpoint format in %s (%.1f s)", tag_dir, out,
                    time.perf_counter() - t0)
    distributed.barrier()
    return tag_dir, UNIVERSAL


def load(engine: Any, load_dir: Path, tag: str) -> dict[str, Any]:
    """Load the engine's module, optimizer and ZeRO state on all ranks; return the client state."""
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"no checkpoint {tag} in {load_dir}")
    return client_state or {}
