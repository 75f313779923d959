"""finetune_cls: layer-decay groups and the lr DeepSpeed applies to them, position-table resampling, the linear probe's
frozen trunk, and whole runs on the embedded digits (from scratch, from a real MAE export, timm architectures), with
their exports read back into timm."""
import json
import math
import statistics
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn
from timm.optim import param_groups_layer_decay

from data_pipeline.stream import build_stream
from data_pipeline.transforms import ClassificationEvalTransform
from finetune import backbone as bb
from finetune.classification import ClassificationConfig, ClassificationTask, LinearProbe, fold_batchnorm
from launch import finetune_cls, pretrain_mae
from launch.runtime import config, distributed, engine as engine_lib

ROOT = Path(__file__).resolve().parents[1]
JOB = "finetune_cls"
# A ViT small enough for CPU tests: 32 px, patch 8 (16 tokens), 2 x 32.
TINY_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
# Over the tiny preset (the embedded digits, light augmentation, conv stem for init=none), runs that take seconds
# (1,437 digits: 45 batches of 32 per epoch).
TINY_ARGS = [f"model.{k}={v}" for k, v in TINY_VIT.items()] + [
    "data.batch_size=32", "data.num_workers=0", "optim.warmup_steps=5", "log.every=10"]


def run_args(tmp_path: Path, *overrides: str, name: str = "t") -> list[str]:
    return TINY_ARGS + [f"run.dir={tmp_path}", f"run.name={name}", *overrides]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mae_export(tmp_path_factory) -> Path:
    """A real MAE backbone: 4 steps of the pretrain_mae job at 32 px (patch 8, 2 x 32) on the digits, exported."""
    runs = tmp_path_factory.mktemp("mae")
    argv = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
            "data.train=embedded:digits", "data.val=", "data.batch_size=16", "data.num_workers=0",
            "optim.max_steps=4", "optim.warmup_steps=1", "log.every=2", "log.images_every=0", "ckpt.every=0",
            f"run.dir={runs}", "run.name=mae"]
    assert pretrain_mae.main(argv) == 0
    return runs / "pretrain_mae" / "mae" / "export"


@pytest.fixture
def process_group():
    world = distributed.init()
    yield world
    distributed.shutdown(world)


def digits_eval(model: torch.nn.Module, img_size: int, mean, std) -> tuple[float, float]:
    """(top-1 %, mean cross-entropy) of `model` on embedded:digits_val, read through the project's own stream and
    eval transform in one process."""
    stream = build_stream("embedded:digits_val", map_fn=ClassificationEvalTransform(img_size, mean=mean, std=std),
                          batch_size=64, num_workers=0, train=False)
    correct = total = 0
    loss = 0.0
    model.eval()
    with torch.no_grad():
        for batch in stream:
            keep = ~batch["is_padding"]
            logits, labels = model(batch["image"][keep]), batch["label"][keep]
            correct += int((logits.argmax(dim=-1) == labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            total += int(keep.sum())
    return 100.0 * correct / total, loss / total


# --- configuration ---------------------------------------------------------------------------------------------

def test_presets_and_mode_alias():
    cfg, args = config.parse_args(JOB, ClassificationConfig, ["mode=linprobe"], aliases={"mode": "model.mode"})
    assert args.preset == "tiny" and cfg.model.mode == "linprobe" and cfg.data.train == "embedded:digits"
    cfg, args = config.parse_args(JOB, ClassificationConfig, ["run.name=x", "--preset", "linprobe",
                                                              "model.init=timm:resnet18"])  # overrides on both sides
    assert (args.preset, cfg.run.name, cfg.model.init, cfg.optim.optimizer) == ("linprobe", "x", "timm:resnet18",
                                                                                "lars")
    cfg, _ = config.parse_args(JOB, ClassificationConfig, ["--preset", "vit_b16", "data.train=s3://b/in1k/train",
                                                           "model.init=timm:vit_base_patch16_224"])
    config.resolve(cfg, job=JOB, preset="vit_b16", run_dir="r", world_size=8, batches_per_epoch=1251,
                   num_samples=None, device="cuda:0", precision="bf16")
    m, o = cfg.model, cfg.optim
    assert (m.layer_decay, m.drop_path, m.mixup, m.cutmix, m.label_smoothing, m.reprob) == (0.65, 0.1, 0.8, 1.0, 0.1,
                                                                                           0.25)
    assert m.auto_augment == "rand-m9-mstd0.5-inc1" and m.global_pool == "avg" and m.num_classes == 1000
    assert (o.base_lr, o.betas, o.weight_decay, o.epochs, o.warmup_epochs) == (5e-4, (0.9, 0.999), 0.05, 100, 5)
    assert cfg.derived.global_batch == 1024 and cfg.derived.lr == pytest.approx(2e-3)  # MAE: blr x 1024 / 256
    cfg, _ = config.parse_args(JOB, ClassificationConfig, ["--preset", "vit_b16_linprobe", "data.train=s3://b/t"])
    assert (cfg.model.mode, cfg.optim.optimizer, cfg.optim.base_lr, cfg.optim.weight_decay) == ("linprobe", "lars",
                                                                                                 0.1, 0.0)
    assert cfg.engine.zero_stage == 0 and cfg.optim.epochs == 90 and cfg.optim.warmup_epochs == 10
    for path in sorted((ROOT / "launch/presets" / JOB).glob("*.yaml")):
        items = config.load_preset(path)
        config.build(ClassificationConfig, [("data.train", "s3://b/x")] + items)  # every key valid, types right
        for key, value in items:  # none restating its default
            section, _, name = key.partition(".")
            cls = config.sections(ClassificationConfig)[section]
            default = {f.name: f.default for f in config.dataclasses.fields(cls)}[name]
            assert config.coerce(key, value, config._field_types(cls)[name]) != default, f"{path.name}: {key}"


@pytest.mark.parametrize("override,message", [
    ("model.init=/no/such/backbone", "/no/such/backbone does not exist"),
    ("model.init=timm:no_such_net", "'no_such_net' is not a timm architecture"),
    ("model.conv_stem=16,32", "needs log2(patch_size)"),
])
def test_bad_model_init_exits_2(tmp_path, caplog, override, message):
    assert finetune_cls.main(run_args(tmp_path, override)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "config error" in errors[0]


def test_lars_needs_zero_stage_0():
    with pytest.raises(config.ConfigError, match="optim.optimizer=lars needs engine.zero_stage=0"):
        config.parse_args(JOB, ClassificationConfig, ["optim.optimizer=lars", "engine.zero_stage=1"])


def test_class_count_must_match_the_dataset(tmp_path, caplog):
    assert finetune_cls.main(run_args(tmp_path, "model.num_classes=7", "optim.max_steps=1")) == 2
    assert any("10 classes in its index.json but model.num_classes=7" in r.getMessage() for r in caplog.records)


# --- layer decay -----------------------------------------------------------------------------------------------

def mae_layer_id(name: str, depth: int) -> int:
    """facebookresearch/mae util/lr_decay.py get_layer_id_for_vit."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def group_map(model: torch.nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_groups_equal_timms_and_maes():
    cfg = ClassificationConfig(layer_decay=0.65, img_size=32, depth=3, embed_dim=32, num_heads=2, patch_size=8)
    task = ClassificationTask(cfg)
    model = task.model
    ours = group_map(model, task.param_groups())
    reference = group_map(model, param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.65,
                                                         no_weight_decay_list=model.no_weight_decay()))
    assert ours == reference and len(ours) == sum(1 for p in model.parameters() if p.requires_grad)
    # MAE's own rule (global pooling): scale 0.65^(depth + 1 - layer id), no decay for 1-D, pos_embed, cls_token
    for name, p in model.named_parameters():
        scale, wd = ours[name]
        assert scale == pytest.approx(0.65 ** (cfg.depth + 1 - mae_layer_id(name, cfg.depth))), name
        assert wd == (0.0 if p.ndim == 1 or name in ("pos_embed", "cls_token") else 0.05), name
    assert ours["patch_embed.proj.weight"][0] == pytest.approx(0.65 ** 4) and ours["head.weight"] == (1.0, 0.05)
    # the known difference (finetune-anchors.md): with class-token pooling timm puts the final norm with the last
    # block, MAE at scale 1
    token = ClassificationTask(ClassificationConfig(layer_decay=0.65, global_pool="token", img_size=32, **TINY_VIT))
    assert group_map(token.model, token.param_groups())["norm.weight"][0] == pytest.approx(0.65)


def test_applied_lr_per_group_after_a_deepspeed_step(process_group):
    """ZeRO-1: the optimizer that steps has lr x lr_scale in every group, and Adam's first step moves each weight
    of a group by exactly that much."""
    torch.manual_seed(0)
    task = ClassificationTask(ClassificationConfig(layer_decay=0.5, head_init_std=0.02, img_size=32, mixup=0,
                                                   cutmix=0, drop_path=0.0, **TINY_VIT))
    names = {id(p): n for n, p in task.model.named_parameters()}
    groups = engine_lib.param_groups(task.param_groups(), weight_decay=0.0)
    scales = [g["lr_scale"] for g in groups]
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]  # ZeRO swaps in flat partitions
    assert sorted(set(scales)) == pytest.approx([0.125, 0.25, 0.5, 1.0])  # stem, 2 blocks, head
    optimizer = engine_lib.build_optimizer(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0,
                                           on_gpu=False)
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**12}
    engine = engine_lib.initialize(task.model, optimizer, ds)
    before = {k: v.clone() for k, v in engine_lib.full_state_dict(engine, True).items()}
    engine_lib.set_lr(engine.optimizer, 1e-3)
    assert engine_lib.applied_lrs(engine) == pytest.approx([1e-3 * s for s in scales])
    batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.arange(8)}
    loss, _ = task.training_step(engine, batch)
    engine.backward(loss)
    engine.step()
    after = engine_lib.full_state_dict(engine, True)
    for group, scale in zip(group_names, scales):
        for name in group:
            delta = (after[name] - before[name]).abs().flatten()
            moved = delta[delta > 0]
            assert len(moved) > 0.9 * delta.numel(), name
            assert statistics.median(moved.tolist()) == pytest.approx(1e-3 * scale, rel=1e-3), name


# --- backbones -------------------------------------------------------------------------------------------------

def test_pos_embed_resampled_to_a_new_image_size(mae_export):
    """A backbone exported at 32 px (4 x 4 tokens) loads at 48 px (6 x 6) with timm's resampling of its table."""
    table = load_file(str(mae_export / bb.WEIGHTS_NAME))["pos_embed"]  # [1, 1 + 16, 32]
    same, meta, report = bb.load_backbone(mae_export, num_classes=0)
    assert torch.equal(same.pos_embed.detach(), table) and report.resampled is None

    model, _, report = bb.load_backbone(mae_export, img_size=48, num_classes=10, global_pool="avg", fc_norm=True)
    assert report.resampled == ((4, 4), (6, 6)) and model.pos_embed.shape == (1, 1 + 36, 32)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == ["norm.bias", "norm.weight"]  # MAE: the final norm goes with global pooling
    expected = resample_abs_pos_embed(table, new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)
    # timm's own checkpoint filter on the same state dict and model gives the same table
    filtered = checkpoint_filter_fn(load_file(str(mae_export / bb.WEIGHTS_NAME)), model)
    torch.testing.assert_close(model.pos_embed.detach(), filtered["pos_embed"], rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed.detach()[:, 0], table[:, 0], rtol=0, atol=0)  # class row kept
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)


def test_scratch_backbone_options():
    """Sin-cos positions are fixed, a conv stem gives the patchify grid, and timm:NAME builds CNNs too."""
    meta = bb.scratch_vit_config(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                 class_token=False, global_pool="avg", num_classes=3, pos_embed="sincos",
                                 conv_stem=(8, 16, 24))
    model = bb.create_from_config(meta)
    assert not model.pos_embed.requires_grad and model.pos_embed.shape == (1, 16, 32)
    assert model.patch_embed.grid_size == (4, 4) and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((3, 3), (2, 2), 8), ((3, 3), (2, 2), 16),
                                                                          ((3, 3), (2, 2), 24), ((1, 1), (1, 1), 32)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
    task = ClassificationTask(ClassificationConfig(init="timm:resnet18", img_size=32, mixup=0, cutmix=0))
    assert "img_size" not in task.meta["model_kwargs"]  # a CNN takes any size
    assert task.model(torch.randn(2, 3, 32, 32)).shape == (2, 10) and task.param_groups()


# --- the linear probe ------------------------------------------------------------------------------------------

def test_linear_probe_trunk_is_frozen(tmp_path):
    """LARS probe of a conv-stem ViT (BatchNorm in its trunk): after training the trunk's weights and BatchNorm
    statistics are bit-identical to the initial ones, and the export (BN folded into the head) is a timm model."""
    probe_args = ["mode=linprobe", "model.conv_stem=8,16,24", "optim.optimizer=lars", "engine.zero_stage=0",
                  "optim.base_lr=2", "optim.weight_decay=0", "optim.max_steps=6", "optim.warmup_steps=1",
                  "data.val="]
    assert finetune_cls.main(run_args(tmp_path, *probe_args)) == 0
    cfg, _ = config.parse_args(JOB, ClassificationConfig, run_args(tmp_path, *probe_args),
                               aliases={"mode": "model.mode"})
    distributed.seed_all(cfg.run.seed)  # what the runtime does before building the task
    initial = ClassificationTask(cfg.model).model
    assert isinstance(initial, LinearProbe)
    initial.train()
    assert initial.bn.training and not initial.trunk.training
    assert not any(m.training for m in initial.trunk.modules())

    export = tmp_path / JOB / "t" / "export"
    tensors = load_file(str(export / bb.WEIGHTS_NAME))
    trunk = initial.trunk.state_dict()
    assert any("running_var" in k for k in trunk)
    for key, value in trunk.items():
        assert torch.equal(tensors[key], value), key
    meta = bb.read_config(export)
    model = bb.create_from_config(meta)
    model.load_state_dict(tensors, strict=True)
    assert model.head.out_features == 10 and not torch.allclose(tensors["head.weight"], torch.zeros(1))

    # the fold: eval-mode BatchNorm + Linear equal one Linear
    probe = LinearProbe(initial.trunk, 4)
    probe.train()
    for _ in range(3):
        probe(torch.randn(6, 3, 32, 32))
    probe.eval()
    x = torch.randn(5, 3, 32, 32)
    weight, bias = fold_batchnorm(probe.head.weight, probe.head.bias, probe.bn.running_mean, probe.bn.running_var,
                                  probe.bn.eps)
    torch.testing.assert_close(probe.trunk(x) @ weight.T + bias, probe(x), rtol=1e-4, atol=1e-5)


def mae_lars_step(params: list[torch.Tensor], state: dict, lr: float, momentum: float = 0.9,
                  weight_decay: float = 0.0, trust_coefficient: float = 0.001) -> None:
    """facebookresearch/mae util/lars.py LARS.step, for one group."""
    for p in params:
        dp = p.grad
        if p.ndim > 1:  # not normalization gamma/beta or bias
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm,
                                                          one), one)
            dp = dp.mul(q)
        mu = state.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def test_probe_lars_equals_maes():
    """optim.optimizer=lars on the probe's groups steps the head as MAE's own LARS does (weight adapted, bias not)."""
    task = ClassificationTask(ClassificationConfig(mode="linprobe", img_size=32, **TINY_VIT))
    head = task.model.head
    reference = [head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()]
    groups = engine_lib.param_groups(task.param_groups(), weight_decay=0.0)
    optimizer = engine_lib.build_optimizer(groups, lr=1.6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                           on_gpu=False, name="lars", momentum=0.9)
    state: dict = {}
    for step in range(3):
        grads = [torch.randn_like(p) * 10 ** -step for p in reference]
        for p, r, g in zip((head.weight, head.bias), reference, grads):
            p.grad, r.grad = g.clone(), g.clone()
        optimizer.step()
        with torch.no_grad():
            mae_lars_step(reference, state, lr=1.6)
        torch.testing.assert_close(head.weight.detach(), reference[0].detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(head.bias.detach(), reference[1].detach(), rtol=1e-5, atol=1e-7)


# --- whole runs ------------------------------------------------------------------------------------------------

def test_finetune_from_mae_export_end_to_end(mae_export, tmp_path, caplog):
    """model.init=DIR from a real MAE export: beats chance on the digits, evaluates every epoch (EMA too), keeps the
    best checkpoint, logs to TensorBoard, and its export is a timm classifier with the reported top-1."""
    # the tiny preset evaluates every epoch and keeps the best top-1
    args = run_args(tmp_path, f"model.init={mae_export}", "optim.base_lr=0.1", "optim.epochs=2",
                    "optim.ema_decay=0.9", "model.drop_path=0")
    assert finetune_cls.main(args) == 0
    run_dir = tmp_path / JOB / "t"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "val/top1" in r]
    assert [r["step"] for r in evals] == [45, 90]  # 1,437 digits: 45 batches of 32 per epoch
    final = evals[-1]
    assert final["val/top1"] > 30.0, final  # chance is 10%
    assert final["val/top5"] >= final["val/top1"] and "val/top1_ema" in final and math.isfinite(final["val/loss"])

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for tag in ("train/loss", "train/lr", "train/top1", "val/top1", "val/top5", "val/top1_ema"):
        assert tag in events.Tags()["scalars"], tag
    image = events.Images("images/confusion_matrix")[-1]
    assert image.step == 90 and image.width > 100

    meta = bb.read_config(run_dir / "export")
    assert meta["model_kwargs"]["num_classes"] == 10 and meta["model_kwargs"]["img_size"] == 32
    assert meta["classes"] == [str(i) for i in range(10)] and meta["source"] == "finetune_cls"
    model = timm.create_model(meta["architecture"], **meta["model_kwargs"])
    model.load_state_dict(load_file(str(run_dir / "export" / bb.WEIGHTS_NAME)), strict=True)
    overlay = meta["pretrained_cfg_overlay"]
    top1, loss = digits_eval(model, 32, overlay["mean"], overlay["std"])
    assert top1 == pytest.approx(final["val/top1"]) and loss == pytest.approx(final["val/loss"], rel=1e-4)

    best = bb.read_config(run_dir / "export_best")["best"]
    assert best["metric"] == "val/top1" and best["value"] == max(r["val/top1"] for r in evals)
    assert (run_dir / "checkpoints" / "best").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000090"
    states = torch.load(next((run_dir / "checkpoints" / "best").glob("*model_states.pt")), map_location="cpu",
                        weights_only=True)
    assert states["best"] == best and "ema" in states

    # a third epoch, resumed: the EMA and the best so far come back from the checkpoint
    caplog.clear()
    assert finetune_cls.main(args + ["optim.epochs=3", "run.resume=auto"]) == 0
    assert not any("holds no EMA" in r.getMessage() for r in caplog.records)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/top1" in r]
    assert [r["step"] for r in evals] == [45, 90, 135]
    best = bb.read_config(run_dir / "export_best")["best"]
    assert best["value"] == max(r["val/top1"] for r in evals)


def test_from_scratch_simplevit_with_mixup(tmp_path):
    """model.init=none as SimpleViT (no class token, sin-cos positions) with a conv stem, Mixup/CutMix on."""
    args = run_args(tmp_path, "model.class_token=false", "model.pos_embed=sincos", "model.conv_stem=8,16,24",
                    "model.mixup=0.8", "model.cutmix=1.0", "optim.max_steps=4", "log.every=2", "data.val=")
    assert finetune_cls.main(args) == 0
    rows = [r for r in read_jsonl(tmp_path / JOB / "t" / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert all("train/top1" not in r for r in rows)  # no hard-label accuracy on mixed batches
    export = tmp_path / JOB / "t" / "export"
    meta = bb.read_config(export)
    assert meta["pos_embed"] == "sincos" and meta["embed_layer"] == {"type": "conv_stem", "channels": [8, 16, 24]}
    model = bb.create_from_config(meta)
    tensors = load_file(str(export / bb.WEIGHTS_NAME))
    torch.testing.assert_close(tensors["pos_embed"], model.pos_embed.detach(), rtol=0, atol=0)  # never trained
    model.load_state_dict(tensors, strict=True)


def test_timm_architecture_by_name(tmp_path):
    args = run_args(tmp_path, "model.init=timm:vit_tiny_patch16_224", "model.img_size=32", "optim.max_steps=2",
                    "log.every=1", "data.val=")
    assert finetune_cls.main(args) == 0
    meta = bb.read_config(tmp_path / JOB / "t" / "export")
    assert meta["architecture"] == "vit_tiny_patch16_224" and meta["model_kwargs"] == {"num_classes": 10,
                                                                                       "img_size": 32}
    model = timm.create_model(meta["architecture"], **meta["model_kwargs"])
    model.load_state_dict(load_file(str(tmp_path / JOB / "t" / "export" / bb.WEIGHTS_NAME)), strict=True)


@pytest.mark.multiproc
def test_two_rank_top1_counts_every_sample_once(tmp_path):
    """2 ranks under the deepspeed launcher, a conv-stem ViT (BatchNorm: each rank's statistics differ): the reported
    top-1 and loss (all-reduced, padding excluded, rank 0's statistics) equal the exported model's over the whole
    validation set in one process."""
    from tests.test_deepspeed_multiproc import deepspeed_launch

    deepspeed_launch("launch/finetune_cls.py", *run_args(tmp_path, "optim.max_steps=12", "optim.base_lr=0.05",
                                                         "engine.zero_stage=2"))
    run_dir = tmp_path / JOB / "t"
    final = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/top1" in r][-1]
    meta = bb.read_config(run_dir / "export")
    assert meta["embed_layer"]["type"] == "conv_stem"  # the tiny preset's stem
    model = bb.create_from_config(meta)
    model.load_state_dict(load_file(str(run_dir / "export" / bb.WEIGHTS_NAME)), strict=True)
    overlay = meta["pretrained_cfg_overlay"]
    top1, loss = digits_eval(model, 32, overlay["mean"], overlay["std"])
    assert top1 == pytest.approx(final["val/top1"]) and loss == pytest.approx(final["val/loss"], rel=1e-4)
