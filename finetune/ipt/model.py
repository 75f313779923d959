"""The Image Processing Transformer: per-task heads and tails around one shared transformer body.

Chen et al., "Pre-Trained Image Processing Transformer", CVPR 2021 (arXiv 2012.00364); structure and numbers from
huawei-noah/Pretrained-IPT model/ipt.py and mindspore-ai/models research/cv/IPT (finetune-anchors.md, C):

    x [N, 3, S, S] (0..255) - RGB mean (DIV2K's, x 255: IPT's MeanShift)
      -> head[task]: conv 3x3 (3 -> F) + `res_blocks` ResBlocks (conv k-ReLU-conv k, k = 5)        [N, F, S, S]
      -> body: unfold into p x p feature patches -> tokens [N, L, F p p], L = (S / p)^2
               tokens + Linear(tokens) (IPT's linear_encoding, residual) + learned positions
               encoder: `enc_layers` pre-norm blocks (self-attention over the L tokens + MLP)
               decoder: `dec_layers` pre-norm layers; the task's learned embedding [L, D] is added to the queries
                        of their self-attention and cross-attention (keys of the cross-attention = encoder output)
               + MLP head (residual), fold back to [N, F, S, S]
      -> + the head's features (global residual)
      -> tail[task]: Upsampler (conv to F s^2 + PixelShuffle s; twice x2 for x4; nothing for s = 1) + conv 3x3 -> 3
      + RGB mean                                                                                 [N, 3, sS, sS]

The paper's sizes: F = 64, p = 3 (576-d tokens, 256 of them for a 48-px input), 12 heads, 12 + 12 layers, MLP 4x.
The task embedding is IPT's `query_embed`: one [L, D] table per task (an `nn.Embedding(num_tasks, D * L)` there).

Deliberate differences, so a ViT of this project maps onto the encoder (`load_vit_body`): the encoder layers are
timm `Block`s (fused qkv with bias, GELU MLP, LayerNorm eps 1e-6) where IPT has bias-free attention and a ReLU
MLP; the decoder layers use the same norms, biases and activation. The body works on a fixed `img_size`
(positions and task embeddings are per token), so images of other sizes go through `metrics.tiled_forward`.

Weights are keyed by task name (`heads.sr2.*`, `tails.sr2.*`, `body.task_embed.sr2`), so a multi-task export
loads into a single-task model by name (`load_ipt_export`).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from finetune import backbone as bb
from finetune.ipt.degradations import TaskSpec, parse_task

logger = logging.getLogger(__name__)

# DIV2K's RGB mean (EDSR / IPT MeanShift), subtracted from 0..255 inputs and added back to outputs.
RGB_MEAN = (0.4488, 0.4371, 0.4040)
LN_EPS = 1e-6
# Files of an IPT export (the runtime writes <export_name>.safetensors + .json).
EXPORT_NAME = "ipt"
EXPORT_FORMAT = "ipt"


@dataclass
class IPTArch:
    """The geometry of an IPT model (recorded in ipt.json; an export is rebuilt from it)."""

    img_size: int = 48          # input side the body takes (the LR crop), px; a multiple of patch_dim
    n_feats: int = 64           # head / tail channels F
    patch_dim: int = 3          # feature patch side p: tokens have F p^2 dimensions
    num_heads: int = 12
    enc_layers: int = 12
    dec_layers: int = 12
    mlp_ratio: float = 4.0
    head_kernel: int = 5        # ResBlock kernel of the heads (IPT: 5)
    res_blocks: int = 2         # ResBlocks per head
    tasks: list[str] = field(default_factory=lambda: ["denoise30", "denoise50", "sr2", "sr3", "sr4", "derain"])

    @property
    def embed_dim(self) -> int:
        return self.n_feats * self.patch_dim ** 2

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_dim) ** 2

    def check(self) -> list[str]:
        errors = []
        if self.patch_dim <= 0 or self.img_size % self.patch_dim:
            errors.append(f"img_size={self.img_size} must be a multiple of patch_dim={self.patch_dim}")
        if self.num_heads <= 0 or self.embed_dim % self.num_heads:
            errors.append(f"the token width n_feats x patch_dim^2 = {self.embed_dim} must be divisible by "
                          f"num_heads={self.num_heads}")
        if self.head_kernel % 2 == 0:
            errors.append(f"head_kernel={self.head_kernel} must be odd")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            errors.append(f"tasks={self.tasks}: give each task once")
        for name in self.tasks:
            try:
                parse_task(name)
            except ValueError as e:
                errors.append(str(e))
        return errors


class ResBlock(nn.Module):
    """EDSR's residual block: conv k -> ReLU -> conv k, added to the input. [N, F, H, W] -> same."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def make_head(arch: IPTArch) -> nn.Sequential:
    """3 -> F conv 3x3, then the ResBlocks: [N, 3, S, S] -> [N, F, S, S]."""
    return nn.Sequential(nn.Conv2d(3, arch.n_feats, 3, padding=1),
                         *[ResBlock(arch.n_feats, arch.head_kernel) for _ in range(arch.res_blocks)])


def make_tail(arch: IPTArch, scale: int) -> nn.Sequential:
    """EDSR's Upsampler (conv 3x3 to F s^2 + PixelShuffle s; log2(s) x2 stages for powers of two) + conv 3x3 to RGB:
    [N, F, S, S] -> [N, 3, sS, sS]. Scale 1 is the final conv alone (IPT's tail for denoising and deraining)."""
    f = arch.n_feats
    layers: list[nn.Module] = []
    if scale > 1 and scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(f, 4 * f, 3, padding=1), nn.PixelShuffle(2)]
    elif scale > 1:
        layers += [nn.Conv2d(f, scale * scale * f, 3, padding=1), nn.PixelShuffle(scale)]
    layers.append(nn.Conv2d(f, 3, 3, padding=1))
    return nn.Sequential(*layers)


class DecoderLayer(nn.Module):
    """IPT's pre-norm decoder layer: [N, L, D] queries x, memory [N, L, D], task embedding [1, L, D] -> [N, L, D].

        x = x + SelfAttn(q = k = LN(x) + e, v = LN(x))
        x = x + CrossAttn(q = LN(x) + e, k = v = memory)
        x = x + MLP(LN(x))
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, memory: Tensor, task_embed: Tensor) -> Tensor:
        h = self.norm1(x)
        q = h + task_embed
        x = x + self.self_attn(q, q, h, need_weights=False)[0]
        x = x + self.cross_attn(self.norm2(x) + task_embed, memory, memory, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class IPTBody(nn.Module):
    """The shared transformer over feature patches: features [N, F, S, S] + task -> ([N, F, S, S], tokens [N, L, D]).

    The tokens returned are the body's last patch features (after the MLP head, before folding): what IPT's
    contrastive loss compares.
    """

    def __init__(self, arch: IPTArch) -> None:
        super().__init__()
        d, p = arch.embed_dim, arch.patch_dim
        self.img_size, self.patch_dim, self.embed_dim = arch.img_size, p, d
        self.linear_encoding = nn.Linear(d, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_tokens, d))
        self.encoder = nn.ModuleList([Block(d, arch.num_heads, arch.mlp_ratio, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=LN_EPS))
                                      for _ in range(arch.enc_layers)])
        self.decoder = nn.ModuleList([DecoderLayer(d, arch.num_heads, arch.mlp_ratio) for _ in range(arch.dec_layers)])
        self.task_embed = nn.ParameterDict({t: nn.Parameter(torch.zeros(1, arch.num_tokens, d)) for t in arch.tasks})
        self.mlp_head = nn.Sequential(nn.Linear(d, int(d * arch.mlp_ratio)), nn.ReLU(),
                                      nn.Linear(int(d * arch.mlp_ratio), d))

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_dim
        return side, side

    def forward(self, feats: Tensor, task: str) -> tuple[Tensor, Tensor]:
        n, c, h, w = feats.shape
        if (h, w) != (self.img_size, self.img_size):
            raise ValueError(f"the IPT body takes {self.img_size}x{self.img_size} inputs, got {h}x{w}; run larger "
                             "images through finetune.ipt.metrics.tiled_forward")
        p = self.patch_dim
        x = F.unfold(feats, p, stride=p).transpose(1, 2)          # [N, L, F p p], channel-major inside a patch
        x = x + self.linear_encoding(x)
        x = x + self.pos_embed
        for block in self.encoder:
            x = block(x)
        memory, embed = x, self.task_embed[task]
        for layer in self.decoder:
            x = layer(x, memory, embed)
        tokens = x + self.mlp_head(x)
        out = F.fold(tokens.transpose(1, 2), (h, w), p, stride=p)   # [N, F, S, S]
        return out, tokens


class IPT(nn.Module):
    """Heads, body and tails for `arch.tasks`; forward(x [N, 3, S, S] in 0..255, task index or name) ->
    [N, 3, sS, sS] in 0..255 (not clamped), plus the body's tokens [N, L, D] with `return_features`."""

    def __init__(self, arch: IPTArch) -> None:
        super().__init__()
        errors = arch.check()
        if errors:
            raise ValueError("; ".join(errors))
        self.arch = arch
        self.specs: list[TaskSpec] = [parse_task(t) for t in arch.tasks]
        self.register_buffer("rgb_mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.heads = nn.ModuleDict({s.name: make_head(arch) for s in self.specs})
        self.body = IPTBody(arch)
        self.tails = nn.ModuleDict({s.name: make_tail(arch, s.scale) for s in self.specs})
        self._init_transformer()

    def _init_transformer(self) -> None:
        """ViT's initialisation for the body (trunc-normal 0.02 linears and tables, zero biases); the convolutions
        keep torch's default, as EDSR / IPT do."""
        for m in self.body.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
        trunc_normal_(self.body.pos_embed, std=0.02)
        for p in self.body.task_embed.values():
            trunc_normal_(p, std=0.02)

    def task_name(self, task: int | str | Tensor) -> str:
        if isinstance(task, Tensor):
            task = int(task.reshape(-1)[0])
        return self.specs[task].name if isinstance(task, int) else task

    def scale(self, task: int | str | Tensor) -> int:
        return self.specs[self.arch.tasks.index(self.task_name(task))].scale

    def no_weight_decay(self) -> set[str]:
        return {"body.pos_embed"} | {f"body.task_embed.{t}" for t in self.arch.tasks}

    def forward(self, x: Tensor, task: int | str | Tensor, return_features: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        name = self.task_name(task)
        mean = self.rgb_mean.to(self.body.pos_embed.dtype)
        x = x.to(mean.dtype) - mean
        feats = self.heads[name](x)
        res, tokens = self.body(feats, name)
        out = self.tails[name](res + feats) + mean
        return (out, tokens) if return_features else out


def patch_contrastive_loss(tokens: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """IPT's supervised contrastive loss on patch features (Khosla et al. 2020 SupCon, as in mindspore IPT
    src/loss.py with contrast_mode "all"): tokens [B, L, D] -> scalar, float32.

    Every patch feature (L2-normalised) is an anchor; the other L - 1 patches of the same image are its
    positives and the patches of the other B - 1 images its negatives:

        loss = mean over anchors a of  -(tau / tau_base) * mean over positives p of
               log( exp(z_a . z_p / tau) / sum over k != a of exp(z_a . z_k / tau) )

    (the log-sum gets IPT's + 1e-8). With B = 1 there are no negatives and the loss only pulls patches together.
    """
    b, n, _ = tokens.shape
    if n < 2:
        raise ValueError("the contrastive loss needs at least 2 patches per image")
    z = F.normalize(tokens.float().reshape(b * n, -1), dim=-1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()    # stability only: cancels in log_prob
    labels = torch.arange(b, device=z.device).repeat_interleave(n)
    not_self = ~torch.eye(b * n, dtype=torch.bool, device=z.device)
    positive = (labels[:, None] == labels[None, :]) & not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(dim=1, keepdim=True) + 1e-8)
    mean_log_prob_pos = (log_prob * positive).sum(dim=1) / positive.sum(dim=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


# --- import / export ------------------------------------------------------------------------------------------------

@dataclass
class InitReport:
    """What an initialisation loaded: model keys filled, model keys left new, source keys not used."""

    source: str
    loaded: list[str]
    new: list[str]
    unused: list[str]

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            groups = sorted({".".join(k.split(".")[:2]) for k in keys})
            return ", ".join(groups[:12]) + (f" (+{len(groups) - 12})" if len(groups) > 12 else "") or "-"
        return (f"{self.source}: {len(self.loaded)} tensors loaded; new: {short(self.new)}; "
                f"not used: {short(self.unused)}")


def export_meta(arch: IPTArch, **extra: Any) -> dict[str, Any]:
    """ipt.json: the format tag and the geometry to rebuild the model from."""
    return {"format": EXPORT_FORMAT, "version": 1, "arch": asdict(arch), **extra}


def read_export(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, ipt.json) when `folder` (or its export/) holds an IPT export, else None."""
    path = Path(folder).expanduser()
    for candidate in (path, path / "export"):
        config = candidate / f"{EXPORT_NAME}.json"
        if config.is_file():
            meta = json.loads(config.read_text())
            if meta.get("format") != EXPORT_FORMAT:
                raise ValueError(f"{config}: not an IPT export (format {meta.get('format')!r})")
            if not (candidate / f"{EXPORT_NAME}.safetensors").is_file():
                raise ValueError(f"{candidate} has {EXPORT_NAME}.json but no {EXPORT_NAME}.safetensors")
            return candidate, meta
    return None


def arch_from_export(meta: dict[str, Any], tasks: Sequence[str]) -> IPTArch:
    """The export's geometry with this run's task list."""
    fields = {k: v for k, v in meta["arch"].items() if k in IPTArch.__dataclass_fields__ and k != "tasks"}
    return IPTArch(**fields, tasks=list(tasks))


def load_ipt_export(model: IPT, folder: str | Path) -> InitReport:
    """Load an IPT export into `model`: the body whole (positions, encoder, decoder, MLP head) and, for each of the
    model's tasks the export also has, that task's head, tail and embedding; the model's other tasks stay new.
    Shapes must match (build the model with `arch_from_export`)."""
    found = read_export(folder)
    if found is None:
        raise ValueError(f"{folder} holds no {EXPORT_NAME}.json (an export of finetune_ipt)")
    path, meta = found
    state = load_file(str(path / f"{EXPORT_NAME}.safetensors"))
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own}
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in take.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: the export's tensors do not fit this model: {bad[:6]}")
    model.load_state_dict(take, strict=False)
    report = InitReport(str(path), sorted(take), sorted(set(own) - set(take)), sorted(set(state) - set(take)))
    missing_body = [k for k in report.new if k.startswith("body.") and not k.startswith("body.task_embed.")]
    if missing_body:
        raise ValueError(f"{path}: the export lacks body tensors {missing_body[:6]}")
    logger.info("init %s", report.summary())
    return report


def load_vit_body(model: IPT, folder: str | Path) -> InitReport:
    """Initialise the body's encoder from a ViT backbone of this project (backbone.safetensors + backbone.json).

    Mapping (the token width D = n_feats x patch_dim^2 must equal the ViT's embed_dim, and num_heads and
    mlp_ratio must match, else a ValueError says what to set):
        blocks.i.*          -> body.encoder.i.*  for i < min(ViT depth, enc_layers) (norm1, attn.qkv, attn.proj,
                                                  norm2, mlp.fc1, mlp.fc2: the same timm Block)
        pos_embed[patches]  -> body.pos_embed    resampled (bicubic) from the ViT's token grid to the body's
    New (trained from scratch): heads, tails, body.linear_encoding, the decoder, task embeddings, mlp_head, and
    encoder layers beyond the ViT's depth. Not used: patch_embed (pixels -> tokens, where IPT's tokens are feature
    patches), cls_token, the final norm and head, ViT blocks beyond enc_layers.
    """
    folder = bb.find_backbone(folder)
    meta = bb.read_config(folder)
    kwargs = meta.get("model_kwargs", {})
    arch = model.arch
    width, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if width != arch.embed_dim:
        hint = " or ".join(f"model.n_feats={width // (p * p)} model.patch_dim={p}" for p in (1, 2, 3, 4)
                           if width and width % (p * p) == 0 and width // (p * p) >= 8)
        raise ValueError(f"the ViT in {folder} is {width} wide but the IPT body's tokens are n_feats x patch_dim^2 = "
                         f"{arch.n_feats} x {arch.patch_dim}^2 = {arch.embed_dim}; the blocks only map when they are "
                         f"equal ({'e.g. ' + hint if hint else 'set model.n_feats and model.patch_dim'})")
    if heads != arch.num_heads:
        raise ValueError(f"the ViT in {folder} has {heads} heads; set model.num_heads={heads}")
    ratio = kwargs.get("mlp_ratio", 4.0)
    if ratio != arch.mlp_ratio:
        raise ValueError(f"the ViT in {folder} has mlp_ratio {ratio}; set model.mlp_ratio={ratio}")
    state = bb.read_weights(folder)
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            if int(i) < arch.enc_layers:
                mapped[f"body.encoder.{i}.{rest}"] = value
    if "pos_embed" in state:
        pos = state["pos_embed"]
        old = bb.grid_size(meta)
        patches = old[0] * old[1] if old else pos.shape[1]
        table = pos[:, pos.shape[1] - patches:]   # class / register rows dropped
        mapped["body.pos_embed"] = resample_abs_pos_embed(table, new_size=list(model.body.grid),
                                                          old_size=list(old) if old else None,
                                                          num_prefix_tokens=0, interpolation="bicubic",
                                                          antialias=True)
    own = model.state_dict()
    unexpected = [k for k in mapped if k not in own]
    if unexpected:
        raise ValueError(f"the ViT's blocks in {folder} have tensors the IPT encoder lacks: {unexpected[:6]} "
                         "(layer scale or another block variant)")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"the ViT's tensors in {folder} do not fit the IPT body: {bad[:6]}")
    model.load_state_dict(mapped, strict=False)
    used = {f"blocks.{k.split('.', 3)[2]}.{k.split('.', 3)[3]}" for k in mapped if k.startswith("body.encoder.")}
    used |= {"pos_embed"} if "body.pos_embed" in mapped else set()
    report = InitReport(f"ViT {folder} ({depth} blocks -> {min(depth, arch.enc_layers)} of {arch.enc_layers} "
                        "encoder layers)", sorted(mapped), sorted(set(own) - set(mapped)),
                        sorted(set(state) - used))
    logger.info("init %s", report.summary())
    return report
