"""`run_job`: configuration -> process group -> task, streams, DeepSpeed engine -> training loop -> export.

One optimizer step = `engine.grad_accum` micro-batches: for each, the next batch from the stream (set_epoch at
epoch boundaries), tensors moved to the device, `task.training_step(engine, batch)`, `engine.backward(loss)`,
`engine.step()` (DeepSpeed steps the optimizer at the accumulation boundary). The lr for that boundary is set
before its first micro-batch. Every rank runs the same collectives in the same order: logging all-reduces,
evaluation, reconstruction pictures (a forward, which ZeRO-3 needs on all ranks), checkpoints and the export.

The task is a contracts.task.Task: the required members and the optional hooks (contracts.task.TaskHooks, which
every task inherits, with their defaults) are called directly; `check_task` refuses, as a configuration error, a task
defining a hook name the runtime does not know (e.g. `after_stepp`). docs/ARCHITECTURE.md has the whole picture.

With optim.ema_decay > 0 the runtime keeps an EMA of the weights (launch/runtime/ema.py): updated after every
optimizer step under any ZeRO stage, saved in every checkpoint, evaluated after each evaluation (val/<name>_ema)
and exported to export_ema/ beside export/.
Evaluation runs every `log.eval_every` steps, at the end of every epoch with `log.eval_every_epoch`, and at the
end. With `ckpt.best_metric`, each evaluation that improves that metric saves checkpoints/best and exports the
weights to export_best/.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from contracts.task import TaskError, TaskHooks, check_task
from launch.runtime import checkpoint, config, distributed, engine as engine_lib, tracking
from launch.runtime.config import ConfigError, JobConfig, ParsedArgs, RunError
from launch.runtime.ema import RuntimeEMA

logger = logging.getLogger(__name__)


def run_job(*, job: str, task_config: type, build_task: Callable[[Any], Any], argv: list[str] | None = None,
            archs: dict[str, dict] | None = None, aliases: dict[str, str] | None = None) -> int:
    """Parse the command line and run the job; returns the process exit code (0 ok, 2 config error, 1 failure).

    `aliases`: short command-line keys for full ones, e.g. {"mode": "model.mode"}. The launch scripts call
    `launch.jobs.run(NAME, argv)`, which takes all of these from the job's entry in the registry (JOBS).
    """
    tracking.setup_logging(distributed.rank_from_env())
    try:
        cfg, args = config.parse_args(job, task_config, argv, archs, aliases)
    except ConfigError as e:
        # before any process group: one paragraph, no traceback
        logger.error("%s: config error: %s (see --help)", job, e)
        return 2
    threads = torch.get_num_threads()
    world = distributed.init()
    tracking.setup_logging(world.rank)
    try:
        return Trainer(job, cfg, args, build_task, world).run()
    except ConfigError as e:
        logger.error("%s: config error: %s", job, e)
        return 2
    except RunError as e:  # a failure at run time (data, checkpoint writes): one paragraph, exit 1
        logger.error("%s: %s", job, e)
        return 1
    finally:
        distributed.shutdown(world)
        torch.set_num_threads(threads)  # share_cpu_cores may have changed it; a caller's process keeps its own


class DataError(RunError):
    """A dataset that cannot be opened (wrong URL, no index, unreadable shards)."""


def to_device(batch: dict[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to `device` (non-blocking from pinned memory); top-level floating ones cast to the engine's compute
    dtype. Tensors nested in lists and dicts (detection targets: boxes) move without a cast: they are labels."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=v.is_pinned())
            if v.is_floating_point() and v.dtype != float_dtype:
                v = v.to(float_dtype)
        elif isinstance(v, (list, tuple, dict)):
            v = _nested_to(v, device)
        out[k] = v
    return out


def _nested_to(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=value.is_pinned())
    if isinstance(value, dict):
        return {k: _nested_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_nested_to(v, device) for v in value)
    return value


class DeviceLoader:
    """Iterates a stream, handing out batches already on the device (what task.evaluate receives)."""

    def __init__(self, stream: Any, device: torch.device, float_dtype: torch.dtype) -> None:
        self.stream, self.device, self.float_dtype = stream, device, float_dtype

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.stream:
            yield to_device(batch, self.device, self.float_dtype)


class DataPosition:
    """Endless batches from a stream with its position: (epoch, batches consumed in that epoch).

    Epoch mode: an epoch is exactly `stream.batches_per_epoch` batches on every rank. Resampled mode: the stream is
    endless, so the position counts in epochs of `resampled_epoch` batches (num_samples / (batch x ranks)), and each
    starts the stream anew with `set_epoch(epoch)`, i.e. fresh shard draws and shuffle seeds. Either way a batch is a
    function of (run.seed, epoch, batch_in_epoch, ranks, workers) alone (see data_pipeline.stream, reproducibility),
    so a resumed run re-reads and drops the consumed batches of its epoch (at most one epoch) and continues with
    exactly the batches the uninterrupted run saw. Which rank and worker read which samples follows from the
    position: the epoch's plan deals shards to (rank, worker) and the DataLoader takes batches from its workers in
    turn.
    """

    def __init__(self, stream: Any, epoch: int = 0, batch_in_epoch: int = 0, resampled_epoch: int = 1) -> None:
        self.stream = stream
        self.epoch = epoch
        self.batch_in_epoch = batch_in_epoch
        self.per_epoch = stream.batches_per_epoch or max(1, resampled_epoch)
        self._it: Iterator | None = None
        self.wait_s = 0.0  # cumulative time spent waiting for batches

    def _start_epoch(self, skip: int) -> None:
        self.stream.set_epoch(self.epoch)
        self._it = iter(self.stream)
        if skip:
            logger.info("data: re-reading the %d consumed batches of epoch %d", skip, self.epoch)
            counted = Counter(self.stream.skipped)  # the checkpoint's counts already include these batches' skips
            for _ in range(skip):
                next(self._it)
            self.stream.skipped.clear()
            self.stream.skipped.update(counted)

    def __next__(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self._it is None:
            if self.batch_in_epoch >= self.per_epoch:  # resumed at the end of an epoch
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._start_epoch(self.batch_in_epoch)
        if self.batch_in_epoch >= self.per_epoch:
            self._it = None  # stops the epoch's workers before the next epoch's start
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._start_epoch(0)
        try:
            batch = next(self._it)
        except StopIteration:  # a stream shorter than it announced: start the next epoch anyway
            logger.warning("data: epoch %d ended after %d batches", self.epoch, self.batch_in_epoch)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._start_epoch(0)
            batch = next(self._it)
        self.batch_in_epoch += 1
        self.wait_s += time.perf_counter() - t0
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


@dataclass
class Window:
    """What accumulates between two logged steps."""

    steps: int = 0
    step_time_s: float = 0.0
    wait_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0
    nonfinite_skipped: int = 0
    images: int = 0  # images this rank trained on (multi-scale batches vary in size)

    def add_metrics(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + float(v)
        self.micro_batches += 1


class Trainer:
    def __init__(self, job: str, cfg: JobConfig, args: ParsedArgs, build_task: Callable[[Any], Any],
                 world: distributed.World) -> None:
        self.job, self.cfg, self.args, self.world = job, cfg, args, world
        self.build_task = build_task
        self.run_dir = Path(cfg.run.dir) / job / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"

    # --- setup ---------------------------------------------------------------------------------------------

    def _build_stream(self, url: str, map_fn: Callable, train: bool, key: str = "",
                      required: tuple[str, ...] | None = None) -> Any:
        """The stream of data.<key> (default: train or val); `required`: its members (default: the task's)."""
        from data_pipeline.shards import DatasetInputError
        from data_pipeline.stream import build_stream

        d, w = self.cfg.data, self.world
        key = key or ("train" if train else "val")
        try:
            return build_stream(url, map_fn=map_fn, batch_size=d.batch_size, rank=w.rank, world_size=w.world_size,
                                num_workers=d.num_workers, mode=d.mode if train else "epoch", train=train,
                                seed=self.cfg.run.seed, shuffle_buffer=d.shuffle_buffer, cache_dir=d.cache_dir or None,
                                collate_fn=self.task.train_collate if train else self.task.eval_collate,
                                allow_pipe=d.allow_pipe, prefetch_factor=d.prefetch_factor,
                                pin_memory=None if d.pin_memory == "auto" else d.pin_memory,
                                required=self.task.required_members if required is None else required,
                                multiscale=d.multiscale if train else (), multiscale_base=d.multiscale_base)
        except DatasetInputError as e:  # an input to fix (malformed index.json, a missing local path): exit 2
            raise ConfigError(f"data.{key}={url}: {e}") from None
        except OSError as e:
            raise DataError(f"data.{key}={url}: cannot open the dataset ({e})") from None
        except ValueError as e:
            raise ConfigError(f"data.{key}={url}: {e}") from None

    def _prepare_run_dir(self, fresh: bool) -> None:
        """A fresh run into a run dir that holds an earlier one moves the earlier one aside (nothing is deleted); with
        ckpt.node_local every node's writer does so in its own run dir."""
        if self.storage.is_writer and fresh and self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime((self.run_dir / "config.yaml").stat().st_mtime)
                                  if (self.run_dir / "config.yaml").exists() else time.localtime())
            aside = self.run_dir.with_name(f"{self.run_dir.name}-{stamp}")
            n = 1
            while aside.exists():
                aside, n = self.run_dir.with_name(f"{self.run_dir.name}-{stamp}.{n}"), n + 1
            shutil.move(str(self.run_dir), str(aside))
            logger.warning("run.resume=%s: starting a new run; the earlier run in %s was moved to %s "
                           "(run.resume=auto continues a run)", self.cfg.run.resume, self.run_dir, aside)
        if self.storage.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()

    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        # collectives, before anything is built: every rank can write the run dir and sees it as the storage layout
        # wants; the checkpoint to resume from is chosen once and every rank holds its files of it (else exit 2)
        self.storage = checkpoint.check_storage(self.run_dir, self.ckpt_dir, rank=world.rank,
                                                local_rank=world.local_rank, node_local=cfg.ckpt.node_local)
        target, saved_world = checkpoint.agree_resume(cfg.run.resume, self.ckpt_dir, self.storage, cfg.to_dict(),
                                                      world.world_size)
        if cfg.run.resume == "auto" and target is None:
            logger.info("run.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
        self._prepare_run_dir(fresh=target is None and cfg.run.resume in ("auto", "none"))
        # another number of ranks than wrote a ZeRO checkpoint: its optimizer partitions do not fit; DeepSpeed's
        # universal format holds whole tensors, which the new ranks partition again
        elastic = target is not None and saved_world not in (None, world.world_size) and cfg.engine.zero_stage > 0
        if elastic:
            target = checkpoint.to_universal(target[0] / target[1], world.rank)

        if not world.on_gpu:
            threads = distributed.share_cpu_cores(cfg.data.num_workers)
            if threads:
                logger.info("CPU: %d compute thread(s) per rank (OMP_NUM_THREADS overrides)", threads)
        if cfg.engine.compile:
            try:
                engine_lib.check_compile_backend(cfg.engine.compile_backend)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        # the same seed on every rank while the model is built (identical initial weights), then seed + rank
        distributed.seed_all(cfg.run.seed)
        try:
            self.task = self.build_task(cfg.model)
        except (ValueError, FileNotFoundError) as e:  # the task's own checks of its model.* values and files
            raise ConfigError(str(e)) from None
        try:
            check_task(self.task)
        except TaskError as e:
            raise ConfigError(str(e)) from None
        if cfg.data.multiscale:  # before the EMA copies the model: the task makes it read every training size
            try:
                self.task.on_multiscale(tuple(cfg.data.multiscale))
            except ValueError as e:
                raise ConfigError(f"data.multiscale={list(cfg.data.multiscale)}: {e}") from None
        # the EMA copies the model before DeepSpeed wraps (and under ZeRO-3 partitions) it
        self.ema = RuntimeEMA(self.task.model, cfg.optim.ema_decay, world.device) if cfg.optim.ema_decay > 0 else None
        distributed.seed_all(cfg.run.seed + world.rank)

        self.train_stream = self._build_stream(cfg.data.train, self.task.train_transform, train=True)
        self.val_stream = (self._build_stream(cfg.data.val, self.task.eval_transform, train=False)
                           if cfg.data.val else None)
        # a labelled set for a dual encoder's zero-shot classification, evaluated with data.val (same transform)
        self.zero_shot_stream = None
        if cfg.data.zero_shot:
            if type(self.task).evaluate_zero_shot is TaskHooks.evaluate_zero_shot:
                raise ConfigError(f"data.zero_shot={cfg.data.zero_shot}: {self.job} does not classify zero-shot (a "
                                  "dual encoder such as pretrain_flip does); remove the key")
            self.zero_shot_stream = self._build_stream(cfg.data.zero_shot, self.task.eval_transform, train=False,
                                                       key="zero_shot", required=("image", "cls"))
        try:
            self.task.on_dataset(dict(self.train_stream.metadata))
        except ValueError as e:
            raise ConfigError(f"data.train={cfg.data.train}: {e}") from None
        precision = config.resolve_precision(cfg.engine.precision, world.on_gpu,
                                             world.on_gpu and torch.cuda.is_bf16_supported())
        self.derived = config.resolve(cfg, job=self.job, preset=self.args.preset, run_dir=str(self.run_dir),
                                      world_size=world.world_size,
                                      batches_per_epoch=self.train_stream.batches_per_epoch,
                                      num_samples=self.train_stream.num_samples, device=str(world.device),
                                      precision=precision)
        self.float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

        ds_config = config.deepspeed_config(cfg, world.on_gpu)
        if self.args.deepspeed_config:
            for key, value in tracking.flatten(self.args.deepspeed_config).items():
                old = tracking.flatten(ds_config).get(key, "(unset)")
                logger.info("--deepspeed_config %s: %s: %s -> %s", self.args.deepspeed_config_path, key, old, value)
            ds_config = config.deep_merge(ds_config, self.args.deepspeed_config)
        if elastic:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        if self.storage.node_local:  # each node's first rank writes the model states into its node's run dir
            ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
        self.ds_config = ds_config

        o = cfg.optim
        groups = engine_lib.param_groups(self.task.param_groups(), o.weight_decay)
        optimizer = engine_lib.build_optimizer(groups, lr=self.derived.lr, betas=o.betas, eps=o.eps,
                                               weight_decay=o.weight_decay, on_gpu=world.on_gpu, name=o.optimizer,
                                               momentum=o.momentum, fused=o.fused)
        engine_lib.set_fused_attention(self.task.model, cfg.engine.fused_attention)
        self.engine = engine_lib.initialize(self.task.model, optimizer, ds_config)
        if cfg.engine.compile:
            engine_lib.compile_model(self.engine, cfg.engine.compile_backend)

        self.step, epoch, batch_in_epoch = 0, 0, 0
        self.nonfinite_skipped = 0
        self.best: dict[str, Any] | None = None   # {"metric", "value", "step"} of the best evaluation so far
        self._best_missing_warned = False
        if target is not None:
            load_dir, tag = target
            logger.info("resuming from %s", load_dir / tag)
            state = checkpoint.load(self.engine, load_dir, tag)
            self.step = int(state["step"])
            epoch, batch_in_epoch = int(state["data"]["epoch"]), int(state["data"]["batch_in_epoch"])
            saved_world = int(state.get("world_size") or world.world_size)
            if saved_world != world.world_size:
                # the new world's epoch plan deals the shards differently: continue the same epoch after the same
                # share of its samples (exact replay needs the same world size)
                batch_in_epoch = batch_in_epoch * saved_world // world.world_size
                logger.warning("resume: checkpoint written by %d ranks, now %d%s: optimizer states repartitioned, "
                               "epoch %d continues at batch %d of the new plan", saved_world,
                               world.world_size, " (via DeepSpeed's universal checkpoint)" if elastic else "",
                               epoch, batch_in_epoch)
            rngs = state.get("rng", [])
            if len(rngs) == world.world_size:
                checkpoint.set_rng_state(rngs[world.rank], world.device)
            else:
                logger.warning("resume: checkpoint from %d ranks, now %d; RNGs reseeded", len(rngs),
                               world.world_size)
                distributed.seed_all(cfg.run.seed + world.rank + world.world_size * self.step)
            self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
            skipped = state.get("skipped") or []
            if len(skipped) == world.world_size:
                self.train_stream.skipped.update(skipped[world.rank])
            if "task" in state:
                self.task.load_extra_state(state["task"])
            if self.ema is not None and state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            elif self.ema is not None:
                logger.warning("resume: the checkpoint holds no EMA; the EMA restarts from the current weights")
            self.best = state.get("best") or None
        self.data = DataPosition(self.train_stream, epoch, batch_in_epoch, resampled_epoch=self.resampled_epoch())
        self._epochs_evaluated = self.epochs_completed()

        if world.is_main:
            (self.run_dir / "config.yaml").write_text(config.dump_yaml(cfg))
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        self.tracker = tracking.Tracker(self.run_dir, enabled=world.is_main, resume_step=self.step)
        self.tracker.text("config", "\n".join("    " + line for line in config.dump_yaml(cfg).splitlines()))
        d = self.derived
        logger.info("%s: %d rank(s) on %s, %s, ZeRO-%d; global batch %d = %d per rank x %d accum x %d ranks; "
                    "lr %.3g (base_lr %.3g per %d); %d steps (%d warmup)%s; run dir %s",
                    self.job, world.world_size, world.device, d.precision, cfg.engine.zero_stage, d.global_batch,
                    cfg.data.batch_size, cfg.engine.grad_accum, world.world_size, d.lr, cfg.optim.base_lr,
                    config.LR_REFERENCE_BATCH, d.total_steps, d.warmup_steps,
                    f", {d.batches_per_epoch} batches per epoch" if d.batches_per_epoch else "", self.run_dir)

        self.peak = tracking.peak_flops(torch.cuda.get_device_name(world.device), d.precision) if world.on_gpu \
            else None
        self.flops_per_sample = self.task.flops_per_sample() if self.peak else None
        self.fixed_batch = self._fixed_batch()

    def _fixed_batch(self) -> dict[str, Any] | None:
        """The batch the reconstruction pictures are drawn from: the first val batch, else the first train batch."""
        stream = self.val_stream if self.val_stream is not None else self.train_stream
        if stream is self.train_stream:
            return None  # taken from the first training batch, not from an extra pass over the data
        stream.set_epoch(0)
        return to_device(next(iter(stream)), self.world.device, self.float_dtype)

    # --- the loop ------------------------------------------------------------------------------------------

    def resampled_epoch(self) -> int:
        """Micro-batches per rank in an epoch of a resampled stream: num_samples / (batch_size x world_size), as for
        optim.epochs."""
        return max(1, (self.train_stream.num_samples or 0) // (self.cfg.data.batch_size * self.world.world_size))

    def epochs_completed(self) -> int:
        """Whole epochs of data.train consumed so far."""
        return self.data.epoch + (1 if self.data.batch_in_epoch >= self.data.per_epoch else 0)

    def eval_due(self) -> bool:
        """Whether this step ends a validation interval (log.eval_every steps, or an epoch with eval_every_epoch)."""
        every = self.cfg.log.eval_every
        due = bool(every) and self.step % every == 0
        if self.cfg.log.eval_every_epoch:
            done = self.epochs_completed()
            if done > self._epochs_evaluated:
                self._epochs_evaluated = done
                due = True
        return due

    def lr_for(self, step: int) -> float:
        d = self.derived
        return engine_lib.lr_at(step, peak=d.lr, total=d.total_steps, warmup=d.warmup_steps,
                                min_lr=self.cfg.optim.min_lr, milestones=d.milestone_steps, gamma=self.cfg.optim.gamma)

    def train_step(self, window: Window, want_grad_norm: bool) -> tuple[float | None, bool]:
        """One optimizer step over grad_accum micro-batches -> (the local grad norm when DeepSpeed computes none,
        whether a loss was non-finite on some rank).

        A non-finite loss (checked on every micro-batch, agreed across ranks) is never backpropagated: a zero loss
        over every trainable parameter takes its place, so DeepSpeed's gradient hooks and counters run as usual,
        and the step's lr is set to 0, so AdamW leaves the weights exactly as they were (engine.on_nonfinite=skip;
        DeepSpeed has no public way to skip a step outside fp16 loss scaling; Adam's moments decay by one step).
        With on_nonfinite=stop the caller stops the run.
        """
        engine, accum = self.engine, self.cfg.engine.grad_accum
        engine_lib.set_lr(engine.optimizer, self.lr_for(self.step))
        local_norm = None
        nonfinite = False
        for micro in range(accum):
            wait0 = self.data.wait_s
            batch = next(self.data)
            window.wait_s += self.data.wait_s - wait0
            window.images += len(batch["is_padding"]) if "is_padding" in batch else self.cfg.data.batch_size
            batch = to_device(batch, self.world.device, self.float_dtype)
            if self.fixed_batch is None:
                self.fixed_batch = {k: v[:8].clone() if torch.is_tensor(v) else v[:8] if isinstance(v, list) else v
                                    for k, v in batch.items()}
            loss, metrics = self.task.training_step(engine, batch)
            bad = distributed.any_true(not bool(torch.isfinite(loss.detach()).all()), self.world.device)
            if bad:
                nonfinite = True
                loss = sum((p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad),
                           torch.zeros((), device=self.world.device))
            if micro == accum - 1 and nonfinite:
                engine_lib.set_lr(engine.optimizer, 0.0)
            engine.backward(loss)
            if want_grad_norm and micro == accum - 1 and self.cfg.engine.zero_stage == 0:
                local_norm = engine_lib.local_grad_norm(engine.module)
            engine.step()
            if not bad:
                window.add_metrics({"loss": float(loss.detach().float().item()), **metrics})
        return local_norm, nonfinite

    def log(self, window: Window, grad_norm: float | None) -> dict[str, float]:
        """All-reduce the window's means over ranks and write them (rank 0). Collective."""
        cfg, d, w = self.cfg, self.derived, self.world
        keys = sorted(window.metrics)
        n = max(1, window.micro_batches)
        step_time = window.step_time_s / max(1, window.steps)
        images_per_step = window.images / max(1, window.steps)
        reduced = distributed.all_reduce_mean([window.metrics[k] / n for k in keys]
                                              + [window.wait_s / max(window.step_time_s, 1e-9), step_time,
                                                 images_per_step], w.device)
        means = dict(zip(keys, reduced[:len(keys)]))
        wait_frac, step_time, images_per_step = reduced[len(keys):]
        per_rank = images_per_step / step_time
        values = {f"train/{k}": v for k, v in means.items()}
        if self.nonfinite_skipped:
            values["train/nonfinite_skipped"] = float(self.nonfinite_skipped)
        values.update({"train/lr": self.lr_for(self.step - 1), "train/epoch": self.data.epoch
                       + self.data.batch_in_epoch / self.data.per_epoch,
                       "perf/images_per_s": per_rank * w.world_size, "perf/images_per_s_per_rank": per_rank,
                       "perf/step_time_s": step_time, "perf/data_wait_frac": wait_frac})
        engine_norm = engine_lib.grad_norm(self.engine)
        norm = engine_norm if engine_norm is not None else grad_norm
        if norm is not None:
            values["train/grad_norm"] = norm
        loss_scale = getattr(self.engine.optimizer, "loss_scale", None) if self.engine.fp16_enabled() else None
        if loss_scale is not None:
            values["train/loss_scale"] = float(loss_scale)
        mem_tag, mem = tracking.memory_gib(w.device)
        values[mem_tag] = mem
        if self.peak and self.flops_per_sample:
            values["perf/mfu"] = self.flops_per_sample * per_rank / self.peak
        skipped: dict[str, int] = {}
        for counts in distributed.all_gather_object(dict(self.train_stream.skipped)):
            for reason, count in counts.items():
                skipped[reason] = skipped.get(reason, 0) + count
        values.update({f"data/skipped/{r}": float(c) for r, c in sorted(skipped.items())})
        self.tracker.scalars(self.step, values)
        self.tracker.progress(self.step, d.total_steps, values, eta_s=(d.total_steps - self.step) * step_time)
        return values

    @property
    def has_eval(self) -> bool:
        """Whether there is anything to evaluate (data.val or data.zero_shot)."""
        return self.val_stream is not None or self.zero_shot_stream is not None

    def evaluate(self) -> dict[str, float]:
        if not self.has_eval:
            return {}
        t0 = time.perf_counter()
        distributed.broadcast_buffers(self.engine.module)
        results: dict[str, float] = {}
        if self.val_stream is not None:
            self.val_stream.set_epoch(0)
            results = self.task.evaluate(self.engine, DeviceLoader(self.val_stream, self.world.device,
                                                                   self.float_dtype))
        if self.zero_shot_stream is not None:
            self.zero_shot_stream.set_epoch(0)
            try:
                results = {**results, **self.task.evaluate_zero_shot(
                    self.engine, DeviceLoader(self.zero_shot_stream, self.world.device, self.float_dtype),
                    dict(self.zero_shot_stream.metadata))}
            except ValueError as e:
                raise ConfigError(str(e)) from None
        values = {f"val/{k.removeprefix('val_')}": float(v) for k, v in results.items()}
        if self.ema is not None and self.val_stream is not None:
            distributed.broadcast_buffers(self.ema.module)  # each rank averaged its own BatchNorm statistics
            self.val_stream.set_epoch(0)
            ema_results = self.task.evaluate_ema(self.ema.module,
                                                 DeviceLoader(self.val_stream, self.world.device, torch.float32))
            values.update({f"val/{k.removeprefix('val_')}_ema": float(v) for k, v in ema_results.items()})
        self.tracker.scalars(self.step, values)
        # the console line keeps the headline numbers; a task's detail groups (val/<group>/<name>, e.g. DETR's
        # per-class AP) go to TensorBoard and metrics.jsonl, and the task logs its own summary of them
        headline = tracking.headline(values)
        detail = len(values) - len(headline)
        logger.info("eval step %d: %s (%.1f s)%s", self.step, "  ".join(f"{k} {v:.4f}" for k, v in headline.items()),
                    time.perf_counter() - t0, f"; {detail} more values in TensorBoard" if detail else "")
        self.keep_best(values)
        return values

    def keep_best(self, values: dict[str, float]) -> None:
        """With ckpt.best_metric: when `values` improve it, save checkpoints/best and export to export_best/.

        Collective (every rank holds the same all-reduced values, so all take the same branch).
        """
        name = self.cfg.ckpt.best_metric
        if not name:
            return
        key = "val/" + name.removeprefix("val/").removeprefix("val_")
        if key not in values:
            if not self._best_missing_warned:
                logger.warning("ckpt.best_metric=%s: the evaluation reports no %s (it has %s); no best checkpoint",
                               name, key, ", ".join(values))
                self._best_missing_warned = True
            return
        value = values[key]
        if self.best is not None and self.best["metric"] == key:  # a resumed run may select by another metric
            better = value > self.best["value"] if self.cfg.ckpt.best_mode == "max" else value < self.best["value"]
            if not better:
                return
        self.best = {"metric": key, "value": value, "step": self.step}
        path = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.client_state(), keep=0,
                               storage=self.storage, tag=checkpoint.BEST_TAG)
        out = self.export(self.run_dir / "export_best", extra={"best": self.best})
        logger.info("best %s %.4f at step %d: %s, %s", key, value, self.step, path, out)

    def pictures(self) -> None:
        if self.fixed_batch is not None:
            self.tracker.images(self.step, self.task.images(self.engine, self.fixed_batch))

    def client_state(self) -> dict[str, Any]:
        state = {"step": self.step,
                 "data": self.data.state(),
                 "world_size": self.world.world_size,
                 "rng": distributed.all_gather_object(checkpoint.rng_state(self.world.device)),
                 "skipped": distributed.all_gather_object(dict(self.train_stream.skipped)),
                 "nonfinite_skipped": self.nonfinite_skipped,
                 "config": self.cfg.to_dict()}
        if self.best is not None:
            state["best"] = dict(self.best)
        state["task"] = self.task.extra_state()
        if self.task.class_names:  # a classifier's label names travel with its checkpoints
            state["label_names"] = [str(c) for c in self.task.class_names]
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self) -> Path:
        t0 = time.perf_counter()
        path = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.client_state(), keep=self.cfg.ckpt.keep,
                               storage=self.storage)
        logger.info("checkpoint %s (%.1f s)", path, time.perf_counter() - t0)
        return path

    @property
    def export_name(self) -> str:
        return self.task.export_name

    def export(self, out_dir: Path | None = None, extra: dict[str, Any] | None = None,
               state: dict[str, torch.Tensor] | None = None) -> Path:
        """Backbone from the consolidated fp32 weights (or `state`, e.g. the EMA's) into out_dir (run_dir/export),
        written by contracts.backbone.save_export: a backbone as timm's folder (config.json + model.safetensors),
        other exports by the task's `export_name` (tokenizer.*, ipt.*); `extra` is added to the meta. Collective."""
        from contracts.backbone import save_export

        if state is None:
            state = engine_lib.full_state_dict(self.engine, self.world.is_main)
        out_dir = out_dir or self.run_dir / "export"
        if self.world.is_main:
            tensors, meta = self.task.export(state)
            meta = {**meta, **(extra or {})}
            name = self.export_name
            out_dir.mkdir(parents=True, exist_ok=True)
            exports = {name: (tensors, meta)}
            exports.update(self.task.extra_exports(state))
            for name, (tensors, meta) in exports.items():
                save_export(out_dir, name, tensors, meta)
        distributed.barrier()
        return out_dir

    def run(self) -> int:
        self.setup()
        try:
            return self._train()
        except RunError:  # e.g. a checkpoint no rank could write: what was logged so far stays readable
            self.tracker.close()
            raise

    def _train(self) -> int:
        cfg, d, log_cfg = self.cfg, self.derived, self.cfg.log
        start_step, t_start = self.step, time.perf_counter()
        first_loss = last_values = None
        saved_at = self.step if self.step else None  # a resumed run's step is saved already
        window = Window()
        if self.step >= d.total_steps:
            logger.info("run already at step %d of %d: nothing to train", self.step, d.total_steps)
        while self.step < d.total_steps:
            t0 = time.perf_counter()
            log_now = (self.step + 1) % log_cfg.every == 0 or self.step + 1 == d.total_steps
            local_norm, nonfinite = self.train_step(window, want_grad_norm=log_now)
            self.step += 1
            if nonfinite:
                if cfg.engine.on_nonfinite == "stop":
                    logger.error("non-finite loss at step %d: stopping without saving; the last good checkpoint is "
                                 "%s (lower optim.lr / optim.base_lr, set engine.grad_clip, or "
                                 "engine.on_nonfinite=skip)", self.step, checkpoint.latest_tag(self.ckpt_dir) or "none")
                    self.tracker.close()
                    return 1
                window.nonfinite_skipped += 1
                self.nonfinite_skipped += 1
                logger.warning("non-finite loss at step %d: update skipped (%d so far)", self.step,
                               self.nonfinite_skipped)
            self.task.after_step(self.engine, self.step)
            if self.ema is not None:
                self.ema.update(self.engine, self.step)
            window.steps += 1
            window.step_time_s += time.perf_counter() - t0
            if log_now:
                last_values = self.log(window, local_norm)
                window = Window()
                loss = last_values.get("train/loss", math.nan)
                first_loss = loss if first_loss is None else first_loss
            last = self.step == d.total_steps
            if self.eval_due() and self.has_eval and not last:
                self.evaluate()
            if log_cfg.images_every and self.step % log_cfg.images_every == 0 and not last:
                self.pictures()
            if cfg.ckpt.every and self.step % cfg.ckpt.every == 0 and not last:
                self.save()
                saved_at = self.step
        final = self.evaluate()
        self.pictures()
        if saved_at != self.step:
            self.save()
        export_dir = self.export()
        if self.ema is not None:
            self.export(self.run_dir / "export_ema", extra={"ema_decay": self.cfg.optim.ema_decay, "step": self.step},
                        state=self.ema.state_dict())
        if self.world.is_main:
            metrics = {k: v for k, v in tracking.headline({**(last_values or {}), **final}).items()
                       if k in ("train/loss", "val/loss") or k.startswith("val/")}
            hparams = {k: v for k, v in tracking.flatten(cfg.to_dict()).items() if v is not None}
            self.tracker.hparams(hparams, metrics)
        self.tracker.close()
        elapsed = time.perf_counter() - t_start
        steps_done = self.step - start_step
        if first_loss is not None and last_values is not None:
            logger.info("done: %d steps in %s; train loss %.4f -> %.4f%s", steps_done,
                        tracking.format_duration(elapsed), first_loss, last_values.get("train/loss", math.nan),
                        "".join(f"; {k} {v:.4f}" for k, v in tracking.headline(final).items()))
        if self.best is not None:
            logger.info("best:         %s %.4f at step %d (checkpoints/%s, %s)", self.best["metric"],
                        self.best["value"], self.best["step"], checkpoint.BEST_TAG, self.run_dir / "export_best")
        logger.info("TensorBoard:  tensorboard --logdir %s", self.run_dir / "tb")
        logger.info("checkpoint:   %s", self.ckpt_dir / checkpoint.tag_for(self.step))
        logger.info("export:       %s", export_dir)
        logger.info("convert:      python launch/convert_checkpoint.py %s --out %s", self.run_dir,
                    self.run_dir / "export")
        return 0
