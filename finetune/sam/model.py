"""SAM (Kirillov et al. 2023, arXiv 2304.02643): a windowed ViT image encoder with a neck, segment-anything's prompt
encoder and mask decoder, and the conversions between this project's layout and segment-anything's.

- image encoder: timm's windowed ViT (`VisionTransformerSAM`) built by finetune/vitdet.py from any plain ViT export
  (MAE's: the paper's initialisation), with SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d to
  `prompt_dim` channels) on top; the one place a plain ViT becomes a windowed one;
- prompt encoder, mask decoder, two-way transformer: the `segment-anything` package's own modules (not rewritten).

`SamModel`'s state dict is segment-anything's `Sam` state dict except the encoder MLP names (timm `mlp.fc1/fc2`,
segment-anything `mlp.lin1/lin2`); `to_segment_anything` / `from_segment_anything` are the two directions (timm's
own `checkpoint_filter_fn` for SAM checkpoints does the second for the encoder). A `SamSpec` (sam.json) holds the
geometry of both, so a model of any size is rebuilt from it, with `segment_anything.build_sam.sam_model_registry`
when the geometry is one of its three (vit_b/l/h at 1024 px) and with segment-anything's classes otherwise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from timm.models.vision_transformer_sam import checkpoint_filter_fn
from torch import Tensor, nn

from finetune.vitdet import vitdet_from_config

FORMAT = "vitpretrain-sam/1"
# segment_anything/build_sam.py's three registered geometries (1024 px, patch 16, window 14, neck 256, the decoder
# below): registry key -> (embed_dim, depth, num_heads, global blocks)
REGISTRY = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
            "vit_h": (1280, 32, 16, (7, 15, 23, 31))}
# Sam's default pixel statistics (ImageNet's, on 0-255 pixels)
SAM_PIXEL_MEAN, SAM_PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@dataclass
class SamSpec:
    """The geometry of a whole SAM (sam.json's "spec"); the defaults are segment-anything's ViT-B."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    use_rel_pos: bool = True
    prompt_dim: int = 256           # neck channels = prompt and decoder width
    mask_in_chans: int = 16         # the mask prompt's downscaling convs
    decoder_depth: int = 2          # two-way transformer layers
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: list[float] = field(default_factory=lambda: list(SAM_PIXEL_MEAN))  # 0-255 pixels
    pixel_std: list[float] = field(default_factory=lambda: list(SAM_PIXEL_STD))

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def registry_key(self) -> str | None:
        """The sam_model_registry key that builds exactly this geometry, or None (build it with `build_reference`)."""
        reference = SamSpec()
        for key, (dim, depth, heads, blocks) in REGISTRY.items():
            standard = asdict(reference) | {"embed_dim": dim, "depth": depth, "num_heads": heads,
                                            "global_attn_indexes": list(blocks)}
            mine = asdict(self) | {"pixel_mean": reference.pixel_mean, "pixel_std": reference.pixel_std}
            if mine == standard:
                return key
        return None

    def encoder_kwargs(self) -> dict[str, Any]:
        """timm VisionTransformerSAM kwargs of the image encoder (finetune.vitdet.vitdet_from_config)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=3, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=True,
                    use_abs_pos=True, use_rel_pos=self.use_rel_pos, window_size=self.window_size,
                    global_attn_indexes=list(self.global_attn_indexes), neck_chans=self.prompt_dim, num_classes=0,
                    global_pool="")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_prompt_parts(spec: SamSpec) -> tuple[PromptEncoder, MaskDecoder]:
    """segment-anything's PromptEncoder and MaskDecoder for `spec` (build_sam.py's arguments, sizes from spec)."""
    prompt_encoder = PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(spec.grid, spec.grid),
                                   input_image_size=(spec.img_size, spec.img_size), mask_in_chans=spec.mask_in_chans)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=spec.num_multimask_outputs,
        transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.prompt_dim,
                                      mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads),
        transformer_dim=spec.prompt_dim, iou_head_depth=spec.iou_head_depth,
        iou_head_hidden_dim=spec.iou_head_hidden_dim)
    return prompt_encoder, mask_decoder


def build_reference(spec: SamSpec) -> Sam:
    """segment-anything's own `Sam` of this geometry (random weights), exactly as build_sam.py builds its three."""
    encoder = ImageEncoderViT(
        depth=spec.depth, embed_dim=spec.embed_dim, img_size=spec.img_size, mlp_ratio=spec.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads, patch_size=spec.patch_size,
        qkv_bias=True, use_rel_pos=spec.use_rel_pos, global_attn_indexes=tuple(spec.global_attn_indexes),
        window_size=spec.window_size, out_chans=spec.prompt_dim)
    prompt_encoder, mask_decoder = build_prompt_parts(spec)
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std).eval()


class SamModel(nn.Module):
    """The trainable SAM: `image_encoder` (timm's windowed ViT + SAM's neck), `prompt_encoder`, `mask_decoder`.

    Pixels arrive normalised (the task's transforms) and square (resized longest side + bottom/right padding, as
    segment-anything's `ResizeLongestSide` + `Sam.preprocess`). One forward does one of two things, so that every
    call goes through the module DeepSpeed wraps: `model(images)` embeds images, `model(embedding=..., ...)` decodes
    the prompts of one image.
    """

    def __init__(self, image_encoder: nn.Module, spec: SamSpec) -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder, self.mask_decoder = build_prompt_parts(spec)

    def embed(self, images: Tensor) -> Tensor:
        """images [B, 3, S, S] normalised -> image embeddings [B, prompt_dim, S/p, S/p] (NCHW after the neck)."""
        return self.image_encoder.forward_features(images)

    def decode(self, embedding: Tensor, points: tuple[Tensor, Tensor] | None = None, boxes: Tensor | None = None,
               mask_input: Tensor | None = None, multimask: bool = False) -> tuple[Tensor, Tensor]:
        """One image's prompts -> (low-res mask logits [P, M, 4S/p, 4S/p], IoU predictions [P, M]).

        embedding [1, C, g, g]; points (coords [P, K, 2] in input pixels (x, y), labels [P, K]: 1 positive,
        0 negative); boxes [P, 4] xyxy input pixels; mask_input [P, 1, 4g, 4g] logits of a previous round;
        M = 3 with multimask (the ambiguity-aware outputs), else 1.
        """
        # mixed precision (DeepSpeed casts every weight and buffer): segment-anything computes the prompts' Fourier
        # positions in fp32 (coordinates at 1024 px need more than bf16's 8 bits), so its random matrix stays fp32,
        # and what the prompt encoder gives is cast to the embedding's dtype for the decoder
        pe = self.prompt_encoder.pe_layer
        if pe.positional_encoding_gaussian_matrix.dtype != torch.float32:
            pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
        if mask_input is not None:
            mask_input = mask_input.to(self.prompt_encoder.mask_downscaling[0].weight.dtype)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        dtype = embedding.dtype
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
                                 sparse_prompt_embeddings=sparse.to(dtype), dense_prompt_embeddings=dense.to(dtype),
                                 multimask_output=multimask)

    def forward(self, images: Tensor | None = None, **prompts: Any) -> Any:
        """images -> embeddings ([B, C, g, g]); or embedding=[1, C, g, g] + prompts -> (logits, iou) (`decode`)."""
        if images is not None:
            return self.embed(images)
        return self.decode(**prompts)


def build_model(spec: SamSpec, encoder: nn.Module | None = None, drop_path_rate: float = 0.0) -> SamModel:
    """A SamModel of `spec`: `encoder` (a windowed ViT with SAM's neck, converted from a plain ViT by
    finetune.vitdet.vitdet_from_state) or a random one of the spec's geometry."""
    if encoder is None:
        encoder = vitdet_from_config(spec.encoder_kwargs(), drop_path_rate=drop_path_rate)
    return SamModel(encoder, spec)


# --- the two state-dict layouts -----------------------------------------------------------------------------------

def to_segment_anything(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """SamModel state dict -> segment-anything's Sam state dict (keys with or without DeepSpeed's "module.")."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("image_encoder."):
            key = key.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")
        out[key] = value
    return out


def from_segment_anything(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """segment-anything's Sam state dict (a published sam_vit_*.pth) -> SamModel's: the encoder through timm's own
    SAM filter (mlp.lin -> mlp.fc), the prompt encoder and mask decoder unchanged."""
    encoder = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    out = {f"image_encoder.{k}": v for k, v in checkpoint_filter_fn(encoder, None).items()}
    out.update({k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))})
    return out


def spec_from_segment_anything(state: dict[str, Tensor], decoder_heads: int = 8) -> SamSpec:
    """The geometry of a segment-anything state dict, read from its tensor shapes. The decoder's head count leaves
    no trace in the weights (every published SAM: 8); windowed blocks have [2w-1, head_dim] relative tables, global
    ones [2g-1, head_dim]."""
    patch = state["image_encoder.patch_embed.proj.weight"]
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    grid = state["image_encoder.pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    rel = [state.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    use_rel_pos = rel[0] is not None
    global_blocks = [i for i, r in enumerate(rel) if r is not None and r.shape[0] == 2 * grid - 1]
    windowed = [r.shape[0] for r in rel if r is not None and r.shape[0] != 2 * grid - 1]
    head_dim = rel[0].shape[1] if use_rel_pos else None
    num_heads = embed_dim // head_dim if head_dim else 12
    mlp = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
    dec_layers = {int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers.")}
    iou_layers = [k for k in state if k.startswith("mask_decoder.iou_prediction_head.layers.")
                  and k.endswith(".weight")]
    return SamSpec(
        img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp / embed_dim, window_size=(windowed[0] + 1) // 2 if windowed else 0,
        global_attn_indexes=global_blocks, use_rel_pos=use_rel_pos,
        prompt_dim=state["image_encoder.neck.0.weight"].shape[0],
        mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=len(dec_layers), decoder_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"]
        .shape[0], decoder_heads=decoder_heads,
        num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])


def load_segment_anything(spec: SamSpec, state: dict[str, Tensor]) -> Sam:
    """segment-anything's Sam with `state` (its layout) loaded strictly: built by `sam_model_registry` when the
    geometry is registered (vit_b/l/h), by segment-anything's classes with the spec's sizes otherwise."""
    key = spec.registry_key()
    if key is not None:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[key]()
        sam.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean).view(-1, 1, 1), False)
        sam.register_buffer("pixel_std", torch.tensor(spec.pixel_std).view(-1, 1, 1), False)
    else:
        sam = build_reference(spec)
    sam.load_state_dict(state)
    return sam.eval()


def upscale_logits(logits: Tensor, size: int) -> Tensor:
    """low-res mask logits [P, M, h, w] -> [P, M, size, size] (bilinear, Sam.postprocess_masks' first step)."""
    return nn.functional.interpolate(logits, (size, size), mode="bilinear", align_corners=False)


def pixels_to_sam(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[list[float], list[float]]:
    """The task's 0-1 normalisation -> Sam's pixel_mean / pixel_std on 0-255 pixels."""
    return [m * 255.0 for m in mean], [s * 255.0 for s in std]

