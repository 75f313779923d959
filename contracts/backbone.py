"""The backbone contract: one folder format, one writer, one strict loader, one resampling loader.

The folder is timm's own (what `timm.create_model("local-dir:PATH", pretrained=True)` and the Hugging Face Hub read):

    config.json          {"architecture": <timm model name>, "num_classes": K,
                          "model_args": {...},                       # timm.create_model kwargs: the whole geometry
                          "pretrained_cfg": {"mean", "std", "input_size", "num_classes", "label_names" (classifiers),
                                             "crop_pct", "interpolation", ...},
                          "vitpretrain": {"source": "mae", ...}}     # this project's record (timm ignores it)
    model.safetensors    the timm-keyed state dict

Folders written before this format (`backbone.json` {"architecture", "model_kwargs", "pretrained_cfg_overlay", ...}
+ `backbone.safetensors`) are still read by `read_backbone`; `launch/convert_checkpoint.py OLD --out NEW` rewrites
them.

In code every reader sees one dict, the project's `meta`: {"architecture", "model_kwargs", "pretrained_cfg_overlay"
(optional: mean, std, input_size, ...), extras ("source", "classes", "embed_layer", "pos_embed", "best", ...)}, the
backbone.json layout; `timm_config` / `meta_from_config` translate it to and from config.json without loss.

Families: any timm model (ViT, Beit, the windowed ViT of vision_transformer_sam, Swin, MobileViT, ResNet, ...) is
written and loaded the same way. The project's own architectures are registered with timm here, so their exports
load with `timm.create_model("local-dir:...")` after `import contracts.backbone` (config.json says so in
`vitpretrain.requires`): the conv-stem ViT below and VT-ResNet (contracts/visual_transformer.py: Wu et al.'s Visual
Transformers, `vitpretrain_vt_resnet18` / `vitpretrain_vt_resnet34`). Two project extras exist:
- `embed_layer` conv_stem (Xiao et al., arXiv 2106.14881): a callable, which JSON cannot hold, so config.json names
  the timm model this module registers, `vitpretrain_conv_stem_vit` (model_args `conv_stem_channels`): it loads with
  `timm.create_model("local-dir:...")` after `import contracts.backbone` (config.json says so in
  `vitpretrain.requires`); every other export loads with plain timm.
- `pos_embed` sincos: a fixed table stored in the weights like a learned one (so plain timm computes the same
  features); `load_resampled` rebuilds it exactly for a new grid and freezes it.
A backbone trained without positions (MP3: timm's `pos_embed="none"` in model_args) loads as it is; built with
`pos_embed="learn"` (what finetune_cls does), the loader adds its table zero-initialised and reports it as new.

`load_resampled` loads a backbone into a model built for another image size, pooling or head: absolute position
tables resampled with timm's `resample_abs_pos_embed` (bicubic, prefix tokens kept), relative position tables (Beit
per block; Swin and the windowed ViT per window) resized to the model's grid or window with timm's
`resize_rel_pos_bias_table`, the checkpoint's head dropped; the only keys allowed to be missing are the new head's and
a pooling norm's.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import (HybridEmbed, resample_abs_pos_embed, resample_abs_pos_embed_nhwc, resize_rel_pos_bias_table,
                         to_2tuple)
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import register_model
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor, nn
from torch.nn import functional as F

from contracts.visual_transformer import VT_ARCHITECTURES  # importing it registers the VT-ResNets with timm

logger = logging.getLogger(__name__)

# --- the folder -------------------------------------------------------------------------------------------------
CONFIG_NAME = "config.json"               # timm's local-dir / Hub config
WEIGHTS_NAME = "model.safetensors"        # timm's preferred weights file
LEGACY_CONFIG_NAME = "backbone.json"      # the format before config.json: still read, rewritten by convert_checkpoint
LEGACY_WEIGHTS_NAME = "backbone.safetensors"
BACKBONE_EXPORT = "backbone"              # export name of a timm backbone (a task's default `export_name`)
PROJECT_KEY = "vitpretrain"               # config.json's section for this project's record
# open_clip's own folder (what `open_clip.create_model_and_transforms("local-dir:PATH")` reads): a dual encoder's
# export, written by `save_export` for a meta {"format": OPEN_CLIP_FORMAT, "config": <open_clip_config.json>}
OPEN_CLIP_FORMAT = "open_clip"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
# pretrained_cfg keys taken from the registered architecture when the exporter did not give them
DEFAULT_CFG_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct", "fixed_input_size", "first_conv",
                    "classifier")

# Prefixes wrappers put in front of every key: DDP / DeepSpeed engines ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The registered timm constructor for a ViT whose geometry `model_kwargs` spell out in full (the name is only the
# entry point: the kwargs override its registered defaults).
GENERIC_VIT = "vit_base_patch16_224"
# The timm model this module registers for a ViT with a convolutional stem.
CONV_STEM_VIT = "vitpretrain_conv_stem_vit"
# Constructor arguments that only matter while training: applied when building, never written to an export.
TRAINING_ONLY_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                        "patch_drop_rate")
# Keys a backbone may lack when a finetune model is built from it: the new head, and the norm of the pooling the
# model uses when the checkpoint pooled the other way (token pooling keeps `norm`, average pooling has `fc_norm`).
NEW_MODULE_PREFIXES = ("head.", "fc_norm.", "norm.")


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove "module." / "_orig_mod." from the front of keys (repeatedly: a compiled DDP model has both)."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


# --- the project's own family: a ViT with a convolutional stem --------------------------------------------------

class ConvStemEmbed(HybridEmbed):
    """Xiao et al.'s convolutional stem as a ViT patch embedding (usable as `VisionTransformer(embed_layer=...)`).

    n = log2(patch_size) times [3x3 conv stride 2 -> BatchNorm -> ReLU] with `channels[i]` outputs, then a 1x1 conv
    (with bias) to `embed_dim`: images [N, C, H, W] -> tokens [N, (H/p)*(W/p), embed_dim], the same grid as a
    patchify stem of patch size p. Built from timm's `ConvStem` inside timm's `HybridEmbed`, so the keys are
    `patch_embed.backbone.*`.
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


@register_model
def vitpretrain_conv_stem_vit(pretrained: bool = False, conv_stem_channels: tuple[int, ...] = (48, 96, 192, 384),
                              **kwargs: Any) -> nn.Module:
    """timm's VisionTransformer with `ConvStemEmbed` (geometry from kwargs, ViT-B/16 defaults): the conv-stem ViT
    as a timm model, so `timm.create_model("local-dir:...")` rebuilds it (after `import contracts.backbone`)."""
    from timm.models.vision_transformer import _create_vision_transformer

    defaults = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    kwargs = {**defaults, **kwargs, "embed_layer": partial(ConvStemEmbed, channels=tuple(conv_stem_channels))}
    return _create_vision_transformer("vit_base_patch16_224", pretrained=pretrained, **kwargs)


# --- meta (the project's dict) <-> config.json ------------------------------------------------------------------

def _default_pretrained_cfg(architecture: str, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        cfg = timm.models.get_pretrained_cfg(architecture)
    except Exception:  # noqa: BLE001 - an architecture without a registered cfg
        cfg = None
    d = cfg.to_dict() if cfg is not None else {}
    out = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in DEFAULT_CFG_KEYS if d.get(k) is not None}
    if "img_size" in model_kwargs:
        out["input_size"] = [model_kwargs.get("in_chans", 3), *to_2tuple(model_kwargs["img_size"])]
    out.setdefault("mean", list(timm.data.IMAGENET_DEFAULT_MEAN))
    out.setdefault("std", list(timm.data.IMAGENET_DEFAULT_STD))
    out.setdefault("input_size", [3, 224, 224])
    return out


def timm_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The project's meta -> config.json (timm's local-dir layout; `meta_from_config` inverts it)."""
    project = {k: v for k, v in meta.items() if k not in ("architecture", "model_kwargs", "pretrained_cfg_overlay")}
    architecture = meta["architecture"]
    model_args = dict(meta.get("model_kwargs", {}))
    if "init_values" in model_args and model_args["init_values"] is None:
        model_args["init_values"] = 0.0  # no LayerScale: timm drops None kwargs, and beit_*'s default 0.1 would apply
    overlay = dict(meta.get("pretrained_cfg_overlay") or {})
    pretrained_cfg = {**_default_pretrained_cfg(architecture, model_args), **overlay}
    num_classes = model_args.get("num_classes", pretrained_cfg.get("num_classes", 1000))
    pretrained_cfg.setdefault("num_classes", num_classes)
    classes = meta.get("classes")
    if classes:
        pretrained_cfg["label_names"] = [str(c) for c in classes]
    project["pretrained_cfg_overlay"] = sorted(overlay) if "pretrained_cfg_overlay" in meta else None
    embed = meta.get("embed_layer")
    if embed:
        if embed.get("type") != "conv_stem":
            raise ValueError(f"embed_layer {embed!r}: only {{'type': 'conv_stem', 'channels': [...]}} is known")
        project["architecture"] = architecture  # the meta's entry point; config.json names the registered family
        architecture = CONV_STEM_VIT
        model_args["conv_stem_channels"] = list(embed["channels"])
        project["requires"] = "import contracts.backbone (registers vitpretrain_conv_stem_vit with timm)"
    elif architecture in VT_ARCHITECTURES:
        project["requires"] = f"import contracts.backbone (registers {architecture} with timm)"
    config = {"architecture": architecture, "num_classes": num_classes, "model_args": model_args,
              "pretrained_cfg": pretrained_cfg, PROJECT_KEY: project}
    if classes:
        config["label_names"] = pretrained_cfg["label_names"]
    return config


def meta_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json -> the project's meta (also for a timm folder this project did not write)."""
    project = dict(config.get(PROJECT_KEY) or {})
    model_kwargs = dict(config.get("model_args") or {})
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    architecture = config["architecture"]
    overlay_keys = project.pop("pretrained_cfg_overlay", ["mean", "std", "input_size"])
    project.pop("requires", None)
    if architecture == CONV_STEM_VIT:
        channels = model_kwargs.pop("conv_stem_channels")
        architecture = project.pop("architecture", GENERIC_VIT)
        project.setdefault("embed_layer", {"type": "conv_stem", "channels": list(channels)})
    meta: dict[str, Any] = {"architecture": architecture, "model_kwargs": model_kwargs}
    if overlay_keys is not None:
        meta["pretrained_cfg_overlay"] = {k: pretrained_cfg[k] for k in overlay_keys if k in pretrained_cfg}
    if "classes" not in project and (config.get("label_names") or pretrained_cfg.get("label_names")):
        project["classes"] = list(config.get("label_names") or pretrained_cfg["label_names"])
    meta.update(project)
    return meta


# --- writing ----------------------------------------------------------------------------------------------------

def _tensors(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().cpu().contiguous().clone() for k, v in strip_wrapper_prefixes(state).items()}


def is_timm_meta(meta: Mapping[str, Any]) -> bool:
    """Whether an export's meta describes a timm model (architecture + model_kwargs), i.e. goes into a timm folder."""
    return isinstance(meta.get("architecture"), str) and isinstance(meta.get("model_kwargs"), Mapping)


def save_backbone(folder: str | Path, model_or_state: nn.Module | Mapping[str, Tensor],
                  meta: Mapping[str, Any] | None = None, *, architecture: str | None = None,
                  model_args: Mapping[str, Any] | None = None, pretrained_cfg: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """The one writer of a timm folder: <folder>/config.json + model.safetensors (created if needed); returns it.

    Give the project's `meta` (architecture, model_kwargs, pretrained_cfg_overlay, extras), or its parts:
    `architecture`, `model_args`, `pretrained_cfg` (mean, std, input_size, ...) and `extra` (the project's record,
    e.g. {"source": "mae", "classes": [...]}; "classes" also become pretrained_cfg's `label_names`).
    """
    if meta is None:
        if architecture is None:
            raise TypeError("save_backbone needs meta or architecture")
        meta = {"architecture": architecture, "model_kwargs": dict(model_args or {}), **dict(extra or {})}
        if pretrained_cfg is not None:
            meta["pretrained_cfg_overlay"] = dict(pretrained_cfg)
    if isinstance(model_or_state, nn.Module) and isinstance(getattr(model_or_state, "num_classes", None), int):
        # the head the weights have (samvit_* registers num_classes=0, a config would otherwise say 1000)
        meta = {**meta, "model_kwargs": {"num_classes": model_or_state.num_classes, **meta.get("model_kwargs", {})}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = timm_config(meta)
    tensors = _tensors(model_or_state)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "source": str(meta.get("source", ""))})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    logger.info("wrote %s (%d tensors) to %s", config["architecture"], len(tensors), folder)
    return folder


def save_export(folder: str | Path, name: str, model_or_state: nn.Module | Mapping[str, Tensor],
                meta: Mapping[str, Any]) -> Path:
    """Every export a job writes, by its name: the backbone ("backbone") as the timm folder itself; another timm
    model (DeiT's whole classifier) as the timm folder <folder>/<name>/; a dual encoder (meta {"format": "open_clip",
    "config": ...}: FLIP) as open_clip's folder <folder>/<name>/ (open_clip_config.json + open_clip_model.safetensors);
    anything else (the dVAE tokenizer, IPT, the DETR detector) as <folder>/<name>.safetensors + <name>.json. Returns
    the folder written to."""
    folder = Path(folder)
    if name == BACKBONE_EXPORT:
        return save_backbone(folder, model_or_state, meta)
    if is_timm_meta(meta):
        return save_backbone(folder / name, model_or_state, meta)
    if meta.get("format") == OPEN_CLIP_FORMAT:
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        save_file(_tensors(model_or_state), str(out / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
        (out / OPEN_CLIP_CONFIG).write_text(json.dumps(meta["config"], indent=2) + "\n")
        logger.info("wrote open_clip's %s + %s to %s", OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, out)
        return out
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(model_or_state), str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(dict(meta), indent=2) + "\n")
    logger.info("wrote %s.safetensors + %s.json to %s", name, name, folder)
    return folder


# --- reading ----------------------------------------------------------------------------------------------------

def folder_format(folder: str | Path) -> str | None:
    """"timm" (config.json + model.safetensors), "legacy" (backbone.json + backbone.safetensors) or None."""
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        return "timm"
    if (folder / LEGACY_CONFIG_NAME).is_file():
        return "legacy"
    return None


def _files(folder: Path) -> tuple[Path, Path]:
    fmt = folder_format(folder)
    return ((folder / CONFIG_NAME, folder / WEIGHTS_NAME) if fmt == "timm"
            else (folder / LEGACY_CONFIG_NAME, folder / LEGACY_WEIGHTS_NAME))


def find_backbone(path: str | Path) -> Path:
    """The backbone folder: `path` itself or its export/ (a run directory), in either format.

    Raises ValueError saying what is missing.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    for folder in (path, path / "export"):
        if folder_format(folder):
            config, weights = _files(folder)
            if not weights.is_file():
                raise ValueError(f"{folder} has {config.name} but no {weights.name}")
            return folder
    raise ValueError(f"{path} holds no {CONFIG_NAME} (neither there nor in {path / 'export'}); export a backbone "
                     "with a pretraining run or launch/convert_checkpoint.py")


def read_config(folder: str | Path) -> dict[str, Any]:
    """The project's meta of a backbone folder (config.json or a legacy backbone.json), checked for the keys
    `create_from_config` needs."""
    path = _files(Path(folder))[0]
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if path.name == CONFIG_NAME:
        if not isinstance(raw, dict) or not isinstance(raw.get("architecture"), str):
            raise ValueError(f"{path}: expected timm's {{'architecture': <timm name>, 'model_args': {{...}}}}")
        meta = meta_from_config(raw)
    else:
        meta = raw
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture"), str) \
            or not isinstance(meta.get("model_kwargs", {}), dict):
        raise ValueError(f"{path}: expected {{'architecture': <timm name>, 'model_kwargs': {{...}}}}")
    if not timm.is_model(meta["architecture"]):
        raise ValueError(f"{path}: architecture {meta['architecture']!r} is not a timm model")
    return meta


def read_weights(folder: str | Path) -> dict[str, Tensor]:
    """The state dict of a backbone folder (model.safetensors, or a legacy backbone.safetensors)."""
    return load_file(str(_files(Path(folder))[1]))


def read_backbone(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta, state dict) of a backbone folder in either format (`folder` or its export/)."""
    folder = find_backbone(folder)
    return read_config(folder), read_weights(folder)


# --- building ---------------------------------------------------------------------------------------------------

def is_beit(meta: Mapping[str, Any]) -> bool:
    """Whether the meta names timm's `Beit` (beit_*, beitv2_*): relative position tables, q/v biases."""
    return str(meta.get("architecture", "")).startswith("beit")


def vit_geometry_errors(img_size: int, patch_size: int, embed_dim: int, num_heads: int,
                        shown_img_size: Any = None) -> list[str]:
    """The model.* errors of a ViT's geometry, which every task config that builds one checks: whole patches, heads
    dividing the width. `shown_img_size`: how to print img_size when the config holds 0 for a default."""
    errors = []
    if patch_size > 0 and img_size % patch_size:
        shown = img_size if shown_img_size is None else shown_img_size
        errors.append(f"model.img_size={shown} is not a multiple of model.patch_size={patch_size}")
    if num_heads > 0 and embed_dim % num_heads:
        errors.append(f"model.num_heads={num_heads} does not divide model.embed_dim={embed_dim}")
    return errors


def crop_scale_errors(crop_scale: Sequence[float]) -> list[str]:
    """The model.crop_scale error of a RandomResizedCrop area range, which every pretraining config checks (each
    bound's range is the field's LIMITS): the bounds in order."""
    if crop_scale[0] > crop_scale[1]:
        return [f"model.crop_scale={list(crop_scale)} must be (min, max) with min <= max"]
    return []


# Overrides that a job passes to any backbone and that architectures without them (CNNs) are built without.
OPTIONAL_KWARGS = ("img_size", "drop_path_rate", "drop_rate", "dynamic_img_size")


def create_dropping_rejected(architecture: str, kwargs: Mapping[str, Any],
                             droppable: Sequence[str]) -> tuple[nn.Module, dict[str, Any]]:
    """timm.create_model(architecture, pretrained=False, **kwargs), leaving out each key of `droppable` that the
    constructor rejects (a CNN takes no image size or drop path). Returns (model, the kwargs it was built with)."""
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(architecture, pretrained=False, **kwargs), kwargs
        except TypeError as e:
            rejected = [k for k in droppable if k in kwargs and f"'{k}'" in str(e)]
            if not rejected:
                raise
            logger.info("%s takes no %s; built without it", architecture, rejected[0])
            kwargs.pop(rejected[0])


def create_from_config(meta: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The (randomly initialised) timm model `meta` describes, with `overrides` over its model_kwargs.

    `meta["embed_layer"]` (conv stem) and `meta["pos_embed"]` ("sincos", frozen) are applied here; everything else
    is `timm.create_model(meta["architecture"], **model_kwargs)`. An override in OPTIONAL_KWARGS that the
    architecture's constructor rejects is left out.
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
        model, _ = create_dropping_rejected(meta["architecture"], kwargs,
                                            [k for k in OPTIONAL_KWARGS if k in overrides])
    except AssertionError as e:  # timm checks argument combinations with asserts (token pooling without a token)
        raise ValueError(f"{meta['architecture']} with {kwargs}: {e}") from None
    if meta.get("pos_embed") == "sincos":
        set_sincos_pos_embed(model)
    return model


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


def export_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """model_kwargs for an export: JSON values only, training-only arguments left out."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
            if k not in TRAINING_ONLY_KWARGS and k not in ("embed_layer", "pretrained_cfg_overlay")}


# --- loading ----------------------------------------------------------------------------------------------------

def load_strict(folder: str | Path) -> nn.Module:
    """The timm model a backbone folder describes (either format), its weights loaded strictly: a key that does not
    match fails loudly here rather than silently in a finetune. For a config.json folder this is what
    `timm.create_model("local-dir:" + folder, pretrained=True)` builds."""
    meta, state = read_backbone(folder)
    model = create_from_config(meta)
    model.load_state_dict(state, strict=True)
    return model


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
    if pos_embed.ndim == 4:  # [1, h, w, D]: the windowed ViT (timm's vision_transformer_sam) keeps it as a map
        return resample_abs_pos_embed_nhwc(pos_embed, new_size=list(model.patch_embed.grid_size))
    num_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    if old_grid is None:
        side = math.isqrt(pos_embed.shape[1] - num_prefix)
        old_grid = (side, side)
    return resample_abs_pos_embed(pos_embed, new_size=list(model.patch_embed.grid_size), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix, interpolation="bicubic", antialias=True)


def _window(model: nn.Module, key: str) -> tuple[int, int]:
    """The window a relative position table belongs to: its module's `window_size` (Beit: the token grid; Swin:
    the attention window), else the model's token grid."""
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    window = getattr(owner, "window_size", None)
    if window is None:
        window = model.patch_embed.grid_size
    return tuple(to_2tuple(window))


def resize_rel_pos_tables(state: dict[str, Tensor], model: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """Relative position tables resized in place when the model's grid or window differs: Beit's per-block
    [(2h-1)(2w-1) + 3, heads] (unilm's geometric interpolation, the 3 class-token rows kept) and Swin's per-window
    [(2h-1)(2w-1), heads], with timm's `resize_rel_pos_bias_table`; the windowed ViT's per-axis rel_pos_h / rel_pos_w.
    Returns (tables resized, new window) or None."""
    targets = {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_bias_table")}
    resized, window = 0, None
    for key, target in targets.items():
        if key in state and state[key].shape != target.shape:
            window = _window(model, key)
            state[key] = resize_rel_pos_bias_table(state[key], new_window_size=window, new_bias_shape=target.shape)
            resized += 1
    for key in [k for k in state if k.endswith("relative_position_index")]:
        del state[key]  # timm rebuilds the index buffers for its grid (non-persistent)
    # the windowed ViT's decomposed tables [2 * size - 1, head_dim] per axis (size: the window, or the grid in its
    # global blocks): linear along the axis, as its attention does itself for a query/key size it was not built for
    for key, target in model.state_dict().items():
        if key.endswith(("rel_pos_h", "rel_pos_w")) and key in state and state[key].shape != target.shape:
            table = state[key].t().unsqueeze(0)                                            # [1, head_dim, L]
            state[key] = F.interpolate(table.float(), size=target.shape[0], mode="linear")[0].t().to(target.dtype)
            resized, window = resized + 1, window or tuple(model.patch_embed.grid_size)
    return (resized, window) if resized else None


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any],
                 keep_head: bool = False) -> LoadReport:
    """Load a backbone's weights into `model` (built for its own image size, pooling and head).

    The head is dropped unless `keep_head`; the learned position table is resampled to the model's grid (a frozen
    sin-cos table is rebuilt instead); a backbone exported without one (`pos_embed="none"`, MP3) loaded into a model
    with one gets it zero-initialised (reported as new in `missing`); relative position tables are resized; missing
    keys may only be the head's and a pooling norm's (see NEW_MODULE_PREFIXES); any other mismatch is a ValueError
    listing the keys.
    """
    state = dict(state_dict)
    dropped = [] if keep_head else sorted(k for k in state if k.startswith("head."))
    for key in dropped:
        del state[key]
    resampled = None
    pos = getattr(model, "pos_embed", None)
    added = []
    if "pos_embed" not in state and isinstance(pos, Tensor) and not_positional(meta):
        # a backbone trained without positions (MP3) given a table: it starts at zero, so the model's first forward
        # is the backbone's, and the finetune learns positions from there
        state["pos_embed"] = torch.zeros_like(pos)
        added = ["pos_embed"]
        logger.info("position table added, zero-initialised: the backbone was trained without one")
    if "pos_embed" in state and isinstance(pos, Tensor) and not added:
        old = state["pos_embed"]
        state["pos_embed"] = resample_pos_embed(old, model, grid_size(meta))
        if old.shape != state["pos_embed"].shape:
            resampled = (grid_size(meta) or (0, 0), tuple(model.patch_embed.grid_size))
            logger.info("position embeddings resampled from a %dx%d to a %dx%d grid (bicubic)", *resampled[0],
                        *resampled[1])
    tables = resize_rel_pos_tables(state, model)
    if tables:
        logger.info("relative position tables resized to the model's window (%s): %d", tables[1], tables[0])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"the backbone's weights do not fit the model built from its config: {e}") from None
    bad_missing = [k for k in missing if not k.startswith(NEW_MODULE_PREFIXES)]
    bad_unexpected = [k for k in unexpected if not k.startswith(NEW_MODULE_PREFIXES)]
    if bad_missing or bad_unexpected:
        raise ValueError(f"the backbone's keys do not match {meta.get('architecture')}: missing {bad_missing[:8]}, "
                         f"unexpected {bad_unexpected[:8]}")
    if meta.get("pos_embed") == "sincos" and isinstance(pos, Tensor):
        set_sincos_pos_embed(model)  # exact for the new grid, where a resampled table would be an approximation
    missing = added + list(missing)
    if missing or unexpected or dropped:
        logger.info("backbone loaded; new: %s; not used: %s", ", ".join(missing) or "-",
                    ", ".join(list(unexpected) + dropped) or "-")
    return LoadReport(missing, list(unexpected), dropped, resampled)


def not_positional(meta: Mapping[str, Any]) -> bool:
    """Whether the backbone has no absolute position table by design (timm's `pos_embed="none"`: MP3's exports)."""
    return meta.get("model_kwargs", {}).get("pos_embed", "learn") in ("none", "")


def load_resampled(folder: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any], LoadReport]:
    """Build the model a backbone folder describes, with `overrides` (img_size, num_classes, global_pool, ...), and
    load its weights with the resampling policy (`load_weights`). Returns (model, meta, report)."""
    meta, state = read_backbone(folder)
    model = create_from_config(meta, **overrides)
    return model, meta, load_weights(model, state, meta)
