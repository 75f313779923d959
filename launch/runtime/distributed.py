"""Process group, device, seeds and the few collectives the runtime needs.

The same code runs as one plain process (`python launch/pretrain_mae.py`), under the deepspeed launcher, under
torchrun, and across nodes: the launchers set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a plain
process gets a one-rank group on a free local port, because `deepspeed.initialize` wants a process group.
"""
from __future__ import annotations

import atexit
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Launchers that set these make a multi-process run; MPI launchers are recognised by deepspeed's own discovery.
LAUNCHER_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    env_set: tuple[str, ...] = ()  # launcher variables set for a plain process, removed again by `shutdown`

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))


def gpu_available() -> bool:
    """What DeepSpeed's accelerator will use: CUDA when present (DS_ACCELERATOR=cpu forces the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# True once this module has started a one-rank group for a plain process (see `init`).
_single_process_group = False


def init() -> World:
    """Start (or join) the process group: nccl on GPUs, gloo on CPUs; device cuda:LOCAL_RANK or cpu.

    A plain process gets a one-rank group through the launcher variables (set here, removed by `shutdown` so that
    processes it starts later do not inherit them). The group lives until the interpreter exits: DeepSpeed keeps
    references to it in module state, so a second job in the same process (tests) reuses it.
    """
    import deepspeed

    global _single_process_group
    env_set: dict[str, str] = {}
    plain = not any(k in os.environ for k in LAUNCHER_ENV)
    if plain and (_single_process_group or not dist.is_initialized()):
        env_set = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        if not dist.is_initialized():
            env_set["MASTER_PORT"] = str(free_port())
        os.environ.update(env_set)
    on_gpu = gpu_available()
    local_rank = local_rank_from_env()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if on_gpu else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        atexit.register(_destroy)
        if backend == "gloo":  # only DeepSpeed's CPU accelerator creates the workspace
            _unlink_shm_workspace()
        _single_process_group = plain
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return World(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device,
                 backend=backend, env_set=tuple(env_set))


def share_cpu_cores(num_workers: int) -> int | None:
    """On CPUs, give this rank's math its share of the cores: cores / ranks on this machine - data workers.

    Without it every rank and worker takes all cores, and on a small machine the threads mostly wait on each
    other (2 cores, 1 rank, 1 worker: 5x the CPU time per step). An explicit OMP_NUM_THREADS is respected.
    Returns the thread count set, or None when left alone.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return None
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, local_size) - num_workers)
    torch.set_num_threads(threads)
    return threads


def _unlink_shm_workspace() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce workspace from /dev/shm once every rank has mapped it.

    On CPU, when all ranks share one machine, DeepSpeed's communication op creates a ~64 MiB shared-memory file per
    rank, named after MASTER_ADDR/MASTER_PORT, and never unlinks it: every such run leaked its files (a test suite
    left gigabytes of RAM behind). The peers map each other's files during `init_distributed`, so after a barrier
    the names can go; the mappings stay valid until the processes exit, however they exit.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    path = os.path.join("/dev/shm", name)
    barrier()  # on every rank (whether or not it has a file): collectives must be called by all
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _destroy() -> None:
    """At exit: all ranks meet, then each tears its group down. A rank that tore down while a peer still held the
    connection was seen to abort at exit ("terminate called without an active exception", exit 250 under the
    deepspeed launcher) after a finished run. If a peer died instead, the launcher stops the waiting ranks."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    except Exception:  # noqa: BLE001 - a peer already gone: nothing left to order
        pass
    dist.destroy_process_group()


def shutdown(world: World) -> None:
    for key in world.env_set:
        os.environ.pop(key, None)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # all CUDA devices too


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is True on any rank (one small all-reduce; every rank must call it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of each value (a single collective for all of them)."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DeepSpeed, unlike DDP, never syncs them,
    so each rank's statistics follow its own data; evaluation uses rank 0's, the ones checkpoints and exports hold."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` holds it, on every rank (every rank must call it; the others' argument is ignored)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
