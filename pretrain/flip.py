"""FLIP: contrastive language-image pretraining of a ViT that encodes only the visible patches.

Li et al., "Scaling Language-Image Pre-training via Masking", arXiv 2212.00794 (facebookresearch/flip,
configs/default.py, models_flip.py). At `mask_ratio` m the image tower sees a random `int(L * (1 - m))` of its L
patches (plus the class token) in training; m = 0 is plain CLIP (Radford et al. 2021). The parts:

- the dual encoder is open_clip's `CLIP` built from a model config dict (`model_cfg`): the image tower its
  `VisionTransformer`, whose `PatchDropout` (class token excluded, active only in training) is FLIP's masking; the
  text tower its causal `TextTransformer` with end-of-text pooling and the BPE `SimpleTokenizer` (its vocabulary
  ships in the wheel: nothing is downloaded);
- FLIP's image tower: fixed 2-D sin-cos positions and the mean of the output tokens (`pos_embed="sincos"`,
  `pool="avg"`; CLIP's learned table and class token are `learnable` / `tok`);
- the loss is open_clip's `ClipLoss` (symmetric InfoNCE) on features gathered across ranks (`local_loss`: each rank
  scores its own rows against every rank's columns; `gather_with_grad`: gradients flow through the gather);
- a learnable temperature: logit scale exp(s), s initialised to log(1 / init_temperature) (CLIP's 0.07; FLIP's
  config uses 0.01), the scale clamped at `max_logit_scale` (100) in the forward, so it holds under every ZeRO
  stage (DeepSpeed's fp32 master copy would undo an in-place clamp of the bf16 weight);
- unmasked tuning (FLIP section 3): a second, short stage at mask_ratio 0 from the masked run's weights
  (`model.init`), which closes the train/test gap of masking (launch/presets/pretrain_flip/unmasked_tuning.yaml).

Evaluation: image->text and text->image retrieval recall@1/5/10 over the held-out pairs of data.val, and zero-shot
classification of a labelled set (data.zero_shot, its classes named by index.json's metadata) with open_clip's
`build_zero_shot_classifier` and prompt templates. The picture is the similarity matrix of a fixed batch, with
its images above and captions beside.

Exports: the image tower as a timm `VisionTransformer` (the backbone contract: export/config.json +
model.safetensors, converted by timm's own `checkpoint_filter_fn`, which reads open_clip's visual keys; the CLIP
projection is its head), and the whole dual encoder as open_clip's own folder, export/open_clip/
(open_clip_config.json + open_clip_model.safetensors), which `open_clip.create_model_and_transforms(
"local-dir:export/open_clip")` and `open_clip.get_tokenizer("local-dir:export/open_clip")` load.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from open_clip import SimpleTokenizer
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from contracts.backbone import (OPEN_CLIP_CONFIG, OPEN_CLIP_FORMAT, OPEN_CLIP_WEIGHTS, create_from_config,
                                crop_scale_errors, strip_wrapper_prefixes, vit_geometry_errors)
from contracts.task import TaskHooks
from data_pipeline.transforms import EvalTransform, MAETrainTransform, normalize_on_device
from pretrain.export import vit_config

logger = logging.getLogger(__name__)

# open_clip's BPE vocabulary (bpe_simple_vocab_16e6): 49,152 merges + 256 bytes ... = 49,408 ids
VOCAB_SIZE = 49408
# the export's extra folder: export/open_clip/
OPEN_CLIP_EXPORT = "open_clip"
# timm's registered CLIP image tower: pre-norm, LayerNorm eps 1e-5, no patch-embedding bias, as open_clip's tower;
# the export's model_args spell out the geometry, so this name is only the entry point
TIMM_CLIP_VIT = "vit_base_patch16_clip_224"
# pairs shown in the similarity picture
NUM_VIS_PAIRS = 8
RECALL_KS = (1, 5, 10)
# prompt templates for zero-shot classification: open_clip's lists, or the class name alone (captions that are bare
# names, as the emoji set's)
TEMPLATES: dict[str, tuple] = {"simple": SIMPLE_IMAGENET_TEMPLATES, "openai": OPENAI_IMAGENET_TEMPLATES,
                               "name": ("{}",)}


@dataclass
class FLIPConfig:
    """The `model.*` section of the pretrain_flip job. Defaults are the "tiny" preset (CPU, minutes)."""

    img_size: int = 64               # square input side, pixels
    patch_size: int = 8
    width: int = 192                 # image tower width
    depth: int = 4                   # image tower blocks
    num_heads: int = 3
    mlp_ratio: float = 4.0           # both towers
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 2
    context_length: int = 16         # BPE tokens per caption, start and end included (FLIP: 32; CLIP: 77)
    embed_dim: int = 128             # the shared embedding both towers project to
    mask_ratio: float = 0.5          # fraction of image patches removed in training; 0 = CLIP (and unmasked tuning)
    pool: Literal["avg", "tok"] = "avg"                  # image embedding: mean of patch tokens (FLIP) | class token
    pos_embed: Literal["sincos", "learnable"] = "sincos"  # image positions: FLIP's fixed table | CLIP's learned one
    init_temperature: float = 0.07   # logit scale starts at 1 / init_temperature (learnable)
    max_logit_scale: float = 100.0   # the scale is clamped here (FLIP, CLIP)
    local_loss: bool = True          # each rank's rows against all ranks' columns (open_clip's --local-loss)
    gather_with_grad: bool = True    # gradients through the all-gather (open_clip's --gather-with-grad)
    crop_scale: tuple[float, float] = (0.5, 1.0)         # RandomResizedCrop area range (FLIP: 0.5-1)
    # prompts for data.zero_shot's class names (a set whose metadata holds "prompts", a list per class, uses those)
    zero_shot_templates: Literal["simple", "openai", "name"] = "simple"
    # weights to start from: an open_clip folder this job exported (export/open_clip) or a pretrain_flip run
    # directory; the unmasked tuning stage starts so. "" = random initialisation
    init: str = ""
    # "unmasked_tuning" (FLIP's second stage, its preset) needs model.init and mask ratio 0; "pretrain" takes either
    stage: Literal["pretrain", "unmasked_tuning"] = "pretrain"
    grad_checkpointing: bool = False

    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 1", "patch_size": ">= 1", "width": ">= 1", "depth": ">= 1", "num_heads": ">= 1",
        "mlp_ratio": "> 0", "text_width": ">= 1", "text_depth": ">= 1", "text_heads": ">= 1",
        "context_length": ">= 3", "embed_dim": ">= 1", "mask_ratio": "[0, 1)", "init_temperature": "> 0",
        "max_logit_scale": "> 0", "crop_scale": "(0, 1]"}

    def __post_init__(self) -> None:
        """The geometry: whole patches, heads dividing the widths, sin-cos tables, a patch left visible."""
        self.crop_scale = tuple(self.crop_scale)
        errors = vit_geometry_errors(self.img_size, self.patch_size, self.width, self.num_heads)
        if self.text_heads > 0 and self.text_width % self.text_heads:
            errors.append(f"model.text_heads={self.text_heads} does not divide model.text_width={self.text_width}")
        if self.pos_embed == "sincos" and self.width % 4:
            errors.append(f"model.pos_embed=sincos needs model.width={self.width} to be a multiple of 4")
        if not errors and 0 <= self.mask_ratio < 1:
            patches = (self.img_size // self.patch_size) ** 2
            if int(patches * (1 - self.mask_ratio)) < 1:
                errors.append(f"model.mask_ratio={self.mask_ratio} leaves no visible patch of {patches}")
        errors += crop_scale_errors(self.crop_scale)
        if self.init and not Path(self.init).expanduser().exists():
            errors.append(f"model.init={self.init} does not exist (an export/open_clip folder or a pretrain_flip run "
                          "directory)")
        if self.stage == "unmasked_tuning" and (not self.init or self.mask_ratio):
            errors.append("model.stage=unmasked_tuning continues a masked run with every patch visible: give init=RUN "
                          f"(the first stage's run directory or its export/open_clip) and mask_ratio=0 (now init="
                          f"{self.init!r}, mask_ratio={self.mask_ratio})")
        if errors:
            raise ValueError("; ".join(errors))


# Named architectures as FLIPConfig overrides: open_clip's ViT-B-16 (CLIP) and FLIP's large model
# (configs/cfg_flip_large.py: image 1024 x 24, text 768 x 12, embedding 768), both with FLIP's 32-token captions.
FLIP_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=64, patch_size=8, width=192, depth=4, num_heads=3, text_width=128, text_depth=2,
                 text_heads=2, context_length=16, embed_dim=128),
    "vit_b16": dict(img_size=224, patch_size=16, width=768, depth=12, num_heads=12, text_width=512, text_depth=12,
                    text_heads=8, context_length=32, embed_dim=512),
    "vit_l16": dict(img_size=224, patch_size=16, width=1024, depth=24, num_heads=16, text_width=768, text_depth=12,
                    text_heads=12, context_length=32, embed_dim=768),
}


def open_clip_model_cfg(cfg: FLIPConfig, patch_dropout: float | None = None) -> dict[str, Any]:
    """open_clip's `model_cfg` (what CLIP(**model_cfg) and open_clip_config.json take) for this geometry."""
    return {
        "embed_dim": cfg.embed_dim,
        # a [1] logit scale, not a 0-dim one: DeepSpeed broadcasts every parameter as bytes (a view a 0-dim tensor
        # refuses)
        "nonscalar_logit_scale": True,
        "vision_cfg": {"image_size": cfg.img_size, "patch_size": cfg.patch_size, "width": cfg.width,
                       "layers": cfg.depth, "head_width": cfg.width // cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
                       "patch_dropout": cfg.mask_ratio if patch_dropout is None else patch_dropout,
                       "pool_type": cfg.pool,
                       "pos_embed_type": "sin_cos_2d" if cfg.pos_embed == "sincos" else "learnable"},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": VOCAB_SIZE, "width": cfg.text_width,
                     "heads": cfg.text_heads, "layers": cfg.text_depth, "mlp_ratio": cfg.mlp_ratio},
    }


def build_clip(cfg: FLIPConfig) -> CLIP:
    """open_clip's CLIP for `cfg`, patch dropout at the mask ratio, logit scale at log(1 / init_temperature)."""
    model = CLIP(**open_clip_model_cfg(cfg), init_logit_scale=math.log(1 / cfg.init_temperature))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def find_open_clip_folder(path: str | Path) -> Path:
    """The open_clip folder `path` names: itself, its open_clip/, or a run directory's export/open_clip/."""
    path = Path(path).expanduser()
    for folder in (path, path / OPEN_CLIP_EXPORT, path / "export" / OPEN_CLIP_EXPORT):
        if (folder / OPEN_CLIP_CONFIG).is_file() and (folder / OPEN_CLIP_WEIGHTS).is_file():
            return folder
    raise ValueError(f"model.init={path}: no {OPEN_CLIP_CONFIG} + {OPEN_CLIP_WEIGHTS} there, in its "
                     f"{OPEN_CLIP_EXPORT}/ or in its export/{OPEN_CLIP_EXPORT}/ (give a pretrain_flip run directory "
                     "or its export)")


def load_init(model: CLIP, cfg: FLIPConfig) -> Path:
    """Load the weights of `cfg.init` (strict; the geometry must be the same, the mask ratio may differ)."""
    from safetensors.torch import load_file

    folder = find_open_clip_folder(cfg.init)
    saved = json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    ours = open_clip_model_cfg(cfg)
    diff = [f"{tower}.{k}: {saved.get(tower, {}).get(k)} there, {v} here"
            for tower in ("vision_cfg", "text_cfg") for k, v in ours[tower].items()
            if k != "patch_dropout" and saved.get(tower, {}).get(k) != v]
    if saved.get("embed_dim") != cfg.embed_dim:
        diff.append(f"embed_dim: {saved.get('embed_dim')} there, {cfg.embed_dim} here")
    if diff:
        raise ValueError(f"model.init={cfg.init}: the geometry differs ({'; '.join(diff)}); use the same model.* "
                         "values (or preset) as the run that exported it")
    model.load_state_dict(load_file(str(folder / OPEN_CLIP_WEIGHTS)), strict=True)
    return folder


def recall_at_k(similarity: Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[int, float]:
    """Fraction of rows whose own column (the diagonal) is among their k highest. similarity: [N, N] -> {k: recall}."""
    own = similarity.diagonal().unsqueeze(1)                              # [N, 1]
    rank = (similarity > own).sum(dim=1)                                  # [N]: columns scored strictly higher
    return {k: (rank < k).float().mean().item() for k in ks}


class CaptionTransform:
    """Image + caption -> {"image", "text"} (+ "caption" str when `keep_caption`, + "label" for a labelled sample).

    The image goes through `image_transform`; the caption (the `txt` member) through open_clip's BPE tokenizer,
    built on first use in each worker (the object stays small to pickle): `text` is int64 [context_length], start and
    end tokens included, truncated at context_length. A sample without a caption (a labelled zero-shot set) gets
    no `text`; one with a `cls` member gets its `label`.
    """

    def __init__(self, image_transform: Callable[[dict], dict], context_length: int, keep_caption: bool = False):
        self.image_transform = image_transform
        self.context_length = context_length
        self.keep_caption = keep_caption
        self._tokenizer: SimpleTokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def tokenize(self, texts: list[str]) -> Tensor:
        """texts -> int64 [len(texts), context_length]."""
        if self._tokenizer is None:
            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer(texts)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = dict(self.image_transform(sample))
        if "txt" in sample:
            out["text"] = self.tokenize([sample["txt"]])[0]
            if self.keep_caption:
                out["caption"] = sample["txt"]
        if "cls" in sample:
            out["label"] = torch.tensor(int(sample["cls"]), dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"CaptionTransform({self.image_transform!r}, context_length={self.context_length})"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows, in rank order (row counts may differ). x: [n_r, ...] -> [sum n_r, ...] on x's device."""
    rank, world = _world()
    if world == 1:
        return x
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts).to(x.device)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def clip_visual_to_timm(state_dict: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    """open_clip's image tower (`visual.*` keys; the text tower's are left out) -> the keys of the timm model `meta`
    describes, by timm's own `checkpoint_filter_fn`, which converts OpenAI / open_clip checkpoints (conv1 ->
    patch_embed.proj, in_proj -> qkv, ln_post -> norm, proj -> head). The model it checks shapes against is built
    on the meta device (no memory)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        model = create_from_config(meta)
    state = {k: v.detach().float().cpu() for k, v in strip_wrapper_prefixes(state_dict).items()}
    return {k: v.contiguous() for k, v in checkpoint_filter_fn(state, model).items()}


def flip_encoder_features(model: nn.Module, imgs: Tensor) -> Tensor:
    """The image tower's output tokens [N, 1 + L, D] after its final norm: the exported timm model's
    forward_features (the job's `encoder_features`, compared by tests/test_export_contract.py)."""
    visual = _unwrap(model).visual
    x = visual.transformer(visual._embeds(imgs))
    return visual.ln_post(x)


class FLIPTask(TaskHooks):
    """FLIP for the shared runtime: model, transforms, parameter groups, step, evaluation, pictures, exports."""

    required_members = ("image", "txt")

    def __init__(self, cfg: FLIPConfig) -> None:
        self.cfg = cfg
        self.model = build_clip(cfg)
        if cfg.init:
            folder = load_init(self.model, cfg)
            logger.info("FLIP: weights from %s", folder)
        self.mean, self.std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        # uint8 crops cross the worker boundary (normalised on the device, see pretrain.mae); evaluation images are
        # resized to the side and centre-cropped whole (crop_pct 1: open_clip's own eval transform)
        self.train_transform: Callable[[dict], dict] = CaptionTransform(
            MAETrainTransform(cfg.img_size, scale=cfg.crop_scale, normalize=False), cfg.context_length)
        self.eval_transform: Callable[[dict], dict] = CaptionTransform(
            EvalTransform(cfg.img_size, crop_pct=1.0, mean=self.mean, std=self.std), cfg.context_length,
            keep_caption=True)
        self._loss: ClipLoss | None = None
        self._flops: float | None = None
        patches = (cfg.img_size // cfg.patch_size) ** 2
        logger.info("FLIP: %.2fM image + %.2fM text parameters, %d patches, %d visible in training",
                    sum(p.numel() for p in self.model.visual.parameters()) / 1e6,
                    sum(p.numel() for n, p in self.model.named_parameters() if not n.startswith("visual.")) / 1e6,
                    patches, patches if cfg.mask_ratio == 0 else max(1, int(patches * (1 - cfg.mask_ratio))))

    # --- training -----------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """open_clip's rule (training/main.py): no weight decay for gains, biases, the class embedding and the logit
        scale (every parameter of fewer than 2 dimensions); decay for the rest. The fixed sin-cos table is left out."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}]

    def pixels(self, images: Tensor, model: nn.Module | None = None) -> Tensor:
        """uint8 [N, 3, H, W] (training crops) -> normalised float on their device; floating images pass through.
        With `model`, in its weights' dtype: open_clip's towers do not cast their input (a bf16 engine holds bf16
        weights while the crops are normalised in float32)."""
        images = normalize_on_device(images, self.mean, self.std)
        return images if model is None else images.to(_unwrap(model).visual.conv1.weight.dtype)

    def logit_scale(self, scale: Tensor) -> Tensor:
        """The model's exp(s) (its forward's third output, so ZeRO-3 gathers s) clamped at max_logit_scale: the scale
        every loss and evaluation uses. [1] -> scalar float32."""
        return scale.float().clamp(max=self.cfg.max_logit_scale).reshape(())

    def loss_fn(self) -> ClipLoss:
        """open_clip's ClipLoss for this process group (built on first use: the world exists by then)."""
        if self._loss is None:
            rank, world = _world()
            self._loss = ClipLoss(local_loss=self.cfg.local_loss, gather_with_grad=self.cfg.gather_with_grad,
                                  cache_labels=True, rank=rank, world_size=world)
        return self._loss

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        image_features, text_features, raw_scale = model(self.pixels(batch["image"], model), batch["text"])
        scale = self.logit_scale(raw_scale)
        loss = self.loss_fn()(image_features.float(), text_features.float(), scale)
        return loss, {"temperature": 1.0 / scale.item(), "logit_scale": scale.item()}

    # --- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _embed(self, model: nn.Module, loader: Any, with_text: bool) -> dict[str, Tensor]:
        """Normalised image (and text) embeddings and labels of every non-padding sample of every rank, in eval mode."""
        was_training = model.training
        model.eval()
        images, texts, labels = [], [], []
        scale = None
        for batch in loader:
            img_f, txt_f, scale = model(self.pixels(batch["image"], model), batch["text"] if with_text else None)
            keep = ~batch["is_padding"].bool() if "is_padding" in batch else torch.ones(len(img_f), dtype=torch.bool)
            keep = keep.to(img_f.device)
            images.append(img_f.float()[keep])
            if with_text:
                texts.append(txt_f.float()[keep])
            if "label" in batch:
                labels.append(batch["label"][keep])
        model.train(was_training)
        device = next(_unwrap(model).parameters()).device
        empty = torch.zeros(0, self.cfg.embed_dim, device=device)
        # a rank without batches has no scale of its own; it is the same parameter everywhere
        out = {"image": _gather_rows(torch.cat(images) if images else empty),
               "scale": self.logit_scale(scale) if scale is not None else torch.tensor(float("nan"))}
        if with_text:
            out["text"] = _gather_rows(torch.cat(texts) if texts else empty)
        if labels or not with_text:
            out["label"] = _gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long,
                                                                                     device=device))
        return out

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Retrieval over the held-out pairs of data.val (every rank's): recall@1/5/10 image->text (i2t) and
        text->image (t2i), and the contrastive loss of the whole set at the current scale. Collective."""
        emb = self._embed(model, loader, with_text=True)
        n = len(emb["image"])
        if n == 0:
            return {"val_loss": float("nan")}
        sim = emb["image"] @ emb["text"].T                                           # [N, N], cosine similarities
        scale = emb["scale"].to(sim.device)
        target = torch.arange(n, device=sim.device)
        loss = (F.cross_entropy(scale * sim, target) + F.cross_entropy(scale * sim.T, target)) / 2
        out = {"val_loss": loss.item(), "temperature": 1.0 / scale.item(), "pairs": float(n)}
        for name, s in (("i2t", sim), ("t2i", sim.T)):
            out.update({f"{name}_r{k}": v for k, v in recall_at_k(s).items()})
        return out

    def zero_shot_weights(self, model: nn.Module, metadata: dict[str, Any]) -> Tensor:
        """The zero-shot classifier [D, classes]: each class's normalised mean text embedding over its prompts, by
        open_clip's `build_zero_shot_classifier`. Prompts: metadata["prompts"] (a list per class, the set's own)
        when present, else cfg.zero_shot_templates over metadata["classes"]."""
        classes = [str(c) for c in metadata.get("classes") or []]
        if not classes:
            raise ValueError("data.zero_shot: its index.json metadata names no classes (metadata.classes); write it "
                             "with python -m data_pipeline.write from a labelled source")
        prompts = metadata.get("prompts")
        device = next(_unwrap(model).parameters()).device
        encoder = SimpleNamespace(encode_text=lambda tokens, normalize=True: model(None, tokens)[1].float())
        if prompts:
            if len(prompts) != len(classes):
                raise ValueError(f"data.zero_shot: metadata.prompts has {len(prompts)} lists for {len(classes)} "
                                 "classes")
            # one class at a time: the classes' prompt lists differ in length
            return torch.cat([build_zero_shot_classifier(encoder, self.eval_transform.tokenize, [str(c)],
                                                         [str(p) for p in ps], num_classes_per_batch=None,
                                                         device=device)
                              for c, ps in zip(classes, prompts)], dim=1)
        return build_zero_shot_classifier(encoder, self.eval_transform.tokenize, classes,
                                          TEMPLATES[self.cfg.zero_shot_templates], num_classes_per_batch=10,
                                          device=device)

    def evaluate_zero_shot(self, model: nn.Module, loader: Any, metadata: dict[str, Any]) -> dict[str, float]:
        """Zero-shot top-1 (and top-5 with 5+ classes) on a labelled set: the prediction is the class whose text
        embedding (`zero_shot_weights`) is the most similar to the image's. Collective."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            weights = self.zero_shot_weights(model, metadata)                   # [D, classes]
        model.train(was_training)
        classes = weights.shape[1]
        emb = self._embed(model, loader, with_text=False)
        if len(emb["image"]) == 0:
            return {"zero_shot_top1": float("nan")}
        logits = emb["image"] @ weights
        out = {"zero_shot_top1": (logits.argmax(1) == emb["label"]).float().mean().item()}
        if classes >= 5:
            top5 = logits.topk(5, dim=1).indices
            out["zero_shot_top5"] = (top5 == emb["label"][:, None]).any(1).float().mean().item()
        return out

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The similarity matrix of up to 8 pairs of a fixed batch: images above, captions beside, each cell the
        cosine similarity (the diagonal holds the true pairs). -> {"similarity": [3, H, W] in [0, 1]}."""
        if "text" not in batch:
            return {}
        n = min(NUM_VIS_PAIRS, len(batch["image"]))
        images, text = self.pixels(batch["image"][:n], model), batch["text"][:n]
        was_training = model.training
        model.eval()
        img_f, txt_f, _ = model(images, text)
        model.train(was_training)
        sim = (img_f.float() @ txt_f.float().T).cpu()                                # [n images, n captions]
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        shown = (images.float() * std + mean).clamp(0, 1).cpu()
        captions = list(batch["caption"][:n]) if "caption" in batch else [_decode(t) for t in text.cpu()]
        return {"similarity": similarity_picture(shown, captions, sim)}

    # --- exports ------------------------------------------------------------------------------------------------

    def _clip_state(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """The consolidated state as open_clip keys, fp32, the logit scale clamped as training used it; a frozen
        sin-cos table the consolidation left out is taken from the task's model (it never changes)."""
        state = {k: v.detach().float().cpu().contiguous() for k, v in strip_wrapper_prefixes(state_dict).items()}
        for key, value in self.model.state_dict().items():
            if key not in state:
                state[key] = value.detach().float().cpu().contiguous()
        state["logit_scale"] = state["logit_scale"].clamp(max=math.log(self.cfg.max_logit_scale))
        return state

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The image tower as a timm VisionTransformer (the backbone contract). Its forward is the CLIP image
        embedding before L2 normalisation (the projection is its head); forward_features are the tower's tokens."""
        cfg = self.cfg
        meta = vit_config(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                          num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, source="flip", mean=self.mean, std=self.std,
                          global_pool="avg" if cfg.pool == "avg" else "token", pre_norm=True, num_classes=cfg.embed_dim,
                          **({"fc_norm": False} if cfg.pool == "avg" else {}))
        meta["architecture"] = TIMM_CLIP_VIT
        meta["mask_ratio"] = cfg.mask_ratio
        return clip_visual_to_timm(self._clip_state(state_dict), meta), meta

    def extra_exports(self, state_dict: dict[str, Tensor]) -> dict[str, tuple[dict[str, Tensor], dict]]:
        """The dual encoder as open_clip's folder: export/open_clip/open_clip_config.json + open_clip_model.safetensors.
        Patch dropout is 0 in its config (inference, and any further training, sees every patch)."""
        cfg = self.cfg
        config = {
            "model_cfg": open_clip_model_cfg(cfg, patch_dropout=0.0),
            "preprocess_cfg": {"size": cfg.img_size, "mean": list(self.mean), "std": list(self.std),
                               "interpolation": "bicubic", "resize_mode": "shortest"},
            "vitpretrain": {"source": "flip", "mask_ratio": cfg.mask_ratio,
                            "tokenizer": f"open_clip SimpleTokenizer (BPE, bpe_simple_vocab_16e6, {VOCAB_SIZE} ids), "
                                         f"context_length {cfg.context_length}: open_clip.get_tokenizer('local-dir:"
                                         "<this folder>')"},
        }
        return {OPEN_CLIP_EXPORT: (self._clip_state(state_dict), {"format": OPEN_CLIP_FORMAT, "config": config})}

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per image-caption pair at the configured mask ratio, counted on a CPU
        copy of the model with a batch of 2 (patch dropout draws its indices on the CPU, so not on the meta device)."""
        if self._flops is None:
            model = build_clip(replace(self.cfg, grad_checkpointing=False, init=""))
            imgs = torch.zeros(2, 3, self.cfg.img_size, self.cfg.img_size)
            text = torch.zeros(2, self.cfg.context_length, dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                img_f, txt_f, scale = model(imgs, text)
                ClipLoss()(img_f, txt_f, scale.exp()).backward()
            self._flops = float(counter.get_total_flops()) / 2
        return self._flops


def _decode(tokens: Tensor) -> str:
    """BPE ids -> text without the start/end markers and padding."""
    tokenizer = SimpleTokenizer()
    ids = [int(t) for t in tokens if int(t) not in (0, tokenizer.sot_token_id, tokenizer.eot_token_id)]
    return tokenizer.decode(ids).strip()


def similarity_picture(images: Tensor, captions: list[str], sim: Tensor, cell: int = 64) -> Tensor:
    """images [n, 3, h, w] in [0, 1], captions (n), sim [n images, n captions] -> [3, H, W] in [0, 1]: a column per
    image (thumbnail on top), a row per caption (text on the left), each cell coloured and labelled by its value."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    n = len(captions)
    left, top = 3 * cell, cell
    canvas = Image.new("RGB", (left + n * cell, top + n * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for j in range(images.shape[0]):
        thumb = (images[j].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(thumb).resize((cell - 4, cell - 4)), (left + j * cell + 2, 2))
    lo, hi = float(sim.min()), float(sim.max())
    cmap = colormaps["viridis"]
    for i in range(n):       # caption rows
        draw.text((4, top + i * cell + cell // 2 - 6), captions[i][:28], fill="black")
        for j in range(images.shape[0]):
            value = float(sim[j, i])
            rgb = tuple(int(255 * c) for c in cmap((value - lo) / max(hi - lo, 1e-6))[:3])
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=rgb, outline="white" if i != j else "red")
            draw.text((x0 + 8, y0 + cell // 2 - 6), f"{value:.2f}", fill="white" if value < (lo + hi) / 2 else "black")
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
