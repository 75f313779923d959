"""MP3 (pretrain/mp3.py): the context mask restricts every block's keys and values to the context patches, the model
without context is timm's ViT, the position metrics against hand-computed ones, the pictures, and the export: plain
timm loads it without a position table and finetune_cls adds a zero-initialised one. (The 2-step run of the job
through its launch script, conversion and feature check is tests/test_export_contract.py's.)"""
import pytest
import timm
import torch

import contracts.backbone as cb
from finetune.classification import ClassificationConfig, build_model
from pretrain.mp3 import (MP3Config, MP3Task, MP3ViT, context_from_noise, metrics_from_sums, mp3_encoder_features,
                          position_sums)
from pretrain.export import save_backbone

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)   # a 4 x 4 grid: 16 positions


def _model(**kwargs) -> MP3ViT:
    torch.manual_seed(0)
    return MP3ViT(MP3Config(**TINY, **kwargs)).eval()


def _patch(images: torch.Tensor, index: int, value: float) -> torch.Tensor:
    """A copy of images [N, 3, 16, 16] with patch `index` (row-major in the 4 x 4 grid) set to `value`."""
    out = images.clone()
    r, c = divmod(index, 4)
    out[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = value
    return out


def test_only_context_patches_are_keys():
    """Changing a patch outside the context changes its own output only (nobody attends to it); changing a context
    patch changes every patch's output. With all patches as keys the first change would reach every token."""
    model = _model(context_ratio=0.25)
    images = torch.randn(1, 3, 16, 16)
    noise = torch.rand(1, 16)
    context = context_from_noise(noise, 4)
    assert context.sum() == 4 == model.cfg.num_context
    inside, outside = int(context[0].nonzero()[0]), int((~context[0]).nonzero()[0])
    with torch.no_grad():
        base = model.forward_tokens(images, context)
        moved_outside = model.forward_tokens(_patch(images, outside, 3.0), context)
        moved_inside = model.forward_tokens(_patch(images, inside, 3.0), context)
        everyone = model.forward_tokens(_patch(images, outside, 3.0))  # no mask: plain self-attention
    changed = (moved_outside - base).abs().amax(-1)[0] > 1e-5
    assert changed.tolist() == [i == outside for i in range(16)]
    assert ((moved_inside - base).abs().amax(-1)[0] > 1e-5).all()
    assert ((everyone - model.forward_tokens(images)).abs().amax(-1)[0] > 1e-5).all()
    # forward draws the context from the noise it is given, and the logits are [N, L, L]
    logits, drawn = model(images, noise=noise)
    assert torch.equal(drawn, context) and logits.shape == (1, 16, 16)


def test_without_context_the_encoder_is_timms_vit_and_the_export_loads_in_timm(tmp_path):
    model = _model()
    task = MP3Task(MP3Config(**TINY))
    task.model = model
    tensors, meta = task.export({f"module.{k}": v for k, v in model.state_dict().items()})
    assert not any(k.startswith("pos_head") for k in tensors) and "pos_embed" not in tensors
    assert meta["model_kwargs"]["pos_embed"] == "none" and meta["model_kwargs"]["class_token"] is False
    save_backbone(tmp_path / "export", tensors, meta)
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert timm_model.pos_embed is None
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images), mp3_encoder_features(model, images))
        # finetuning adds a position table that starts at zero: the same features as the backbone without one
        added, _, report = cb.load_resampled(tmp_path / "export", pos_embed="learn")
        assert "pos_embed" in report.missing and torch.count_nonzero(added.pos_embed) == 0
        torch.testing.assert_close(added.eval().forward_features(images), timm_model.forward_features(images))
    # finetune_cls builds it so, with a trainable table and its own pooling and head
    built = build_model(ClassificationConfig(init=str(tmp_path / "export"), num_classes=3, img_size=16))
    assert built.meta["model_kwargs"]["pos_embed"] == "learn" and built.model.pos_embed.requires_grad
    assert torch.count_nonzero(built.model.pos_embed) == 0 and built.report.missing[0] == "pos_embed"
    assert built.model(images).shape == (2, 3)
    # a linear probe reads the features as they were pretrained: no table
    probe = build_model(ClassificationConfig(init=str(tmp_path / "export"), num_classes=3, img_size=16,
                                             mode="linprobe"))
    assert probe.model.pos_embed is None


def test_position_metrics_by_hand():
    """2 x 2 grid; image 0 predicts positions [0, 1, 3, 3] (patch 2 one column off), image 1 is padding."""
    logits = torch.full((2, 4, 4), -5.0)
    for i, p in enumerate([0, 1, 3, 3]):
        logits[0, i, p] = 5.0
    logits[1, :, 0] = 5.0
    context = torch.tensor([[True, False, True, False], [True, True, False, False]])
    sums = position_sums(logits, context, grid=2, keep=torch.tensor([True, False]))
    metrics = metrics_from_sums(sums, 4)
    assert metrics["pos_accuracy"] == pytest.approx(0.75) and metrics["pos_chance"] == 0.25
    assert metrics["pos_accuracy_context"] == pytest.approx(0.5)   # patches 0 (right) and 2 (wrong)
    assert metrics["pos_accuracy_masked"] == pytest.approx(1.0)    # patches 1 and 3
    assert metrics["pos_error"] == pytest.approx(0.25)             # patch 2 at (1, 0) placed at (1, 1)
    ce = torch.nn.functional.cross_entropy(logits[0], torch.arange(4))
    assert metrics["loss"] == pytest.approx(ce.item(), rel=1e-5)


def test_step_evaluation_and_pictures():
    task = MP3Task(MP3Config(**TINY, context_ratio=0.5))
    batch = {"image": torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)}
    loss, metrics = task.training_step(task.model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.5)
    assert task.model.pos_head.weight.grad is not None and metrics["pos_chance"] == 1 / 16
    padded = {**batch, "is_padding": torch.tensor([False, False, True, True])}
    first, again = task.evaluate(task.model, [padded]), task.evaluate(task.model, [padded])
    assert first == again and 0.0 <= first["pos_accuracy"] <= 1.0   # the same contexts at every evaluation
    pictures = task.images(task.model, batch)
    assert pictures["positions"].shape == (3, 256, 256) and pictures["predictions"].shape[0] == 3
    assert 0 <= pictures["positions"].min() and pictures["positions"].max() <= 1
    assert task.flops_per_sample() > 0


def test_config_errors():
    with pytest.raises(ValueError, match="context_ratio"):
        MP3Config(**TINY, context_ratio=0.01)
    with pytest.raises(ValueError, match="img_size"):
        MP3Config(img_size=18, patch_size=4, embed_dim=32, depth=2, num_heads=2)
