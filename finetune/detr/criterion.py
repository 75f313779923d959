"""DETR's set criterion: losses between Hungarian-matched predictions and targets, on every decoder layer.

Adapted from facebookresearch/detr models/detr.py `SetCriterion` (Carion et al. 2020, arXiv 2005.12872, section 3.1
and appendix A.2):

- `loss_ce`: cross-entropy of every query against its matched target's class, unmatched queries against the
  no-object class (the last logit), whose weight is `eos_coef` (0.1) to offset the many unmatched queries.
- `loss_bbox`: L1 between matched normalised (cx, cy, w, h) boxes; `loss_giou`: 1 - GIoU of the same pairs
  (torchvision.ops). Both are summed and divided by the number of target boxes averaged over ranks (all-reduced,
  clamped >= 1), so every rank's gradient has the same scale whatever its share of boxes.
- `class_error` (100 - top-1 of the matched queries) and `cardinality_error` (|predicted objects - targets|) are
  logged, not trained.
- Auxiliary decoding losses: the same three losses for each intermediate decoder layer's outputs, each matched
  afresh, keys suffixed `_i` (layer i from 0). The total is the weighted sum (1 / 5 / 2) over all layers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from finetune.detr.matcher import HungarianMatcher, Match

# The terms of the total loss; every other key the criterion returns is logged only.
WEIGHTED = ("loss_ce", "loss_bbox", "loss_giou")


def num_boxes_across_ranks(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """The mean number of target boxes per rank (sum all-reduced over ranks / world size), at least 1. Collective
    when a process group is initialised."""
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return max(count.item() / world, 1.0)


class SetCriterion(nn.Module):
    """Matching + losses for DETR outputs (see the module docstring)."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, eos_coef: float = 0.1, loss_ce: float = 1.0,
                 loss_bbox: float = 5.0, loss_giou: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.weights = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @staticmethod
    def _query_index(matches: list[Match]) -> tuple[Tensor, Tensor]:
        """(image index, query index) of every matched query, concatenated over the batch."""
        batch = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        return batch, torch.cat([q for q, _ in matches])

    def layer_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], matches: list[Match],
                     num_boxes: float) -> dict[str, Tensor]:
        """Losses of one decoder layer. logits [B, Q, K + 1], boxes [B, Q, 4] normalised cxcywh."""
        logits, boxes = logits.float(), boxes.float()
        idx = self._query_index(matches)
        device = logits.device
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)]).to(device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        target_classes[idx] = matched_labels
        out = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes,
                                          self.empty_weight.to(device))}

        src_boxes = boxes[idx]                                                             # [M, 4]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches)]).to(device).float()
        out["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                                              box_convert(tgt_boxes, "cxcywh", "xyxy")))
        out["loss_giou"] = (1 - giou).sum() / num_boxes

        with torch.no_grad():
            if matched_labels.numel():
                correct = (logits[idx].argmax(-1) == matched_labels).float().mean()
                out["class_error"] = 100.0 - 100.0 * correct
            else:
                out["class_error"] = torch.zeros((), device=device)
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()          # [B]
            lengths = torch.tensor([float(len(t["labels"])) for t in targets], device=device)
            out["cardinality_error"] = F.l1_loss(predicted, lengths)
        return out

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: {"pred_logits": [B, Q, K + 1], "pred_boxes": [B, Q, 4], optional "aux_outputs": [{same}, ...]
        (intermediate decoder layers, first to second-to-last)}; targets: B dicts with "labels" int64 [T] (0..K-1)
        and "boxes" [T, 4] normalised cxcywh. Returns every loss term (aux ones suffixed _i). Collective when a
        process group is initialised (the box count)."""
        num_boxes = num_boxes_across_ranks(targets, outputs["pred_logits"].device)
        matches = self.matcher(outputs, targets)
        losses = self.layer_losses(outputs["pred_logits"], outputs["pred_boxes"], targets, matches, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_matches = self.matcher(aux, targets)
            layer = self.layer_losses(aux["pred_logits"], aux["pred_boxes"], targets, aux_matches, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in layer.items() if k in WEIGHTED})
        return losses

    def weight_of(self, key: str) -> float:
        """The weight of a loss key ("loss_giou", "loss_giou_3", ...); 0 for logged-only keys."""
        base, _, layer = key.rpartition("_")
        if key in self.weights:
            return self.weights[key]
        return self.weights.get(base, 0.0) if layer.isdigit() else 0.0

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the trained terms of every layer (the tensor to backpropagate)."""
        return sum(self.weight_of(k) * v for k, v in losses.items() if self.weight_of(k))
