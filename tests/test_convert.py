"""launch/convert_checkpoint.py: real DeepSpeed checkpoints of the MAE job (1 and 2 ranks, ZeRO 0-3, bf16) and the
reference repos' checkpoint formats -> timm backbones that load strictly and give the source model's features."""
import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from conftest import ShardFactory
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from test_deepspeed_multiproc import ROOT, TINY_MODEL, deepspeed_launch
from timm.models.beit import gen_relative_position_index

from contracts.backbone import read_config
from launch.convert_checkpoint import ConvertError, deepspeed_classes, main, saved_config
from launch.pretrain_mae import main as pretrain_mae
from launch.runtime import checkpoint
from pretrain.mae import MAEConfig, MaskedAutoencoderViT

TINY_CFG = MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=2)
ATOL = 1e-5
RUNS = ("zero3_2ranks", "zero1_bf16_2ranks", "zero2", "zero0")


# --- real runs of the MAE job -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run dirs of 2-step MAE runs: 2 ranks (deepspeed launcher) ZeRO-3 and bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer,
    frozen pos_embed not beside the shards), and in this process 1 rank ZeRO-2 (a checkpoint at both steps) and
    ZeRO-0."""
    root = tmp_path_factory.mktemp("convert_runs")
    factory = ShardFactory(root)
    shards = factory.write([[factory.sample(f"{s * 8 + i:06d}", size=32) for i in range(8)] for s in range(2)],
                           name="photos")
    common = TINY_MODEL + [f"data.train={shards.url}", "data.val=", "data.batch_size=4", "data.num_workers=0",
                           "optim.max_steps=2", "log.every=1", "log.images_every=0", f"run.dir={root / 'runs'}"]
    deepspeed_launch("launch/pretrain_mae.py", *common, "engine.zero_stage=3", "ckpt.every=2", "run.name=zero3_2ranks")
    deepspeed_launch("launch/pretrain_mae.py", *common, "engine.zero_stage=1", "engine.precision=bf16", "ckpt.every=2",
                     "run.name=zero1_bf16_2ranks")
    for name, extra in {"zero2": ["engine.zero_stage=2", "ckpt.every=1"],
                        "zero0": ["engine.zero_stage=0", "ckpt.every=2"]}.items():
        assert pretrain_mae(common + extra + [f"run.name={name}"]) == 0
    return {name: root / "runs" / "pretrain_mae" / name for name in RUNS}


def reference_weights(run_dir: Path, name: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(weights, complete) the MAE model is rebuilt from, read without the converter: DeepSpeed's consolidation for
    fp32 ZeRO, the module weights for ZeRO-0, and for bf16 ZeRO-1 (which zero_to_fp32 cannot read) the encoder the
    run exported from the live engine's fp32 master weights."""
    ckpt_dir = run_dir / "checkpoints"
    if name.startswith(("zero2", "zero3")):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="step00000002"), True
    if name == "zero0":
        states = torch.load(checkpoint.model_states_file(ckpt_dir / "step00000002"), map_location="cpu",
                            weights_only=True)
        return states["module"], True
    return load_file(str(run_dir / "export" / "model.safetensors")), False


def mae_features(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """MAE's encoder with mask_ratio 0: every patch, un-shuffled back to patch order behind the class token."""
    with torch.no_grad():
        latent, mask, ids_restore = model.eval().forward_encoder(imgs, mask_ratio=0.0)
    assert mask.sum() == 0
    patches = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
    return torch.cat([latent[:, :1], patches], dim=1)


def load_timm(out_dir: Path) -> torch.nn.Module:
    """timm.create_model from config.json + strict load of model.safetensors, asserting no missing/unexpected."""
    config = read_config(out_dir)
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_kwargs"])
    missing, unexpected = model.load_state_dict(load_file(str(out_dir / "model.safetensors")), strict=True)
    assert not missing and not unexpected
    return model.eval()


@pytest.mark.multiproc  # the runs fixture launches 2-rank jobs
@pytest.mark.parametrize("name", RUNS)
def test_run_checkpoint_converts_to_timm_with_the_same_features(runs, name, tmp_path):
    run_dir, out = runs[name], tmp_path / "out"
    assert main([str(run_dir), "--out", str(out), "--atol", str(ATOL)]) == 0
    backbone = load_file(str(out / "model.safetensors"))
    config = read_config(out)
    assert config["source"] == "mae" and config["converted_from"]["step"] == 2
    assert not any(k.startswith(("decoder_", "mask_token")) for k in backbone) and "pos_embed" in backbone

    # the same fp32 master weights the run exported from its live engine, bit for bit
    live = load_file(str(run_dir / "export" / "model.safetensors"))
    assert backbone.keys() == live.keys()
    for key in backbone:
        torch.testing.assert_close(backbone[key], live[key], rtol=0, atol=0)

    weights, complete = reference_weights(run_dir, name)
    mae = MaskedAutoencoderViT(TINY_CFG)
    missing, unexpected = mae.load_state_dict(weights, strict=complete)
    assert not unexpected and all(k.startswith(("decoder_", "mask_token")) for k in missing)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = load_timm(out).forward_features(imgs)
    torch.testing.assert_close(theirs, mae_features(mae, imgs), rtol=0, atol=ATOL)


@pytest.mark.multiproc  # the runs fixture launches 2-rank jobs
def test_run_dir_forms_and_tags(runs, tmp_path, caplog):
    ckpt_dir = runs["zero2"] / "checkpoints"
    assert main([str(ckpt_dir), "--tag", "step00000001", "--out", str(tmp_path / "a"), "--no-check"]) == 0
    assert main([str(ckpt_dir / "step00000002"), "--out", str(tmp_path / "b"), "--no-check"]) == 0
    first, last = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], last["blocks.0.attn.qkv.weight"])  # one step apart
    assert read_config(tmp_path / "a")["converted_from"]["step"] == 1

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(runs["zero2"]), "--tag", "step00000009", "--out", str(tmp_path / "c")]) == 2
    assert "step00000009" in caplog.text and "available tags: step00000001, step00000002" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(tmp_path / "a"), "--out", str(tmp_path / "d")]) == 2
    assert "no DeepSpeed checkpoint" in caplog.text
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_job_config_falls_back_to_the_run_config_yaml(tmp_path):
    with pytest.raises(ConvertError, match="cannot tell which job"):
        saved_config({}, tmp_path)
    (tmp_path / "config.yaml").write_text("derived:\n  job: pretrain_mae\nmodel:\n  depth: 2\n")
    assert saved_config({"module": {}}, tmp_path) == {"derived": {"job": "pretrain_mae"}, "model": {"depth": 2}}


def test_only_deepspeed_classes_are_unpickled(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.gradients, "t": torch.zeros(2)}, tmp_path / "ok_optim_states.pt")
    assert deepspeed_classes([tmp_path / "ok_optim_states.pt"]) == [ZeroStageEnum]
    torch.save({"hook": os.getcwd}, tmp_path / "bad_optim_states.pt")  # unpickling would resolve any callable
    with pytest.raises(ConvertError, match="refusing to unpickle"):
        deepspeed_classes([tmp_path / "ok_optim_states.pt", tmp_path / "bad_optim_states.pt"])


@pytest.mark.multiproc
def test_command_line_on_a_two_rank_zero3_run(runs, tmp_path):
    proc = subprocess.run([sys.executable, "launch/convert_checkpoint.py", str(runs["zero3_2ranks"]), "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |features - source features|" in proc.stderr
    assert load_timm(tmp_path).num_classes == 0


# --- the reference repos' checkpoint formats ------------------------------------------------------------------------

def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move 1/0-initialised vectors and zero tables off their init, so a tensor loaded into the wrong slot shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "relative_position_bias_table" in name or "token" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def mae_source(full: bool) -> tuple[dict, Callable]:
    """facebookresearch/mae layout: {"model": encoder (mae_pretrain_*) or encoder + decoder (mae_visualize_*)}.
    Width 192 is ViT-Ti's, so the converter knows its 3 heads."""
    model = _perturbed(MaskedAutoencoderViT(MAEConfig(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3,
                                                      decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)))
    state = {k: v for k, v in model.state_dict().items() if full or not k.startswith(("decoder_", "mask_token"))}
    # a training checkpoint pickles its argparse args too
    return {"model": state, "args": argparse.Namespace(blr=1.5e-4), "epoch": 799}, lambda x: mae_features(model, x)


UNILM_BEIT_BLOCK_KEYS = {"gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                         "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                         "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


def beit_source(layer_scale: bool = True) -> tuple[dict, Callable]:
    """microsoft/unilm beit pretraining layout (modeling_pretrain.py, use_shared_rel_pos_bias, no abs pos_embed):
    timm's Beit with a shared table has the same names; unilm also saves the index buffers, mask_token, lm_head.
    Without LayerScale (unilm's init_values=0) the blocks have no gamma_1/gamma_2."""
    model = _perturbed(timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                         embed_dim=48, depth=2, num_heads=3, use_abs_pos_emb=False,
                                         use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                         init_values=0.1 if layer_scale else 0.0,
                                         num_classes=0, global_pool="avg", use_fc_norm=False))
    state = dict(model.state_dict())
    index = gen_relative_position_index((4, 4))
    assert index[0, 1:].eq(49).all() and index[1:, 0].eq(50).all() and index[0, 0] == 51  # unilm's cls rows
    state.update({"rel_pos_bias.relative_position_index": index, "mask_token": torch.randn(1, 1, 48),
                  "lm_head.weight": torch.randn(64, 48), "lm_head.bias": torch.randn(64)})
    expected = {"cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "lm_head.weight", "lm_head.bias", "rel_pos_bias.relative_position_bias_table",
                "rel_pos_bias.relative_position_index"}
    block_keys = UNILM_BEIT_BLOCK_KEYS if layer_scale else UNILM_BEIT_BLOCK_KEYS - {"gamma_1", "gamma_2"}
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in block_keys}
    assert set(state) == expected  # exactly unilm's names
    return {"model": state}, model.forward_features


def deit_source(distilled: bool, fc_norm: bool = False) -> tuple[dict, Callable]:
    """facebookresearch/deit layout (its models subclass timm's VisionTransformer): with a head (and dist_token +
    head_dist when distilled); fc_norm without a final norm is MAE's finetuned layout."""
    arch = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    kwargs = {"global_pool": "avg"} if fc_norm else {}
    model = _perturbed(timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10,
                                         **kwargs))
    state = model.state_dict()
    assert ("head_dist.weight" in state) == distilled and ("fc_norm.weight" in state) == fc_norm
    return {"model": state}, model.forward_features


SOURCES = {
    "mae": lambda: mae_source(full=False),
    "mae_full": lambda: mae_source(full=True),
    "beit": beit_source,
    "beit_no_layer_scale": lambda: beit_source(layer_scale=False),
    "deit_distilled": lambda: deit_source(distilled=True),
    "deit": lambda: deit_source(distilled=False),
    "mae_finetuned": lambda: deit_source(distilled=False, fc_norm=True),
}


@pytest.mark.parametrize("fmt", list(SOURCES))
def test_reference_checkpoint_converts_to_timm_with_the_same_features(fmt, tmp_path):
    checkpoint_file, features = SOURCES[fmt]()
    torch.save(checkpoint_file, tmp_path / "source.pth")
    out = tmp_path / "out"
    assert main([str(tmp_path / "source.pth"), "--out", str(out), "--atol", str(ATOL)]) == 0
    config = read_config(out)
    assert config["converted_from"]["format"] == fmt.removesuffix("_no_layer_scale")
    backbone = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("decoder_", "mask_token", "lm_head", "head", "rel_pos_bias")) for k in backbone)
    assert not any(k.endswith("relative_position_index") for k in backbone)
    model = load_timm(out)
    assert model.num_classes == 0
    if fmt == "deit_distilled":
        assert type(model).__name__ == "VisionTransformerDistilled" and "dist_token" in backbone
    if fmt == "beit_no_layer_scale":
        assert not any("gamma" in k for k in backbone) and config["model_kwargs"]["init_values"] == 0.0
    if fmt.startswith("beit"):
        assert type(model).__name__ == "Beit" and model.rel_pos_bias is None
        shared = checkpoint_file["model"]["rel_pos_bias.relative_position_bias_table"]
        for i in range(2):  # the shared table, copied into each block
            torch.testing.assert_close(backbone[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), features(imgs), rtol=0, atol=ATOL)


def _one_paragraph_error(text: str) -> None:
    assert "Traceback" not in text and text.strip() and "\n\n" not in text.strip()


def test_no_check_errors_are_one_paragraph(tmp_path, caplog):
    """--no-check skips the source model and the timm reload, but what cannot be converted still exits 2 with one
    paragraph: a run whose saved model config its task refuses (a real process: no traceback on stderr), a missing
    file, and with the check on a BEiT whose blocks disagree (gammas in block 0 only)."""
    tag_dir = tmp_path / "run" / "checkpoints" / "step00000001"
    tag_dir.mkdir(parents=True)
    model = {"target": "mean_color", "img_size": 30, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.save({"module": {"cls_token": torch.zeros(1, 1, 32)}, "step": 1,
                "config": {"derived": {"job": "pretrain_beit"}, "model": model}}, tag_dir / checkpoint.MODEL_STATES[0])
    proc = subprocess.run([sys.executable, "launch/convert_checkpoint.py", str(tmp_path / "run"), "--no-check",
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "model.img_size=30" in proc.stderr, proc.stderr
    _one_paragraph_error(proc.stdout + proc.stderr)

    checkpoint_file, _ = beit_source()
    del checkpoint_file["model"]["blocks.1.gamma_1"], checkpoint_file["model"]["blocks.1.gamma_2"]
    torch.save(checkpoint_file, tmp_path / "odd_beit.pth")
    for argv, message in [([str(tmp_path / "odd_beit.pth")], "does not load into timm's"),
                          ([str(tmp_path / "missing.pth"), "--no-check"], "no such file")]:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0], errors
        _one_paragraph_error(errors[0])
    assert not (tmp_path / "o").exists()


def test_heads_of_a_non_standard_width_must_be_given(tmp_path, caplog):
    model = MaskedAutoencoderViT(TINY_CFG)  # width 32: not a standard ViT's, and qkv does not tell 2 heads
    torch.save({"model": model.state_dict()}, tmp_path / "mae.pth")
    with caplog.at_level(logging.ERROR):
        assert main([str(tmp_path / "mae.pth"), "--out", str(tmp_path / "a")]) == 2
    assert "--num-heads" in caplog.text
    assert main([str(tmp_path / "mae.pth"), "--num-heads", "2", "--out", str(tmp_path / "b"), "--atol",
                 str(ATOL)]) == 0
    imgs = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_timm(tmp_path / "b").forward_features(imgs), mae_features(model, imgs),
                                   rtol=0, atol=ATOL)


def test_unknown_format_is_a_clear_error(tmp_path, caplog):
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    torch.save({"state_dict": resnet.state_dict()}, tmp_path / "resnet.pth")
    with caplog.at_level(logging.ERROR):
        assert main([str(tmp_path / "resnet.pth"), "--out", str(tmp_path / "out")]) == 2  # returned, not raised
    assert "match no known checkpoint format" in caplog.text and "resnet.pth" in caplog.text
    for fmt in ("mae", "mae_full", "beit", "deit_distilled"):
        assert f"{fmt}:" in caplog.text
    assert not (tmp_path / "out").exists()
