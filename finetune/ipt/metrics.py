"""Restoration metrics and whole-image inference: PSNR / SSIM on RGB and on Y, tiled inference, x8 self-ensemble.

Conventions of the SR / denoising literature (IPT `utility.calc_psnr`; EDSR; SwinIR / BasicSR `calculate_psnr`,
`calculate_ssim`), all on images quantised to 8 bits (0..255, data range 255):

- Y channel: ITU-R BT.601 luma of the 0..255 RGB values, `Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`
  (the 16..235 "studio" range of MATLAB's rgb2ycbcr), kept as a float (not rounded), as IPT and BasicSR do.
  IPT's coefficients 65.738 / 129.057 / 25.064 over 256 are the same numbers (65.738 / 256 = 65.481 / 255 to
  1e-6). Y-PSNR is what IPT's tables report, for every task; RGB PSNR is what SwinIR and most denoising papers
  report, and the two differ by ~1.7 dB on CBSD68 at sigma 30 (IPT#48, SwinIR#1): every figure says which.
- Border shave: `shave` pixels removed on every side before either metric (the scale for SR, 0 otherwise).
- PSNR: `10 log10(255^2 / MSE)` per image over all pixels (and channels, for RGB); datasets average per image.
- SSIM: Wang et al. 2004 with an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
  covariances, averaged over the "valid" region the window fits in; RGB SSIM is the mean of the three channels'.
  Equal to skimage's `structural_similarity(data_range=255, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False[, channel_axis=0])` (tests/test_ipt.py checks both to 1e-4).

`tiled_forward` runs a fixed-size model over larger images; `self_ensemble` averages the 8 flips/rotations.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 255.0
# BT.601 luma for 0..255 RGB, studio range (MATLAB rgb2ycbcr): Y = 16 + (coefficients . RGB) / 255
Y_COEFFS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5            # skimage: int(truncate 3.5 * sigma 1.5 + 0.5) = 5 -> an 11 x 11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def rgb_to_y(img: Tensor) -> Tensor:
    """BT.601 luma: [.., 3, H, W] RGB in 0..255 -> [.., 1, H, W] float64 in 16..235."""
    c = torch.tensor(Y_COEFFS, dtype=torch.float64, device=img.device).view(3, 1, 1) / 255.0
    return (img.double() * c).sum(dim=-3, keepdim=True) + Y_OFFSET


def shave_border(img: Tensor, shave: int) -> Tensor:
    """[.., H, W] -> [.., H - 2 shave, W - 2 shave]."""
    return img[..., shave:img.shape[-2] - shave, shave:img.shape[-1] - shave] if shave > 0 else img


def psnr(pred: Tensor, target: Tensor, shave: int = 0, data_range: float = DATA_RANGE) -> Tensor:
    """Per-image PSNR in dB: pred, target [N, C, H, W] (or [C, H, W]) -> [N] (or scalar) float64.

    Identical images give +inf (as skimage's peak_signal_noise_ratio)."""
    p, t = shave_border(pred.double(), shave), shave_border(target.double(), shave)
    mse = ((p - t) ** 2).flatten(start_dim=-3).mean(dim=-1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(device: torch.device) -> Tensor:
    t = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (t / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _filter_valid(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter without padding: [M, 1, H, W] -> [M, 1, H - 2r, W - 2r]. skimage filters with
    reflected borders and then drops r pixels per side before averaging, which leaves exactly these values."""
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ssim(pred: Tensor, target: Tensor, shave: int = 0, data_range: float = DATA_RANGE) -> Tensor:
    """Per-image SSIM, the mean over channels: [N, C, H, W] (or [C, H, W]) -> [N] (or scalar) float64.

    Needs H, W >= 11 after the shave."""
    squeeze = pred.dim() == 3
    p, t = shave_border(pred.double(), shave), shave_border(target.double(), shave)
    if squeeze:
        p, t = p.unsqueeze(0), t.unsqueeze(0)
    n, c, h, w = p.shape
    if min(h, w) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs images of at least {2 * SSIM_RADIUS + 1} px per side, got {h}x{w}")
    g = _gaussian_window(p.device)
    x, y = p.reshape(n * c, 1, h, w), t.reshape(n * c, 1, h, w)
    stacked = _filter_valid(torch.cat([x, y, x * x, y * y, x * y]), g)
    ux, uy, uxx, uyy, uxy = stacked.split(n * c)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_image = s.reshape(n, c, -1).mean(dim=-1).mean(dim=-1)
    return per_image[0] if squeeze else per_image


def image_metrics(pred: Tensor, target: Tensor, shave: int) -> dict[str, Tensor]:
    """psnr_rgb, psnr_y, ssim_rgb, ssim_y per image: pred, target [N, 3, H, W] 0..255 (quantised) -> each [N]."""
    py, ty = rgb_to_y(pred), rgb_to_y(target)
    return {"psnr_rgb": psnr(pred, target, shave), "psnr_y": psnr(py, ty, shave),
            "ssim_rgb": ssim(pred, target, shave), "ssim_y": ssim(py, ty, shave)}


# --- inference over whole images ----------------------------------------------------------------------------------

def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size): every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _owned(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """The output span each tile keeps under blend="crop": from the middle of its overlap with the previous tile
    to the middle of its overlap with the next one, so every pixel is taken from the tile in which it lies
    farthest from a cut edge."""
    spans = []
    for i, s in enumerate(starts):
        lo = 0 if i == 0 else (s + starts[i - 1] + tile) // 2
        hi = size if i == len(starts) - 1 else (starts[i + 1] + s + tile) // 2
        spans.append((lo, hi))
    return spans


def tiled_forward(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: int = 1,
                  blend: Literal["crop", "average"] = "crop", max_batch: int = 64) -> Tensor:
    """Run a model that takes `tile` x `tile` inputs over a larger image: x [N, C, H, W] -> [N, C', sH, sW].

    Tiles start every `tile - overlap` pixels (the last one flush with the border); an image smaller than a tile
    is reflect-padded (replicate when too small to reflect) and the output cropped back. blend="crop" keeps from
    each tile only the part nearer its centre than its neighbours' (see `_owned`): a model whose output at a pixel
    depends only on inputs within `overlap // 2` pixels then gives exactly its whole-image result. "average"
    averages overlapping outputs (IPT's forward_chop). Tiles run in chunks of `max_batch`; the number of forward
    calls depends only on the shapes, so every rank of a ZeRO-3 job calls the model equally often for equal
    shapes.
    """
    if overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile {tile}")
    n, _, h, w = x.shape
    pad_h, pad_w = max(0, tile - h), max(0, tile - w)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    hp, wp = x.shape[-2:]
    stride = tile - overlap
    ys, xs = _starts(hp, tile, stride), _starts(wp, tile, stride)
    boxes = [(y, xx) for y in ys for xx in xs]
    tiles = torch.stack([x[:, :, y:y + tile, xx:xx + tile] for y, xx in boxes], dim=1)   # [N, T, C, tile, tile]
    flat = tiles.flatten(0, 1)
    outs = torch.cat([fn(flat[i:i + max_batch]) for i in range(0, flat.shape[0], max_batch)])
    outs = outs.view(n, len(boxes), *outs.shape[1:])                                      # [N, T, C', st, st]
    out = outs.new_zeros(n, outs.shape[2], hp * scale, wp * scale)
    if blend == "average":
        count = outs.new_zeros(1, 1, hp * scale, wp * scale)
        for i, (y, xx) in enumerate(boxes):
            out[:, :, y * scale:(y + tile) * scale, xx * scale:(xx + tile) * scale] += outs[:, i]
            count[:, :, y * scale:(y + tile) * scale, xx * scale:(xx + tile) * scale] += 1
        out = out / count
    elif blend == "crop":
        rows, cols = _owned(ys, tile, hp), _owned(xs, tile, wp)
        for i, (y, xx) in enumerate(boxes):
            (r0, r1), (c0, c1) = rows[ys.index(y)], cols[xs.index(xx)]
            out[:, :, r0 * scale:r1 * scale, c0 * scale:c1 * scale] = \
                outs[:, i, :, (r0 - y) * scale:(r1 - y) * scale, (c0 - xx) * scale:(c1 - xx) * scale]
    else:
        raise ValueError(f"blend={blend!r}: 'crop' or 'average'")
    return out[:, :, :h * scale, :w * scale]


# the 8 symmetries of the square: (transpose, flip rows, flip columns)
_DIHEDRAL = [(t, fr, fc) for t in (False, True) for fr in (False, True) for fc in (False, True)]


def _apply(x: Tensor, t: bool, fr: bool, fc: bool) -> Tensor:
    if t:
        x = x.transpose(-2, -1)
    if fr:
        x = x.flip(-2)
    if fc:
        x = x.flip(-1)
    return x


def _invert(x: Tensor, t: bool, fr: bool, fc: bool) -> Tensor:
    if fc:
        x = x.flip(-1)
    if fr:
        x = x.flip(-2)
    if t:
        x = x.transpose(-2, -1)
    return x


def self_ensemble(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """x8 geometric self-ensemble (EDSR, IPT `forward_x8`): the mean of fn over the 8 flips/transposes of x, each
    output mapped back. x: [N, C, H, W] -> fn's output shape."""
    total = None
    for t, fr, fc in _DIHEDRAL:
        y = _invert(fn(_apply(x, t, fr, fc)), t, fr, fc)
        total = y if total is None else total + y
    return total / len(_DIHEDRAL)

