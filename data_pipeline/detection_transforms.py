"""Box-aware augmentation for detection samples, and the collate that pads a batch of images with a mask.

DETR's data recipe (facebookresearch/detr datasets/coco.py `make_coco_transforms`, datasets/transforms.py,
util/misc.py `nested_tensor_from_tensor_list`) on torchvision's box-aware transforms (torchvision.transforms.v2 with
`tv_tensors.BoundingBoxes`: flips, resizes and crops move the boxes with the pixels):

    train: horizontal flip (0.5), then with probability 0.5 either
             a resize of the shorter side to one of `scales` (longer side capped at `max_size`), or
             a resize to one of `crop_resize`, a random crop of side in `crop_size` (DETR's RandomSizeCrop),
             then the multi-scale resize;
           boxes cut by the crop are clipped, those left without area dropped, crowd boxes left out (DETR trains
           without them).
    eval:  the shorter side resized to `size` (longer side capped at `max_size`); crowd boxes kept, flagged, for
           COCO evaluation.

A detection sample's json is the writer's (docs/ARCHITECTURE.md): `image_id`, `width`, `height`, `boxes` (COCO xywh in
pixels), `category_ids`, `iscrowd`, `area`, and for mask sets `segmentation` (COCO RLE per box, data_pipeline.masks).
The transforms give `{"image": [3, H, W] normalised float32, "target": {...}}` with target:

    boxes         float32 [N, 4]  (cx, cy, w, h) normalised by the transformed image's (W, H)  (DETR's targets)
    category_ids  int64 [N]       the dataset's category ids, as written (the task maps them to its classes)
    iscrowd       int64 [N]
    area          float32 [N]     box areas in original pixels (COCO's size buckets)
    orig_boxes    float32 [N, 4]  eval only: the json's xywh boxes in original pixels (COCO ground truth)
    image_id      int64 []
    orig_size     int64 [2]       (h, w) of the stored image
    size          int64 [2]       (h, w) after the transform, before padding
    masks         bool [N, H, W]  only when the json has `segmentation` (and `masks=True`): each box's instance
                                  mask at the transformed size, moved by the same flips, resizes and crops as the
                                  pixels (tv_tensors.Mask: nearest-neighbour resizes; SanitizeBoundingBoxes drops
                                  the masks of the boxes it drops); never empty: an object a downscale shrank
                                  below a pixel keeps the pixel at its box's centre

`PadCollate` stacks such samples into `{"image": [B, 3, H, W], "mask": [B, H, W] bool (True = padding),
"targets": [target, ...]}`, H and W the batch maxima rounded up to a multiple of `size_divisibility`.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from data_pipeline import masks as mask_rle
from data_pipeline.stream import SkipSample

__all__ = ["RandomSizeCrop", "DetectionTrainTransform", "DetectionEvalTransform", "PadCollate", "read_target",
           "mask_boxes"]

# DETR's COCO recipe (datasets/coco.py): the multi-scale shorter sides, the cap on the longer side, the resize
# before the random crop and the crop's side range.
DETR_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
DETR_MAX_SIZE = 1333
DETR_CROP_RESIZE = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)


def read_target(sample: dict[str, Any], masks: bool = True) -> tuple[Image.Image, dict[str, Any]]:
    """(RGB image, target with "boxes" as tv_tensors.BoundingBoxes in XYWH pixels) of a decoded detection sample;
    with `masks` and a json with `segmentation`, also "masks": tv_tensors.Mask [N, H, W] uint8 (one per box).

    Raises SkipSample("no_detection_json") for a sample without the writer's detection json, and
    SkipSample("corrupt_mask") for a segmentation that does not decode to one (H, W) mask per box.
    """
    meta = sample.get("json")
    if not isinstance(meta, dict) or "boxes" not in meta:
        raise SkipSample("no_detection_json", f"{sample.get('__key__', '?')} has no detection json")
    image = sample["image"] if sample["image"].mode == "RGB" else sample["image"].convert("RGB")
    w, h = image.size
    boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=(h, w)),
        "category_ids": torch.tensor(meta.get("category_ids", []), dtype=torch.int64).reshape(n),
        "iscrowd": torch.tensor(meta.get("iscrowd", [0] * n), dtype=torch.int64).reshape(n),
        "area": torch.tensor(meta.get("area", (boxes[:, 2] * boxes[:, 3]).tolist()), dtype=torch.float32).reshape(n),
        "image_id": torch.tensor(int(meta.get("image_id", -1)), dtype=torch.int64),
        "orig_size": torch.tensor([h, w], dtype=torch.int64),
    }
    if masks and "segmentation" in meta:
        rles = meta["segmentation"]
        try:
            if not isinstance(rles, list) or len(rles) != n:
                raise mask_rle.MaskError(f"{len(rles) if isinstance(rles, list) else 'no list of'} masks for {n} boxes")
            stack = mask_rle.decode_stack(rles, h, w)
        except mask_rle.MaskError as e:
            raise SkipSample("corrupt_mask", f"{sample.get('__key__', '?')}: {e}") from e
        target["masks"] = tv_tensors.Mask(torch.from_numpy(stack))
    return image, target


def _per_box(inputs: Any) -> tuple[torch.Tensor, ...]:
    """The per-box tensors SanitizeBoundingBoxes filters along with the boxes (inputs: (image, target))."""
    target = inputs[1]
    return tuple(target[k] for k in ("category_ids", "iscrowd", "area", "orig_boxes") if k in target)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] masks -> [N, 4] float32 COCO xywh of their pixels (x1 one past the last column); zeros if empty."""
    pixels = masks.as_subclass(torch.Tensor).bool()
    _, h, w = pixels.shape
    cols, rows = pixels.any(1), pixels.any(2)  # [N, W], [N, H]: which columns and rows the mask touches
    xs, ys = torch.arange(w), torch.arange(h)
    x0, x1 = torch.where(cols, xs, w).amin(1), torch.where(cols, xs + 1, 0).amax(1)
    y0, y1 = torch.where(rows, ys, h).amin(1), torch.where(rows, ys + 1, 0).amax(1)
    xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], 1).float()
    return torch.where(cols.any(1, keepdim=True), xywh, torch.zeros_like(xywh))


class RandomSizeCrop:
    """A random crop of width in [min_size, min(W, max_size)] and height in [min_size, min(H, max_size)], anywhere
    in the image (DETR's RandomSizeCrop); boxes cropped with the pixels (clipped to the window). With masks, a box
    the crop cuts becomes the box of what is left of its mask (within the clipped box), as detectron2's DatasetMapper
    does with `recompute_boxes`: the clipped box is loose around a cut object; one whose mask left the window is
    then empty and dropped. Boxes the crop does not cut are kept as they are."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        h, w = F.get_size(image)
        cw = random.randint(min(self.min_size, w), min(w, self.max_size))
        ch = random.randint(min(self.min_size, h), min(h, self.max_size))
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        target = dict(target)
        boxes = F.clamp_bounding_boxes(F.crop(target["boxes"], top, left, ch, cw))
        if "masks" in target:
            target["masks"] = F.crop(target["masks"], top, left, ch, cw)
            # a box the crop cut is loose around what is left of its object: its mask's box, within the clipped box
            moved = target["boxes"].as_subclass(torch.Tensor) - torch.tensor([left, top, 0.0, 0.0])
            cut = (boxes.as_subclass(torch.Tensor) != moved).any(1)
            if cut.any():
                clipped = box_convert(boxes.as_subclass(torch.Tensor)[cut], "xywh", "xyxy")
                tight = box_convert(mask_boxes(target["masks"][cut]), "xywh", "xyxy")
                low = torch.maximum(tight[:, :2], clipped[:, :2])
                high = torch.maximum(torch.minimum(tight[:, 2:], clipped[:, 2:]), low)  # mask gone: an empty box
                fixed = boxes.as_subclass(torch.Tensor).clone()
                fixed[cut] = box_convert(torch.cat([low, high], 1), "xyxy", "xywh")
                boxes = tv_tensors.wrap(fixed, like=boxes)
        target["boxes"] = boxes
        return F.crop(image, top, left, ch, cw), target


class _Normalised:
    """Shared tail of both transforms: clip and drop empty boxes (and their masks), boxes to normalised cxcywh,
    masks to bool, pixels normalised. `masks`: decode the json's segmentation (False: a box-only task skips the
    work)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], masks: bool = True) -> None:
        self.mean, self.std, self.masks = tuple(mean), tuple(std), masks
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, min_area=1.0, labels_getter=_per_box)

    def finish(self, image: Image.Image, target: dict[str, Any], sanitize: bool = True) -> dict[str, Any]:
        target["boxes"] = F.clamp_bounding_boxes(target["boxes"])
        if sanitize:
            image, target = self.sanitize(image, target)
        h, w = F.get_size(image)
        xyxy = box_convert(target["boxes"].as_subclass(torch.Tensor), "xywh", "xyxy")
        boxes = box_convert(xyxy, "xyxy", "cxcywh") / torch.tensor([w, h, w, h], dtype=torch.float32)
        target = {**target, "boxes": boxes.float(), "size": torch.tensor([h, w], dtype=torch.int64)}
        if "masks" in target:
            target["masks"] = masks = target["masks"].as_subclass(torch.Tensor).bool()
            empty = ~masks.flatten(1).any(1)
            if empty.any():  # an object under a pixel wide, lost by a downscale (nearest), keeps its centre pixel
                centre = (boxes[empty, :2] * torch.tensor([w, h])).long()
                masks[empty.nonzero()[:, 0], centre[:, 1].clamp(0, h - 1), centre[:, 0].clamp(0, w - 1)] = True
        pixels = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        return {"image": F.normalize(pixels, self.mean, self.std).contiguous(), "target": target}


class DetectionTrainTransform(_Normalised):
    """DETR's training augmentation (see the module docstring); picklable map_fn for the stream."""

    def __init__(self, scales: Sequence[int] = DETR_SCALES, max_size: int = DETR_MAX_SIZE,
                 crop_resize: Sequence[int] = DETR_CROP_RESIZE, crop_size: tuple[int, int] = DETR_CROP_SIZE,
                 hflip: float = 0.5, crop_prob: float = 0.5, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, masks: bool = True) -> None:
        super().__init__(mean, std, masks)
        multiscale = v2.RandomShortestSize(list(scales), max_size=max_size, antialias=True)
        steps: list[Any] = [v2.RandomHorizontalFlip(hflip)]
        if crop_prob > 0:
            cropped = v2.Compose([v2.RandomShortestSize(list(crop_resize), antialias=True),
                                  RandomSizeCrop(*crop_size), multiscale])
            steps.append(v2.RandomChoice([multiscale, cropped], p=[1 - crop_prob, crop_prob]))
        else:
            steps.append(multiscale)
        self.augment = v2.Compose(steps)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, target = read_target(sample, self.masks)
        keep = target["iscrowd"] == 0  # DETR trains without crowd regions
        target.update({k: target[k][keep] for k in ("category_ids", "iscrowd", "area")})
        for k in ("boxes", "masks"):
            if k in target:
                target[k] = tv_tensors.wrap(target[k][keep], like=target[k])
        image, target = self.augment(image, target)
        return self.finish(image, target)


class DetectionEvalTransform(_Normalised):
    """The shorter side resized to `size` (longer side capped at `max_size`); every box kept, with its original
    xywh in `orig_boxes` for the COCO ground truth. Picklable map_fn for the stream."""

    def __init__(self, size: int = 800, max_size: int = DETR_MAX_SIZE, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, masks: bool = True) -> None:
        super().__init__(mean, std, masks)
        self.resize = v2.Resize(size, max_size=max_size, antialias=True)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, target = read_target(sample, self.masks)
        target["orig_boxes"] = target["boxes"].as_subclass(torch.Tensor).clone()
        image, target = self.resize(image, target)
        return self.finish(image, target, sanitize=False)  # the ground truth stays whole (COCO scores all of it)


class PadCollate:
    """Detection samples -> {"image": [B, 3, H, W], "mask": [B, H, W] bool, "targets": [dict, ...]}.

    Images are zero-padded at the bottom and right to the batch's largest height and width, rounded up to a
    multiple of `size_divisibility` (the backbone's patch, or the coarsest feature stride); `mask` is True on the
    padding (DETR's NestedTensor convention). Picklable: it runs in the data-loader workers.
    """

    def __init__(self, size_divisibility: int = 1) -> None:
        self.size_divisibility = max(1, int(size_divisibility))

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        d = self.size_divisibility
        h = max(s["image"].shape[1] for s in samples)
        w = max(s["image"].shape[2] for s in samples)
        h, w = -(-h // d) * d, -(-w // d) * d
        images = torch.zeros(len(samples), 3, h, w, dtype=samples[0]["image"].dtype)
        mask = torch.ones(len(samples), h, w, dtype=torch.bool)
        for i, s in enumerate(samples):
            _, sh, sw = s["image"].shape
            images[i, :, :sh, :sw] = s["image"]
            mask[i, :sh, :sw] = False
        return {"image": images, "mask": mask, "targets": [s["target"] for s in samples]}
