"""finetune/vitdet.py: a ViTDet backbone (timm's windowed ViT) from a plain ViT export, checked against
transformers' VitDetBackbone (the reference implementation of ViTDet's backbone) on the same weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import contracts.backbone as bb
from finetune.vitdet import convert_vit_state, default_global_blocks, pos_embed_to_grid, vitdet_from_backbone

DEPTH, DIM, HEADS, PATCH = 4, 32, 2, 8


@pytest.fixture(scope="module")
def mae_export(tmp_path_factory) -> Path:
    """The MAE task's own export of a 32-px (4x4 grid), patch-8, 4 x 32 encoder."""
    from pretrain.export import save_backbone
    from pretrain.mae import MAEConfig, MAETask

    torch.manual_seed(0)
    task = MAETask(MAEConfig(img_size=32, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2))
    tensors, meta = task.export(task.model.state_dict())
    return save_backbone(tmp_path_factory.mktemp("mae") / "export", tensors, meta)


def perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Random weights everywhere (rel_pos tables and biases included), so every converted tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "rel_pos" in name else 0.05
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def transformers_twin(model: torch.nn.Module, img_size: int, window_size: int, global_blocks: tuple[int, ...]):
    """transformers' VitDetBackbone with `model`'s weights. Its position table is kept at pretrain size with a class
    row and interpolated at run time; pretrain_image_size = img_size makes it the table as it is (the class row is
    never read)."""
    from transformers import VitDetBackbone, VitDetConfig

    config = VitDetConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
                          image_size=img_size, pretrain_image_size=img_size, patch_size=PATCH, qkv_bias=True,
                          window_size=window_size,
                          window_block_indices=[i for i in range(DEPTH) if i not in global_blocks],
                          use_relative_position_embeddings=True, use_absolute_position_embeddings=True,
                          layer_norm_eps=1e-6, out_features=[f"stage{DEPTH}"])
    twin = VitDetBackbone(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key == "pos_embed":  # [1, H, W, D] -> [1, 1 + H*W, D] with an unused class row
            flat = value.flatten(1, 2)
            state["embeddings.position_embeddings"] = torch.cat([torch.zeros_like(flat[:, :1]), flat], dim=1)
        elif key.startswith("patch_embed.proj."):
            state[key.replace("patch_embed.proj.", "embeddings.projection.")] = value
        else:
            state[key.replace("blocks.", "encoder.layer.").replace(".attn.", ".attention.")] = value
    twin.load_state_dict(state, strict=True)
    return twin


def test_conversion_drops_class_token_resamples_positions_and_zero_inits_rel_pos(mae_export):
    source = load_file(str(mae_export / bb.WEIGHTS_NAME))
    model = vitdet_from_backbone(mae_export, 64, window_size=4, global_blocks=(1, 3))
    names = set(model.state_dict())
    assert "cls_token" in source and not any("cls_token" in k for k in names)
    assert not any(k.startswith(("norm.", "neck.", "head.")) for k in names)  # features are the last block's
    assert source["pos_embed"].shape == (1, 1 + 16, DIM) and model.pos_embed.shape == (1, 8, 8, DIM)  # 4x4 -> 8x8
    # resampling from the same grid is the identity: the class row is dropped, the patch rows kept in order
    same = vitdet_from_backbone(mae_export, 32, window_size=2, global_blocks=(3,))
    torch.testing.assert_close(same.pos_embed.flatten(1, 2), source["pos_embed"][:, 1:])
    torch.testing.assert_close(model.blocks[2].attn.qkv.weight, source["blocks.2.attn.qkv.weight"])
    torch.testing.assert_close(model.patch_embed.proj.weight, source["patch_embed.proj.weight"])
    assert [b.window_size for b in model.blocks] == [4, 0, 4, 0]
    assert model.blocks[0].attn.rel_pos_h.shape == (2 * 4 - 1, DIM // HEADS)   # the window's
    assert model.blocks[1].attn.rel_pos_w.shape == (2 * 8 - 1, DIM // HEADS)   # the whole grid's
    for block in model.blocks:  # the source has none: zero, so the pretrained function is unchanged at start
        assert not block.attn.rel_pos_h.any() and not block.attn.rel_pos_w.any()
    assert not any("rel_pos" in k for k in vitdet_from_backbone(mae_export, 64, 4, (1, 3), rel_pos=False)
                   .state_dict())
    assert default_global_blocks(12) == (2, 5, 8, 11) and default_global_blocks(24) == (5, 11, 17, 23)
    assert [b.window_size for b in vitdet_from_backbone(mae_export, 64, 4).blocks] == [0, 0, 0, 0]  # depth 4


@pytest.mark.parametrize("img_size", [64, 72])  # 8x8 grid (windows divide it); 9x9 (padded to 12x12 per block)
def test_feature_map_equals_transformers_vitdet(mae_export, img_size):
    torch.manual_seed(2)
    model = vitdet_from_backbone(mae_export, img_size, window_size=4, global_blocks=(1, 3)).eval()
    perturb_(model)
    assert all(b.attn.rel_pos_h.abs().min() > 0 for b in model.blocks)
    twin = transformers_twin(model, img_size, window_size=4, global_blocks=(1, 3))
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        ours, theirs = model(images), twin(images).feature_maps[-1]
    grid = img_size // PATCH
    assert ours.shape == theirs.shape == (2, DIM, grid, grid)
    assert (ours - theirs).abs().max() <= 1e-5


def test_other_input_sizes_run(mae_export):
    """The table is resampled in the forward for a grid it was not built for, as timm's SAM ViT does."""
    model = vitdet_from_backbone(mae_export, 64, window_size=4, global_blocks=(1, 3)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 72)).shape == (1, DIM, 6, 9)


def test_beit_relative_tables_are_refused(mae_export):
    meta, state = bb.read_backbone(mae_export)
    model = vitdet_from_backbone(mae_export, 32, window_size=2, global_blocks=(3,))
    state["blocks.0.attn.relative_position_bias_table"] = torch.zeros(7 * 7 + 3, HEADS)
    with pytest.raises(ValueError, match="relative position bias"):
        convert_vit_state(state, meta, model)


def test_beit_keys_are_converted(mae_export):
    """timm Beit keys: q_bias/v_bias -> qkv.bias [q, 0, v]; gamma_1/2 -> ls1/ls2.gamma."""
    meta, state = bb.read_backbone(mae_export)
    model = vitdet_from_backbone(mae_export, 32, window_size=2, global_blocks=(3,))
    bias = state.pop("blocks.0.attn.qkv.bias")
    state["blocks.0.attn.q_bias"], state["blocks.0.attn.v_bias"] = bias[:DIM] + 1, bias[2 * DIM:] + 2
    state["blocks.0.gamma_1"], state["blocks.0.gamma_2"] = torch.ones(DIM), 2 * torch.ones(DIM)
    out = convert_vit_state(state, meta, model)
    torch.testing.assert_close(out["blocks.0.attn.qkv.bias"],
                               torch.cat([bias[:DIM] + 1, torch.zeros(DIM), bias[2 * DIM:] + 2]))
    assert "blocks.0.attn.q_bias" not in out and out["blocks.0.ls2.gamma"].eq(2).all()


def test_deit_prefix_rows_are_dropped():
    """A DeiT table has class and distillation rows: both dropped, the patch rows kept in row-major order."""
    table = torch.randn(1, 2 + 3 * 4, DIM)
    grid = pos_embed_to_grid(table, (3, 4), (3, 4))
    assert grid.shape == (1, 3, 4, DIM)
    torch.testing.assert_close(grid[0, 1, 2], table[0, 2 + 1 * 4 + 2])
    assert pos_embed_to_grid(table, (3, 4), (6, 8)).shape == (1, 6, 8, DIM)
