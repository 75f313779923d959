"""Image classification on a timm model: end-to-end finetuning (MAE / BEiT recipe) or a linear probe.

Finetuning (He et al. 2021, arXiv 2111.06377 appendix A.2; facebookresearch/mae main_finetune.py; BEiT, Bao et al.
2021, arXiv 2106.08254): the backbone's position table resampled to the new image size, a new head
(trunc-normal std 2e-5), global average pooling of the patch tokens into a new `fc_norm` (or the class token),
layer-wise lr decay (timm's `param_groups_layer_decay`; the runtime applies each group's `lr_scale`), drop path,
RandAugment + RandomErasing (timm's `create_transform`), Mixup/CutMix with label smoothing (timm's `Mixup` +
`SoftTargetCrossEntropy`; `LabelSmoothingCrossEntropy` when mixing is off; contracts/supervised.py, shared with
DeiT), top-1/top-5 over all ranks (`timm.utils.accuracy`). An EMA of the weights is the runtime's (optim.ema_decay:
val/*_ema, export_ema/).

Linear probe (MAE main_linprobe.py): the trunk frozen and kept in eval mode, its pooled feature (class token or
the backbone's own pooling) through BatchNorm1d without affine parameters (eps 1e-6) and a Linear head
(trunc-normal std 0.01); crop + flip only; plain cross-entropy. The export folds the BatchNorm into the head, so
the result is a plain timm classifier.

A backbone pretrained without positions (MP3's export, `pos_embed="none"`) is finetuned with a learned position
table that starts at zero (`contracts.backbone.load_weights`): the first forward is the pretrained encoder's. The
linear probe reads such a backbone as it is, without a table.

The model comes from `model.init` (finetune/backbone.py): a backbone folder, `none` (a ViT from scratch: learned
or sin-cos positions, class token or not, patchify or convolutional stem), or `timm:NAME` (any timm architecture,
random weights). A windowed backbone (a SimMIM Swin export) takes `model.window_size`, its relative position tables
resized to the new window (SimMIM finetunes its 192-px / window-6 Swin at 224 px / window 7), and keeps its own
average pooling: `model.global_pool` and the new fc_norm apply to ViT and BEiT backbones. Top-1/top-5 are
percentages, as in MAE's and timm's logs.

Multi-scale batches (data.multiscale, MobileViT's recipe: presets mobilevit_*): the train transform takes a size per
batch (`ClassificationTrainTransform.at_size`) and `on_multiscale` rebuilds the model to read any size (timm's
dynamic_img_size for a Swin or ViT; a CNN reads any size), the same weights and the same export.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple, trunc_normal_
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from contracts.supervised import SupervisedRecipe, batch_sums, check_classes
from contracts.backbone import vit_geometry_errors
from contracts.task import TaskHooks
from finetune import backbone as bb

logger = logging.getLogger(__name__)

# The image side of a from-scratch model when model.img_size is 0 (the embedded digits are 32 x 32).
SCRATCH_IMG_SIZE = 32
# Marks the decayed parameter groups; the runtime puts optim.weight_decay on every group with a non-zero value.
WEIGHT_DECAY = 0.05
# The confusion matrix gets class names and per-cell counts up to these many classes (beyond, only colours).
CONFUSION_LABELS_MAX = 30
CONFUSION_COUNTS_MAX = 20


@dataclass
class ClassificationConfig:
    """The `model.*` section of the finetune_cls job.

    Defaults: MAE's finetuning recipe (the settings its ViT-B/L/H runs share) on a small from-scratch ViT; the
    presets change what differs (tiny: a light recipe for the embedded digits on the CPU; vit_b16: ViT-B's layer
    decay and size; linprobe, vit_b16_linprobe: MAE's probe).
    """

    # where the weights come from: a folder with backbone.json + backbone.safetensors (or a run dir with export/),
    # "none" (a ViT from scratch, the fields below), or "timm:NAME" (any timm architecture, random weights)
    init: str = "none"
    mode: Literal["finetune", "linprobe"] = "finetune"   # linprobe: frozen trunk + BatchNorm + linear head
    num_classes: int = 10          # must equal the train set's class count (index.json metadata) when it has one
    img_size: int = 0              # input side, px; 0 = the backbone's (init=DIR), the architecture's (timm:NAME),
                                   # 32 (none); another size resamples the backbone's position table
    window_size: int = 0           # attention window of a windowed backbone (Swin), tokens; 0 = the backbone's; another
                                   # window resizes its relative position tables (SimMIM: 6 at 192 px -> 7 at 224)
    # --- a ViT from scratch (init=none) ---
    patch_size: int = 4            # pixels per token side (the conv stem's total stride)
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pos_embed: Literal["learn", "sincos"] = "learn"   # sincos: fixed 2-D table, not trained (SimpleViT)
    class_token: bool = True       # False needs global_pool=avg (SimpleViT)
    # channels of Xiao et al.'s 3x3 stride-2 conv + BN + ReLU layers (log2(patch_size) of them, then a 1x1 conv to
    # embed_dim) replacing the patchify stem; () = patchify
    conv_stem: tuple[int, ...] = ()
    # --- head ---
    # finetune: avg = mean of the patch tokens into a new fc_norm (MAE), token = class token after the final norm.
    # linprobe uses the backbone's own pooling (backbone.json), this one only with init=none
    global_pool: Literal["avg", "token"] = "avg"
    head_init_std: float = 0.0     # trunc-normal std of the new head; 0 = MAE's: 2e-5 finetune, 0.01 linprobe
    # --- finetuning recipe (linprobe uses MAE's probe recipe instead: crop + flip, cross-entropy) ---
    layer_decay: float = 0.75      # lr scale of layer i of L = decay^(L - i) (embeddings 0, blocks 1..depth); 1 = off
    drop_path: float = 0.1         # stochastic depth, rising linearly to this over the blocks
    drop_rate: float = 0.0         # dropout before the classifier (timm's drop_rate; MobileViT: 0.1)
    mixup: float = 0.8             # Mixup alpha; 0 = off
    cutmix: float = 1.0            # CutMix alpha; 0 = off
    mixup_prob: float = 1.0        # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    label_smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"   # timm RandAugment spec; "" = off
    reprob: float = 0.25           # RandomErasing probability (pixel mode)
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area range (train, both modes)
    hflip: float = 0.5             # horizontal flip probability (train, both modes); 0 where a mirror changes the class
    crop_pct: float = 0.875        # eval: resize to img_size / crop_pct, centre crop img_size
    grad_checkpointing: bool = False   # recompute each block in backward (memory for ViT-L/H)

    # each field's range, checked (with finiteness) by the job config before the dataclass is built
    LIMITS: ClassVar[dict[str, str]] = {
        "num_classes": ">= 2", "img_size": ">= 0", "window_size": ">= 0", "patch_size": ">= 1", "embed_dim": ">= 1",
        "depth": ">= 1",
        "num_heads": ">= 1", "mlp_ratio": "> 0", "conv_stem": ">= 1", "head_init_std": ">= 0",
        "layer_decay": "(0, 1]", "drop_path": "[0, 1)", "drop_rate": "[0, 1)",
        "mixup": ">= 0", "cutmix": ">= 0", "mixup_prob": "[0, 1]",
        "mixup_switch_prob": "[0, 1]", "label_smoothing": "[0, 1)", "reprob": "[0, 1]", "crop_scale": "(0, 1]",
        "hflip": "[0, 1]", "crop_pct": "(0, 1]"}

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)  # a JSON round trip hands back a list
        self.conv_stem = tuple(self.conv_stem)
        errors = []
        init = self.init.strip()
        if init.startswith("timm:"):
            if not timm.is_model(init[5:]):
                close = timm.list_models(f"*{init[5:]}*")[:5]
                errors.append(f"model.init={init}: {init[5:]!r} is not a timm architecture"
                              + (f" (e.g. {', '.join(close)})" if close else ""))
        elif init != "none":
            try:
                bb.find_backbone(init)
            except ValueError as e:
                errors.append(f"model.init={init}: {e}")
        if not self.class_token and self.global_pool == "token":
            errors.append("model.global_pool=token needs model.class_token=true")
        if init == "none":  # the geometry of the from-scratch ViT (a backbone or timm model brings its own)
            errors += vit_geometry_errors(self.img_size or SCRATCH_IMG_SIZE, self.patch_size, self.embed_dim,
                                          self.num_heads, shown_img_size=self.img_size or f"0 (= {SCRATCH_IMG_SIZE})")
            if self.pos_embed == "sincos" and self.embed_dim % 4:
                errors.append(f"model.pos_embed=sincos needs model.embed_dim={self.embed_dim} to be a multiple of 4")
        if self.crop_scale[0] > self.crop_scale[1]:
            errors.append(f"model.crop_scale={list(self.crop_scale)} must be (min, max) with min <= max")
        if self.conv_stem and 2 ** len(self.conv_stem) != self.patch_size:
            errors.append(f"model.conv_stem={list(self.conv_stem)} has {len(self.conv_stem)} stride-2 layers; "
                          f"model.patch_size={self.patch_size} needs log2(patch_size) of them")
        if self.num_classes < 2:
            errors.append(f"model.num_classes={self.num_classes} must be >= 2")
        if not 0 < self.layer_decay <= 1:
            errors.append(f"model.layer_decay={self.layer_decay} must be in (0, 1]")
        if errors:
            raise ValueError("; ".join(errors))


# timm modules whose models finetune_cls re-pools (class token or average + fc_norm); other families (Swin, the
# windowed ViT, CNNs) keep their own pooling
VIT_FAMILY_MODULES = ("timm.models.vision_transformer", "timm.models.beit")


def is_vit_family(meta: dict[str, Any]) -> bool:
    """Whether the backbone is a timm VisionTransformer or Beit (the pooling switches global_pool/fc_norm apply)."""
    return timm.models.model_entrypoint(meta["architecture"]).__module__ in VIT_FAMILY_MODULES


@dataclass
class BuiltModel:
    model: nn.Module                  # the timm model (finetune) or trunk (linprobe: num_classes 0)
    meta: dict[str, Any]              # backbone.json of what `model` is (architecture, model_kwargs, extras)
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    report: bb.LoadReport | None = None


def build_model(cfg: ClassificationConfig, load: bool = True, dynamic: bool = False) -> BuiltModel:
    """The model `cfg.init` names, with cfg's image size, pooling, head (num_classes, or 0 for a probe's trunk),
    drop path and dropout; the backbone's weights loaded when `load`. Its `meta` is the backbone.json of the built
    model. `dynamic`: built to read any image size (timm's dynamic_img_size for a ViT or Swin; a CNN reads any size
    anyway), for multi-scale batches; the meta is the same as without it."""
    probe = cfg.mode == "linprobe"
    num_classes = 0 if probe else cfg.num_classes
    drop_path = 0.0 if probe else cfg.drop_path
    extra: dict[str, Any] = {}
    if cfg.drop_rate and not probe:
        extra["drop_rate"] = cfg.drop_rate
    if dynamic:
        extra["dynamic_img_size"] = True
    init = cfg.init.strip()
    if init.startswith("timm:"):
        name = init[5:]
        kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path, **extra}
        if cfg.img_size:
            kwargs["img_size"] = cfg.img_size
        if cfg.window_size:
            kwargs["window_size"] = cfg.window_size
        try:
            model, used = bb.create_timm(name, **kwargs)
        except TypeError as e:
            if not cfg.window_size or "window_size" not in str(e):
                raise
            raise ValueError(f"model.window_size={cfg.window_size}: timm:{name} has no attention window; leave "
                             "model.window_size=0") from None
        pcfg = model.pretrained_cfg
        img_size = cfg.img_size or int(pcfg.get("input_size", (3, 224, 224))[-1])
        used.pop("dynamic_img_size", None)
        meta = {"architecture": name, "model_kwargs": bb.export_kwargs(used)}
        return BuiltModel(model, meta, img_size, tuple(pcfg.get("mean", IMAGENET_DEFAULT_MEAN)),
                          tuple(pcfg.get("std", IMAGENET_DEFAULT_STD)))
    if init == "none":
        if cfg.window_size:
            raise ValueError(f"model.window_size={cfg.window_size} needs a windowed backbone (model.init=DIR of a Swin "
                             "export, or timm:swin_*); the from-scratch ViT attends globally")
        img_size = cfg.img_size or SCRATCH_IMG_SIZE
        meta = bb.scratch_vit_config(img_size=img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                     depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                     class_token=cfg.class_token, global_pool=cfg.global_pool,
                                     num_classes=num_classes, pos_embed=cfg.pos_embed, conv_stem=cfg.conv_stem)
        model = bb.create_from_config(meta, drop_path_rate=drop_path, **extra)
        return BuiltModel(model, meta, img_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    folder = bb.find_backbone(init)
    source = bb.read_config(folder)
    kwargs = dict(source.get("model_kwargs", {}))
    overrides: dict[str, Any] = {"num_classes": num_classes}
    if cfg.img_size:
        overrides["img_size"] = cfg.img_size
    if cfg.window_size:
        if "window_size" not in kwargs:
            raise ValueError(f"model.window_size={cfg.window_size}: the backbone {init} ({source['architecture']}) "
                             "has no attention window; leave model.window_size=0")
        overrides["window_size"] = cfg.window_size
    if not probe and is_vit_family(source):
        # a probe reads the feature the backbone was trained to give; a ViT finetune picks its pooling
        overrides.update(global_pool=cfg.global_pool, fc_norm=cfg.global_pool != "token")
    elif not probe and cfg.global_pool == "token":
        raise ValueError(f"model.global_pool=token: the backbone {init} ({source['architecture']}) has no class "
                         "token; it keeps its own pooling (model.global_pool=avg)")
    if not probe and bb.not_positional(source):
        # a backbone pretrained without positions (MP3): the finetune adds a learned table, which load_weights
        # starts at zero; a probe reads the features as they were trained
        overrides["pos_embed"] = "learn"
    model = bb.create_from_config(source, drop_path_rate=drop_path, **overrides, **extra)
    report = bb.load_weights(model, bb.read_weights(folder), source) if load else None
    if probe and report is not None and report.missing:
        # a probe trains nothing but its head: a pooling norm the backbone lacks would stay random (mae#186)
        raise ValueError(f"model.init={init}: the backbone lacks {report.missing} for its own pooling "
                         f"({kwargs.get('global_pool')}); a linear probe cannot train them")
    meta = {k: v for k, v in source.items() if k in ("architecture", "embed_layer", "pos_embed")}
    meta["model_kwargs"] = bb.export_kwargs({**kwargs, **overrides})
    img_size = cfg.img_size or int(to_2tuple(kwargs.get("img_size", 224))[0])
    overlay = source.get("pretrained_cfg_overlay", {})
    return BuiltModel(model, meta, img_size, tuple(overlay.get("mean", IMAGENET_DEFAULT_MEAN)),
                      tuple(overlay.get("std", IMAGENET_DEFAULT_STD)), report)


class LinearProbe(nn.Module):
    """Frozen trunk + BatchNorm1d(affine=False) + Linear: images [N, 3, H, W] -> logits [N, K].

    The trunk stays in eval mode (BatchNorm statistics, dropout, drop path) whatever `train()` is called with, and
    runs without autograd: only the BatchNorm statistics and the head learn.
    """

    def __init__(self, trunk: nn.Module, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.trunk = trunk.requires_grad_(False).eval()
        features = trunk.num_features
        self.bn = nn.BatchNorm1d(features, affine=False, eps=1e-6)
        self.head = nn.Linear(features, num_classes)
        trunc_normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.trunk.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.trunk(x)  # [N, D]: pooled, normalised pre-logits (the trunk has no head)
        return self.head(self.bn(features.to(self.head.weight.dtype)))

    def folded_head(self) -> tuple[Tensor, Tensor]:
        """The head with the BatchNorm's running statistics folded in (see `fold_batchnorm`)."""
        return fold_batchnorm(self.head.weight, self.head.bias, self.bn.running_mean, self.bn.running_var,
                              self.bn.eps)


def fold_batchnorm(weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                   eps: float) -> tuple[Tensor, Tensor]:
    """Linear(BatchNorm1d(x)) without affine, in eval mode, as one Linear: weight [K, D], bias [K], running
    statistics [D] -> (weight [K, D], bias [K]) with `x @ weight.T + bias` equal to the pair (float32)."""
    scale = torch.rsqrt(running_var.float() + eps)  # [D]
    folded = weight.float() * scale
    return folded, bias.float() - folded @ running_mean.float()


def classification_features(model: nn.Module, imgs: Tensor) -> Tensor:
    """Token features [N, T, D] of the task's model (finetune or probe), equal to the exported timm model's
    `forward_features(imgs)`; imgs: [N, 3, H, W] normalised."""
    trunk = model.trunk if isinstance(model, LinearProbe) else model
    return trunk.forward_features(imgs)


def render_confusion(confusion: Tensor, names: list[str]) -> Tensor:
    """confusion: [K, K] counts (rows true, columns predicted) -> [3, H, W] float image in [0, 1].

    Rows are normalised (colour = fraction of that true class); counts are written in the cells for few classes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = confusion.double().cpu().numpy()
    k = counts.shape[0]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 3.0 + 0.35 * k)
    fig = Figure(figsize=(side, side), dpi=80)
    canvas = FigureCanvasAgg(fig)  # renders off-screen, whatever matplotlib backend the process chose
    ax = fig.add_subplot()
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = counts.sum()
    ax.set_title(f"top-1 {100 * np.trace(counts) / max(total, 1):.1f}% of {int(total)}")
    if k <= CONFUSION_LABELS_MAX:
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= CONFUSION_COUNTS_MAX:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # [H, W, 4] uint8
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


class ClassificationTask(TaskHooks):
    """Finetuning or linear probing for the shared runtime (contracts/task.py: the Task interface)."""

    required_members = ("image", "cls")  # a sample without its label is counted as missing_label

    def __init__(self, cfg: ClassificationConfig) -> None:
        from data_pipeline.transforms import ClassificationEvalTransform, ClassificationTrainTransform

        self.cfg = cfg
        self.probe = cfg.mode == "linprobe"
        built = build_model(cfg)
        self.meta = built.meta
        self.img_size, self.mean, self.std = built.img_size, built.mean, built.std
        self.class_names = [str(i) for i in range(cfg.num_classes)]
        if self.probe:
            self.model: nn.Module = LinearProbe(built.model, cfg.num_classes, cfg.head_init_std or 0.01)
        else:
            self.model = built.model
            head = self.model.get_classifier()
            if isinstance(head, nn.Linear):  # MAE: trunc_normal_(head.weight, std=2e-5)
                trunc_normal_(head.weight, std=cfg.head_init_std or 2e-5)
                nn.init.zeros_(head.bias)
            if cfg.grad_checkpointing:
                self.model.set_grad_checkpointing(True)

        if self.probe:  # MAE's probe: RandomResizedCrop + flip, nothing else
            self.train_transform: Callable[[dict], dict] = ClassificationTrainTransform(
                self.img_size, auto_augment=None, re_prob=0.0, scale=cfg.crop_scale, color_jitter=0.0,
                hflip=cfg.hflip, mean=self.mean, std=self.std)
        else:
            self.train_transform = ClassificationTrainTransform(
                self.img_size, auto_augment=cfg.auto_augment or None, re_prob=cfg.reprob, scale=cfg.crop_scale,
                hflip=cfg.hflip, mean=self.mean, std=self.std)
        self.eval_transform: Callable[[dict], dict] = ClassificationEvalTransform(
            self.img_size, crop_pct=cfg.crop_pct, mean=self.mean, std=self.std)

        # Mixup/CutMix and the loss (contracts/supervised.py); a probe: plain cross-entropy, no mixing
        self.recipe = SupervisedRecipe(cfg.num_classes) if self.probe else SupervisedRecipe(
            cfg.num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix, mixup_prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing)
        self.confusion: Tensor | None = None   # [K, K] of the last evaluation (rows true, columns predicted)
        self._flops: float | None = None

        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        logger.info("%s: %s from %s, %d px, %d classes, %.2fM parameters (%.2fM trained)%s", cfg.mode,
                    self.meta["architecture"], cfg.init, self.img_size, cfg.num_classes, total / 1e6,
                    trainable / 1e6, "")
        if self.probe:
            logger.info("linprobe: MAE's probe recipe (crop + flip, cross-entropy); model.mixup, cutmix, "
                        "label_smoothing, auto_augment, reprob, drop_path and layer_decay are not used")

    # --- the runtime's hooks --------------------------------------------------------------------------------

    def on_dataset(self, metadata: dict[str, Any]) -> None:
        """Check the train set against the head: a classification set with num_classes classes; keep the names."""
        self.class_names = check_classes(metadata, self.cfg.num_classes, "finetune_cls") or self.class_names

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """Multi-scale batches (data.multiscale): the model is rebuilt to read every size (`build_model(dynamic=True)`:
        timm's dynamic_img_size, i.e. a Swin's attention masks and a ViT's position table per input size; a CNN such
        as MobileViT reads any size as it is) and given the same weights. Evaluation stays at model.img_size."""
        try:
            built = build_model(self.cfg, load=False, dynamic=True).model
        except (TypeError, AssertionError, ValueError) as e:
            raise ValueError(f"model.init={self.cfg.init} ({self.meta['architecture']}) cannot read several image "
                             f"sizes: {str(e).splitlines()[0][:300]}") from None
        trunk = self.model.trunk if isinstance(self.model, LinearProbe) else self.model
        built.load_state_dict(trunk.state_dict())
        built.train(trunk.training)
        if isinstance(self.model, LinearProbe):
            self.model.trunk = built.requires_grad_(False).eval()
        else:
            if self.cfg.grad_checkpointing:
                built.set_grad_checkpointing(True)
            self.model = built
        logger.info("multi-scale batches at %s px: %s rebuilt to read any image size", list(sizes),
                    self.meta["architecture"])

    def param_groups(self) -> list[dict]:
        """Finetune: timm's layer-decay groups (each with `lr_scale`; no decay for 1-D tensors, position table,
        class token), or its weight-decay groups with layer_decay 1. Probe: the head only; the weight is
        LARS-adapted (MAE's LARS adapts every >= 2-D tensor), the bias neither adapted nor decayed."""
        if self.probe:
            head = self.model.head
            return [{"params": [head.weight], "weight_decay": WEIGHT_DECAY, "always_adapt": True},
                    {"params": [head.bias], "weight_decay": 0.0}]
        no_decay = sorted(self.model.no_weight_decay()) if hasattr(self.model, "no_weight_decay") else []
        if self.cfg.layer_decay < 1:
            return param_groups_layer_decay(self.model, weight_decay=WEIGHT_DECAY, no_weight_decay_list=no_decay,
                                            layer_decay=self.cfg.layer_decay)
        return param_groups_weight_decay(self.model, weight_decay=WEIGHT_DECAY, no_weight_decay_list=no_decay)

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images, labels, target = self.recipe.mix(batch["image"], batch["label"])  # target: [N, K] when mixing
        logits = model(images).float()
        return self.recipe.loss(logits, target), self.recipe.train_metrics(logits, labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Loss (plain cross-entropy), top-1 and top-5 (%) over the non-padding samples of all ranks. Keeps the
        confusion matrix for `images`. Collective."""
        was_training = model.training
        model.eval()
        k = self.cfg.num_classes
        topk = min(5, k)
        device = next(self.model.parameters()).device
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        confusion = torch.zeros(k, k, dtype=torch.int64, device=device)
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            keep = ~batch["is_padding"].to(labels.device).bool() if "is_padding" in batch \
                else torch.ones_like(labels, dtype=torch.bool)
            images, labels = images[keep], labels[keep]
            if labels.numel() == 0:
                continue
            logits = model(images).float()
            sums += batch_sums(logits, labels, topk)
            pred = logits.argmax(dim=-1)
            confusion.view(-1).index_add_(0, labels * k + pred, torch.ones_like(labels))
        model.train(was_training)
        if distributed:
            dist.all_reduce(sums)
            dist.all_reduce(confusion)
        self.confusion = confusion.cpu()
        loss, top1, top5, count = sums.tolist()
        n = max(count, 1.0)
        return {"val_loss": loss / n if count else math.nan, "val_top1": 100.0 * top1 / n,
                "val_top5": 100.0 * top5 / n}

    def evaluate_ema(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """`evaluate` of the runtime's EMA weights; the confusion matrix stays the model's."""
        confusion = self.confusion
        results = self.evaluate(model, loader)
        self.confusion = confusion
        return results

    def images(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The last evaluation's confusion matrix as a [3, H, W] picture (nothing before the first evaluation)."""
        if self.confusion is None:
            return {}
        return {"confusion_matrix": render_confusion(self.confusion, self.class_names)}

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The trained classifier with timm keys (backbone + head) and its backbone.json (num_classes, classes).

        Finetune: the model's own keys. Probe: the trunk's keys and `head.*` = the BatchNorm folded into the
        linear head. Either loads with `timm.create_model(architecture, **model_kwargs)` (plus the conv stem /
        sin-cos extras through finetune.backbone.create_from_config).
        """
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if self.probe:
            weight, bias = fold_batchnorm(state["head.weight"], state["head.bias"], state["bn.running_mean"],
                                          state["bn.running_var"], self.model.bn.eps)
            tensors = {k[6:]: v for k, v in state.items() if k.startswith("trunk.")}
            tensors.update({"head.weight": weight, "head.bias": bias})
        else:
            tensors = dict(state)
        meta = copy.deepcopy(self.meta)
        meta["model_kwargs"]["num_classes"] = self.cfg.num_classes
        meta["pretrained_cfg_overlay"] = {"mean": list(self.mean), "std": list(self.std),
                                          "input_size": [3, self.img_size, self.img_size],
                                          "crop_pct": self.cfg.crop_pct, "interpolation": "bicubic",
                                          "num_classes": self.cfg.num_classes}
        meta.update(source="finetune_cls", mode=self.cfg.mode, init=self.cfg.init, classes=self.class_names)
        return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
                for k, v in tensors.items()}, meta

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) for one image, counted by FlopCounterMode on a meta-device copy."""
        if self._flops is None:
            with torch.device("meta"):
                model = build_model(self.cfg, load=False).model
                if self.probe:
                    model = LinearProbe(model, self.cfg.num_classes)
                # two images: a training-mode BatchNorm (the probe's) refuses a batch of one
                images = torch.zeros(2, 3, self.img_size, self.img_size)
            with FlopCounterMode(display=False) as counter:
                model(images).float().sum().backward()  # a probe's backward stops at its head
            self._flops = float(counter.get_total_flops()) / 2
        return self._flops
