"""Multi-scale training batches: every batch at one of several image sizes, the batch size scaled so that each batch
holds about the same number of pixels (`data.multiscale`).

MobileViT's variable-batch sampler (Mehta & Rastegari 2021, arXiv 2110.02178; apple/ml-cvnets
data/sampler/variable_batch_sampler.py and data/sampler/utils.py `image_batch_pairs`): for a base size S and base
batch B, a batch at size s holds int(B * S^2 / s^2) images (cvnets' rounding), at least 1. MobileViT's recipe:
S = 256, B = 128 per GPU, sizes linspace(160, 320, 5) plus S, made divisible by 32 (cvnets' `make_divisible`):
160, 192, 256, 288, 320 -> batches of 327, 227, 128, 101 and 81 images.

What differs from cvnets, and why:
- The sizes are chosen in the data workers, from a schedule that is a function of (seed, epoch, worker, batch
  index) alone, never of the training process's RNG; so a resumed run re-reads exactly the sizes and batches of the
  uninterrupted one (data_pipeline.stream's reproducibility rule), and every rank draws the same schedule, so the
  ranks run the same size at the same step (cvnets seeds Python's `random` with the epoch on every rank for the same
  reason).
- Each worker goes through its batches in cycles: within every cycle of len(sizes) batches each size comes once, in
  an order shuffled per (seed, epoch, worker, cycle). cvnets draws each batch's size independently; the cycles keep
  every size equally frequent and, above all, make the number of batches an epoch needs a function of the sample
  count alone (`batches_for`), which the epoch plan needs (every rank must yield the same number of batches in every
  epoch).
- With an even base batch, each scaled batch is rounded down to an even count: Mixup/CutMix pair image i with image
  B-1-i and need an even batch, as do DeiT's repeated views (cvnets' MobileViT recipe mixes nothing; the difference
  is at most one image per batch).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = ["MultiScale", "check_sizes", "cvnets_sizes"]

# cvnets' MobileViT recipe: sizes between 160 and 320 px in 5 scales, divisible by 32, around a base of 256
CVNETS_SIZES = (160, 192, 256, 288, 320)


def cvnets_sizes(base: int = 256, low: int = 160, high: int = 320, scales: int = 5,
                 divisor: int = 32) -> tuple[int, ...]:
    """cvnets' `create_intervallic_integer_list`: linspace(low, high, scales) plus the base size, each made
    divisible by `divisor` (MobileNet's `make_divisible`: round to the nearest multiple, never below 90%), without
    repeats. cvnets_sizes() == (160, 192, 256, 288, 320)."""
    def make_divisible(v: float) -> int:
        out = max(divisor, int(v + divisor / 2) // divisor * divisor)
        return out + divisor if out < 0.9 * v else out

    step = (high - low) / max(1, scales - 1)
    values = {low + i * step for i in range(scales)} | {float(base)}
    return tuple(sorted({make_divisible(v) for v in values}))


@dataclass(frozen=True)
class MultiScale:
    """The sizes, their batch sizes and each worker's schedule of a multi-scale training stream.

    Attributes:
        sizes: square image sides, px, each drawn equally often.
        base_size: the side at which a batch holds `base_batch` images (MobileViT: 256).
        base_batch: images per batch at `base_size` (data.batch_size).
    """

    sizes: tuple[int, ...]
    base_size: int
    base_batch: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if not self.sizes or min(self.sizes) < 1 or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"data.multiscale={list(self.sizes)}: give distinct image sizes >= 1 px")
        if self.base_size < 1 or self.base_batch < 1:
            raise ValueError(f"multi-scale base size {self.base_size} and base batch {self.base_batch} must be >= 1")

    def batch_size(self, size: int) -> int:
        """Images per batch at `size`: cvnets' int(round(B * S^2 / s^2, 2)), at least 1; even when B is even."""
        count = max(1, int(round(self.base_batch * self.base_size ** 2 / size ** 2, 2)))
        if self.base_batch % 2 == 0 and count % 2:
            count = max(2, count - 1)
        return count

    @cached_property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch size of each of `sizes`, in the same order."""
        return tuple(self.batch_size(s) for s in self.sizes)

    @property
    def largest_batch(self) -> int:
        return max(self.batch_sizes)

    def cycle(self, seed: int, epoch: int, worker: int, index: int) -> list[int]:
        """The sizes of one cycle (len(sizes) consecutive batches) of a worker: each size once, shuffled by
        (seed, epoch, worker, cycle index). Independent of the rank: every rank runs the same size at a step."""
        order = list(self.sizes)
        digest = hashlib.sha256(f"multiscale-{seed}-{epoch}-{worker}-{index}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
        return order

    def schedule(self, seed: int, epoch: int, worker: int, count: int) -> list[int]:
        """The sizes of a worker's first `count` batches of an epoch."""
        n = len(self.sizes)
        out: list[int] = []
        for index in range(-(-count // n)):
            out += self.cycle(seed, epoch, worker, index)
        return out[:count]

    def capacity(self, seed: int, epoch: int, worker: int, count: int) -> int:
        """Images in a worker's first `count` batches of an epoch (its samples plus its padding)."""
        per_size = dict(zip(self.sizes, self.batch_sizes))
        return sum(per_size[s] for s in self.schedule(seed, epoch, worker, count))

    def batches_for(self, samples: int) -> int:
        """The fewest batches that hold `samples` images whatever the order inside each cycle: whole cycles, then as
        many batches as the smallest ones need to hold the rest. The same in every epoch."""
        if samples <= 0:
            return 0
        per_cycle = sum(self.batch_sizes)
        full, rest = divmod(samples, per_cycle)
        count = full * len(self.sizes)
        for small in sorted(self.batch_sizes):
            if rest <= 0:
                break
            rest -= small
            count += 1
        return count

    def describe(self) -> str:
        return ", ".join(f"{s} px x {b}" for s, b in zip(self.sizes, self.batch_sizes))


def check_sizes(transform: Any, sizes: Sequence[int]) -> None:
    """For a task's `on_multiscale`: a train transform whose `at_size` checks the job's geometry (whole patches, mask
    squares, windows) builds one for every size; ValueError naming the first size it refuses."""
    for size in sizes:
        try:
            transform.at_size(size)
        except ValueError as e:
            raise ValueError(f"{size} px: {e}") from None
