"""A ViTDet backbone (Li et al., arXiv 2203.16527) from any plain ViT export.

ViTDet keeps a plain, non-hierarchical ViT for detection and changes only what a high-resolution grid needs:

- no class token: the feature map is the patch grid, [N, D, H/p, W/p];
- absolute positions resampled once, at build time, from the pretraining grid to the detection grid;
- window attention in most blocks (window_size x window_size tokens), global attention in a few evenly spaced ones
  (ViTDet's 4: blocks 2, 5, 8, 11 of a depth-12 ViT), the grid padded at the bottom/right when the window does not
  divide it (timm's `window_partition` pads with zeros and `window_unpartition` crops);
- decomposed relative positions (MViTv2) in every block, zero-initialised when the source has none, so the
  converted model computes the pretrained function at the start of finetuning.

The model is timm's windowed ViT (`VisionTransformerSAM`, SAM's image encoder, itself ViTDet's backbone) with the
neck and head off; only the weight conversion is written here. Sources: this project's MAE, DeiT and BEiT exports
(timm `VisionTransformer` keys, or timm `Beit` keys) and published MAE files converted by
pretrain/reference_checkpoints.py. A BEiT export with relative position bias tables is refused: BEiT's table
[(2h-1)(2w-1)+3, heads] is a joint 2-D bias per head, SAM's tables [2h-1, head_dim] per axis are multiplied with
the query, so no exact conversion exists (export such a BEiT without relative positions, or start from MAE).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed, to_2tuple
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import Tensor, nn

from contracts.backbone import read_backbone, strip_wrapper_prefixes

# Keys of the source that ViTDet has no place for: prefix tokens, the final norm / pooling / head (ViTDet's feature
# map is the last block's output; the simple feature pyramid after it brings its own norms), BEiT's pretraining
# leftovers.
DROPPED_PREFIXES = ("cls_token", "dist_token", "reg_token", "norm.", "fc_norm.", "head.", "head_drop.", "attn_pool.",
                    "lm_head.", "mask_token")


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's 4 evenly spaced global blocks, the last of each quarter: (2, 5, 8, 11) for depth 12, (5, 11, 17, 23)
    for 24, (7, 15, 23, 31) for 32 (fewer when depth < 4 repeats an index)."""
    return tuple(sorted({max(0, (i + 1) * depth // 4 - 1) for i in range(4)}))


class ViTDetBackbone(VisionTransformerSAM):
    """timm's windowed ViT whose forward returns the last block's feature map (no neck, no head, no final norm)."""

    def forward(self, x: Tensor) -> Tensor:
        """images [N, C, H, W] -> features [N, D, H/p, W/p] (SAM's blocks run NHWC; neck is Identity)."""
        return self.forward_features(x)


def _source_grid(meta: dict[str, Any]) -> tuple[int, int]:
    kwargs = meta["model_kwargs"]
    img, patch = to_2tuple(kwargs.get("img_size", 224)), to_2tuple(kwargs.get("patch_size", 16))
    return img[0] // patch[0], img[1] // patch[1]


def pos_embed_to_grid(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """[1, prefix + h*w, D] ViT table -> [1, H, W, D] SAM map: prefix rows (class/distillation tokens) dropped, the
    patch rows resampled (bicubic, timm's policy) to the detection grid."""
    num_prefix = pos_embed.shape[1] - old_grid[0] * old_grid[1]
    if num_prefix < 0:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows, fewer than the {old_grid[0]}x{old_grid[1]} grid")
    patches = resample_abs_pos_embed(pos_embed[:, num_prefix:].float(), list(new_grid), list(old_grid),
                                     num_prefix_tokens=0)                                   # [1, H*W, D]
    return rearrange(patches, "1 (h w) d -> 1 h w d", h=new_grid[0]).to(pos_embed.dtype)


def convert_vit_state(state: dict[str, Tensor], meta: dict[str, Any], model: VisionTransformerSAM) -> dict[str, Tensor]:
    """A timm ViT / Beit state dict -> `model`'s (SAM layout) keys; rel_pos tables are left to the model's own
    (zero) initialisation."""
    if any("relative_position_bias_table" in k for k in state):
        raise ValueError("this export has BEiT relative position bias tables (a joint 2-D bias per head), which have "
                         "no exact form in ViTDet's decomposed per-axis tables; use an export without relative "
                         "position bias (BEiT's use_rel_pos_bias=false) or an MAE/DeiT export")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(DROPPED_PREFIXES) or key.endswith("relative_position_index"):
            continue
        if key == "pos_embed":
            out[key] = pos_embed_to_grid(value, _source_grid(meta), tuple(model.patch_embed.grid_size))
        elif key.endswith(".attn.q_bias"):
            # BEiT keeps q and v biases and no k bias (a constant zero): the joined qkv bias is [q, 0, v]
            v_bias = state[key[: -len("q_bias")] + "v_bias"]
            out[key[: -len("q_bias")] + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
        elif key.endswith(".attn.v_bias"):
            continue
        elif key.endswith((".gamma_1", ".gamma_2")):  # Beit's LayerScale -> timm's LayerScale module
            out[key[: -len("gamma_1")] + ("ls1.gamma" if key.endswith("1") else "ls2.gamma")] = value
        else:
            out[key] = value
    return out


# The timm architecture an exported ViTDet backbone names (its model_kwargs override every registered default).
VITDET_ARCHITECTURE = "samvit_base_patch16"


def vitdet_from_config(model_kwargs: dict[str, Any], **overrides: Any) -> ViTDetBackbone:
    """A (randomly initialised) ViTDet backbone from the JSON model_kwargs `vitdet_from_backbone` records in
    `model.vitdet_kwargs` (and a finetune_detr export writes): timm's SAM ViT with timm ViT's LayerNorm eps 1e-6
    (SAM's own default 1e-5) and no neck, unless model_kwargs' neck_chans > 0: then SAM's neck (1x1 conv, LayerNorm2d,
    3x3 conv, LayerNorm2d to neck_chans channels: finetune/sam's image encoder)."""
    kwargs = {**model_kwargs, **overrides}
    if "init_values" in kwargs and not kwargs["init_values"]:
        kwargs["init_values"] = None
    kwargs["global_attn_indexes"] = tuple(kwargs.get("global_attn_indexes", ()))
    model = ViTDetBackbone(**kwargs, norm_layer=partial(nn.LayerNorm, eps=1e-6))  # timm's ViT and Beit norms
    if not kwargs.get("neck_chans"):
        # neck_chans=0 still leaves a LayerNorm2d "neck" (a final norm for timm's classifier head): ViTDet has none
        model.neck = nn.Identity()
    model.vitdet_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
                           if k not in ("drop_path_rate",)}
    return model


def vitdet_from_backbone(folder: str | Path, img_size: int | tuple[int, int], window_size: int = 14,
                         global_blocks: Sequence[int] | None = None, rel_pos: bool = True,
                         drop_path_rate: float = 0.0) -> ViTDetBackbone:
    """Build a ViTDet backbone for `img_size` images from a plain ViT export (this project's folder format).

    window_size: tokens per window side (14 in ViTDet, for 1024 px / patch 16 = a 64x64 grid; grids it does not
    divide are padded per block); global_blocks: the blocks with global attention (default ViTDet's evenly spaced
    4); rel_pos: decomposed relative positions in every block, zero-initialised (the source has none).
    Returns the model; `model(images)` [N, 3, H, W] -> [N, D, H/p, W/p].
    """
    meta, state = read_backbone(folder)
    return vitdet_from_state(meta, state, img_size, window_size, global_blocks, rel_pos, drop_path_rate, str(folder))


def vitdet_from_state(meta: dict[str, Any], state: dict[str, Tensor], img_size: int | tuple[int, int],
                      window_size: int = 14, global_blocks: Sequence[int] | None = None, rel_pos: bool = True,
                      drop_path_rate: float = 0.0, folder: str = "the ViT", neck_chans: int = 0) -> ViTDetBackbone:
    """`vitdet_from_backbone` on a plain ViT already in memory: its backbone meta (config) and state dict. A
    from-scratch ViTDet is a random plain ViT converted this way, so it starts from the same initialisation as the
    ViT that pretraining would have started from. neck_chans > 0: SAM's neck to that many channels on top (new
    weights: a plain ViT has none)."""
    state = strip_wrapper_prefixes(state)
    kwargs = meta["model_kwargs"]
    if meta.get("embed_layer"):
        raise ValueError(f"{folder}: a ViT with a {meta['embed_layer'].get('type')} stem is not a plain ViT; "
                         "ViTDet takes patchify-stem ViTs only")
    if "blocks.0.attn.qkv.weight" not in state:
        raise ValueError(f"{folder}: not a plain ViT export ({meta.get('architecture')}): no blocks.N.attn.qkv")
    depth = kwargs.get("depth", 12)
    global_blocks = default_global_blocks(depth) if global_blocks is None else tuple(global_blocks)
    if any(not 0 <= i < depth for i in global_blocks):
        raise ValueError(f"global_blocks {global_blocks} outside the {depth} blocks")
    init_values = kwargs.get("init_values") or None  # 0 / None: no LayerScale
    model = vitdet_from_config(dict(
        img_size=img_size, patch_size=kwargs.get("patch_size", 16), in_chans=kwargs.get("in_chans", 3),
        embed_dim=kwargs.get("embed_dim", 768), depth=depth, num_heads=kwargs.get("num_heads", 12),
        mlp_ratio=kwargs.get("mlp_ratio", 4.0), qkv_bias="blocks.0.attn.qkv.bias" in state
        or "blocks.0.attn.q_bias" in state, qk_norm=kwargs.get("qk_norm", False), init_values=init_values,
        pre_norm=kwargs.get("pre_norm", False), use_abs_pos="pos_embed" in state, use_rel_pos=rel_pos,
        window_size=window_size, global_attn_indexes=list(global_blocks), neck_chans=neck_chans, num_classes=0,
        global_pool=""), drop_path_rate=drop_path_rate)
    converted = convert_vit_state(state, meta, model)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    bad_missing = [k for k in missing if not k.endswith(("rel_pos_h", "rel_pos_w")) and not k.startswith("neck.")]
    if bad_missing or unexpected:
        raise ValueError(f"{folder}: the export does not fit ViTDet: missing {bad_missing[:8]}, "
                         f"unexpected {list(unexpected)[:8]}")
    return model
