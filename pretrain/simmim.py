"""SimMIM: masked image modelling by raw-pixel regression, on a Swin Transformer or a ViT.

Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", arXiv 2111.09886. Adapted from
microsoft/SimMIM@0e71746 (models/simmim.py, data/data_simmim.py, main_simmim.py, optimizer.py, configs/), keeping its
stages and numbers:

1. Data workers: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3, bilinear) + horizontal flip, and one mask per image
   from `pretrain.masking.SimMIMMaskGenerator`: ceil(0.6 x squares) random squares of 32 px, upsampled to the model's
   token grid (22 of 36 squares at 192 px; Swin's 4-px tokens come 8 x 8 per square, the ViT's 16-px tokens 2 x 2).
   Crops travel as uint8 and are normalised (ImageNet mean and std) on the device, as MAE's.
2. Encoder: nothing is dropped (unlike MAE). The patch embeddings at masked tokens are replaced by one learned
   `mask_token`: `x * (1 - w) + mask_token * w`. Swin (timm's `SwinTransformer`): right after the patch embedding
   and its norm, which timm returns NHWC, then the stages and the final norm. ViT (timm's `Beit`, SimMIM's ViT is
   BEiT's code): before the class token and the positions; relative position bias shared by all blocks, no absolute
   positions and LayerScale 0.1 in the paper's ViT-B, a plain ViT with `rel_pos_bias=none abs_pos_emb=true
   layer_scale=0`.
3. Decoder ("prediction head"): the final feature map [N, C, H/s, W/s] at the encoder's total stride s (Swin 32 =
   patch 4 x 2^3 merges, ViT 16 = its patch) through one 1x1 convolution to s^2 x 3 channels and a PixelShuffle(s):
   a raw-pixel prediction [N, 3, H, W] of every pixel.
4. Loss: L1 between the normalised image and the prediction on the masked pixels only, summed over the batch and
   divided by (masked pixels + 1e-5) and by the 3 channels. transformers' `SwinForMaskedImageModeling` and
   `ViTForMaskedImageModeling` compute the same (tests/test_simmim.py checks both on the same weights and mask).
5. Recipe (presets): AdamW (0.9, 0.999), lr 2e-4 per 512 images (the runtime's rule is per 256: base_lr 1e-4),
   warmup then cosine, weight decay 0.05 except 1-D tensors, biases, the mask token and Swin's relative position
   tables (ViT: its class token and absolute positions), gradient clipping 5.

Initialisation: timm's Swin init (truncated normal 0.02, as Swin's own); the ViT is unilm's BEiT init
(`pretrain.beit.unilm_init`) plus the patch projection from the same truncated normal, as SimMIM's ViT; the mask
token normal(0.02) (Swin: truncated at +-2, ViT: at +-0.02); the decoder's convolution keeps PyTorch's default.

Export: the encoder alone (mask token and decoder dropped) through the backbone contract: Swin as timm
`SwinTransformer` keys (any timm `swin_*` loads it), the ViT as timm `Beit` keys (the shared table copied into every
block, `pretrain.beit.export_beit_encoder`) or, without relative position bias, `VisionTransformer` keys.
finetune_cls takes either at another size and window (`model.img_size=224 model.window_size=7`): the relative
position tables are resized by `contracts.backbone.load_resampled` with timm's `resize_rel_pos_bias_table`, the
function timm's own Swin checkpoint filter uses.
"""
from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from contracts.backbone import crop_scale_errors
from contracts.task import TaskHooks
from data_pipeline.multiscale import check_sizes
from data_pipeline.transforms import normalize_on_device
from pretrain.beit import export_beit_encoder, unilm_init
from pretrain.export import encoder_to_timm
from pretrain.masking import SimMIMMaskGenerator
from pretrain.pos_embed import beit_positions_at, beit_read_any_size

logger = logging.getLogger(__name__)

BACKBONES = ("swin", "vit")
# SimMIM's loss: (L1 * mask).sum() / (mask.sum() + 1e-5) / in_chans (models/simmim.py)
LOSS_EPS = 1e-5
IN_CHANS = 3
# std of the mask token (SimMIM: trunc_normal_(std=.02))
MASK_TOKEN_STD = 0.02
# images shown by images() (columns of the grid)
NUM_VIS_IMAGES = 8
# weight decay of the decayed group (SimMIM's 0.05; the runtime applies optim.weight_decay to non-zero groups)
WEIGHT_DECAY = 0.05
# parameters SimMIM never decays besides 1-D ones and biases: the mask token (Swin), and what its ViT's
# `no_weight_decay` names (the class token and absolute positions); Swin's relative position tables come from timm's
# own `no_weight_decay`
NO_DECAY_NAMES = ("mask_token", "pos_embed", "cls_token")
# timm's registered Swin sizes (embed_dim, depths, num_heads) -> the name an export records as its entry point; the
# model_args spell out the whole geometry (window, image size), so the name only picks the family
TIMM_SWIN_SIZES = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): "swin_base_patch4_window7_224",
    (192, (2, 2, 18, 2), (6, 12, 24, 48)): "swin_large_patch4_window7_224",
}
GENERIC_SWIN = "swin_tiny_patch4_window7_224"


@dataclass
class SimMIMConfig:
    """The `model.*` section of the pretrain_simmim job. Defaults are the "tiny" preset (a small Swin, CPU, minutes)."""

    backbone: str = "swin"            # "swin": timm SwinTransformer | "vit": timm Beit (BEiT-style or plain ViT)
    img_size: int = 64                # square input side, pixels
    patch_size: int = 4               # pixels per token side (the patch embedding's stride)
    embed_dim: int = 48               # swin: the first stage's width (doubled by every merge); vit: the width
    depths: tuple[int, ...] = (2, 2, 2)      # blocks per stage (swin); vit: one value, its depth ([12])
    num_heads: tuple[int, ...] = (3, 6, 12)  # heads per stage (swin); vit: one value
    window_size: int = 4              # swin: attention window side, tokens (a stage smaller than it attends globally)
    mlp_ratio: float = 4.0
    # vit: SimMIM's ViT-B is BEiT's (shared relative position bias, no absolute positions, LayerScale 0.1)
    rel_pos_bias: str = "shared"      # "shared" | "layer" | "none"
    abs_pos_emb: bool = False         # learned absolute positions
    layer_scale: float = 0.1          # LayerScale gamma init; 0 = none
    drop_path: float = 0.0            # stochastic depth (SimMIM: 0 for Swin-B, 0.1 for ViT-B)
    mask_patch_size: int = 16         # side of the masked squares, pixels (the paper's 32; 16 suits 64-px images)
    mask_ratio: float = 0.6           # fraction of squares masked, rounded up
    crop_scale: tuple[float, float] = (0.67, 1.0)   # RandomResizedCrop area range
    grad_checkpointing: bool = False  # recompute each block in backward

    # each field's range, checked (with finiteness) by the job config before the dataclass is built
    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 1", "patch_size": ">= 1", "embed_dim": ">= 1", "depths": ">= 1", "num_heads": ">= 1",
        "window_size": ">= 1", "mlp_ratio": "> 0", "layer_scale": ">= 0", "drop_path": "[0, 1)",
        "mask_patch_size": ">= 1", "mask_ratio": "(0, 1)", "crop_scale": "(0, 1]"}

    def __post_init__(self) -> None:
        """The geometry: whole patches and squares, windows fitting every stage, heads dividing the widths."""
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)  # a JSON round trip gives lists
        self.crop_scale = tuple(self.crop_scale)
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.rel_pos_bias not in ("shared", "layer", "none"):
            raise ValueError(f"model.rel_pos_bias must be shared, layer or none, got {self.rel_pos_bias!r}")
        errors = []
        if len(self.depths) != len(self.num_heads):
            errors.append(f"model.depths={list(self.depths)} and model.num_heads={list(self.num_heads)} must have "
                          "one value per stage")
        if self.backbone == "vit" and len(self.depths) != 1:
            errors.append(f"model.backbone=vit has one stage: model.depths={list(self.depths)} must be one value "
                          "(its depth, e.g. [12]), model.num_heads one value (model.arch=vit_tiny or vit_b16 sets "
                          "all of a ViT's fields)")
        if self.backbone == "vit" and self.rel_pos_bias == "none" and not self.abs_pos_emb:
            errors.append("model.rel_pos_bias=none with model.abs_pos_emb=false leaves the ViT without any position "
                          "information: set abs_pos_emb=true")
        errors += crop_scale_errors(self.crop_scale)
        if errors:
            raise ValueError("; ".join(errors))
        stride = self.encoder_stride
        if self.img_size % stride:
            what = (f"the encoder's total stride {stride} (patch {self.patch_size} x 2^{len(self.depths) - 1} "
                    "merges)" if self.backbone == "swin" else f"model.patch_size={self.patch_size}")
            errors.append(f"model.img_size={self.img_size} must be a multiple of {what}: the decoder upsamples the "
                          "last feature map by the stride back to the image")
        for i, heads in enumerate(self.num_heads):
            width = self.stage_widths[i] if i < len(self.stage_widths) else self.embed_dim
            if width % heads:
                errors.append(f"model.num_heads[{i}]={heads} does not divide the stage's width {width}")
        if self.backbone == "swin" and not errors:
            for i, side in enumerate(self.stage_grids):
                if side > self.window_size and side % self.window_size:
                    errors.append(f"model.window_size={self.window_size} does not tile stage {i}'s {side}x{side} "
                                  "tokens (it must divide every stage larger than the window)")
        if not errors:
            try:
                make_mask_generator(self)
            except ValueError as e:
                errors.append(f"model.mask_patch_size={self.mask_patch_size} / model.mask_ratio={self.mask_ratio} "
                              f"for {self.img_size}-px images with {self.patch_size}-px patches: {e}")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def encoder_stride(self) -> int:
        """Pixels per side of one cell of the last feature map: Swin patch x 2^(stages - 1), ViT its patch."""
        return self.patch_size * 2 ** (len(self.depths) - 1) if self.backbone == "swin" else self.patch_size

    @property
    def grid(self) -> int:
        """Tokens per side at the patch embedding (the mask's grid)."""
        return self.img_size // self.patch_size

    @property
    def stage_widths(self) -> list[int]:
        return [self.embed_dim * 2 ** i for i in range(len(self.depths))] if self.backbone == "swin" \
            else [self.embed_dim]

    @property
    def stage_grids(self) -> list[int]:
        return [self.grid // 2 ** i for i in range(len(self.depths))] if self.backbone == "swin" else [self.grid]

    def vit_geometry(self) -> SimpleNamespace:
        """The ViT's fields under the names `pretrain.beit.export_beit_encoder` reads."""
        return SimpleNamespace(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                               depth=self.depths[0], num_heads=self.num_heads[0], mlp_ratio=self.mlp_ratio,
                               rel_pos_bias=self.rel_pos_bias, abs_pos_emb=self.abs_pos_emb,
                               layer_scale=self.layer_scale)


# Named architectures as SimMIMConfig overrides: every geometry field, so that switching architectures leaves none of
# the previous one's behind. The paper's (microsoft/SimMIM configs/): Swin-B at 192 px with window 6, ViT-B/16 at 224.
SIMMIM_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": dict(backbone="swin", img_size=64, patch_size=4, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12),
                 window_size=4, mask_patch_size=16),
    "vit_tiny": dict(backbone="vit", img_size=64, patch_size=8, embed_dim=192, depths=(6,), num_heads=(3,),
                     rel_pos_bias="shared", abs_pos_emb=False, layer_scale=0.1, mask_patch_size=16),
    "swin_b192": dict(backbone="swin", img_size=192, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
                      num_heads=(4, 8, 16, 32), window_size=6, mask_patch_size=32),
    "vit_b16": dict(backbone="vit", img_size=224, patch_size=16, embed_dim=768, depths=(12,), num_heads=(12,),
                    rel_pos_bias="shared", abs_pos_emb=False, layer_scale=0.1, mask_patch_size=32),
}


def make_mask_generator(cfg: SimMIMConfig) -> SimMIMMaskGenerator:
    return SimMIMMaskGenerator(cfg.img_size, cfg.mask_patch_size, cfg.patch_size, cfg.mask_ratio)


# --- data: the map functions run in the workers ------------------------------------------------------------------

class SimMIMTrainTransform:
    """Sample -> {"image": [3, S, S] uint8, "mask": [L] bool (True = masked)}: SimMIM's crop + flip and a fresh mask
    drawn with the worker's `random` state. Picklable."""

    def __init__(self, cfg: SimMIMConfig) -> None:
        from data_pipeline.transforms import MAETrainTransform

        # SimMIM's T.RandomResizedCrop(img, scale=(0.67, 1), ratio=(3/4, 4/3)) resizes bilinearly (torchvision's
        # default); uint8 crops are normalised on the device (`SimMIMTask.pixels`)
        self.cfg, self.img_size = cfg, cfg.img_size
        self.crop = MAETrainTransform(cfg.img_size, scale=cfg.crop_scale, normalize=False, interpolation="bilinear")
        self.mask = make_mask_generator(cfg)

    def __repr__(self) -> str:
        return f"SimMIMTrainTransform({self.crop!r}, {self.mask!r})"

    def at_size(self, size: int) -> "SimMIMTrainTransform":
        """The same crop and masking at `size` px (data.multiscale); ValueError for a size the geometry refuses
        (the mask squares, the decoder's stride and the windows must fit it)."""
        return SimMIMTrainTransform(replace(self.cfg, img_size=size))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        return {**self.crop(sample), "mask": self.mask().flatten()}


class SimMIMEvalTransform:
    """Evaluation: timm's resize + centre crop, normalised, and a mask seeded by the sample key, so every evaluation
    scores the same pixels of the same images."""

    def __init__(self, cfg: SimMIMConfig, mean: tuple, std: tuple) -> None:
        from data_pipeline.transforms import EvalTransform

        self.view = EvalTransform(cfg.img_size, mean=mean, std=std)
        self.mask = make_mask_generator(cfg)

    def __repr__(self) -> str:
        return f"SimMIMEvalTransform({self.view!r}, {self.mask!r})"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        rng = random.Random(zlib.crc32(str(sample.get("__key__", "")).encode()))
        return {**self.view(sample), "mask": self.mask(rng).flatten()}


# --- the model -----------------------------------------------------------------------------------------------------

def pixel_mask(mask: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """mask [N, L] token mask (True/1 = masked, row-major over `grid`) -> [N, 1, H, W] float, 1 on masked pixels."""
    mask = rearrange(mask.float(), "n (h w) -> n 1 h w", h=grid[0], w=grid[1])
    return mask.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


def masked_l1(images: Tensor, reconstruction: Tensor, pixels_masked: Tensor) -> Tensor:
    """SimMIM's loss. images, reconstruction [N, 3, H, W], pixels_masked [N, 1, H, W] -> scalar float32: the L1 on the
    masked pixels, summed, / (masked pixels + 1e-5) / channels."""
    l1 = F.l1_loss(images.float(), reconstruction.float(), reduction="none")  # [N, 3, H, W]
    return (l1 * pixels_masked).sum() / (pixels_masked.sum() + LOSS_EPS) / images.shape[1]


def simmim_decoder(in_channels: int, stride: int) -> nn.Sequential:
    """SimMIM's prediction head: [N, C, H/s, W/s] -> Conv 1x1 -> [N, s^2 x 3, H/s, W/s] -> PixelShuffle -> [N, 3, H, W].
    Keys decoder.0.weight / decoder.0.bias, as SimMIM's and transformers'."""
    return nn.Sequential(nn.Conv2d(in_channels, stride ** 2 * IN_CHANS, kernel_size=1), nn.PixelShuffle(stride))


class _SimMIMForward:
    """The stages every backbone shares: masked encoding -> feature map -> decoder -> loss on the masked pixels."""

    cfg: SimMIMConfig
    decoder: nn.Sequential

    def feature_map(self, images: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [N, 3, H, W] normalised, mask [N, L] (True = masked) -> (loss: float32 scalar, reconstruction
        [N, 3, H, W] of every pixel)."""
        images = images.to(self.decoder[0].weight.dtype)  # a bf16 engine holds bf16 weights; float32 images arrive
        reconstruction = self.decoder(self.feature_map(images, mask))
        grid = images.shape[-1] // self.cfg.patch_size  # this batch's (data.multiscale: per batch)
        loss = masked_l1(images, reconstruction, pixel_mask(mask, (grid, grid), self.cfg.patch_size))
        return loss, reconstruction


class SwinForSimMIM(_SimMIMForward, SwinTransformer):
    """timm's `SwinTransformer` (no head) + SimMIM's `mask_token` and `decoder`; every other key is timm's."""

    def __init__(self, cfg: SimMIMConfig, dynamic_img_size: bool = False) -> None:
        # dynamic_img_size (multi-scale batches): timm computes the shifted-window masks per input size
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                         depths=cfg.depths, num_heads=cfg.num_heads, window_size=cfg.window_size,
                         mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path, num_classes=0,
                         dynamic_img_size=dynamic_img_size)
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        trunc_normal_(self.mask_token, std=MASK_TOKEN_STD)
        self.decoder = simmim_decoder(self.num_features, cfg.encoder_stride)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def encode(self, images: Tensor, mask: Tensor) -> Tensor:
        """images [N, 3, H, W], mask [N, L] -> features [N, H/s, W/s, C] (NHWC after the final norm: timm's
        forward_features of the exported model when nothing is masked)."""
        x = self.patch_embed(images)  # [N, h, w, D], after the patch norm
        w = rearrange(mask, "n (h w) -> n h w 1", h=x.shape[1]).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = self.layers(x)  # each stage checkpoints its blocks itself when grad checkpointing is on
        return self.norm(x)

    def feature_map(self, images: Tensor, mask: Tensor) -> Tensor:
        """images [N, 3, H, W], mask [N, L] -> [N, C, H/s, W/s]."""
        return rearrange(self.encode(images, mask), "n h w c -> n c h w")

    def no_decay_names(self) -> set[str]:
        return set(self.no_weight_decay()) | {"mask_token"}   # timm's: the relative position tables


class ViTForSimMIM(_SimMIMForward, Beit):
    """timm's `Beit` (no head, final norm kept) + SimMIM's `mask_token` and `decoder`: SimMIM's ViT, which is BEiT's
    code (q/v biases, shared or per-block relative position bias, LayerScale, optional absolute positions)."""

    def __init__(self, cfg: SimMIMConfig) -> None:
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depths[0],
            num_heads=cfg.num_heads[0], mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path_rate=cfg.drop_path,
            init_values=cfg.layer_scale or None, use_abs_pos_emb=cfg.abs_pos_emb,
            use_rel_pos_bias=cfg.rel_pos_bias == "layer", use_shared_rel_pos_bias=cfg.rel_pos_bias == "shared",
            num_classes=0, global_pool="avg", use_fc_norm=False)
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        unilm_init(self)  # Linear weights, class/mask tokens, positions: truncated normal(0.02) at +-0.02
        with torch.no_grad():  # SimMIM's ViT also initialises the patch projection (a Conv2d) that way
            trunc_normal_(self.patch_embed.proj.weight, std=MASK_TOKEN_STD, a=-MASK_TOKEN_STD, b=MASK_TOKEN_STD)
            nn.init.zeros_(self.patch_embed.proj.bias)
        self.decoder = simmim_decoder(cfg.embed_dim, cfg.encoder_stride)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def encode(self, images: Tensor, mask: Tensor) -> Tensor:
        """images [N, 3, H, W], mask [N, L] -> final-norm tokens [N, 1 + L, D] (timm's forward_features of the
        exported model when nothing is masked)."""
        x = self.patch_embed(images)  # [N, L, D]
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)  # [N, 1 + L, D]
        # the stored tables at model.img_size; resampled at another size (multi-scale batches)
        pos_embed, rel_pos_bias = beit_positions_at(self, images.shape[-1] // self.cfg.patch_size)
        if pos_embed is not None:
            x = x + pos_embed
        x = self.pos_drop(x)
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                x = checkpoint(block, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
            else:
                x = block(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    def feature_map(self, images: Tensor, mask: Tensor) -> Tensor:
        """images [N, 3, H, W], mask [N, L] -> [N, D, H/p, W/p] (the patch tokens; the class token dropped)."""
        grid = images.shape[-2] // self.cfg.patch_size
        return rearrange(self.encode(images, mask)[:, 1:], "n (h w) d -> n d h w", h=grid)

    def no_decay_names(self) -> set[str]:
        return {"pos_embed", "cls_token"}   # SimMIM's ViT `no_weight_decay` (its relative tables are decayed)


def build_model(cfg: SimMIMConfig) -> SwinForSimMIM | ViTForSimMIM:
    return SwinForSimMIM(cfg) if cfg.backbone == "swin" else ViTForSimMIM(cfg)


def simmim_encoder_features(model: SwinForSimMIM | ViTForSimMIM, imgs: Tensor) -> Tensor:
    """imgs [N, 3, H, W] -> the encoder's features with nothing masked = the exported timm model's forward_features
    (Swin [N, h, w, C], ViT [N, 1 + L, D]), for the converter's feature check."""
    mask = torch.zeros(imgs.shape[0], model.cfg.grid ** 2, dtype=torch.bool, device=imgs.device)
    return model.encode(imgs.to(model.decoder[0].weight.dtype), mask)


# --- export ----------------------------------------------------------------------------------------------------------

PRETRAINING_ONLY = ("mask_token", "decoder.")


def swin_export(state_dict: dict[str, Tensor], cfg: SimMIMConfig, mean: tuple, std: tuple
                ) -> tuple[dict[str, Tensor], dict]:
    """The Swin encoder with timm `SwinTransformer` keys (no head) and its backbone.json."""
    tensors = {k: v for k, v in encoder_to_timm(state_dict, drop_prefixes=PRETRAINING_ONLY).items()
               if not k.endswith(("relative_position_index", "attn_mask"))}  # buffers timm rebuilds
    size = (cfg.embed_dim, tuple(cfg.depths), tuple(cfg.num_heads))
    architecture = TIMM_SWIN_SIZES.get(size, GENERIC_SWIN) if cfg.patch_size == 4 else GENERIC_SWIN
    kwargs = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
              "depths": list(cfg.depths), "num_heads": list(cfg.num_heads), "window_size": cfg.window_size,
              "mlp_ratio": cfg.mlp_ratio, "num_classes": 0, "global_pool": "avg"}
    overlay = {"mean": list(mean), "std": list(std), "input_size": [3, cfg.img_size, cfg.img_size]}
    return tensors, {"architecture": architecture, "model_kwargs": kwargs, "pretrained_cfg_overlay": overlay,
                     "source": "simmim"}


# --- the task ----------------------------------------------------------------------------------------------------

class SimMIMTask(TaskHooks):
    """SimMIM for the shared runtime: model, transforms with masks, parameter groups, step, evaluation, pictures,
    export."""

    required_members = ("image",)  # what every sample must hold; the stream counts others as missing_*

    def __init__(self, cfg: SimMIMConfig) -> None:
        self.cfg = cfg
        self.model = build_model(cfg)
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        self.train_transform = SimMIMTrainTransform(cfg)
        self.eval_transform = SimMIMEvalTransform(cfg, self.mean, self.std)
        self._flops: float | None = None
        decoder = sum(p.numel() for p in self.model.decoder.parameters())
        encoder = sum(p.numel() for p in self.model.parameters()) - decoder
        logger.info("SimMIM: %s, %.2fM encoder + %.2fM decoder parameters, %dx%d tokens, stride %d, %r", cfg.backbone,
                    encoder / 1e6, decoder / 1e6, cfg.grid, cfg.grid, cfg.encoder_stride, self.train_transform.mask)

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """Multi-scale batches (data.multiscale): every size must fit the geometry (checked by building its
        transform); a Swin is rebuilt with timm's dynamic_img_size (window masks per size) and given the same
        weights, the ViT reads any grid (`beit_read_any_size`). Evaluation, the pictures and the export stay at
        model.img_size."""
        check_sizes(self.train_transform, sizes)
        if self.cfg.backbone == "swin":
            built = SwinForSimMIM(self.cfg, dynamic_img_size=True)
            built.load_state_dict(self.model.state_dict())
            self.model = built.train(self.model.training)
        else:
            beit_read_any_size(self.model)
        logger.info("multi-scale batches at %s px: the %s reads every size", list(sizes), self.cfg.backbone)

    # --- training ------------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """SimMIM's rule (optimizer.py `get_pretrain_param_groups`): no decay for 1-D tensors, biases and the
        model's `no_weight_decay` names (Swin: the mask token and the relative position tables; ViT: the class token
        and absolute positions); decay for the rest, the decoder's weight included."""
        skip = self.model.no_decay_names()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": WEIGHT_DECAY}]

    def pixels(self, images: Tensor) -> Tensor:
        """Normalised float images: uint8 [N, 3, H, W] (the train crops) are normalised here, on their device;
        floating images (the eval transform's, already normalised) pass through."""
        return normalize_on_device(images, self.mean, self.std)

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        mask = batch["mask"]
        loss, _ = model(self.pixels(batch["image"]), mask)
        return loss, {"masked_fraction": mask.float().mean().item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """The loss over every masked pixel of the non-padding val images (masks seeded by the sample key, so
        evaluations are comparable): summed L1 / (masked pixels x channels), the sums all-reduced over ranks."""
        was_training = model.training
        model.eval()
        cfg = self.cfg
        sums = torch.zeros(2, dtype=torch.float64, device=next(self.model.parameters()).device)
        for batch in loader:
            images, mask = self.pixels(batch["image"]), batch["mask"].bool()
            if "is_padding" in batch:
                mask = mask & ~batch["is_padding"].to(mask.device).bool().unsqueeze(1)
            _, reconstruction = model(images, mask)
            masked = pixel_mask(mask, (cfg.grid, cfg.grid), cfg.patch_size)  # [N, 1, H, W]
            l1 = F.l1_loss(images.float(), reconstruction.float(), reduction="none")
            sums += torch.stack([(l1 * masked).sum(), masked.sum() * images.shape[1]]).double()
        model.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        return {"val_loss": (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")}

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A [3, H, W] grid in [0, 1]: columns = images, rows = original | masked input (grey) | the prediction of
        every pixel | the prediction pasted into the masked pixels. Forward on every rank (ZeRO-3)."""
        images = self.pixels(batch["image"][:NUM_VIS_IMAGES])
        mask = batch["mask"][:NUM_VIS_IMAGES]
        was_training = model.training
        model.eval()
        _, reconstruction = model(images, mask)
        model.train(was_training)
        grid = images.shape[-1] // self.cfg.patch_size  # a training batch may be at a multi-scale size
        masked = pixel_mask(mask, (grid, grid), self.cfg.patch_size)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        original = images.float() * std + mean
        prediction = reconstruction.float() * std + mean
        rows = [original, original * (1 - masked) + 0.5 * masked, prediction,
                original * (1 - masked) + prediction * masked]
        grid = make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=images.shape[0], padding=2, pad_value=1.0)
        return {"reconstruction": grid}

    # --- export ------------------------------------------------------------------------------------------------

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The encoder (mask token and decoder dropped) as timm `SwinTransformer`, `Beit` or `VisionTransformer`
        weights + backbone.json (see the module docstring)."""
        cfg = self.cfg
        if cfg.backbone == "swin":
            return swin_export(state_dict, cfg, self.mean, self.std)
        fmt = "vit" if cfg.rel_pos_bias == "none" else "beit"
        tensors, config = export_beit_encoder(state_dict, cfg.vit_geometry(), fmt, mean=self.mean, std=self.std,
                                              source="simmim", drop_prefixes=PRETRAINING_ONLY)
        return tensors, config

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per image: FlopCounterMode on a meta-device copy of the model (every
        token is encoded; the decoder and the loss are counted too)."""
        if self._flops is None:
            cfg = replace(self.cfg, grad_checkpointing=False, drop_path=0.0)
            with torch.device("meta"):
                model = build_model(cfg)
                images = torch.zeros(1, 3, cfg.img_size, cfg.img_size)
                mask = torch.zeros(1, cfg.grid ** 2, dtype=torch.bool)
            with FlopCounterMode(display=False) as counter:
                loss, _ = model(images, mask)
                loss.backward()
            self._flops = float(counter.get_total_flops())
        return self._flops
