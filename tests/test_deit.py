"""pretrain_deit: the distillation loss against its formula computed independently, the frozen teacher (no gradient,
post-mixup input, out of DeepSpeed's module), the train/eval output contract against timm's VisionTransformerDistilled,
repeated augmentation and 3-Augment, both export round trips, and whole runs (in-process and 2-process DeepSpeed)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from finetune import backbone as bb
from launch import convert_checkpoint, pretrain_deit, teachers
from launch.jobs import JOBS
from launch.runtime.config import ConfigError
from pretrain.deit import DEIT_ARCHS, DeiTConfig, DeiTTask, Teacher, deit_encoder_features, distillation_loss
from pretrain.export import load_backbone as strict_load_backbone, save_backbone

JOB = "pretrain_deit"
# A student small enough for CPU tests: 32 px, patch 8 (16 tokens), 2 x 32.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_ARGS = [f"model.{k}={v}" for k, v in TINY.items()]
NUM_CLASSES = 3


def tiny_cfg(**kw) -> DeiTConfig:
    base = dict(TINY, num_classes=NUM_CLASSES, teacher="timm:resnet10t", teacher_weights="unused", drop_path=0.0)
    base.update(kw)
    return DeiTConfig(**base)


class FixedLogits(nn.Module):
    """A stand-in teacher: returns preset logits [N, K] and records the input it was given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.logits[: x.shape[0]] + 0 * self.weight


class FixedStudent(nn.Module):
    """A stand-in for the engine: returns preset (cls, dist) logits in train mode."""

    def __init__(self, cls: torch.Tensor, dist: torch.Tensor) -> None:
        super().__init__()
        self.cls, self.dist = cls, dist

    def forward(self, x: torch.Tensor):
        return self.cls, self.dist


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# --- the loss -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
@pytest.mark.parametrize("reduction", ["batchmean", "legacy"])
def test_soft_distillation_loss_equals_its_formula(tau, alpha, reduction):
    """The task's whole loss, (1-a) CE(cls, y) + a tau^2 KL(p_t || p_s), equals sums over probabilities in float64."""
    n, k = 6, 7
    g = torch.Generator().manual_seed(int(tau * 10 + alpha * 100))
    cls, dist, teacher = (3 * torch.randn(n, k, generator=g) for _ in range(3))
    labels = torch.randint(0, k, (n,), generator=g)
    task = DeiTTask(tiny_cfg(distill="soft", alpha=alpha, tau=tau, kl_reduction=reduction, mixup=0.0, cutmix=0.0,
                             label_smoothing=0.0, num_classes=k),
                    load_teacher=lambda cfg: Teacher(FixedLogits(teacher), (0.5,) * 3, (0.5,) * 3))
    loss, metrics = task.training_step(FixedStudent(cls, dist), {"image": torch.zeros(n, 3, 32, 32), "label": labels})

    c, s, t = (x.double().numpy() for x in (cls, dist, teacher))
    ce = -np.mean([log_softmax64(c)[i, labels[i]] for i in range(n)])
    log_pt, log_ps = log_softmax64(t / tau), log_softmax64(s / tau)
    kl_per_sample = np.array([sum(math.exp(log_pt[i, j]) * (log_pt[i, j] - log_ps[i, j]) for j in range(k))
                              for i in range(n)])
    kl = kl_per_sample.sum() / (n if reduction == "batchmean" else n * k)
    expected = (1 - alpha) * ce + alpha * tau * tau * kl
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["loss_base"] == pytest.approx(ce, rel=1e-5)
    assert metrics["loss_distill"] == pytest.approx(tau * tau * kl, rel=1e-5)


def test_hard_distillation_loss_and_paper_alphas():
    """hard: CE of the dist head against the teacher's argmax, no smoothing (the base keeps its smoothing); alpha
    defaults to the paper's 1/2 (hard) and 0.1 (soft)."""
    n, k = 8, 5
    g = torch.Generator().manual_seed(1)
    cls, dist, teacher = (2 * torch.randn(n, k, generator=g) for _ in range(3))
    labels = torch.randint(0, k, (n,), generator=g)
    smoothing = 0.1
    task = DeiTTask(tiny_cfg(distill="hard", mixup=0.0, cutmix=0.0, label_smoothing=smoothing, num_classes=k),
                    load_teacher=lambda cfg: Teacher(FixedLogits(teacher), (0.5,) * 3, (0.5,) * 3))
    assert task.alpha == 0.5 and tiny_cfg(distill="soft").distill_weight == 0.1
    loss, _ = task.training_step(FixedStudent(cls, dist), {"image": torch.zeros(n, 3, 32, 32), "label": labels})

    lc, ld = log_softmax64(cls.double().numpy()), log_softmax64(dist.double().numpy())
    hard_targets = teacher.argmax(dim=1).numpy()
    base = np.mean([-(1 - smoothing) * lc[i, labels[i]] - smoothing * lc[i].mean() for i in range(n)])
    distill = -np.mean([ld[i, hard_targets[i]] for i in range(n)])
    assert loss.item() == pytest.approx(0.5 * base + 0.5 * distill, rel=1e-5)
    assert distillation_loss(dist, teacher, "hard").item() == pytest.approx(distill, rel=1e-5)


# --- student, teacher --------------------------------------------------------------------------------------------

def tiny_cnn_teacher(num_classes: int = NUM_CLASSES, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> Teacher:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    return Teacher(model, mean, std, None, "tiny cnn")


def test_teacher_is_frozen_sees_the_mixed_images_and_stays_out_of_the_model():
    """After a real step (Mixup/CutMix on, 2 views per sample): the teacher's parameters have no gradient and did
    not change, its BatchNorm statistics did not move (eval mode), it got exactly the student's mixed input
    (re-normalised to its own mean/std), and it is neither a submodule nor in the state dict of task.model."""
    task = DeiTTask(tiny_cfg(distill="soft", repeats=2), load_teacher=lambda cfg: tiny_cnn_teacher())
    teacher = task.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_inputs = []
    task.model.patch_embed.register_forward_pre_hook(lambda m, args: student_inputs.append(args[0].detach().clone()))
    teacher_inputs = []
    teacher.register_forward_pre_hook(lambda m, args: teacher_inputs.append(args[0].detach().clone()))

    batch = task.train_collate([task.train_transform({"image": _pil(i), "cls": i % NUM_CLASSES}) for i in range(4)])
    assert batch["image"].shape == (8, 3, 32, 32) and batch["label"].tolist() == [0, 0, 1, 1, 2, 2, 0, 0]
    original = batch["image"].clone()  # timm's Mixup mixes in place
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-2)
    loss, _ = task.training_step(task.model, batch)
    loss.backward()
    optimizer.step()

    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    mixed = student_inputs[0]
    assert not torch.allclose(mixed, original)  # Mixup/CutMix happened before both models
    mean, std = torch.tensor(task.mean).view(1, 3, 1, 1), torch.tensor(task.std).view(1, 3, 1, 1)
    expected = (mixed * std + mean - 0.5) / 0.25
    torch.testing.assert_close(teacher_inputs[0], expected, rtol=1e-5, atol=1e-5)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in task.model.parameters()}
    assert not any(k.startswith("teacher") for k in task.model.state_dict())
    assert not teacher_ids & {id(p) for g in task.param_groups() for p in g["params"]}
    assert all(g["lr_scale"] == 2.0 for g in task.param_groups())  # the lr follows images (2 views per sample)
    student_only = DeiTTask(tiny_cfg(distill="soft", repeats=2)).flops_per_sample()
    assert task.flops_per_sample() > student_only > 0  # the teacher's forward is counted, per sample (2 views)


def _pil(seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_train_eval_output_contract_matches_timm():
    """Train mode: (cls, dist) logits; eval mode: their mean, equal to timm's VisionTransformerDistilled with the same
    weights; both_heads=True gives the two heads in eval."""
    task = DeiTTask(tiny_cfg(distill="hard"))
    student = task.model
    images = torch.randn(4, 3, 32, 32)
    student.train()
    out = student(images)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(4, NUM_CLASSES)] * 2
    student.eval()
    mean = student(images)
    cls, dist = student(images, both_heads=True)
    torch.testing.assert_close(mean, (cls + dist) / 2)
    reference = VisionTransformerDistilled(**TINY, num_classes=NUM_CLASSES, qkv_bias=True).eval()
    reference.load_state_dict(student.state_dict(), strict=True)
    torch.testing.assert_close(reference(images), mean)
    plain = DeiTTask(tiny_cfg(distill="none")).model.eval()
    assert plain(images).shape == (4, NUM_CLASSES) and not hasattr(plain, "dist_token")


def test_repeated_views_and_three_augment():
    from data_pipeline.transforms import RepeatedViews, ThreeAugmentTransform, flatten_views

    views = RepeatedViews(ThreeAugmentTransform(24), repeats=3)
    items = [views({"image": _pil(i), "cls": i}) for i in range(2)]
    assert items[0]["image"].shape == (3, 3, 24, 24)
    assert not torch.equal(items[0]["image"][0], items[0]["image"][1])  # independent draws
    batch = flatten_views(items)
    assert batch["image"].shape == (6, 3, 24, 24) and batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(batch["image"][3], items[1]["image"][0])


@pytest.mark.parametrize("preset", ["tiny", "deit_s16", "deit_b16", "deit3_b16"])
def test_presets_parse(preset):
    from launch.runtime import config

    cfg, _ = config.parse_args(JOB, DeiTConfig, ["--preset", preset, "teacher=timm:regnety_160",
                                                 "teacher_weights=regnety_160.pth", "data.train=s3://bucket/in1k/train"],
                               DEIT_ARCHS,
                               JOBS["pretrain_deit"].aliases)
    assert cfg.model.teacher == "timm:regnety_160"
    if preset == "deit3_b16":
        assert cfg.model.distill == "none" and cfg.model.loss == "bce" and cfg.model.augment == "3aug"
    elif preset != "tiny":
        assert cfg.model.embed_dim in (384, 768) and cfg.model.distill == "hard" and cfg.model.repeats == 3


def test_config_errors():
    with pytest.raises(ValueError, match="needs a teacher"):
        DeiTConfig(distill="hard")
    with pytest.raises(ValueError, match="teacher_weights"):
        DeiTConfig(teacher="timm:resnet18")
    with pytest.raises(ValueError, match="label_smoothing"):
        DeiTConfig(distill="none", loss="bce")
    assert DeiTConfig(distill="none").distill_weight == 0.0


# --- export ------------------------------------------------------------------------------------------------------

def test_export_round_trips(tmp_path):
    """backbone: a plain timm ViT, strict load, features = the student's without its dist token (the converter's
    check); classifier: timm's distilled DeiT with both heads, strict load, same eval logits as the student."""
    task = DeiTTask(tiny_cfg(distill="soft"))
    with torch.no_grad():
        task.model.dist_token.normal_()  # the dist token must really be left out of the backbone
    state = {f"module.{k}": v for k, v in task.model.state_dict().items()}
    images = torch.randn(2, 3, 32, 32)
    task.model.eval()

    tensors, meta = task.export(state)
    folder = save_backbone(tmp_path / "backbone", tensors, meta)
    plain = strict_load_backbone(folder).eval()
    assert type(plain) is timm.models.vision_transformer.VisionTransformer
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(images), deit_encoder_features(task.model, images))
        full = task.model.forward_features(images)
    assert not torch.allclose(plain.forward_features(images)[:, 1:], full[:, 2:])  # dist token mattered
    finetune_model, _, report = bb.load_backbone(folder, num_classes=5, global_pool="token")
    assert report.missing == ["head.weight", "head.bias"]

    tensors, meta = task.export_classifier(state)
    model = timm.create_model(meta["architecture"], pretrained=False, **meta["model_kwargs"]).eval()
    assert isinstance(model, VisionTransformerDistilled)
    model.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(images), task.model(images))
    deit_ti = DeiTTask(tiny_cfg(distill="hard", **DEIT_ARCHS["deit_ti16"], num_classes=1000))
    assert deit_ti.export_classifier(deit_ti.model.state_dict())[1]["architecture"] == "deit_tiny_distilled_patch16_224"


def test_deit3_options_train_and_export(tmp_path):
    """DeiT III: 3-Augment views, BCE on the binarised mixed targets, LayerScale and a class-free position table; the
    plain export loads strictly into timm with the same features; the classifier is timm's deit_* layout."""
    task = DeiTTask(tiny_cfg(distill="none", teacher="", teacher_weights="", loss="bce", label_smoothing=0.0,
                             augment="3aug", reprob=0.0, layer_scale=1e-4, no_embed_class=True, repeats=2, mixup=0.0,
                             cutmix=0.0))
    assert task.model.pos_embed.shape[1] == 16 and task.model.blocks[0].ls1.gamma.mean().item() == pytest.approx(1e-4)
    batch = task.train_collate([task.train_transform({"image": _pil(i), "cls": i % NUM_CLASSES}) for i in range(4)])
    logits_input = []
    task.model.head.register_forward_hook(lambda m, args, out: logits_input.append(out.detach()))
    loss, _ = task.training_step(task.model, batch)
    loss.backward()
    z = logits_input[0].double().numpy()
    y = np.eye(NUM_CLASSES)[batch["label"].numpy()]
    bce = np.mean(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * y)  # BCE with logits, mean over N x K
    assert loss.item() == pytest.approx(bce, rel=1e-5)
    tensors, meta = task.export(task.model.state_dict())
    plain = strict_load_backbone(save_backbone(tmp_path / "b", tensors, meta)).eval()
    task.model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(images), task.model.forward_features(images))
    tensors, meta = task.export_classifier(task.model.state_dict())
    model = timm.create_model(meta["architecture"], pretrained=False, **meta["model_kwargs"])
    model.load_state_dict(tensors, strict=True)


# --- whole runs ----------------------------------------------------------------------------------------------------

@pytest.fixture
def digits_like(shard_factory):
    """3-class labelled shards (train and val), 32 samples each."""
    train = shard_factory.classification(sizes=(8, 8, 8, 8), name="train", num_classes=NUM_CLASSES)
    val = shard_factory.classification(sizes=(10, 6), name="val", num_classes=NUM_CLASSES)
    return train.url, val.url


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    """A timm resnet10t with 3 classes (random weights), saved as a safetensors state dict."""
    torch.manual_seed(0)
    path = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=NUM_CLASSES).state_dict(), str(path))
    return path


def run_args(tmp_path: Path, data: tuple[str, str], *extra: str, name: str = "t") -> list[str]:
    return TINY_ARGS + [f"model.num_classes={NUM_CLASSES}", f"data.train={data[0]}", f"data.val={data[1]}",
                        "data.batch_size=8", "data.num_workers=0", "model.repeats=2", "model.mixup=0.8",
                        "model.cutmix=1.0", "optim.max_steps=4", "optim.warmup_steps=1", "log.every=2",
                        f"run.dir={tmp_path}", f"run.name={name}", *extra]


def test_job_in_process_with_a_teacher_file_and_conversion(tmp_path, digits_like, teacher_file):
    """The job end to end: a timm teacher from a weights file, soft distillation with repeats and Mixup/CutMix; the
    evaluation reports student, both heads and teacher; the teacher's top-1 equals that of the file's model; the
    checkpoint holds no teacher; exports load strictly; the converter rebuilds the task without a teacher."""
    argv = run_args(tmp_path, digits_like, "teacher=timm:resnet10t", f"teacher_weights={teacher_file}",
                    "distill=soft")
    assert pretrain_deit.main(argv) == 0
    run_dir = tmp_path / JOB / "t"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "val/top1" in r][-1]
    for key in ("val/top1", "val/top1_cls", "val/top1_dist", "val/top1_teacher", "val/top5_teacher"):
        assert 0 <= final[key] <= 100, key
    assert any("train/loss_distill" in r and "train/teacher_agreement" in r for r in rows)

    teacher = timm.create_model("resnet10t", num_classes=NUM_CLASSES)
    teacher.load_state_dict(load_file(str(teacher_file)))
    assert final["val/top1_teacher"] == pytest.approx(_top1(teacher.eval(), digits_like[1], (0.485, 0.456, 0.406),
                                                            (0.229, 0.224, 0.225)))

    ckpt = next((run_dir / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    module = torch.load(ckpt, map_location="cpu", weights_only=True)["module"]
    assert "dist_token" in module and not any("teacher" in k or k.startswith("conv1") for k in module)

    plain = strict_load_backbone(run_dir / "export")
    meta = bb.read_config(run_dir / "export" / "classifier")
    classifier = timm.create_model(meta["architecture"], pretrained=False, **meta["model_kwargs"])
    classifier.load_state_dict(load_file(str(run_dir / "export" / "classifier" / bb.WEIGHTS_NAME)), strict=True)
    assert _top1(classifier.eval(), digits_like[1]) == pytest.approx(final["val/top1"])
    # the classifier folder is timm's own: plain timm loads it, with the train set's class names
    local = timm.create_model(f"local-dir:{run_dir / 'export' / 'classifier'}", pretrained=True).eval()
    assert _top1(local, digits_like[1]) == pytest.approx(final["val/top1"])
    assert local.pretrained_cfg["label_names"] == meta["classes"] and len(meta["classes"]) == local.num_classes
    assert plain.num_classes == 0

    assert JOB in JOBS
    assert convert_checkpoint.main([str(run_dir), "--out", str(tmp_path / "converted")]) == 0
    for name in (".", "classifier"):   # the backbone, and the whole classifier too, as the run exported it
        converted = load_file(str(tmp_path / "converted" / name / bb.WEIGHTS_NAME))
        exported = load_file(str(run_dir / "export" / name / bb.WEIGHTS_NAME))
        assert converted.keys() == exported.keys() and all(torch.equal(converted[k], exported[k]) for k in exported)


def _top1(model: nn.Module, url: str, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> float:
    from data_pipeline.stream import build_stream
    from data_pipeline.transforms import ClassificationEvalTransform

    stream = build_stream(url, map_fn=ClassificationEvalTransform(32, mean=mean, std=std), batch_size=8,
                          num_workers=0, train=False)
    correct = total = 0
    with torch.no_grad():
        for batch in stream:
            keep = ~batch["is_padding"]
            correct += int((model(batch["image"][keep]).argmax(-1) == batch["label"][keep]).sum())
            total += int(keep.sum())
    return 100.0 * correct / total


def test_teacher_folder_and_its_errors(tmp_path, digits_like):
    """A finetune_cls-style export folder (a ViT classifier at another size: resized for it) is a teacher; a
    backbone without head, a class-count mismatch and a missing file are configuration errors (exit 2)."""
    meta = bb.scratch_vit_config(img_size=48, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                 class_token=True, global_pool="token", num_classes=NUM_CLASSES)
    vit = bb.create_from_config(meta)
    save_backbone(tmp_path / "vit_teacher", vit.state_dict(), meta)
    teacher = teachers.load_teacher(tiny_cfg(teacher=str(tmp_path / "vit_teacher"), teacher_weights=""))
    assert teacher.img_size == 48
    task = DeiTTask(tiny_cfg(teacher=str(tmp_path / "vit_teacher"), teacher_weights=""),
                    load_teacher=teachers.load_teacher)
    assert task.teacher_logits(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)

    headless = dict(meta, model_kwargs=dict(meta["model_kwargs"], num_classes=0))
    save_backbone(tmp_path / "headless", bb.create_from_config(headless).state_dict(), headless)
    with pytest.raises(ConfigError, match="without a classifier head"):
        teachers.load_teacher(tiny_cfg(teacher=str(tmp_path / "headless"), teacher_weights=""))
    with pytest.raises(ConfigError, match="classes"):
        teachers.load_teacher(tiny_cfg(teacher=str(tmp_path / "vit_teacher"), teacher_weights="",
                                            num_classes=4))
    argv = run_args(tmp_path, digits_like, "teacher=timm:resnet10t", f"teacher_weights={tmp_path / 'missing.pth'}")
    assert pretrain_deit.main(argv) == 2


@pytest.mark.multiproc
def test_two_rank_deepspeed_smoke(tmp_path, digits_like, teacher_file):
    """2 ranks under the deepspeed launcher, ZeRO-2, hard distillation with EMA: the run finishes, evaluates every
    head and the teacher, and its checkpoint shards hold the student only."""
    from tests.test_deepspeed_multiproc import deepspeed_launch

    deepspeed_launch("launch/pretrain_deit.py", *run_args(tmp_path, digits_like, "teacher=timm:resnet10t",
                                                          f"teacher_weights={teacher_file}", "engine.zero_stage=2",
                                                          "optim.ema_decay=0.9"))
    run_dir = tmp_path / JOB / "t"
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"val/top1", "val/top1_cls", "val/top1_dist", "val/top1_teacher", "val/top1_ema"} <= final.keys()
    module = torch.load(next((run_dir / "checkpoints").glob("step*/mp_rank_00_model_states.pt")), map_location="cpu",
                        weights_only=True)["module"]
    assert set(module) == set(DeiTTask(tiny_cfg(**{"distill": "hard"})).model.state_dict())
    assert (run_dir / "export" / "classifier" / bb.WEIGHTS_NAME).is_file()
