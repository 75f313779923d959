"""Masked autoencoder (MAE) pretraining of a plain ViT.

He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377. Adapted from
facebookresearch/mae@efb2a80 (models_mae.py, util/pos_embed.py), keeping its stages and numbers:

- the encoder is a timm ViT (timm's `PatchEmbed` and `Block`, fused qkv with bias, SDPA attention, LayerNorm eps
  1e-6) with a class token and fixed 2-D sin-cos positions (`pretrain.pos_embed`, frozen but in the state dict);
- per-sample random masking keeps `int(L * (1 - mask_ratio))` patches (`pretrain.masking`); the encoder sees only
  those, plus the class token;
- the light decoder embeds the latent to its own width, appends one shared `mask_token` per removed patch,
  un-shuffles, adds its own sin-cos positions, runs its blocks and predicts p*p*3 pixels per patch;
- the loss is the MSE on removed patches only, the target optionally normalised per patch ("norm-pix", unbiased
  variance + 1e-6), averaged per patch and then over removed patches;
- initialisation: patch projection xavier-uniform on its flattened weight, class/mask tokens normal(0.02),
  Linear xavier-uniform with zero bias, LayerNorm 1/0.

Pixels in a patch are ordered (p, q, c), channel-last, as MAE's `patchify` (`nchpwq -> nhwpqc`); this is not the
conv weight's (c, p, q) order. `forward` accepts an explicit `noise` so a run can be compared with a reference
(tests/test_mae.py checks it against transformers' `ViTMAEForPreTraining`).

`MAETask` wraps the model for the shared runtime (see contracts: the Task interface).
"""
import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
from einops import rearrange
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from contracts.task import TaskHooks
from data_pipeline.transforms import normalize_on_device
from pretrain.export import encoder_to_timm, vit_config
from pretrain.masking import num_visible, random_masking
from pretrain.pos_embed import sincos_2d

logger = logging.getLogger(__name__)

# MAE adds this to the per-patch variance before normalising the target (models_mae.py forward_loss).
NORM_PIX_EPS = 1e-6
# Seed of the noise used by evaluate() and images(): the same patches are masked at every evaluation, so val_loss
# and the pictures are comparable across steps.
EVAL_NOISE_SEED = 0
# Images shown by images() (columns of the grid).
NUM_VIS_IMAGES = 8
# The paper's weight decay, carried by the decayed parameter group; the runtime puts optim.weight_decay on every
# group with a non-zero value, so this only marks the group (and is right when the task is used on its own).
WEIGHT_DECAY = 0.05


@dataclass
class MAEConfig:
    """The `model.*` section of the pretrain_mae job. Defaults are the "tiny" preset (CPU, minutes)."""

    img_size: int = 64                # square input side, pixels
    patch_size: int = 8
    embed_dim: int = 192              # encoder width
    depth: int = 6                    # encoder blocks
    num_heads: int = 3
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0            # MLP hidden = mlp_ratio * width, encoder and decoder
    mask_ratio: float = 0.75          # fraction of patches removed; int(L * (1 - mask_ratio)) stay visible
    norm_pix_loss: bool = True        # target normalised per patch (the paper's pretraining setting)
    drop_path: float = 0.0            # stochastic depth, linear over encoder blocks (MAE pretrains without)
    grad_checkpointing: bool = False  # recompute each block in backward (activation memory for ViT-L/H)

    # each field's range, checked (with finiteness) by the job config before the dataclass is built
    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 1", "patch_size": ">= 1", "embed_dim": ">= 1", "depth": ">= 1", "num_heads": ">= 1",
        "decoder_embed_dim": ">= 1", "decoder_depth": ">= 1", "decoder_num_heads": ">= 1", "mlp_ratio": "> 0",
        "mask_ratio": "(0, 1)", "drop_path": "[0, 1)"}

    def __post_init__(self) -> None:
        """The geometry: whole patches, heads dividing the widths, 2-D sin-cos tables, a patch left visible."""
        errors = []
        if self.patch_size > 0 and self.img_size % self.patch_size:
            errors.append(f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}")
        for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            if h > 0 and w % h:
                errors.append(f"model.{heads}={h} does not divide model.{width}={w}")
            if w % 4:
                errors.append(f"model.{width}={w} must be a multiple of 4 (2-D sin-cos positions)")
        if not errors and self.patch_size > 0 and 0 <= self.mask_ratio < 1:
            patches = (self.img_size // self.patch_size) ** 2
            if num_visible(patches, self.mask_ratio) < 1:
                errors.append(f"model.mask_ratio={self.mask_ratio} leaves no visible patch of {patches}")
        if errors:
            raise ValueError("; ".join(errors))


# Named architectures as MAEConfig overrides (the paper's encoders all share the 512-wide, 8-block decoder).
MAE_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "vit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_l16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_h14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """imgs: [N, 3, H, W] -> [N, L, p*p*3], patches row-major, pixels (p, q, c) inside a patch."""
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(x: Tensor, patch_size: int) -> Tensor:
    """x: [N, L, p*p*3] -> [N, 3, H, W] for a square grid (inverse of `patchify`)."""
    grid = int(x.shape[1] ** 0.5)
    if grid * grid != x.shape[1]:
        raise ValueError(f"unpatchify needs a square number of patches, got {x.shape[1]}")
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid, p=patch_size, q=patch_size)


def patch_targets(imgs: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
    """Reconstruction targets. imgs: [N, 3, H, W] -> [N, L, p*p*3], float32.

    With `norm_pix`, each patch is standardised by its own mean and unbiased variance (+1e-6), as MAE does.
    """
    target = patchify(imgs.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, like MAE's torch.var default
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    return target


def per_patch_loss(imgs: Tensor, pred: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
    """Mean squared error of every patch. imgs: [N, 3, H, W], pred: [N, L, p*p*3] -> [N, L], float32."""
    return ((pred.float() - patch_targets(imgs, patch_size, norm_pix)) ** 2).mean(dim=-1)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm ViT encoder. The encoder's keys are timm `VisionTransformer` keys (see `MAETask.export`)."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, in_chans=3, embed_dim=cfg.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim), requires_grad=False)
        # stochastic depth rises linearly from 0 to cfg.drop_path (plain floats: this also runs on the meta device)
        drop_path = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, drop_path=drop_path[i],
                  norm_layer=norm_layer)
            for i in range(cfg.depth)
        ])
        self.norm = norm_layer(cfg.embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(cfg.decoder_depth)
        ])
        self.decoder_norm = norm_layer(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * 3)

        self.grad_checkpointing = cfg.grad_checkpointing
        self.initialize_weights()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def initialize_weights(self) -> None:
        """MAE's reference initialisation (models_mae.py `initialize_weights` / `_init_weights`)."""
        grid = self.patch_embed.grid_size[0]
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.cfg.embed_dim, grid, cls_token=True).unsqueeze(0))
            self.decoder_pos_embed.copy_(sincos_2d(self.cfg.decoder_embed_dim, grid, cls_token=True).unsqueeze(0))
        # the patch projection is a Linear over flattened patches in disguise: initialise it like one
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        # MAE's "trunc_normal_(std=.02)" is effectively normal: the cutoff (2.0) is 100 std away
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)  # MAE follows the official JAX ViT here, not timm's trunc_normal
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def read_any_size(self) -> None:
        """Let the model take any square input whose side is a multiple of the patch (data.multiscale): the patch
        embedding stops asserting model.img_size, and `positions` gives each other grid its own sin-cos table."""
        self.patch_embed.strict_img_size = False

    def positions(self, table: Tensor, num_patches: int) -> Tensor:
        """The fixed position table for a square grid of `num_patches`: table [1, 1 + L0, D] -> [1, 1 + L, D].

        The stored table at model.img_size; at another size (multi-scale batches) MAE's sin-cos formula at that
        grid, exact rather than interpolated, since the table is a fixed function of the grid."""
        if num_patches + 1 == table.shape[1]:
            return table
        grid = round(num_patches ** 0.5)
        if grid * grid != num_patches:
            raise ValueError(f"MAE takes square images: {num_patches} patches are not a square grid")
        return sincos_2d(table.shape[-1], grid, cls_token=True).unsqueeze(0).to(table)

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        """x: [N, T, D] -> [N, T, D] through `blocks`, recomputed in backward when checkpointing."""
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return x

    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: [N, 3, H, W] -> [N, L, p*p*3], pixels (p, q, c) inside a patch."""
        return patchify(imgs, self.cfg.patch_size)

    def unpatchify(self, x: Tensor) -> Tensor:
        """x: [N, L, p*p*3] -> [N, 3, H, W]."""
        return unpatchify(x, self.cfg.patch_size)

    def random_masking(self, x: Tensor, mask_ratio: float, noise: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [N, L, D] -> x_visible [N, len_keep, D], mask [N, L] (1 = removed), ids_restore [N, L]."""
        return random_masking(x, mask_ratio, noise)

    def forward_encoder(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: [N, 3, H, W] -> latent [N, 1 + len_keep, D] (class token first), mask [N, L], ids_restore [N, L]."""
        # a bf16 engine holds bf16 weights while the loader hands float32 images
        x = self.patch_embed(imgs.to(self.patch_embed.proj.weight.dtype))  # [N, L, D]
        pos_embed = self.positions(self.pos_embed, x.shape[1])  # [1, 1 + L, D]
        x = x + pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, len_keep, D]
        cls_token = self.cls_token + pos_embed[:, :1, :]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent: [N, 1 + len_keep, D], ids_restore: [N, L] -> pred [N, L, p*p*3]."""
        x = self.decoder_embed(latent)  # [N, 1 + len_keep, Dd]
        n, num_visible, dim = x.shape
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - num_visible, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd], shuffled order, class token set aside
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # back to patch order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.positions(self.decoder_pos_embed, ids_restore.shape[1])
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # drop the class token's prediction

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """imgs: [N, 3, H, W], pred: [N, L, p*p*3], mask: [N, L] (1 = removed) -> scalar MSE over removed patches."""
        loss = per_patch_loss(imgs, pred, self.cfg.patch_size, self.cfg.norm_pix_loss)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: [N, 3, H, W] -> loss (scalar, float32), pred [N, L, p*p*3], mask [N, L].

        `mask_ratio` defaults to the config's; `noise` [N, L] fixes which patches are removed.
        """
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


class MAETask(TaskHooks):
    """MAE for the shared runtime: model, transforms, parameter groups, step, evaluation, pictures, export."""

    required_members = ("image",)  # what every sample must hold; the stream counts others as missing_*

    def __init__(self, cfg: MAEConfig) -> None:
        # imported here, not at module level, so the model can be used without the data pipeline
        from data_pipeline.transforms import EvalTransform, MAETrainTransform

        self.cfg = cfg
        self.model = MaskedAutoencoderViT(cfg)
        # uint8 crops cross the worker -> main -> device boundary (4x fewer bytes than float32, the largest data
        # throughput gain measured in bench/RESULTS.md); they are normalised on the device in `pixels`.
        self.train_transform: Callable[[dict], dict] = MAETrainTransform(cfg.img_size, normalize=False)
        self.eval_transform: Callable[[dict], dict] = EvalTransform(cfg.img_size)
        self.mean = IMAGENET_DEFAULT_MEAN  # what both transforms normalise with; images() undoes it
        self.std = IMAGENET_DEFAULT_STD
        self._flops: float | None = None
        logger.info("MAE: %.2fM encoder + %.2fM decoder parameters, %d patches, %d visible",
                    *(n / 1e6 for n in self._param_counts()), self.model.num_patches,
                    num_visible(self.model.num_patches, cfg.mask_ratio))

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """Multi-scale batches (data.multiscale): every size whole patches with a patch left visible; the model
        then reads them all (`read_any_size`: MAE's sin-cos positions at each grid). Evaluation, the pictures and
        the export stay at model.img_size."""
        p = self.cfg.patch_size
        bad = [s for s in sizes if s % p or num_visible((s // p) ** 2, self.cfg.mask_ratio) < 1]
        if bad:
            raise ValueError(f"sizes {bad} are not multiples of model.patch_size={p} (or leave no patch visible at "
                             f"model.mask_ratio={self.cfg.mask_ratio}); give multiples of {p}")
        self.model.read_any_size()
        logger.info("multi-scale batches at %s px: MAE's sin-cos positions at each grid", list(sizes))

    def _param_counts(self) -> tuple[int, int]:
        """(encoder, decoder) parameter counts; the decoder is everything `export` drops."""
        enc = dec = 0
        for name, p in self.model.named_parameters():
            if name.startswith(("decoder_", "mask_token")):
                dec += p.numel()
            else:
                enc += p.numel()
        return enc, dec

    def param_groups(self) -> list[dict]:
        """MAE's rule (timm 0.3.2 `add_weight_decay`): no decay for 1-D params and biases, decay for the rest.

        The class and mask tokens are [1, 1, D], so they ARE decayed, as in MAE. Frozen position tables are left
        out (the optimizer never sees them). The decayed group carries `WEIGHT_DECAY` (the paper's 0.05).
        """
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": WEIGHT_DECAY},
        ]

    def pixels(self, images: Tensor) -> Tensor:
        """Normalised float images: uint8 [N, 3, H, W] (0..255) are scaled and normalised here, on their device;
        floating images (the eval transform's) are already normalised and pass through."""
        return normalize_on_device(images, self.mean, self.std)

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss, _, _ = model(self.pixels(batch["image"]))
        return loss, {"loss": loss.detach().item()}

    def _eval_noise(self, generator: torch.Generator, imgs: Tensor) -> Tensor:
        """Seeded per-patch noise [N, L] for `imgs` [N, 3, H, W], drawn on the CPU (identical on every device): the
        same patches masked at every evaluation. L comes from the images: a training batch shown by images() may be
        at a multi-scale size."""
        patches = (imgs.shape[-2] // self.cfg.patch_size) * (imgs.shape[-1] // self.cfg.patch_size)
        return torch.rand(imgs.shape[0], patches, generator=generator).to(imgs.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Mean masked-patch loss over the non-padding samples, with the same masks at every evaluation.

        Under torch.distributed the sums are all-reduced, so every rank must call it (ZeRO-3 needs all ranks in the
        forward anyway) and every rank gets the global mean.
        """
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        total = count = None
        for batch in loader:
            imgs = self.pixels(batch["image"])
            _, pred, mask = model(imgs, noise=self._eval_noise(generator, imgs))
            loss = per_patch_loss(imgs, pred, self.cfg.patch_size, self.cfg.norm_pix_loss)  # [N, L]
            per_sample = (loss * mask).sum(dim=1) / mask.sum(dim=1)  # [N]
            keep = torch.ones_like(per_sample)
            if "is_padding" in batch:
                keep = (~batch["is_padding"].to(per_sample.device).bool()).float()
            batch_total, batch_count = (per_sample * keep).sum(), keep.sum()
            total = batch_total if total is None else total + batch_total
            count = batch_count if count is None else count + batch_count
        model.train(was_training)
        device = next(self.model.parameters()).device
        sums = torch.stack([total, count]) if total is not None else torch.zeros(2, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        val_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
        return {"val_loss": val_loss}

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A [3, H, W] grid in [0, 1]: columns = images, rows = original | masked (grey) | reconstruction.

        The reconstruction pastes the visible patches from the original and shows predictions at removed ones.
        With norm-pix loss the model predicts per-patch-standardised pixels; they are mapped back with the TRUE
        patch's mean and variance (as MAE's visualisation does), so colour and brightness of removed patches are
        borrowed from the original and only their structure is the model's.
        """
        imgs = self.pixels(batch["image"][:NUM_VIS_IMAGES])
        was_training = model.training
        model.eval()
        noise = self._eval_noise(torch.Generator().manual_seed(EVAL_NOISE_SEED), imgs)
        _, pred, mask = model(imgs, noise=noise)
        model.train(was_training)

        p = self.cfg.patch_size
        imgs = imgs.float()
        pred = pred.float()
        if self.cfg.norm_pix_loss:
            target = patchify(imgs, p)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
        mask_img = unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * 3), p)  # [n, 3, H, W], 1 = removed

        mean = torch.tensor(self.mean, device=imgs.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=imgs.device).view(1, 3, 1, 1)
        original = imgs * std + mean
        recon = unpatchify(pred, p) * std + mean
        masked = original * (1 - mask_img) + 0.5 * mask_img
        pasted = original * (1 - mask_img) + recon * mask_img
        rows = torch.cat([original, masked, pasted]).clamp(0, 1)
        return {"reconstruction": make_grid(rows.cpu(), nrow=imgs.shape[0], padding=2, pad_value=1.0)}

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """Encoder weights with timm `VisionTransformer` keys (decoder and mask token dropped) and backbone.json.

        Accepts keys with or without "module.". A checkpoint consolidated without frozen parameters lacks
        `pos_embed`; it is fixed, so it is rebuilt.
        """
        cfg = self.cfg
        out = encoder_to_timm(state_dict, drop_prefixes=("decoder_", "mask_token"))
        if "pos_embed" not in out:
            logger.info("export: pos_embed absent from the checkpoint (frozen); rebuilding the fixed sin-cos table")
            out["pos_embed"] = sincos_2d(cfg.embed_dim, cfg.img_size // cfg.patch_size, cls_token=True).unsqueeze(0)
        config = vit_config(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                            num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, source="mae", mean=self.mean,
                            std=self.std)
        return out, config

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward, not MACs) for one image at the configured mask ratio.

        Counted by `FlopCounterMode` on a copy of the model built on the meta device (no memory, no compute).
        These are model FLOPs: checkpointing is off in the copy, and on the meta device attention runs as its
        matmuls (backward = 2x forward), not a fused kernel whose backward recomputes the scores.
        """
        if self._flops is None:
            with torch.device("meta"):
                model = MaskedAutoencoderViT(replace(self.cfg, grad_checkpointing=False, drop_path=0.0))
                imgs = torch.zeros(1, 3, self.cfg.img_size, self.cfg.img_size)
            with FlopCounterMode(display=False) as counter:
                loss, _, _ = model(imgs)
                loss.backward()
            self._flops = float(counter.get_total_flops())
        return self._flops
