"""Discrete VAE image tokenizer (DALL-E's dVAE), the visual vocabulary of BEiT pretraining.

Ramesh et al., "Zero-Shot Text-to-Image Generation", arXiv 2102.12092, section 2.1 and appendix A; architecture
after openai/DALL-E@5be4b23 (dall_e/encoder.py, decoder.py, utils.py); BEiT (Bao et al., arXiv 2106.08254) reads
the argmax codes of its 112-px view as the targets of masked image modelling.

Architecture (every width configurable; `DVAEConfig` defaults are DALL-E's):
- encoder: 7x7 conv stem -> `num_groups` groups of `blocks_per_group` residual blocks, widths hidden * (1, 2, 4, 8),
  a 2x2 max-pool after every group but the last (so `downsample` = 2 ** (num_groups - 1) = 8) -> ReLU -> 1x1 conv
  to `vocab_size` logits per position;
- decoder: a 1x1 conv from the (soft) one-hot codes to `decoder_init` channels (an embedding of the codes: for hard
  indices it is a table lookup, see `CodeEmbedding`) -> groups of residual blocks, widths hidden * (8, 4, 2, 1),
  nearest 2x upsampling between them -> ReLU -> 1x1 conv to the pixel distribution's parameters;
- residual blocks: id_path (1x1 conv when the width changes) + post_gain * res_path, with post_gain =
  1 / n_layers**2 (n_layers = all blocks of the network), ReLU before each conv, bottleneck width out // 4; encoder
  res_path convs 3-3-3-1, decoder 1-3-3-3. Conv weights N(0, 1 / fan_in), biases 0 (DALL-E's `Conv2d`). There is no
  normalisation layer, so nothing needs synchronising across ranks.

Pixels: the encoder reads `map_pixels(x) = 0.8 x + 0.1` of images in [0, 1], as DALL-E's and BEiT's tokenizer
view does; every public method takes and returns [0, 1] images.

Training objective (appendix A.2-A.3): the encoder's logits are relaxed with Gumbel-softmax (noise, then softmax at
temperature tau; soft during forward and backward, never straight-through), decoded, and scored by
    loss = (NLL_sum(x | decoder) + beta * KL_sum(q(z|x) || uniform)) / (3 H W)
i.e. both terms summed over the image and divided by its sub-pixel count (nats per dimension). With DALL-E's
logit-Laplace likelihood this is the paper's (negated, beta-weighted) ELB per dimension, so beta keeps the paper's
meaning and scale (6.6); per token the KL weighs beta / (3 * downsample**2).
Reconstruction loss (`recon_loss`):
- `logit_laplace` (default, DALL-E): the decoder predicts mu and ln b per sub-pixel; the density of y = map_pixels(x)
  is exp(-|logit(y) - mu| / b) / (2 b y (1 - y)). It is a proper likelihood on (0, 1), so the KL weight has a
  meaning, and the scale b lets the model be unsure of busy regions. The reconstruction is its median,
  unmap_pixels(sigmoid(mu)).
- `mse` / `l1`: on sigmoid(output) against x. MSE optimises PSNR directly and trains fastest in short runs, but it is
  not a normalised likelihood, so beta must be retuned (its per-dimension scale is far below an NLL's).
Schedules, by optimizer step (DALL-E uses cosine curves for all three of its schedules): tau from
`temperature_start` to `temperature_end` over `temperature_steps` (cosine, exponential or linear), then constant;
beta from 0 to `kl_weight` over `kl_warmup_steps` (cosine). The learning rate is the runtime's.

`DVAETask` runs it on the shared runtime (contracts: the Task interface); its export, like `save_tokenizer`, writes
tokenizer.safetensors + tokenizer.json, which `load_tokenizer` reads back into a frozen eval-mode model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from contracts.backbone import save_export
from contracts.task import TaskHooks

logger = logging.getLogger(__name__)

# DALL-E's logit-Laplace margin: pixels are mapped into [eps, 1 - eps] so their logit stays finite.
LOGIT_LAPLACE_EPS = 0.1
# Basename of the exported files (tokenizer.safetensors + tokenizer.json) and the "type" the json carries.
TOKENIZER_NAME = "tokenizer"
TOKENIZER_TYPE = "dvae"
TOKENIZER_FORMAT_VERSION = 1
# Marks the decayed parameter group (DALL-E's AdamW weight decay); the runtime puts optim.weight_decay on every
# group with a non-zero value, so this only matters when the task is used on its own.
WEIGHT_DECAY = 1e-4
# Images shown by images() (columns of the grid).
NUM_VIS_IMAGES = 8


@dataclass
class DVAEConfig:
    """The `model.*` section of the train_dvae job. Defaults are DALL-E's dVAE (appendix A); the tiny preset shrinks
    the widths, the vocabulary and the schedules for the CPU."""

    img_size: int = 112                 # training crop side, px (BEiT's tokenizer view); any multiple of downsample
                                        # tokenizes, the network is fully convolutional
    vocab_size: int = 8192              # codes
    hidden: int = 256                   # n_hid: encoder group widths hidden * (1, 2, 4, 8), decoder reversed
    num_groups: int = 4                 # groups of residual blocks; downsample = 2 ** (num_groups - 1)
    blocks_per_group: int = 2
    decoder_init: int = 128             # n_init: width of the decoder's code embedding (1x1 conv from the codes)
    recon_loss: Literal["logit_laplace", "mse", "l1"] = "logit_laplace"
    temperature_start: float = 1.0      # Gumbel-softmax tau at step 0
    temperature_end: float = 1.0 / 16   # tau after temperature_steps
    temperature_steps: int = 150_000    # optimizer steps over which tau is annealed
    temperature_schedule: Literal["cosine", "exponential", "linear"] = "cosine"
    kl_weight: float = 6.6              # beta (per dimension, see the module docstring) after kl_warmup_steps
    kl_warmup_steps: int = 5000         # optimizer steps over which beta rises from 0 (cosine)
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area range of the training crops (BEiT's view)

    # each field's range, checked (with finiteness) by the job config before the dataclass is built; the relations
    # between fields (downsampling, temperatures, crop range) below
    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 1", "vocab_size": ">= 2", "hidden": ">= 4", "num_groups": "[1, 16]",
        "blocks_per_group": ">= 1", "decoder_init": ">= 1", "temperature_start": "> 0", "temperature_end": "> 0",
        "temperature_steps": ">= 0", "kl_weight": ">= 0", "kl_warmup_steps": ">= 0", "crop_scale": "(0, 1]"}

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)  # a JSON round trip hands back a list
        errors = []
        if self.vocab_size < 2:
            errors.append(f"model.vocab_size={self.vocab_size} must be >= 2")
        if self.num_groups < 1 or self.blocks_per_group < 1:
            errors.append(f"model.num_groups={self.num_groups} and model.blocks_per_group={self.blocks_per_group} "
                          "must be >= 1")
        if self.hidden < 4 or self.hidden % 4:
            errors.append(f"model.hidden={self.hidden} must be a positive multiple of 4 (bottleneck = width // 4)")
        if self.decoder_init < 1:
            errors.append(f"model.decoder_init={self.decoder_init} must be >= 1")
        downsample = 2 ** (max(self.num_groups, 1) - 1)
        if self.img_size < downsample or self.img_size % downsample:
            errors.append(f"model.img_size={self.img_size} must be a multiple of the downsampling factor "
                          f"{downsample} (2 ** (num_groups - 1))")
        if not 0 < self.temperature_end <= self.temperature_start:
            errors.append(f"model.temperature_start={self.temperature_start} and model.temperature_end="
                          f"{self.temperature_end} must satisfy 0 < end <= start")
        if self.temperature_steps < 0 or self.kl_warmup_steps < 0:
            errors.append("model.temperature_steps and model.kl_warmup_steps must be >= 0")
        if self.kl_weight < 0:
            errors.append(f"model.kl_weight={self.kl_weight} must be >= 0")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            errors.append(f"model.crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def downsample(self) -> int:
        return 2 ** (self.num_groups - 1)


# --- schedules ----------------------------------------------------------------------------------------------------

def anneal(start: float, end: float, step: int, steps: int,
           kind: Literal["cosine", "exponential", "linear"] = "cosine") -> float:
    """`start` at step 0 to `end` at `steps` (constant after); cosine: half a cosine period, exponential: a constant
    ratio per step (start, end > 0), linear: a straight line."""
    if steps <= 0 or step >= steps:
        return float(end)
    t = max(step, 0) / steps
    if kind == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if kind == "exponential":
        return float(start * (end / start) ** t)
    if kind == "linear":
        return float(start + (end - start) * t)
    raise ValueError(f"unknown schedule {kind!r} (cosine, exponential, linear)")


def temperature_at(cfg: DVAEConfig, step: int) -> float:
    """Gumbel-softmax temperature for the update after `step` completed optimizer steps."""
    return anneal(cfg.temperature_start, cfg.temperature_end, step, cfg.temperature_steps, cfg.temperature_schedule)


def kl_weight_at(cfg: DVAEConfig, step: int) -> float:
    """KL weight beta for the update after `step` completed optimizer steps: 0 -> cfg.kl_weight, cosine."""
    return anneal(0.0, cfg.kl_weight, step, cfg.kl_warmup_steps, "cosine")


# --- pixels and likelihoods ---------------------------------------------------------------------------------------

def map_pixels(x: Tensor) -> Tensor:
    """[0, 1] -> [eps, 1 - eps] (DALL-E's `map_pixels`), any shape."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: Tensor) -> Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1], any shape."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def logit_laplace_nll(images01: Tensor, stats: Tensor) -> Tensor:
    """Negative log-likelihood per sub-pixel, nats. images01: [N, 3, H, W] in [0, 1], stats: [N, 6, H, W]
    (mu, ln b per channel) -> [N, 3, H, W] float32.

    -ln f(y) = ln(2 b) + ln y + ln(1 - y) + |logit(y) - mu| / b with y = map_pixels(x) (DALL-E appendix A.3).
    """
    y = map_pixels(images01.float())
    mu, log_b = stats.float().chunk(2, dim=1)
    return math.log(2.0) + log_b + torch.log(y) + torch.log1p(-y) + (torch.logit(y) - mu).abs() * torch.exp(-log_b)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of [0, 1] images, dB, per image: [N, C, H, W] x 2 -> [N] float32 (capped at
    100 dB for an exact match)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def code_perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram: counts [K] -> scalar float32 (K when every code is used equally, 1 when
    one code takes everything)."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


# --- the network --------------------------------------------------------------------------------------------------

def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A same-padded conv with DALL-E's initialisation: weight N(0, 1 / (n_in * k * k)), bias 0."""
    conv = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(n_in * kernel * kernel))
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """x: [N, n_in, H, W] -> [N, n_out, H, W] = id_path(x) + post_gain * res_path(x) (DALL-E's Encoder/DecoderBlock).

    The residual branch is down-weighted by 1 / n_layers**2 so the deep stack starts close to the identity path
    (DALL-E found the small constant important for stable training, appendix A.2).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class CodeEmbedding(nn.Module):
    """The decoder's first layer: a 1x1 conv from one-hot codes, i.e. an embedding table [dim, vocab, 1, 1].

    Soft codes [N, vocab, h, w] (the Gumbel-softmax relaxation) go through the conv; hard indices [N, h, w] (int64)
    are looked up in the same weights, which equals the conv of their one-hot without building the [N, vocab, h, w]
    tensor. Both paths run in this module's forward, so ZeRO-3 gathers the weight for either.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.conv = _conv(vocab_size, dim, 1)

    def forward(self, codes: Tensor) -> Tensor:
        """codes: soft [N, vocab, h, w] float or indices [N, h, w] int64 -> [N, dim, h, w]."""
        if codes.is_floating_point():
            return self.conv(codes.to(self.conv.weight.dtype))
        table = self.conv.weight.flatten(1).t()  # [vocab, dim]
        return (F.embedding(codes, table) + self.conv.bias).permute(0, 3, 1, 2)


class DVAEOutput(NamedTuple):
    loss: Tensor          # scalar float32: (recon NLL + beta KL) per sub-pixel
    recon_loss: Tensor    # scalar float32: reconstruction term per sub-pixel (nats for logit_laplace)
    kl: Tensor            # scalar float32: KL(q || uniform) per token, nats (unweighted)
    logits: Tensor        # [N, vocab, h, w] encoder logits
    recon: Tensor         # [N, 3, H, W] reconstruction in [0, 1] from the relaxed codes


class DiscreteVAE(nn.Module):
    """DALL-E's discrete VAE: images in [0, 1] <-> grids of codes in [0, vocab_size). See the module docstring."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.downsample = cfg.downsample
        groups, hid = cfg.num_groups, cfg.hidden
        n_layers = groups * cfg.blocks_per_group

        enc: list[tuple[str, nn.Module]] = [("input", _conv(3, hid, 7))]
        width = hid
        for g in range(groups):
            out = hid * 2**g
            group: list[tuple[str, nn.Module]] = []
            for b in range(cfg.blocks_per_group):
                group.append((f"block_{b + 1}", ResBlock(width, out, n_layers, (3, 3, 3, 1))))
                width = out
            if g < groups - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            enc.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        enc.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                         ("conv", _conv(width, cfg.vocab_size, 1))]))))
        self.encoder = nn.Sequential(OrderedDict(enc))

        dec: list[tuple[str, nn.Module]] = [("input", CodeEmbedding(cfg.vocab_size, cfg.decoder_init))]
        width = cfg.decoder_init
        for g in range(groups):
            out = hid * 2 ** (groups - 1 - g)
            group = []
            for b in range(cfg.blocks_per_group):
                group.append((f"block_{b + 1}", ResBlock(width, out, n_layers, (1, 3, 3, 3))))
                width = out
            if g < groups - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            dec.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        out_channels = 6 if cfg.recon_loss == "logit_laplace" else 3
        dec.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                         ("conv", _conv(width, out_channels, 1))]))))
        self.decoder = nn.Sequential(OrderedDict(dec))

    def _check(self, images01: Tensor) -> None:
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images01.shape)}")
        h, w = images01.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer's downsampling {self.downsample}")

    def encode_logits(self, images01: Tensor) -> Tensor:
        """images01: [N, 3, H, W] in [0, 1] -> logits [N, vocab, H/8, W/8] (in the weights' dtype)."""
        self._check(images01)
        return self.encoder(map_pixels(images01.to(self.encoder.input.weight.dtype)))

    @torch.no_grad()
    def get_codebook_indices(self, images01: Tensor) -> Tensor:
        """images01: [N, 3, H, W] in [0, 1] -> codes [N, H/8, W/8] int64 (argmax of the logits, as BEiT's labels)."""
        return self.encode_logits(images01).argmax(dim=1)

    def decode_stats(self, codes: Tensor) -> Tensor:
        """codes: soft [N, vocab, h, w] or indices [N, h, w] int64 -> the decoder's raw output [N, 6 or 3, 8h, 8w]."""
        return self.decoder(codes)

    def stats_to_image(self, stats: Tensor) -> Tensor:
        """The decoder's output [N, 6 or 3, H, W] -> the reconstruction [N, 3, H, W] in [0, 1], float32 (the
        logit-Laplace median unmap_pixels(sigmoid(mu)), or sigmoid of the output for mse/l1)."""
        mu = torch.sigmoid(stats[:, :3].float())
        return unmap_pixels(mu) if self.cfg.recon_loss == "logit_laplace" else mu

    def decode_indices(self, indices: Tensor) -> Tensor:
        """indices: [N, h, w] int64 in [0, vocab) -> images [N, 3, 8h, 8w] in [0, 1], float32."""
        if indices.ndim != 3 or indices.is_floating_point():
            raise ValueError(f"expected integer codes [N, h, w], got {tuple(indices.shape)} {indices.dtype}")
        return self.stats_to_image(self.decode_stats(indices.long()))

    def decode_soft(self, logits: Tensor, temperature: float) -> Tensor:
        """Noise-free relaxed reconstruction: logits [N, vocab, h, w] -> images [N, 3, 8h, 8w] in [0, 1] decoded
        from softmax(logits / temperature) (evaluation's "soft" reconstruction)."""
        return self.stats_to_image(self.decode_stats(torch.softmax(logits.float() / temperature, dim=1)))

    def recon_nll(self, images01: Tensor, stats: Tensor) -> Tensor:
        """Reconstruction loss per sub-pixel: images01 [N, 3, H, W], stats [N, 6 or 3, H, W] -> [N, 3, H, W]."""
        if self.cfg.recon_loss == "logit_laplace":
            return logit_laplace_nll(images01, stats)
        diff = torch.sigmoid(stats.float()) - images01.float()
        return diff.pow(2) if self.cfg.recon_loss == "mse" else diff.abs()

    def forward(self, images01: Tensor, temperature: float, kl_weight: float = 0.0) -> DVAEOutput:
        """The training path. images01: [N, 3, H, W] in [0, 1] -> DVAEOutput (loss, terms, logits, recon).

        Codes are relaxed with Gumbel-softmax at `temperature` (soft, not straight-through, as in DALL-E); the KL
        of q = softmax(logits) to the uniform prior is weighted by `kl_weight` per sub-pixel (module docstring).
        """
        logits = self.encode_logits(images01)
        logits32 = logits.float()  # the relaxation and the KL in float32 whatever the engine's precision
        soft = F.gumbel_softmax(logits32, tau=temperature, hard=False, dim=1)
        stats = self.decode_stats(soft)
        nll = self.recon_nll(images01, stats)  # [N, 3, H, W]
        log_q = F.log_softmax(logits32, dim=1)
        kl_tokens = (log_q.exp() * (log_q + math.log(self.vocab_size))).sum(dim=1)  # [N, h, w]
        recon_loss = nll.mean()
        loss = recon_loss + kl_weight * kl_tokens.sum() / nll.numel()
        return DVAEOutput(loss, recon_loss, kl_tokens.mean(), logits, self.stats_to_image(stats.detach()))


# --- the tokenizer files ------------------------------------------------------------------------------------------

def tokenizer_meta(cfg: DVAEConfig, **extra: Any) -> dict[str, Any]:
    """tokenizer.json: what `load_tokenizer` needs to rebuild the model, plus `extra` (e.g. training state)."""
    return {"type": TOKENIZER_TYPE, "format_version": TOKENIZER_FORMAT_VERSION, "vocab_size": cfg.vocab_size,
            "downsample": cfg.downsample, "input_size": cfg.img_size, "input_range": [0, 1],
            "pixel_map": f"encoder reads {1 - 2 * LOGIT_LAPLACE_EPS:g} * x + {LOGIT_LAPLACE_EPS:g} of x in [0, 1]",
            "model": json.loads(json.dumps(dataclasses.asdict(cfg))), **extra}


def _strip_module(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def save_tokenizer(folder: str | Path, model: DiscreteVAE, **extra: Any) -> Path:
    """Write <folder>/tokenizer.safetensors (float32 weights) + tokenizer.json; returns the folder."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in _strip_module(model.state_dict()).items()}
    return save_export(folder, TOKENIZER_NAME, tensors, tokenizer_meta(model.cfg, **extra))


def find_tokenizer(folder: str | Path) -> Path:
    """The folder holding tokenizer.json: `folder` itself, or a train_dvae run dir's export/ (or export_best/)."""
    folder = Path(folder).expanduser()
    hint = "train one with `python launch/train_dvae.py` (it writes runs/train_dvae/<name>/export/tokenizer.json)"
    if not folder.exists():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist; {hint}")
    if folder.is_file():
        if folder.name == f"{TOKENIZER_NAME}.json":
            return folder.parent
        raise ValueError(f"{folder} is a file; pass the folder that holds {TOKENIZER_NAME}.json")
    for candidate in (folder, folder / "export", folder / "export_best"):
        if (candidate / f"{TOKENIZER_NAME}.json").is_file():
            return candidate
    found = sorted(p.name for p in folder.iterdir())[:10]
    what = " (a backbone export, not a tokenizer)" if {"config.json", "backbone.json"} & set(found) else ""
    raise FileNotFoundError(f"no {TOKENIZER_NAME}.json in {folder} (nor in its export/){what}; it holds "
                            f"{found or 'nothing'}; {hint}")


def load_tokenizer(folder: str | Path) -> DiscreteVAE:
    """Rebuild the exact tokenizer of <folder>/tokenizer.json + tokenizer.safetensors (a train_dvae run dir works
    too): float32, eval mode, every parameter requires_grad=False.

    Raises FileNotFoundError (no such folder, no tokenizer files) or ValueError (not a dVAE tokenizer, a config
    this code cannot build, weights that do not match it), each naming the folder.
    """
    folder = find_tokenizer(folder)
    meta_path, weights_path = folder / f"{TOKENIZER_NAME}.json", folder / f"{TOKENIZER_NAME}.safetensors"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("type") != TOKENIZER_TYPE:
        kind = meta.get("type") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path} describes a {kind!r} tokenizer; this loader reads {TOKENIZER_TYPE!r} "
                         "(launch/train_dvae.py exports)")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{meta_path} has no 'model' section (the DVAEConfig fields)")
    known = {f.name for f in dataclasses.fields(DVAEConfig)}
    unknown = sorted(set(meta["model"]) - known)
    if unknown:
        raise ValueError(f"{meta_path}: unknown model fields {unknown} (written by a newer version?)")
    try:
        cfg = DVAEConfig(**meta["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: invalid model config: {e}") from None
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has {meta_path.name} but no {weights_path.name}")
    model = DiscreteVAE(cfg)
    state = _strip_module(load_file(str(weights_path)))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{weights_path} does not match {meta_path.name}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes (file vs config) {shapes[:3]}")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


# --- the runtime task ---------------------------------------------------------------------------------------------

def _images01(images: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] (0..255, the training crops) or floating [0, 1] (the eval transform's) -> float32 [0, 1]."""
    return images.float() / 255.0 if not images.is_floating_point() else images.float()


class DVAETask(TaskHooks):
    """dVAE training for the shared runtime: model, transforms, schedules, step, evaluation, pictures, export."""

    export_name = TOKENIZER_NAME
    required_members = ("image",)  # what every sample must hold; the stream counts others as missing_*

    def __init__(self, cfg: DVAEConfig) -> None:
        # imported here, not at module level, so the tokenizer can be used without the data pipeline
        from data_pipeline.transforms import EvalTransform, MAETrainTransform

        self.cfg = cfg
        self.model = DiscreteVAE(cfg)
        # uint8 crops cross the worker -> device boundary (4x fewer bytes); they are scaled to [0, 1] on the device
        self.train_transform: Callable[[dict], dict] = MAETrainTransform(cfg.img_size, scale=cfg.crop_scale,
                                                                         normalize=False)
        self.eval_transform: Callable[[dict], dict] = EvalTransform(cfg.img_size, mean=(0.0, 0.0, 0.0),
                                                                    std=(1.0, 1.0, 1.0))
        self.step = 0  # completed optimizer steps: drives the schedules; saved in checkpoints (extra_state)
        self._flops: float | None = None
        enc = sum(p.numel() for p in self.model.encoder.parameters())
        dec = sum(p.numel() for p in self.model.decoder.parameters())
        logger.info("dVAE: %.2fM encoder + %.2fM decoder parameters, %d codes, %dx downsampling (%d px -> %dx%d "
                    "tokens), %s reconstruction loss", enc / 1e6, dec / 1e6, cfg.vocab_size, cfg.downsample,
                    cfg.img_size, cfg.img_size // cfg.downsample, cfg.img_size // cfg.downsample, cfg.recon_loss)

    # --- schedules and the runtime's hooks ----------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        return temperature_at(self.cfg, self.step)

    @property
    def kl_weight(self) -> float:
        return kl_weight_at(self.cfg, self.step)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Advance the schedules (step counts optimizer steps from 1)."""
        self.step = step

    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """Multi-scale batches (data.multiscale): the convolutional tokenizer reads any size that is a multiple of
        its downsampling; nothing to rebuild."""
        bad = [s for s in sizes if s % self.cfg.downsample]
        if bad:
            raise ValueError(f"sizes {bad} are not multiples of the tokenizer's downsampling {self.cfg.downsample}")

    def param_groups(self) -> list[dict]:
        """Conv weights decayed (DALL-E's AdamW, weight decay 1e-4 in its recipe), biases not."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": WEIGHT_DECAY}]

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        tau, beta = self.temperature, self.kl_weight
        out = model(_images01(batch["image"]), temperature=tau, kl_weight=beta)
        codes = out.logits.detach().argmax(dim=1)
        counts = torch.bincount(codes.flatten(), minlength=self.cfg.vocab_size)
        return out.loss, {"recon_loss": out.recon_loss.item(), "kl": out.kl.item(), "temperature": tau,
                          "kl_weight": beta, "perplexity": code_perplexity(counts).item(),
                          "psnr": psnr(out.recon, _images01(batch["image"])).mean().item()}

    # --- evaluation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Over the non-padding val samples: PSNR of the hard (argmax-code) reconstruction, BEiT's targets, and of
        the soft one (noise-free softmax at the current temperature); two trivial references: each image's mean
        colour, and a bicubic upsampling of its 8x area-downsampled copy (3 floats per token instead of one code);
        codebook usage over all val tokens: perplexity of the code histogram and the share of codes used.

        Sums and the histogram are all-reduced, so every rank must call it and gets the same values.
        """
        module = getattr(model, "module", model)
        was_training = module.training
        module.eval()
        k, ds = self.cfg.vocab_size, self.cfg.downsample
        device = next(module.parameters()).device
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # psnr hard, soft, mean colour, bicubic; count
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        for batch in loader:
            x = _images01(batch["image"])
            keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            if "is_padding" in batch:
                keep = ~batch["is_padding"].to(x.device).bool()
            logits = module.encode_logits(x)
            codes = logits.argmax(dim=1)
            hard = module.decode_indices(codes)
            soft = module.decode_soft(logits, self.temperature)
            mean_colour = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
            small = F.interpolate(x, scale_factor=1 / ds, mode="area")
            bicubic = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
            w = keep.double()
            sums += torch.stack([(psnr(r, x).double() * w).sum() for r in (hard, soft, mean_colour, bicubic)]
                                + [w.sum()])
            counts += torch.bincount(codes[keep].flatten(), minlength=k).double()
        module.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[:5], both[5:]
        n = sums[4].item()
        if n == 0:
            return {"psnr": float("nan")}
        mean = (sums[:4] / n).tolist()
        return {"psnr": mean[0], "psnr_soft": mean[1], "psnr_mean_colour": mean[2], "psnr_bicubic": mean[3],
                "perplexity": code_perplexity(counts).item(), "codes_used": (counts > 0).double().mean().item()}

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A [3, H, W] grid in [0, 1]: columns = images, rows = input | hard (argmax-code) reconstruction |
        soft reconstruction (noise-free softmax at the current temperature)."""
        module = getattr(model, "module", model)
        was_training = module.training
        module.eval()
        x = _images01(batch["image"][:NUM_VIS_IMAGES])
        logits = module.encode_logits(x)
        hard = module.decode_indices(logits.argmax(dim=1))
        soft = module.decode_soft(logits, self.temperature)
        module.train(was_training)
        rows = torch.cat([x, hard, soft]).clamp(0, 1).cpu()
        return {"reconstruction": make_grid(rows, nrow=x.shape[0], padding=2, pad_value=1.0)}

    # --- export and cost ---------------------------------------------------------------------------------------

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The whole dVAE (encoder and decoder: BEiT needs the encoder, the pictures the decoder) as float32
        tensors, and tokenizer.json (`tokenizer_meta`) with the schedules' final state."""
        tensors = {k: v.float() for k, v in _strip_module(state_dict).items()}
        expected = set(self.model.state_dict())
        if set(tensors) != expected:
            raise ValueError(f"export: state dict keys differ from the model's: missing "
                             f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
        return tensors, tokenizer_meta(self.cfg, trained_steps=self.step, final_temperature=self.temperature,
                                       final_kl_weight=self.kl_weight)

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward, not MACs) for one crop, counted by `FlopCounterMode` on a copy of the
        model built on the meta device (no memory, no compute)."""
        if self._flops is None:
            with torch.device("meta"):
                model = DiscreteVAE(replace(self.cfg))
                imgs = torch.zeros(1, 3, self.cfg.img_size, self.cfg.img_size)
            with FlopCounterMode(display=False) as counter:
                model(imgs, temperature=1.0, kl_weight=1.0).loss.backward()
            self._flops = float(counter.get_total_flops())
        return self._flops
