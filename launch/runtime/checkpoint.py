"""DeepSpeed checkpoints with the run's position, RNG states and resolved config; resume and pruning.

Layout: run_dir/checkpoints/step00000100/ (DeepSpeed's files, all ranks write their shards) and
run_dir/checkpoints/latest (the newest tag, written by DeepSpeed). Client state holds only plain Python types and
tensors, so the model-states file loads with `torch.load(..., weights_only=True)`:
  step, data: {epoch, batch_in_epoch}, world_size, config (the resolved config as a dict),
  rng: one entry per rank {torch, numpy, python, cuda?} (DeepSpeed writes client state from rank 0 only, so every
  rank's state is gathered into it).
"""
from __future__ import annotations

import logging
import random
import re
import shutil
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


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, keep: int,
         local_rank: int, tag: str | None = None) -> Path:
    """Save on ALL ranks (DeepSpeed's collective save), then prune to the `keep` newest (0 = keep all).

    `tag` names a checkpoint outside the step sequence (BEST_TAG): `latest` is left pointing where it was.
    """
    named = tag is not None
    tag = tag or tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=not named)
    distributed.barrier()
    if keep > 0 and local_rank == 0:
        prune(ckpt_dir, keep)
    distributed.barrier()
    return ckpt_dir / tag


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints in ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
    return None


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest checkpoints; the one `latest` names is never deleted."""
    tags = [tag for _, tag in list_tags(ckpt_dir)]
    protected = {latest_tag(ckpt_dir)}
    removed = [t for t in tags[:-keep] if t not in protected] if keep > 0 else []
    for tag in removed:
        # on a shared file system every node's local rank 0 may race here: a vanished folder is fine
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    if removed:
        logger.info("checkpoints: removed %s (ckpt.keep=%d)", ", ".join(removed), keep)
    return removed


def resume_target(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(load_dir, tag) to resume from, or None for a fresh start.

    resume: "none"; "auto" (ckpt_dir's latest, None when there is none yet); a checkpoints folder with a `latest`
    file; or one checkpoint's folder (its parent is the load dir, its name the tag).
    """
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise ConfigError(f"run.resume={resume}: 'latest' names a checkpoint that is not there")
        return path, tag
    if any((path / name).is_file() for name in MODEL_STATES):
        return path.parent, path.name
    raise ConfigError(f"run.resume={resume}: neither a checkpoints folder (with 'latest') nor a checkpoint folder")


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
    saved_world = states.get("world_size")
    if stage > 0 and saved_world is not None and saved_world != world_size:
        errors.append(f"written by {saved_world} ranks, resumed on {world_size}: DeepSpeed cannot repartition ZeRO "
                      "optimizer states (convert it with deepspeed.checkpoint.ds_to_universal first)")
    if errors:
        raise ConfigError(f"cannot resume from {tag_dir}: " + "; ".join(errors)
                          + " (run.resume=none starts over, run.name=NEW starts a separate run)")


def load(engine: Any, load_dir: Path, tag: str) -> dict[str, Any]:
    """Load the engine's module, optimizer and ZeRO state on all ranks; return the client state."""
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"no checkpoint {tag} in {load_dir}")
    return client_state or {}
