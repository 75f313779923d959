"""DeiT: a ViT trained with a distillation token against a frozen teacher, and the DeiT III recipe.

Touvron et al., "Training data-efficient image transformers & distillation through attention", arXiv 2012.12877;
"DeiT III: Revenge of the ViT", arXiv 2204.07118. Adapted from facebookresearch/deit@7e160fe (models.py, losses.py,
engine.py, main.py, augment.py), with timm's models, Mixup/CutMix, RandAugment and losses (the recipe it shares with
finetune.classification lives in contracts/supervised.py; the EMA of the weights is the runtime's, optim.ema_decay):

- the student is timm's `VisionTransformerDistilled`: tokens [cls, dist, patches], a position table of L + 2 rows,
  heads `head` (on cls) and `head_dist` (on dist). In training both logits feed the loss; in eval the model returns
  the mean of the two heads' LOGITS, timm's and the reference code's rule (the paper adds the softmaxes instead;
  the two rarely disagree on the argmax, and the logit mean is what the exported timm model computes, so the
  reported top-1 is the exported model's). With `distill=none` the student is a plain timm `VisionTransformer`
  (DeiT without the distillation token).
- loss = (1 - alpha) * base(cls logits, mixed targets) + alpha * distill(dist logits, teacher logits), where base is
  the soft-target cross-entropy of the Mixup/CutMix targets with label smoothing (timm's SoftTargetCrossEntropy),
  or DeiT III's binary cross-entropy on the binarised mixed targets (timm's BinaryCrossEntropy, threshold 0);
  `distillation_loss` gives the distillation term:
    soft: tau^2 * KL(softmax(t / tau) || softmax(s / tau)). `kl_reduction=batchmean` (default) divides the summed
          KL by the batch size: the mean per-sample KL of the paper's formula, whose gradient does not depend on
          the number of classes. `kl_reduction=legacy` divides by batch x classes, as the reference code does
          (`reduction='sum' ... / outputs_kd.numel()`, deit#61): the same term K times smaller (1000x on ImageNet),
          kept to reproduce the published soft-distillation runs.
    hard: cross-entropy of the dist logits against the teacher's argmax, without label smoothing (deit#56).
  alpha defaults to the paper's values: 0.1 with tau 3 for soft, 1/2 for hard (the reference code's defaults,
  alpha 0.5 and tau 1, suit hard distillation only).
- the teacher is frozen: `requires_grad_(False)`, eval mode, `torch.no_grad()`, bf16 autocast on GPU. It is a plain
  attribute of the task, never a submodule of `task.model`, so DeepSpeed neither wraps, shards, nor checkpoints it;
  it moves to the batch's device on first use. It sees exactly the student's inputs after Mixup/CutMix (deit#168),
  re-normalised to its own mean/std when those differ, and resized when it needs a fixed input size.
- repeated augmentation: each sample gives `repeats` independently augmented views in its data worker
  (`data_pipeline.transforms.RepeatedViews`), flattened into the batch by `train_collate`; see `DeiTConfig.repeats`.

The task gets its teacher from an injected loader (`DeiTTask(cfg, load_teacher=...)`): launch/pretrain_deit.py
passes one built on finetune.backbone (pretrain/ never imports finetune/). Without a loader the task builds the
student only, which is all checkpoint conversion needs.

Exports: `export` -> a plain timm `VisionTransformer` backbone (distillation token and its position row dropped,
heads dropped), the project's backbone contract; `export_classifier` -> the whole student with timm's
`deit_*_distilled_*` keys (both heads), which loads strictly into `VisionTransformerDistilled`.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Literal

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from contracts.supervised import SupervisedRecipe, batch_sums, check_classes
from contracts.backbone import crop_scale_errors, vit_geometry_errors
from contracts.task import TaskHooks
from pretrain.export import encoder_to_timm, timm_architecture, vit_config

logger = logging.getLogger(__name__)

# The paper's distillation weights when model.alpha is not given (Touvron et al. 2021, section 5 and Table 3).
PAPER_ALPHA = {"soft": 0.1, "hard": 0.5}
# Marks the decayed parameter group; the runtime puts optim.weight_decay on every group with a non-zero value.
WEIGHT_DECAY = 0.05
# Basename of the whole-student export (timm classifier keys) written beside backbone.safetensors.
CLASSIFIER_NAME = "classifier"


@dataclass
class DeiTConfig:
    """The `model.*` section of the pretrain_deit job.

    Defaults: the DeiT recipe (Touvron et al. 2021, Table 9; deit main.py) on the tiny student; the presets change
    what differs (tiny: a light recipe for the embedded digits on the CPU; deit_s16 / deit_b16: the paper's sizes;
    deit3_b16: DeiT III).
    """

    # --- teacher and distillation ---
    distill: Literal["soft", "hard", "none"] = "hard"   # none: plain DeiT training, no teacher, no dist token
    # a folder with backbone.json + backbone.safetensors holding a classifier (a finetune_cls export / export_best,
    # or a converted finetune_cls checkpoint), or "timm:NAME" (any timm architecture) with teacher_weights
    teacher: str = ""
    teacher_weights: str = ""      # with timm:NAME: a .safetensors or .pth/.pt state dict (read weights-only)
    alpha: float | None = None     # weight of the distillation term; None = the paper's: soft 0.1, hard 0.5
    tau: float = 3.0               # soft distillation temperature (the paper's 3; the reference code's default 1)
    kl_reduction: Literal["batchmean", "legacy"] = "batchmean"   # soft: KL summed / batch, or / (batch x classes)
    # --- student ---
    num_classes: int = 10          # must equal the train set's class count and the teacher's
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.1         # stochastic depth, rising linearly over the blocks
    layer_scale: float = 0.0       # LayerScale init value (DeiT III: 1e-4); 0 = off
    no_embed_class: bool = False   # DeiT III: no position row for the class token (needs distill=none)
    # --- recipe ---
    loss: Literal["ce", "bce"] = "ce"   # base loss: soft-target cross-entropy, or DeiT III's binary cross-entropy
    mixup: float = 0.8             # Mixup alpha; 0 = off
    cutmix: float = 1.0            # CutMix alpha; 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1   # in the mixed targets (or LabelSmoothingCrossEntropy without mixing)
    augment: Literal["randaug", "3aug"] = "randaug"   # RandAugment (DeiT) or 3-Augment (DeiT III)
    auto_augment: str = "rand-m9-mstd0.5-inc1"        # timm RandAugment spec (augment=randaug); "" = off
    color_jitter: float = 0.3      # 3-Augment's colour jitter (RandAugment replaces it, as in timm)
    simple_random_crop: bool = False   # 3-Augment: DeiT III's SRC (ImageNet-21k) instead of RandomResizedCrop
    reprob: float = 0.25           # RandomErasing probability (pixel mode)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    crop_pct: float = 0.875        # eval: resize to img_size / crop_pct, centre crop
    # repeated augmentation: views per sample, all in the same batch. data.batch_size counts SAMPLES, so a step
    # sees batch_size x repeats images per rank, and the lr follows the images (each group's lr_scale = repeats).
    # An epoch (one pass over the distinct samples) costs `repeats` DeiT epochs: DeiT's 300 = optim.epochs 100.
    repeats: int = 3
    grad_checkpointing: bool = False

    # each field's range, checked (with finiteness) by the job config before the dataclass is built
    LIMITS: ClassVar[dict[str, str]] = {
        "alpha": "[0, 1]", "tau": "> 0", "num_classes": ">= 2", "img_size": ">= 1", "patch_size": ">= 1",
        "embed_dim": ">= 1", "depth": ">= 1", "num_heads": ">= 1", "mlp_ratio": "> 0", "drop_path": "[0, 1)",
        "layer_scale": ">= 0", "mixup": ">= 0", "cutmix": ">= 0", "mixup_prob": "[0, 1]",
        "mixup_switch_prob": "[0, 1]", "label_smoothing": "[0, 1)", "color_jitter": ">= 0", "reprob": "[0, 1]",
        "crop_scale": "(0, 1]", "hflip": "[0, 1]", "crop_pct": "(0, 1]", "repeats": ">= 1"}

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)  # a JSON round trip hands back a list
        errors = []
        teacher = self.teacher.strip()
        if self.distill != "none" and not teacher:
            errors.append(f"model.distill={self.distill} needs a teacher: teacher=FOLDER (a finetune_cls export, e.g. "
                          "after `python launch/finetune_cls.py model.init=timm:resnet18 run.name=teacher`: "
                          "teacher=runs/finetune_cls/teacher/export_best) or teacher=timm:NAME teacher_weights=FILE; "
                          "or distill=none")
        if teacher.startswith("timm:"):
            if not timm.is_model(teacher[5:]):
                errors.append(f"model.teacher={teacher}: {teacher[5:]!r} is not a timm architecture")
            if not self.teacher_weights:
                errors.append(f"model.teacher={teacher} needs teacher_weights=FILE (a random teacher teaches nothing)")
        elif self.teacher_weights and teacher:
            errors.append("model.teacher_weights goes with teacher=timm:NAME; a folder holds its own weights")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            errors.append(f"model.alpha={self.alpha} must be in [0, 1]")
        if self.tau <= 0:
            errors.append(f"model.tau={self.tau} must be > 0")
        errors += vit_geometry_errors(self.img_size, self.patch_size, self.embed_dim, self.num_heads)
        errors += crop_scale_errors(self.crop_scale)
        if self.no_embed_class and self.distill != "none":
            errors.append("model.no_embed_class needs distill=none (timm's distilled ViT keeps prefix position rows)")
        if self.loss == "bce" and self.label_smoothing > 0:
            errors.append("model.loss=bce binarises the mixed targets (DeiT III: target > 0): with "
                          f"label_smoothing={self.label_smoothing} every class would be a positive; set it to 0")
        if self.repeats < 1:
            errors.append(f"model.repeats={self.repeats} must be >= 1")
        if self.num_classes < 2:
            errors.append(f"model.num_classes={self.num_classes} must be >= 2")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def distilled(self) -> bool:
        return self.distill != "none"

    @property
    def distill_weight(self) -> float:
        """alpha, or the paper's value for the mode (0 without distillation)."""
        if not self.distilled:
            return 0.0
        return PAPER_ALPHA[self.distill] if self.alpha is None else self.alpha


# Named students as DeiTConfig overrides (model.arch=NAME): the paper's DeiT-Ti/S/B at 224 px, patch 16.
DEIT_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "deit_ti16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


@dataclass
class Teacher:
    """A frozen classifier and the input it expects (what a teacher loader returns)."""

    model: nn.Module
    mean: tuple[float, ...]          # normalisation the teacher was trained with
    std: tuple[float, ...]
    img_size: int | None = None      # the input side it needs (a ViT's), None = any (CNNs)
    name: str = ""


# --- losses ------------------------------------------------------------------------------------------------------

def distillation_loss(dist_logits: Tensor, teacher_logits: Tensor, mode: str, tau: float = 1.0,
                      kl_reduction: str = "batchmean") -> Tensor:
    """The distillation term. dist_logits, teacher_logits: [N, K] -> scalar (float32).

    soft: tau^2 * sum_k p_t,k (log p_t,k - log p_s,k) with p = softmax(logits / tau), divided by N ("batchmean")
    or by N * K ("legacy", the reference code's `reduction='sum' / numel`). hard: cross-entropy of dist_logits
    against argmax(teacher_logits), no smoothing.
    """
    s, t = dist_logits.float(), teacher_logits.float()
    if mode == "hard":
        return F.cross_entropy(s, t.argmax(dim=-1))
    if mode != "soft":
        raise ValueError(f"distillation mode {mode!r}: expected 'soft' or 'hard'")
    kl = F.kl_div(F.log_softmax(s / tau, dim=-1), F.log_softmax(t / tau, dim=-1), reduction="sum", log_target=True)
    denominator = s.shape[0] if kl_reduction == "batchmean" else s.numel()
    return kl * (tau * tau) / denominator


# --- the student -------------------------------------------------------------------------------------------------

class DistilledViT(VisionTransformerDistilled):
    """timm's `VisionTransformerDistilled` (same keys, same outputs) whose forward can also return both heads in eval.

    forward(x) -> (cls logits, dist logits) when training with distillation, else their mean; forward(x,
    both_heads=True) -> (cls, dist) in any mode (evaluation of each head; through the module's own __call__, so a
    ZeRO-3 engine gathers the class, distillation and position tokens as for any forward).
    """

    def forward(self, x: Tensor, both_heads: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x: [N, 3, H, W] -> [N, K], or ([N, K], [N, K])."""
        x = self.forward_features(x)
        if both_heads:
            return self.head(self.head_drop(x[:, 0])), self.head_dist(self.head_drop(x[:, 1]))
        return self.forward_head(x)


def build_student(cfg: DeiTConfig, **overrides: Any) -> nn.Module:
    """The student ViT: `DistilledViT` with distillation, else timm's `VisionTransformer` (DeiT without dist token).

    Pre-norm blocks, qkv bias, LayerNorm eps 1e-6, class-token pooling: the timm `deit_*` / `vit_*` layout.
    """
    kwargs: dict[str, Any] = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                  depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                                  num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path)
    kwargs.update(student_extra_kwargs(cfg))
    kwargs.update(overrides)
    if cfg.distilled:
        model: nn.Module = DistilledViT(**kwargs)
        model.set_distilled_training(True)  # train mode returns both heads; eval mode their mean
    else:
        model = VisionTransformer(**kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def student_extra_kwargs(cfg: DeiTConfig) -> dict[str, Any]:
    """The timm kwargs beyond the plain geometry (DeiT III's LayerScale and class-free position table)."""
    extra: dict[str, Any] = {}
    if cfg.layer_scale > 0:
        extra["init_values"] = cfg.layer_scale
    if cfg.no_embed_class:
        extra["no_embed_class"] = True
    return extra


def plain_vit_features(model: nn.Module, imgs: Tensor) -> Tensor:
    """imgs: [N, 3, H, W] -> [N, 1 + L, D]: the student's weights run as the plain ViT `DeiTTask.export` writes
    (class token and patches only; a distilled student's dist token and its position row left out), i.e. the
    exported backbone's timm `forward_features`. A plain student is its own forward_features."""
    if not isinstance(model, VisionTransformerDistilled):
        return model.forward_features(imgs)
    x = model.patch_embed(imgs)  # [N, L, D]
    pos = model.pos_embed  # [1, 2 + L, D]: rows cls, dist, patches
    cls = (model.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x + pos[:, 2:]], dim=1)
    x = model.norm_pre(model.pos_drop(x))
    x = model.blocks(x)
    return model.norm(x)


def deit_encoder_features(model: nn.Module, imgs: Tensor) -> Tensor:
    """For launch/convert_checkpoint.py: the task model's features equal to the exported backbone's forward_features."""
    return plain_vit_features(model, imgs)


# --- the task ----------------------------------------------------------------------------------------------------

class DeiTTask(TaskHooks):
    """DeiT training for the shared runtime (contracts/task.py: the Task interface)."""

    export_name = "backbone"
    required_members = ("image", "cls")  # a sample without its label is counted as missing_label

    def __init__(self, cfg: DeiTConfig, load_teacher: Callable[[DeiTConfig], Teacher] | None = None) -> None:
        from data_pipeline.transforms import (ClassificationEvalTransform, ClassificationTrainTransform,
                                              RepeatedViews, ThreeAugmentTransform, flatten_views)

        self.cfg = cfg
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        self.model = build_student(cfg)
        self.alpha = cfg.distill_weight
        self.class_names = [str(i) for i in range(cfg.num_classes)]

        if cfg.augment == "3aug":
            view: Callable[[dict], dict] = ThreeAugmentTransform(
                cfg.img_size, scale=cfg.crop_scale, color_jitter=cfg.color_jitter, hflip=cfg.hflip,
                simple_random_crop=cfg.simple_random_crop, re_prob=cfg.reprob, mean=self.mean, std=self.std)
        else:
            view = ClassificationTrainTransform(cfg.img_size, auto_augment=cfg.auto_augment or None,
                                                re_prob=cfg.reprob, scale=cfg.crop_scale,
                                                color_jitter=cfg.color_jitter, hflip=cfg.hflip, mean=self.mean,
                                                std=self.std)
        self.train_transform: Callable[[dict], dict] = RepeatedViews(view, cfg.repeats)
        self.train_collate: Callable[[list[dict]], dict] = flatten_views
        self.eval_transform: Callable[[dict], dict] = ClassificationEvalTransform(
            cfg.img_size, crop_pct=cfg.crop_pct, mean=self.mean, std=self.std)

        # Mixup/CutMix and the base loss (contracts/supervised.py)
        self.recipe = SupervisedRecipe(cfg.num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix, mixup_prob=cfg.mixup_prob,
                                       switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                                       loss=cfg.loss, odd_batch_hint="make data.batch_size x model.repeats even")

        # the teacher: a plain attribute, never registered in self.model (DeepSpeed must not see it)
        self.teacher: Teacher | None = None
        if cfg.distilled and load_teacher is not None:
            self.teacher = load_teacher(cfg)
            self.teacher.model.requires_grad_(False).eval()
        self._teacher_results: dict[str, float] | None = None   # its val metrics, computed once (it is frozen)

        self._flops: float | None = None
        n = sum(p.numel() for p in self.model.parameters())
        if cfg.distill == "soft":
            how = f"soft (alpha {self.alpha:g}, tau {cfg.tau:g}, KL {cfg.kl_reduction})"
        else:
            how = f"hard (alpha {self.alpha:g})" if cfg.distill == "hard" else "none"
        logger.info("DeiT: %s student, %d px / patch %d, %.2fM parameters, %d classes; distill=%s; %d view(s) per "
                    "sample", "distilled" if cfg.distilled else "plain", cfg.img_size, cfg.patch_size, n / 1e6,
                    cfg.num_classes, how, cfg.repeats)
        if self.teacher is not None:
            t = self.teacher
            logger.info("teacher: %s, %.2fM parameters (frozen), mean %s std %s%s", t.name,
                        sum(p.numel() for p in t.model.parameters()) / 1e6, t.mean, t.std,
                        f", resized to {t.img_size} px" if t.img_size and t.img_size != cfg.img_size else "")

    # --- the runtime's hooks --------------------------------------------------------------------------------

    def on_dataset(self, metadata: dict[str, Any]) -> None:
        """Check the train set against the heads: classification shards with num_classes classes."""
        self.class_names = check_classes(metadata, self.cfg.num_classes, "pretrain_deit") or self.class_names

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """Multi-scale batches (data.multiscale): the student is rebuilt with timm's dynamic_img_size (its position
        table resampled to each batch's grid) and given the same weights; the teacher reads each batch as
        `teacher_input` makes it (resized when it needs one size). Evaluation stays at model.img_size."""
        p = self.cfg.patch_size
        if any(s % p for s in sizes):
            raise ValueError(f"sizes {[s for s in sizes if s % p]} are not multiples of model.patch_size={p}")
        built = build_student(self.cfg, dynamic_img_size=True)
        built.load_state_dict(self.model.state_dict())
        self.model = built.train(self.model.training)
        logger.info("multi-scale batches at %s px: the student reads any size (position table resampled)",
                    list(sizes))

    def param_groups(self) -> list[dict]:
        """timm's weight-decay groups (no decay for 1-D tensors, biases, position table, class and dist tokens),
        as DeiT's `create_optimizer`; lr_scale = repeats, so the lr follows images, not samples (DeiT's rule)."""
        no_decay = sorted(self.model.no_weight_decay())
        groups = param_groups_weight_decay(self.model, weight_decay=WEIGHT_DECAY, no_weight_decay_list=no_decay)
        for group in groups:
            group["lr_scale"] = float(self.cfg.repeats)
        return groups

    def teacher_input(self, images: Tensor) -> Tensor:
        """The student's (mixed, normalised) images as the teacher reads them. images: [N, 3, H, W] -> [N, 3, h, w].

        Re-normalised when the teacher was trained with another mean/std; resized (bicubic) when it needs a fixed
        size other than the student's. Same pixels otherwise: the teacher sees what the student sees.
        """
        t = self.teacher
        x = images
        if tuple(t.mean) != tuple(self.mean) or tuple(t.std) != tuple(self.std):
            student_mean, student_std, mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1)
                                                    for v in (self.mean, self.std, t.mean, t.std))
            x = (x.float() * student_std + student_mean - mean) / std
        if t.img_size and t.img_size != x.shape[-1]:
            x = F.interpolate(x.float(), size=(t.img_size, t.img_size), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] (the student's input) -> teacher logits [N, K] float32; frozen, eval, no_grad, bf16
        autocast on GPU."""
        if self.teacher is None:
            raise RuntimeError(f"model.distill={self.cfg.distill} but the task has no teacher (it was built without a "
                               "teacher loader: only export works then)")
        model = self.teacher.model
        if next(model.parameters()).device != images.device:
            model.to(images.device)
        model.eval()
        x = self.teacher_input(images)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return model(x.float() if not x.is_cuda else x).float()

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images, labels, target = self.recipe.mix(batch["image"], batch["label"])  # target: [N, K] when mixing
        metrics: dict[str, float] = {}
        if self.cfg.distilled:
            cls_logits, dist_logits = model(images)
            base = self.recipe.loss(cls_logits, target)
            teacher = self.teacher_logits(images)
            distill = distillation_loss(dist_logits, teacher, self.cfg.distill, self.cfg.tau, self.cfg.kl_reduction)
            loss = (1 - self.alpha) * base + self.alpha * distill
            metrics.update(loss_base=base.item(), loss_distill=distill.item(),
                           teacher_agreement=100.0 * (dist_logits.argmax(-1) == teacher.argmax(-1)).float()
                           .mean().item())
        else:
            cls_logits = model(images)
            loss = self.recipe.loss(cls_logits, target)
        metrics.update(self.recipe.train_metrics(cls_logits, labels))
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Top-1 / top-5 (%) over the non-padding samples of all ranks. Collective.

        val_top1: the student as deployed (mean of the two heads' logits); val_top1_cls, val_top1_dist: each head;
        val_top1_teacher: the teacher (once, it is frozen); val_loss: the student's cross-entropy against the labels.
        """
        was_training = model.training
        model.eval()
        device = next(self.model.parameters()).device
        with_teacher = self.teacher is not None and self._teacher_results is None
        names = [""]
        if self.cfg.distilled:
            names += ["_cls", "_dist"]
        if with_teacher:
            names.append("_teacher")
        topk = min(5, self.cfg.num_classes)
        sums = torch.zeros(len(names), 4, dtype=torch.float64, device=device)
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            keep = ~batch["is_padding"].to(labels.device).bool() if "is_padding" in batch \
                else torch.ones_like(labels, dtype=torch.bool)
            images, labels = images[keep], labels[keep]
            if labels.numel() == 0:
                continue
            outputs: list[Tensor] = []
            if self.cfg.distilled:
                cls_logits, dist_logits = model(images, both_heads=True)
                cls_logits, dist_logits = cls_logits.float(), dist_logits.float()
                outputs += [(cls_logits + dist_logits) / 2, cls_logits, dist_logits]
            else:
                outputs.append(model(images).float())
            if with_teacher:
                outputs.append(self.teacher_logits(images))
            for i, logits in enumerate(outputs):
                sums[i] += batch_sums(logits, labels, topk)
        model.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        results: dict[str, float] = {}
        for name, (loss, top1, top5, count) in zip(names, sums.tolist()):
            n = max(count, 1.0)
            results.update({f"val_top1{name}": 100.0 * top1 / n, f"val_top5{name}": 100.0 * top5 / n})
            if name in ("", "_teacher"):
                results[f"val_loss{name}"] = loss / n if count else math.nan
        if with_teacher:
            self._teacher_results = {k: v for k, v in results.items() if k.endswith("_teacher")}
        results.update(self._teacher_results or {})
        return results

    def evaluate_ema(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """`evaluate` of the runtime's EMA student, without the teacher's figures (the EMA does not change them)."""
        return {k: v for k, v in self.evaluate(model, loader).items() if not k.endswith("_teacher")}

    def images(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """DeiT logs no pictures (its evaluation is the top-1 of each head)."""
        return {}

    # --- export ---------------------------------------------------------------------------------------------

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """A plain timm `VisionTransformer` backbone (no head) and its backbone.json, the finetuning contract.

        A distilled student loses its distillation token and that token's position row: the class token and the
        patches keep their weights, and the backbone computes what the student computes without the dist token in
        the sequence (`plain_vit_features`); the whole student is `export_classifier`.
        """
        cfg = self.cfg
        out = encoder_to_timm(state_dict, drop_prefixes=("head.", "head_dist.", "dist_token", "fc_norm."))
        if cfg.distilled and not cfg.no_embed_class:
            pos = out["pos_embed"]  # [1, 2 + L, D]: cls, dist, patches
            out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1).contiguous()
        config = vit_config(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, source="deit",
                            mean=self.mean, std=self.std, **student_extra_kwargs(cfg))
        config["distill"] = cfg.distill
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}, config

    def extra_exports(self, state_dict: dict[str, Tensor]) -> dict[str, tuple[dict[str, Tensor], dict]]:
        """Beside the plain backbone, the whole classifier (runtime hook: export/ and export_best/)."""
        return {CLASSIFIER_NAME: self.export_classifier(state_dict)}

    def export_classifier(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The whole student with timm keys (heads included) and a backbone.json-style config naming the timm
        classifier: `deit_{tiny,small,base}_distilled_patch16_224` (VisionTransformerDistilled: cls + dist tokens,
        head + head_dist) or `deit_*_patch16_224` without distillation, with the geometry in model_kwargs.
        Loads strictly with `timm.create_model(architecture, **model_kwargs)` and evaluates like our student."""
        cfg = self.cfg
        out = encoder_to_timm(state_dict)
        size_args = (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads)
        if cfg.distilled:
            arch = timm_architecture(*size_args, template="deit_{size}_distilled_patch{patch}_{img}",
                                     generic="deit_base_distilled_patch16_224")
        else:
            arch = timm_architecture(*size_args, template="deit_{size}_patch{patch}_{img}",
                                     generic="deit_base_patch16_224")
        kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                      num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=cfg.num_classes,
                      **student_extra_kwargs(cfg))
        config = {"architecture": arch, "model_kwargs": kwargs, "source": "deit", "distill": cfg.distill,
                  "classes": list(self.class_names),
                  "pretrained_cfg_overlay": {"mean": list(self.mean), "std": list(self.std),
                                             "input_size": [3, cfg.img_size, cfg.img_size], "crop_pct": cfg.crop_pct,
                                             "interpolation": "bicubic", "num_classes": cfg.num_classes}}
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}, config

    def flops_per_sample(self) -> float:
        """Training FLOPs per SAMPLE: `repeats` x (student forward + backward + teacher forward), counted by
        FlopCounterMode on meta-device copies."""
        if self._flops is None:
            with torch.device("meta"):
                student = build_student(replace(self.cfg, grad_checkpointing=False, drop_path=0.0))
                images = torch.zeros(2, 3, self.cfg.img_size, self.cfg.img_size)
            with FlopCounterMode(display=False) as counter:
                out = student(images)
                (sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()).backward()
            flops = float(counter.get_total_flops()) / 2
            if self.teacher is not None:
                teacher = copy.deepcopy(self.teacher.model).to("meta")
                side = self.teacher.img_size or self.cfg.img_size
                with FlopCounterMode(display=False) as counter, torch.no_grad():
                    teacher(torch.zeros(2, 3, side, side, device="meta"))
                flops += float(counter.get_total_flops()) / 2
            self._flops = flops * self.cfg.repeats
        return self._flops

