"""The supervised-classification recipe that finetune.classification and pretrain.deit share (one copy, outside
both, since pretrain/ and finetune/ never import each other): Mixup/CutMix, the loss, top-k, the class-count check.

Each piece is timm's: `timm.data.Mixup` (batch mode, label smoothing inside the mixed soft targets),
`timm.loss.SoftTargetCrossEntropy` with mixing, `LabelSmoothingCrossEntropy` without, `BinaryCrossEntropy` for
DeiT III (targets binarised: target > 0, no smoothing), `timm.utils.accuracy` for top-1 / top-k.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import accuracy
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class SupervisedRecipe:
    """Mixup/CutMix and the loss of a classifier of `num_classes` classes.

    mixup / cutmix: the alphas (0 = off; both 0 or prob 0 = no mixing); loss: "ce" (soft-target cross-entropy of
    the mixed targets, label-smoothed cross-entropy without mixing, plain cross-entropy without either) or "bce"
    (DeiT III's binary cross-entropy on the binarised targets).
    """

    def __init__(self, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, loss: Literal["ce", "bce"] = "ce",
                 odd_batch_hint: str = "set data.batch_size even") -> None:
        mixing = (mixup > 0 or cutmix > 0) and mixup_prob > 0
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=switch_prob,
                           mode="batch", label_smoothing=label_smoothing, num_classes=num_classes) if mixing else None
        if loss == "bce":  # DeiT III: BCE-with-logits against target > 0 (its engine.py)
            self.criterion: nn.Module = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
        elif mixing:  # the smoothing is inside the mixed targets
            self.criterion = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.odd_batch_hint = odd_batch_hint
        self._odd_batch_warned = False

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [N, 3, H, W], labels [N] -> (images, labels, target): mixed images and [N, K] soft targets with
        mixing (the last sample of an odd batch dropped: timm mixes a batch with its reverse), else the inputs and
        target = labels."""
        if self.mixup is None:
            return images, labels, labels
        if images.shape[0] % 2:
            if not self._odd_batch_warned:
                logger.warning("Mixup/CutMix need an even batch: dropping the last image of odd batches (%s)",
                               self.odd_batch_hint)
                self._odd_batch_warned = True
            images, labels = images[:-1], labels[:-1]
        images, target = self.mixup(images, labels)
        return images, labels, target

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits [N, K], target [N] or [N, K] -> scalar (float32)."""
        return self.criterion(logits.float(), target)

    def train_metrics(self, logits: Tensor, labels: Tensor) -> dict[str, float]:
        """{"top1": %} of the batch; nothing with mixing (the labels are not the targets then)."""
        if self.mixup is not None:
            return {}
        return {"top1": float(accuracy(logits.float(), labels, topk=(1,))[0])}


def batch_sums(logits: Tensor, labels: Tensor, topk: int) -> Tensor:
    """logits [N, K], labels [N] -> [cross-entropy sum, top-1 correct, top-k correct, N] (float64), to all-reduce."""
    n = labels.numel()
    top1, topk_ = accuracy(logits, labels, topk=(1, topk))
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return torch.stack([loss.double(), (top1.double() * n / 100).round(), (topk_.double() * n / 100).round(),
                        torch.tensor(float(n), dtype=torch.float64, device=logits.device)])


def check_classes(metadata: dict[str, Any], num_classes: int, job: str) -> list[str] | None:
    """The train set's class names (index.json metadata) after checking them against the head: a classification
    set (or one that does not say) with `num_classes` classes; ValueError otherwise (the runtime: exit 2). None when
    the set names no classes."""
    kind = metadata.get("kind")
    if kind not in (None, "classification"):
        raise ValueError(f"a {kind} dataset; {job} needs classification shards (with a cls member)")
    classes = metadata.get("classes")
    if not classes:
        return None
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} classes in its index.json but model.num_classes={num_classes}; "
                         f"set model.num_classes={len(classes)}")
    return [str(c) for c in classes]
