"""DeepSpeed checkpoints with the run's position, RNG states and resolved config; resume and pruning.

Layout: run_dir/checkpoints/step00000100/ (DeepSpeed's files, all ranks write their shards, then COMPLETE) and
run_dir/checkpoints/latest (the newest complete tag). Client state holds only plain Python types and tensors, so the
model-states file loads with `torch.load(..., weights_only=True)`:
  step, data: {epoch, batch_in_epoch}, world_size, config (the resolved config as a dict),
  rng: one entry per rank {torch, numpy, python, cuda?} (DeepSpeed writes client state from rank 0 only, so every
  rank's state is gathered into it), skipped: one Counter per rank of skipped samples.

Storage (`Storage`, decided once at start by `check_storage`, a collective): every rank writes a probe file into the
run directory (the write check) and looks for rank 0's and its node's first rank's probes. Shared (the default):
every rank sees rank 0's, rank 0 writes markers and prunes. Node-local (ckpt.node_local=true, ranks of different
nodes see different directories): DeepSpeed's `use_node_local_storage`, so each node holds its own ranks' files
(model states from the node's first rank, each rank's optimizer partition), and each node's first rank writes
the markers and prunes there. Any other view of the run directory is refused (exit 2) before training.

Atomicity: a save first removes the tag's COMPLETE marker (a re-save over a partial one) and checks that every rank
can write into the tag's folder, all ranks write, every rank reports the files it wrote (names and sizes, taken from
DeepSpeed's checkpoint engine) in one all-gather, each directory's writer checks those of its ranks on its disk,
then the writer(s) write COMPLETE (holding that list of files per rank) and only then move `latest` to the tag, each
by writing a temporary file and renaming it (atomic on POSIX). A write that fails on any rank (no space, read-only,
permission) fails the save on every rank alike (`CheckpointWriteError`, exit 1, the partial tag left unmarked). A
kill at any moment leaves every COMPLETE tag whole. Resume takes the newest COMPLETE tag whatever `latest` names
(a kill between a marker and the move of `latest` leaves it on an older one), chosen on rank 0 and broadcast
(`agree_resume`), and before anything loads every rank checks that it holds its own files of that tag
(`missing_files`; the ranks agree or all exit 2). Pruning keeps the `keep` newest complete
checkpoints, removes partial ones older than the newest complete one, and never removes that one.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launch.runtime import distributed
from launch.runtime.config import ConfigError, RunError

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


class CheckpointWriteError(RunError):
    """A checkpoint some rank could not write (exit 1): raised on every rank alike."""


@dataclass(frozen=True)
class Storage:
    """Where this rank's checkpoint files live and who looks after that directory (see the module docstring)."""

    rank: int
    writer: int                  # the rank that writes this directory's markers and prunes it
    peers: tuple[int, ...]       # the ranks whose files live in this rank's directory (the writer checks them)
    node_local: bool = False     # DeepSpeed's use_node_local_storage

    @property
    def is_writer(self) -> bool:
        return self.rank == self.writer


SINGLE = Storage(rank=0, writer=0, peers=(0,))

# errno -> the cause a message names
_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.ENOENT: "a parent directory does not exist", errno.ENOTDIR: "a parent is not a directory",
           errno.EFBIG: "file too large (a file-size limit, ulimit -f)",
           errno.EIO: "input/output error (a failing disk or a lost network mount)"}
_PROBE_BYTES = 1 << 20


def _existing_dir(path: Path) -> Path:
    path = Path(path)
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _write_probe(path: Path, size: int) -> None:
    """Create `path`, write `size` bytes and fsync them (an OSError says why not); the file is left in place."""
    with open(path, "wb") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_cause(path: Path, exc: BaseException) -> str:
    """The OS cause of a failed write to `path`, for a message: from the error's errno, else (torch's C++ writer says
    only "basic_ios::clear: iostream error" or "file write failed") from a 1 MiB probe write beside it; with the free
    space of its filesystem."""
    error = exc if isinstance(exc, OSError) and exc.errno else None
    folder = _existing_dir(Path(path).parent)
    if error is None:
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            _write_probe(probe, _PROBE_BYTES)
        except OSError as e:
            error = e
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    if error is not None:
        cause = _CAUSES.get(error.errno) or error.strerror or str(error)
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        cause = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    try:
        cause += f"; {_format_bytes(shutil.disk_usage(folder).free)} free on its filesystem"
    except OSError:
        pass
    return cause


def check_storage(run_dir: Path, ckpt_dir: Path, *, rank: int, local_rank: int, node_local: bool) -> Storage:
    """Collective, before training: every rank can write into the run directory (and into checkpoints/ when it
    exists), and the ranks see it as the storage layout wants: all the same directory (shared), or, with
    ckpt.node_local, one directory per node shared by that node's ranks. Raises ConfigError (exit 2) on every rank
    otherwise. A probe file per rank (named by a nonce from rank 0) is the test, removed again."""
    nonce = distributed.broadcast_object(uuid.uuid4().hex[:12] if rank == 0 else None)

    def probe(r: int) -> Path:
        return run_dir / f".storage-check-{nonce}.rank{r}"

    error = None
    for folder in (run_dir, ckpt_dir):
        if folder == ckpt_dir and not folder.is_dir():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = probe(rank) if folder == run_dir else folder / probe(rank).name
            _write_probe(path, 16)
            if folder != run_dir:
                path.unlink()
        except OSError as e:
            error = f"{folder}: {write_cause(folder / probe(rank).name, e)}"
            break
    distributed.barrier()
    first = rank - local_rank  # the first rank of this node (launchers number a node's ranks consecutively)
    view = {"rank": rank, "local_rank": local_rank, "host": socket.gethostname(), "error": error,
            "dir": str(run_dir.absolute()),
            "sees_rank0": probe(0).is_file(), "sees_first": probe(first).is_file()}
    views = distributed.all_gather_object(view)
    probe(rank).unlink(missing_ok=True)
    distributed.barrier()  # no probe left when rank 0 looks at the run directory next

    def who(vs: list[dict]) -> str:
        shown = ", ".join(f"rank {v['rank']} on {v['host']} (run dir {v['dir']})" for v in vs[:4])
        return shown + (f" and {len(vs) - 4} more" if len(vs) > 4 else "")

    failed = [v for v in views if v["error"]]
    if failed:
        shown = "; ".join(f"rank {v['rank']} on {v['host']}: {v['error']}" for v in failed[:4])
        raise ConfigError(f"the run directory is not writable: {shown}"
                          " (set run.dir to a writable directory, or free space / fix its permissions); nothing was "
                          "trained")
    if all(v["sees_rank0"] for v in views):
        if node_local and len(views) > 1 and rank == 0:
            logger.warning("ckpt.node_local=true, but every rank sees the same run directory %s: it is used as a "
                           "shared one (one copy of each file, rank 0 marks checkpoints complete)", run_dir)
        return Storage(rank=rank, writer=0, peers=tuple(v["rank"] for v in views), node_local=False)
    if not node_local:
        blind = [v for v in views if not v["sees_rank0"]]
        raise ConfigError(
            f"the ranks do not share the run directory: a file rank 0 wrote into {views[0]['dir']} (on "
            f"{views[0]['host']}) is not seen by "
            f"{who(blind)} (each node has its own disk there), so every node would keep only part of each "
            "checkpoint and resume from its own; set run.dir to a filesystem every node mounts, or set "
            "ckpt.node_local=true to keep each node's checkpoint files on its own disk (README: storage layouts)")
    lost = [v for v in views if not v["sees_first"]]
    if lost:
        raise ConfigError(
            f"ckpt.node_local=true: {who(lost)} do not see the files of their node's first rank in {run_dir}; the "
            "ranks of one node must share its run directory (one run.dir per node, on that node's disk)")
    return Storage(rank=rank, writer=first, node_local=True,
                   peers=tuple(v["rank"] for v in views if v["rank"] - v["local_rank"] == first))


def _raise_write_errors(reports: list[dict[str, Any]], what: str, ckpt_dir: Path, exclude: str) -> None:
    failed = [r for r in reports if r.get("error")]
    if not failed:
        return
    shown = "; ".join(f"rank {r['rank']}: {r['error']}" for r in failed[:4])
    if len(failed) > 4:
        shown += f"; and {len(failed) - 4} more rank(s)"
    last = latest_tag(ckpt_dir, exclude=exclude, quiet=True)
    raise CheckpointWriteError(
        f"{what} could not be written: {shown}. It is not marked complete; "
        + (f"the last complete checkpoint, {ckpt_dir / last}, is intact: fix the cause and run the same command with "
           "run.resume=auto to continue from it" if last else
           "there is no complete checkpoint yet: fix the cause and run the job again"))


def _save_recording(engine: Any, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> tuple[list[str],
                                                                                                     str | None]:
    """engine.save_checkpoint, recording the files this rank wrote (paths DeepSpeed's checkpoint engine was given)
    and the first write that failed. A failed write does not raise inside DeepSpeed: its save goes on through its
    collectives on every rank, so the ranks stay in step and agree on the failure afterwards."""
    written: list[str] = []
    failures: list[str] = []
    patched: list[tuple[Any, str, Any]] = []

    def tolerant(owner: Any, name: str, record: bool) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def call(*args: Any, **kwargs: Any) -> None:
            path = kwargs.get("path", args[1] if len(args) > 1 else args[0] if args else "?")
            try:
                original(*args, **kwargs)
            except (OSError, RuntimeError) as e:
                failures.append(f"{path}: {write_cause(Path(str(path)), e)}")
                return
            if record:
                written.append(str(path))

        patched.append((owner, name, owner.__dict__.get(name, _UNSET)))
        setattr(owner, name, call)

    tolerant(getattr(engine, "checkpoint_engine", None), "save", record=True)
    tolerant(engine, "_copy_recovery_script", record=False)  # DeepSpeed's zero_to_fp32.py copy, by rank 0
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        failures.append(f"{ckpt_dir / tag}: {write_cause(ckpt_dir / tag / 'x', e)}")
    finally:
        for owner, name, before in reversed(patched):
            if before is _UNSET:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
    return written, (failures[0] if failures else None)


_UNSET = object()


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, keep: int,
         storage: Storage = SINGLE, tag: str | None = None) -> Path:
    """Save on ALL ranks (DeepSpeed's collective save), check every rank's files, mark it complete, move `latest`,
    prune to the `keep` newest complete ones (0 = keep all). See the module docstring for the order that makes it
    atomic. A write that fails on any rank raises CheckpointWriteError on every rank.

    `tag` names a checkpoint outside the step sequence (BEST_TAG): `latest` is left pointing where it was.
    """
    named = tag is not None
    tag = tag or tag_for(step)
    tag_dir = ckpt_dir / tag
    what = f"checkpoint {tag_dir} (step {step})"
    # 1) every rank can write into the tag's folder: a read-only, unwritable or full disk stops here, before
    #    DeepSpeed's save (whose own errors would leave the ranks in different collectives)
    error = None
    probe = tag_dir / f".write-check.rank{storage.rank}"
    try:
        if storage.is_writer:
            (tag_dir / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(tag_dir / UNIVERSAL, ignore_errors=True)  # converted from the files about to be replaced
        tag_dir.mkdir(parents=True, exist_ok=True)
        _write_probe(probe, 4096)
    except OSError as e:
        error = f"{probe.parent if not tag_dir.is_dir() else tag_dir}: {write_cause(probe, e)}"
    with contextlib.suppress(OSError):
        probe.unlink(missing_ok=True)
    _raise_write_errors(distributed.all_gather_object({"rank": storage.rank, "error": error}), what, ckpt_dir, tag)
    # 2) all ranks write; each reports what it wrote
    written, error = _save_recording(engine, ckpt_dir, tag, client_state)
    files: dict[str, int] = {}
    for path in written:
        try:
            files[os.path.relpath(path, tag_dir)] = os.stat(path).st_size
        except OSError as e:
            error = error or f"{path}: written, then unreadable ({e.strerror or e})"
    reports = distributed.all_gather_object({"rank": storage.rank, "files": files, "error": error})
    _raise_write_errors(reports, what, ckpt_dir, tag)
    # 3) each directory's writer checks its ranks' files where they live, then marks the checkpoint complete
    error = None
    if storage.is_writer:
        problems = missing_files(tag_dir, {str(r["rank"]): r["files"] for r in reports}, storage.peers)
        if problems:
            error = f"{tag_dir}: after the save, " + ", ".join(problems[:6])
        else:
            try:
                _write_atomic(tag_dir / COMPLETE_MARKER, json.dumps({
                    "step": step, "world_size": client_state.get("world_size"), "node_local": storage.node_local,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "files": {str(r["rank"]): r["files"] for r in reports}}) + "\n")
                if not named:
                    _write_atomic(ckpt_dir / LATEST, tag)
            except OSError as e:
                error = f"{tag_dir / COMPLETE_MARKER}: {write_cause(tag_dir / COMPLETE_MARKER, e)}"
    _raise_write_errors(distributed.all_gather_object({"rank": storage.rank, "error": error}), what, ckpt_dir, tag)
    if keep > 0 and storage.is_writer:
        prune(ckpt_dir, keep)
    distributed.barrier()
    return tag_dir


def read_manifest(tag_dir: Path) -> dict[str, dict[str, int]] | None:
    """The files each rank wrote for a checkpoint ({rank: {name: bytes}}), as its COMPLETE marker records them;
    None for a marker without the list (an older run) or no marker."""
    try:
        files = json.loads((tag_dir / COMPLETE_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def missing_files(tag_dir: Path, manifest: dict[str, dict[str, int]] | None, ranks: tuple[int, ...] | list[int]
                  ) -> list[str]:
    """What this process does not find in tag_dir of the files `ranks` wrote ("name (missing)", "name (N bytes, M
    written)"). Without a manifest only the folder itself is looked for."""
    if not tag_dir.is_dir():
        return [f"{tag_dir} (missing)"]
    if manifest is None:
        return []
    out = []
    for r in ranks:
        for name, size in sorted(manifest.get(str(r), {}).items()):
            try:
                actual = (tag_dir / name).stat().st_size
            except OSError:
                out.append(f"{name} (missing)")
                continue
            if actual != size:
                out.append(f"{name} ({actual} bytes, {size} written)")
    return out


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints in ckpt_dir (complete or not), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete step checkpoints in ckpt_dir, oldest first."""
    return [tag for _, tag in list_tags(ckpt_dir) if is_complete(ckpt_dir / tag)]


def latest_tag(ckpt_dir: Path, *, exclude: str | None = None, quiet: bool = False) -> str | None:
    """The newest complete checkpoint, whatever `latest` names: a kill during a save leaves `latest` on the previous
    tag, and so does a kill between a save's COMPLETE marker and the move of `latest` (the newer tag is whole then).
    Logs when `latest` names another. A run saved before this runtime wrote markers: DeepSpeed's `latest`."""
    named = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    complete = [tag for tag in complete_tags(ckpt_dir) if tag != exclude]
    if complete:
        newest = complete[-1]
        if named != newest and not quiet:
            if named is None:
                state = "there is no 'latest'"
            elif not (ckpt_dir / named).is_dir():
                state = f"'latest' -> {named} is missing"
            elif not is_complete(ckpt_dir / named):
                state = f"'latest' -> {named} is incomplete (killed during its save?)"
            else:
                state = f"'latest' -> {named} is older (killed between {newest}'s COMPLETE marker and the move of " \
                        "'latest'?)"
            logger.warning("checkpoints: %s; the newest complete checkpoint is %s", state, newest)
        return newest
    if named and named != exclude and (ckpt_dir / named).is_dir() and _written_before_markers(ckpt_dir / named):
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


def agree_resume(resume: str, ckpt_dir: Path, storage: Storage, cfg: dict[str, Any], world_size: int
                 ) -> tuple[tuple[Path, str] | None, int | None]:
    """Collective: the checkpoint to resume from, the same on every rank, and the world size that wrote it.

    Rank 0 chooses it (`resume_target`: the newest complete one for "auto"), checks that this job can load it, and
    broadcasts its choice and the files each rank wrote for it (its COMPLETE marker). Every rank then checks, in the
    directory it sees, that the checkpoint's files are safe to load and that it holds its own files of it (all of
    them for rank 0 when a different number of ranks resumes); one all-gather agrees. Any failure raises ConfigError
    (exit 2) on every rank, naming what is missing where, and the fix.
    """
    decision: dict[str, Any] = {}
    if storage.rank == 0:
        try:
            target = resume_target(resume, ckpt_dir)
            decision["target"] = (str(target[0]), target[1]) if target else None
            if target is not None:
                tag_dir = target[0] / target[1]
                check_resumable(tag_dir, cfg, world_size)
                decision.update(saved_world=saved_world_size(tag_dir), manifest=read_manifest(tag_dir))
        except ConfigError as e:
            decision = {"error": str(e)}
        except (OSError, RuntimeError, ValueError, KeyError) as e:  # a checkpoint it cannot read: one message
            decision = {"error": f"run.resume={resume}: cannot read the checkpoint ({type(e).__name__}: {e})"}
    decision = distributed.broadcast_object(decision)
    if decision.get("error"):
        raise ConfigError(decision["error"])
    target = (Path(decision["target"][0]), decision["target"][1]) if decision.get("target") else None
    saved_world = decision.get("saved_world")
    problems: list[str] = []
    if target is not None:
        tag_dir = target[0] / target[1]
        elastic = saved_world not in (None, world_size)
        ranks = (tuple(range(saved_world)) if storage.rank == 0 else ()) if elastic else (storage.rank,)
        problems = missing_files(tag_dir, decision.get("manifest"), ranks)
        if not problems:
            try:
                check_safe(tag_dir)
            except ConfigError as e:
                problems = [str(e)]
        if elastic and storage.node_local and storage.rank == 0:
            problems.append(f"it was written by {saved_world} ranks and {world_size} resume it: the conversion to "
                            "DeepSpeed's universal format reads every rank's files, which ckpt.node_local keeps on "
                            "each node's disk; resume on the same number of ranks, or gather every node's "
                            f"{target[1]}/ into one directory on a filesystem all ranks share and resume from it "
                            "without ckpt.node_local")
    view = {"rank": storage.rank, "host": socket.gethostname(), "dir": str(ckpt_dir), "problems": problems,
            "complete": complete_tags(ckpt_dir)}
    views = distributed.all_gather_object(view)
    bad = [v for v in views if v["problems"]]
    common = set(views[0]["complete"]).intersection(*(v["complete"] for v in views[1:]))
    holds = f" (the newest every rank holds: run.resume={ckpt_dir / max(common)})" if common else ""
    if bad:
        shown = "; ".join(f"rank {v['rank']} on {v['host']}: " + ", ".join(v["problems"][:6]) for v in bad[:4])
        raise ConfigError(
            f"cannot resume from {target[1]}, which rank 0 chose in {target[0]}: {shown}. Every rank must hold its "
            "own files of it (with ckpt.node_local, each node's checkpoints/ on its own disk): copy them back, pass "
            f"run.resume=<a checkpoint every rank holds>{holds}, or run.resume=none to start over")
    if target is None and resume == "auto":
        others = [v for v in views if v["complete"]]
        if others:
            shown = ", ".join(f"rank {v['rank']} on {v['host']} holds {v['complete'][-1]} in {v['dir']}"
                              for v in others[:4])
            raise ConfigError(
                f"run.resume=auto: rank 0 finds no complete checkpoint in {ckpt_dir}, but {shown}: the ranks would "
                "start from different states. Copy rank 0's node's checkpoints back, or pass run.resume=none to "
                "start over (the earlier run is moved aside)")
    return target, saved_world


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
