"""Encoder export: MAE state dict -> timm VisionTransformer keys, backbone files, and the same features."""
import json

import pytest
import timm
import torch

from contracts.backbone import read_config
from pretrain.export import (GENERIC_ARCHITECTURE, encoder_to_timm, load_backbone, save_backbone,
                             strip_wrapper_prefixes, timm_architecture)
from pretrain.mae import MAE_ARCHS, MAEConfig, MAETask

SMALL = MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def task() -> MAETask:
    torch.manual_seed(0)
    task = MAETask(SMALL)
    with torch.no_grad():  # move LayerNorms and biases off 1/0 so a tensor loaded into the wrong slot shows
        for p in task.model.parameters():
            if p.requires_grad and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return task


def test_export_loads_into_timm_and_gives_the_same_features(task):
    state, config = task.export(task.model.state_dict())
    assert config["source"] == "mae" and config["architecture"] == GENERIC_ARCHITECTURE
    assert not any(k.startswith(("decoder", "mask_token")) for k in state)

    vit = timm.create_model(config["architecture"], pretrained=False, **config["model_kwargs"]).eval()
    missing, unexpected = vit.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    assert vit.num_classes == 0

    model = task.model.eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio=0.0)
        # the encoder saw every patch, in shuffled order: put them back in patch order behind the class token
        patches = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
        ours = torch.cat([latent[:, :1], patches], dim=1)
        theirs = vit.forward_features(imgs)
    assert mask.sum() == 0
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_accepts_wrapped_keys_and_missing_frozen_pos_embed(task):
    plain, _ = task.export(task.model.state_dict())
    wrapped = {"module." + k: v for k, v in task.model.state_dict().items() if k != "pos_embed"}
    state, _ = task.export(wrapped)
    assert state.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(state[k], plain[k], rtol=0, atol=0)


def test_save_and_load_backbone_round_trip(task, tmp_path):
    state, config = task.export(task.model.state_dict())
    save_backbone(tmp_path / "export", state, config)
    assert read_config(tmp_path / "export") == json.loads(json.dumps(config))
    vit = load_backbone(tmp_path / "export")
    for k, v in vit.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert list(vit.pretrained_cfg["mean"]) == pytest.approx(list(task.mean))
    assert tuple(vit.pretrained_cfg["input_size"]) == (3, 32, 32)


def test_load_backbone_is_strict(task, tmp_path):
    state, config = task.export(task.model.state_dict())
    del state["norm.bias"]
    save_backbone(tmp_path, state, config)
    with pytest.raises(RuntimeError, match="norm.bias"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("arch,expected", [("vit_b16", "vit_base_patch16_224"), ("vit_l16", "vit_large_patch16_224"),
                                           ("vit_h14", "vit_huge_patch14_224"), ("tiny", GENERIC_ARCHITECTURE)])
def test_paper_presets_export_under_timm_names(arch, expected):
    a = MAE_ARCHS[arch]
    name = timm_architecture(a["img_size"], a["patch_size"], a["embed_dim"], a["depth"], a["num_heads"])
    assert name == expected
    if name != GENERIC_ARCHITECTURE:  # the registered defaults are the preset's geometry
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, num_classes=0)
        assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (a["embed_dim"], a["depth"],
                                                                                   a["num_heads"])


def test_encoder_to_timm_prefixes():
    t = torch.zeros(1)
    sd = {"module._orig_mod.encoder.blocks.0.w": t, "module.decoder.x": t, "encoder.norm.weight": t}
    assert set(strip_wrapper_prefixes(sd)) == {"encoder.blocks.0.w", "decoder.x", "encoder.norm.weight"}
    out = encoder_to_timm(sd, drop_prefixes=("decoder.",), prefix_map={"encoder.": ""})
    assert set(out) == {"blocks.0.w", "norm.weight"}
