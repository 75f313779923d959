"""Swin and MobileViT wherever a backbone is taken: MobileViT's multi-scale batches (sizes, batch sizes, the schedule
across ranks, epochs and a resume), finetune_cls runs of a tiny Swin and of MobileViT with them, the presets, DETR
through a Swin's stages (last stage and merged pyramid) with its exports reloaded, and Swin / MobileViT teachers for
DeiT."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from contracts.backbone import save_backbone
from data_pipeline.multiscale import MultiScale, cvnets_sizes
from data_pipeline.stream import build_stream
from finetune.classification import ClassificationConfig, ClassificationTask
from finetune.detr.task import DETRConfig, DETRTask
from launch import finetune_cls, finetune_detr, teachers
from launch.runtime import config
from pretrain.deit import DeiTConfig, DeiTTask
from test_detr import coco_shards, job_args  # noqa: F401 - the module's fixture: COCO-format shards

ROOT = Path(__file__).resolve().parents[1]
# A Swin small enough for CPU tests: 32 px, 2-px patches, 3 stages of one block (widths 16-32-64), window 4.
TINY_SWIN = dict(img_size=32, patch_size=2, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4)
SWIN_ARCH = "swin_tiny_patch4_window7_224"


@pytest.fixture(scope="module")
def swin_folder(tmp_path_factory) -> Path:
    """A tiny Swin backbone folder (no head), as pretrain_simmim exports one."""
    torch.manual_seed(0)
    model = timm.create_model(SWIN_ARCH, num_classes=0, **TINY_SWIN)
    return save_backbone(tmp_path_factory.mktemp("swin") / "export", model, architecture=SWIN_ARCH,
                         model_args={**TINY_SWIN, "num_classes": 0})


# --- multi-scale batches -------------------------------------------------------------------------------------------

class SizedKeys:
    """A map function that takes a size per batch: {"image": zeros [3, s, s], "key": the sample key as an int}."""

    def __init__(self, img_size: int = 16) -> None:
        self.img_size = img_size

    def at_size(self, size: int) -> "SizedKeys":
        return SizedKeys(size)

    def __call__(self, sample: dict) -> dict:
        return {"image": torch.zeros(3, self.img_size, self.img_size), "key": torch.tensor(int(sample["__key__"]))}


def epoch_batches(url: str, epoch: int, **kw) -> list[tuple[int, list[int], list[bool]]]:
    """(image side, keys, padding flags) of every batch of one epoch of a fresh multi-scale stream."""
    args = dict(batch_size=4, num_workers=0, seed=3, multiscale=(12, 16, 24), shuffle_buffer=8)
    stream = build_stream(url, SizedKeys(), **{**args, **kw})
    stream.set_epoch(epoch)
    out = [(int(b["image"].shape[-1]), b["key"].tolist(), b["is_padding"].tolist()) for b in stream]
    assert len(out) == stream.batches_per_epoch
    return out


def test_multiscale_sizes_and_batches_follow_cvnets():
    """cvnets' MobileViT sizes and batch sizes (int(round(B * 256^2 / s^2, 2))), kept even for an even base batch;
    `batches_for` holds the samples whatever the order of the sizes in each cycle."""
    assert cvnets_sizes() == (160, 192, 256, 288, 320)
    odd = MultiScale(cvnets_sizes(), 256, 127)
    assert odd.batch_sizes == tuple(max(1, int(round(127 * 256 ** 2 / s ** 2, 2))) for s in odd.sizes)
    even = MultiScale(cvnets_sizes(), 256, 128)
    exact = [int(round(128 * 256 ** 2 / s ** 2, 2)) for s in even.sizes]
    assert all(b % 2 == 0 and 0 <= e - b <= 1 for b, e in zip(even.batch_sizes, exact))
    assert even.batch_size(256) == 128 and even.largest_batch == even.batch_size(160)
    rng = np.random.default_rng(0)
    for samples in [1, 5, 859, 860, 861] + rng.integers(1, 5000, 20).tolist():
        n = even.batches_for(samples)
        smallest_first = sorted(even.batch_sizes) * (n // 5 + 1)
        assert sum(smallest_first[:n]) >= samples > sum(smallest_first[:n - 1])  # enough in the worst order, no more
    cycles = [even.cycle(1, 2, 0, i) for i in range(4)]
    assert all(sorted(c) == sorted(even.sizes) for c in cycles) and len({tuple(c) for c in cycles}) > 1


def test_multiscale_stream_is_deterministic_per_step_and_reads_every_sample_once(uneven_dataset):
    """Each batch's size is one of the sizes with its scaled batch; the epoch reads every sample exactly once; a
    fresh stream (a resumed run) gives the same sizes and samples step by step; sizes vary across steps and epochs;
    two ranks run the same size at every step, with their DataLoader workers too."""
    ms = MultiScale((12, 16, 24), 16, 4)
    url = uneven_dataset.url
    first = epoch_batches(url, 0)
    assert first == epoch_batches(url, 0)   # same seed, same epoch: the same size and samples at every step
    for side, keys, padding in first:
        assert side in ms.sizes and len(keys) == ms.batch_size(side)
    read = Counter(k for _, keys, padding in first for k, p in zip(keys, padding) if not p)
    assert read == Counter(int(k) for k in uneven_dataset.keys)
    assert len({side for side, _, _ in first}) == 3
    second = epoch_batches(url, 1)
    assert len(second) == len(first) and [b[0] for b in second] != [b[0] for b in first]
    assert [b[0] for b in epoch_batches(url, 0, seed=4)] != [b[0] for b in first]

    ranks = [epoch_batches(url, 0, world_size=2, rank=r, num_workers=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and [b[0] for b in ranks[0]] == [b[0] for b in ranks[1]]
    assert {k for r in ranks for _, keys, pad in r for k, p in zip(keys, pad) if not p} == {
        int(k) for k in uneven_dataset.keys}


def test_multiscale_needs_a_transform_that_takes_a_size(uneven_dataset):
    with pytest.raises(ValueError, match="data.multiscale=.*at_size"):
        build_stream(uneven_dataset.url, lambda s: s, batch_size=4, num_workers=0, multiscale=(12, 16))
    with pytest.raises(ValueError, match="training streams"):
        build_stream(uneven_dataset.url, SizedKeys(), batch_size=4, num_workers=0, multiscale=(12, 16), train=False)


# --- presets and finetune_cls runs --------------------------------------------------------------------------------

def test_presets_parse():
    expected = {"swin_t224": ("timm:swin_tiny_patch4_window7_224", 0.2), "swin_b224": (
        "timm:swin_base_patch4_window7_224", 0.5)}
    for name, (init, drop_path) in expected.items():
        cfg, _ = config.parse_args("finetune_cls", ClassificationConfig, ["--preset", name, "data.train=s3://b/x"])
        assert (cfg.model.init, cfg.model.drop_path, cfg.model.layer_decay) == (init, drop_path, 1.0)
        assert cfg.optim.base_lr * 1024 / 256 == pytest.approx(1e-3) and cfg.optim.weight_decay == 0.05
    for size in ("xxs", "xs", "s"):
        cfg, _ = config.parse_args("finetune_cls", ClassificationConfig, ["--preset", f"mobilevit_{size}",
                                                                         "data.train=s3://b/x"])
        m, o, d = cfg.model, cfg.optim, cfg.data
        assert (m.init, m.img_size, m.drop_rate, m.mixup, m.cutmix, m.label_smoothing) == (
            f"timm:mobilevit_{size}", 256, 0.1, 0.0, 0.0, 0.1)
        assert (o.lr, o.min_lr, o.weight_decay, o.warmup_steps, o.epochs, o.ema_decay) == (
            2e-3, 2e-4, 0.01, 20000, 300, 0.9995)
        assert (d.multiscale, d.multiscale_base, d.batch_size) == (cvnets_sizes(), 256, 128)


def cls_run(tmp_path: Path, init: str, *extra: str) -> Path:
    argv = [f"model.init={init}", "model.img_size=32", "model.num_classes=10", "data.multiscale=[24,32,48]",
            "data.batch_size=8", "data.num_workers=0", "data.val=", "optim.max_steps=2", "optim.warmup_steps=1",
            "log.every=1", "ckpt.every=0", "ckpt.best_metric=", f"run.dir={tmp_path}", f"run.name={init[-3:]}", *extra]
    assert finetune_cls.main(argv) == 0
    return tmp_path / "finetune_cls" / init[-3:]


@pytest.fixture(scope="module")
def swin_classifier(tmp_path_factory, swin_folder) -> Path:
    """2 multi-scale steps of finetune_cls on the tiny Swin folder; its export/ (a Swin classifier)."""
    return cls_run(tmp_path_factory.mktemp("cls"), str(swin_folder)) / "export"


def test_swin_and_mobilevit_finetune_with_multiscale_batches(swin_classifier, tmp_path, caplog):
    """A tiny Swin (dynamic masks) and MobileViT-XXS each train 2 multi-scale steps; the Swin export is the same
    timm classifier as without multi-scale batches (no dynamic_img_size recorded) and loads through local-dir:."""
    kwargs = json.loads((swin_classifier / "config.json").read_text())["model_args"]
    assert "dynamic_img_size" not in kwargs and kwargs["num_classes"] == 10 and kwargs["window_size"] == 4
    model = timm.create_model(f"local-dir:{swin_classifier}", pretrained=True)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    run = cls_run(tmp_path, "timm:mobilevit_xxs", "model.drop_rate=0.1")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(steps) == 2 and all(np.isfinite(s["train/loss"]) for s in steps)
    assert any("multi-scale batches (size x images, base 32 px x 8): 24 px x 14, 32 px x 8, 48 px x 2" in r.message
               for r in caplog.records)


def test_classification_task_reads_every_size_after_on_multiscale(swin_folder):
    task = ClassificationTask(ClassificationConfig(init=str(swin_folder), img_size=32, num_classes=10, drop_path=0.0))
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    with pytest.raises(AssertionError):
        task.model(torch.randn(1, 3, 48, 48))   # a fixed-size Swin refuses another size
    task.on_multiscale((24, 48))
    assert task.model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())


# --- DETR through a feature map -----------------------------------------------------------------------------------

def test_detr_reads_a_swin_last_stage_or_merged_pyramid(swin_folder):
    small = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=5, num_classes=2)
    images, mask = torch.randn(2, 3, 40, 56), torch.zeros(2, 40, 56, dtype=torch.bool)
    mask[1, 24:] = True
    for extra, stride in ((dict(), 8), (dict(feature_stride=4), 4), (dict(neck="merge", feature_stride=4), 4)):
        task = DETRTask(DETRConfig(init=str(swin_folder), backbone="hierarchical", **small, **extra))
        feature, fmask = task.model.features(images, mask)
        assert feature.shape == (2, 32, 40 // stride, 56 // stride) and fmask.shape == feature.shape[:1] + \
            feature.shape[2:] and task.model.size_divisibility == 8
        assert task.flops_per_sample() > 0   # built again on the meta device
    with pytest.raises(ValueError, match="hierarchical"):
        DETRConfig(backbone="hierarchical", **small)
    with pytest.raises(ValueError, match="neck=merge"):
        DETRConfig(neck="merge", **small)


def test_detr_job_with_a_swin_backbone_and_its_exports_reload(tmp_path, coco_shards, swin_folder):  # noqa: F811
    from finetune.detr.detector import load_detector

    argv = job_args(tmp_path, coco_shards, f"model.init={swin_folder}", "model.backbone=hierarchical",
                    "model.neck=merge", "optim.max_steps=2", "log.every=1", "ckpt.best_metric=", "ckpt.every=0",
                    "data.val=", name="swin")
    assert finetune_detr.main(argv) == 0
    export = tmp_path / "finetune_detr" / "swin" / "export"
    backbone = timm.create_model(f"local-dir:{export}", pretrained=True)   # the finetuned Swin, strict keys
    detector = load_detector(export)
    torch.testing.assert_close(detector.model.backbone.state_dict()["layers.2.blocks.0.mlp.fc1.weight"],
                               backbone.state_dict()["layers.2.blocks.0.mlp.fc1.weight"])
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 50, 3), dtype=np.uint8))
    [found] = detector.predict([photo], threshold=0.0)
    assert len(found["scores"]) == 10 and (found["boxes"][:, 2] <= 50 + 1e-3).all()


# --- DeiT teachers ------------------------------------------------------------------------------------------------

def test_swin_and_mobilevit_teachers(swin_classifier, tmp_path):
    """A finetune_cls Swin export and timm:mobilevit_xxs with a weights file are DeiT teachers: the Swin reads its own
    32 px (the student's 48-px images are resized for it), MobileViT any size."""
    base = dict(img_size=48, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=10, drop_path=0.0)
    swin = teachers.load_teacher(DeiTConfig(**base, teacher=str(swin_classifier)))
    assert swin.img_size == 32
    task = DeiTTask(DeiTConfig(**base, teacher=str(swin_classifier)), load_teacher=teachers.load_teacher)
    assert task.teacher_logits(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    mobilevit = timm.create_model("mobilevit_xxs", num_classes=10)
    save_file(mobilevit.state_dict(), str(tmp_path / "mobilevit.safetensors"))
    teacher = teachers.load_teacher(DeiTConfig(**base, teacher="timm:mobilevit_xxs",
                                               teacher_weights=str(tmp_path / "mobilevit.safetensors")))
    assert teacher.img_size is None and teacher.model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
