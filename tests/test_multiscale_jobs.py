"""Multi-scale batches (data.multiscale) in every job that can take them: MAE, BEiT, SimMIM (Swin and ViT), DeiT, the
dVAE tokenizer and DETR train a step at each size after `on_multiscale`, their models unchanged at model.img_size; the
position tables at another grid are the ones the field's code gives (MAE's sin-cos formula, timm's BEiT table resize);
a full pretrain_mae run with multi-scale batches; IPT refuses with exit 2."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.beit import Beit
from torch.utils.data import default_collate

from data_pipeline.detection_transforms import DetectionTrainTransform
from launch import finetune_ipt, pretrain_mae
from pretrain.beit import BEiTConfig, BEiTTask
from pretrain.deit import DeiTConfig, DeiTTask
from pretrain.dvae import DVAEConfig, DVAETask
from pretrain.mae import MAEConfig, MAETask
from pretrain.mp3 import MP3Config, MP3Task
from pretrain.pos_embed import shared_rel_pos_bias_at, sincos_2d
from pretrain.simmim import SimMIMConfig, SimMIMTask

VIT = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2)


def sample(key: int = 1) -> dict:
    pixels = np.random.default_rng(key).integers(0, 256, (56, 48, 3), dtype=np.uint8)
    return {"__key__": f"{key:06d}", "image": Image.fromarray(pixels), "cls": key % 2}


def tasks() -> dict:
    torch.manual_seed(0)
    return {
        "mae": MAETask(MAEConfig(**VIT, depth=1, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)),
        "beit": BEiTTask(BEiTConfig(**VIT, depth=1, target="mean_color", drop_path=0.0)),
        "beit_4x4": BEiTTask(BEiTConfig(**VIT, depth=1, target="mean_color_4x4", drop_path=0.0)),
        "beit_l2": BEiTTask(BEiTConfig(**VIT, depth=1, target="pixels_l2", drop_path=0.0)),
        "simmim_swin": SimMIMTask(SimMIMConfig(backbone="swin", img_size=32, patch_size=2, embed_dim=16,
                                               depths=(1, 1), num_heads=(1, 2), window_size=4, mask_patch_size=8)),
        "simmim_vit": SimMIMTask(SimMIMConfig(backbone="vit", img_size=32, patch_size=8, embed_dim=32, depths=(1,),
                                              num_heads=(2,), mask_patch_size=16)),
        "deit": DeiTTask(DeiTConfig(**VIT, depth=1, distill="none", num_classes=2, repeats=2, mixup=0.0,
                                    cutmix=0.0)),
        "dvae": DVAETask(DVAEConfig(img_size=32, vocab_size=16, hidden=8, num_groups=2, blocks_per_group=1,
                                    decoder_init=8)),
    }


# the sizes other than model.img_size = 32 each task trains at: whole mask squares, windows that tile every stage
OTHER_SIZES = {"mae": (24, 48), "beit": (24, 48), "beit_4x4": (24, 48), "beit_l2": (24, 48), "simmim_swin": (16, 64), "simmim_vit": (48, 64), "deit": (24, 48),
               "dvae": (24, 48)}


@pytest.mark.parametrize("name", sorted(OTHER_SIZES))
def test_each_pretraining_task_trains_at_every_size(name):
    """After on_multiscale the model has the same weights and the same output at model.img_size, and a training step
    at each size (its transform's `at_size`, the task's collate) gives a finite loss and gradients."""
    task = tasks()[name]
    base = task.train_transform
    torch.manual_seed(1)
    probe = default_collate([task.eval_transform(sample(k)) for k in (1, 2)])
    task.model.eval()
    torch.manual_seed(2)
    before_state = copy.deepcopy(task.model.state_dict())
    before = task.training_step(task.model, probe)[0].detach()
    task.on_multiscale((32, *OTHER_SIZES[name]))
    after_state = task.model.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    torch.manual_seed(2)
    assert torch.allclose(task.training_step(task.model, probe)[0], before, atol=1e-6)
    task.model.train()
    collate = task.train_collate or default_collate
    for size in OTHER_SIZES[name]:
        transform = base.at_size(size)
        batch = collate([transform(sample(k)) for k in (1, 2, 3, 4)])
        assert batch["image"].shape[-1] == size
        task.model.zero_grad()
        loss, _ = task.training_step(task.model, batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.parameters())


def test_position_tables_at_another_grid_are_the_fields_own():
    """MAE: the sin-cos formula at the new grid. BEiT: timm's own resize of the shared relative table
    (`RelativePositionBias.set_window_size`), with the gradient reaching the stored table."""
    task = tasks()["mae"]
    assert torch.equal(task.model.positions(task.model.pos_embed, 36)[0], sincos_2d(32, 6, cls_token=True))
    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, use_abs_pos_emb=False,
                 use_shared_rel_pos_bias=True, num_classes=0)
    torch.nn.init.normal_(model.rel_pos_bias.relative_position_bias_table)
    table = model.rel_pos_bias.relative_position_bias_table
    assert torch.equal(shared_rel_pos_bias_at(table, 4, 4), model.rel_pos_bias())
    resized = shared_rel_pos_bias_at(table, 4, 6)
    timm_resized = copy.deepcopy(model.rel_pos_bias)
    timm_resized.set_window_size((6, 6))
    assert resized.shape == (2, 37, 37) and torch.allclose(resized, timm_resized(), atol=1e-6)
    resized.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_per_block_relative_tables_mp3_and_bad_sizes_are_refused():
    task = BEiTTask(BEiTConfig(**VIT, depth=1, target="mean_color", rel_pos_bias="layer"))
    with pytest.raises(ValueError, match="rel_pos_bias=layer"):
        task.on_multiscale((24, 32))
    with pytest.raises(ValueError, match="multiples of model.patch_size=8"):
        tasks()["mae"].on_multiscale((20, 32))
    with pytest.raises(ValueError, match="pretrain_mp3 predicts each patch's position among the 16 positions"):
        MP3Task(MP3Config(**VIT, depth=1)).on_multiscale((24, 32))


def test_detr_batches_share_one_shorter_side():
    transform = DetectionTrainTransform(scales=(24, 32), max_size=64, crop_prob=0.0).at_size(40)
    meta = {"image_id": 1, "width": 48, "height": 56, "boxes": [[4, 4, 20, 20]], "category_ids": [1]}
    for key in range(4):
        out = transform({**sample(key), "json": meta})
        assert min(out["image"].shape[-2:]) == 40 and out["target"]["boxes"].shape == (1, 4)


def test_pretrain_mae_runs_with_multiscale_batches_and_ipt_refuses(tmp_path, uneven_dataset, caplog):
    argv = [f"data.train={uneven_dataset.url}", "data.val=", "data.num_workers=0", "data.batch_size=4",
            "data.multiscale=[16,24,32]", "model.img_size=24", "model.patch_size=8", "model.embed_dim=32",
            "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
            "model.decoder_num_heads=2", "optim.max_steps=3", "optim.warmup_steps=1", "log.every=1", "ckpt.every=0",
            f"run.dir={tmp_path}", "run.name=ms"]
    assert pretrain_mae.main(argv) == 0
    assert any("multi-scale batches (size x images, base 24 px x 4): 16 px x 8, 24 px x 4, 32 px x 2" in r.message
               for r in caplog.records)
    assert finetune_ipt.main(["data.train=embedded:photos", "data.multiscale=[24,48]", f"run.dir={tmp_path}"]) == 2
    assert any("data.multiscale=[24, 48]: finetune_ipt trains on" in r.message for r in caplog.records)
