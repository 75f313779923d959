"""MP3: masked position prediction pretraining of a ViT without position embeddings.

Zhai et al., "Position Prediction as an Effective Pretraining Strategy" (ICML 2022). No official code was found (the
research notes: lucidrains' vit_pytorch `mp3.py` is the only public implementation, read, not copied). The stages:

1. Data workers: MAE's crop (RandomResizedCrop 0.2-1, bicubic, flip) shipped as uint8 and normalised on the device.
2. The encoder is timm's own `VisionTransformer` with `pos_embed="none"` and no class token: nothing tells a token
   where its patch was (the patch projection is a convolution with stride = kernel, so it carries no position
   either).
3. Context: per image, `int(L * context_ratio)` patches drawn uniformly (sorted per-sample noise, as MAE's masking)
   are the context. In every block all L patches are queries and only the context patches are keys and values:
   a boolean key mask [N, 1, 1, L] on timm's attention (`Block(x, attn_mask=...)`, SDPA), which is exactly
   cross-attention from all patches to the context subset of the same layer's tokens. Keys and values are still
   computed for every patch (the mask only lets the context's through): the price of timm's block unchanged, about
   a third more qkv FLOPs at context 0.25, which `flops_per_sample` counts.
4. Position head: the encoder's final LayerNorm (exported as timm's `norm`) + a Linear to L classes; cross-entropy
   of every patch's logits against its true index (row-major in the grid), context and non-context alike.
   Logged: `pos_accuracy` (all patches) against `pos_chance` = 1/L, split into `pos_accuracy_context` and
   `pos_accuracy_masked` (patches that are only queries), and `pos_error`, the mean grid distance in patches
   between predicted and true position.
5. Recipe (presets): MAE's (AdamW (0.9, 0.95), base lr per 256, warmup then cosine, weight decay 0.05 except 1-D
   parameters and biases).

Export: timm `VisionTransformer` keys (the position head dropped) with `pos_embed="none"`, `class_token=False`,
`global_pool="avg"`, `fc_norm=False` (the final norm kept): `timm.create_model("local-dir:...")` builds the same
encoder, whose `forward_features` equals this model's with every patch as context. Finetuning adds the position
table back: `finetune_cls` builds a backbone exported without one with `pos_embed="learn"`, and
`contracts.backbone.load_weights` starts that table at zero, so the finetune's first forward is the pretrained
encoder's (MP3's finetuning protocol).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from contracts.backbone import crop_scale_errors, vit_geometry_errors
from contracts.task import TaskHooks
from data_pipeline.transforms import normalize_on_device
from pretrain.export import encoder_to_timm, vit_config
from pretrain.masking import num_visible

logger = logging.getLogger(__name__)

# Seed of the context noise of evaluate() and images(): the same contexts at every evaluation.
EVAL_NOISE_SEED = 0
# Images shown by images() (columns of the grid); the position matrix uses the whole fixed batch.
NUM_VIS_IMAGES = 8
# Side of the position matrix picture, at least (each of its L x L cells is a square of whole pixels).
MATRIX_MIN_SIDE = 256
# The decayed group's weight decay (MAE's 0.05); the runtime puts optim.weight_decay on every non-zero group.
WEIGHT_DECAY = 0.05
# Pretraining-only tensors, left out of the export.
PRETRAINING_ONLY = ("pos_head.",)


@dataclass
class MP3Config:
    """The `model.*` section of the pretrain_mp3 job. Defaults are the "tiny" preset (CPU, minutes)."""

    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    context_ratio: float = 0.25       # share of the patches that are keys/values (1 = plain self-attention)
    drop_path: float = 0.0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    grad_checkpointing: bool = False

    # each field's range, checked (with finiteness) by the job config before the dataclass is built
    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 1", "patch_size": ">= 1", "embed_dim": ">= 1", "depth": ">= 1", "num_heads": ">= 1",
        "mlp_ratio": "> 0", "context_ratio": "(0, 1]", "drop_path": "[0, 1)", "crop_scale": "(0, 1]"}

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)  # a JSON round trip hands back a list
        errors = vit_geometry_errors(self.img_size, self.patch_size, self.embed_dim, self.num_heads)
        errors += crop_scale_errors(self.crop_scale)
        if not errors and 0 < self.context_ratio <= 1 and self.num_context < 1:
            errors.append(f"model.context_ratio={self.context_ratio} leaves no context patch of {self.num_patches}: "
                          f"raise it to at least {1 / self.num_patches:.3g}")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_context(self) -> int:
        """Context patches per image: `int(L * context_ratio)` (MAE's count of visible patches)."""
        return num_visible(self.num_patches, 1.0 - self.context_ratio) if self.context_ratio < 1 else self.num_patches


# Named architectures as MP3Config overrides.
MP3_ARCHS: dict[str, dict[str, Any]] = {
    # the digits' 32 px in 4-px patches (64 positions): on the embedded photos at 64 px a 6 x 192 ViT stayed at
    # chance (1.9% vs 1.6% after 300 steps), on the digits this one reaches 9.4% in the same steps
    "tiny": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),
    "vit_s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def context_from_noise(noise: Tensor, num_context: int) -> Tensor:
    """noise [N, L] -> context [N, L] bool: the `num_context` patches with the smallest noise of each row."""
    ids = noise.argsort(dim=1)[:, :num_context]
    return torch.zeros_like(noise, dtype=torch.bool).scatter_(1, ids, True)


class MP3ViT(VisionTransformer):
    """timm's `VisionTransformer` without position embeddings or class token + `pos_head` (Linear(D, L)); its state
    dict minus `pos_head.*` is the exported timm model's."""

    def __init__(self, cfg: MP3Config) -> None:
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                         num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, class_token=False,
                         pos_embed="none", global_pool="avg", fc_norm=False, num_classes=0,
                         drop_path_rate=cfg.drop_path)
        self.cfg = cfg
        self.pos_head = nn.Linear(cfg.embed_dim, cfg.num_patches)
        trunc_normal_(self.pos_head.weight, std=0.02)
        nn.init.zeros_(self.pos_head.bias)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward_tokens(self, imgs: Tensor, context: Tensor | None = None) -> Tensor:
        """imgs [N, 3, H, W], context [N, L] bool (None: every patch) -> final-norm tokens [N, L, D].

        Every patch queries; only context patches are keys and values, in every block. With `context` None this is
        timm's `forward_features`.
        """
        x = self.patch_embed(imgs.to(self.patch_embed.proj.weight.dtype))  # [N, L, D]
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))            # no table, no prefix: x itself
        # [N, 1, 1, L]: key j is visible to every head and query where context[:, j] (SDPA's boolean convention)
        attn_mask = None if context is None else rearrange(context, "n l -> n 1 1 l")
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = (checkpoint(block, x, attn_mask, use_reentrant=False) if use_checkpoint
                 else block(x, attn_mask=attn_mask))
        return self.norm(x)

    def forward(self, imgs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """imgs [N, 3, H, W], noise [N, L] (uniform when None; fixes the context) -> position logits [N, L, L]
        (patch i's scores for each grid position), context [N, L] bool."""
        n = imgs.shape[0]
        if noise is None:
            noise = torch.rand(n, self.cfg.num_patches, device=imgs.device)
        context = context_from_noise(noise.to(imgs.device), self.cfg.num_context)
        return self.pos_head(self.forward_tokens(imgs, context)), context


def mp3_encoder_features(model: MP3ViT, imgs: Tensor) -> Tensor:
    """imgs [N, 3, H, W] -> [N, L, D]: every patch as context = the exported timm model's forward_features."""
    return model.forward_tokens(imgs)


def position_sums(logits: Tensor, context: Tensor, grid: int, keep: Tensor | None = None) -> Tensor:
    """logits [N, L, L], context [N, L] bool, keep [N] (1 = a real sample) -> [9] sums: loss, correct, count,
    correct and count of context patches, of masked ones, grid distance, images."""
    n, length, _ = logits.shape
    keep = torch.ones(n, device=logits.device) if keep is None else keep.float()
    labels = repeat(torch.arange(length, device=logits.device), "l -> n l", n=n)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(n, length)
    predicted = logits.argmax(-1)
    correct = (predicted == labels).float()
    rows, cols = predicted // grid - labels // grid, predicted % grid - labels % grid
    distance = (rows.float() ** 2 + cols.float() ** 2).sqrt()
    weight = keep.view(n, 1).expand(n, length)
    ctx = context.float() * weight
    masked = (~context).float() * weight
    return torch.stack([(loss * weight).sum(), (correct * weight).sum(), weight.sum(), (correct * ctx).sum(),
                        ctx.sum(), (correct * masked).sum(), masked.sum(), (distance * weight).sum(), keep.sum()])


def metrics_from_sums(sums: Tensor, num_patches: int) -> dict[str, float]:
    """The `position_sums` of a whole evaluation -> loss, accuracies, chance, mean grid distance."""
    s = sums.tolist()

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {"loss": ratio(s[0], s[2]), "pos_accuracy": ratio(s[1], s[2]), "pos_chance": 1.0 / num_patches,
            "pos_accuracy_context": ratio(s[3], s[4]), "pos_accuracy_masked": ratio(s[5], s[6]),
            "pos_error": ratio(s[7], s[2])}


class MP3Task(TaskHooks):
    """MP3 for the shared runtime: model, transforms, parameter groups, step, evaluation, pictures, export."""

    required_members = ("image",)  # what every sample must hold; the stream counts others as missing_*

    def __init__(self, cfg: MP3Config) -> None:
        from data_pipeline.transforms import EvalTransform, MAETrainTransform

        self.cfg = cfg
        self.model = MP3ViT(cfg)
        # uint8 crops cross the worker -> device boundary; normalised on the device (`pixels`), as MAE's
        self.train_transform: Callable[[dict], dict] = MAETrainTransform(cfg.img_size, scale=cfg.crop_scale,
                                                                         normalize=False)
        self.eval_transform: Callable[[dict], dict] = EvalTransform(cfg.img_size)
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        self._flops: float | None = None
        logger.info("MP3: %.2fM parameters, %d patches (chance %.4f), %d of them context",
                    sum(p.numel() for p in self.model.parameters()) / 1e6, cfg.num_patches, 1 / cfg.num_patches,
                    cfg.num_context)

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """MP3 classifies each patch's position among the L positions of model.img_size's grid: a batch at another
        size has another L, so multi-scale batches are refused (exit 2)."""
        raise ValueError(f"pretrain_mp3 predicts each patch's position among the {self.cfg.grid ** 2} positions of "
                         f"its {self.cfg.img_size}-px grid; batches at other sizes have other positions. Fix: "
                         "data.multiscale=[]")

    def param_groups(self) -> list[dict]:
        """MAE's rule: no decay for 1-D parameters and biases."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": WEIGHT_DECAY}]

    def pixels(self, images: Tensor) -> Tensor:
        """uint8 [N, 3, H, W] -> normalised float (eval images arrive normalised and pass through)."""
        return normalize_on_device(images, self.mean, self.std)

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits, context = model(self.pixels(batch["image"]))
        sums = position_sums(logits.detach(), context, self.cfg.grid)
        labels = torch.arange(self.cfg.num_patches, device=logits.device).repeat(logits.shape[0])
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels)
        metrics = metrics_from_sums(sums, self.cfg.num_patches)
        return loss, {k: v for k, v in metrics.items() if k != "loss"}

    def _eval_noise(self, generator: torch.Generator, n: int, device: torch.device) -> Tensor:
        """Fixed-seed context noise [n, L], drawn on the CPU (the same on every device)."""
        return torch.rand(n, self.cfg.num_patches, generator=generator).to(device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Position loss and accuracies over every patch of the non-padding val images, the same contexts at every
        evaluation; sums all-reduced over ranks (every rank calls it)."""
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        sums = None
        for batch in loader:
            imgs = self.pixels(batch["image"])
            logits, context = model(imgs, noise=self._eval_noise(generator, imgs.shape[0], imgs.device))
            keep = None
            if "is_padding" in batch:
                keep = ~batch["is_padding"].to(logits.device).bool()
            batch_sums = position_sums(logits, context, self.cfg.grid, keep)
            sums = batch_sums if sums is None else sums + batch_sums
        model.train(was_training)
        if sums is None:
            sums = torch.zeros(9, device=next(self.model.parameters()).device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        return metrics_from_sums(sums, self.cfg.num_patches)

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Two pictures of the fixed batch (forward on every rank, pictures on rank 0):
        - "positions": predicted (columns) against true (rows) positions over the whole batch, each row's share of
          predictions as brightness (the largest white): a perfect model draws the diagonal, chance a uniform grey;
        - "predictions": columns = images; rows = the image | its context (other patches grey) | every patch drawn
          at its predicted position (the mean where several land on one, grey where none does)."""
        imgs = self.pixels(batch["image"])
        was_training = model.training
        model.eval()
        noise = self._eval_noise(torch.Generator().manual_seed(EVAL_NOISE_SEED), imgs.shape[0], imgs.device)
        logits, context = model(imgs, noise=noise)
        model.train(was_training)
        length, g, p = self.cfg.num_patches, self.cfg.grid, self.cfg.patch_size
        predicted = logits.float().argmax(-1)  # [N, L]

        counts = torch.zeros(length, length, device=imgs.device)
        true = repeat(torch.arange(length, device=imgs.device), "l -> n l", n=imgs.shape[0])
        counts.index_put_((true.flatten(), predicted.flatten()), torch.ones(true.numel(), device=imgs.device),
                          accumulate=True)
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        share = share / share.max().clamp(min=1e-8)  # the largest share white: readable at any L
        cell = max(1, -(-MATRIX_MIN_SIDE // length))
        matrix = repeat(share.cpu(), "r c -> k (r a) (c b)", k=3, a=cell, b=cell)

        n = min(NUM_VIS_IMAGES, imgs.shape[0])
        mean = torch.tensor(self.mean, device=imgs.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=imgs.device).view(1, 3, 1, 1)
        original = (imgs[:n].float() * std + mean).clamp(0, 1)
        patches = rearrange(original, "n c (h p) (w q) -> n (h w) (c p q)", p=p, q=p)  # [n, L, 3*p*p]
        shown = context[:n].float().unsqueeze(-1)
        with_context = patches * shown + 0.5 * (1 - shown)
        placed = torch.zeros_like(patches).scatter_add_(
            1, repeat(predicted[:n], "n l -> n l k", k=patches.shape[-1]), patches)
        hits = torch.zeros(n, length, device=imgs.device).scatter_add_(1, predicted[:n], torch.ones_like(
            predicted[:n], dtype=torch.float))
        placed = torch.where(hits.unsqueeze(-1) > 0, placed / hits.clamp(min=1).unsqueeze(-1), 0.5)

        def image(x: Tensor) -> Tensor:
            return rearrange(x, "n (h w) (c p q) -> n c (h p) (w q)", h=g, p=p, q=p)

        rows = torch.cat([original, image(with_context), image(placed)]).cpu()
        return {"positions": matrix, "predictions": make_grid(rows, nrow=n, padding=2, pad_value=1.0)}

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The encoder as timm `VisionTransformer` weights without a position table (see the module docstring)."""
        cfg = self.cfg
        tensors = encoder_to_timm(state_dict, drop_prefixes=PRETRAINING_ONLY)
        config = vit_config(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, source="mp3",
                            global_pool="avg", mean=self.mean, std=self.std, class_token=False, fc_norm=False,
                            pos_embed="none")
        return tensors, {**config, "context_ratio": cfg.context_ratio}

    def flops_per_sample(self) -> float:
        """Training FLOPs per image: forward + backward of the encoder and position head with the context mask
        (keys for every patch, see the module docstring), counted by FlopCounterMode on a meta-device copy."""
        if self._flops is None:
            with torch.device("meta"):
                model = MP3ViT(replace(self.cfg, grad_checkpointing=False, drop_path=0.0))
                imgs = torch.zeros(1, 3, self.cfg.img_size, self.cfg.img_size)
            with FlopCounterMode(display=False) as counter:
                logits, _ = model(imgs)
                logits.float().sum().backward()
            self._flops = float(counter.get_total_flops())
        return self._flops
