"""The one function every job uses to read its training or evaluation data: `build_stream`.

Data flow (one DataLoader per rank; every step below the plan runs inside each DataLoader worker process):

    URL (folder with index.json | brace pattern | comma list | list | embedded:NAME)
      -> load_index: absolute shard URLs + sample counts (index.json, or counted by reading the shards once)
      -> plan_epoch: shards shuffled with (seed, epoch), identically on every rank; dealt to the
         world_size x num_workers readers (split by node, then by worker), balanced by sample count
      -> this worker's shards, opened with fsspec (streaming; `simplecache::` when cache_dir is set), retried
         with backoff when the failure can pass (see `data_pipeline.shards` for which errors are not retried);
         tar members (tarfile, webdataset's naming: key = name up to the first dot) grouped into raw samples
      -> raw-sample checks (pickle / unexpected / missing members; truncated tar) -> shuffle buffer of raw,
         undecoded samples seeded by (seed, epoch, rank, worker)
      -> decode (PIL image -> RGB, cls -> int, json -> dict) -> the job's map_fn -> collate into full batches
      -> main process: skipped-sample counts are popped from each batch and summed into `stream.skipped`

Epoch mode (`mode="epoch"`): every sample of the dataset is read exactly once per epoch, by exactly one
(rank, worker), and every rank yields the same number of batches, `batches_per_epoch`, so a collective never
waits on a rank that ran out of data. Remainder policy: every batch is full; a worker pads its last partial
batch with repeats of its own samples, and a rank whose workers hold fewer samples than the busiest rank's
yields extra batches of such repeats, so each rank reaches B = max over ranks of its batches. Repeats carry
`batch["is_padding"] == True`: training may use them (as DistributedSampler's padding does), evaluation drops
them and so counts every sample exactly once. Each worker has an exact batch quota (`WorkerPlan.batches`), so a
rank's total does not depend on how the DataLoader interleaves its workers. A worker whose shards yield fewer
usable samples than the index lists (corrupt data) pads up to its quota; one that yields more (a stale
index.json) stops at its quota and counts the rest as skipped ("beyond_index"). Epoch mode needs at least
world_size x num_workers shards; fewer is a ValueError that says how to fix it.

Batch size bounds (ValueErrors raised by build_stream, before any batch is made; the runtime reports them as config
errors, exit 2): a training stream in epoch mode needs batch_size <= the samples every rank reads per epoch (a larger
batch would be made of repeats); a resampled stream needs batch_size <= the dataset's samples; no stream takes more
than MAX_BATCH_SIZE samples per batch. A training batch larger than what a worker reads per epoch is allowed but
logged as a warning with the share of repeats (the fix: fewer workers or a smaller batch).

Multi-scale batches (`multiscale=` sizes, data.multiscale; data_pipeline/multiscale.py, MobileViT's variable-batch
sampler): a training stream's batches come at several image sizes, a batch at size s holding
int(batch_size x base^2 / s^2) images (about the same pixels per batch). Each worker's batch sizes follow a schedule
of (seed, epoch, worker, batch index) alone (cycles holding each size once, shuffled), the same on every rank, so a
resumed run gets the same sizes and batches and the ranks run the same size at the same step. The map function
declares that it takes a size per batch with a method `at_size(size) -> map function` (finetune_cls's
ClassificationTrainTransform); the worker maps each sample with the transform of its batch's size. In epoch mode a
worker's batch quota is the fewest batches of its schedule that hold its samples (`MultiScale.batches_for`), so
batches_per_epoch stays the same in every epoch; a padding repeat mapped at another size is mapped again, from its
raw sample, at the size of the batch it pads.

Resampled mode (`mode="resampled"`): infinite; each (rank, worker) draws shards with replacement from an RNG
seeded by (seed, epoch, rank, worker), so no two readers share a sequence. No padding; `batches_per_epoch` is None.

Reproducibility: the random augmentations of a map_fn (torch, `random`, numpy global RNGs) are seeded at the
start of every epoch from (seed, epoch, rank, worker) in each reader, never from the training process's RNG state,
and creating the DataLoader does not draw from that state either. So an epoch's batches are a function of
(seed, epoch, rank, world size, num_workers) alone, and a resumed run that skips the first k batches of an epoch
gets exactly the batches k+1... of the uninterrupted run. With num_workers=0 the reader runs in the training
process: its RNG states are swapped in around each batch, so data and model randomness do not interleave.

Bad data never stops a run: a sample that cannot be used is skipped and counted by reason in `stream.skipped`
(a Counter): "truncated_tar", "corrupt_image", "corrupt_label", "corrupt_json", "missing_image",
"missing_label", "missing_json", "missing_txt" (a member that `required` names is absent; tasks declare theirs as
`required_members` and the runtime passes them), "unexpected_member", "multiple_images", "duplicate_member",
"pickle_member" (.pyd/.pickle/.pkl are never decoded), "map_error" (map_fn raised), "beyond_index", or the reason
a map_fn gave in `SkipSample("reason")`. A map_fn's KeyError for a member the sample lacks ("cls", "json", "txt",
"image") counts as that member's missing_* reason even when it was not required. A truncated tar counts exactly the
samples it lost (see `ShardReader.samples`). Workers log skipped samples (key and shard URL) at a limited rate.

Worker processes never outlive the process that iterates the stream: each DataLoader worker asks the kernel to
kill it when its parent dies (Linux prctl PR_SET_PDEATHSIG, so SIGKILL of the training process included; `pipe:`
commands started by a worker get the same), checks at start that the parent has not died already, and where prctl
is unavailable watches its parent from a thread instead.
"""

import ctypes
import functools
import hashlib
import io
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from data_pipeline.multiscale import MultiScale
from data_pipeline.shards import (
    IMAGE_EXTENSIONS,
    PICKLE_EXTENSIONS,
    REQUIRABLE,
    DatasetIndex,
    EpochPlan,
    ShardInfo,
    ShardReader,
    check_pipe,
    load_index,
    plan_epoch,
    readers_per_rank,
)

logger = logging.getLogger(__name__)

MODES = ("epoch", "resampled")
SKIPPED_KEY = "__skipped__"  # private batch key: skipped-sample counts since the worker's previous batch
_LOG_FIRST_SKIPS = 5  # per reason and worker, then one warning every _LOG_EVERY_SKIPS
_LOG_EVERY_SKIPS = 1000
MAX_BATCH_SIZE = 1 << 20  # samples per batch per rank: anything larger is a typo, refused before memory is allocated
_PADDING_WARN_SHARE = 0.1  # a training epoch with more repeats than this share of its samples is logged as a warning

T = TypeVar("T")


@dataclass
class DataConfig:
    """The `data.*` section of every job's config; the runtime unpacks it into `build_stream(...)`."""

    train: str  # dataset URL: folder with index.json, brace pattern, "a.tar,b.tar", or embedded:NAME
    val: str = ""  # evaluation dataset URL; "" = no evaluation data
    # a labelled evaluation set (index.json's metadata names its classes) for a task that classifies zero-shot (a dual
    # encoder: pretrain_flip), evaluated with data.val; "" = none
    zero_shot: str = ""
    batch_size: int = 64  # samples per batch, per rank
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the main process)
    mode: str = "epoch"  # "epoch": every sample once per epoch | "resampled": infinite, shards with replacement
    shuffle_buffer: int = 1000  # raw (undecoded) samples each worker holds for shuffling
    cache_dir: str = ""  # keep remote shards in this local folder (fsspec simplecache); "" = stream only
    allow_pipe: bool = False  # accept webdataset's `pipe:CMD` shard URLs (each runs a shell command)
    # batches land in page-locked memory so the host-to-GPU copy runs asynchronously (non_blocking): true | false |
    # "auto" (= when CUDA is present); a bool so that YAML's on/off/true/false all read as meant
    pin_memory: Literal["auto"] | bool = "auto"
    prefetch_factor: int = 2  # batches each worker prepares ahead (DataLoader's prefetch_factor; num_workers > 0)
    # multi-scale training batches (data_pipeline/multiscale.py; MobileViT's [160, 192, 256, 288, 320]): each training
    # batch at one of these square sizes, batch_size scaled by (multiscale_base / size)^2; () = off. Jobs whose train
    # transform takes a size per batch (finetune_cls); evaluation stays at the job's image size
    multiscale: tuple[int, ...] = ()
    multiscale_base: int = 0  # the size data.batch_size is stated at; 0 = the job's own image size (model.img_size)

    def __post_init__(self) -> None:
        self.multiscale = tuple(self.multiscale)
        if self.multiscale:
            MultiScale(self.multiscale, self.multiscale_base or 1, self.batch_size)  # distinct sizes >= 1
        if self.multiscale_base < 0:
            raise ValueError(f"data.multiscale_base must be >= 0 (0 = the job's image size), got "
                             f"{self.multiscale_base}")
        if self.mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {self.mode!r}")
        if not (self.pin_memory == "auto" or isinstance(self.pin_memory, bool)):
            raise ValueError(f"data.pin_memory must be auto, true or false, got {self.pin_memory!r}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(f"data.batch_size must be >= 1 and data.num_workers, data.shuffle_buffer >= 0; got "
                             f"{self.batch_size}, {self.num_workers}, {self.shuffle_buffer}")
        if self.batch_size > MAX_BATCH_SIZE:  # the bounds that depend on the dataset are build_stream's
            raise ValueError(f"data.batch_size={self.batch_size} is more than {MAX_BATCH_SIZE} samples per batch and "
                             f"rank, the most a stream accepts (it is per rank: more ranks or engine.grad_accum give "
                             f"a larger global batch)")


class SkipSample(Exception):
    """Raised by a map function (or the decoder) to drop one sample; `reason` is the key it is counted under."""

    def __init__(self, reason: str = "skipped", detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw sample into what a map function receives.

    Args:
        raw: `{"__key__": str, "__url__": str, suffix: bytes, ...}` as read from a shard.

    Returns:
        `{"__key__", "__url__", "image": PIL.Image (RGB), "cls": int, "json": dict, "txt": str}`, each member
        only if present.

    Raises:
        SkipSample: "corrupt_image" (PIL cannot fully decode it, truncated included), "corrupt_label",
            "corrupt_json", "corrupt_txt", "pickle_member" or "unexpected_member".
    """
    sample: dict[str, Any] = {"__key__": raw["__key__"], "__url__": raw["__url__"]}
    for suffix, data in raw.items():
        if suffix.startswith("__"):
            continue
        if suffix.rsplit(".", 1)[-1] in PICKLE_EXTENSIONS:
            raise SkipSample("pickle_member", suffix)
        if suffix in IMAGE_EXTENSIONS:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()  # decode now, so a truncated image fails here rather than in the transform
                    sample["image"] = image.convert("RGB")
            except Exception as error:
                raise SkipSample("corrupt_image", f"{suffix}: {error}") from error
        elif suffix == "cls":
            try:
                sample["cls"] = int(data.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError) as error:
                raise SkipSample("corrupt_label", repr(data[:20])) from error
        elif suffix == "json":
            try:
                sample["json"] = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise SkipSample("corrupt_json", str(error)) from error
        elif suffix == "txt":
            try:
                sample["txt"] = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise SkipSample("corrupt_txt", str(error)) from error
        else:
            raise SkipSample("unexpected_member", suffix)
    return sample


def shuffled(samples: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """Yield `samples` in random order through a buffer of `buffer_size` items (<= 1: order unchanged)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[T] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


class SkipTracker:
    """Counts skipped samples in one worker: cumulative totals, a delta for the next batch, rate-limited logs."""

    def __init__(self, rank: int, worker: int) -> None:
        self.rank, self.worker = rank, worker
        self.total: Counter[str] = Counter()
        self._since_last_batch: Counter[str] = Counter()

    def __call__(self, reason: str, key: str | None, url: str, detail: str = "", count: int = 1) -> None:
        before = self.total[reason]
        self.total[reason] += count
        self._since_last_batch[reason] += count
        if before < _LOG_FIRST_SKIPS or before // _LOG_EVERY_SKIPS != self.total[reason] // _LOG_EVERY_SKIPS:
            logger.warning("rank %d worker %d skipped %s sample%s %s in %s: %s (%d %s so far in this worker)",
                           self.rank, self.worker, reason, "s" if count > 1 else "", key or f"x{count}", url,
                           detail, self.total[reason], reason)

    def take(self) -> dict[str, int]:
        """The counts since the previous call; they travel to the main process inside the next batch."""
        delta = dict(self._since_last_batch)
        self._since_last_batch.clear()
        return delta


class ShardBatchDataset(IterableDataset):
    """The IterableDataset each DataLoader worker iterates: full batches from the shards its plan gives it.

    Yields dicts: the collated map_fn outputs, `"is_padding"`: bool Tensor [batch_size], and SKIPPED_KEY
    (popped again by `BatchStream`). Set `epoch` before iterating; workers are started per epoch, so they see it.
    """

    def __init__(self, shards: Sequence[ShardInfo], *, reader: ShardReader, map_fn: Callable[[dict], dict],
                 collate_fn: Callable[[list], dict] | None, batch_size: int, rank: int, world_size: int,
                 num_workers: int, mode: str, train: bool, seed: int, shuffle_buffer: int,
                 multiscale: MultiScale | None = None) -> None:
        super().__init__()
        self.shards = tuple(shards)
        self.reader = reader
        self.map_fn = map_fn
        self.collate_fn = collate_fn or default_collate
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.readers = readers_per_rank(num_workers)
        self.mode, self.train, self.seed = mode, train, seed
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.multiscale = multiscale
        self.epoch = 0

    def plan(self) -> EpochPlan:
        return plan_epoch(self.shards, self.world_size, self.readers, self.epoch, self.seed, self.batch_size,
                          shuffle=self.train, multiscale=self.multiscale)

    def _shapes(self, worker: int) -> Callable[[int], tuple[Callable[[dict], dict], int, int | None]]:
        """batch index j of this worker in this epoch -> (map function, batch size, image size or None)."""
        if self.multiscale is None:
            return lambda j: (self.map_fn, self.batch_size, None)
        ms, transforms = self.multiscale, {}
        batch_of = dict(zip(ms.sizes, ms.batch_sizes))
        cycles: dict[int, list[int]] = {}

        def shape(j: int) -> tuple[Callable[[dict], dict], int, int]:
            index, position = divmod(j, len(ms.sizes))
            if index not in cycles:
                cycles.clear()  # only the current cycle is needed
                cycles[index] = ms.cycle(self.seed, self.epoch, worker, index)
            size = cycles[index][position]
            if size not in transforms:
                transforms[size] = self.map_fn.at_size(size)  # type: ignore[attr-defined]
            return transforms[size], batch_of[size], size
        return shape

    def _worker_id(self) -> int:
        info = get_worker_info()
        if info is None:
            if self.readers != 1:
                raise RuntimeError(f"planned for {self.readers} DataLoader workers but iterated in the main "
                                   f"process; iterate the BatchStream that build_stream returns")
            return 0
        if info.num_workers != self.readers:
            raise RuntimeError(f"planned for {self.readers} workers but the DataLoader has {info.num_workers}")
        return info.id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self._worker_id()
        skips = SkipTracker(self.rank, worker)
        batches = self._epoch_batches(worker, skips) if self.mode == "epoch" else self._resampled_batches(worker,
                                                                                                          skips)
        seed = f"augment-{self.seed}-{self.epoch}-{self.rank}-{worker}"
        if get_worker_info() is not None:
            seed_global_rngs(seed)  # a worker process of its own: its global RNGs are the data's
            return batches
        return _isolated_rngs(batches, seed)

    def _buffer_rng(self, worker: int) -> random.Random:
        return random.Random(f"samples-{self.seed}-{self.epoch}-{self.rank}-{worker}")

    def _mapped(self, raw: Iterable[dict], skips: SkipTracker, map_fn: Callable[[], Callable[[dict], dict]],
                on_usable: Callable[[], None] | None = None) -> Iterator[tuple[dict, dict]]:
        """Decode and map raw samples with the map function `map_fn()` returns at that moment (the current batch's);
        yields (raw sample, mapped item); anything that raises is skipped and counted."""
        for sample in raw:
            try:
                item = map_fn()(decode_sample(sample))
            except SkipSample as skip:
                skips(skip.reason, sample["__key__"], sample["__url__"], skip.detail)
                continue
            except Exception as error:  # noqa: BLE001 - one bad sample must not stop the run; it is counted
                reason = _missing_member(error, sample) or "map_error"
                skips(reason, sample["__key__"], sample["__url__"], f"{type(error).__name__}: {error}")
                continue
            if on_usable is not None:
                on_usable()
            yield sample, item

    def _batch(self, items: list[dict], num_padding: int, skips: SkipTracker) -> dict[str, Any]:
        batch = self.collate_fn(items)
        if not isinstance(batch, dict):
            raise TypeError(f"collate_fn must return a dict, got {type(batch).__name__}")
        batch["is_padding"] = torch.arange(len(items)) >= len(items) - num_padding
        batch[SKIPPED_KEY] = skips.take()
        return batch

    def _epoch_batches(self, worker: int, skips: SkipTracker) -> Iterator[dict[str, Any]]:
        plan = self.plan().worker(self.rank, worker)
        if plan.batches == 0:
            return
        raw: Iterator[dict] = (sample for shard in plan.shards for sample in self.reader.samples(shard, skips))
        raw = iter(shuffled(raw, self.shuffle_buffer, self._buffer_rng(worker)))
        shape = self._shapes(worker)
        map_fn, batch_size, size = shape(0)
        # this worker's own samples, repeated as padding: (raw sample only when multi-scale, item, its size)
        largest = self.multiscale.largest_batch if self.multiscale else self.batch_size
        recent: deque[tuple[dict | None, dict, int | None]] = deque(maxlen=largest)
        pending: list[dict] = []
        emitted = 0
        for sample, item in self._mapped(raw, skips, lambda: map_fn):
            pending.append(item)
            recent.append((sample if self.multiscale else None, item, size))
            if len(pending) < batch_size:
                continue
            emitted += 1
            if emitted == plan.batches:
                # Read whatever remains (normally nothing) so its skips and an early-ending tar are counted
                # before the last batch carries the counts out.
                for extra in raw:
                    skips("beyond_index", extra["__key__"], extra["__url__"], "more samples than index.json lists")
                yield self._batch(pending, 0, skips)
                return
            yield self._batch(pending, 0, skips)
            pending = []
            map_fn, batch_size, size = shape(emitted)
        if not recent:
            raise RuntimeError(
                f"rank {self.rank} worker {worker} read no usable sample from its {len(plan.shards)} shard(s) "
                f"{[shard.url for shard in plan.shards]} in epoch {self.epoch}; skipped: {dict(skips.total)}. "
                f"Check the data with: python -m data_pipeline.inspect URL --verify")
        repeats = list(recent)
        next_repeat = 0
        while emitted < plan.batches:
            num_padding = batch_size - len(pending)
            for _ in range(num_padding):
                pending.append(self._repeat(repeats, next_repeat, map_fn, size))
                next_repeat += 1
            emitted += 1
            yield self._batch(pending, num_padding, skips)
            pending = []
            if emitted < plan.batches:
                map_fn, batch_size, size = shape(emitted)

    @staticmethod
    def _repeat(repeats: list[tuple[dict | None, dict, int | None]], k: int, map_fn: Callable[[dict], dict],
                size: int | None) -> dict:
        """The k-th padding repeat for a batch at `size`: the item itself when it was mapped at that size, else its
        raw sample mapped again at that size (it mapped once, so it maps again; if not, the next repeat is tried)."""
        for offset in range(len(repeats)):
            sample, item, item_size = repeats[(k + offset) % len(repeats)]
            if item_size == size or sample is None:
                return item
            try:
                return map_fn(decode_sample(sample))
            except Exception:  # noqa: BLE001 - a random transform may fail where it once passed: take another
                continue
        raise RuntimeError(f"none of the {len(repeats)} samples kept for padding maps at {size} px")

    def _resampled_batches(self, worker: int, skips: SkipTracker) -> Iterator[dict[str, Any]]:
        shard_rng = random.Random(f"resampled-{self.seed}-{self.epoch}-{self.rank}-{worker}")
        # Raw samples allowed without one usable sample before the data is declared unusable: the shuffle buffer's
        # fill plus about three passes over the dataset. Shards that hold no sample at all are counted apart
        # (three consecutive rounds of empty draws), so tiny datasets with a large buffer are not misjudged.
        num_samples = sum(shard.samples for shard in self.shards)
        limit = self.shuffle_buffer + 3 * num_samples
        reads_since_usable = [0]

        def draws() -> Iterator[dict]:
            empty_draws = 0
            while True:
                shard = shard_rng.choice(self.shards)
                read_any = False
                for sample in self.reader.samples(shard, skips):
                    read_any = True
                    reads_since_usable[0] += 1
                    yield sample
                empty_draws = 0 if read_any else empty_draws + 1
                if reads_since_usable[0] > limit or empty_draws > 3 * len(self.shards):
                    raise RuntimeError(
                        f"rank {self.rank} worker {worker} found no usable sample in {reads_since_usable[0]} samples "
                        f"read from {len(self.shards)} shard(s) drawn with replacement; skipped: {dict(skips.total)}. "
                        f"Check the data with: python -m data_pipeline.inspect URL --verify")

        def usable() -> None:
            reads_since_usable[0] = 0

        raw = shuffled(draws(), self.shuffle_buffer, self._buffer_rng(worker))
        shape = self._shapes(worker)
        map_fn, batch_size, _ = shape(0)
        pending: list[dict] = []
        emitted = 0
        for _, item in self._mapped(raw, skips, lambda: map_fn, on_usable=usable):
            pending.append(item)
            if len(pending) == batch_size:
                yield self._batch(pending, 0, skips)
                pending = []
                emitted += 1
                map_fn, batch_size, _ = shape(emitted)


def _missing_member(error: Exception, raw: dict[str, Any]) -> str | None:
    """The missing_* reason when `error` is a map_fn's KeyError for a member the raw sample lacks, else None."""
    if not isinstance(error, KeyError) or not error.args:
        return None
    wanted = str(error.args[0])
    for name, reason in REQUIRABLE.items():
        present = (any(suffix in IMAGE_EXTENSIONS for suffix in raw) if name == "image" else name in raw)
        if not present and (wanted == name or f"'{name}'" in wanted):
            return reason
    return None


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a dead parent nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent exits. False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, worker_id: int | None = None) -> None:
    """Make this process (a DataLoader worker; the `worker_init_fn` BatchStream installs) end when its parent ends,
    SIGKILL of the parent included, so no worker is ever left orphaned, holding memory.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL). Elsewhere, or when prctl fails, a daemon thread checks every 0.5 s
    that the process's parent is still the one it started with. Either way, a parent that died before this ran
    (`parent_pid`, the process that started the workers, is gone) ends the process at once.
    """
    armed = _set_parent_death_signal()
    parent = os.getppid()
    if parent != parent_pid and not _pid_alive(parent_pid):
        os._exit(1)  # re-parented already: the training process died while this worker was starting
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="die-with-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def seed_global_rngs(text: str) -> None:
    """Seed torch, `random` and numpy from a string (hashed: different strings give unrelated streams)."""
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def _isolated_rngs(batches: Iterator[dict[str, Any]], seed: str) -> Iterator[dict[str, Any]]:
    """Run a reader in the training process with RNG states of its own: swapped in while a batch is made, swapped
    out before it is handed over (torch CPU, `random`, numpy; the map functions draw from these)."""
    def capture() -> tuple:
        return torch.get_rng_state(), random.getstate(), np.random.get_state()

    def restore(state: tuple) -> None:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])

    outer = capture()
    seed_global_rngs(seed)
    data = capture()
    restore(outer)
    while True:
        outer = capture()
        restore(data)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            data = capture()
            restore(outer)
        yield batch


class BatchStream:
    """What `build_stream` returns: iterate it for batches (dicts); call `set_epoch(e)` before each epoch.

    Attributes:
        skipped: Counter of skipped samples by reason, cumulative, updated as batches arrive.
        metadata: index.json "metadata" (or {}).
        num_samples: samples in the whole dataset (all ranks).
        index: the resolved DatasetIndex (shard URLs and counts).
    """

    def __init__(self, dataset: ShardBatchDataset, index: DatasetIndex, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int = 2) -> None:
        self._dataset = dataset
        self.index = index
        self.metadata: dict[str, Any] = index.metadata
        self.num_samples = index.num_samples
        self.skipped: Counter[str] = Counter()
        self._plan: EpochPlan | None = None
        # an explicit generator: creating an iterator must not draw from the training process's RNG (a resumed run
        # would otherwise continue with another random sequence than the uninterrupted one)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  prefetch_factor=prefetch_factor if num_workers > 0 else None,
                                  persistent_workers=False, generator=torch.Generator().manual_seed(dataset.seed))

    @property
    def mode(self) -> str:
        return self._dataset.mode

    @property
    def epoch(self) -> int:
        return self._dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard shuffle (identical on every rank) and sample-shuffle seeds."""
        if epoch != self._dataset.epoch:
            self._dataset.epoch = epoch
            self._plan = None

    @property
    def plan(self) -> EpochPlan | None:
        """The current epoch's plan (who reads which shards); None in resampled mode."""
        if self.mode != "epoch":
            return None
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = self._dataset.plan()
        return self._plan

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches every rank yields per epoch (the same on all ranks and in every epoch); None when resampled."""
        plan = self.plan
        return None if plan is None else plan.batches_per_epoch

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a resampled stream is infinite and has no length")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        expected = self.batches_per_epoch
        skipped_before = sum(self.skipped.values())
        count = 0
        # installed per iteration: the workers' parent is the process iterating (the stream may have been built in
        # another process)
        self._loader.worker_init_fn = functools.partial(die_with_parent, os.getpid())
        batches = iter(self._loader)
        try:
            for batch in batches:
                self.skipped.update(batch.pop(SKIPPED_KEY))
                count += 1
                yield batch
        finally:
            # Stop the workers now when the epoch ends early (an error, or the consumer stopped a resampled
            # stream): an error's traceback keeps the DataLoader iterator alive, and its eventual __del__ would
            # join the workers in whichever thread the garbage collector happens to run.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if expected is not None and count != expected:
            raise RuntimeError(f"rank {self._dataset.rank} yielded {count} batches in epoch {self.epoch} but the "
                               f"plan promised {expected}; other ranks would wait for the missing ones")
        newly_skipped = sum(self.skipped.values()) - skipped_before
        if newly_skipped:
            logger.warning("rank %d epoch %d: skipped %d sample(s); totals so far: %s",
                           self._dataset.rank, self.epoch, newly_skipped, dict(self.skipped))


def check_batch_size(index: DatasetIndex, plan: EpochPlan | None, batch_size: int, world_size: int,
                     num_workers: int) -> None:
    """Refuse a training batch made of repeats (the same on every rank, so all ranks fail alike); warn about heavy
    padding. `plan` is the epoch plan (None: resampled mode).

    Raises:
        ValueError: epoch mode, batch_size > the samples the rank with the fewest reads per epoch; resampled mode,
            batch_size > the dataset's samples. The message names the numbers and the fixes.
    """
    dataset = f"{index.num_samples} samples in {len(index.shards)} shard(s)"
    if plan is None:
        if batch_size > index.num_samples:
            raise ValueError(
                f"batch_size={batch_size} (data.batch_size) is larger than the whole dataset ({dataset}): every "
                f"batch would repeat samples. Fix: data.batch_size={index.num_samples} or less (engine.grad_accum "
                f"gives a larger effective batch), or a larger dataset")
        return
    rank = min(range(world_size), key=plan.rank_samples)
    per_rank = plan.rank_samples(rank)
    readers = readers_per_rank(num_workers)
    split = f"{dataset}, split over {world_size} rank(s) x {readers} worker(s)"
    if batch_size > per_rank:
        fewer_ranks = " or fewer ranks" if world_size > 1 else ""
        raise ValueError(
            f"batch_size={batch_size} (data.batch_size) is larger than the {per_rank} samples rank {rank} reads per "
            f"epoch ({split}): every batch would be mostly repeats of the same samples. Fix: data.batch_size="
            f"{per_rank} or less (engine.grad_accum gives a larger effective batch){fewer_ranks}, a larger dataset, "
            f"or data.mode=resampled with a dataset of at least {batch_size} samples")
    rank = max(range(world_size), key=plan.rank_padding)
    padding, samples = plan.rank_padding(rank), plan.rank_samples(rank)
    if padding > _PADDING_WARN_SHARE * samples:
        smallest = min(worker.samples for worker in plan.rank_workers(rank))
        logger.warning(
            "batch_size=%d: rank %d's %d batches per epoch hold %d repeats for %d samples (%.0f%%; %s, its smallest "
            "worker reads %d): a worker pads its last batch and a rank pads up to the busiest one. Fewer data."
            "num_workers, a smaller data.batch_size or more even shards reduce it",
            batch_size, rank, plan.batches_per_epoch, padding, samples, 100 * padding / samples, split, smallest)


def build_stream(url: str | Sequence[str], map_fn: Callable[[dict], dict], batch_size: int = 64, *,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2, mode: str = "epoch", train: bool = True,
                 seed: int = 0, shuffle_buffer: int = 1000, cache_dir: str | None = None,
                 collate_fn: Callable[[list], dict] | None = None, required: Sequence[str] = ("image",),
                 open_retries: int = 5, retry_backoff_s: float = 1.0, allow_pipe: bool = False,
                 pin_memory: bool | None = None, prefetch_factor: int = 2, multiscale: Sequence[int] = (),
                 multiscale_base: int = 0) -> BatchStream:
    """Build a rank's batch stream over a sharded dataset (see the module docstring for the data flow and policy).

    Args:
        url: folder with index.json | brace pattern ".../train-{000000..000127}.tar" | "a.tar,b.tar" | list of
            these | "embedded:NAME" (resolved by data_pipeline.embedded). Any fsspec URL.
        map_fn: picklable `(sample dict) -> dict` of tensors/numbers; may raise SkipSample("reason").
        batch_size: samples per batch on this rank.
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: DataLoader worker processes (0 = read in this process).
        mode: "epoch" (each sample once per epoch, equal batch counts on all ranks) or "resampled" (infinite).
        train: False = evaluation order (no shard or sample shuffling).
        seed: base of every shuffle; the same on all ranks.
        shuffle_buffer: raw samples each worker buffers for shuffling (ignored when train is False).
        cache_dir: read remote shards through fsspec `simplecache::` into this folder ("" or None: stream only).
        collate_fn: list of map_fn outputs -> dict; default torch's default_collate.
        required: members every sample needs ("image", "cls", "json", "txt"); a sample without one is skipped
            and counted as missing_image / missing_label / missing_json / missing_txt (jobs pass their task's
            `required_members`).
        open_retries, retry_backoff_s: attempts to open a URL and the first delay (doubling) between them.
        allow_pipe: accept `pipe:CMD` shard URLs (a shell command per shard; refused unless set).
        pin_memory: batches in page-locked memory for asynchronous copies to the GPU; None = when CUDA is present.
        prefetch_factor: batches each worker prepares ahead of the training loop (with num_workers > 0).
        multiscale: image sizes of a multi-scale training stream (see the module docstring); () = every batch of
            `batch_size` at the map function's own size. Needs `train=True` and a map function with `at_size`.
        multiscale_base: the size `batch_size` is stated at; 0 = the map function's `img_size`.

    Raises:
        ValueError: bad arguments; (epoch mode) fewer shards than world_size x max(1, num_workers); a batch size
            out of bounds (see the module docstring; checked for training streams, `train=True`, with the largest
            multi-scale batch); multi-scale sizes for an evaluation stream or a map function without `at_size`.
        DatasetInputError (a ValueError): a malformed index.json, a URL naming no shards, a missing local path
            (LocalPathError, also a ShardOpenError) -- inputs to fix, never retried.
        ShardOpenError: the index or a shard to count cannot be opened after retrying (shards opened later raise
            it in iteration).
    """
    if isinstance(url, str) and url.startswith("embedded:"):
        from data_pipeline import embedded  # lazily: builds the bundled dataset's shards on first use

        url = embedded.resolve(url)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    if batch_size > MAX_BATCH_SIZE:
        raise ValueError(f"batch_size={batch_size} (data.batch_size) is more than {MAX_BATCH_SIZE} samples per batch "
                         f"and rank, the most a stream accepts. Fix: data.batch_size is per rank: use a smaller one "
                         f"(more ranks or engine.grad_accum give a larger global batch)")
    for one in [url] if isinstance(url, str) else url:
        check_pipe(str(one), allow_pipe)
    scales = multiscale_of(map_fn, batch_size, multiscale, multiscale_base, train)
    reader = ShardReader(cache_dir=cache_dir or None, open_retries=open_retries, retry_backoff_s=retry_backoff_s,
                         required=tuple(required), allow_pipe=allow_pipe)
    index = load_index(url, reader)
    dataset = ShardBatchDataset(index.shards, reader=reader, map_fn=map_fn, collate_fn=collate_fn,
                                batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                                mode=mode, train=train, seed=seed, shuffle_buffer=shuffle_buffer, multiscale=scales)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    stream = BatchStream(dataset, index, num_workers, pin_memory=pin, prefetch_factor=prefetch_factor)
    plan = stream.plan  # epoch mode: raises now, on every rank, if the shards cannot be split
    if train:
        check_batch_size(index, plan, scales.largest_batch if scales else batch_size, world_size, num_workers)
    if scales:
        logger.info("stream %s: multi-scale batches (size x images, base %d px x %d): %s", index.url,
                    scales.base_size, batch_size, scales.describe())
    if plan is None:
        logger.info("stream %s: %d shards, %d samples; rank %d/%d resamples shards with replacement",
                    index.url, len(index.shards), index.num_samples, rank, world_size)
    else:
        logger.info("stream %s: %d shards, %d samples; rank %d/%d reads %d samples as %d batches of %s "
                    "(%d padding) per epoch", index.url, len(index.shards), index.num_samples, rank, world_size,
                    plan.rank_samples(rank), plan.batches_per_epoch, "several sizes" if scales else batch_size,
                    plan.rank_padding(rank))
    return stream


def multiscale_of(map_fn: Callable[[dict], dict], batch_size: int, sizes: Sequence[int], base: int,
                  train: bool) -> MultiScale | None:
    """The MultiScale of a stream (None when `sizes` is empty); ValueError, naming data.multiscale, when the stream
    cannot have one."""
    if not sizes:
        return None
    if not train:
        raise ValueError("multi-scale batches are for training streams; an evaluation stream keeps one size")
    if not callable(getattr(map_fn, "at_size", None)):
        raise ValueError(f"data.multiscale={list(sizes)}: this job's train transform ({type(map_fn).__name__}) "
                         "cannot take an image size per batch (it has no at_size method). "
                         "Fix: data.multiscale=[] for this job")
    base = base or getattr(map_fn, "img_size", 0)
    if not base:
        raise ValueError(f"data.multiscale={list(sizes)}: set data.multiscale_base, the image size data.batch_size "
                         "is stated at (the train transform names none)")
    return MultiScale(tuple(sizes), int(base), batch_size)
