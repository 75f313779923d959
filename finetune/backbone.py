"""timm models for finetuning: from a backbone folder, from scratch, or any timm architecture by name.

The backbone folder, its reader and both loaders live in `contracts.backbone` (the one home of the contract, which
pretrain/ and launch/ import too); the names finetune code has always used are re-exported here. Specific to
finetuning: `scratch_vit_config` (the meta of a from-scratch ViT, conv stem and sin-cos table optional) and
`create_timm` (any timm architecture by name).

`load_backbone(folder, **overrides)` is `contracts.backbone.load_resampled`: the learned position table resampled to
the new grid with timm's `resample_abs_pos_embed` (bicubic, prefix tokens kept: MAE's `interpolate_pos_embed`, as
timm's `checkpoint_filter_fn` does it), relative position tables resized, the checkpoint's head dropped, and the
only keys allowed to be missing the new head's and a pooling norm the checkpoint lacks (MAE: `fc_norm` for global
pooling). DETR and IPT backbones use the same functions.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from contracts.backbone import (  # noqa: F401 - the contract's names, re-exported for finetune code
    CONFIG_NAME, GENERIC_VIT, LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME, NEW_MODULE_PREFIXES, OPTIONAL_KWARGS,
    TRAINING_ONLY_KWARGS, WEIGHTS_NAME, ConvStemEmbed, LoadReport, create_dropping_rejected, create_from_config,
    export_kwargs, find_backbone, grid_size, is_beit, load_resampled, load_weights, not_positional, read_backbone,
    read_config, read_weights, resample_pos_embed, resize_rel_pos_tables, set_sincos_pos_embed)

load_backbone = load_resampled  # (model, meta, LoadReport)


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


def create_timm(name: str, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """timm.create_model(name, pretrained=False, **kwargs), leaving out the OPTIONAL_KWARGS (`img_size`,
    `drop_path_rate`, `drop_rate`, `dynamic_img_size`) that an architecture's constructor does not take (CNNs, which
    read any image size anyway). Returns (model, the kwargs it was built with)."""
    return create_dropping_rejected(name, kwargs, OPTIONAL_KWARGS)
