"""timm models for finetuning: from a backbone folder, from scratch, or any timm architecture by name.

The contract with pretraining is a folder (DESIGN.md): `backbone.safetensors` (a timm-keyed state dict) and
`backbone.json`:

    {"architecture": "vit_base_patch16_224",        # a registered timm name, the entry point
     "model_kwargs": {"img_size": 224, "patch_size": 16, "embed_dim": 768, ..., "num_classes": 0},
     "pretrained_cfg_overlay": {"mean": [...], "std": [...], "input_size": [3, 224, 224]},   # optional
     "embed_layer": {"type": "conv_stem", "channels": [48, 96, 192, 384]},                  # optional
     "pos_embed": "sincos",                                                                 # optional
     "source": "mae", ...}

`timm.create_model(architecture, **model_kwargs)` rebuilds every model whose json has neither optional key;
`create_from_config` also rebuilds those two (a convolutional stem is a callable, which JSON cannot hold):

- `embed_layer` conv_stem: Xiao et al., "Early Convolutions Help Transformers See Better" (arXiv 2106.14881):
  log2(patch_size) 3x3 stride-2 convolutions, each with BatchNorm and ReLU, then a 1x1 convolution to the width,
  in place of the patchify stem. Built from timm's `ConvStem` inside timm's `HybridEmbed`, so the keys are
  `patch_embed.backbone.*` and the token grid is the patchify stem's.
- `pos_embed` sincos: a fixed 2-D sin-cos table (timm's `build_sincos2d_pos_embed`, zeros for prefix tokens, as
  MAE's), not trained (SimpleViT, Beyer et al. arXiv 2205.01580), rebuilt for the model's grid.

`load_weights` loads a backbone state dict into a model built for another image size or head: the learned position
table is resampled to the new grid with timm's `resample_abs_pos_embed` (bicubic, prefix tokens kept: MAE's
`interpolate_pos_embed`, as timm's `checkpoint_filter_fn` does it), the checkpoint's head is dropped, and the only
keys allowed to be missing are the new head's and a pooling norm the checkpoint lacks (MAE: `fc_norm` for global
pooling). DETR and IPT backbones reuse these functions.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.layers import HybridEmbed, resample_abs_pos_embed, resize_rel_pos_bias_table, to_2tuple
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CONFIG_NAME = "backbone.json"
WEIGHTS_NAME = "backbone.safetensors"
# The registered timm constructor for a ViT whose geometry `model_kwargs` spell out in full (the name is only the
# entry point; pretrain/export.py uses the same one).
GENERIC_VIT = "vit_base_patch16_224"
# Constructor arguments that only matter while training: applied when building, never written to backbone.json.
TRAINING_ONLY_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                        "patch_drop_rate")
# Keys a backbone may lack when a finetune model is built from it: the new head, and the norm of the pooling the
# model uses when the checkpoint pooled the other way (token pooling keeps `norm`, average pooling has `fc_norm`).
NEW_MODULE_PREFIXES = ("head.", "fc_norm.", "norm.")


class ConvStemEmbed(HybridEmbed):
    """Xiao et al.'s convolutional stem as a ViT patch embedding (usable as `VisionTransformer(embed_layer=...)`).

    n = log2(patch_size) times [3x3 conv stride 2 -> BatchNorm -> ReLU] with `channels[i]` outputs, then a 1x1 conv
    (with bias) to `embed_dim`: images [N, C, H, W] -> tokens [N, (H/p)*(W/p), embed_dim], the same grid as a
    patchify stem of patch size p.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, channels: tuple[int, ...] = (), bias: bool = True,
                 dynamic_img_pad: bool = False, device: Any = None, dtype: Any = None, **kwargs: Any) -> None:
        p = to_2tuple(patch_size)
        n = len(channels)
        if p[0] != p[1] or 2 ** n != p[0]:
            raise ValueError(f"a conv stem of {n} stride-2 convolutions reduces by {2 ** n}, not by the patch size "
                             f"{patch_size}: give log2(patch_size) channels")
        stem = ConvStem(in_chans, depth=n + 1, channels=(*channels, embed_dim), kernel_size=(3,) * n + (1,),
                        stride=(2,) * n + (1,), norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, device=device,
                        dtype=dtype)
        # the stem already ends at the width and the right grid: no patchify projection after it
        super().__init__(stem, img_size=img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim, proj=False,
                         dynamic_img_pad=dynamic_img_pad, device=device, dtype=dtype)


# --- backbone.json ----------------------------------------------------------------------------------------------

def find_backbone(path: str | Path) -> Path:
    """The folder holding backbone.json + backbone.safetensors: `path` itself or its export/ (a run directory).

    Raises ValueError saying what is missing.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    for folder in (path, path / "export"):
        if (folder / CONFIG_NAME).is_file():
            if not (folder / WEIGHTS_NAME).is_file():
                raise ValueError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
            return folder
    raise ValueError(f"{path} holds no {CONFIG_NAME} (neither there nor in {path / 'export'}); export a backbone "
                     "with a pretraining run or launch/convert_checkpoint.py")


def read_config(folder: str | Path) -> dict[str, Any]:
    """backbone.json of a backbone folder, checked for the keys `create_from_config` needs."""
    path = Path(folder) / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture"), str) \
            or not isinstance(meta.get("model_kwargs", {}), dict):
        raise ValueError(f"{path}: expected {{'architecture': <timm name>, 'model_kwargs': {{...}}}}")
    if not timm.is_model(meta["architecture"]):
        raise ValueError(f"{path}: architecture {meta['architecture']!r} is not a timm model")
    return meta


def scratch_vit_config(*, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                       mlp_ratio: float, class_token: bool, global_pool: str, num_classes: int,
                       pos_embed: str = "learn", conv_stem: tuple[int, ...] = ()) -> dict[str, Any]:
    """backbone.json for a from-scratch ViT (pre-norm, qkv bias, LayerNorm eps 1e-6 as timm's ViTs)."""
    meta: dict[str, Any] = {
        "architecture": GENERIC_VIT,
        "model_kwargs": {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
                         "num_heads": num_heads, "mlp_ratio": mlp_ratio, "qkv_bias": True,
                         "class_token": class_token, "global_pool": global_pool,
                         "fc_norm": global_pool != "token", "num_classes": num_classes},
    }
    if conv_stem:
        meta["embed_layer"] = {"type": "conv_stem", "channels": list(conv_stem)}
    if pos_embed == "sincos":
        meta["pos_embed"] = "sincos"
    return meta


def create_from_config(meta: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The (randomly initialised) timm model `meta` describes, with `overrides` over its model_kwargs.

    `meta["embed_layer"]` (conv stem) and `meta["pos_embed"]` ("sincos", frozen) are applied here; everything else
    is `timm.create_model(meta["architecture"], **model_kwargs)`.
    """
    kwargs = {**meta.get("model_kwargs", {}), **overrides}
    if "init_values" in kwargs and kwargs["init_values"] is None:
        # no LayerScale (older exports wrote null): timm.create_model drops None kwargs, so the registered default
        # would apply (beit_*: 0.1, gammas the weights do not have); timm creates gammas only `if init_values`
        kwargs["init_values"] = 0.0
    if is_beit(meta):
        # timm's Beit spells VisionTransformer's pooling-norm switch `use_fc_norm` and has no `class_token`
        if "fc_norm" in kwargs:
            kwargs["use_fc_norm"] = kwargs.pop("fc_norm")
        if kwargs.pop("class_token", True) is False:
            raise ValueError(f"{meta['architecture']}: BEiT always has a class token (class_token=false)")
    embed = meta.get("embed_layer")
    if embed:
        if embed.get("type") != "conv_stem":
            raise ValueError(f"embed_layer {embed!r}: only {{'type': 'conv_stem', 'channels': [...]}} is known")
        kwargs["embed_layer"] = partial(ConvStemEmbed, channels=tuple(embed["channels"]))
    if "pretrained_cfg_overlay" in meta:
        kwargs["pretrained_cfg_overlay"] = dict(meta["pretrained_cfg_overlay"])
    try:
        model = timm.create_model(meta["architecture"], pretrained=False, **kwargs)
    except AssertionError as e:  # timm checks argument combinations with asserts (token pooling without a token)
        raise ValueError(f"{meta['architecture']} with {kwargs}: {e}") from None
    if meta.get("pos_embed") == "sincos":
        set_sincos_pos_embed(model)
    return model


def is_beit(meta: Mapping[str, Any]) -> bool:
    """Whether backbone.json names timm's `Beit` (beit_*, beitv2_*): relative position tables, q/v biases."""
    return str(meta.get("architecture", "")).startswith("beit")


def set_sincos_pos_embed(model: nn.Module) -> None:
    """Fill `model.pos_embed` [1, prefix + h*w, D] with the fixed 2-D sin-cos table of its grid and freeze it."""
    grid = model.patch_embed.grid_size
    table = build_sincos2d_pos_embed(list(grid), dim=model.pos_embed.shape[-1])  # [h*w, D]
    prefix = model.pos_embed.shape[1] - table.shape[0]
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, prefix:].copy_(table.to(model.pos_embed.dtype))
    model.pos_embed.requires_grad_(False)


def grid_size(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """The token grid (h, w) the backbone was trained at, from img_size / patch_size in its model_kwargs."""
    kwargs = meta.get("model_kwargs", {})
    if "img_size" not in kwargs or "patch_size" not in kwargs:
        return None
    img, patch = to_2tuple(kwargs["img_size"]), to_2tuple(kwargs["patch_size"])
    return img[0] // patch[0], img[1] // patch[1]


# --- weights ----------------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    missing: list[str]        # model keys the checkpoint did not have (new head, pooling norm)
    unexpected: list[str]     # checkpoint keys the model has no place for (a norm the new pooling removed)
    dropped: list[str]        # checkpoint keys left out on purpose (its head)
    resampled: tuple[tuple[int, int], tuple[int, int]] | None   # (old grid, new grid) of the position table


def resample_pos_embed(pos_embed: Tensor, model: nn.Module, old_grid: tuple[int, int] | None) -> Tensor:
    """A checkpoint's position table [1, prefix + h*w, D] -> the model's grid [1, prefix + H*W, D].

    Bicubic with antialiasing (what timm's checkpoint_filter_fn uses; antialiasing only matters when shrinking),
    prefix (class/register) rows copied unchanged.
    """
    num_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    if old_grid is None:
        side = math.isqrt(pos_embed.shape[1] - num_prefix)
        old_grid = (side, side)
    return resample_abs_pos_embed(pos_embed, new_size=list(model.patch_embed.grid_size), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix, interpolation="bicubic", antialias=True)


def resize_rel_pos_tables(state: dict[str, Tensor], model: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """BEiT's per-block relative position tables [(2h-1)(2w-1) + 3, heads] resized in place (timm's
    `resize_rel_pos_bias_table`: unilm's geometric interpolation of the (2h-1) x (2w-1) grid, the 3 class-token rows
    kept) when the model's token grid differs. Returns (tables resized, new grid) or None."""
    targets = {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_bias_table")}
    resized = 0
    for key, target in targets.items():
        if key in state and state[key].shape != target.shape:
            window = tuple(model.patch_embed.grid_size)
            state[key] = resize_rel_pos_bias_table(state[key], new_window_size=window, new_bias_shape=target.shape)
            resized += 1
    for key in [k for k in state if k.endswith("relative_position_index")]:
        del state[key]  # timm rebuilds the index buffers for its grid (non-persistent)
    return (resized, tuple(model.patch_embed.grid_size)) if resized else None


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any],
                 keep_head: bool = False) -> LoadReport:
    """Load a backbone's weights into `model` (built for its own image size, pooling and head).

    The head is dropped unless `keep_head`; the learned position table is resampled to the model's grid (a frozen
    sin-cos table is rebuilt instead); missing keys may only be the head's and a pooling norm's (see
    NEW_MODULE_PREFIXES); any other mismatch is a ValueError listing the keys.
    """
    state = dict(state_dict)
    dropped = [] if keep_head else sorted(k for k in state if k.startswith("head."))
    for key in dropped:
        del state[key]
    resampled = None
    pos = getattr(model, "pos_embed", None)
    if "pos_embed" in state and isinstance(pos, Tensor):
        old = state["pos_embed"]
        state["pos_embed"] = resample_pos_embed(old, model, grid_size(meta))
        if old.shape != state["pos_embed"].shape:
            resampled = (grid_size(meta) or (0, 0), tuple(model.patch_embed.grid_size))
            logger.info("position embeddings resampled from a %dx%d to a %dx%d grid (bicubic)", *resampled[0],
                        *resampled[1])
    tables = resize_rel_pos_tables(state, model)
    if tables:
        logger.info("relative position tables resized to the model's grid (%s): %d", tables[1], tables[0])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"the backbone's weights do not fit the model built from its backbone.json: {e}") from None
    bad_missing = [k for k in missing if not k.startswith(NEW_MODULE_PREFIXES)]
    bad_unexpected = [k for k in unexpected if not k.startswith(NEW_MODULE_PREFIXES)]
    if bad_missing or bad_unexpected:
        raise ValueError(f"the backbone's keys do not match {meta.get('architecture')}: missing {bad_missing[:8]}, "
                         f"unexpected {bad_unexpected[:8]}")
    if meta.get("pos_embed") == "sincos" and isinstance(pos, Tensor):
        set_sincos_pos_embed(model)  # exact for the new grid, where a resampled table would be an approximation
    if missing or unexpected or dropped:
        logger.info("backbone loaded; new: %s; not used: %s", ", ".join(missing) or "-",
                    ", ".join(list(unexpected) + dropped) or "-")
    return LoadReport(list(missing), list(unexpected), dropped, resampled)


def load_backbone(folder: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any], LoadReport]:
    """Build the model a backbone folder describes, with `overrides` (img_size, num_classes, global_pool, ...), and
    load its weights (resampled positions, head dropped). Returns (model, backbone.json dict, report)."""
    folder = find_backbone(folder)
    meta = read_config(folder)
    model = create_from_config(meta, **overrides)
    report = load_weights(model, load_file(str(folder / WEIGHTS_NAME)), meta)
    return model, meta, report


def create_timm(name: str, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """timm.create_model(name, pretrained=False, **kwargs), leaving out `img_size` / `drop_path_rate` for the
    architectures whose constructor does not take them (CNNs). Returns (model, the kwargs it was built with)."""
    optional = ("img_size", "drop_path_rate")
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kwargs), kwargs
        except TypeError as e:
            rejected = [k for k in optional if k in kwargs and f"'{k}'" in str(e)]
            if not rejected:
                raise
            logger.info("timm:%s takes no %s; built without it", name, rejected[0])
            kwargs.pop(rejected[0])


def export_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """model_kwargs for backbone.json: JSON values only, training-only arguments left out."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
            if k not in TRAINING_ONLY_KWARGS and k not in ("embed_layer", "pretrained_cfg_overlay")}
