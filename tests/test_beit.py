"""BEiT: the blockwise masking generator against the published one's measured statistics, masks drawn in the data
workers, ViT's BERT-style corruption, the masked-token model, the frozen tokenizer kept out of training, exports read
back by timm (Beit and plain ViT keys), and whole runs: in-process, 2-process DeepSpeed, conversion, and a finetune of
the export with finetune_cls unchanged."""
import json
import random
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipeline.stream import build_stream
from contracts.backbone import LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME, read_config
from finetune import backbone as bb
from launch import convert_checkpoint, finetune_cls, pretrain_beit
from pretrain.beit import (BEiTConfig, BEiTForMaskedImageModeling, BEiTTask, beit_encoder_features,
                           mean_color_targets)
from pretrain.dvae import DiscreteVAE, DVAEConfig, save_tokenizer
from pretrain.export import save_backbone
from pretrain.masking import MASK_TOKEN, RANDOM_PATCH, UNCHANGED, VISIBLE, BlockMaskingGenerator, PatchCorruption

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_ARGS = [f"model.{k}={v}" for k, v in TINY.items()] + ["data.batch_size=8", "data.num_workers=0",
                                                           "optim.warmup_steps=1", "log.every=2"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """An untrained but real dVAE tokenizer (vocabulary 64, /8), saved as launch/train_dvae.py exports it."""
    torch.manual_seed(0)
    cfg = DVAEConfig(img_size=32, vocab_size=64, hidden=8, blocks_per_group=1, decoder_init=8)
    return save_tokenizer(tmp_path_factory.mktemp("tok"), DiscreteVAE(cfg))


@pytest.fixture
def shards(shard_factory):
    """4 shards x 8 random 48-px PNG photographs."""
    return shard_factory.write([[shard_factory.sample(f"{s * 8 + i:06d}", size=48) for i in range(8)]
                                for s in range(4)], name="photos")


# --- masking ---------------------------------------------------------------------------------------------------

def test_blockwise_masking_matches_the_published_generator_statistics():
    """unilm's MaskingGenerator((14, 14), 75, 16, None, 0.3), 20k draws: mean 74.47 (std 0.99), never above 75,
    exactly 75 in 66.6% of draws, P(masked) ~0.72 at the centre and ~0.04 in a corner."""
    generator = BlockMaskingGenerator((14, 14))
    assert (generator.num_masked, generator.min_block, generator.max_block) == (75, 16, 75)
    rng = random.Random(1)
    masks = torch.stack([generator(rng) for _ in range(3000)]).float()
    counts = masks.sum(dim=(1, 2))
    assert counts.max() <= 75
    assert abs(counts.mean().item() - 74.47) < 0.12
    assert abs((counts == 75).float().mean().item() - 0.666) < 0.04
    frequency = masks.mean(dim=0)
    centre = frequency[6:8, 6:8].mean().item()
    corners = torch.stack([frequency[0, 0], frequency[0, -1], frequency[-1, 0], frequency[-1, -1]]).mean().item()
    assert abs(centre - 0.72) < 0.05 and corners < 0.08 and centre > 8 * corners


def test_blockwise_masking_scales_to_other_grids():
    generator = BlockMaskingGenerator((8, 8))  # 64 patches: 75/196 and 16/196 of them
    assert (generator.num_masked, generator.min_block) == (24, 5)
    rng = random.Random(0)
    counts = torch.tensor([int(generator(rng).sum()) for _ in range(500)])
    assert counts.max() <= 24 and counts.float().mean() > 22
    with pytest.raises(ValueError, match="num_masked"):
        BlockMaskingGenerator((4, 4), num_masked=16)


def test_patch_corruption_is_bert_style():
    corruption = PatchCorruption(100, ratio=0.5)
    rng = random.Random(0)
    codes = torch.stack([corruption(rng) for _ in range(400)]).long()
    assert ((codes != VISIBLE).sum(dim=1) == 50).all()
    chosen = codes[codes != VISIBLE]
    shares = [(chosen == c).float().mean().item() for c in (MASK_TOKEN, RANDOM_PATCH, UNCHANGED)]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.02)


def test_masks_are_drawn_in_the_workers_with_different_seeds(shards):
    """Two workers: the masks of their batches differ (DataLoader reseeds `random` per worker), and repeated
    epochs give new masks."""
    task = BEiTTask(BEiTConfig(target="mean_color", **TINY))
    stream = build_stream(shards.url, map_fn=task.train_transform, batch_size=4, num_workers=2, seed=0)
    masks = [batch["mask"] for batch in stream]
    assert len(masks) == 8 and all(m.shape == (4, 16) and m.dtype == torch.int8 for m in masks)
    flat = {tuple(m.flatten().tolist()) for m in masks}
    assert len(flat) == len(masks)
    stream.set_epoch(1)
    assert {tuple(b["mask"].flatten().tolist()) for b in stream}.isdisjoint(flat)


def test_eval_masks_depend_only_on_the_sample():
    from PIL import Image
    task = BEiTTask(BEiTConfig(target="mean_color", **TINY))
    image = Image.new("RGB", (40, 50), (10, 200, 30))
    first = task.eval_transform({"__key__": "k1", "image": image})
    again = task.eval_transform({"__key__": "k1", "image": image})
    other = task.eval_transform({"__key__": "k2", "image": image})
    assert torch.equal(first["mask"], again["mask"]) and not torch.equal(first["mask"], other["mask"])


def test_mean_color_targets():
    pixels = torch.zeros(3, 16, 16)
    pixels[0, :8, :8] = 1.0       # patch 0: red at its maximum -> r bin 7
    pixels[1, :8, 8:] = 0.30      # patch 1: green 0.30 -> bin 2
    pixels[2, 8:, :8] = 0.99      # patch 2: blue -> bin 7
    assert mean_color_targets(pixels, 8).tolist() == [7 * 64, 2 * 8, 7, 0]


# --- model -----------------------------------------------------------------------------------------------------

def test_masked_positions_get_the_mask_token_and_only_they_are_predicted():
    torch.manual_seed(0)
    cfg = BEiTConfig(target="mean_color", **TINY)
    model = BEiTForMaskedImageModeling(cfg, 512).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0, [1, 5]] = MASK_TOKEN
    mask[1, 3] = UNCHANGED
    tokens = model.embed(images, mask)  # no absolute positions in the default: the mask token itself
    patches = model.patch_embed(images)
    torch.testing.assert_close(tokens[0, 1 + 1], model.mask_token[0, 0])
    torch.testing.assert_close(tokens[0, 1 + 0], patches[0, 0])
    torch.testing.assert_close(tokens[1, 1 + 3], patches[1, 3])  # unchanged but predicted
    assert model(images, mask).shape == (3, 512)


def test_unilm_initialisation():
    model = BEiTForMaskedImageModeling(BEiTConfig(target="mean_color", **TINY), 512)
    assert model.cls_token.abs().max() <= 0.02 and model.mask_token.abs().max() <= 0.02
    assert model.blocks[0].attn.qkv.weight.abs().max() <= 0.02
    assert model.blocks[1].mlp.fc2.weight.abs().max() <= 0.02 / 2 + 1e-7  # / sqrt(2 * 2)
    assert torch.all(model.blocks[0].gamma_1 == 0.1)


def test_tokenizer_is_frozen_and_never_receives_gradients(tokenizer_dir):
    task = BEiTTask(BEiTConfig(tokenizer=str(tokenizer_dir), **TINY))
    assert task.cfg.vocab_size == 64 and task.model.lm_head.out_features == 64
    assert not any(p is q for p in task.model.parameters() for q in task.tokenizer.parameters())
    assert not task.tokenizer.training and not any(p.requires_grad for p in task.tokenizer.parameters())
    pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
    batch = {"image": torch.randn(2, 3, 32, 32), "tokenizer_image": pixels,
             "mask": task.train_transform.mask().flatten().repeat(2, 1).to(torch.int8)}
    before = {k: v.clone() for k, v in task.tokenizer.state_dict().items()}
    loss, metrics = task.training_step(task.model, batch)
    loss.backward()
    assert pixels.grad is None and all(p.grad is None for p in task.tokenizer.parameters())
    assert task.model.lm_head.weight.grad is not None and 0.0 <= metrics["mlm_accuracy"] <= 1.0
    assert all(torch.equal(before[k], v) for k, v in task.tokenizer.state_dict().items())
    codes = task.targets(batch)
    assert codes.shape == (2, 16) and codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 64


def test_missing_tokenizer_is_a_config_error(tmp_path, caplog):
    assert pretrain_beit.main(TINY_ARGS + [f"run.dir={tmp_path}"]) == 2
    assert "train_dvae" in caplog.text and "Traceback" not in caplog.text
    assert pretrain_beit.main(TINY_ARGS + [f"run.dir={tmp_path}", f"tokenizer={tmp_path / 'nope'}"]) == 2
    assert "does not exist" in caplog.text


# --- export ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [dict(rel_pos_bias="shared"), dict(rel_pos_bias="layer", abs_pos_emb=True),
                                     dict(rel_pos_bias="none", abs_pos_emb=True),
                                     dict(rel_pos_bias="none", abs_pos_emb=True, layer_scale=0.0),
                                     # no LayerScale with relative bias: timm's Beit must not create gammas
                                     dict(rel_pos_bias="shared", layer_scale=0.0),
                                     dict(rel_pos_bias="layer", layer_scale=0.0)])
def test_export_loads_strictly_into_timm_with_equal_features(variant, tmp_path):
    torch.manual_seed(0)
    task = BEiTTask(BEiTConfig(target="mean_color", **TINY, **variant))
    with torch.no_grad():  # away from the init, so that a wrongly mapped table or bias shows
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tensors, meta = task.export({f"module.{k}": v for k, v in task.model.state_dict().items()})
    expected = "vit" if variant["rel_pos_bias"] == "none" else "beit"
    assert meta["architecture"].startswith(expected)
    assert not any(k.startswith(("mask_token", "lm_head", "rel_pos_bias")) for k in tensors)
    model = timm.create_model(meta["architecture"], pretrained=False, **meta["model_kwargs"]).eval()
    model.load_state_dict(tensors, strict=True)
    images = torch.randn(2, 3, 32, 32)
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), beit_encoder_features(task.model, images))
    # finetune.backbone (finetune_cls, DETR, IPT) reads it too, at another image size
    save_backbone(tmp_path, tensors, meta)
    finetune_model, _, report = bb.load_backbone(tmp_path, img_size=48, num_classes=3)
    assert finetune_model(torch.randn(1, 3, 48, 48)).shape == (1, 3) and report.missing == ["head.weight", "head.bias"]


def test_export_keys_vit_needs_no_relative_bias():
    with pytest.raises(ValueError, match="rel_pos_bias=none"):
        BEiTConfig(export_keys="vit")


# --- runs ------------------------------------------------------------------------------------------------------

def test_job_with_tokenizer_end_to_end_then_finetune(tokenizer_dir, shards, tmp_path):
    args = TINY_ARGS + [f"tokenizer={tokenizer_dir}", f"data.train={shards.url}", f"data.val={shards.url}",
                        "optim.max_steps=4", "log.images_every=4", "ckpt.every=0", f"run.dir={tmp_path}",
                        "run.name=b"]
    assert pretrain_beit.main(args) == 0
    run = tmp_path / "pretrain_beit" / "b"
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4] and "train/mlm_accuracy" in train[-1]
    assert train[-1]["train/masked_per_image"] == pytest.approx(6.0, abs=1.0)  # 75/196 of 16 patches, in blocks
    final = rows[-1]
    assert {"val/loss", "val/mlm_accuracy"} <= set(final)
    events = EventAccumulator(str(run / "tb")).Reload()
    assert "images/predictions" in events.Tags()["images"] and "val/mlm_accuracy" in events.Tags()["scalars"]
    meta = read_config(run / "export")
    assert meta["architecture"].startswith("beit") and meta["source"] == "beit"

    # finetune_cls takes the BEiT export unchanged (relative tables resized to its grid, average pooling)
    ft = ["model.img_size=48", "data.batch_size=16", "data.num_workers=0", "optim.max_steps=3",
          "optim.warmup_steps=1", "log.every=1", f"model.init={run / 'export'}", f"run.dir={tmp_path}",
          "run.name=ft"]
    assert finetune_cls.main(ft) == 0
    rows = read_jsonl(tmp_path / "finetune_cls" / "ft" / "metrics.jsonl")
    assert "val/top1" in rows[-1]


def test_mean_color_target_runs_without_a_tokenizer(shards, tmp_path):
    args = TINY_ARGS + ["target=mean_color", f"data.train={shards.url}", "data.val=", "optim.max_steps=2",
                        "ckpt.every=0", f"run.dir={tmp_path}", "run.name=mc"]
    assert pretrain_beit.main(args) == 0
    meta = read_config(tmp_path / "pretrain_beit" / "mc" / "export")
    assert meta["target"] == "mean_color" and meta["model_kwargs"]["num_classes"] == 0


def test_run_without_layer_scale_exports_and_converts(shards, tmp_path):
    """model.layer_scale=0 with the shared relative bias: the job's export and the converter's (with and without
    --no-check) load strictly into timm.create_model(architecture, **model_kwargs): no gamma_1/gamma_2 (issue 18)."""
    args = TINY_ARGS + ["target=mean_color", "model.layer_scale=0", "model.rel_pos_bias=shared",
                        f"data.train={shards.url}", "data.val=", "optim.max_steps=1", "ckpt.every=0",
                        f"run.dir={tmp_path}", "run.name=nols"]
    assert pretrain_beit.main(args) == 0
    run = tmp_path / "pretrain_beit" / "nols"
    for folder in (run / "export", tmp_path / "converted", tmp_path / "converted_nocheck"):
        if folder.name.startswith("converted"):
            extra = ["--no-check"] if folder.name.endswith("nocheck") else []
            assert convert_checkpoint.main([str(run), "--out", str(folder), *extra]) == 0
        meta = read_config(folder)
        assert meta["architecture"].startswith("beit") and meta["model_kwargs"]["init_values"] == 0.0
        tensors = load_file(str(folder / "model.safetensors"))
        assert not any("gamma" in k for k in tensors)
        model = timm.create_model(meta["architecture"], pretrained=False, **meta["model_kwargs"]).eval()
        model.load_state_dict(tensors, strict=True)
    # a backbone.json from before the fix (init_values: null) loads too
    meta = read_config(run / "export")
    meta["model_kwargs"]["init_values"] = None
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / LEGACY_CONFIG_NAME).write_text(json.dumps(meta))
    (legacy / LEGACY_WEIGHTS_NAME).write_bytes((run / "export" / "model.safetensors").read_bytes())
    bb.load_backbone(legacy)


@pytest.mark.multiproc
def test_two_ranks_deepspeed_then_convert(tokenizer_dir, shards, tmp_path):
    from test_deepspeed_multiproc import deepspeed_launch

    args = TINY_ARGS + [f"tokenizer={tokenizer_dir}", f"data.train={shards.url}", f"data.val={shards.url}",
                        "data.batch_size=4", "engine.zero_stage=2", "optim.max_steps=4", "ckpt.every=0",
                        f"run.dir={tmp_path}", "run.name=mp"]
    deepspeed_launch("launch/pretrain_beit.py", *args)
    run = tmp_path / "pretrain_beit" / "mp"
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(r["train/loss"] > 0 for r in rows)
    # the converter rebuilds the BEiT model from the saved config (no tokenizer needed) and compares features
    out = tmp_path / "converted"
    assert convert_checkpoint.main([str(run), "--out", str(out)]) == 0
    meta = read_config(out)
    assert meta["converted_from"]["job"] == "pretrain_beit" and meta["architecture"].startswith("beit")
