"""SAM's training signal: simulated prompts and the loss.

Prompts (SAM paper §3 and App. A, "Training algorithm"): the first prompt of a mask is a point drawn uniformly from
the ground-truth mask or its box with noise (std 10% of the side, at most 20 px, scaled here to the input size:
20 px of 1024); every next point is drawn uniformly from the error region of the previous prediction, positive
where the model missed the object (false negative), negative where it spilled over (false positive); the previous
round's low-res mask logits are the next round's mask prompt. Evaluation places points deterministically, the
protocol of interactive segmentation (RITM; SAM's evaluation): the pixel of the region farthest from its
boundary (Euclidean distance transform), the first in the object, each next one in the larger error region.

Loss (SAM App. A; sam2 training/loss_fns.py): focal (alpha 0.25, gamma 2) and dice on the mask logits at the input
resolution, weighted 20 : 1, plus the MSE between the predicted IoU and the IoU of the thresholded mask with the
ground truth; with several outputs (multimask), the gradient goes only through the output of the lowest focal + dice
loss.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

# the paper's box noise cap, in pixels of its 1024-px input
BOX_NOISE_MAX_AT_1024 = 20.0


def sample_points(region: Tensor) -> Tensor:
    """region [P, H, W] bool -> one pixel per row drawn uniformly from it, coords [P, 2] (x, y) in pixels (an empty
    row gives the image centre; callers pass non-empty regions)."""
    p, h, w = region.shape
    weights = region.reshape(p, -1).float()
    empty = weights.sum(1) == 0
    weights[empty] = 1.0
    flat = torch.multinomial(weights, 1).squeeze(1)
    coords = torch.stack([flat % w, flat // w], dim=1).float()
    coords[empty] = torch.tensor([w / 2, h / 2], device=region.device)
    return coords


def noisy_boxes(boxes: Tensor, img_size: int, noise: float = 0.1) -> Tensor:
    """boxes [P, 4] xyxy pixels -> each corner moved by N(0, noise x side), at most 20 px of 1024 (scaled to
    img_size), clipped to the image."""
    if noise <= 0:
        return boxes
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).repeat(1, 2)
    cap = BOX_NOISE_MAX_AT_1024 * img_size / 1024
    jitter = (torch.randn_like(boxes) * side * noise).clamp(-cap, cap)
    return (boxes + jitter).clamp(0, img_size)


def error_points(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """pred, gt [P, H, W] bool -> (coords [P, 2], labels [P]): a pixel drawn uniformly from the error region,
    positive (1) on a false negative, negative (0) on a false positive; a perfect prediction gets a positive point
    inside the object."""
    error = pred ^ gt
    perfect = ~error.flatten(1).any(1)
    region = torch.where(perfect[:, None, None], gt, error)
    coords = sample_points(region)
    x, y = coords[:, 0].long(), coords[:, 1].long()
    labels = gt[torch.arange(len(gt), device=gt.device), y, x].long()
    return coords, labels


def _farthest(mask: np.ndarray) -> tuple[float, int, int]:
    """(distance, y, x) of mask's pixel farthest from its boundary (image borders count as boundary)."""
    if not mask.any():
        return 0.0, mask.shape[0] // 2, mask.shape[1] // 2
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return float(dist[y, x]), int(y), int(x)


def center_points(region: Tensor) -> Tensor:
    """region [P, H, W] bool -> coords [P, 2] (x, y): each row's pixel farthest from its boundary."""
    out = [_farthest(m)[1:][::-1] for m in region.cpu().numpy()]
    return torch.tensor(out, dtype=torch.float32, device=region.device).reshape(-1, 2)


def corrective_points(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """The evaluation's next click: pred, gt [P, H, W] bool -> (coords [P, 2], labels [P]) at the centre of the
    larger error (false negatives -> positive, false positives -> negative)."""
    coords, labels = [], []
    for p, g in zip(pred.cpu().numpy(), gt.cpu().numpy()):
        fn, fp = _farthest(g & ~p), _farthest(p & ~g)
        (_, y, x), label = (fn, 1) if fn[0] >= fp[0] else (fp, 0)
        coords.append((x, y))
        labels.append(label)
    return (torch.tensor(coords, dtype=torch.float32, device=pred.device).reshape(-1, 2),
            torch.tensor(labels, dtype=torch.int64, device=pred.device))


def mask_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """pred [P, M, H, W] bool, gt [P, H, W] bool -> IoU [P, M] (1 where both are empty)."""
    gt = gt[:, None]
    inter = (pred & gt).flatten(2).sum(-1).float()
    union = (pred | gt).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def dice_loss(logits: Tensor, gt: Tensor) -> Tensor:
    """logits [P, M, H, W], gt [P, H, W] -> 1 - soft dice per output [P, M] (smoothing 1, as sam2)."""
    prob = logits.sigmoid().flatten(2)
    target = gt[:, None].float().flatten(2)
    return 1 - (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)


def focal_loss(logits: Tensor, gt: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """logits [P, M, H, W], gt [P, H, W] -> sigmoid focal loss per output [P, M], the mean over pixels."""
    target = gt[:, None].expand_as(logits).to(logits.dtype)
    return sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none").flatten(2).mean(-1)


def sam_loss(logits: Tensor, iou_pred: Tensor, gt: Tensor, focal_weight: float = 20.0, dice_weight: float = 1.0,
             iou_weight: float = 1.0, supervise_all_iou: bool = True, alpha: float = 0.25,
             gamma: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """logits [P, M, H, W] (input resolution), iou_pred [P, M], gt [P, H, W] bool -> (loss averaged over the P
    masks, its terms). The mask terms of the output with the lowest focal + dice loss only (M > 1: multimask); the
    IoU MSE of every output (`supervise_all_iou`, so all three outputs' scores rank them at inference) or of that
    output alone (sam2's default)."""
    focal = focal_loss(logits.float(), gt, alpha, gamma)
    dice = dice_loss(logits.float(), gt)
    combined = focal_weight * focal + dice_weight * dice                       # [P, M]
    best = combined.argmin(1)                                                  # [P]
    rows = torch.arange(len(best), device=best.device)
    with torch.no_grad():
        actual = mask_iou(logits > 0, gt)                                       # [P, M]
    iou_mse = (iou_pred.float() - actual) ** 2
    iou_term = iou_mse.mean(1) if supervise_all_iou else iou_mse[rows, best]
    loss = (combined[rows, best] + iou_weight * iou_term).mean()
    return loss, {"focal": focal[rows, best].mean().detach(), "dice": dice[rows, best].mean().detach(),
                  "iou_mse": iou_term.mean().detach(), "iou": actual[rows, best].mean()}
