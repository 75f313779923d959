"""Bad configurations of every launch script exit 2 with one paragraph that names the key or path, with no
traceback and before any process group (issue 18): non-finite floats, values out of their declared range, geometry
the task's model cannot have, presets that are not YAML mappings, run names and run directories that cannot be
folders. Most cases call the script's `main(argv)` in this process with `distributed.init` replaced by a trap (a
case that got past the configuration would start a process group); a few run as real processes, whose stderr must
hold no traceback."""
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.classification import ClassificationConfig
from finetune.detr.task import DETRConfig
from finetune.ipt.task import IPTConfig
from launch import (finetune_cls, finetune_detr, finetune_ipt, pretrain_beit, pretrain_deit, pretrain_mae, pretrain_mp3,
                    train_dvae)
from launch.runtime import config, distributed
from launch.runtime.config import ConfigError
from pretrain.beit import BEiTConfig
from pretrain.deit import DeiTConfig
from pretrain.dvae import DVAEConfig
from pretrain.mae import MAEConfig
from pretrain.mp3 import MP3Config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"pretrain_mae": pretrain_mae, "pretrain_beit": pretrain_beit, "train_dvae": train_dvae,
           "pretrain_deit": pretrain_deit, "finetune_cls": finetune_cls, "finetune_detr": finetune_detr,
           "finetune_ipt": finetune_ipt, "pretrain_mp3": pretrain_mp3}
NO_TEACHER = "model.distill=none"   # DeiT's tiny preset wants a teacher; these cases are about other keys

# (script, argv, what the message must name). {tmp} is a folder holding the files of `bad_files`.
CASES = [
    # floats that are not finite: the optim.lr=nan trained with the base lr
    ("pretrain_mae", ["optim.lr=nan"], "optim.lr"),
    ("pretrain_mae", ["optim.weight_decay=nan"], "optim.weight_decay"),
    ("pretrain_mae", ["optim.eps=.inf"], "optim.eps"),
    ("train_dvae", ["model.kl_weight=nan"], "model.kl_weight"),
    ("pretrain_beit", ["model.drop_path=-.inf"], "model.drop_path"),
    ("pretrain_deit", [NO_TEACHER, "model.tau=nan"], "model.tau"),
    ("finetune_cls", ["model.label_smoothing=inf"], "model.label_smoothing"),
    ("finetune_detr", ["model.dropout=nan"], "model.dropout"),
    ("finetune_ipt", ["model.contrastive_temperature=nan"], "model.contrastive_temperature"),
    # declared ranges (tuples value by value)
    ("pretrain_mae", ["optim.betas=[2,3]"], "optim.betas"),
    ("pretrain_mae", ["engine.grad_clip=-1"], "engine.grad_clip"),
    ("pretrain_mae", ["model.mask_ratio=1.0"], "model.mask_ratio"),
    ("pretrain_deit", [NO_TEACHER, "model.crop_scale=[0.5,2]"], "model.crop_scale"),
    ("finetune_cls", ["optim.ema_decay=1"], "optim.ema_decay"),
    ("train_dvae", ["run.seed=-1"], "run.seed"),
    # geometry, checked by each task's model config
    ("pretrain_mae", ["model.patch_size=0"], "model.patch_size"),
    ("pretrain_mae", ["model.img_size=60"], "model.img_size=60"),
    ("pretrain_mae", ["model.num_heads=5"], "model.num_heads=5"),
    ("pretrain_beit", ["model.patch_size=0"], "model.patch_size"),
    ("pretrain_beit", ["model.img_size=60"], "model.img_size=60"),
    ("pretrain_beit", ["model.num_masked=1000"], "model.num_masked"),
    ("pretrain_beit", ["target=mean_color_4x4", "model.img_size=36", "model.patch_size=6"], "model.patch_size=6"),
    ("pretrain_mp3", ["context_ratio=0"], "model.context_ratio"),
    ("pretrain_mp3", ["context_ratio=0.01"], "model.context_ratio=0.01"),
    ("train_dvae", ["model.img_size=60"], "model.img_size=60"),
    ("pretrain_deit", [NO_TEACHER, "model.patch_size=0"], "model.patch_size"),
    ("pretrain_deit", [NO_TEACHER, "model.img_size=30"], "model.img_size=30"),
    ("finetune_cls", ["model.patch_size=0"], "model.patch_size"),
    ("finetune_cls", ["model.img_size=30"], "model.img_size=30"),
    ("finetune_detr", ["model.patch_size=0"], "model.patch_size"),
    ("finetune_detr", ["model.img_size=330"], "model.img_size=330"),
    ("finetune_ipt", ["model.patch_dim=0"], "model.patch_dim"),
    ("finetune_ipt", ["model.img_size=25"], "model.img_size=25"),
    # presets that are not YAML mappings
    ("pretrain_mae", ["--preset", "{tmp}/list.yaml"], "{tmp}/list.yaml"),
    ("pretrain_beit", ["--preset", "{tmp}/preset.txt"], "{tmp}/preset.txt"),
    ("finetune_cls", ["--preset", "{tmp}/broken.yaml"], "{tmp}/broken.yaml"),
    ("finetune_detr", ["--preset", "{tmp}/scalar.yaml"], "{tmp}/scalar.yaml"),
    ("finetune_ipt", ["--preset", "{tmp}/binary.yaml"], "{tmp}/binary.yaml"),
    ("train_dvae", ["--preset", "{tmp}"], "{tmp}"),
    # run names and run directories
    ("pretrain_mae", ["run.name=" + "x" * 5000], "run.name"),
    ("pretrain_beit", ["run.name=a/b"], "run.name"),
    ("pretrain_mae", ["run.dir={tmp}/file"], "run.dir={tmp}/file"),
    ("finetune_ipt", ["run.dir={tmp}/file/below"], "run.dir={tmp}/file/below"),
    ("pretrain_deit", [NO_TEACHER, "run.dir=/proc/self"], "run.dir=/proc/self"),
    ("finetune_detr", ["run.dir=/sys/kernel"], "run.dir=/sys/kernel"),
]
# real processes: one per kind of check, to show stderr holds one paragraph and no traceback
SUBPROCESS_CASES = [
    ("pretrain_mae", ["optim.lr=nan"], "optim.lr"),
    ("finetune_ipt", ["model.patch_dim=0"], "model.patch_dim"),
    ("train_dvae", ["--preset", "{tmp}/list.yaml"], "{tmp}/list.yaml"),
    ("pretrain_deit", [NO_TEACHER, "run.dir=/proc/self"], "run.dir=/proc/self"),
]


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "list.yaml").write_text("- optim.lr: 1\n- run.name: x\n")
    (tmp_path / "preset.txt").write_text("optim:\n  lr: 1.0e-3\n")
    (tmp_path / "broken.yaml").write_text("optim: [1, 2\n  lr: :\n")
    (tmp_path / "scalar.yaml").write_text("just some words\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    (tmp_path / "file").write_text("a file where a folder should be\n")
    return tmp_path


def _fill(items: list[str], tmp: Path) -> list[str]:
    return [item.replace("{tmp}", str(tmp)) for item in items]


def _one_paragraph(text: str) -> None:
    assert text.strip(), "no message"
    assert "Traceback" not in text, text
    assert "\n\n" not in text.strip(), text


@pytest.mark.parametrize("script,argv,named", CASES, ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_bad_config_exits_2_naming_the_key(script, argv, named, bad_files, caplog, monkeypatch):
    def no_process_group():
        raise AssertionError("a process group was started: the configuration was accepted")

    monkeypatch.setattr(distributed, "init", no_process_group)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert SCRIPTS[script].main(_fill(argv, bad_files)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert _fill([named], bad_files)[0] in errors[0], errors[0]
    _one_paragraph(errors[0])


@pytest.mark.parametrize("script,argv,named", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_config_in_a_real_process(script, argv, named, bad_files):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, f"launch/{script}.py", *_fill(argv, bad_files)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and _fill([named], bad_files)[0] in errors[0], proc.stderr
    _one_paragraph(proc.stderr)
    print(f"{script}: exit 2 in {elapsed:.1f} s")


# --- the declarations themselves --------------------------------------------------------------------------------

TASK_CONFIGS = [MAEConfig, BEiTConfig, DVAEConfig, DeiTConfig, ClassificationConfig, DETRConfig, IPTConfig, MP3Config]


@pytest.mark.parametrize("cls", TASK_CONFIGS + [config.RunConfig, config.OptimConfig, config.EngineConfig,
                                                config.LogConfig, config.CheckpointConfig], ids=lambda c: c.__name__)
def test_limits_name_fields_parse_and_hold_for_the_defaults(cls):
    """Every LIMITS entry is a field with a parsable range, and the defaults are inside their ranges."""
    fields = {f.name: f for f in config.dataclasses.fields(cls)}
    limits = getattr(cls, "LIMITS", {})
    assert limits, f"{cls.__name__} declares no LIMITS"
    for name, text in limits.items():
        assert name in fields, f"{cls.__name__}.LIMITS names {name}, which is not a field"
        config.Limit.parse(text)
    defaults = {name: f.default for name, f in fields.items() if f.default is not config.dataclasses.MISSING}
    assert config.section_errors("model", cls, defaults) == []


@pytest.mark.parametrize("cls", TASK_CONFIGS, ids=lambda c: c.__name__)
def test_every_number_field_of_a_task_has_a_range(cls):
    """A new int or float field of a model.* config comes with its range (or it is not checked at all)."""
    types_ = config._field_types(cls)
    numeric = [name for name, tp in types_.items()
               if any(t in (int, float) for t in (tp, *config.typing.get_args(tp)))]
    missing = sorted(set(numeric) - set(cls.LIMITS))
    assert not missing, f"{cls.__name__}: no LIMITS entry for {missing}"


def test_limits_parse_and_check():
    assert config.Limit.parse("[0, 1)").holds(0.0) and not config.Limit.parse("[0, 1)").holds(1.0)
    assert not config.Limit.parse("(0, 1]").holds(0) and config.Limit.parse("(0, 1]").holds(1)
    assert config.Limit.parse(">= 1").holds(1) and not config.Limit.parse("> 0").holds(0)
    assert config.Limit.parse("<= 2").holds(2) and not config.Limit.parse("< 2").holds(2)
    with pytest.raises(ValueError):
        config.Limit.parse("positive")
    errors = config.section_errors("optim", config.OptimConfig, {"betas": (0.9, float("nan")), "lr": -1.0,
                                                                   "eps": 1e-8})
    assert errors == ["optim.betas=[0.9, nan] must be a finite number", "optim.lr=-1.0 must be >= 0"]


def test_a_writable_run_dir_and_a_plain_name_pass(tmp_path):
    cfg, _ = config.parse_args("pretrain_mae", MAEConfig, [f"run.dir={tmp_path}/new/deeper", "run.name=ok-1.5"])
    assert cfg.run.dir == f"{tmp_path}/new/deeper" and not (tmp_path / "new").exists()  # nothing created
    with pytest.raises(ConfigError, match="run.name"):
        config.parse_args("pretrain_mae", MAEConfig, ["run.name=.."])
