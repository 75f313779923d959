"""Published checkpoints of the reference implementations -> timm backbones (keys, architecture, kwargs).

Each format is recognised by its keys, as timm's `checkpoint_filter_fn`s do; the geometry is read from tensor shapes
and the weights get the key names of the timm model that computes the same features:

    mae             facebookresearch/mae `mae_pretrain_vit_*.pth` (encoder only)        -> VisionTransformer
    mae_full        `mae_visualize_vit_*.pth`, `*_full.pth`: + mask_token, decoder_* (dropped)
    mae_finetuned   `mae_finetuned_vit_*.pth`: fc_norm (average pooling) + head (dropped)
    deit            facebookresearch/deit `deit_*_patch16_224-*.pth`: head (dropped)
    deit_distilled  `deit_*_distilled_patch16_224-*.pth`: cls + dist tokens kept, head and head_dist dropped
                                                                                        -> VisionTransformerDistilled
    beit            microsoft/unilm beit `beit_*_pt22k.pth` (shared relative position table) and finetuned
                    `beit_*_ft22k.pth` (per-block tables, fc_norm, head)                 -> Beit

BEiT: timm's `Beit` names q_bias/v_bias and the LayerScale gamma_1/gamma_2 as unilm does, but its
`checkpoint_filter_fn` does not expand the shared table, so `rel_pos_bias.relative_position_bias_table` is copied
into every block's `attn.relative_position_bias_table` here (added to a block's own table if it has one: both are
gathered with the same index, so the sum of the biases is the bias of the summed tables). The index buffers are
dropped: timm rebuilds them (non-persistent).

A plain ViT's weights do not store its number of attention heads (qkv is [3D, D] however it is split): BEiT's tables
give it; otherwise it is the standard one for the width (ViT-Ti/S/B/L/H), or it must be passed as `num_heads`.
"""
import argparse
import logging
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import isqrt
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                 IMAGENET_INCEPTION_STD)
from torch import Tensor

from pretrain.export import strip_wrapper_prefixes, timm_architecture, vit_config
from pretrain.mae import MAEConfig, MaskedAutoencoderViT

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    "mae": "MAE encoder (mae_pretrain_vit_*.pth: cls_token, pos_embed, patch_embed, blocks, norm)",
    "mae_full": "MAE encoder + decoder (mae_visualize_vit_*.pth: + mask_token, decoder_*)",
    "mae_finetuned": "MAE finetuned classifier (+ fc_norm, head)",
    "deit": "DeiT classifier (+ head)",
    "deit_distilled": "DeiT distilled (+ dist_token, head, head_dist)",
    "beit": "BEiT (unilm: rel_pos_bias.relative_position_bias_table or per-block tables, q_bias/v_bias, gamma_1/2)",
}
# Where a checkpoint file keeps its state dict (MAE/DeiT/BEiT: "model"; DeepSpeed: "module"; Lightning: "state_dict").
CHECKPOINT_WRAPPERS = ("model", "module", "state_dict")
# Width -> heads of the standard ViTs (Ti, S, B, L, H/14): 64 dims per head, except ViT-H's 80.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Source keys only the pretraining objective uses (prefixes and suffixes); neither backbone nor source model keeps them.
PRETRAINING_ONLY_PREFIXES = ("decoder_", "mask_token", "lm_head.", "cls_pt_layers.")
PRETRAINING_ONLY_SUFFIXES = ("relative_position_index",)
# Classifier heads: the source model keeps them, the backbone (num_classes=0) does not.
HEAD_PREFIXES = ("head.", "head_dist.")
SHARED_REL_POS_TABLE = "rel_pos_bias.relative_position_bias_table"
# BEiT's gamma init value as a timm kwarg: any value works, it only makes timm create gamma_1/gamma_2, which the
# checkpoint then fills.
LAYER_SCALE_MARKER = 0.1
# ... and without gammas: 0.0, not None. timm.create_model drops None-valued kwargs, so `init_values=None` would let
# the registered default (beit_*: 0.1, i.e. gammas) apply; timm's Beit creates gammas only `if init_values`.
NO_LAYER_SCALE = 0.0


class UnknownFormatError(ValueError):
    """A checkpoint whose keys or shapes match none of `FORMATS`."""


@dataclass
class ImportedBackbone:
    """A reference checkpoint mapped to a timm backbone."""

    format: str                          # a key of FORMATS
    state_dict: dict[str, Tensor]        # timm keys, heads and pretraining-only tensors left out
    config: dict[str, Any]               # backbone.json: architecture, model_kwargs, source, pretrained_cfg_overlay
    dropped: list[str]                   # source keys left out
    source_state_dict: dict[str, Tensor]  # the unwrapped source, to build the source model for comparison


@dataclass
class Geometry:
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


def unwrap(checkpoint: Any) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: descend into "model"/"module"/"state_dict", strip "module." prefixes."""
    while isinstance(checkpoint, Mapping):
        inner = next((checkpoint[k] for k in CHECKPOINT_WRAPPERS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            break
        checkpoint = inner
    if not isinstance(checkpoint, Mapping):
        raise UnknownFormatError(f"the file holds a {type(checkpoint).__name__}, not a state dict")
    return strip_wrapper_prefixes({k: v for k, v in checkpoint.items() if isinstance(v, Tensor)})


def load_checkpoint_file(path: str | Path) -> dict[str, Tensor]:
    """A .pth/.pt/.bin (torch.load, weights_only) or .safetensors file -> its unwrapped state dict.

    Training checkpoints of the reference repos also pickle their argparse `args`; that one class is allowed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return unwrap(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
            raise UnknownFormatError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would suggest weights_only=False: this is the project's refusal
        try:
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n != "argparse.Namespace"]
        except Exception:  # noqa: BLE001 - a legacy (non-zip) file: torch cannot list them
            names = []
        what = f"pickles {', '.join(names[:3])}" if names else "pickles objects other than tensors and plain types"
        raise UnknownFormatError(f"{path} {what}: not a trustworthy checkpoint, refused without unpickling it (a "
                                 "checkpoint of weights needs nothing but tensors and plain types)") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError... for a file that is not one of its
        raise UnknownFormatError(f"{path}: cannot be read as a torch checkpoint ({_first_line(e)}); expected a "
                                 ".pth/.pt/.bin written by torch.save, or a .safetensors file") from None
    return unwrap(checkpoint)


def _first_line(error: BaseException) -> str:
    text = (str(error).splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_pretraining_only(key: str) -> bool:
    return key.startswith(PRETRAINING_ONLY_PREFIXES) or key.endswith(PRETRAINING_ONLY_SUFFIXES)


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """The FORMATS name whose keys `state_dict` has (after `unwrap`); UnknownFormatError if none."""
    keys = set(state_dict)
    is_vit = {"cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"} <= keys and any(
        k.startswith("blocks.0.attn.qkv.") for k in keys)
    if is_vit:
        if SHARED_REL_POS_TABLE in keys or "blocks.0.attn.q_bias" in keys \
                or "blocks.0.attn.relative_position_bias_table" in keys:
            return "beit"
        if "pos_embed" in keys:
            if "dist_token" in keys:
                return "deit_distilled"
            if "mask_token" in keys or any(k.startswith("decoder_") for k in keys):
                return "mae_full"
            if "fc_norm.weight" in keys:
                return "mae_finetuned"
            return "deit" if "head.weight" in keys else "mae"
    sample = ", ".join(sorted(keys)[:8]) + (", ..." if len(keys) > 8 else "")
    expected = "; ".join(f"{name}: {what}" for name, what in FORMATS.items())
    raise UnknownFormatError(f"its keys match no known checkpoint format (expected one of {expected}); "
                             f"it has {len(keys)} tensors: {sample}")


def _depth(state_dict: Mapping[str, Tensor]) -> int:
    return 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))


def _grid_from_pos_embed(pos_embed: Tensor, num_prefix_tokens: int) -> int:
    rows = pos_embed.shape[1] - num_prefix_tokens
    grid = isqrt(rows)
    if grid * grid != rows:
        raise UnknownFormatError(f"pos_embed has {rows} patch rows (after {num_prefix_tokens} prefix tokens): "
                                 "not a square grid")
    return grid


def _grid_from_rel_pos_table(table: Tensor) -> int:
    """BEiT's table has (2G-1)^2 + 3 rows for a G x G grid (+3: cls->token, token->cls, cls->cls)."""
    side = isqrt(table.shape[0] - 3)
    if side * side != table.shape[0] - 3 or side % 2 == 0:
        raise UnknownFormatError(f"relative position table with {table.shape[0]} rows is not (2G-1)^2 + 3")
    return (side + 1) // 2


def _geometry(state_dict: Mapping[str, Tensor], grid: int, num_heads: int | None) -> Geometry:
    embed_dim, in_chans, ph, pw = state_dict["patch_embed.proj.weight"].shape
    if ph != pw:
        raise UnknownFormatError(f"non-square patches ({ph} x {pw}) are not supported")
    if num_heads is None:
        num_heads = HEADS_BY_WIDTH.get(embed_dim)
        if num_heads is None:
            raise UnknownFormatError(f"width {embed_dim} is not a standard ViT's and the checkpoint does not store "
                                     "its number of attention heads: give it (--num-heads N)")
    if embed_dim % num_heads:
        raise UnknownFormatError(f"{num_heads} heads do not divide the width {embed_dim}")
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    return Geometry(img_size=grid * ph, patch_size=ph, in_chans=in_chans, embed_dim=embed_dim,
                    depth=_depth(state_dict), num_heads=num_heads, mlp_ratio=hidden / embed_dim)


def _overlay(config: dict[str, Any], mean: tuple, std: tuple, g: Geometry) -> dict[str, Any]:
    config["pretrained_cfg_overlay"] = {"mean": list(mean), "std": list(std),
                                        "input_size": [g.in_chans, g.img_size, g.img_size]}
    return config


def _split(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(backbone tensors, dropped keys): pretraining-only tensors and classifier heads left out."""
    kept, dropped = {}, []
    for k, v in state_dict.items():
        if _is_pretraining_only(k) or k.startswith(HEAD_PREFIXES):
            dropped.append(k)
        else:
            kept[k] = v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
    return kept, dropped


def _import_vit(state_dict: dict[str, Tensor], fmt: str, num_heads: int | None) -> ImportedBackbone:
    """MAE (all three) and DeiT: timm VisionTransformer(Distilled) keys already; drop, infer, describe."""
    out, dropped = _split(state_dict)
    distilled = fmt == "deit_distilled"
    g = _geometry(out, _grid_from_pos_embed(out["pos_embed"], 2 if distilled else 1), num_heads)
    extra: dict[str, Any] = {"qkv_bias": "blocks.0.attn.qkv.bias" in out}
    if g.in_chans != 3:
        extra["in_chans"] = g.in_chans
    # MAE's finetuned models pool with fc_norm and have no final norm: timm's global_pool="avg" is that layout
    config = vit_config(img_size=g.img_size, patch_size=g.patch_size, embed_dim=g.embed_dim, depth=g.depth,
                        num_heads=g.num_heads, mlp_ratio=g.mlp_ratio, source=fmt,
                        global_pool="avg" if "fc_norm.weight" in out else "token",
                        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, **extra)
    config["pretrained_cfg_overlay"]["input_size"][0] = g.in_chans
    if distilled:
        config["architecture"] = timm_architecture(g.img_size, g.patch_size, g.embed_dim, g.depth, g.num_heads,
                                                   template="deit_{size}_distilled_patch{patch}_{img}",
                                                   generic="deit_base_distilled_patch16_224")
    return ImportedBackbone(fmt, out, config, dropped, state_dict)


def _import_beit(state_dict: dict[str, Tensor], num_heads: int | None) -> ImportedBackbone:
    out, dropped = _split(state_dict)
    shared = out.pop(SHARED_REL_POS_TABLE, None)
    table = shared if shared is not None else out.get("blocks.0.attn.relative_position_bias_table")
    if table is not None:
        if num_heads is not None and num_heads != table.shape[1]:
            raise UnknownFormatError(f"num_heads={num_heads} given, but the relative position tables have "
                                     f"{table.shape[1]} heads")
        num_heads, grid = table.shape[1], _grid_from_rel_pos_table(table)
    elif "pos_embed" in out:
        grid = _grid_from_pos_embed(out["pos_embed"], 1)
    else:
        raise UnknownFormatError("BEiT checkpoint with neither position embeddings nor relative position tables")
    g = _geometry(out, grid, num_heads)
    if shared is not None:
        for i in range(g.depth):
            key = f"blocks.{i}.attn.relative_position_bias_table"
            out[key] = shared.clone() if key not in out else out[key] + shared
    version2 = any(k.startswith("cls_pt_layers.") for k in state_dict)  # BEiT v2's patch-aggregation head
    size_args = (g.img_size, g.patch_size, g.embed_dim, g.depth, g.num_heads)
    architecture = timm_architecture(*size_args, template="beitv2_{size}_patch{patch}_{img}" if version2
                                     else "beit_{size}_patch{patch}_{img}", generic="beit_base_patch16_224")
    kwargs: dict[str, Any] = {
        "img_size": g.img_size, "patch_size": g.patch_size, "in_chans": g.in_chans, "embed_dim": g.embed_dim,
        "depth": g.depth, "num_heads": g.num_heads, "mlp_ratio": g.mlp_ratio,
        "qkv_bias": "blocks.0.attn.q_bias" in out,
        "use_abs_pos_emb": "pos_embed" in out,
        "use_rel_pos_bias": "blocks.0.attn.relative_position_bias_table" in out,
        "use_shared_rel_pos_bias": False,
        "init_values": LAYER_SCALE_MARKER if "blocks.0.gamma_1" in out else NO_LAYER_SCALE,
        "num_classes": 0,
        # BEiT finetunes with average pooling; a pretrained checkpoint keeps its final norm before the pooling
        "global_pool": "avg",
        "use_fc_norm": "fc_norm.weight" in out,
    }
    config = {"architecture": architecture, "model_kwargs": kwargs, "source": "beit"}
    mean, std = ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if version2
                 else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))
    return ImportedBackbone("beit", out, _overlay(config, mean, std, g), dropped, state_dict)


def import_reference(state_dict: Mapping[str, Tensor], num_heads: int | None = None) -> ImportedBackbone:
    """An unwrapped reference state dict -> timm backbone weights and backbone.json (see the module docstring)."""
    state_dict = strip_wrapper_prefixes(state_dict)
    fmt = detect_format(state_dict)
    imported = _import_beit(state_dict, num_heads) if fmt == "beit" else _import_vit(state_dict, fmt, num_heads)
    logger.info("format %s (%s): %s with %s; left out %d tensors (%s)", fmt, FORMATS[fmt],
                imported.config["architecture"],
                ", ".join(f"{k}={v}" for k, v in imported.config["model_kwargs"].items()), len(imported.dropped),
                ", ".join(sorted({k.split(".")[0] for k in imported.dropped})) or "none")
    return imported


def mae_encoder_features(model: MaskedAutoencoderViT, imgs: Tensor) -> Tensor:
    """imgs: [N, 3, H, W] -> [N, 1 + L, D]: MAE's encoder on every patch, in patch order (timm's forward_features).

    Ascending noise keeps patch i at position i (MAE keeps the smallest noise first), so nothing is shuffled.
    """
    n, num_patches = imgs.shape[0], model.num_patches
    noise = torch.arange(num_patches, dtype=torch.float32, device=imgs.device).expand(n, num_patches)
    latent, _, _ = model.forward_encoder(imgs, 0.0, noise)
    return latent


def _mae_source(imported: ImportedBackbone) -> Callable[[Tensor], Tensor]:
    kw, src = imported.config["model_kwargs"], imported.source_state_dict
    decoder = "decoder_embed.weight" in src
    cfg = MAEConfig(img_size=kw["img_size"], patch_size=kw["patch_size"], embed_dim=kw["embed_dim"],
                    depth=kw["depth"], num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"],
                    # decoder heads are not in the weights and do not touch the encoder: one head fits any width
                    decoder_embed_dim=src["decoder_embed.weight"].shape[0] if decoder else 16,
                    decoder_depth=1 + max(int(k.split(".")[1]) for k in src if k.startswith("decoder_blocks."))
                    if decoder else 1, decoder_num_heads=1)
    model = MaskedAutoencoderViT(cfg)
    missing, unexpected = model.load_state_dict(src, strict=False)
    missing = [k for k in missing if decoder or not k.startswith(("decoder_", "mask_token"))]
    if missing or unexpected:
        raise UnknownFormatError(f"the {imported.format} checkpoint does not load into MAE: missing {missing}, "
                                 f"unexpected {unexpected}")
    model.eval()
    return lambda imgs: mae_encoder_features(model, imgs)


def _timm_source(imported: ImportedBackbone) -> Callable[[Tensor], Tensor]:
    """timm's implementation of the source's own layout: its heads, and BEiT's shared table where it has one."""
    src = {k: v for k, v in imported.source_state_dict.items() if not _is_pretraining_only(k)}
    kwargs = dict(imported.config["model_kwargs"])
    if "head.weight" in src:
        kwargs["num_classes"] = src["head.weight"].shape[0]
    if SHARED_REL_POS_TABLE in src:
        kwargs["use_shared_rel_pos_bias"] = True
        kwargs["use_rel_pos_bias"] = "blocks.0.attn.relative_position_bias_table" in src
    try:
        model = timm.create_model(imported.config["architecture"], pretrained=False, **kwargs)
        model.load_state_dict(src, strict=True)
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:  # timm's asserts; load_state_dict's report
        detail = " ".join(str(e).split())
        raise UnknownFormatError(f"the {imported.format} checkpoint does not load into timm's "
                                 f"{imported.config['architecture']} built for its layout: {detail}") from None
    model.eval()
    return model.forward_features


def source_features(imported: ImportedBackbone) -> Callable[[Tensor], Tensor]:
    """The source checkpoint's own model as a function imgs [N, C, H, W] -> features [N, T, D], in eval mode.

    MAE: this project's MAE (the reference's forward_encoder) on every patch. DeiT and BEiT: timm's implementation
    of the source layout (heads kept, BEiT's shared relative position table as one module).
    """
    fn = _mae_source(imported) if imported.format in ("mae", "mae_full") else _timm_source(imported)

    def features(imgs: Tensor) -> Tensor:
        with torch.no_grad():
            return fn(imgs)
    return features

