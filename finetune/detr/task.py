"""The finetune_detr task: DETR on a pretrained (or from-scratch) ViT, for the shared runtime.

The backbone comes from `model.init`: a backbone folder (backbone.json + backbone.safetensors, or a run directory
with export/) written by pretraining or launch/convert_checkpoint.py (MAE, BEiT, DeiT), built with
`dynamic_img_size=True` and its position table resampled to `model.img_size` (finetune/backbone.py), then resampled
per batch to the padded grid; or `scratch`, a random ViT of the model.patch_size..num_heads geometry. With
`backbone=vitdet` the export is converted to ViTDet's windowed ViT (finetune/vitdet.py) at model.img_size, its map
[N, D, H/p, W/p] read without a final norm, exported as a timm SAM ViT folder (`samvit_*`). With
`backbone=hierarchical` the backbone is a hierarchical timm model (a Swin export: SimMIM's or finetune_cls's; or
`timm:NAME`, random weights: swin_*, mobilevit_*), Swin built with `dynamic_img_size=True` (attention masks per padded
batch); DETR reads its last stage, or with `neck=merge` its last `merge_levels` stages merged into one level, and the
export is the timm model's own folder. The detector is finetune/detr/model.py, the loss finetune/detr/criterion.py,
the metric finetune/detr/coco_eval.py.

Categories: the train set's index.json lists its COCO categories (`metadata.categories`, ids may have gaps).
`category_map=contiguous` (default) gives class i to the i-th category by ascending id, so num_classes = the number
of categories (80 for COCO), and results go back to pycocotools under the original ids; `category_map=id` uses
the id itself as the class, so num_classes must exceed the largest id (DETR's choice: 91 for COCO, detr#108), the
unused ids being classes that are never targets. Either way the class head has num_classes + 1 outputs, the last
being no-object.

Optimisation (DETR main.py; ViTDet configs): AdamW; the backbone at `backbone_lr_scale` x lr (DETR: 1e-5 vs 1e-4),
optionally with layer decay over its blocks (ViTDet: 0.7 for ViT-B) through timm's `param_groups_layer_decay`
(the runtime applies each group's `lr_scale`); no weight decay on biases, norms, position table and class token;
gradient clipping (engine.grad_clip, DETR's 0.1) in the presets.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from contracts.backbone import vit_geometry_errors
from contracts.task import TaskHooks
from finetune import backbone as bb
from finetune.detr.coco_eval import CocoEvaluator, post_process
from finetune.detr.criterion import WEIGHTED, SetCriterion
from finetune.detr.matcher import HungarianMatcher
from finetune.detr.model import DETR

logger = logging.getLogger(__name__)

# The image side of a from-scratch backbone's position table when model.img_size is 0.
SCRATCH_IMG_SIZE = 320
# Marks decayed parameter groups; the runtime puts optim.weight_decay on every group with a non-zero value.
WEIGHT_DECAY = 1e-4
GT_COLOR, PRED_COLOR = (0, 255, 0), (255, 0, 0)


@dataclass
class DETRConfig:
    """The `model.*` section of the finetune_detr job.

    Defaults: the tiny CPU preset (a small ViT and a 2 + 3 layer, 128-wide detector on the embedded trees); the
    vit_b16 preset holds DETR's detector (6 + 6 layers, 256 wide, 100 queries) on a ViT-B/16 for COCO.
    """

    # where the backbone comes from: a folder with backbone.json + backbone.safetensors (or a run dir with export/),
    # "scratch" (a random ViT, the fields below), or "timm:NAME" (backbone=hierarchical: that timm model, random)
    init: str = "scratch"
    img_size: int = 0              # grid of the backbone's position table, px; 0 = the backbone's own (scratch: 320)
    # --- a ViT from scratch (init=scratch) ---
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.1         # backbone stochastic depth (ViTDet: 0.1 for ViT-B)
    # --- the backbone's form: the plain ViT as pretrained, or ViTDet's windowed ViT built from it (finetune/vitdet.py;
    # needs model.init=<export>): window attention except in global_blocks, decomposed relative positions ---
    # hierarchical: a timm model with stages (Swin, MobileViT; model.init=DIR or timm:NAME), read at its last stage
    # or, with neck=merge, at several (see the neck)
    backbone: Literal["vit", "vitdet", "hierarchical"] = "vit"
    window_size: int = 14          # vitdet: tokens per window side (ViTDet: 14 at 1024 px, patch 16)
    global_blocks: tuple[int, ...] = ()   # vitdet: blocks with global attention; () = ViTDet's 4 evenly spaced
    rel_pos: bool = True           # vitdet: decomposed relative positions in every block (zero-initialised)
    # --- neck: the single map the DETR transformer reads ---
    # ViTDet's pyramid level, DETR's 1x1 projection, or (backbone=hierarchical) the last merge_levels stages merged
    neck: Literal["simple_fpn", "project", "merge"] = "simple_fpn"
    # stride of that map, px: patch/4 .. 2*patch (simple_fpn; a hierarchical backbone's last stage stride stands for
    # the patch), one of the merged stages' strides (merge); 0 = the patch size (the last stage's stride)
    feature_stride: int = 0
    merge_levels: int = 3          # neck=merge: the last stages merged (Deformable DETR's C3-C5: 3)
    # --- DETR transformer and heads ---
    hidden_dim: int = 128
    nheads: int = 4
    enc_layers: int = 2
    dec_layers: int = 3
    dim_feedforward: int = 512
    dropout: float = 0.0
    num_queries: int = 100
    pre_norm: bool = False
    aux_loss: bool = True          # losses on every decoder layer's outputs
    # --- classes ---
    num_classes: int = 1           # real classes (no-object excluded); see category_map
    category_map: Literal["contiguous", "id"] = "contiguous"
    # --- matcher costs and loss weights (DETR: 1 / 5 / 2, no-object 0.1) ---
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    eos_coef: float = 0.1
    loss_ce: float = 1.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    # --- optimisation ---
    # backbone lr / lr (DETR: 1e-5 / 1e-4); 0 = auto: 0.1 for a pretrained backbone, 1 for init=scratch (a random
    # ViT trained 10x slower than its detector would barely move)
    backbone_lr_scale: float = 0.0
    layer_decay: float = 1.0       # backbone block i of L gets decay^(L + 1 - i) on top (ViTDet); 1 = off
    # --- augmentation (DETR's recipe at a smaller scale; data_pipeline/detection_transforms.py) ---
    scales: tuple[int, ...] = (256, 288, 320, 352)   # train: shorter side, one drawn per image
    max_size: int = 480            # cap on the longer side (train and eval)
    crop_resize: tuple[int, ...] = (320, 352, 384)  # before the random crop
    crop_size: tuple[int, int] = (192, 320)         # random crop side range
    crop_prob: float = 0.5         # probability of the resize-crop-resize branch
    hflip: float = 0.5
    eval_size: int = 160           # eval: shorter side (the trees' 200 px validation tiles at the train scale)
    # --- TensorBoard pictures ---
    draw_images: int = 4           # images with boxes per picture step
    draw_score: float = 0.3        # predictions drawn when their class score is at least this

    # each field's range, checked (with finiteness) by the job config before the dataclass is built
    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 0", "patch_size": ">= 1", "embed_dim": ">= 1", "depth": ">= 1", "num_heads": ">= 1",
        "mlp_ratio": "> 0", "drop_path": "[0, 1)", "window_size": ">= 1", "global_blocks": ">= 0", "feature_stride": ">= 0",
        "merge_levels": ">= 1", "hidden_dim": ">= 2", "nheads": ">= 1",
        "enc_layers": ">= 0", "dec_layers": ">= 1", "dim_feedforward": ">= 1", "dropout": "[0, 1)",
        "num_queries": ">= 1", "num_classes": ">= 1", "cost_class": ">= 0", "cost_bbox": ">= 0",
        "cost_giou": ">= 0", "eos_coef": ">= 0", "loss_ce": ">= 0", "loss_bbox": ">= 0", "loss_giou": ">= 0",
        "backbone_lr_scale": ">= 0", "layer_decay": "(0, 1]", "scales": ">= 1", "max_size": ">= 1",
        "crop_resize": ">= 1", "crop_size": ">= 1", "crop_prob": "[0, 1]", "hflip": "[0, 1]", "eval_size": ">= 1",
        "draw_images": ">= 0", "draw_score": "[0, 1]"}

    def __post_init__(self) -> None:
        errors = []
        init = self.init.strip()
        if init.startswith("timm:"):
            import timm

            if self.backbone != "hierarchical":
                errors.append(f"model.init={init}: a timm architecture by name needs model.backbone=hierarchical "
                              "(a ViT backbone comes from a backbone folder or init=scratch)")
            elif not timm.is_model(init[5:]):
                errors.append(f"model.init={init}: {init[5:]!r} is not a timm architecture")
        elif init != "scratch":
            try:
                bb.find_backbone(init)
            except ValueError as e:
                errors.append(f"model.init={self.init}: {e}")
        elif self.backbone == "hierarchical":
            errors.append("model.backbone=hierarchical needs model.init=DIR (e.g. a SimMIM Swin export) or "
                          "model.init=timm:NAME (e.g. timm:swin_tiny_patch4_window7_224, timm:mobilevit_s)")
        if self.neck == "merge" and self.backbone != "hierarchical":
            errors.append("model.neck=merge merges the stages of a hierarchical backbone: set "
                          "model.backbone=hierarchical, or use neck=simple_fpn / project")
        if self.num_classes < 1:
            errors.append(f"model.num_classes={self.num_classes} must be >= 1")
        if self.nheads <= 0 or self.hidden_dim % self.nheads or self.hidden_dim % 2:
            errors.append(f"model.hidden_dim={self.hidden_dim} must be even and divisible by nheads={self.nheads}")
        if self.init.strip() == "scratch":  # the geometry of the from-scratch ViT (a backbone brings its own)
            errors += vit_geometry_errors(self.img_size or SCRATCH_IMG_SIZE, self.patch_size, self.embed_dim,
                                          self.num_heads, shown_img_size=self.img_size or f"0 (= {SCRATCH_IMG_SIZE})")
        if self.feature_stride and self.patch_size and self.init.strip() == "scratch":
            ratio = self.patch_size / self.feature_stride
            if ratio not in (4.0, 2.0, 1.0, 0.5):
                errors.append(f"model.feature_stride={self.feature_stride} with patch {self.patch_size}: the simple "
                              "feature pyramid gives strides patch/4, patch/2, patch, 2*patch")
        if not 0 < self.layer_decay <= 1:
            errors.append(f"model.layer_decay={self.layer_decay} must be in (0, 1]")
        if not self.scales or len(self.crop_size) != 2 or self.crop_size[0] > self.crop_size[1]:
            errors.append("model.scales must be non-empty and model.crop_size a (min, max) pair")
        if errors:
            raise ValueError("; ".join(errors))


def build_backbone(cfg: DETRConfig, load: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The timm ViT `cfg.init` names, `dynamic_img_size=True`, no head, weights loaded (position table resampled to
    cfg.img_size) when `load`. Returns (model, backbone.json of the built model)."""
    common = {"num_classes": 0, "dynamic_img_size": True}
    init = cfg.init.strip()
    if cfg.backbone == "vitdet":
        return build_vitdet(cfg, load)
    if cfg.backbone == "hierarchical":
        return build_hierarchical(cfg, load)
    if init == "scratch":
        meta = bb.scratch_vit_config(img_size=cfg.img_size or SCRATCH_IMG_SIZE, patch_size=cfg.patch_size,
                                     embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                                     mlp_ratio=cfg.mlp_ratio, class_token=True, global_pool="token", num_classes=0)
        meta["model_kwargs"].update(common)
        return bb.create_from_config(meta, drop_path_rate=cfg.drop_path), meta
    folder = bb.find_backbone(init)
    source = bb.read_config(folder)
    overrides = dict(common, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    model = bb.create_from_config(source, drop_path_rate=cfg.drop_path, **overrides)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise ValueError(f"model.init={init}: {source['architecture']} is not a plain ViT")
    if load:
        report = bb.load_weights(model, bb.read_weights(folder), source)
        if report.resampled:
            logger.info("backbone position table resampled %s -> %s", *report.resampled)
    meta = {k: v for k, v in source.items() if k in ("architecture", "embed_layer", "pos_embed",
                                                      "pretrained_cfg_overlay", "source")}
    meta["model_kwargs"] = bb.export_kwargs({**source.get("model_kwargs", {}), **overrides})
    return model, meta


def build_hierarchical(cfg: DETRConfig, load: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The hierarchical timm model `cfg.init` names (a backbone folder, weights loaded when `load`, relative position
    tables resized to cfg.img_size's windows; or timm:NAME, random), no head, reading any image size (Swin:
    `dynamic_img_size=True`, its masks built per padded batch; a CNN reads any size). Returns (model, backbone.json
    of the built model)."""
    init = cfg.init.strip()
    overrides: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
    if cfg.img_size:
        overrides["img_size"] = cfg.img_size
    if init.startswith("timm:"):
        model, used = bb.create_timm(init[5:], drop_path_rate=cfg.drop_path, **overrides)
        source: dict[str, Any] = {"architecture": init[5:]}
        kwargs = used
    else:
        folder = bb.find_backbone(init)
        source = bb.read_config(folder)
        try:
            model = bb.create_from_config(source, drop_path_rate=cfg.drop_path, **overrides)
        except TypeError as e:
            if "dynamic_img_size" not in str(e):
                raise
            overrides.pop("dynamic_img_size")   # a CNN (a finetune_cls MobileViT export) reads any size already
            model = bb.create_from_config(source, drop_path_rate=cfg.drop_path, **overrides)
        if load:
            report = bb.load_weights(model, bb.read_weights(folder), source)
            if report.resampled:
                logger.info("backbone position tables resized %s -> %s", *report.resampled)
        kwargs = {**source.get("model_kwargs", {}), **overrides}
    if not getattr(model, "feature_info", None) or not hasattr(model, "forward_intermediates"):
        raise ValueError(f"model.init={init}: {source['architecture']} has no stages to read (timm's feature_info "
                         "and forward_intermediates); model.backbone=hierarchical takes a Swin, a MobileViT or "
                         "another hierarchical timm model")
    meta = {k: v for k, v in source.items() if k in ("architecture", "pretrained_cfg_overlay", "source")}
    meta["model_kwargs"] = bb.export_kwargs(kwargs)
    return model, meta


def build_vitdet(cfg: DETRConfig, load: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """ViTDet's windowed ViT (finetune/vitdet.py) from the export `cfg.init` names, at cfg.img_size (0: the export's
    own), or (init=scratch) from a random plain ViT of the model.patch_size..num_heads geometry. Returns (model, backbone.json: timm's SAM ViT architecture with the model's kwargs). `load=False` (FLOPs
    on the meta device) builds the same geometry without weights."""
    from finetune.vitdet import VITDET_ARCHITECTURE, vitdet_from_backbone, vitdet_from_config, vitdet_from_state

    init = cfg.init.strip()
    blocks = cfg.global_blocks or None
    if init == "scratch":
        # the random plain ViT of the model.patch_size..num_heads fields, converted: the same starting point as the
        # ViT a pretraining run of that geometry starts from (the arm a pretrained ViTDet is compared against)
        img_size = cfg.img_size or SCRATCH_IMG_SIZE
        source = bb.scratch_vit_config(img_size=img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                       depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                       class_token=True, global_pool="token", num_classes=0)
        with torch.device("cpu"):
            plain = bb.create_from_config(source)
        # random weights either way, so `load` changes nothing here
        model = vitdet_from_state(source, plain.state_dict(), img_size, cfg.window_size, blocks, cfg.rel_pos,
                                  drop_path_rate=cfg.drop_path, folder="the from-scratch ViT")
    else:
        folder = bb.find_backbone(init)
        source = bb.read_config(folder)
        img_size = cfg.img_size or source.get("model_kwargs", {}).get("img_size", 224)
        if load:
            model = vitdet_from_backbone(folder, img_size, cfg.window_size, blocks, cfg.rel_pos,
                                         drop_path_rate=cfg.drop_path)
        else:
            with torch.device("cpu"):
                kwargs = vitdet_from_backbone(folder, img_size, cfg.window_size, blocks, cfg.rel_pos).vitdet_kwargs
            model = vitdet_from_config(kwargs)
    meta = {k: v for k, v in source.items() if k in ("pretrained_cfg_overlay", "source")}
    meta.update(architecture=VITDET_ARCHITECTURE, model_kwargs=dict(model.vitdet_kwargs), vitdet=True)
    return model, meta


def build_backbone_from_meta(meta: dict[str, Any], **overrides: Any) -> nn.Module:
    """The (random) backbone a DETR export's backbone.json describes: ViTDet's (neck-less SAM ViT) or timm's."""
    if meta.get("vitdet"):
        from finetune.vitdet import vitdet_from_config

        return vitdet_from_config(meta["model_kwargs"], **overrides)
    return bb.create_from_config(meta, **overrides)


def build_detr(cfg: DETRConfig, backbone: nn.Module) -> DETR:
    return DETR(backbone, cfg.num_classes, neck=cfg.neck, feature_stride=cfg.feature_stride,
                hidden_dim=cfg.hidden_dim, nheads=cfg.nheads, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
                dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout, num_queries=cfg.num_queries,
                pre_norm=cfg.pre_norm, aux_loss=cfg.aux_loss, hierarchical=cfg.backbone == "hierarchical",
                merge_levels=cfg.merge_levels)


def detr_encoder_features(model: nn.Module, imgs: Tensor) -> Tensor:
    """The detector's backbone tokens [N, T, D] for imgs [N, 3, H, W], equal to the exported timm model's
    `forward_features(imgs)` (what launch/convert_checkpoint.py compares). ViTDet: the exported SAM ViT ends in
    timm's LayerNorm2d "neck" (exported as weight 1, bias 0: SAM's final norm, which DETR does not use), so its
    features are the map [N, D, H/p, W/p] normalised over channels; the block norms' eps is timm SAM's 1e-5 there
    (1e-6 here: a difference of order 1e-5)."""
    from finetune.vitdet import ViTDetBackbone

    if isinstance(model.backbone, ViTDetBackbone):
        x = model.backbone(imgs)
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)
    return model.backbone.forward_features(imgs)


def draw_detections(image: Tensor, gt_boxes: Tensor, pred_boxes: Tensor, mean: tuple[float, ...],
                    std: tuple[float, ...], gt_labels: list[str] | None = None,
                    pred_labels: list[str] | None = None) -> Tensor:
    """image [3, H, W] normalised; gt_boxes [G, 4], pred_boxes [P, 4] normalised cxcywh of that image -> [3, H, W]
    float in [0, 1] with ground truth in green and predictions in red (torchvision's draw_bounding_boxes), each
    box's label (class name; a prediction's with its score) written in black on its colour at the box's top left."""
    pixels = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    canvas = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    h, w = canvas.shape[1:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    width = max(1, round(min(h, w) / 200))
    for boxes, labels, color in ((gt_boxes, gt_labels, GT_COLOR), (pred_boxes, pred_labels, PRED_COLOR)):
        if len(boxes):
            # rounded: draw_bounding_boxes truncates, and 10 / 120 * 120 comes back as 9.99...
            xyxy = (box_convert(boxes.detach().float().cpu(), "cxcywh", "xyxy") * scale).round()
            canvas = draw_bounding_boxes(canvas, xyxy, labels=labels, colors=[color] * len(boxes), width=width,
                                         label_colors=(0, 0, 0), label_background_colors=color,
                                         fill_labels=labels is not None)
    return canvas.float() / 255.0


# the whole detector beside the backbone export, read back by finetune.detr.detector.load_detector
DETECTOR_NAME = "detector"   # detector.safetensors + detector.json
FORMAT = "detr-detector/1"


def detector_export(task: DETRTask, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, detector.json) of the task's whole DETR from a consolidated state dict (keys with or without
    "module.")."""
    cfg = task.cfg
    tensors = {k.removeprefix("module."): v.detach().float().contiguous() if v.is_floating_point() else v
               for k, v in state_dict.items()}
    backbone = {k: v for k, v in task.backbone_meta.items() if k in ("architecture", "embed_layer", "pos_embed",
                                                                       "model_kwargs", "vitdet")}
    meta = {"format": FORMAT, "source": "finetune_detr", "init": cfg.init, "detr": asdict(cfg), "backbone": backbone,
            "categories": list(task.categories), "category_ids": task.category_ids,
            "eval_size": cfg.eval_size, "max_size": cfg.max_size, "mean": list(task.mean), "std": list(task.std)}
    return tensors, meta


class DETRTask(TaskHooks):
    """DETR finetuning for the shared runtime (contracts/task.py: the Task interface)."""

    required_members = ("image", "json")  # a sample without its boxes is counted as missing_json

    def __init__(self, cfg: DETRConfig) -> None:
        from data_pipeline.detection_transforms import DetectionEvalTransform, DetectionTrainTransform, PadCollate

        self.cfg = cfg
        backbone, self.backbone_meta = build_backbone(cfg)
        self.model: DETR = build_detr(cfg, backbone)
        # the pooled-feature norm of an average-pooling backbone (MAE) is not on the detector's path: frozen, so that
        # no optimizer waits for its gradients, and exported unchanged
        for name, p in backbone.named_parameters():
            if name.startswith(("fc_norm.", "head.")):
                p.requires_grad_(False)
        overlay = self.backbone_meta.get("pretrained_cfg_overlay", {})
        self.mean = tuple(overlay.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std = tuple(overlay.get("std", IMAGENET_DEFAULT_STD))
        self.criterion = SetCriterion(cfg.num_classes, HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou),
                                      eos_coef=cfg.eos_coef, loss_ce=cfg.loss_ce, loss_bbox=cfg.loss_bbox,
                                      loss_giou=cfg.loss_giou)
        self.train_transform: Callable[[dict], dict] = DetectionTrainTransform(
            cfg.scales, cfg.max_size, cfg.crop_resize, cfg.crop_size, hflip=cfg.hflip, crop_prob=cfg.crop_prob,
            mean=self.mean, std=self.std, masks=False)  # DETR predicts boxes: instance masks are not decoded
        self.eval_transform: Callable[[dict], dict] = DetectionEvalTransform(cfg.eval_size, cfg.max_size,
                                                                             mean=self.mean, std=self.std, masks=False)
        self.train_collate = self.eval_collate = PadCollate(self.model.size_divisibility)
        # the class of each category id: contiguous 1..K until the dataset names its categories (on_dataset)
        self.categories = [{"id": i + 1, "name": str(i + 1)} for i in range(cfg.num_classes)] \
            if cfg.category_map == "contiguous" else []
        self._set_lookup()
        self._flops: float | None = None
        total = sum(p.numel() for p in self.model.parameters())
        in_backbone = sum(p.numel() for p in self.model.backbone.parameters())
        logger.info("DETR: %s backbone from %s (%s %d, %.2fM parameters), %s neck at stride %d, %d+%d x %d "
                    "transformer, %d queries, %d classes (%s); %.2fM parameters", self.backbone_meta["architecture"],
                    cfg.init, "last stage stride" if self.model.hierarchical else "patch", self.model.patch_size,
                    in_backbone / 1e6, cfg.neck, self.model.feature_stride,
                    cfg.enc_layers, cfg.dec_layers, cfg.hidden_dim, cfg.num_queries, cfg.num_classes,
                    cfg.category_map, total / 1e6)

    # --- categories -----------------------------------------------------------------------------------------

    def _set_lookup(self) -> None:
        """category id -> class index table (-1: not a class), and class index -> category id."""
        if self.cfg.category_map == "contiguous":
            ids = [int(c["id"]) for c in self.categories]
            self.category_ids: list[int] | None = ids
        else:
            ids, self.category_ids = list(range(self.cfg.num_classes)), None
        lookup = torch.full((max(ids) + 1,), -1, dtype=torch.int64)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self._lookup = lookup

    def on_dataset(self, metadata: dict[str, Any]) -> None:
        """Check the train set against the class head and take its categories (see the module docstring)."""
        kind = metadata.get("kind")
        if kind not in (None, "detection"):
            raise ValueError(f"a {kind} dataset; finetune_detr needs detection shards (COCO json per sample)")
        categories = sorted(({"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
                             for c in metadata.get("categories") or []), key=lambda c: c["id"])
        k = self.cfg.num_classes
        if self.cfg.category_map == "contiguous":
            if not categories:
                raise ValueError("its index.json lists no categories; set model.category_map=id (class = category "
                                 "id, model.num_classes = largest id + 1)")
            if len(categories) != k:
                raise ValueError(f"{len(categories)} categories in its index.json but model.num_classes={k}; set "
                                 f"model.num_classes={len(categories)} (or category_map=id with num_classes="
                                 f"{max(c['id'] for c in categories) + 1})")
        elif categories and max(c["id"] for c in categories) >= k:
            raise ValueError(f"category_map=id needs model.num_classes > the largest category id "
                             f"({max(c['id'] for c in categories)}); set model.num_classes="
                             f"{max(c['id'] for c in categories) + 1}")
        self.categories = categories
        self._set_lookup()
        logger.info("categories: %s", ", ".join(f"{c['id']}:{c['name']}" for c in categories[:20])
                    + (" ..." if len(categories) > 20 else ""))

    def extra_state(self) -> dict[str, Any]:
        """The train set's categories: saved in every checkpoint, so that a resumed run and a detector converted
        from a checkpoint map classes to the same category ids."""
        return {"categories": [dict(c) for c in self.categories]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("categories"):
            self.categories = [dict(c) for c in state["categories"]]
            self._set_lookup()

    def with_labels(self, targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Targets with "labels" (class indices) from their "category_ids"."""
        out = []
        for t in targets:
            ids = t["category_ids"]
            lookup = self._lookup.to(ids.device)
            bad = (ids < 0) | (ids >= len(lookup))
            labels = lookup[ids.clamp(0, len(lookup) - 1)]
            if bad.any() or (labels < 0).any():
                raise ValueError(f"image {int(t['image_id'])}: category ids {sorted(set(ids.tolist()))} include one "
                                 f"that is not a class (classes: {self.category_ids or 'ids < num_classes'})")
            out.append({**t, "labels": labels})
        return out

    # --- the runtime's hooks --------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """Backbone: layer-decay groups (ViTDet's rule, through timm's `param_groups_layer_decay`) with lr_scale x
        backbone_lr_scale, no decay on 1-D tensors, the position table, the class token. Detector: decay on
        matrices, none on biases and norms."""
        cfg, backbone = self.cfg, self.model.backbone
        no_decay = sorted(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else []
        groups = param_groups_layer_decay(backbone, weight_decay=WEIGHT_DECAY, no_weight_decay_list=no_decay,
                                          layer_decay=cfg.layer_decay)
        # timm gives block i of L decay^(L - i) (its last block and final norm 1); ViTDet's get_vit_lr_decay_rate
        # gives decay^(L + 1 - i): the detector above the backbone is the top layer
        scale = (cfg.backbone_lr_scale or (1.0 if cfg.init.strip() == "scratch" else 0.1)) * cfg.layer_decay
        for g in groups:
            g["lr_scale"] = g.get("lr_scale", 1.0) * scale
        rest = [(n, p) for n, p in self.model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups.append({"params": [p for _, p in rest if p.ndim > 1], "weight_decay": WEIGHT_DECAY})
        groups.append({"params": [p for _, p in rest if p.ndim <= 1], "weight_decay": 0.0})
        return groups

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The weighted set loss of every decoder layer; logs each term of the last layer, the auxiliary layers'
        weighted sum (loss_aux), class_error and cardinality_error."""
        targets = self.with_labels(batch["targets"])
        outputs = model(batch["image"], batch["mask"])
        losses = self.criterion(outputs, targets)
        loss = self.criterion.total(losses)
        metrics = {k: float(losses[k].detach()) for k in (*WEIGHTED, "class_error", "cardinality_error")}
        aux = [self.criterion.weight_of(k) * v.detach() for k, v in losses.items() if k not in WEIGHTED
               and self.criterion.weight_of(k)]
        metrics["loss_aux"] = float(sum(aux)) if aux else 0.0
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """COCO box AP of the validation set over all ranks (padding samples excluded): map, map50, map75,
        map_small, map_medium, map_large, mar100, and ap_per_class/<name>, ap50_per_class/<name> for each category
        with ground truth in it (finetune/detr/coco_eval.py). Collective."""
        was_training = model.training
        model.eval()
        evaluator = CocoEvaluator(self.category_ids, self.categories)
        for batch in loader:
            outputs = model(batch["image"], batch["mask"])  # every rank the same number of forwards (ZeRO-3)
            keep = (~batch["is_padding"].bool()).tolist() if "is_padding" in batch else [True] * len(batch["targets"])
            targets = [t for t, k in zip(batch["targets"], keep) if k]
            if not targets:
                continue
            idx = torch.tensor(keep, device=outputs["pred_logits"].device)
            sizes = torch.stack([t["orig_size"] for t in targets]).to(idx.device)
            results = post_process(outputs["pred_logits"][idx], outputs["pred_boxes"][idx], sizes)
            for target, result in zip(targets, results):
                evaluator.add_ground_truth({k: v.cpu() for k, v in target.items()})
                evaluator.add_predictions(int(target["image_id"]), {k: v.cpu() for k, v in result.items()})
        model.train(was_training)
        return evaluator.summarize()

    def category_name(self, category_id: int) -> str:
        """The dataset's name of a category id (the id itself when the index.json names none)."""
        names = {int(c["id"]): str(c["name"]) for c in self.categories}
        return names.get(int(category_id), str(int(category_id)))

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Up to draw_images images of `batch` (unpadded; the runtime's fixed batch: the first validation batch,
        else the first training batch) with ground truth (green, labelled with its category name) and predictions
        scoring at least draw_score (red, labelled "name score"). Padding samples of the stream are not drawn."""
        was_training = model.training
        model.eval()
        outputs = model(batch["image"], batch["mask"])
        model.train(was_training)
        padding = batch["is_padding"].bool().tolist() if "is_padding" in batch else [False] * len(batch["targets"])
        keep = [i for i, pad in enumerate(padding) if not pad][:self.cfg.draw_images]
        pictures = {}
        for n, i in enumerate(keep):
            target = batch["targets"][i]
            h, w = (int(v) for v in target["size"])
            scores, labels = outputs["pred_logits"][i].float().softmax(-1)[:, :-1].max(-1)
            shown = scores >= self.cfg.draw_score
            ids = [self.category_ids[c] if self.category_ids is not None else c for c in labels[shown].tolist()]
            pred_labels = [f"{self.category_name(c)} {p:.2f}" for c, p in zip(ids, scores[shown].tolist())]
            gt_labels = [self.category_name(c) for c in target["category_ids"].tolist()]
            pictures[f"detections/{n}"] = draw_detections(batch["image"][i, :, :h, :w], target["boxes"],
                                                          outputs["pred_boxes"][i][shown], self.mean, self.std,
                                                          gt_labels=gt_labels, pred_labels=pred_labels)
        return pictures

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The finetuned backbone with timm keys and its backbone.json: loads with
        finetune.backbone.create_from_config, like every other backbone folder (the whole detector: extra_exports)."""
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        tensors = {k[len("backbone."):]: v.detach().float().contiguous() if v.is_floating_point() else v
                   for k, v in state.items() if k.startswith("backbone.")}
        meta = dict(self.backbone_meta)
        if meta.pop("vitdet", False):
            # timm's SAM ViT with neck_chans=0 keeps a LayerNorm2d "neck" (its final norm): identity-initialised
            # parameters, so that timm.create_model("local-dir:...") loads the folder strictly
            width = meta["model_kwargs"]["embed_dim"]
            tensors.update({"neck.weight": torch.ones(width), "neck.bias": torch.zeros(width)})
        meta["model_kwargs"] = dict(meta["model_kwargs"])
        img = to_2tuple(meta["model_kwargs"].get("img_size", SCRATCH_IMG_SIZE))
        meta["pretrained_cfg_overlay"] = {**meta.get("pretrained_cfg_overlay", {}), "mean": list(self.mean),
                                          "std": list(self.std), "input_size": [3, *img]}
        meta.update(source="finetune_detr", init=self.cfg.init, detr=asdict(self.cfg), categories=self.categories)
        return tensors, meta

    def extra_exports(self, state_dict: dict[str, Tensor]) -> dict[str, tuple[dict[str, Tensor], dict]]:
        """Beside the backbone, the whole detector (runtime hook: export/ and export_best/), which
        finetune.detr.detector.load_detector loads on its own."""
        return {DETECTOR_NAME: detector_export(self, state_dict)}

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) for one image at the largest train scale, square, counted by
        FlopCounterMode on a meta-device copy (the Hungarian matching on the CPU is not counted)."""
        if self._flops is None:
            side = -(-max(self.cfg.scales) // self.model.size_divisibility) * self.model.size_divisibility
            with torch.device("meta"):
                backbone = build_backbone_from_meta(self.backbone_meta) if self.cfg.backbone == "vitdet" \
                    else build_backbone(self.cfg, load=False)[0]
                model = build_detr(self.cfg, backbone)
                images, mask = torch.zeros(1, 3, side, side), torch.zeros(1, side, side, dtype=torch.bool)
            with FlopCounterMode(display=False) as counter:
                out = model(images, mask)
                (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
            self._flops = float(counter.get_total_flops())
        return self._flops
