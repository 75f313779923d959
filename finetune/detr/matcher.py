"""DETR's Hungarian matcher: a one-to-one assignment of predictions to ground-truth boxes per image.

Adapted from facebookresearch/detr models/matcher.py (Carion et al. 2020, arXiv 2005.12872, section 3.1): the cost of
giving query i the target j is

    C[i, j] = cost_class * (-p_i(c_j)) + cost_bbox * |b_i - b_j|_1 + cost_giou * (-GIoU(b_i, b_j))

with p_i the softmax over the query's classes (no-object included), boxes normalised (cx, cy, w, h) for the L1 term
and corners for the GIoU (torchvision.ops). The cheapest assignment is solved per image on the CPU with
`scipy.optimize.linear_sum_assignment`, without autograd. `-p` instead of the loss's `-log p` keeps the cost
bounded and the class term commensurate with the box terms (the paper's choice).
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

# Indices of (queries, targets) matched in one image, both int64 [K] with K = min(num_queries, num_targets).
Match = tuple[Tensor, Tensor]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one matching between queries and targets (DETR; costs 1 / 5 / 2 by default)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("the matcher's costs cannot all be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def cost_matrices(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """The cost matrix of each image (float32, CPU).

        Args:
            logits: [B, Q, K + 1] class logits (the last column is no-object).
            boxes: [B, Q, 4] predicted boxes, normalised (cx, cy, w, h).
            targets: B dicts with "labels" int64 [T_b] (0..K-1) and "boxes" [T_b, 4] normalised (cx, cy, w, h).
        Returns:
            B tensors [Q, T_b].
        """
        batch, queries = logits.shape[:2]
        prob = logits.flatten(0, 1).float().softmax(-1)      # [B*Q, K+1]
        out_boxes = boxes.flatten(0, 1).float()               # [B*Q, 4]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(prob.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(prob.device).float()
        cost = (self.cost_class * -prob[:, tgt_labels]
                + self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
                + self.cost_giou * -generalized_box_iou(box_convert(out_boxes, "cxcywh", "xyxy"),
                                                        box_convert(tgt_boxes, "cxcywh", "xyxy")))
        # a NaN/inf (a degenerate box) is matched last instead of crashing linear_sum_assignment
        big = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).view(batch, queries, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        return [c[i] for i, c in enumerate(cost.split(sizes, -1))]

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[Match]:
        """outputs: {"pred_logits": [B, Q, K + 1], "pred_boxes": [B, Q, 4]}; targets as in `cost_matrices`.

        Returns B pairs (query indices, target indices), int64 [min(Q, T_b)] each, query indices ascending; an image
        without targets gives two empty tensors.
        """
        matches = []
        for cost in self.cost_matrices(outputs["pred_logits"], outputs["pred_boxes"], targets):
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches
