"""DETR on a plain ViT: backbone feature map -> neck -> sine positions -> transformer -> class and box heads.

Adapted from facebookresearch/detr (Carion et al. 2020, arXiv 2005.12872) models/detr.py, transformer.py,
position_encoding.py, with the backbone replaced the way ViTDet uses a plain ViT (Li et al. 2022, arXiv 2203.16527;
facebookresearch/detectron2 projects/ViTDet, modeling/backbone/vit.py `SimpleFeaturePyramid`):

- backbone: a timm VisionTransformer built with `dynamic_img_size=True`, so its learned position table is resampled
  to every padded batch's grid; its last block's patch tokens (after its final norm) as a [B, D, H/p, W/p] map
  (`forward_intermediates`). Padding pixels go through the ViT like image pixels (as through DETR's ResNet); the
  mask keeps them out of the detector's attention.
  Or ViTDet's windowed ViT (finetune/vitdet.py, `backbone=vitdet`): its forward gives the last block's map
  [B, D, H/p, W/p] directly (no final norm, as in ViTDet; the simple feature pyramid brings its own norms).
  Or a hierarchical timm model (`hierarchical=True`: Swin built with `dynamic_img_size=True`, MobileViT, any model
  with timm's `feature_info` and `forward_intermediates`): its stages' maps [B, C_i, H/s_i, W/s_i] (timm's
  `features_only` outputs; Swin's last one after its final norm), the last stage's stride S standing for the patch.
- neck: `simple_fpn` builds ViTDet's pyramid level of the requested stride from that single map (stride p/4 and
  p/2 by transposed convolutions, p by identity, 2p by max-pooling; then 1x1 and 3x3 convolutions with
  LayerNorm to the detector width); `project` is DETR's 1x1 input projection at the patch stride. DETR's
  encoder uses one map: its attention cost grows with the square of the token count, which is why plain DETR
  reads the stride-32 C5 map; stride 16 (a ViT-B/16's own grid) quadruples the tokens and helps small objects.
  A hierarchical backbone's last stage feeds either neck as the ViT's map does (stride S for S, S/2, S/4, 2S);
  `merge` instead merges its last `merge_levels` stages (Deformable DETR's C3-C5) into one level at the feature
  stride: each stage through a 1x1 convolution and LayerNorm to the detector width, average-pooled (finer stages) or
  bilinearly upsampled (coarser ones) to that grid, summed, then a 3x3 convolution and LayerNorm.
- transformer: DETR's post-norm encoder-decoder (pre-norm optional), sine positions added to queries and keys in
  every attention, N learned object queries, decoder outputs of every layer normalised by the decoder's final
  LayerNorm for the auxiliary losses.
- heads: a linear classifier over K classes + no-object (last index) and a 3-layer MLP with a sigmoid giving
  normalised (cx, cy, w, h), shared by all decoder layers.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from finetune.vitdet import ViTDetBackbone


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine position encoding over the unpadded area: mask [B, H, W] (True = padding) -> [B, 2F, H, W].

    Row and column indices count only valid pixels (cumulative sums of ~mask), normalised to (0, 2pi] by the image's
    own extent, so a padded image gets the same encoding as it would alone.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize, self.scale = num_pos_feats, temperature, normalize, scale

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class SimpleFeaturePyramidLevel(nn.Module):
    """One level of ViTDet's simple feature pyramid: [B, D, h, w] at stride p -> [B, out, h*s, w*s].

    s = 4: two 2x2 stride-2 transposed convolutions (LayerNorm + GELU between); s = 2: one; s = 1: identity;
    s = 0.5: 2x2 max-pooling. Then Conv1x1 -> LayerNorm -> Conv3x3 -> LayerNorm (no biases: the norms have them).
    """

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, in_dim: int, out_dim: int, scale: float) -> None:
        super().__init__()
        if scale not in self.SCALES:
            raise ValueError(f"a simple feature pyramid level rescales by one of {self.SCALES}, not {scale}")
        if scale == 4.0:
            self.resample: nn.Module = nn.Sequential(
                nn.ConvTranspose2d(in_dim, in_dim // 2, 2, stride=2), LayerNorm2d(in_dim // 2), nn.GELU(),
                nn.ConvTranspose2d(in_dim // 2, in_dim // 4, 2, stride=2))
            dim = in_dim // 4
        elif scale == 2.0:
            self.resample, dim = nn.ConvTranspose2d(in_dim, in_dim // 2, 2, stride=2), in_dim // 2
        elif scale == 1.0:
            self.resample, dim = nn.Identity(), in_dim
        else:
            self.resample, dim = nn.MaxPool2d(2, stride=2), in_dim
        self.proj = nn.Sequential(nn.Conv2d(dim, out_dim, 1, bias=False), LayerNorm2d(out_dim),
                                  nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.resample(x))


class MergedPyramidLevel(nn.Module):
    """Backbone stages [B, C_i, H/s_i, W/s_i] -> one map [B, out, H/t, W/t] at stride t (one of the s_i): each stage
    Conv1x1 -> LayerNorm to `out` channels, resized to the stride-t grid (finer: average pooling over whole cells;
    coarser: bilinear), summed; then Conv3x3 -> LayerNorm (no biases: the norms have them)."""

    def __init__(self, in_dims: list[int], strides: list[int], out_dim: int, stride: int) -> None:
        super().__init__()
        if stride not in strides:
            raise ValueError(f"the merged level's stride {stride} must be one of the merged stages' strides {strides}")
        self.strides, self.stride = list(strides), stride
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_dim, 1, bias=False), LayerNorm2d(out_dim))
                                     for c in in_dims)
        self.proj = nn.Sequential(nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim))

    def forward(self, feats: list[Tensor]) -> Tensor:
        """feats: the stages' maps, finest first -> [B, out, H/t, W/t]."""
        size = feats[self.strides.index(self.stride)].shape[-2:]
        merged = 0
        for x, lateral, s in zip(feats, self.lateral, self.strides):
            x = lateral(x)
            if s < self.stride:
                x = F.adaptive_avg_pool2d(x, size)
            elif s > self.stride:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            merged = merged + x
        return self.proj(merged)


class EncoderLayer(nn.Module):
    """DETR's encoder layer: self-attention with positions added to queries and keys, then an FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos: [S, B, d]; key_padding_mask: [B, S] (True = padding) -> [S, B, d]."""
        x = self.norm1(src) if self.pre_norm else src
        q = k = x + pos
        src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0])
        if not self.pre_norm:
            src = self.norm1(src)
        x = self.norm2(src) if self.pre_norm else src
        src = src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return src if self.pre_norm else self.norm2(src)


class DecoderLayer(nn.Module):
    """DETR's decoder layer: self-attention among queries, cross-attention to the encoder memory, FFN; query
    positions added to queries (and keys in self-attention), memory positions to the memory keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_key_padding_mask: Tensor) -> Tensor:
        """tgt, query_pos: [Q, B, d]; memory, pos: [S, B, d]; memory_key_padding_mask [B, S] -> [Q, B, d]."""
        x = self.norm1(tgt) if self.pre_norm else tgt
        q = k = x + query_pos
        tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
        if not self.pre_norm:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout2(self.cross_attn(x + query_pos, memory + pos, memory,
                                                  key_padding_mask=memory_key_padding_mask, need_weights=False)[0])
        if not self.pre_norm:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.pre_norm else self.norm3(tgt)


class Transformer(nn.Module):
    """DETR's encoder-decoder: (src [B, d, H, W], mask [B, H, W], query_embed [Q, d], pos [B, d, H, W]) ->
    decoder outputs of every layer [L, B, Q, d], each normalised by the decoder's final LayerNorm."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False) -> None:
        super().__init__()
        enc = EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        dec = DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.decoder_layers = nn.ModuleList(copy.deepcopy(dec) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        for p in self.parameters():  # DETR: Xavier-uniform for every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        b = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)          # [HW, B, d]
        pos = pos.flatten(2).permute(2, 0, 1).to(src.dtype)
        mask = mask.flatten(1)                         # [B, HW]
        query_pos = query_embed.unsqueeze(1).expand(-1, b, -1)
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, pos, mask)
        memory = self.encoder_norm(memory)
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, pos, query_pos, mask)
            outputs.append(self.decoder_norm(tgt))
        return torch.stack(outputs).transpose(1, 2)    # [L, B, Q, d]


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box head: 3 layers)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DETR(nn.Module):
    """DETR with a timm ViT backbone, or a hierarchical one (`hierarchical=True`; see the module docstring).

    forward(images [B, 3, H, W], mask [B, H, W] bool, True = padding) -> {"pred_logits": [B, Q, K + 1],
    "pred_boxes": [B, Q, 4] normalised (cx, cy, w, h) of the unpadded image, "aux_outputs": [{same}, ...] for the
    decoder layers before the last (when aux_loss)}.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, neck: str = "simple_fpn", feature_stride: int = 0,
                 hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, num_queries: int = 100, pre_norm: bool = False,
                 aux_loss: bool = True, hierarchical: bool = False, merge_levels: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.hierarchical = hierarchical
        if hierarchical:
            # timm's feature_info: one entry per forward_intermediates output (num_chs, reduction), finest first
            stages = [(int(f["num_chs"]), int(f["reduction"])) for f in backbone.feature_info]
            self.patch_size = stages[-1][1]    # the stride of the map the neck reads: the last stage's
            width = stages[-1][0]
            used = stages[-max(1, merge_levels):] if neck == "merge" else stages[-1:]
            self.stage_indices = list(range(len(stages) - len(used), len(stages)))
        else:
            self.patch_size = int(backbone.patch_embed.patch_size[0])
            width = backbone.num_features
        self.feature_stride = feature_stride or self.patch_size
        if neck == "merge":
            if not hierarchical:
                raise ValueError("neck=merge merges a hierarchical backbone's stages; a ViT has one map "
                                 "(neck=simple_fpn or project)")
            self.neck: nn.Module = MergedPyramidLevel([c for c, _ in used], [s for _, s in used], hidden_dim,
                                                      self.feature_stride)
        elif neck == "simple_fpn":
            self.neck = SimpleFeaturePyramidLevel(width, hidden_dim, self.patch_size / self.feature_stride)
        elif neck == "project":
            if self.feature_stride != self.patch_size:
                raise ValueError(f"neck=project reads the ViT's own grid (stride {self.patch_size}); "
                                 f"feature_stride={self.feature_stride} needs neck=simple_fpn")
            self.neck = nn.Conv2d(width, hidden_dim, 1)
        else:
            raise ValueError(f"neck={neck!r}: expected simple_fpn, project or merge")
        self.position = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout, pre_norm)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.aux_loss = aux_loss

    @property
    def size_divisibility(self) -> int:
        """Padded batches are a multiple of this in height and width (whole patches, whole pooled cells)."""
        return max(self.patch_size, self.feature_stride)

    def features(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] -> (neck map [B, d, H/s, W/s], its mask [B, H/s, W/s])."""
        if self.hierarchical:
            # the stages' maps [B, C_i, H/s_i, W/s_i], finest first (Swin: the last after its final norm)
            maps = self.backbone.forward_intermediates(images, indices=self.stage_indices, norm=True,
                                                       output_fmt="NCHW", intermediates_only=True)
            feature = self.neck(maps) if isinstance(self.neck, MergedPyramidLevel) else self.neck(maps[-1])
        else:
            if isinstance(self.backbone, ViTDetBackbone):
                tokens = self.backbone(images)   # ViTDet: the last block's map, the grid padded to whole windows
            else:
                (tokens,) = self.backbone.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW",
                                                                intermediates_only=True)
            feature = self.neck(tokens)
        mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
        return feature, mask

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        feature, mask = self.features(images, mask)
        pos = self.position(mask)
        hs = self.transformer(feature, mask, self.query_embed.weight, pos)   # [L, B, Q, d]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out
