"""COCO box mAP of DETR predictions with pycocotools, over the images of every rank.

Adapted from facebookresearch/detr models/detr.py `PostProcess` and datasets/coco_eval.py: each query's best real
class (softmax, no-object column dropped) and its box scaled to the image's original size as absolute corners;
predictions and the ground truth (the val shards' own json boxes, crowd flags and areas, at the stored image size)
of every rank are gathered to rank 0 (`torch.distributed.all_gather_object`), scored by pycocotools' `COCOeval`
(iouType "bbox", maxDets 100) and the numbers broadcast, so every rank returns the same dict.

Results (fractions in [0, 1], pycocotools' -1 where the ground truth has no box of a size range):
map (AP at IoU .50:.95), map50, map75, map_small, map_medium, map_large, mar100 (AR with 100 detections); and for
each category with a (non-crowd) ground-truth box, `ap_per_class/<name>` (AP at IoU .50:.95) and
`ap50_per_class/<name>`, read from COCOeval's precision table as its own summarize reads the whole (area all,
100 detections, entries of -1 left out); a category without detections scores 0, one absent from the ground truth
is not reported. <name> is the category's name made a single TensorBoard tag component (`tag_names`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import box_convert

logger = logging.getLogger(__name__)

# COCOeval.stats indices of the reported numbers.
STAT_KEYS = {"map": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "map_large": 5, "mar100": 8}
MAX_DETECTIONS = 100   # COCO's maxDets: detections per image that count
# the per-category keys: <prefix>/<name>, logged by the runtime as val/<prefix>/<name>
AP_PER_CLASS, AP50_PER_CLASS = "ap_per_class", "ap50_per_class"


def tag_names(categories: Sequence[dict]) -> dict[int, str]:
    """category id -> its name as one TensorBoard tag component: every run of characters other than letters, digits,
    '_', '-' and '.' becomes '_' (a space or a slash would split or mangle the tag); a name that comes out empty or
    equal to an earlier one gets the id ("a b" and "a/b": a_b, a_b_7)."""
    out: dict[int, str] = {}
    for c in sorted(categories, key=lambda c: int(c["id"])):
        cid = int(c["id"])
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(c.get("name", cid))).strip("_") or str(cid)
        if tag in out.values():
            tag = f"{tag}_{cid}"
        out[cid] = tag
    return out


@torch.no_grad()
def post_process(logits: Tensor, boxes: Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
    """DETR's PostProcess: logits [B, Q, K + 1], boxes [B, Q, 4] normalised cxcywh, orig_sizes [B, 2] (h, w) ->
    B dicts with "scores" [Q], "labels" [Q] (0..K-1), "boxes" [Q, 4] absolute xyxy in original pixels."""
    prob = logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    h, w = orig_sizes.float().unbind(1)
    scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * scale
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


class CocoEvaluator:
    """Collects predictions and ground truth batch by batch, then scores them with pycocotools across ranks.

    `category_ids[i]` is the dataset's category id of class index i (a contiguous mapping), or None when the
    class index is the category id itself (DETR's num_classes = max id + 1).
    """

    def __init__(self, category_ids: Sequence[int] | None = None, categories: Sequence[dict] | None = None) -> None:
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.categories = [dict(c) for c in categories or []]
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []

    def _category(self, label: int) -> int:
        return self.category_ids[label] if self.category_ids is not None else label

    def add_ground_truth(self, target: dict[str, Tensor]) -> None:
        """One image's target from DetectionEvalTransform: image_id, orig_size, orig_boxes (xywh), category_ids,
        iscrowd, area."""
        image_id = int(target["image_id"])
        h, w = (int(v) for v in target["orig_size"])
        self.images.append({"id": image_id, "height": h, "width": w})
        for box, cat, crowd, area in zip(target["orig_boxes"].tolist(), target["category_ids"].tolist(),
                                         target["iscrowd"].tolist(), target["area"].tolist()):
            self.annotations.append({"image_id": image_id, "bbox": box, "category_id": int(cat),
                                     "iscrowd": int(crowd), "area": float(area)})

    def add_predictions(self, image_id: int, result: dict[str, Tensor]) -> None:
        """One image's post-processed predictions (scores, labels, xyxy boxes in original pixels); the
        MAX_DETECTIONS best count."""
        order = result["scores"].argsort(descending=True)[:MAX_DETECTIONS]
        xywh = box_convert(result["boxes"][order], "xyxy", "xywh").tolist()
        for box, score, label in zip(xywh, result["scores"][order].tolist(), result["labels"][order].tolist()):
            self.detections.append({"image_id": image_id, "bbox": box, "score": score,
                                    "category_id": self._category(int(label))})

    def summarize(self) -> dict[str, float]:
        """Gather every rank's images, ground truth and detections; COCOeval on rank 0; the same stats on every
        rank. Collective when a process group is initialised."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        parts = [(self.images, self.annotations, self.detections)]
        if distributed:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.images, self.annotations, self.detections))
        stats: list[dict[str, float] | None] = [None]
        if not distributed or dist.get_rank() == 0:
            images = {im["id"]: im for p in parts for im in p[0]}  # an image seen by two ranks counts once
            seen: set[int] = set()
            annotations, detections = [], []
            for p in parts:
                ids = {im["id"] for im in p[0]} - seen
                annotations += [a for a in p[1] if a["image_id"] in ids]
                detections += [d for d in p[2] if d["image_id"] in ids]
                seen |= ids
            stats[0] = coco_map(list(images.values()), annotations, detections, self.categories)
        if distributed:
            dist.broadcast_object_list(stats, src=0)
        return stats[0]


def coco_map(images: list[dict], annotations: list[dict], detections: list[dict],
             categories: Sequence[dict] = ()) -> dict[str, float]:
    """pycocotools COCOeval (bbox) of `detections` against `annotations` on `images` -> {STAT_KEYS: value,
    "ap_per_class/<name>": AP, "ap50_per_class/<name>": AP50 for each category with ground truth}; also logs one
    line with the per-class AP50.

    Categories missing from `categories` are added from the ids seen (named by their id). No detections at all
    score 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = {int(c["id"]): dict(c) for c in categories}
    for ann in annotations + detections:
        cats.setdefault(int(ann["category_id"]), {"id": int(ann["category_id"]), "name": str(ann["category_id"])})
    gt_anns = [{**a, "id": i + 1} for i, a in enumerate(annotations)]
    if not images or not detections:
        # pycocotools cannot load an empty result list; every category with ground truth scores 0
        with_gt = sorted({int(a["category_id"]) for a in annotations if not a.get("iscrowd")})
        per_class = {cid: (0.0, 0.0) for cid in with_gt}
        stats = {k: 0.0 for k in STAT_KEYS}
    else:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # pycocotools reports with print()
            gt = COCO()
            gt.dataset = {"images": images, "annotations": gt_anns, "categories": list(cats.values())}
            gt.createIndex()
            dt = gt.loadRes(detections)
            evaluator = COCOeval(gt, dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        logger.info("COCO bbox evaluation: %d images, %d boxes, %d detections\n%s", len(images), len(gt_anns),
                    len(detections), "\n".join(line for line in out.getvalue().splitlines()
                                                if line.startswith(" Average")))
        stats = {k: float(evaluator.stats[i]) for k, i in STAT_KEYS.items()}
        per_class = ap_per_category(evaluator)
    names = tag_names(list(cats.values()))
    if per_class:
        logger.info("AP50 per class: %s", "  ".join(f"{cats[c].get('name', c)} {ap50:.3f}"
                                                     for c, (_, ap50) in per_class.items()))
    for cid, (ap, ap50) in per_class.items():
        stats[f"{AP_PER_CLASS}/{names[cid]}"] = ap
        stats[f"{AP50_PER_CLASS}/{names[cid]}"] = ap50
    return stats


def ap_per_category(evaluator: Any) -> dict[int, tuple[float, float]]:
    """category id -> (AP at IoU .50:.95, AP50) from an accumulated COCOeval, for the categories it scored.

    eval["precision"] is [T IoU thresholds, R recall thresholds, K categories (params.catIds), A area ranges,
    M maxDets], -1 where a category has no ground truth (pycocotools' accumulate); as COCOeval.summarize: area
    "all", maxDets 100, the mean over the entries that are not -1.
    """
    params = evaluator.params
    precision = evaluator.eval["precision"]
    area = params.areaRngLbl.index("all")
    max_dets = list(params.maxDets).index(MAX_DETECTIONS)
    iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    out = {}
    for k, cid in enumerate(params.catIds):
        p = precision[:, :, k, area, max_dets]
        if not (p > -1).any():   # no ground-truth box of this category (or only crowd ones)
            continue
        p50 = p[iou50]
        out[int(cid)] = (float(p[p > -1].mean()), float(p50[p50 > -1].mean()) if (p50 > -1).any() else 0.0)
    return out
