"""Augmentations: picklable callables mapping a decoded sample dict to a dict of tensors.

The stream hands each ``map_fn`` ``{"__key__", "__url__", "image": PIL.Image (RGB), "cls"?: int, "json"?: dict}``
(docs/ARCHITECTURE.md); these transforms return what the tasks batch: ``{"image": [3, H, W] float}`` plus
``"label"`` (int64 scalar) or ``"tokenizer_image"`` where the task needs them. The image operations are
torchvision's and timm's; only the glue (dict in, dict out, one crop shared by two views) is written here.

Recipes:
    MAE (He et al. 2021, facebookresearch/mae ``main_pretrain.py``): RandomResizedCrop(scale 0.2-1, bicubic),
        horizontal flip, normalise. SimMIM (Xie et al. 2021, microsoft/SimMIM ``data/data_simmim.py``): the same
        with scale 0.67-1 and bilinear resizing.
    BEiT (Bao et al. 2021, microsoft/unilm ``beit/datasets.py`` DataAugmentationForBEiT): colour jitter 0.4,
        flip, one RandomResizedCrop box resized twice: bicubic for the ViT, lanczos for the tokenizer.
    DeiT / finetuning (Touvron et al. 2021): timm's ``create_transform`` with RandAugment rand-m9-mstd0.5-inc1,
        random erasing 0.25 (pixel mode), bicubic.
    DeiT III (Touvron et al. 2022, arXiv 2204.07118; facebookresearch/deit ``augment.py``): 3-Augment,
        RandomResizedCrop (or Simple Random Crop) + flip, then one of grayscale / solarize / Gaussian blur, colour
        jitter 0.3, normalise.
    Repeated augmentation (Hoffer et al. 2020 "batch augmentation"; DeiT's RASampler): ``RepeatedViews`` returns k
        independent views of a sample, ``flatten_views`` (a collate function) lays them out as k images per sample.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import random

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

__all__ = [
    "MAETrainTransform",
    "EvalTransform",
    "BEiTTwoViewTransform",
    "ClassificationTrainTransform",
    "ClassificationEvalTransform",
    "ThreeAugmentTransform",
    "RepeatedViews",
    "flatten_views",
]


def _rgb(image: Image.Image) -> Image.Image:
    # the stream already converts to RGB; this keeps the transforms usable on raw PIL images too
    return image if image.mode == "RGB" else image.convert("RGB")


def _label(sample: dict[str, Any]) -> torch.Tensor:
    if "cls" not in sample:
        raise KeyError(f"sample {sample.get('__key__', '?')} from {sample.get('__url__', '?')} has no 'cls' label; "
                       "a labelled transform needs a classification dataset")
    return torch.tensor(int(sample["cls"]), dtype=torch.long)


def _chw_float(image: Image.Image) -> torch.Tensor:
    """PIL RGB [H, W] -> contiguous float32 [3, H, W] with values 0..255.

    ``pil_to_tensor(image).float()`` would keep the HWC strides of the PIL buffer, and stacking such tensors into
    a batch is a strided gather that cost more than the decode itself in the data-throughput benchmark; one
    copy into a contiguous CHW tensor makes batching a plain memcpy.
    """
    hwc = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy: from_numpy warns on read-only arrays
    out = torch.empty((3, hwc.shape[0], hwc.shape[1]), dtype=torch.float32)
    out.copy_(hwc.permute(2, 0, 1))  # dtype and layout converted in one pass
    return out


class _Normalize:
    """PIL RGB -> normalised float tensor: ``(x - 255*mean) / (255*std)``, the same as ToTensor + Normalize
    without the intermediate [0, 1] tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor([255.0 * m for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """image: PIL RGB [H, W] -> [3, H, W] float32, contiguous."""
        return _chw_float(image).sub_(self.mean).div_(self.std)


class _SampleTransform:
    """Shared repr for the dict transforms."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class MAETrainTransform(_SampleTransform):
    """MAE pretraining: RandomResizedCrop (bicubic) + horizontal flip + normalise -> ``{"image": [3, S, S]}``.

    Args:
        img_size: output side S.
        scale: range of the crop's area as a fraction of the image (MAE uses 0.2-1).
        mean: per-channel normalisation mean (of [0, 1] pixels).
        std: per-channel normalisation std.
        normalize: False returns the crop as uint8 [3, S, S] (0..255) for normalising on the accelerator:
            a quarter of the bytes to batch and move between processes (see bench/RESULTS.md).
        interpolation: the crop's resize ("bicubic": MAE; "bilinear": torchvision's default, SimMIM's).
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.2, 1.0),
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 normalize: bool = True, interpolation: str = "bicubic") -> None:
        self.img_size = img_size
        self.scale = tuple(scale)
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = normalize
        self.interpolation = interpolation
        self._crop = T.RandomResizedCrop(img_size, scale=self.scale, interpolation=T.InterpolationMode(interpolation))
        self._flip = T.RandomHorizontalFlip()
        self._normalize = _Normalize(mean, std)

    def at_size(self, size: int) -> "MAETrainTransform":
        """The same crop at `size` px (data.multiscale: a multi-scale stream maps a batch at `size` with it)."""
        return MAETrainTransform(size, scale=self.scale, mean=self.mean, std=self.std, normalize=self.normalize,
                                 interpolation=self.interpolation)

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        crop = self._flip(self._crop(_rgb(sample["image"])))
        if not self.normalize:
            return {"image": torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).contiguous()}
        return {"image": self._normalize(crop)}


class EvalTransform(_SampleTransform):
    """Evaluation: resize the shorter side to ``img_size / crop_pct`` + center crop + normalise (timm's eval path).

    Returns ``{"image": [3, S, S]}``, plus ``"label"`` (int64 scalar from ``sample["cls"]``) if `with_label`.
    """

    def __init__(self, img_size: int, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, with_label: bool = False,
                 interpolation: str = "bicubic") -> None:
        self.img_size = img_size
        self.crop_pct = crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.with_label = with_label
        self.interpolation = interpolation
        self._transform = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                                           mean=self.mean, std=self.std)

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {"image": self._transform(_rgb(sample["image"]))}
        if self.with_label:
            out["label"] = _label(sample)
        return out


class BEiTTwoViewTransform(_SampleTransform):
    """BEiT pretraining: two crop-synchronised views of one image.

    Colour jitter, then one RandomResizedCrop box (and one flip decision) resized twice: the patch view for
    the ViT (bicubic, normalised) and the tokenizer view (lanczos, in [0, 1], what a dVAE tokenizer reads).

    Returns:
        ``{"image": [3, img_size, img_size] float (normalised),
        "tokenizer_image": [3, tokenizer_size, tokenizer_size] float in [0, 1]}``.
    """

    def __init__(self, img_size: int = 224, tokenizer_size: int = 112, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), color_jitter: float = 0.4, hflip: float = 0.5,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.img_size = img_size
        self.tokenizer_size = tokenizer_size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.color_jitter = color_jitter
        self.hflip = hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self._jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self._normalize = _Normalize(mean, std)

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = _rgb(sample["image"])
        if self._jitter is not None:
            image = self._jitter(image)
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        box = (left, top, left + w, top + h)
        # resize(box=...) crops and resizes in one pass, from the same box for both views
        patch = image.resize((self.img_size, self.img_size), Image.Resampling.BICUBIC, box=box)
        tokens = image.resize((self.tokenizer_size, self.tokenizer_size), Image.Resampling.LANCZOS, box=box)
        if torch.rand(()).item() < self.hflip:  # torch's RNG, which DataLoader seeds per worker
            patch, tokens = F.hflip(patch), F.hflip(tokens)
        return {"image": self._normalize(patch), "tokenizer_image": _chw_float(tokens).div_(255.0)}


class ClassificationTrainTransform(_SampleTransform):
    """Supervised training (DeiT recipe): timm ``create_transform(is_training=True)`` -> ``{"image", "label"}``.

    RandomResizedCrop, flip, RandAugment (`auto_augment`; colour jitter applies only when it is None, as in
    timm), normalise, random erasing (`re_prob`, per-pixel random values).
    """

    def __init__(self, img_size: int, auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                 scale: tuple[float, float] = (0.08, 1.0), color_jitter: float = 0.3, hflip: float = 0.5,
                 interpolation: str = "bicubic", re_mode: str = "pixel", re_count: int = 1,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.img_size = img_size
        self.auto_augment = auto_augment
        self.re_prob = re_prob
        self.scale = tuple(scale)
        self.color_jitter = color_jitter
        self.hflip = hflip
        self.interpolation = interpolation
        self.re_mode, self.re_count = re_mode, re_count
        self.mean, self.std = tuple(mean), tuple(std)
        self._transform = create_transform(
            img_size, is_training=True, scale=self.scale, hflip=hflip, color_jitter=color_jitter,
            auto_augment=auto_augment, interpolation=interpolation, mean=self.mean, std=self.std, re_prob=re_prob,
            re_mode=re_mode, re_count=re_count)

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"image": self._transform(_rgb(sample["image"])), "label": _label(sample)}

    def at_size(self, size: int) -> "ClassificationTrainTransform":
        """The same augmentation with `size`-px outputs: what a multi-scale stream maps a batch at `size` with
        (data.multiscale; RandAugment's translations scale with the size, so the transform is built anew)."""
        return ClassificationTrainTransform(
            size, auto_augment=self.auto_augment, re_prob=self.re_prob, scale=self.scale,
            color_jitter=self.color_jitter, hflip=self.hflip, interpolation=self.interpolation, re_mode=self.re_mode,
            re_count=self.re_count, mean=self.mean, std=self.std)


class ClassificationEvalTransform(EvalTransform):
    """Evaluation counterpart of :class:`ClassificationTrainTransform`: resize + center crop, with the label."""

    def __init__(self, img_size: int, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, interpolation: str = "bicubic") -> None:
        super().__init__(img_size, crop_pct=crop_pct, mean=mean, std=std, with_label=True, interpolation=interpolation)


class ThreeAugmentTransform(_SampleTransform):
    """DeiT III's 3-Augment (facebookresearch/deit ``augment.py`` new_data_aug_generator) -> ``{"image", "label"}``.

    1. RandomResizedCrop (bicubic, `scale`) or, with `simple_random_crop`, the "SRC" of the ImageNet-21k runs:
       resize the shorter side to `img_size` + random crop with 4-px reflect padding; then a horizontal flip.
    2. Exactly one of: grayscale (3 channels), solarize (threshold 128), Gaussian blur (radius uniform in 0.1-2).
    3. ColorJitter(`color_jitter`) on brightness, contrast and saturation (0 = off).
    4. Normalise; random erasing with probability `re_prob` (DeiT III uses none).
    The random choices use Python's and torch's RNGs, which the DataLoader seeds per worker.
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.08, 1.0), color_jitter: float = 0.3,
                 hflip: float = 0.5, simple_random_crop: bool = False, re_prob: float = 0.0,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.img_size = img_size
        self.scale = tuple(scale)
        self.color_jitter = color_jitter
        self.hflip = hflip
        self.simple_random_crop = simple_random_crop
        self.re_prob = re_prob
        self.mean, self.std = tuple(mean), tuple(std)
        bicubic = T.InterpolationMode.BICUBIC
        crop = ([T.Resize(img_size, interpolation=bicubic), T.RandomCrop(img_size, padding=4, padding_mode="reflect")]
                if simple_random_crop else [T.RandomResizedCrop(img_size, scale=self.scale, interpolation=bicubic)])
        self._primary = T.Compose([*crop, T.RandomHorizontalFlip(hflip)])
        self._jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self._grayscale = T.Grayscale(num_output_channels=3)
        self._normalize = _Normalize(mean, std)
        self._erase = T.RandomErasing(p=re_prob, value="random") if re_prob > 0 else None

    def at_size(self, size: int) -> "ThreeAugmentTransform":
        """The same augmentation at `size` px (data.multiscale)."""
        return ThreeAugmentTransform(size, scale=self.scale, color_jitter=self.color_jitter, hflip=self.hflip,
                                     simple_random_crop=self.simple_random_crop, re_prob=self.re_prob,
                                     mean=self.mean, std=self.std)

    def _one_of_three(self, image: Image.Image) -> Image.Image:
        choice = random.randrange(3)
        if choice == 0:
            return self._grayscale(image)
        if choice == 1:
            return ImageOps.solarize(image, threshold=128)
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = self._one_of_three(self._primary(_rgb(sample["image"])))
        if self._jitter is not None:
            image = self._jitter(image)
        out = self._normalize(image)
        if self._erase is not None:
            out = self._erase(out)
        return {"image": out, "label": _label(sample)}


class RepeatedViews(_SampleTransform):
    """`repeats` independent draws of `transform` on one sample, stacked: ``{"image": [k, 3, H, W], "label"}``.

    The repeated augmentation of DeiT (Hoffer et al. 2020, Berman et al. 2019) in a streaming pipeline, where no
    sampler can repeat indices: the views are made in the data worker that decoded the image (one decode, k
    augmentations) and `flatten_views` turns a batch of B samples into B * k images.
    """

    def __init__(self, transform: Any, repeats: int) -> None:
        if repeats < 1:
            raise ValueError(f"repeats={repeats} must be >= 1")
        self.transform = transform
        self.repeats = repeats

    @property
    def img_size(self) -> int | None:
        return getattr(self.transform, "img_size", None)

    def at_size(self, size: int) -> "RepeatedViews":
        """The repeated views at `size` px (data.multiscale); only for a view transform that takes a size."""
        return RepeatedViews(self.transform.at_size(size), self.repeats)

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        views = [self.transform(sample) for _ in range(self.repeats)]
        out = {"image": torch.stack([v["image"] for v in views])}
        if "label" in views[0]:
            out["label"] = views[0]["label"]
        return out


def normalize_on_device(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float images: uint8 [N, 3, H, W] (0..255, MAETrainTransform's `normalize=False` output, cheaper to
    move) are scaled and normalised on their own device; floating images (already normalised) pass through."""
    if images.is_floating_point():
        return images
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean_t) / std_t


def flatten_views(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate `RepeatedViews` outputs: B samples of [k, 3, H, W] -> ``{"image": [B*k, 3, H, W], "label": [B*k]}``.

    Sample-major: rows i*k .. i*k + k - 1 are the views of sample i, so with an even B, timm's Mixup (which pairs
    row j with row B*k - 1 - j) never mixes two views of one image.
    """
    images = torch.cat([item["image"] for item in items])
    out = {"image": images}
    if "label" in items[0]:
        k = items[0]["image"].shape[0]
        out["label"] = torch.stack([item["label"] for item in items]).repeat_interleave(k)
    return out
