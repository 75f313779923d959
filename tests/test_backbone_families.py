"""contracts.backbone carries any timm family, not only the plain ViT: small models of the windowed ViT (timm's
vision_transformer_sam), Swin, MobileViT and ResNet are written by the one writer, load with plain timm through
`local-dir:` with the same features, load strictly, and load with the resampling policy at another input size (the
windowed ViT's map-shaped position table and per-axis tables, Swin's window tables)."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from contracts import backbone as bb

FAMILIES = {
    # name: (architecture, model_args at the trained size, overrides for another size, pixels at each size)
    "windowed_vit": ("samvit_base_patch16", dict(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=2,
                                                 global_attn_indexes=(1,), neck_chans=16, use_rel_pos=True),
                     dict(img_size=96), (64, 96)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                                                   window_size=4), dict(img_size=64, window_size=8), (32, 64)),
    "mobilevit": ("mobilevit_xxs", dict(), dict(), (64, 96)),
    "resnet": ("resnet10t", dict(), dict(), (64, 96)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_round_trips_through_the_timm_folder(family, tmp_path):
    architecture, model_args, overrides, (size, new_size) = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(architecture, **model_args).eval()
    with torch.no_grad():   # away from timm's zero/constant inits, so that any misplaced tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = bb.save_backbone(tmp_path / "export", model, architecture=architecture, model_args=model_args,
                              pretrained_cfg={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                              "input_size": [3, size, size]}, extra={"source": family})
    config = json.loads((folder / bb.CONFIG_NAME).read_text())
    assert config["architecture"] == architecture and config["pretrained_cfg"]["std"] == [0.25, 0.25, 0.25]

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.forward_features(x)
        plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()   # no project code involved
        torch.testing.assert_close(plain.forward_features(x), expected)
        torch.testing.assert_close(bb.load_strict(folder).eval().forward_features(x), expected)
        same, _, report = bb.load_resampled(folder)   # a backbone for a new task: its classifier head left out
        torch.testing.assert_close(same.eval().forward_features(x), expected)
        assert set(report.missing) == set(report.dropped) and not report.unexpected
        if overrides:   # the resampling policy: the position tables follow the new grid / window
            bigger, _, report = bb.load_resampled(folder, **overrides)
            out = bigger.eval().forward_features(torch.randn(1, 3, new_size, new_size))
            assert torch.isfinite(out).all() and set(report.missing) == set(report.dropped) and not report.unexpected
            if family == "windowed_vit":
                assert tuple(bigger.pos_embed.shape) == (1, 6, 6, 32) and report.resampled is not None
                # the global block's per-axis table spans the new grid; the windowed one keeps its window
                assert bigger.blocks[1].attn.rel_pos_h.shape[0] == 2 * 6 - 1
                assert bigger.blocks[0].attn.rel_pos_h.shape[0] == 2 * 2 - 1
            if family == "swin":
                table = bigger.layers[0].blocks[0].attn.relative_position_bias_table
                assert table.shape[0] == (2 * 8 - 1) ** 2
