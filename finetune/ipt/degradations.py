"""Synthetic degradations for IPT's restoration tasks, made from clean images on the fly.

IPT (Chen et al., "Pre-Trained Image Processing Transformer", CVPR 2021, arXiv 2012.00364) pretrains one body on
six tasks synthesised from clean ImageNet images: bicubic super-resolution x2/x3/x4, Gaussian denoising at sigma
30/50, and deraining with synthetic rain streaks (huawei-noah/Pretrained-IPT; mindspore-ai/models
research/cv/IPT, `--scale 2+3+4+1+1+1`). Every function here works on pixel values in 0..255 (float or uint8
tensors, [3, H, W] or [N, 3, H, W]) and returns float32 in 0..255.

- Denoising: `clamp(hr + N(0, sigma^2), 0, 255)` with sigma in 0..255 units, NOT quantised to 8 bits: IPT's
  training and test inputs are exactly this float tensor (finetune-anchors.md, C). The clamp makes the measured
  noise std smaller than sigma near black and white.
- Super-resolution: bicubic downsampling by an integer factor with antialiasing (the kernel stretched by the
  factor), quantised to uint8 as the benchmark LR images are (EDSR's `LR_bicubic/` PNGs). The reference
  pipelines use MATLAB's `imresize(hr, 1/s, 'bicubic')`; this uses torch's `F.interpolate(mode="bicubic",
  antialias=True)`, which is the same kernel (Keys' cubic, a = -0.5, support 4s taps for a 1/s reduction, the
  same half-pixel sample grid). The two differ only within ~2s pixels of the border, where MATLAB mirrors the
  image and torch renormalises the weights of the taps inside it (tests/test_ipt.py measures both against a
  NumPy re-implementation of MATLAB's imresize). Note that torch's non-antialiased bicubic (a = -0.75, no kernel
  stretching) aliases badly and is NOT what the SR literature uses.
- Deraining: IPT pretrains on synthetic streaks but does not publish its generator, so the model here is the
  common "noise -> motion blur" construction of Rain100L-style light rain (Yang et al. 2017; Fu et al. 2017):
  sparse seeds (density ~ U(RAIN_DENSITY)) with random brightness are convolved with an anti-aliased line
  kernel (one random length ~ U(RAIN_LENGTH) px and angle ~ U(RAIN_ANGLE) degrees from vertical per image,
  RAIN_WIDTH px wide), slightly blurred, scaled so the brightest streak adds ~ U(RAIN_INTENSITY) x 255, added to
  all three channels (rain is white), clamped and quantised to uint8 (Rain100L is stored as 8-bit images).
  Lengths are absolute pixels, so a streak has the same size in a training crop and in a whole test image.

`TASKS` names the six tasks; `degrade(hr, spec, generator)` applies one to a clean image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# Rain streak model (see the module docstring). Ranges are sampled uniformly per image.
RAIN_DENSITY = (0.004, 0.012)      # fraction of pixels seeding a streak
RAIN_LENGTH = (8.0, 20.0)          # streak length, pixels
RAIN_ANGLE = (-25.0, 25.0)         # degrees from vertical; one direction per image
RAIN_INTENSITY = (0.5, 0.85)       # brightest streak value added, as a fraction of 255
RAIN_WIDTH = 1.0                   # streak width, pixels (the line kernel's thickness)
RAIN_BLUR_SIGMA = 0.6              # Gaussian blur of the streak layer, pixels (soft edges)


@dataclass(frozen=True)
class TaskSpec:
    """One restoration task: its name (config and metric keys), kind and parameter."""

    name: str
    kind: Literal["denoise", "sr", "derain"]
    scale: int = 1          # output / input side (SR); 1 otherwise
    sigma: float = 0.0      # Gaussian noise std in 0..255 units (denoise)


# IPT's six pretraining tasks, in the paper's order (the MindSpore scripts' --scale 2+3+4+1+1+1 lists SR first;
# the order only fixes the index of each task's head, tail and embedding).
TASKS: dict[str, TaskSpec] = {
    "denoise30": TaskSpec("denoise30", "denoise", sigma=30.0),
    "denoise50": TaskSpec("denoise50", "denoise", sigma=50.0),
    "sr2": TaskSpec("sr2", "sr", scale=2),
    "sr3": TaskSpec("sr3", "sr", scale=3),
    "sr4": TaskSpec("sr4", "sr", scale=4),
    "derain": TaskSpec("derain", "derain"),
}


def parse_task(name: str) -> TaskSpec:
    """A task by name: one of TASKS, or `denoiseN` (sigma N) / `srN` (scale N) for other levels."""
    if name in TASKS:
        return TASKS[name]
    for prefix, kind in (("denoise", "denoise"), ("sr", "sr")):
        rest = name[len(prefix):]
        if name.startswith(prefix) and rest.isdigit() and int(rest) > 0:
            return TaskSpec(name, kind, scale=int(rest)) if kind == "sr" else TaskSpec(name, kind, sigma=float(rest))
    raise ValueError(f"unknown task {name!r}: one of {', '.join(TASKS)} (or denoiseN / srN for another level)")


def quantize(img: Tensor) -> Tensor:
    """Round to 8 bits: [.., H, W] values -> float32 integers in 0..255 (IPT's `utility.quantize`)."""
    return img.float().clamp(0, 255).round()


def modcrop(img: Tensor, scale: int) -> Tensor:
    """Crop the bottom/right rows and columns so H and W are multiples of `scale` (EDSR's benchmark handling):
    [.., H, W] -> [.., H - H % s, W - W % s]."""
    h, w = img.shape[-2:]
    return img[..., :h - h % scale, :w - w % scale]


def add_gaussian_noise(img: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """img: [.., H, W] in 0..255 -> clamp(img + N(0, sigma^2), 0, 255), float32, not quantised (IPT)."""
    img = img.float()
    noise = torch.randn(img.shape, generator=generator, device=img.device) * sigma
    return (img + noise).clamp_(0, 255)


def bicubic_downsample(img: Tensor, scale: int, quantise: bool = True) -> Tensor:
    """Antialiased bicubic downsampling by an integer factor: [.., 3, H, W] -> [.., 3, H/s, W/s] float32.

    H and W must be multiples of `scale` (`modcrop` first). Quantised to 8 bits unless `quantise` is False.
    """
    h, w = img.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"bicubic_downsample: {h}x{w} is not a multiple of the scale {scale} (modcrop first)")
    x = img.float()
    batched = x.unsqueeze(0) if x.dim() == 3 else x
    out = F.interpolate(batched, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    out = out[0] if x.dim() == 3 else out
    return quantize(out) if quantise else out


def bicubic_upsample(img: Tensor, scale: int) -> Tensor:
    """Bicubic upsampling (the SR baseline, as MATLAB's imresize(lr, s) up: no antialiasing needed when
    enlarging): [.., 3, h, w] -> [.., 3, s*h, s*w] float32 clamped to 0..255 and quantised."""
    x = img.float()
    batched = x.unsqueeze(0) if x.dim() == 3 else x
    h, w = x.shape[-2:]
    # antialias=True selects the a = -0.5 kernel (MATLAB's); when enlarging it applies no smoothing
    out = F.interpolate(batched, size=(h * scale, w * scale), mode="bicubic", antialias=True, align_corners=False)
    return quantize(out[0] if x.dim() == 3 else out)


def _uniform(lo_hi: tuple[float, float], generator: torch.Generator | None) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def line_kernel(length: float, angle_deg: float, width: float = RAIN_WIDTH) -> Tensor:
    """An anti-aliased straight line of `length` px at `angle_deg` from vertical, `width` px thick: [k, k] float32
    with k odd and the line centred; values in 0..1 (1 on the line's axis), not normalised."""
    k = int(math.ceil(length)) | 1
    c = k // 2
    ys, xs = torch.meshgrid(torch.arange(k, dtype=torch.float32) - c, torch.arange(k, dtype=torch.float32) - c,
                            indexing="ij")
    theta = math.radians(angle_deg)
    direction = (math.cos(theta), math.sin(theta))            # (dy, dx): down the streak
    along = ys * direction[0] + xs * direction[1]
    across = -ys * direction[1] + xs * direction[0]
    # distance to the segment, converted to coverage with a 1-px ramp (anti-aliasing)
    beyond = (along.abs() - length / 2).clamp(min=0)
    dist = torch.sqrt(across ** 2 + beyond ** 2)
    return (width / 2 + 0.5 - dist).clamp(0, 1)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """x: [N, 1, H, W] -> same, separable Gaussian blur (radius 3 sigma, reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def rain_layer(height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """One image's streak layer: [1, H, W] float32 in 0..255 (what `add_rain` adds to every channel)."""
    density = _uniform(RAIN_DENSITY, generator)
    length = _uniform(RAIN_LENGTH, generator)
    angle = _uniform(RAIN_ANGLE, generator)
    intensity = _uniform(RAIN_INTENSITY, generator)
    seeds = (torch.rand(height, width, generator=generator) < density).float()
    seeds = seeds * (0.5 + 0.5 * torch.rand(height, width, generator=generator))   # drops differ in brightness
    kernel = line_kernel(length, angle)
    k = kernel.shape[-1]
    # streaks may start outside the image: pad, convolve, crop (zero padding = no drops outside)
    layer = F.conv2d(seeds.view(1, 1, height, width), kernel.view(1, 1, k, k), padding=k // 2)
    layer = _gaussian_blur(layer, RAIN_BLUR_SIGMA)
    peak = layer.max()
    if peak > 0:
        layer = layer / peak * (intensity * 255.0)
    return layer[0]


def add_rain(img: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """img: [3, H, W] or [N, 3, H, W] in 0..255 -> the same with white rain streaks added, clamped, quantised
    (float32). Each image gets its own streak layer (density, length, angle, intensity)."""
    x = img.float()
    batched = x.unsqueeze(0) if x.dim() == 3 else x
    h, w = batched.shape[-2:]
    layers = torch.stack([rain_layer(h, w, generator) for _ in range(batched.shape[0])]).to(x.device)  # [N,1,H,W]
    out = quantize(batched + layers)
    return out[0] if x.dim() == 3 else out


def degrade(hr: Tensor, spec: TaskSpec, generator: torch.Generator | None = None) -> Tensor:
    """The task's degraded input for a clean image: hr [.., 3, H, W] in 0..255 (H, W multiples of the scale for
    SR) -> float32 [.., 3, H/s, W/s] in 0..255."""
    if spec.kind == "denoise":
        return add_gaussian_noise(hr, spec.sigma, generator)
    if spec.kind == "sr":
        return bicubic_downsample(hr, spec.scale)
    return add_rain(hr, generator)


def baseline(degraded: Tensor, spec: TaskSpec) -> Tensor:
    """What a restoration is compared against: the degraded input itself (noisy, rainy), or its bicubic
    enlargement to the target size (SR); float32 0..255, quantised to 8 bits."""
    if spec.kind == "sr":
        return bicubic_upsample(degraded, spec.scale)
    return quantize(degraded)
