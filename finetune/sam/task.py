"""The finetune_sam task: SAM (Kirillov et al. 2023) trained on instance masks, for the shared runtime.

The model is finetune/sam/model.py's: the image encoder from `model.init` (a plain ViT export, MAE's being the paper's
start, converted to the windowed ViT by finetune/vitdet.py, with a new neck; `scratch`: a random plain ViT of the
model.patch_size..num_heads geometry converted the same way; or a SAM folder, sam.json + sam.safetensors, written by
this task or by launch/sam_checkpoint.py from a published sam_vit_*.pth, which brings its whole model), the prompt
encoder and mask decoder of the `segment-anything` package.

Data: detection shards whose json has `segmentation` (COCO RLE per box; data_pipeline.detection_transforms.read_target
gives the masks). Images are resized on their longest side to model.img_size and padded at the bottom/right to a
square, exactly segment-anything's `ResizeLongestSide` + `Sam.preprocess`, so the export predicts with SamPredictor
as it was trained; masks follow with nearest-neighbour resizing; each mask's box prompt is its tight box.

Training (finetune/sam/prompts.py): per image up to model.max_masks masks, all with the same kind of first prompt
(a point with probability 1 - box_prob, else the noisy box), then model.correction_points points from the error
region and model.mask_only_rounds rounds that add no point (one at the end, the others at random rounds, as the
paper's 11 = 1 + 8 + 2), each round reading the previous round's low-res logits as its mask prompt (detached; after
the 3-mask round those of the most confident mask, as at inference); the loss of every round, averaged. A single point predicts 3 masks (gradient through the best), every other round one.

Evaluation at the model's input resolution (the padded square; metrics over every mask of the validation set):
miou_1pt (one click at the object's centre, farthest from its boundary; SAM's most confident of its 3 masks),
miou_1pt_oracle (the best of the 3), miou_box (the exact box, one mask), miou_<k>pt (after k clicks, each at the centre
of the larger error region, previous logits fed back). TensorBoard: for a few validation masks, the image with the
ground truth (green), the prediction (red) and the prompts (positive points blue, negative yellow, the box white),
for each protocol.

Export: export/ holds the image encoder as a timm folder (`samvit_base_patch16` with the neck: timm's `local-dir:`
loads it) and sam.safetensors + sam.json: the whole model in segment-anything's state-dict layout, which
`finetune.sam.model.load_segment_anything` (sam_model_registry for vit_b/l/h geometries) and
`launch/sam_checkpoint.py to-pth` (a .pth for `sam_model_registry[KEY](checkpoint=...)`) read.
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from contracts.backbone import vit_geometry_errors
from contracts.task import TaskHooks
from finetune import backbone as bb
from finetune.sam import prompts as pr
from finetune.sam.model import FORMAT, SamModel, SamSpec, build_model, from_segment_anything, pixels_to_sam, \
    to_segment_anything, upscale_logits
from finetune.vitdet import VITDET_ARCHITECTURE, vitdet_from_state

logger = logging.getLogger(__name__)

SCRATCH_IMG_SIZE = 1024       # model.img_size=0 with init=scratch: SAM's input side
SAM_EXPORT = "sam"            # export/sam.safetensors + sam.json: the whole model, segment-anything's layout
WEIGHT_DECAY = 0.1            # SAM App. A; marks decayed groups (the runtime sets optim.weight_decay on them)
GT_COLOR, PRED_COLOR = (0, 200, 0), (230, 0, 0)
POS_COLOR, NEG_COLOR, BOX_COLOR = (0, 90, 255), (255, 220, 0), (255, 255, 255)


@dataclass
class SAMConfig:
    """The `model.*` section of finetune_sam. Defaults: the tiny CPU preset's model (a 4 x 192 ViT/16 with 4 x 4
    windows, a 128-wide decoder; the preset sets 128-px images); the vit_b16 preset holds the paper's ViT-B at
    1024 px."""

    # a plain ViT export (backbone folder or run dir), "scratch", or a SAM folder (sam.json: the whole model)
    init: str = "scratch"
    # input side, px (longest side resized to it, then padded square); 0 = the init's own (a SAM folder's, a ViT
    # export's pretraining size; scratch: SAM's 1024)
    img_size: int = 0
    # --- a ViT from scratch (init=scratch) ---
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    # --- the windowed encoder (finetune/vitdet.py) ---
    window_size: int = 4           # tokens per window side (SAM/ViTDet: 14 at 1024 px)
    global_blocks: tuple[int, ...] = ()  # () = 4 evenly spaced (SAM ViT-B: 2, 5, 8, 11)
    rel_pos: bool = True
    # --- prompt encoder and mask decoder (segment-anything's; SAM: 256 / 16 / 2 / 2048 / 8 / 3 / 256) ---
    prompt_dim: int = 128
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 512
    decoder_heads: int = 4
    iou_head_hidden_dim: int = 128
    # --- loss (SAM: focal 20 : dice 1, IoU MSE 1) ---
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    supervise_all_iou: bool = True   # IoU MSE on all 3 outputs (they are ranked by it); False: the best one (sam2)
    # --- prompt simulation (SAM: 8 correction points + 2 mask-only rounds after the first prompt) ---
    box_prob: float = 0.5          # first prompt a box (else a point)
    box_noise: float = 0.1         # box corner noise, fraction of the side (capped at 20 px of 1024)
    correction_points: int = 2
    mask_only_rounds: int = 1
    max_masks: int = 64            # masks per image per step (SAM: 64 per GPU image)
    hflip: float = 0.5
    # --- optimisation ---
    layer_decay: float = 0.8       # SAM App. A (recalled); 1 = off
    # --- evaluation and pictures ---
    eval_points: int = 5           # miou_<k>pt after k clicks
    draw_images: int = 4

    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 0", "patch_size": ">= 1", "embed_dim": ">= 1", "depth": ">= 1", "num_heads": ">= 1",
        "mlp_ratio": "> 0", "drop_path": "[0, 1)", "window_size": ">= 0", "global_blocks": ">= 0",
        "prompt_dim": ">= 8", "mask_in_chans": ">= 4", "decoder_depth": ">= 1", "decoder_mlp_dim": ">= 1",
        "decoder_heads": ">= 1", "iou_head_hidden_dim": ">= 1", "focal_weight": ">= 0", "dice_weight": ">= 0",
        "iou_weight": ">= 0", "focal_alpha": "[0, 1]", "focal_gamma": ">= 0", "box_prob": "[0, 1]",
        "box_noise": ">= 0", "correction_points": ">= 0", "mask_only_rounds": ">= 0", "max_masks": ">= 1",
        "hflip": "[0, 1]", "layer_decay": "(0, 1]", "eval_points": ">= 1", "draw_images": ">= 0"}

    def __post_init__(self) -> None:
        errors = []
        init = self.init.strip()
        if init != "scratch" and find_sam_folder(init) is None:
            try:
                bb.find_backbone(init)
            except ValueError as e:
                errors.append(f"model.init={self.init}: {e} (or a SAM folder with sam.json)")
        if init == "scratch":
            errors += vit_geometry_errors(self.img_size or SCRATCH_IMG_SIZE, self.patch_size, self.embed_dim,
                                          self.num_heads)
        if self.prompt_dim % 8 or self.prompt_dim % self.decoder_heads:
            errors.append(f"model.prompt_dim={self.prompt_dim} must be a multiple of 8 (the decoder's upscaling "
                          f"widths prompt_dim/4, /8) and of model.decoder_heads={self.decoder_heads}")
        if self.img_size and self.img_size % self.patch_size:
            errors.append(f"model.img_size={self.img_size} must be a multiple of model.patch_size={self.patch_size}")
        if errors:
            raise ValueError("; ".join(errors))


# --- the SAM folder ---------------------------------------------------------------------------------------------

def find_sam_folder(path: str | Path) -> Path | None:
    """`path` or its export/ when it holds sam.json + sam.safetensors, else None."""
    path = Path(path).expanduser()
    for folder in (path, path / "export"):
        if (folder / f"{SAM_EXPORT}.json").is_file() and (folder / f"{SAM_EXPORT}.safetensors").is_file():
            return folder
    return None


def sam_meta(spec: SamSpec, **extra: Any) -> dict[str, Any]:
    """sam.json: the format, the geometry and the registry key that builds it (None: build from the spec)."""
    key = spec.registry_key()
    usage = (f"sam_model_registry['{key}']() then load_state_dict(safetensors.torch.load_file('sam.safetensors'))"
             if key else "finetune.sam.model.load_segment_anything(SamSpec.from_dict(meta['spec']), state): "
             "segment-anything's classes with this geometry (sam_model_registry builds only vit_b/l/h at 1024 px)")
    return {"format": FORMAT, "registry": key, "spec": asdict(spec), "usage": usage, **extra}


def read_sam_folder(folder: str | Path) -> tuple[SamSpec, dict[str, Tensor], dict[str, Any]]:
    """(spec, state dict in segment-anything's layout, sam.json) of a SAM folder (or a run dir with export/)."""
    import json

    found = find_sam_folder(folder)
    if found is None:
        raise ValueError(f"{folder} holds no {SAM_EXPORT}.json + {SAM_EXPORT}.safetensors")
    meta = json.loads((found / f"{SAM_EXPORT}.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{found / (SAM_EXPORT + '.json')}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return SamSpec.from_dict(meta["spec"]), load_file(str(found / f"{SAM_EXPORT}.safetensors")), meta


# --- data -------------------------------------------------------------------------------------------------------

class SamTransform:
    """A detection sample with masks -> {"image": [3, S, S] normalised, zero (= mean) padding at the bottom/right,
    "target": {"masks": bool [N, S, S], "boxes": float32 [N, 4] xyxy px, "size": int64 [2] (h, w) before padding,
    "image_id"}}: the longest side resized to S (segment-anything's ResizeLongestSide rounding), masks nearest,
    crowd and empty masks dropped, each box the tight box of its mask. Picklable map_fn for the stream."""

    def __init__(self, img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, hflip: float = 0.0) -> None:
        self.img_size, self.mean, self.std, self.hflip = img_size, tuple(mean), tuple(std), hflip

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        from data_pipeline.detection_transforms import read_target
        from data_pipeline.stream import SkipSample

        image, target = read_target(sample)
        if "masks" not in target:
            raise SkipSample("no_masks", f"{sample.get('__key__', '?')}: its json has no segmentation")
        masks = target["masks"][target["iscrowd"] == 0]
        if self.hflip and random.random() < self.hflip:
            image, masks = TF.horizontal_flip(image), TF.horizontal_flip(masks)
        w, h = image.size
        scale = self.img_size / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        image, masks = TF.resize(image, [nh, nw], antialias=True), TF.resize(masks, [nh, nw])
        pixels = TF.normalize(TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True), self.mean, self.std)
        pad = [0, 0, self.img_size - nw, self.img_size - nh]
        masks = TF.pad(masks.as_subclass(torch.Tensor).bool(), pad)
        masks = masks[masks.flatten(1).any(1)]
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]) if len(masks) else torch.zeros(0, 4)
        return {"image": TF.pad(pixels, pad).contiguous(),
                "target": {"masks": masks, "boxes": boxes.float(), "size": torch.tensor([nh, nw]),
                           "image_id": target["image_id"]}}


def sam_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """SamTransform outputs -> {"image": [B, 3, S, S], "targets": [target, ...]} (every image already S x S)."""
    return {"image": torch.stack([s["image"] for s in samples]), "targets": [s["target"] for s in samples]}


# --- the task ---------------------------------------------------------------------------------------------------

def build_encoder(cfg: SAMConfig, spec: SamSpec) -> tuple[nn.Module, dict[str, Any]]:
    """The windowed image encoder with SAM's neck from a plain ViT export or a random plain ViT (init=scratch):
    finetune/vitdet.py's conversion. Returns (encoder, the source's backbone meta)."""
    if cfg.init.strip() == "scratch":
        source = bb.scratch_vit_config(img_size=spec.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                       depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                       class_token=True, global_pool="token", num_classes=0)
        state = bb.create_from_config(source).state_dict()
        where = "the from-scratch ViT"
    else:
        source, state = bb.read_backbone(cfg.init.strip())
        where = cfg.init
    encoder = vitdet_from_state(source, state, spec.img_size, cfg.window_size, cfg.global_blocks or None,
                                cfg.rel_pos, cfg.drop_path, where, neck_chans=cfg.prompt_dim)
    return encoder, source


class SAMTask(TaskHooks):
    """SAM finetuning for the shared runtime (contracts/task.py)."""

    required_members = ("image", "json")
    export_name = "backbone"     # the image encoder as a timm folder; the whole model: extra_exports (sam.*)

    def __init__(self, cfg: SAMConfig) -> None:
        self.cfg = cfg
        sam_folder = find_sam_folder(cfg.init.strip()) if cfg.init.strip() != "scratch" else None
        if sam_folder is not None:
            spec, state, _ = read_sam_folder(sam_folder)
            if cfg.img_size and cfg.img_size != spec.img_size:
                raise ValueError(f"model.img_size={cfg.img_size}, but the SAM at {cfg.init} reads {spec.img_size} px "
                                 f"images; set model.img_size=0 (or {spec.img_size})")
            self.model = build_model(spec, drop_path_rate=cfg.drop_path)
            self.model.load_state_dict(from_segment_anything(state))
            self.mean = tuple(m / 255.0 for m in spec.pixel_mean)
            self.std = tuple(s / 255.0 for s in spec.pixel_std)
        else:
            source = bb.read_config(bb.find_backbone(cfg.init.strip())) if cfg.init.strip() != "scratch" else {}
            img_size = cfg.img_size or source.get("model_kwargs", {}).get("img_size", SCRATCH_IMG_SIZE)
            overlay = source.get("pretrained_cfg_overlay", {})
            self.mean = tuple(overlay.get("mean", IMAGENET_DEFAULT_MEAN))
            self.std = tuple(overlay.get("std", IMAGENET_DEFAULT_STD))
            pixel_mean, pixel_std = pixels_to_sam(self.mean, self.std)
            spec = SamSpec(img_size=img_size, prompt_dim=cfg.prompt_dim, mask_in_chans=cfg.mask_in_chans,
                           decoder_depth=cfg.decoder_depth, decoder_mlp_dim=cfg.decoder_mlp_dim,
                           decoder_heads=cfg.decoder_heads, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
                           pixel_mean=pixel_mean, pixel_std=pixel_std)
            encoder, _ = build_encoder(cfg, spec)
            kw = encoder.vitdet_kwargs
            spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads = (kw["patch_size"], kw["embed_dim"],
                                                                           kw["depth"], kw["num_heads"])
            spec.mlp_ratio, spec.window_size, spec.use_rel_pos = kw["mlp_ratio"], kw["window_size"], kw["use_rel_pos"]
            spec.global_attn_indexes = list(kw["global_attn_indexes"])
            self.model = SamModel(encoder, spec)
        self.spec = spec
        self.train_transform: Callable[[dict], dict] = SamTransform(spec.img_size, self.mean, self.std, cfg.hflip)
        self.eval_transform: Callable[[dict], dict] = SamTransform(spec.img_size, self.mean, self.std)
        self.train_collate = self.eval_collate = sam_collate
        self._flops: float | None = None
        logger.info("SAM: %s encoder (%d x %d, patch %d, window %d, global %s) from %s, %d-px input, decoder %d x %d; "
                    "%.2fM parameters", "registry " + str(spec.registry_key()) if spec.registry_key() else "custom",
                    spec.depth, spec.embed_dim, spec.patch_size, spec.window_size, spec.global_attn_indexes, cfg.init,
                    spec.img_size, spec.decoder_depth, spec.prompt_dim,
                    sum(p.numel() for p in self.model.parameters()) / 1e6)

    def on_dataset(self, metadata: dict[str, Any]) -> None:
        kind = metadata.get("kind")
        if kind not in (None, "detection"):
            raise ValueError(f"a {kind} dataset; finetune_sam needs detection shards whose json has segmentation "
                             "(instance masks)")

    # --- optimisation -------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """Encoder: layer-decay groups (timm's `param_groups_layer_decay`, block i of L at decay^(L + 1 - i): the
        prompt encoder and decoder are the top layer), no decay on 1-D tensors and the position table. Prompt
        encoder and decoder: decay on matrices."""
        encoder = self.model.image_encoder
        groups = param_groups_layer_decay(encoder, weight_decay=WEIGHT_DECAY,
                                          no_weight_decay_list=sorted(encoder.no_weight_decay()),
                                          layer_decay=self.cfg.layer_decay)
        for g in groups:
            g["lr_scale"] = g.get("lr_scale", 1.0) * self.cfg.layer_decay
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("image_encoder.") and p.requires_grad]
        groups.append({"params": [p for p in rest if p.ndim > 1], "weight_decay": WEIGHT_DECAY})
        groups.append({"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0})
        return groups

    def _loss(self, logits: Tensor, iou: Tensor, gt: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        return pr.sam_loss(upscale_logits(logits, self.spec.img_size), iou, gt, cfg.focal_weight, cfg.dice_weight,
                           cfg.iou_weight, cfg.supervise_all_iou, cfg.focal_alpha, cfg.focal_gamma)

    def simulate(self, model: nn.Module, embedding: Tensor, gt: Tensor, boxes: Tensor) -> tuple[Tensor, dict]:
        """The interactive training rounds of one image's masks (see the module docstring): embedding [1, C, g, g],
        gt [P, S, S] bool, boxes [P, 4] -> (mean loss over rounds, the first and last rounds' terms)."""
        cfg, size = self.cfg, self.spec.img_size
        rounds = 1 + cfg.correction_points + cfg.mask_only_rounds
        mask_only = {rounds - 1} if cfg.mask_only_rounds else set()
        if cfg.mask_only_rounds > 1:
            mask_only |= set(random.sample(range(1, rounds - 1), cfg.mask_only_rounds - 1))
        use_box = random.random() < cfg.box_prob
        box = pr.noisy_boxes(boxes, size, cfg.box_noise) if use_box else None
        coords = labels = None
        if not use_box:
            coords, labels = pr.sample_points(gt)[:, None], torch.ones(len(gt), 1, dtype=torch.int64,
                                                                         device=gt.device)
        rows = torch.arange(len(gt), device=gt.device)
        mask_input, total, first = None, 0.0, {}
        for r in range(rounds):
            if r > 0 and r not in mask_only:
                c, lab = pr.error_points(previous, gt)
                coords = c[:, None] if coords is None else torch.cat([coords, c[:, None]], 1)
                labels = lab[:, None] if labels is None else torch.cat([labels, lab[:, None]], 1)
            multimask = r == 0 and not use_box
            logits, iou = model(embedding=embedding, points=None if coords is None else (coords, labels), boxes=box,
                                mask_input=mask_input, multimask=multimask)
            loss, terms = self._loss(logits, iou, gt)
            total = total + loss
            first = first or terms
            chosen = iou.argmax(1) if multimask else torch.zeros_like(rows)
            mask_input = logits[rows, chosen][:, None].detach()
            previous = upscale_logits(mask_input, size)[:, 0] > 0
        return total / rounds, {"first": first, "last": terms}

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The embeddings of the batch, then each image's simulated rounds; the loss averaged over images with
        masks. Logs the loss terms of the last round and the IoU after the first and the last round."""
        embeddings = model(batch["image"])
        losses, firsts, lasts = [], [], []
        for b, target in enumerate(batch["targets"]):
            gt, boxes = target["masks"], target["boxes"].float()
            if not len(gt):
                continue
            if len(gt) > self.cfg.max_masks:
                keep = torch.randperm(len(gt), device=gt.device)[: self.cfg.max_masks]
                gt, boxes = gt[keep], boxes[keep]
            loss, terms = self.simulate(model, embeddings[b: b + 1], gt, boxes)
            losses.append(loss)
            firsts.append(terms["first"])
            lasts.append(terms["last"])
        if not losses:  # no masks in the batch: a zero loss that still reaches every encoder weight
            return embeddings.sum() * 0.0, {}
        metrics = {k: float(torch.stack([t[k] for t in lasts]).mean()) for k in ("focal", "dice", "iou_mse")}
        metrics["iou_first"] = float(torch.stack([t["iou"] for t in firsts]).mean())
        metrics["iou_last"] = float(torch.stack([t["iou"] for t in lasts]).mean())
        return torch.stack(losses).mean(), metrics

    # --- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def protocol(self, model: nn.Module, embedding: Tensor, gt: Tensor, boxes: Tensor) -> dict[str, Any]:
        """The deterministic evaluation prompts of one image's masks gt [P, S, S]: {"1pt", "box", "<k>pt"} ->
        (predicted masks [P, S, S] bool, IoU [P], prompts (coords [P, K, 2], labels [P, K], boxes [P, 4] | None)),
        plus "1pt_oracle" -> IoU [P] (the best of the 3 masks)."""
        size, rows = self.spec.img_size, torch.arange(len(gt), device=gt.device)
        out: dict[str, Any] = {}
        coords, labels = pr.center_points(gt)[:, None], torch.ones(len(gt), 1, dtype=torch.int64, device=gt.device)
        logits, iou_pred = model(embedding=embedding, points=(coords, labels), multimask=True)
        preds = upscale_logits(logits, size) > 0
        ious = pr.mask_iou(preds, gt)
        chosen = iou_pred.argmax(1)
        out["1pt"] = (preds[rows, chosen], ious[rows, chosen], (coords, labels, None))
        out["1pt_oracle"] = ious.max(1).values
        k = self.cfg.eval_points
        previous, mask_input = preds[rows, chosen], logits[rows, chosen][:, None]
        for _ in range(k - 1):
            c, lab = pr.corrective_points(previous, gt)
            coords, labels = torch.cat([coords, c[:, None]], 1), torch.cat([labels, lab[:, None]], 1)
            logits, _ = model(embedding=embedding, points=(coords, labels), mask_input=mask_input)
            mask_input = logits
            previous = upscale_logits(logits, size)[:, 0] > 0
        out[f"{k}pt"] = (previous, pr.mask_iou(previous[:, None], gt)[:, 0], (coords, labels, None))
        logits, _ = model(embedding=embedding, boxes=boxes)
        pred = upscale_logits(logits, size)[:, 0] > 0
        out["box"] = (pred, pr.mask_iou(pred[:, None], gt)[:, 0], (None, None, boxes))
        return out

    def _valid(self, batch: dict[str, Any]) -> list[int]:
        padding = batch.get("is_padding")
        n = len(batch["targets"])
        return [i for i in range(n) if padding is None or not bool(padding[i])]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Mean IoU over every validation mask for each protocol (module docstring), all ranks. Collective."""
        was_training = model.training
        model.eval()
        names = ("1pt", "1pt_oracle", "box", f"{self.cfg.eval_points}pt")
        device = next(self.model.parameters()).device
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
        for batch in loader:
            embeddings = model(batch["image"])
            for b in self._valid(batch):
                target = batch["targets"][b]
                if not len(target["masks"]):
                    continue
                result = self.protocol(model, embeddings[b: b + 1], target["masks"], target["boxes"].float())
                for i, name in enumerate(names):
                    ious = result[name] if name == "1pt_oracle" else result[name][1]
                    sums[i] += ious.double().sum()
                sums[-1] += len(target["masks"])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        model.train(was_training)
        count = max(float(sums[-1]), 1.0)
        metrics = {f"miou_{name}": float(sums[i]) / count for i, name in enumerate(names)}
        metrics["masks"] = float(sums[-1])
        return metrics

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """For the first mask of up to draw_images images: one picture, the protocols side by side (1 point, box,
        k points): the image, ground truth green, prediction red, positive points blue, negative yellow, box white."""
        was_training = model.training
        model.eval()
        embeddings = model(batch["image"])
        pictures = {}
        shown = [b for b in self._valid(batch) if len(batch["targets"][b]["masks"])][: self.cfg.draw_images]
        for n, b in enumerate(shown):
            target = batch["targets"][b]
            gt, boxes = target["masks"][:1], target["boxes"][:1].float()
            result = self.protocol(model, embeddings[b: b + 1], gt, boxes)
            panels = [draw_prompts(batch["image"][b], gt[0], result[name][0][0], *result[name][2], self.mean,
                                   self.std) for name in ("1pt", "box", f"{self.cfg.eval_points}pt")]
            pictures[f"masks/{n}"] = torch.cat(panels, dim=2)
        model.train(was_training)
        return pictures

    # --- export -------------------------------------------------------------------------------------------------

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The image encoder as a timm folder (`samvit_base_patch16` kwargs with the neck; timm `local-dir:`)."""
        prefix = "image_encoder."
        tensors = {k.removeprefix("module.")[len(prefix):]: v.detach().float().contiguous()
                   for k, v in state_dict.items() if k.removeprefix("module.").startswith(prefix)}
        kwargs = {k: v for k, v in self.model.image_encoder.vitdet_kwargs.items()}
        meta = {"architecture": VITDET_ARCHITECTURE, "model_kwargs": kwargs, "source": "finetune_sam",
                "init": self.cfg.init, "pretrained_cfg_overlay": {"mean": list(self.mean), "std": list(self.std),
                                                                  "input_size": [3, self.spec.img_size,
                                                                                 self.spec.img_size]}}
        return tensors, meta

    def extra_exports(self, state_dict: dict[str, Tensor]) -> dict[str, tuple[dict[str, Tensor], dict]]:
        """sam.safetensors + sam.json: the whole model in segment-anything's layout (finetune/sam/model.py)."""
        tensors = {k: v.detach().float().contiguous() for k, v in to_segment_anything(state_dict).items()}
        return {SAM_EXPORT: (tensors, sam_meta(self.spec, source="finetune_sam", init=self.cfg.init))}

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) of one image with one mask through every round (more masks per image
        add decoder rounds), counted by FlopCounterMode on a meta-device copy."""
        if self._flops is None:
            rounds = 1 + self.cfg.correction_points + self.cfg.mask_only_rounds
            s, g = self.spec.img_size, self.spec.grid
            with torch.device("meta"):
                model = build_model(self.spec)
                images, box = torch.zeros(1, 3, s, s), torch.zeros(1, 4)
            with FlopCounterMode(display=False) as counter:
                emb = model(images)
                total = emb.sum()
                for r in range(rounds):
                    # a box: the same two sparse tokens as one point (+ its padding point), and no boolean indexing,
                    # which the meta device cannot run
                    mask = torch.zeros(1, 1, 4 * g, 4 * g, device="meta") if r else None
                    logits, iou = model(embedding=emb, boxes=box, mask_input=mask, multimask=r == 0)
                    total = total + logits.sum() + iou.sum()
                total.backward()
            self._flops = float(counter.get_total_flops())
        return self._flops


def draw_prompts(image: Tensor, gt: Tensor, pred: Tensor, coords: Tensor | None, labels: Tensor | None,
                 box: Tensor | None, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """image [3, S, S] normalised, gt / pred [S, S] bool, coords [1, K, 2], labels [1, K], box [1, 4] -> [3, S, S]
    in [0, 1]: ground truth green, prediction red (torchvision's draw_segmentation_masks), points and box on top."""
    pixels = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    canvas = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    canvas = draw_segmentation_masks(canvas, torch.stack([gt, pred]).cpu(), alpha=0.45,
                                     colors=[GT_COLOR, PRED_COLOR])
    radius = max(2, canvas.shape[-1] // 64)
    if coords is not None:
        for label, color in ((1, POS_COLOR), (0, NEG_COLOR)):
            chosen = coords[0][labels[0] == label].cpu()
            if len(chosen):
                canvas = draw_keypoints(canvas, chosen[None] + 0.5, colors=color, radius=radius)
    if box is not None:
        canvas = draw_bounding_boxes(canvas, box.cpu().round(), colors=[BOX_COLOR], width=max(1, radius // 2))
    return canvas.float() / 255.0

