"""Visual Transformers (Wu et al. 2020, arXiv 2006.03677, "Visual Transformers: Token-based Image Representation
and Processing for Computer Vision"; no official code): VT-ResNet as timm models.

A Visual Transformer (VT) module works on a few semantic tokens instead of the pixel grid (paper §3):
- tokenizer (§3.1): pixels X [HW, C] grouped into L visual tokens by a spatial attention softmaxed over the HW
  pixels. Filter-based (§3.1.1, the first module): T = softmax_HW(X W_A)^T X, W_A [C, L] fixed filters. Recurrent
  (§3.1.2, every later module): W_R = T_in W_{T->R}, T = softmax_HW(X W_R^T)^T X: the previous module's tokens decide
  what this one attends to, so the tokens are refined module by module.
- transformer (§3.2): self-attention among the L tokens and a point-wise MLP, eq. 3-4
  T_out' = T_in + softmax((T_in K)(T_in Q)^T) T_in, T_out = T_out' + sigma(T_out' F1) F2.
- projector (§3.3): X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T) T: every pixel attends to the tokens, which
  writes them back into the feature map for dense prediction.

VT-ResNet (§4.1): a ResNet up to stage 4 (here timm's ResNet stem and layer1..layer3, the same modules and keys, so
timm's resnet18 / resnet34 weights of those stages load as they are), its stage 5 (layer4) replaced by as many VT
modules as the stage had blocks (ResNet-18: 2, ResNet-34: 3), the first with the filter-based tokenizer and the
others recurrent; classification from the last module's tokens, average-pooled over the L tokens and a linear layer.
`forward_features` gives the normalised tokens [N, L, C_T] (timm's classifier interface: `forward_head` pools and
classifies), `forward_dense` the feature map [N, C, H/16, W/16] written back by the last projector.

What this implementation chose, and why:
- The transformer is timm's pre-norm `Block` (LayerNorm, multi-head attention with q/k/v and output projections,
  MLP, DropPath): the "standard transformer" the paper's later version compares against, where eq. 3-4 use a
  single head with K, Q [C_T, C_T/2] and no value or output projection. The MLP keeps eq. 4's width (F1, F2 are
  [C_T, C_T]): `mlp_ratio` 1. So a module has about twice the paper's transformer weights (6 C_T^2 vs 3 C_T^2) and
  FLOPs; bench/vt_flops.py measures both models.
- Tokens carry their own width C_T (`token_dim`, 1024): the tokenizer ends with a value projection W_V [C, C_T]
  applied after the pooling, (A^T X) W_V, which equals A^T (X W_V) at L / HW of the cost. The projector reads the
  tokens back through W_V' [C_T, C] (the map keeps its width C, 256 for ResNet-18/34, so its residual is the
  identity) and scales its logits by 1/sqrt(C) as scaled dot-product attention does.
- Between modules the map is projected (the next recurrent tokenizer reads X_out); for classification the last
  module's projector is skipped (its map is not used); `forward_dense` runs it.
- The paper's later version adds a position encoding to the tokens and a convolutional tokenizer variant; neither is
  built here.

Recalled from the paper, not verified here (no copy of it was at hand): VT-ResNet-18 uses L = 16 tokens of
C_T = 1024 channels on the 14 x 14 x 256 map of stage 4 at 224 px; ImageNet top-1 about 72.1 vs 69.9 for ResNet-18
(+2.2) at about 1.57 G vs 1.81 G multiply-adds and a similar parameter count; 16 tokens of 1024 channels are
verified for VT-ResNet-101 (its text is quoted in public ports), and the first version's abstract states "reduces
the stage's MACs by up to 6.9x, while attaining up to 4.53 points higher top-1 accuracy".

`import contracts.backbone` imports this module, which registers `vitpretrain_vt_resnet18` and
`vitpretrain_vt_resnet34` with timm: then `timm.create_model("vitpretrain_vt_resnet18", num_classes=K)` builds one,
finetune_cls builds one with `model.init=timm:vitpretrain_vt_resnet18`, and `timm.create_model("local-dir:EXPORT",
pretrained=True)` reloads an export.
"""
from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import Block
from torch import Tensor, nn

# The architectures this module registers with timm (contracts.backbone notes them as needing this import).
VT_ARCHITECTURES = ("vitpretrain_vt_resnet18", "vitpretrain_vt_resnet34")
# ResNet stages 1-4 are the stem + layer1..layer3: their keys, the same as in timm's ResNet checkpoints.
RESNET_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")


# --- the VT module (paper §3) -----------------------------------------------------------------------------------

class Tokenizer(nn.Module):
    """What both tokenizers share: pixels pooled by a spatial attention A [N, HW, L] (softmax over the pixels), then
    the value projection W_V [C, C_T] (`value`: the token width, see the module docstring)."""

    def __init__(self, dim: int, token_dim: int) -> None:
        super().__init__()
        self.value = nn.Linear(dim, token_dim, bias=False)     # W_V

    def pool(self, a: Tensor, x: Tensor) -> Tensor:
        """A [N, HW, L] (each column summing to 1 over HW), pixels [N, HW, C] -> tokens (A^T X) W_V [N, L, C_T]."""
        return self.value(torch.einsum("npl,npc->nlc", a, x))


class FilterTokenizer(Tokenizer):
    """§3.1.1: T = softmax_HW(X W_A)^T X W_V, W_A [C, L] (`attn`): L fixed filters, each a spatial attention over
    the pixels. pixels [N, HW, C] -> tokens [N, L, C_T]."""

    def __init__(self, dim: int, token_dim: int, num_tokens: int) -> None:
        super().__init__(dim, token_dim)
        self.attn = nn.Linear(dim, num_tokens, bias=False)     # W_A

    def attention(self, x: Tensor) -> Tensor:
        """x [N, HW, C] -> A [N, HW, L]."""
        return self.attn(x).softmax(dim=1)

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        """x [N, HW, C] (tokens: none before the first module) -> tokens [N, L, C_T]."""
        return self.pool(self.attention(x), x)


class RecurrentTokenizer(Tokenizer):
    """§3.1.2: W_R = T_in W_{T->R}, T = softmax_HW(X W_R^T)^T X W_V: each previous token becomes this module's
    filter for one new token. pixels [N, HW, C], previous tokens [N, L, C_T] -> tokens [N, L, C_T]."""

    def __init__(self, dim: int, token_dim: int, num_tokens: int) -> None:
        super().__init__(dim, token_dim)
        self.token_to_filter = nn.Linear(token_dim, dim, bias=False)   # W_{T->R} [C_T, C]

    def attention(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        """x [N, HW, C], tokens [N, L, C_T] -> A [N, HW, L] (softmax over the pixels)."""
        if tokens is None:
            raise ValueError("a recurrent tokenizer needs the previous module's tokens")
        filters = self.token_to_filter(tokens)                  # W_R: [N, L, C]
        return torch.einsum("npc,nlc->npl", x, filters).softmax(dim=1)

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        """x [N, HW, C], the previous module's tokens [N, L, C_T] -> tokens [N, L, C_T]."""
        return self.pool(self.attention(x, tokens), x)


class Projector(nn.Module):
    """§3.3: X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T / sqrt(C)) T W_V. pixels [N, HW, C], tokens [N, L, C_T]
    -> pixels [N, HW, C]: each pixel reads the tokens it attends to."""

    def __init__(self, dim: int, token_dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)                # W_Q [C, C]
        self.k = nn.Linear(token_dim, dim, bias=False)          # W_K [C_T, C]
        self.v = nn.Linear(token_dim, dim, bias=False)          # W_V [C_T, C]: the tokens back at the map's width
        self.scale = dim ** -0.5

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        attn = torch.einsum("npc,nlc->npl", self.q(x), self.k(tokens)) * self.scale   # [N, HW, L]
        return x + torch.einsum("npl,nlc->npc", attn.softmax(dim=-1), self.v(tokens))


class VTModule(nn.Module):
    """One VT: tokenizer -> transformer block -> projector. (pixels [N, HW, C], previous tokens [N, L, C_T] or None)
    -> (pixels [N, HW, C], tokens [N, L, C_T])."""

    def __init__(self, dim: int, token_dim: int, num_tokens: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path: float, recurrent: bool) -> None:
        super().__init__()
        self.tokenizer = (RecurrentTokenizer if recurrent else FilterTokenizer)(dim, token_dim, num_tokens)
        self.transformer = Block(token_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path)
        self.projector = Projector(dim, token_dim)

    def forward(self, x: Tensor, tokens: Tensor | None = None, project: bool = True) -> tuple[Tensor, Tensor]:
        tokens = self.transformer(self.tokenizer(x, tokens))
        return (self.projector(x, tokens) if project else x), tokens


# --- VT-ResNet (paper §4.1) -------------------------------------------------------------------------------------

class VTResNet(nn.Module):
    """ResNet stages 1-4 (timm's, BasicBlock) + `num_vt` VT modules in place of stage 5, classified from the tokens.

    images [N, 3, H, W] -> logits [N, num_classes]; any H, W that are multiples of 16 (no position table).
    Keys: conv1, bn1, layer1..layer3 (timm's ResNet), vt.{i}.{tokenizer,transformer,projector}, norm, head.
    """

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2), num_vt: int = 2, num_tokens: int = 16,
                 token_dim: int = 1024, num_heads: int = 16, mlp_ratio: float = 1.0, qkv_bias: bool = True,
                 num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(layers) != 3:
            raise ValueError(f"layers={tuple(layers)}: give the block counts of ResNet's layer1..layer3 (stage 5 "
                             "is the VT modules)")
        if num_vt < 1:
            raise ValueError(f"num_vt={num_vt}: at least one VT module replaces stage 5")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r}: 'avg' (the tokens' mean, the paper's) or '' (tokens)")
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        self.num_features = self.head_hidden_size = self.embed_dim = token_dim
        self.num_tokens = num_tokens
        self.grad_checkpointing = False

        # stochastic depth rising linearly over every residual block of the network, conv blocks then VT modules
        # (timm's ResNet spreads its rate over its own blocks: give it the share its last block reaches)
        total = sum(layers) + num_vt
        rate = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        trunk = ResNet(BasicBlock, tuple(layers), channels=(64, 128, 256), num_classes=0, in_chans=in_chans,
                       drop_path_rate=rate[sum(layers) - 1])
        # ResNet stages 1-4 under timm's names (stage 1 is the stem)
        self.conv1, self.bn1, self.act1, self.maxpool = trunk.conv1, trunk.bn1, trunk.act1, trunk.maxpool
        self.layer1, self.layer2, self.layer3 = trunk.layer1, trunk.layer2, trunk.layer3
        dim = trunk.num_features                                # 256: layer3's width at stride 16
        self.dim = dim
        self.feature_info = trunk.feature_info[:4] + [{"num_chs": dim, "reduction": 16, "module": "vt"}]

        self.vt = nn.ModuleList([
            VTModule(dim, token_dim, num_tokens, num_heads, mlp_ratio, qkv_bias, rate[sum(layers) + i],
                     recurrent=i > 0) for i in range(num_vt)])
        self.norm = nn.LayerNorm(token_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(token_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.vt.apply(self._init_vt)
        self.head.apply(self._init_vt)

    @staticmethod
    def _init_vt(m: nn.Module) -> None:
        """The transformer parts as timm's ViT: trunc-normal std 0.02 linear weights, zero biases (the ResNet stages
        keep timm's ResNet init)."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm's model interface -----------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups in depth order (timm's layer decay): stem, ResNet blocks, VT modules, then norm + head."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)",
                    vt=r"^vt\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool={global_pool!r}: 'avg' or ''")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward --------------------------------------------------------------------------------------------

    def forward_stages(self, x: Tensor) -> Tensor:
        """ResNet stages 1-4: images [N, 3, H, W] -> feature map [N, C, H/16, W/16]."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        stages = nn.Sequential(self.layer1, self.layer2, self.layer3)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stages, x, flatten=True)
        return stages(x)

    def _vt(self, x: Tensor, project_last: bool) -> tuple[Tensor, Tensor]:
        """The feature map [N, C, h, w] through the VT modules -> (map [N, C, h, w], tokens [N, L, C_T])."""
        h, w = x.shape[-2:]
        x = rearrange(x, "n c h w -> n (h w) c")
        tokens = None
        for i, module in enumerate(self.vt):
            project = project_last or i < len(self.vt) - 1
            if self.grad_checkpointing and not torch.jit.is_scripting() and tokens is not None:
                x, tokens = torch.utils.checkpoint.checkpoint(module, x, tokens, project, use_reentrant=False)
            else:
                x, tokens = module(x, tokens, project)
        return rearrange(x, "n (h w) c -> n c h w", h=h, w=w), tokens

    def forward_features(self, x: Tensor) -> Tensor:
        """images [N, 3, H, W] -> the last module's tokens, normalised [N, L, C_T]."""
        _, tokens = self._vt(self.forward_stages(x), project_last=False)
        return self.norm(tokens)

    def forward_dense(self, x: Tensor) -> Tensor:
        """images [N, 3, H, W] -> the feature map after the last projector [N, C, H/16, W/16] (C = 256 for
        ResNet-18/34): the tokens written back into the pixels for dense prediction (§3.3)."""
        x, _ = self._vt(self.forward_stages(x), project_last=True)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """tokens [N, L, C_T] -> logits [N, K] (pre_logits: the pooled [N, C_T]); average over the tokens (§4.1)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --- timm registration ------------------------------------------------------------------------------------------

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "conv1", "classifier": "head", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({name: _cfg() for name in VT_ARCHITECTURES})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VTResNet:
    if kwargs.get("features_only"):
        raise ValueError(f"{variant}: features_only is not supported; use forward_dense for the stride-16 map")
    return build_model_with_cfg(VTResNet, variant, pretrained, **kwargs)


@register_model
def vitpretrain_vt_resnet18(pretrained: bool = False, **kwargs: Any) -> VTResNet:
    """VT-ResNet-18: ResNet-18's stages 1-4 (layer1..3 of 2 blocks) + 2 VT modules (ResNet-18's layer4 had 2 blocks),
    16 tokens of 1024 channels."""
    args = {"layers": (2, 2, 2), "num_vt": 2, "num_tokens": 16, "token_dim": 1024, **kwargs}
    return _create("vitpretrain_vt_resnet18", pretrained, **args)


@register_model
def vitpretrain_vt_resnet34(pretrained: bool = False, **kwargs: Any) -> VTResNet:
    """VT-ResNet-34: ResNet-34's stages 1-4 (layer1..3 of 3, 4, 6 blocks) + 3 VT modules (its layer4 had 3 blocks),
    16 tokens of 1024 channels."""
    args = {"layers": (3, 4, 6), "num_vt": 3, "num_tokens": 16, "token_dim": 1024, **kwargs}
    return _create("vitpretrain_vt_resnet34", pretrained, **args)


def resnet_stage_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a timm ResNet state dict (resnet18 / resnet34) that VT-ResNet shares: stem + layer1..layer3,
    for `model.load_state_dict(..., strict=False)` (layer4 and fc have no place in a VT-ResNet)."""
    return {k: v for k, v in state_dict.items() if k.startswith(RESNET_PREFIXES)}
