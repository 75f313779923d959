"""The job configuration: presets, key=value overrides, strict errors, derived values, the DeepSpeed config."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.runtime import config
from launch.runtime.config import ConfigError, parse_args
from pretrain.mae import MAE_ARCHS, MAEConfig

ROOT = Path(__file__).resolve().parents[1]
JOB = "pretrain_mae"


def parse(*argv: str):
    return parse_args(JOB, MAEConfig, list(argv), MAE_ARCHS)


def resolved(*argv: str, world_size: int = 1, batches_per_epoch: int | None = 100, precision: str = "fp32"):
    cfg, args = parse(*argv)
    config.resolve(cfg, job=JOB, preset=args.preset, run_dir="runs/x", world_size=world_size,
                   batches_per_epoch=batches_per_epoch, num_samples=None, device="cpu", precision=precision)
    return cfg


def test_defaults_are_the_tiny_preset():
    cfg, args = parse()
    assert args.preset == "tiny" and cfg.run.name == "tiny"
    assert cfg.data.train == "embedded:photos" and cfg.data.val == "embedded:photos_val"
    assert cfg.model == MAEConfig()  # the tiny model is MAEConfig's defaults
    assert cfg.optim.max_steps > 0 and cfg.engine.grad_clip == 0.0 and cfg.engine.precision == "auto"
    assert cfg.run.resume == "none" and cfg.run.dir == "runs"


@pytest.mark.parametrize("preset,arch", [("vit_b16", "vit_b16"), ("vit_l16", "vit_l16"), ("vit_h14", "vit_h14")])
def test_paper_presets(preset, arch):
    with pytest.raises(ConfigError, match="data.train is required"):
        parse("--preset", preset)  # the paper's presets name no dataset
    cfg = resolved("--preset", preset, "data.train=s3://bucket/in1k/train", world_size=64, batches_per_epoch=312)
    for key, value in MAE_ARCHS[arch].items():
        assert getattr(cfg.model, key) == value
    assert cfg.model.img_size == 224 and cfg.model.norm_pix_loss and cfg.model.mask_ratio == 0.75
    o = cfg.optim
    assert (o.base_lr, o.weight_decay, o.betas, o.epochs, o.warmup_epochs) == (1.5e-4, 0.05, (0.9, 0.95), 800, 40)
    assert cfg.engine.precision == "auto" and cfg.engine.zero_stage in (1, 2)
    assert cfg.derived.global_batch == 4096  # 64 per rank x 64 ranks: the paper's batch
    assert cfg.derived.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert cfg.derived.total_steps == 800 * 312 and cfg.derived.warmup_steps == 40 * 312


@pytest.mark.parametrize("path", sorted((ROOT / "launch/presets" / JOB).glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_hold_only_valid_differences(path):
    """Every key of a preset exists and has the right type, and none restates the default it would override."""
    for key, value in config.load_preset(path):
        # raises on unknown keys and wrong types
        config.build(MAEConfig, [("data.train", "s3://b/x"), ("optim.max_steps", 1), (key, value)], MAE_ARCHS)
        if key == "model.arch":
            continue
        section, _, name = key.partition(".")
        cls = config.sections(MAEConfig)[section]
        default = {f.name: f.default for f in config.dataclasses.fields(cls)}[name]
        assert config.coerce(key, value, config._field_types(cls)[name]) != default, \
            f"{path.name}: {key}: {value!r} is the default"


def test_overrides_are_typed():
    cfg, _ = parse("optim.base_lr=1e-3", "optim.betas=0.8,0.9", "engine.zero_stage=3", "engine.precision=bf16",
                   "run.name=yes", "log.every=5", "optim.epochs=2", "data.val=", "model.norm_pix_loss=false")
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.engine.zero_stage == 3 and cfg.engine.precision == "bf16"
    assert cfg.run.name == "yes"  # str fields take the text as typed (YAML would read a boolean)
    assert cfg.log.every == 5 and cfg.optim.epochs == 2.0 and cfg.data.val == ""
    assert cfg.model.norm_pix_loss is False
    cfg, _ = parse("optim.betas=[0.5, 0.6]", "optim.warmup_steps=1e2")
    assert cfg.optim.betas == (0.5, 0.6) and cfg.optim.warmup_steps == 100


def test_later_values_win_and_arch_expands_in_place():
    cfg, _ = parse("model.arch=vit_l16", "model.depth=2", "model.img_size=32")
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.img_size) == (1024, 2, 32)
    cfg, _ = parse("model.depth=2", "model.arch=vit_b16")
    assert cfg.model.depth == 12
    with pytest.raises(ConfigError, match="vit_b16"):
        parse("model.arch=vit_x")


@pytest.mark.parametrize("override,message", [
    ("optim.bse_lr=1", "did you mean optim.base_lr"),
    ("optimizer.base_lr=1", "did you mean optim.base_lr"),
    ("engine.zero_stage=5", "expected 0 | 1 | 2 | 3"),
    ("engine.precision=fp8", "expected 'auto' | 'bf16' | 'fp16' | 'fp32'"),
    ("optim.base_lr=fast", "expected float"),
    ("log.every=1.5", "expected int"),
    ("model.norm_pix_loss=2", "expected bool"),
    ("optim.betas=0.9", "expected list of float"),
    ("optim.betas=0.9,0.8,0.7", "expected 2 values"),
    ("data.mode=sometimes", "data.mode must be one of"),
    ("data.batch_size=0", "data.batch_size"),
    ("optim.max_steps=-1", "must be >= 0"),
    ("optim", "not a key=value override"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        parse(override)


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as info:
        parse("optim.bse_lr=1", "log.every=x")
    assert "optim.base_lr" in str(info.value) and "log.every" in str(info.value)


def test_missing_local_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse(f"data.train={tmp_path}/nothing")
    with pytest.raises(ConfigError, match="does not exist"):
        parse(f"data.val={tmp_path}/nothing/train-{{000000..000003}}.tar")
    parse("data.train=s3://bucket/train", "data.val=")  # remote URLs are checked when the stream opens them


def test_unknown_preset_suggests_one():
    with pytest.raises(ConfigError, match="did you mean vit_b16"):
        parse("--preset", "vit_b61")


def test_preset_from_a_run_config(tmp_path):
    """A run's config.yaml (with its derived section) is a valid preset: the same run again."""
    cfg = resolved("optim.max_steps=7", "run.name=again")
    path = tmp_path / "config.yaml"
    path.write_text(config.dump_yaml(cfg))
    again, args = parse("--preset", str(path))
    assert again.optim.max_steps == 7 and again.run.name == "again" and again.derived is None
    assert args.preset == str(path)


def test_lr_scaling_rule():
    cfg = resolved("data.batch_size=64", "engine.grad_accum=2", "optim.base_lr=1e-4", world_size=4)
    assert cfg.derived.global_batch == 64 * 2 * 4
    assert cfg.derived.lr == pytest.approx(1e-4 * 512 / 256)
    cfg = resolved("optim.lr=3e-4", world_size=4)  # an absolute lr wins
    assert cfg.derived.lr == 3e-4


def test_epochs_convert_with_the_stream():
    cfg = resolved("optim.max_steps=0", "optim.epochs=3", "optim.warmup_steps=0", "optim.warmup_epochs=1",
                   "engine.grad_accum=2", batches_per_epoch=10)
    assert cfg.derived.total_steps == 15 and cfg.derived.warmup_steps == 5
    with pytest.raises(ConfigError, match="epoch length"):
        resolved("optim.max_steps=0", "optim.epochs=3", batches_per_epoch=None)


def test_deepspeed_config_pins_defaults():
    cfg = resolved("data.batch_size=8", "engine.grad_accum=4", "engine.zero_stage=2", world_size=2, precision="bf16")
    ds = config.deepspeed_config(cfg, on_gpu=False)
    assert ds["gradient_clipping"] == 0.0  # written explicitly: DeepSpeed's own default is 1.0 (PR #8068)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["data_types"] == {"grad_accum_dtype": "fp32", "buffer_dtype": "bf16"}   # buffers follow the weights
    assert ds["zero_optimization"]["stage"] == 2
    assert "scheduler" not in ds and "optimizer" not in ds and ds["steps_per_print"] >= 10**9
    ds = config.deepspeed_config(resolved("engine.grad_clip=1.5"), on_gpu=False)
    assert ds["gradient_clipping"] == 1.5 and not ds["bf16"]["enabled"]


def test_precision_auto():
    assert config.resolve_precision("auto", on_gpu=False, bf16_supported=False) == "fp32"
    assert config.resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    assert config.resolve_precision("auto", on_gpu=True, bf16_supported=False) == "fp16"
    assert config.resolve_precision("fp16", on_gpu=False, bf16_supported=False) == "fp16"


def test_deepspeed_config_file_merges(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000, "stage": 1},
                                "train_micro_batch_size_per_gpu": 32, "fp16": {"loss_scale_window": 100},
                                "activation_checkpointing": {"partition_activations": False}}))
    cfg, args = parse("--deepspeed_config", str(path), "engine.zero_stage=1", "data.batch_size=32")
    config.resolve(cfg, job=JOB, preset="tiny", run_dir="x", world_size=1, batches_per_epoch=10, num_samples=None,
                   device="cpu", precision="fp32")
    merged = config.deep_merge(config.deepspeed_config(cfg, on_gpu=False), args.deepspeed_config)
    assert merged["zero_optimization"]["stage"] == 1 and merged["zero_optimization"]["reduce_bucket_size"] == 1000
    assert merged["zero_optimization"]["contiguous_gradients"] is False  # deep: the generated keys stay
    assert merged["zero_optimization"]["allgather_bucket_size"] == int(5e8)
    # contiguous gradient buffers and overlapped communication are GPU matters (bench/RESULTS.md: a copy on a CPU)
    on_gpu = config.deepspeed_config(cfg, on_gpu=True)["zero_optimization"]
    assert on_gpu["contiguous_gradients"] is True and on_gpu["overlap_comm"] is True
    assert merged["fp16"]["loss_scale_window"] == 100 and merged["fp16"]["enabled"] is False
    assert merged["activation_checkpointing"] == {"partition_activations": False}
    assert merged["gradient_clipping"] == 0.0 and merged["data_types"]["grad_accum_dtype"] == "fp32"


@pytest.mark.parametrize("user,message", [
    ({"train_micro_batch_size_per_gpu": 4}, "set data.batch_size instead"),
    ({"gradient_accumulation_steps": 2}, "set engine.grad_accum instead"),
    ({"zero_optimization": {"stage": 3}}, "set engine.zero_stage instead"),
    ({"gradient_clipping": 1.0}, "set engine.grad_clip instead"),
    ({"bf16": {"enabled": True}}, "set engine.precision instead"),
    ({"train_batch_size": 256}, "train_batch_size"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' block"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer' block"),
])
def test_deepspeed_config_cannot_contradict_the_job(tmp_path, user, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=message):
        parse("--deepspeed_config", str(path))


def test_deepspeed_config_file_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse("--deepspeed_config", str(path))
    with pytest.raises(ConfigError, match="no such file"):
        parse("--deepspeed_config", str(tmp_path / "missing.json"))


def test_local_rank_is_accepted():
    _, args = parse("--local_rank=1", "log.every=3")
    assert args.local_rank == 1
    cfg, args = parse("--local_rank", "0")
    assert args.local_rank == 0


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as info:
        parse("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in ("optim.base_lr", "engine.zero_stage", "data.train", "model.mask_ratio", "model.arch", "ckpt.keep"):
        assert key in out


def test_config_round_trips_through_yaml():
    cfg = resolved()
    tree = yaml.safe_load(config.dump_yaml(cfg))
    assert tree["optim"]["betas"] == [0.9, 0.95] and tree["derived"]["world_size"] == 1
    assert set(tree) == {"run", "data", "model", "optim", "engine", "log", "ckpt", "derived"}


def test_cli_unknown_key_exits_2_fast():
    """The real script: exit code 2, the suggestion, no traceback, before DeepSpeed is even imported, < 5 s.

    Nearly all of that time is importing torch and timm (the task's config class lives with its model); on a machine
    busy with other work the limit is "no more than importing the task, plus one second".
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "launch/pretrain_mae.py", "optim.bse_lr=1"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    messages = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert any("optim.base_lr" in line for line in messages) and "Traceback" not in proc.stderr + proc.stdout
    assert len(messages) <= 3, messages  # one paragraph
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "deepspeed" not in imported and "launch.runtime.loop" in imported
    if elapsed >= 5.0:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import pretrain.mae"], cwd=ROOT, env=env, check=True, timeout=60)
        baseline = time.perf_counter() - t0
        assert elapsed < baseline + 1.0, f"config error took {elapsed:.1f} s, importing the task {baseline:.1f} s"


def test_cli_wrong_type_exits_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "launch/pretrain_mae.py", "engine.zero_stage=two"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "engine.zero_stage" in proc.stderr and "Traceback" not in proc.stderr
