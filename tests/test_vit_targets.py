"""ViT's masked patch prediction targets in pretrain_beit (pretrain/beit.py): the 4x4 downsized patch in 3-bit colours
and the L2 regression of the pixels, against hand-computed targets and losses; the mean colour is tests/test_beit.py's."""
import math

import pytest
import torch
from PIL import Image

from pretrain.beit import BEiTConfig, BEiTTask, color_targets, mean_color_targets
from pretrain.masking import MASK_TOKEN, VISIBLE

TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)   # a 2 x 2 grid


def test_4x4_colour_targets_by_hand():
    """Patch 8 px: cells of 2 x 2 pixels, row-major inside the patch, r*64 + g*8 + b with 3 bits per channel."""
    pixels = torch.zeros(3, 16, 16)
    pixels[0, 0:2, 0:2] = 1.0            # patch 0, cell 0: red at its maximum -> 7 * 64
    pixels[1, 2:4, 4:6] = 0.30           # patch 0, cell (1, 2) = 6: green 0.30 -> bin 2 -> 16
    pixels[2, 6:8, 6:8] = 0.99           # patch 0, cell 15: blue -> 7
    pixels[0, 0:2, 8] = 1.0              # patch 1, cell 0: half of its pixels red -> mean 0.5 -> bin 4 -> 256
    pixels[:, 8:16, 8:16] = 0.2          # patch 3: grey 0.2 everywhere -> bin 1 per channel -> 73 in every cell
    targets = color_targets(pixels, 8, cells=4)
    assert targets.shape == (4, 16) and targets.dtype == torch.int64
    expected = torch.zeros(4, 16, dtype=torch.long)
    expected[0, 0], expected[0, 6], expected[0, 15] = 7 * 64, 2 * 8, 7
    expected[1, 0] = 4 * 64
    expected[3] = 64 + 8 + 1
    assert torch.equal(targets, expected)
    # one cell per patch is the mean colour, and cells of one pixel are the pixels' own colours
    assert torch.equal(color_targets(pixels, 8, cells=1)[:, 0], mean_color_targets(pixels, 8))
    assert torch.equal(color_targets(pixels, 4, cells=4).view(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16),
                       mean_color_targets(pixels, 1).view(16, 16))


def test_4x4_head_predicts_512_classes_for_each_of_16_cells():
    """A uniform image: every cell's class is the same; a head biased to it in the first 8 cells' blocks of 512
    outputs is right on exactly half the predictions, and an all-zero head's loss is log 512."""
    task = BEiTTask(BEiTConfig(target="mean_color_4x4", **TINY))
    assert task.model.lm_head.out_features == 16 * 512
    image = Image.new("RGB", (16, 16), (255, 0, 36))   # r 1.0 -> 7, g 0 -> 0, b 0.14 -> 1
    sample = task.eval_transform({"__key__": "k", "image": image})
    assert torch.equal(sample["color_target"], torch.full((4, 16), 7 * 64 + 1))
    batch = {k: v.unsqueeze(0) for k, v in sample.items()}
    batch["mask"] = torch.tensor([[MASK_TOKEN, VISIBLE, MASK_TOKEN, VISIBLE]], dtype=torch.int8)
    head = task.model.lm_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        assert task.evaluate(task.model, [batch])["loss"] == pytest.approx(math.log(512), rel=1e-5)
        for cell in range(8):
            head.bias[cell * 512 + 7 * 64 + 1] = 10.0
    loss, metrics = task.training_step(task.model, batch)
    assert metrics["mlm_accuracy"] == pytest.approx(0.5) and metrics["masked_per_image"] == 2


def test_pixels_l2_regresses_the_normalised_patch():
    """The target is the input's patch in MAE's (p, q, c) order; a zero head's loss is the mean squared target."""
    task = BEiTTask(BEiTConfig(target="pixels_l2", **TINY))
    assert task.cfg.vocab_size == 0 and task.model.lm_head.out_features == 8 * 8 * 3
    images = torch.randn(2, 3, 16, 16)
    batch = {"image": images, "mask": torch.tensor([[VISIBLE, MASK_TOKEN, VISIBLE, VISIBLE],
                                                    [VISIBLE, VISIBLE, VISIBLE, MASK_TOKEN]], dtype=torch.int8)}
    targets = task.targets(batch)
    assert targets.shape == (2, 4, 192)
    # patch 1 of image 0 is rows 0-7, columns 8-15; pixel (p, q) channel c at p * 24 + q * 3 + c
    assert targets[0, 1, 5 * 24 + 2 * 3 + 1] == images[0, 1, 5, 8 + 2]
    with torch.no_grad():
        task.model.lm_head.weight.zero_()
        task.model.lm_head.bias.zero_()
    loss, metrics = task.training_step(task.model, batch)
    chosen = torch.stack([images[0, :, 0:8, 8:16], images[1, :, 8:16, 8:16]])
    assert loss.item() == pytest.approx((chosen ** 2).mean().item(), rel=1e-5)
    assert metrics["mse"] == pytest.approx(loss.item()) and "mlm_accuracy" not in metrics
    assert task.evaluate(task.model, [batch]) == pytest.approx({"loss": loss.item(), "mse": loss.item()})
    assert task.images(task.model, batch)["predictions"].shape[0] == 3


def test_train_transform_ships_each_targets_inputs():
    image = Image.new("RGB", (20, 24), (10, 200, 30))
    four = BEiTTask(BEiTConfig(target="mean_color_4x4", **TINY)).train_transform({"__key__": "a", "image": image})
    assert four["color_target"].shape == (4, 16) and (four["mask"] != VISIBLE).sum() == 2   # 50% corrupted
    pixels = BEiTTask(BEiTConfig(target="pixels_l2", **TINY)).train_transform({"__key__": "a", "image": image})
    assert set(pixels) == {"image", "mask"}


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        BEiTConfig(target="mean_color_4x4", img_size=12, patch_size=6, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="vocab_size"):
        BEiTTask(BEiTConfig(target="pixels_l2", vocab_size=512, **TINY))
