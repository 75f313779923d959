"""BEiT: masked image modelling of visual tokens (Bao et al., "BEiT: BERT Pre-Training of Image Transformers",
arXiv 2106.08254), with the project's own dVAE tokenizer (pretrain/dvae.py) or one of the three targets of ViT's masked
patch prediction (Dosovitskiy et al., arXiv 2010.11929, appendix B.1.2).

The stages, following microsoft/unilm@768a3c8 beit/ (modeling_pretrain.py, datasets.py, run_beit_pretraining.py):

1. Data workers: one RandomResizedCrop box (after colour jitter and a flip) gives two views, the patch view for the
   ViT and a view at the tokenizer's resolution (`data_pipeline.transforms.BEiTTwoViewTransform`), plus one mask per
   image: BEiT's blockwise masking (`pretrain.masking.BlockMaskingGenerator`, 75 of 196 patches at 224/16) or, for
   ViT's targets, its BERT-style corruption (`pretrain.masking.PatchCorruption`: 50% of the patches, 80% of those
   replaced by the mask token, 10% by another patch, 10% unchanged).
2. Targets: the frozen tokenizer (eval mode, no_grad, fp32, outside autocast; not part of the DeepSpeed-wrapped
   module, so it is never optimised, sharded or checkpointed) turns the tokenizer view into a [h, w] grid of code
   indices; or ViT's targets: `mean_color`, the patch's mean colour quantised to 3 bits per channel (512 classes);
   `mean_color_4x4`, the patch average-pooled to 4x4 cells, each cell's 3-bit colour (16 predictions of 512 classes
   per patch), both computed in the worker from the un-normalised pixels; `pixels_l2`, the patch's normalised
   pixels (p*p*3 values, MAE's (p, q, c) order), regressed with the mean squared error (the paper's worst of the
   three), taken from the model's input image on the device.
3. The ViT is timm's `Beit` (q/v biases, relative position bias shared by all blocks or one per block, LayerScale,
   optional absolute positions; model.* switches): patch embeddings at masked positions are replaced by a learned
   `mask_token` (nothing is dropped, unlike MAE), then the class token, the blocks and the final norm; a linear LM
   head on the masked positions only, cross-entropy against the targets (the masked-token accuracy is logged), or
   the mean squared error of the predicted pixels (logged as `mse`).
4. Recipe (presets): AdamW (0.9, 0.999), an absolute lr (optim.lr, not scaled by batch: 1.5e-3 at batch 2048),
   warmup then cosine to min lr 1e-5, weight decay 0.05 except biases, norms, gammas, cls token and absolute
   positions, drop path 0.1, gradient clipping 3.0.

Initialisation is unilm's: every Linear, the class/mask tokens and absolute positions from a normal(0, 0.02)
truncated at +-0.02 (timm's Beit truncates at +-2, i.e. not at all), then the output projections of block l
(attn.proj, mlp.fc2) divided by sqrt(2 l).

Export (`model.export_keys`): "beit" gives timm `Beit` keys with the shared relative position table copied into
every block (what timm's Beit loads; the pretraining-only mask token and LM head dropped); "vit" gives timm
`VisionTransformer` keys (q/v biases joined into qkv.bias with a zero k bias, gamma_1/2 -> ls1/ls2.gamma), possible
only without relative position bias (the paper's vanilla-ViT setting). "auto" picks "vit" when it is possible.
"""
from __future__ import annotations

import logging
import math
import random
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from einops import rearrange
from torchvision.transforms.functional import pil_to_tensor
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from contracts.backbone import crop_scale_errors, vit_geometry_errors
from contracts.task import TaskHooks
from data_pipeline.multiscale import check_sizes
from pretrain.export import encoder_to_timm, timm_architecture, vit_config
from pretrain.mae import patchify, unpatchify
from pretrain.masking import MASK_TOKEN, RANDOM_PATCH, VISIBLE, BlockMaskingGenerator, PatchCorruption
from pretrain.pos_embed import beit_positions_at, beit_read_any_size

logger = logging.getLogger(__name__)

TARGETS = ("dvae", "mean_color", "mean_color_4x4", "pixels_l2")
# ViT's masked patch prediction (BERT-style corruption): its three targets
VIT_TARGETS = ("mean_color", "mean_color_4x4", "pixels_l2")
# 3 bits per channel of a mean colour -> 8^3 classes
COLOR_BITS = 3
COLOR_CLASSES = (2 ** COLOR_BITS) ** 3
# cells per patch side whose mean colours are predicted: 1 (the patch's) or 4 (the 4x4 downsized patch)
COLOR_CELLS = {"mean_color": 1, "mean_color_4x4": 4}
# unilm's init: trunc_normal_(std=0.02, a=-0.02, b=0.02)
INIT_STD = 0.02
# images shown by images()
NUM_VIS_IMAGES = 8
# weight decay of the decayed group (BEiT's 0.05; the runtime applies optim.weight_decay to non-zero groups)
WEIGHT_DECAY = 0.05
# Parameters unilm's BEiT never decays besides 1-D ones and biases (`no_weight_decay`: pos_embed, cls_token).
NO_DECAY_NAMES = ("pos_embed", "cls_token")


@dataclass
class BEiTConfig:
    """The `model.*` section of the pretrain_beit job. Defaults are the "tiny" preset (CPU, minutes)."""

    tokenizer: str = ""               # folder with tokenizer.json + tokenizer.safetensors (launch/train_dvae.py)
    target: str = "dvae"              # "dvae": the tokenizer's codes | ViT's: "mean_color" (3-bit mean colour),
                                      # "mean_color_4x4" (4x4 cells' 3-bit colours), "pixels_l2" (pixels, MSE)
    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    vocab_size: int = 0               # LM head classes; 0 = the tokenizer's vocabulary (512 for the colours; none
                                      # for pixels_l2, whose head gives p*p*3 values)
    rel_pos_bias: str = "shared"      # "shared" (one table for all blocks, BEiT's pretraining) | "layer" | "none"
    abs_pos_emb: bool = False         # learned absolute positions (BEiT's pretraining uses relative bias only)
    layer_scale: float = 0.1          # LayerScale gamma init (0.1 for B, 1e-5 for L); 0 = no LayerScale
    drop_path: float = 0.1
    # masking: BEiT's blockwise generator; counts scaled from 75 / 16 of 196 patches when 0
    num_masked: int = 0
    min_mask_block: int = 0
    mask_min_aspect: float = 0.3
    corrupt_ratio: float = 0.5        # ViT's targets: patches corrupted (80% mask token, 10% random, 10% kept)
    # augmentation: BEiT's two-view crop
    crop_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = 0.4
    export_keys: str = "auto"         # "beit" | "vit" | "auto" (vit when there is no relative position bias)
    grad_checkpointing: bool = False

    # each field's range, checked (with finiteness) by the job config before the dataclass is built
    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 1", "patch_size": ">= 1", "embed_dim": ">= 1", "depth": ">= 1", "num_heads": ">= 1",
        "mlp_ratio": "> 0", "vocab_size": ">= 0", "layer_scale": ">= 0", "drop_path": "[0, 1)",
        "num_masked": ">= 0", "min_mask_block": ">= 0", "mask_min_aspect": "(0, 1]", "corrupt_ratio": "(0, 1)",
        "crop_scale": "(0, 1]", "color_jitter": ">= 0"}

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)  # a JSON round trip hands back a list
        if self.target not in TARGETS:
            raise ValueError(f"model.target must be one of {TARGETS}, got {self.target!r}")
        if self.rel_pos_bias not in ("shared", "layer", "none"):
            raise ValueError(f"model.rel_pos_bias must be shared, layer or none, got {self.rel_pos_bias!r}")
        if self.export_keys not in ("auto", "beit", "vit"):
            raise ValueError(f"model.export_keys must be auto, beit or vit, got {self.export_keys!r}")
        if self.export_keys == "vit" and self.rel_pos_bias != "none":
            raise ValueError("model.export_keys=vit needs model.rel_pos_bias=none: a plain ViT has no relative "
                             "position bias (use export_keys=beit, or train with rel_pos_bias=none abs_pos_emb=true)")
        if self.rel_pos_bias == "none" and not self.abs_pos_emb:
            raise ValueError("model.rel_pos_bias=none with model.abs_pos_emb=false leaves the ViT without any "
                             "position information: set abs_pos_emb=true")
        errors = []
        errors += vit_geometry_errors(self.img_size, self.patch_size, self.embed_dim, self.num_heads)
        cells = COLOR_CELLS.get(self.target, 1)
        if self.patch_size > 0 and self.patch_size % cells:
            errors.append(f"model.target={self.target} pools each patch to {cells}x{cells} cells: model.patch_size="
                          f"{self.patch_size} must be a multiple of {cells}")
        errors += crop_scale_errors(self.crop_scale)
        if not errors and self.patch_size > 0:
            try:  # the masks this grid allows (the generator checks counts against the grid)
                make_mask_generator(self)
            except ValueError as e:
                keys = ("model.corrupt_ratio" if self.target in VIT_TARGETS
                        else "model.num_masked / min_mask_block / mask_min_aspect")
                errors.append(f"{keys} for the {self.grid}x{self.grid} grid: {e}")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def head_outputs(self) -> int:
        """The LM head's outputs per predicted patch: vocab_size classes for each of the target's cells (1 or 16),
        or the patch's p*p*3 pixels (pixels_l2)."""
        if self.target == "pixels_l2":
            return self.patch_size * self.patch_size * 3
        return COLOR_CELLS.get(self.target, 1) ** 2 * self.vocab_size


# Named architectures as BEiTConfig overrides (BEiT-B/L with the paper's LayerScale inits).
BEIT_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, layer_scale=0.1),
    "vit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, layer_scale=0.1),
    "vit_l16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, layer_scale=1e-5),
}


# --- data: the map functions run in the workers ------------------------------------------------------------------

def color_targets(pixels01: Tensor, patch_size: int, cells: int = 1) -> Tensor:
    """pixels01: [3, H, W] in [0, 1] -> [L, cells * cells] int64: each patch average-pooled to cells x cells, each
    cell's channel means quantised to 3 bits, as r*64+g*8+b; cells row-major inside the patch.

    ViT's masked patch prediction targets (arXiv 2010.11929, B.1.2): cells=1 "the 3-bit mean color, 512 colors in
    total"; cells=4 the patch downsized to 4x4 in 3-bit colours, 16 predictions of 512 colours in parallel.
    """
    means = F.avg_pool2d(pixels01.unsqueeze(0), patch_size // cells).squeeze(0)  # [3, h*cells, w*cells]
    levels = 2 ** COLOR_BITS
    bins = (means * levels).floor().clamp_(0, levels - 1).long()
    classes = bins[0] * levels * levels + bins[1] * levels + bins[2]  # [h*cells, w*cells]
    return rearrange(classes, "(h c1) (w c2) -> (h w) (c1 c2)", c1=cells, c2=cells)


def mean_color_targets(pixels01: Tensor, patch_size: int) -> Tensor:
    """pixels01: [3, H, W] in [0, 1] -> [L] int64: each patch's 3-bit mean colour (`color_targets` with one cell)."""
    return color_targets(pixels01, patch_size, cells=1)[:, 0]


def _uint8(pixels01: Tensor) -> Tensor:
    # the tokenizer view left PIL as 8-bit: /255 then *255 rounds back exactly; uint8 is 4x fewer bytes to ship and
    # is not cast to bf16 by the runtime (floating inputs are)
    return (pixels01 * 255.0).round_().to(torch.uint8)


class BEiTTrainTransform:
    """Sample -> {"image": [3, S, S] normalised, "mask": [L] int8, "tokenizer_image": [3, T, T] uint8 (dvae) or
    "color_target": [L] int64 (mean_color) or [L, 16] (mean_color_4x4); pixels_l2 needs nothing more}. Picklable;
    masks drawn with the worker's `random` state."""

    def __init__(self, cfg: BEiTConfig, tokenizer_size: int, mean: tuple, std: tuple) -> None:
        from data_pipeline.transforms import BEiTTwoViewTransform

        self.cfg, self.tokenizer_size, self.norm = cfg, tokenizer_size, (tuple(mean), tuple(std))
        self.img_size = cfg.img_size
        self.target = cfg.target
        self.patch_size = cfg.patch_size
        # the tokenizer view is only decoded for the dvae target; ViT's targets read the patch view
        self.views = BEiTTwoViewTransform(cfg.img_size, tokenizer_size=tokenizer_size, scale=cfg.crop_scale,
                                          color_jitter=cfg.color_jitter, mean=mean, std=std)
        self.mask = make_mask_generator(cfg)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"BEiTTrainTransform({self.views!r}, {self.mask!r}, target={self.target})"

    def at_size(self, size: int) -> "BEiTTrainTransform":
        """The same views and masking at `size` px (data.multiscale): the tokenizer view keeps its pixels per patch,
        an explicit model.num_masked scales with the patch count. ValueError for a size the geometry refuses."""
        cfg = self.cfg
        grid = size // cfg.patch_size
        num_masked = round(cfg.num_masked * grid ** 2 / cfg.grid ** 2) if cfg.num_masked else 0
        at = replace(cfg, img_size=size, num_masked=num_masked)  # checks the geometry again
        return BEiTTrainTransform(at, grid * (self.tokenizer_size // cfg.grid), *self.norm)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        views = self.views(sample)
        return self._finish(views, self.mask())

    def _finish(self, views: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        out = {"image": views["image"], "mask": mask.flatten().to(torch.int8)}
        if self.target == "dvae":
            out["tokenizer_image"] = _uint8(views["tokenizer_image"])
        elif self.target in COLOR_CELLS:
            cells = color_targets(views["image"] * self.std + self.mean, self.patch_size, COLOR_CELLS[self.target])
            out["color_target"] = cells[:, 0] if self.target == "mean_color" else cells
        return out


class BEiTEvalTransform(BEiTTrainTransform):
    """Evaluation: the central square (no jitter, no flip) at both resolutions, and a mask seeded by the sample key,
    so every evaluation scores the same positions of the same images."""

    def __init__(self, cfg: BEiTConfig, tokenizer_size: int, mean: tuple, std: tuple) -> None:
        super().__init__(cfg, tokenizer_size, mean, std)
        self.img_size, self.tokenizer_size = cfg.img_size, tokenizer_size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        image: Image.Image = sample["image"].convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
        patch = image.resize((self.img_size, self.img_size), Image.Resampling.BICUBIC, box=box)
        tokens = image.resize((self.tokenizer_size, self.tokenizer_size), Image.Resampling.LANCZOS, box=box)
        patch01, tokens01 = (pil_to_tensor(view).float() / 255.0 for view in (patch, tokens))
        views = {"image": (patch01 - self.mean) / self.std, "tokenizer_image": tokens01}
        rng = random.Random(zlib.crc32(str(sample.get("__key__", "")).encode()))
        return self._finish(views, self.mask(rng))


def make_mask_generator(cfg: BEiTConfig) -> Callable[..., Tensor]:
    if cfg.target in VIT_TARGETS:
        return PatchCorruption(cfg.grid * cfg.grid, ratio=cfg.corrupt_ratio)
    return BlockMaskingGenerator((cfg.grid, cfg.grid), num_masked=cfg.num_masked or None,
                                 min_block=cfg.min_mask_block or None, min_aspect=cfg.mask_min_aspect)


# --- the model -----------------------------------------------------------------------------------------------------

class BEiTForMaskedImageModeling(Beit):
    """timm's `Beit` (num_classes 0, final norm kept) + `mask_token` + `lm_head`; its state dict has unilm's
    pretraining keys, so `pretrain.reference_checkpoints` reads it like a published BEiT checkpoint."""

    def __init__(self, cfg: BEiTConfig, vocab_size: int) -> None:
        """`vocab_size`: the LM head's outputs per patch (`BEiTConfig.head_outputs`)."""
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path_rate=cfg.drop_path,
            init_values=cfg.layer_scale or None, use_abs_pos_emb=cfg.abs_pos_emb,
            use_rel_pos_bias=cfg.rel_pos_bias == "layer", use_shared_rel_pos_bias=cfg.rel_pos_bias == "shared",
            num_classes=0, global_pool="avg", use_fc_norm=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.lm_head = nn.Linear(cfg.embed_dim, vocab_size)
        self.vocab_size = vocab_size
        self.reset_to_unilm_init()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def reset_to_unilm_init(self) -> None:
        unilm_init(self)

    def embed(self, images: Tensor, mask: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        """images [N, 3, H, W], mask [N, L] codes (pretrain.masking) -> tokens [N, 1 + L, D] before the blocks;
        `pos_embed` [1, 1 + L, D]: the absolute positions at this grid (default: the stored table).

        MASK_TOKEN positions get the mask token; RANDOM_PATCH positions the embedding of a random patch of a random
        image of the batch (BERT's random word); VISIBLE and UNCHANGED keep their own.
        """
        x = self.patch_embed(images)  # [N, L, D]
        n, length, dim = x.shape
        random_patch = mask == RANDOM_PATCH
        if random_patch.any():
            flat = x.reshape(n * length, dim)
            picks = torch.randint(0, n * length, (int(random_patch.sum()),), device=x.device)
            x = x.masked_scatter(random_patch.unsqueeze(-1), flat[picks])
        w = (mask == MASK_TOKEN).unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(n, -1, -1), x), dim=1)
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        if pos_embed is not None:
            x = x + pos_embed
        return self.pos_drop(x)

    def forward_masked(self, images: Tensor, mask: Tensor) -> Tensor:
        """images [N, 3, H, W], mask [N, L] -> final-norm tokens [N, 1 + L, D]. Another square size than
        model.img_size (multi-scale batches) gets its position tables from `beit_positions_at`."""
        pos_embed, rel_pos_bias = beit_positions_at(self, images.shape[-1] // self.patch_embed.patch_size[0])
        x = self.embed(images, mask, pos_embed)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """images [N, 3, H, W], mask [N, L] int codes -> LM head outputs [M, vocab] at the M predicted
        (non-VISIBLE) positions, in row-major (image, patch) order."""
        x = self.forward_masked(images, mask)[:, 1:]
        return self.lm_head(x[mask != VISIBLE])


@torch.no_grad()
def unilm_init(model: Beit) -> None:
    """unilm's BEiT initialisation of a timm `Beit` (SimMIM's ViT shares it): every Linear weight, the class token,
    a `mask_token` and the absolute positions from normal(0, 0.02) truncated at +-0.02, Linear biases 0, then block
    l's attn.proj and mlp.fc2 weights divided by sqrt(2 l)."""
    def init(t: Tensor) -> None:
        trunc_normal_(t, std=INIT_STD, a=-INIT_STD, b=INIT_STD)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            init(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    for t in (model.cls_token, getattr(model, "mask_token", None), model.pos_embed):
        if t is not None:
            init(t)
    model.fix_init_weight()


# --- export ----------------------------------------------------------------------------------------------------------

PRETRAINING_ONLY = ("mask_token", "lm_head.")


def beit_to_timm_beit(state_dict: dict[str, Tensor], depth: int,
                      drop_prefixes: tuple[str, ...] = PRETRAINING_ONLY) -> dict[str, Tensor]:
    """Timm `Beit` keys for a backbone: pretraining-only tensors dropped, the shared relative position table copied
    into every block (timm's Beit loads per-block tables only; its checkpoint filter does not expand a shared one)."""
    out = encoder_to_timm(state_dict, drop_prefixes=drop_prefixes)
    shared = out.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None:
        for i in range(depth):
            key = f"blocks.{i}.attn.relative_position_bias_table"
            out[key] = shared.clone() if key not in out else out[key] + shared
    return {k: v for k, v in out.items() if not k.endswith("relative_position_index")}


def beit_to_timm_vit(state_dict: dict[str, Tensor],
                     drop_prefixes: tuple[str, ...] = PRETRAINING_ONLY) -> dict[str, Tensor]:
    """Timm `VisionTransformer` keys for a BEiT without relative position bias: qkv.bias = [q_bias, 0, v_bias]
    (BEiT's k bias is a constant zero), gamma_1/gamma_2 -> ls1.gamma/ls2.gamma; pretraining-only tensors dropped."""
    out = {}
    for key, value in encoder_to_timm(state_dict, drop_prefixes=drop_prefixes).items():
        if "relative_position" in key:
            raise ValueError(f"{key}: a BEiT with relative position bias has no plain-ViT equivalent")
        if key.endswith(".attn.q_bias"):
            prefix = key[: -len("q_bias")]
            v_bias = state_dict.get(prefix + "v_bias", state_dict.get("module." + prefix + "v_bias"))
            out[prefix + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias.detach().cpu()])
            continue
        if key.endswith(".attn.v_bias"):
            continue
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key] = value
    return out


def export_beit_encoder(state_dict: dict[str, Tensor], cfg: Any, fmt: str, *, mean: tuple, std: tuple, source: str,
                        drop_prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor], dict]:
    """A timm `Beit` encoder's export: (tensors, backbone.json) with timm `Beit` keys (`fmt` "beit") or
    `VisionTransformer` keys ("vit", only without relative position bias). `cfg` holds the encoder's img_size,
    patch_size, embed_dim, depth, num_heads, mlp_ratio, rel_pos_bias, abs_pos_emb and layer_scale (BEiTConfig, or
    SimMIM's ViT); `drop_prefixes` are the pretraining-only keys."""
    size_args = (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads)
    overlay = {"mean": list(mean), "std": list(std), "input_size": [3, cfg.img_size, cfg.img_size]}
    if fmt == "vit":
        extra = {"init_values": cfg.layer_scale} if cfg.layer_scale else {}
        config = vit_config(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, source=source,
                            mean=mean, std=std, **extra)
        return beit_to_timm_vit(state_dict, drop_prefixes), config
    kwargs = {
        "img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
        "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": True,
        "use_abs_pos_emb": cfg.abs_pos_emb, "use_rel_pos_bias": cfg.rel_pos_bias != "none",
        # 0.0 without LayerScale, not None: timm.create_model drops None kwargs and beit_*'s default (0.1) would
        # create gamma_1/gamma_2, which this export does not have
        "use_shared_rel_pos_bias": False, "init_values": cfg.layer_scale or 0.0, "num_classes": 0,
        # the pretrained final norm is kept before the pooling (unilm drops it for fc_norm when finetuning
        # with mean pooling; finetune_cls chooses that with its own global_pool)
        "global_pool": "avg", "use_fc_norm": False,
    }
    config = {"architecture": timm_architecture(*size_args, template="beit_{size}_patch{patch}_{img}",
                                                generic="beit_base_patch16_224"),
              "model_kwargs": kwargs, "pretrained_cfg_overlay": overlay, "source": source}
    return beit_to_timm_beit(state_dict, cfg.depth, drop_prefixes), config


# --- the task ----------------------------------------------------------------------------------------------------

class BEiTTask(TaskHooks):
    """BEiT for the shared runtime: model, two-view transforms with masks, frozen tokenizer, step, evaluation,
    pictures, export.

    `load_tokenizer=False` builds the model only (checkpoint conversion: the export needs no tokenizer; the LM head
    then takes its size from model.vocab_size, which the runtime saved resolved).
    """

    required_members = ("image",)  # what every sample must hold; the stream counts others as missing_*

    def __init__(self, cfg: BEiTConfig, load_tokenizer: bool = True) -> None:
        self.cfg = cfg
        self.tokenizer: nn.Module | None = None
        self.downsample = cfg.patch_size  # tokenizer pixels per patch side; the tokenizer's own when loaded
        if cfg.target == "dvae" and load_tokenizer:
            self.tokenizer = self._load_tokenizer(cfg)
            self.downsample = self.tokenizer.downsample
            if cfg.vocab_size and cfg.vocab_size != self.tokenizer.vocab_size:
                raise ValueError(f"model.vocab_size={cfg.vocab_size} but the tokenizer {cfg.tokenizer} has "
                                 f"{self.tokenizer.vocab_size} codes: leave model.vocab_size=0 to use its vocabulary")
            cfg.vocab_size = self.tokenizer.vocab_size  # resolved, so the saved config rebuilds the same LM head
        elif cfg.target in COLOR_CELLS:
            cfg.vocab_size = cfg.vocab_size or COLOR_CLASSES
            if cfg.vocab_size != COLOR_CLASSES:
                raise ValueError(f"model.target={cfg.target} predicts {COLOR_CLASSES} colours; model.vocab_size="
                                 f"{cfg.vocab_size} does not fit (leave it 0)")
        elif cfg.target == "pixels_l2":
            if cfg.vocab_size:
                raise ValueError(f"model.target=pixels_l2 regresses pixels and has no classes; model.vocab_size="
                                 f"{cfg.vocab_size} does not fit (leave it 0)")
        elif not cfg.vocab_size:
            raise ValueError("model.vocab_size is unknown without the tokenizer (a saved config has it resolved)")
        self.model = BEiTForMaskedImageModeling(cfg, cfg.head_outputs)
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        self.tokenizer_size = cfg.grid * self.downsample
        self.train_transform = BEiTTrainTransform(cfg, self.tokenizer_size, self.mean, self.std)
        self.eval_transform = BEiTEvalTransform(cfg, self.tokenizer_size, self.mean, self.std)
        self._flops: float | None = None
        logger.info("BEiT: %.2fM parameters, %dx%d patches, target %s (%d outputs per patch), %r%s",
                    sum(p.numel() for p in self.model.parameters()) / 1e6, cfg.grid, cfg.grid, cfg.target,
                    cfg.head_outputs, self.train_transform.mask,
                    f", tokenizer view {self.tokenizer_size} px" if self.tokenizer is not None else "")

    @staticmethod
    def _load_tokenizer(cfg: BEiTConfig) -> nn.Module:
        from pretrain.dvae import load_tokenizer

        if not cfg.tokenizer:
            raise ValueError("BEiT's target=dvae needs a tokenizer: train one with `python launch/train_dvae.py` and "
                             "pass tokenizer=runs/train_dvae/tiny/export (or target=mean_color, which needs none)")
        try:
            tokenizer = load_tokenizer(cfg.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"model.tokenizer={cfg.tokenizer}: {e}") from None
        tokenizer.eval().requires_grad_(False)
        return tokenizer

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """Multi-scale batches (data.multiscale): every size must give a geometry the masking takes (checked by
        building its transform); the model then reads any grid (`beit_read_any_size`: absolute positions resampled,
        the shared relative table resized per grid). Evaluation, the pictures and the export stay at
        model.img_size."""
        check_sizes(self.train_transform, sizes)
        beit_read_any_size(self.model)
        logger.info("multi-scale batches at %s px: positions resampled per grid", list(sizes))

    # --- training ------------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """unilm's rule: no decay for 1-D tensors (norms, q/v biases, gammas), biases, pos_embed and cls_token."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": WEIGHT_DECAY}]

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        """-> [N, L] int64 class per patch (the tokenizer's codes of the tokenizer view, or the 3-bit mean colours),
        [N, L, 16] (the 4x4 cells' colours) or [N, L, p*p*3] float32 (pixels_l2: the normalised input's patches)."""
        if self.cfg.target == "pixels_l2":
            return patchify(batch["image"].float(), self.cfg.patch_size)
        if self.cfg.target in COLOR_CELLS:
            return batch["color_target"].long()
        if self.tokenizer is None:
            raise RuntimeError("this BEiTTask was built without its tokenizer (load_tokenizer=False)")
        pixels = batch["tokenizer_image"]
        if self.tokenizer_device != pixels.device:
            self.tokenizer.to(pixels.device)
        pixels = pixels.float() / 255.0 if not pixels.is_floating_point() else pixels.float()
        # the tokenizer runs in fp32 whatever the engine's precision (DALL-E's encoder needs it; codes are argmaxes
        # and bf16 logits would flip near-ties)
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            codes = self.tokenizer.get_codebook_indices(pixels)  # [N, g, g]
        grid = round(batch["mask"].shape[1] ** 0.5)  # this batch's patch grid (data.multiscale: per batch)
        if codes.shape[-2:] != (grid, grid):
            raise ValueError(f"the tokenizer gives a {tuple(codes.shape[-2:])} grid for {pixels.shape[-1]} px; "
                             f"the ViT has {grid}x{grid} patches")
        return codes.flatten(1).long()

    @property
    def tokenizer_device(self) -> torch.device | None:
        if self.tokenizer is None:
            return None
        return next(self.tokenizer.parameters()).device

    def _loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """-> (mean loss, outputs, targets): logits [P, vocab] and labels [P] over the P = M x cells predictions of
        the M predicted patches, or pixels_l2's predicted and true pixels [M, p*p*3]."""
        mask = batch["mask"].long()
        targets = self.targets(batch)[mask != VISIBLE]  # [M] | [M, cells] | [M, p*p*3]
        outputs = model(batch["image"], mask)           # [M, head_outputs]
        if self.cfg.target == "pixels_l2":
            return F.mse_loss(outputs.float(), targets), outputs, targets
        logits = outputs.reshape(targets.numel(), -1)   # [M * cells, vocab]: the cells' heads side by side
        labels = targets.reshape(-1)
        return F.cross_entropy(logits.float(), labels), logits, labels

    def _sums(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """[summed loss, summed correct (classes) or summed squared error (pixels), predictions] of a batch."""
        if self.cfg.target == "pixels_l2":
            squared = F.mse_loss(outputs.float(), targets, reduction="sum")
            return torch.stack([squared, squared, torch.tensor(float(targets.numel()), device=targets.device)])
        return torch.stack([F.cross_entropy(outputs.float(), targets, reduction="sum"),
                            (outputs.argmax(-1) == targets).sum().float(),
                            torch.tensor(float(targets.numel()), device=targets.device)])

    @property
    def _metric(self) -> str:
        return "mse" if self.cfg.target == "pixels_l2" else "mlm_accuracy"

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss, outputs, targets = self._loss(model, batch)
        masked = int((batch["mask"] != VISIBLE).sum()) / batch["mask"].shape[0]
        if self.cfg.target == "pixels_l2":
            return loss, {"mse": loss.detach().item(), "masked_per_image": masked}
        accuracy = (outputs.detach().argmax(-1) == targets).float().mean()
        return loss, {"mlm_accuracy": accuracy.item(), "masked_per_image": masked}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Cross-entropy and accuracy over every prediction at the predicted positions of the non-padding val images
        (pixels_l2: the mean squared error per pixel value, as `loss` and `mse`); masks seeded by the sample key, so
        evaluations are comparable; summed over ranks."""
        was_training = model.training
        model.eval()
        sums = None
        for batch in loader:
            mask = batch["mask"].long()
            if "is_padding" in batch:
                mask = mask * (~batch["is_padding"].to(mask.device).bool()).long().unsqueeze(1)
            if not (mask != VISIBLE).any():
                continue
            batch = {**batch, "mask": mask}
            _, outputs, targets = self._loss(model, batch)
            batch_sums = self._sums(outputs, targets)
            sums = batch_sums if sums is None else sums + batch_sums
        model.train(was_training)
        if sums is None:
            sums = torch.zeros(3, device=next(self.model.parameters()).device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        count = sums[2].item()
        return {"loss": sums[0].item() / count if count else float("nan"),
                self._metric: sums[1].item() / count if count else float("nan")}

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rows: the image | masked (grey) | what BEiT predicts at masked positions, shown through the target: the
        tokenizer decodes the true codes with the predicted ones pasted in (dvae), the predicted mean colours of the
        patch or of its 4x4 cells painted over the masked patches, or the predicted pixels pasted there (pixels_l2).
        Forward on every rank (ZeRO-3), pictures on rank 0."""
        batch = {k: v[:NUM_VIS_IMAGES] if torch.is_tensor(v) else v for k, v in batch.items()}
        images = batch["image"].float()
        mask = batch["mask"].long()
        was_training = model.training
        model.eval()
        outputs = model(batch["image"], mask).float()  # [M, head_outputs]
        model.train(was_training)
        targets = self.targets(batch)  # [N, L] | [N, L, cells] | [N, L, p*p*3]
        predicted = targets.clone()
        if self.cfg.target == "pixels_l2":
            predicted[mask != VISIBLE] = outputs
        else:  # [M, cells, vocab] -> the cells' classes, [M, cells] (or [M] with one prediction per patch)
            predicted[mask != VISIBLE] = outputs.view(*predicted[mask != VISIBLE].shape, -1).argmax(-1)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        original = (images * std + mean).clamp(0, 1)
        p = self.cfg.patch_size
        g = original.shape[-1] // p  # the batch's grid (a training batch may be at a multi-scale size)
        shown = (mask != VISIBLE).float().view(-1, 1, g, g)
        shown = F.interpolate(shown, scale_factor=p, mode="nearest")
        masked = original * (1 - shown) + 0.5 * shown
        if self.cfg.target == "dvae":
            size = original.shape[-1]
            decode = self.tokenizer.decode_indices
            with torch.autocast(device_type=images.device.type, enabled=False):
                true = F.interpolate(decode(targets.view(-1, g, g)).float(), size=size, mode="bilinear")
                pred = F.interpolate(decode(predicted.view(-1, g, g)).float(), size=size, mode="bilinear")
            rows = [original, masked, true.clamp(0, 1), pred.clamp(0, 1)]
        elif self.cfg.target == "pixels_l2":
            pixels = (unpatchify(predicted, p) * std + mean).clamp(0, 1)
            rows = [original, masked, original * (1 - shown) + pixels * shown]
        else:
            rows = [original, masked, self._paint_colors(original, predicted, shown)]
        grid = make_grid(torch.cat(rows).cpu(), nrow=original.shape[0], padding=2, pad_value=1.0)
        return {"predictions": grid}

    def _paint_colors(self, original: Tensor, classes: Tensor, shown: Tensor) -> Tensor:
        """original [N, 3, H, W], classes [N, L] or [N, L, cells^2] (3-bit colours), shown [N, 1, H, W] -> the
        original with the classes' colours painted where `shown` is 1."""
        levels = 2 ** COLOR_BITS
        classes = classes if classes.ndim == 3 else classes.unsqueeze(-1)
        cells = math.isqrt(classes.shape[-1])
        rgb = torch.stack([classes // (levels * levels), (classes // levels) % levels, classes % levels], dim=1)
        rgb = (rgb.float() + 0.5) / levels  # bin centres, [N, 3, L, cells^2]
        p = self.cfg.patch_size
        g = original.shape[-1] // p  # the batch's grid (a training batch may be at a multi-scale size)
        rgb = rearrange(rgb, "n k (h w) (c1 c2) -> n k (h c1) (w c2)", h=g, c1=cells)
        painted = F.interpolate(rgb, scale_factor=p // cells, mode="nearest")
        return original * (1 - shown) + painted * shown

    # --- export ------------------------------------------------------------------------------------------------

    @property
    def export_format(self) -> str:
        if self.cfg.export_keys != "auto":
            return self.cfg.export_keys
        return "vit" if self.cfg.rel_pos_bias == "none" else "beit"

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The encoder as timm `Beit` or `VisionTransformer` weights + backbone.json (see the module docstring)."""
        tensors, config = export_beit_encoder(state_dict, self.cfg, self.export_format, mean=self.mean, std=self.std,
                                              source="beit", drop_prefixes=PRETRAINING_ONLY)
        return tensors, {**config, "target": self.cfg.target}

    def flops_per_sample(self) -> float:
        """Training FLOPs per image: forward + backward of the ViT on all tokens (FlopCounterMode on a meta-device
        copy), the LM head on the predicted positions (2 M D V, x3 with its backward), and the tokenizer's forward.
        The mask token blend and the loss are negligible."""
        if self._flops is None:
            cfg = replace(self.cfg, grad_checkpointing=False, drop_path=0.0)
            with torch.device("meta"):
                model = BEiTForMaskedImageModeling(cfg, cfg.head_outputs)
                images = torch.zeros(1, 3, cfg.img_size, cfg.img_size)
            with FlopCounterMode(display=False) as counter:
                model.forward_features(images).sum().backward()
            flops = float(counter.get_total_flops())
            mask_gen = self.train_transform.mask
            predicted = getattr(mask_gen, "num_masked", None) or mask_gen.num_chosen
            flops += 3 * 2 * predicted * cfg.embed_dim * cfg.head_outputs
            if self.tokenizer is not None:
                with torch.device("meta"):
                    tokenizer = type(self.tokenizer)(self.tokenizer.cfg)
                    pixels = torch.zeros(1, 3, self.tokenizer_size, self.tokenizer_size)
                with FlopCounterMode(display=False) as counter, torch.no_grad():
                    tokenizer.encode_logits(pixels)
                flops += float(counter.get_total_flops())
            self._flops = flops
        return self._flops


def beit_encoder_features(model: BEiTForMaskedImageModeling, imgs: Tensor) -> Tensor:
    """imgs [N, 3, H, W] -> [N, 1 + L, D]: the encoder on every patch (nothing masked) = the exported timm model's
    forward_features (for the converter's feature check)."""
    n, length = imgs.shape[0], model.patch_embed.num_patches
    return model.forward_masked(imgs, torch.zeros(n, length, dtype=torch.long, device=imgs.device))
