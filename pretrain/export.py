"""Pretrained encoders -> a timm backbone on disk (the folder format itself: `contracts.backbone`).

The contract between pretraining and finetuning is a timm folder (see DESIGN.md and contracts/backbone.py):
`config.json` (architecture, model_args, pretrained_cfg) + `model.safetensors`, a state dict keyed like the timm
model (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*` for a ViT). `save_backbone` (the one
writer) and `load_backbone` (the strict loader: `timm.create_model` + strict `load_state_dict`) are the contract's,
re-exported here.

Specific to pretraining: each task maps its own state dict with `encoder_to_timm` (strip wrapper prefixes, drop the
pretraining-only parts, rename prefixes) and describes a plain ViT's geometry with `vit_config`.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import timm
from torch import Tensor

from contracts.backbone import (  # noqa: F401 - the contract's names, re-exported for pretraining code
    CONFIG_NAME, GENERIC_VIT, WEIGHTS_NAME, WRAPPER_PREFIXES, read_backbone, save_backbone, strip_wrapper_prefixes)
from contracts.backbone import load_strict as load_backbone  # noqa: F401

# (embed_dim, depth, num_heads) of timm's named ViT sizes, to give an export the registered name it matches.
TIMM_VIT_SIZES = {
    (192, 12, 3): "tiny",
    (384, 12, 6): "small",
    (768, 12, 12): "base",
    (1024, 24, 16): "large",
    (1280, 32, 16): "huge",
}
# Registered timm constructor used when no name matches: `model_kwargs` carry the full geometry and override the
# registered defaults, so the name is only the entry point.
GENERIC_ARCHITECTURE = GENERIC_VIT


def encoder_to_timm(
        state_dict: Mapping[str, Tensor],
        drop_prefixes: Sequence[str] = (),
        prefix_map: Mapping[str, str] | None = None,
) -> dict[str, Tensor]:
    """Map a pretraining state dict to timm `VisionTransformer` keys.

    Args:
        state_dict: the task model's state dict, with or without wrapper prefixes ("module.").
        drop_prefixes: keys starting with any of these (after unwrapping) are pretraining-only and left out,
            e.g. ("decoder_", "mask_token") for MAE.
        prefix_map: old prefix -> new prefix, applied (first match wins) to the kept keys,
            e.g. {"encoder.": ""}.

    Returns:
        A new dict of detached CPU tensors, contiguous (safetensors refuses views).
    """
    prefix_map = prefix_map or {}
    out = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        if any(key.startswith(p) for p in drop_prefixes):
            continue
        for old, new in prefix_map.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value.detach().cpu().contiguous()
    return out


def timm_architecture(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                      template: str = "vit_{size}_patch{patch}_{img}", generic: str = GENERIC_ARCHITECTURE) -> str:
    """The registered timm model whose defaults equal this geometry (e.g. "vit_base_patch16_224"), else `generic`.

    `template` names another family with the same sizes, e.g. "deit_{size}_distilled_patch{patch}_{img}".
    """
    size = TIMM_VIT_SIZES.get((embed_dim, depth, num_heads))
    if size is not None:
        name = template.format(size=size, patch=patch_size, img=img_size)
        if timm.is_model(name):
            return name
    return generic


def vit_config(
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        source: str,
        global_pool: str = "token",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **extra_kwargs: Any,
) -> dict[str, Any]:
    """The backbone.json dict for a plain pre-norm ViT with a class token and no head.

    `model_kwargs` always spell out the whole geometry, so the model is the same whatever `architecture` is.
    `global_pool="token"` keeps the final `norm` (timm moves it to `fc_norm` for "avg"; a finetune that wants
    average pooling builds with `global_pool="avg", fc_norm=False` to reuse these weights). `mean`/`std` are the
    normalisation the encoder was trained with, passed to timm as `pretrained_cfg_overlay`.
    """
    config: dict[str, Any] = {
        "architecture": timm_architecture(img_size, patch_size, embed_dim, depth, num_heads),
        "model_kwargs": {
            "img_size": img_size,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "qkv_bias": True,
            "class_token": True,
            "global_pool": global_pool,
            "num_classes": 0,
            **extra_kwargs,
        },
        "source": source,
    }
    if mean is not None and std is not None:
        config["pretrained_cfg_overlay"] = {
            "mean": list(mean), "std": list(std), "input_size": [3, img_size, img_size],
        }
    return config
