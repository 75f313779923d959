"""Job configuration: one dataclass per component, YAML presets holding only differences, `key=value` overrides.

    python launch/pretrain_mae.py --preset vit_b16 data.train=s3://bucket/in1k/train optim.base_lr=1.5e-4

Every key is `section.field` (`optim.base_lr`); values are parsed with `yaml.safe_load` and checked against the
field's type (int, float, bool, str, tuples/lists of numbers, Literal choices). Unknown keys and wrong types raise
`ConfigError` with the closest valid keys; the job turns it into exit code 2 before any process group starts.

Values are then checked in one place (`section_errors`), for every section and every task's model.* alike: every
float (alone, in a tuple or optional) must be finite unless the dataclass lists the field in `NONFINITE_OK`, and a
dataclass declares each field's range in `LIMITS` ({"patch_size": ">= 1", "betas": "[0, 1)"}; a tuple's values are
checked one by one). Only then is the dataclass built, so its `__post_init__` checks the relations between fields
(img_size a multiple of patch_size, heads dividing the width) on values already in range. The run directory must be
a creatable, writable folder (`check_run_paths`), and a preset a .yaml file holding a mapping.

Derived values (world size, global batch, absolute lr, total and warmup steps) are computed once by `resolve` and
written next to the configuration (config.yaml, checkpoints). The DeepSpeed config is generated from the
resolved configuration by `deepspeed_config`; a user's `--deepspeed_config FILE` is deep-merged over it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from data_pipeline.shards import PIPE_PREFIX, redact_credentials
from data_pipeline.stream import DataConfig

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
DEFAULT_PRESET = "tiny"
REQUIRED_HINTS = {"data.train": ": a folder with index.json, a brace pattern of .tar shards or embedded:NAME "
                                "(e.g. data.train=s3://bucket/imagenet/train)"}
# The batch size the `optim.base_lr` rule is stated for (MAE: lr = blr * eff_batch_size / 256).
LR_REFERENCE_BATCH = 256
# run.name is one folder name; an earlier run is moved aside to NAME-YYYYmmdd-HHMMSS.N, which must still fit in
# NAME_MAX (255 bytes on Linux, macOS, Windows)
MAX_RUN_NAME_BYTES = 200
# the longest run directory path accepted (PATH_MAX 4096 less room for the files inside it)
MAX_RUN_DIR_BYTES = 3800
# pseudo-filesystems a run directory can never live in (/dev/shm is a real tmpfs)
SYSTEM_DIRS = ("/proc", "/sys", "/dev")
SYSTEM_DIRS_ALLOWED = ("/dev/shm",)
PRESET_SUFFIXES = (".yaml", ".yml")


class ConfigError(ValueError):
    """A configuration the job cannot run with: unknown key, wrong type, missing or contradictory values."""


class RunError(RuntimeError):
    """A failure at run time the job reports as one paragraph, exit 1, no traceback (a dataset that cannot be opened,
    a checkpoint that cannot be written)."""


@dataclass(kw_only=True)
class RunConfig:
    name: str = ""         # run directory name; "" = the preset's name (tiny, vit_b16, ...)
    dir: str = "runs"      # run directories live in <dir>/<job>/<name>/
    seed: int = 0          # rank r seeds torch/numpy/random with seed + r (the model is built with `seed` on all)
    resume: str = "none"   # "auto": latest checkpoint of this run dir (fresh start if none) | "none" | a path

    # numpy's seeds are 32-bit, and rank r seeds with seed + r
    LIMITS: ClassVar[dict[str, str]] = {"seed": "[0, 2147483647]"}


@dataclass(kw_only=True)
class OptimConfig:
    base_lr: float = 1.5e-4             # per 256 images: lr = base_lr * global batch / 256 (MAE's blr)
    lr: float = 0.0                     # absolute peak lr; 0 = derive it from base_lr
    min_lr: float = 0.0                 # absolute lr at the end of the cosine
    # after the warmup: "cosine" (half cycle from the peak to min_lr) or "multistep" (the peak times `gamma` at each
    # of `milestones`, in epochs: SimMIM's ViT-B recipe divides the lr by 10 at epoch 700 of 800)
    schedule: Literal["cosine", "multistep"] = "cosine"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    weight_decay: float = 0.05          # on the groups the task decays (a task group with weight_decay 0 stays 0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_steps: int = 0                  # optimizer steps; when > 0 it wins over `epochs`
    epochs: float = 0.0                 # converted with the stream's batches_per_epoch
    warmup_steps: int = 0               # linear warmup, optimizer steps; when > 0 it wins over `warmup_epochs`
    warmup_epochs: float = 0.0
    # adamw: torch AdamW (betas, eps); lars: timm's LARS (momentum, trust coefficient 0.001; MAE's linear probe),
    # which normalises whole tensors and so needs engine.zero_stage=0; sgd: torch SGD with momentum
    optimizer: Literal["adamw", "lars", "sgd"] = "adamw"
    momentum: float = 0.9              # lars and sgd only
    # AdamW's fused kernel (one kernel for all tensors, no per-tensor Python loop): true | false | auto (= true: CUDA
    # and CPU have it); a bool so that YAML's on/off/true/false all read as meant
    fused: Literal["auto"] | bool = "auto"
    # EMA of the weights, updated after every optimizer step (timm's ModelEmaV3 on an fp32 copy; e.g. 0.9999, DeiT's
    # 0.99996); 0 = off. Any task, ZeRO 0-3; evaluated as val/<name>_ema, checkpointed, exported to export_ema/
    ema_decay: float = 0.0

    LIMITS: ClassVar[dict[str, str]] = {
        "base_lr": ">= 0", "lr": ">= 0", "min_lr": ">= 0", "weight_decay": ">= 0", "betas": "[0, 1)", "eps": "> 0",
        "max_steps": ">= 0", "epochs": ">= 0", "warmup_steps": ">= 0", "warmup_epochs": ">= 0", "momentum": "[0, 1)",
        "ema_decay": "[0, 1)", "milestones": ">= 0", "gamma": "(0, 1]"}


@dataclass(kw_only=True)
class EngineConfig:
    # 1 = data parallel with sharded optimizer states (plain DDP-like on one rank); 16-bit precision needs >= 1
    # (DeepSpeed keeps fp32 master weights and fp32 gradient accumulation only under ZeRO)
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU (fp16 if unsupported), fp32 on CPU
    grad_accum: int = 1                 # micro-batches per optimizer step
    grad_clip: float = 0.0              # max global grad norm; 0 = off (MAE pretrains without clipping)
    # a non-finite loss on any rank: "stop" exits 1 without saving (the last checkpoint stays the newest), "skip"
    # leaves the weights unchanged for that step, counts it (train/nonfinite_skipped) and goes on
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # torch.compile of the task model's forward (DeepSpeed's engine.compile); the first steps pay for compilation
    compile: bool = False
    compile_backend: str = "inductor"   # torch.compile backend (torch._dynamo.list_backends())
    # attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU) in every timm-style
    # attention module; false = the explicit softmax(q k^T) v, for debugging or comparison
    fused_attention: bool = True

    LIMITS: ClassVar[dict[str, str]] = {"grad_accum": ">= 1", "grad_clip": ">= 0"}


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10          # steps between console lines, TensorBoard scalars and metrics.jsonl rows
    eval_every: int = 0      # steps between validations (data.val set); 0 = only at the end
    images_every: int = 0    # steps between reconstruction grids; 0 = only at the end
    eval_every_epoch: bool = False   # also validate at the end of every epoch of data.train (MAE's finetuning)

    LIMITS: ClassVar[dict[str, str]] = {"every": ">= 1", "eval_every": ">= 0", "images_every": ">= 0"}


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 1000        # steps between checkpoints; one is always written at the end
    keep: int = 3            # newest checkpoints kept; 0 = keep all
    # a validation metric ("top1" or "val/top1"); each evaluation that improves it saves checkpoints/best and
    # exports the weights to export_best/ (backbone.json records the metric and step); "" = off
    best_metric: str = ""
    best_mode: Literal["max", "min"] = "max"

    LIMITS: ClassVar[dict[str, str]] = {"every": ">= 0", "keep": ">= 0"}
    # each node keeps its own ranks' checkpoint files in its own run.dir (local disks, no shared filesystem):
    # DeepSpeed's use_node_local_storage; TensorBoard, config.yaml and exports stay with global rank 0's node.
    # Resume works across such nodes; converting needs every rank's files gathered in one directory (README)
    node_local: bool = False


@dataclass(kw_only=True)
class Derived:
    """Values computed from the configuration and the world; recorded, never set by the user."""

    job: str
    preset: str
    run_dir: str
    world_size: int
    global_batch: int        # data.batch_size * engine.grad_accum * world_size
    lr: float                # absolute peak lr
    total_steps: int         # optimizer steps
    warmup_steps: int
    batches_per_epoch: int | None    # micro-batches per rank per epoch; None when the stream has no epochs
    precision: str           # engine.precision with "auto" resolved
    device: str
    milestone_steps: tuple[int, ...] = ()   # optim.milestones converted to optimizer steps (schedule=multistep)


@dataclass(kw_only=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig
    model: Any               # the task's config dataclass (MAEConfig, ...)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    derived: Derived | None = None   # set by `resolve`

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples): YAML-, JSON- and `torch.load(weights_only=True)`-safe. Credentials
        in URLs are redacted: this is what config.yaml, TensorBoard and checkpoints record."""
        return _redacted(_plain(dataclasses.asdict(self)))


@dataclass(kw_only=True)
class ParsedArgs:
    """What the command line holds besides the job configuration."""

    preset: str
    deepspeed_config: dict[str, Any]   # the user's --deepspeed_config (merged over the generated one), or {}
    deepspeed_config_path: str
    local_rank: int | None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- schema -----------------------------------------------------------------------------------------------------

def sections(task_config: type) -> dict[str, type]:
    """Section name -> dataclass, in the order they are shown."""
    return {"run": RunConfig, "data": DataConfig, "model": task_config, "optim": OptimConfig,
            "engine": EngineConfig, "log": LogConfig, "ckpt": CheckpointConfig}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(task_config: type, archs: dict[str, dict] | None = None) -> list[str]:
    keys = [f"{name}.{f}" for name, cls in sections(task_config).items() for f in _field_types(cls)]
    if archs:
        keys.append("model.arch")
    return keys


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` (from YAML) against the field type `tp`; return it converted (int -> float, list -> tuple)."""
    if isinstance(value, CliValue):
        value = value.text if tp is str else value.parsed
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}={value!r} is not a valid value: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(key, value, option)
            except ConfigError:
                pass
        raise bad
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str):  # "0.9,0.95" or "(0.9, 0.95)" from a command line
            value = [yaml.safe_load(v) for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and Ellipsis not in args:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values ({_type_name(tp)})")
            items = [coerce(key, v, a) for v, a in zip(value, args)]
        else:
            item_type = args[0] if args else Any
            items = [coerce(key, v, item_type) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # PyYAML reads "1e3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key} is a section; set its fields ({key}.FIELD=VALUE)")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


# --- value checks every section gets ---------------------------------------------------------------------------

_LIMIT_RE = re.compile(r"^\s*(?:(>=|>|<=|<)\s*([-+.\deE]+)|([\[(])\s*([-+.\deE]+)\s*,\s*([-+.\deE]+)\s*([\])]))\s*$")


@dataclass(frozen=True)
class Limit:
    """A range from a LIMITS entry: ">= 1", "> 0", "<= 8", "[0, 1)", "(0, 1]" (interval notation)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Limit:
        m = _LIMIT_RE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not a limit ('>= 1', '> 0', '[0, 1)', ...)")
        op, bound, left, low, high, right = m.groups()
        if op:
            value = float(bound)
            if op.startswith(">"):
                return cls(low=value, low_open=op == ">", text=f"{op} {bound}")
            return cls(high=value, high_open=op == "<", text=f"{op} {bound}")
        return cls(float(low), float(high), left == "(", right == ")", f"in {left}{low}, {high}{right}")

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def _numbers(value: Any) -> list[int | float]:
    """The numbers in a field value (itself, or a tuple's / list's items); bools and None are not numbers."""
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def section_errors(section: str, cls: type, values: dict[str, Any]) -> list[str]:
    """The value errors of `values` (field -> coerced value) for the dataclass `cls` of `section`: non-finite floats
    (unless the field is in `cls.NONFINITE_OK`) and values outside the field's `cls.LIMITS` range."""
    limits: dict[str, str] = getattr(cls, "LIMITS", {})
    nonfinite_ok = getattr(cls, "NONFINITE_OK", ())
    errors = []
    for name, value in values.items():
        numbers = _numbers(value)
        key = f"{section}.{name}"
        if name not in nonfinite_ok and any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
            errors.append(f"{key}={_shown(value)} must be a finite number")
            continue
        if name in limits:
            limit = Limit.parse(limits[name])
            if not all(limit.holds(n) for n in numbers):
                each = " (each value)" if isinstance(value, (list, tuple)) else ""
                errors.append(f"{key}={_shown(value)} must be {limit.text}{each}")
    return errors


def make_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` after `section_errors`; ConfigError with every problem found (one paragraph)."""
    errors = section_errors(section, cls, values)
    if errors:
        raise ConfigError("; ".join(errors))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks (relations between fields)
        raise ConfigError(str(e)) from None
    except ArithmeticError as e:  # a check that divides by a value the LIMITS table does not bound
        raise ConfigError(f"{section}: {e} (a value out of range?)") from None


def _unknown_key(key: str, task_config: type, archs: dict | None) -> ConfigError:
    keys = valid_keys(task_config, archs)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    section = key.split(".")[0]
    if close:
        hint = "did you mean " + " or ".join(close) + "?"
    elif section in sections(task_config):
        hint = f"valid keys in {section}: " + ", ".join(k for k in keys if k.startswith(section + "."))
    else:
        hint = "sections: " + ", ".join(sections(task_config))
    return ConfigError(f"unknown key '{key}'; {hint}")


# --- presets and overrides --------------------------------------------------------------------------------------

def preset_path(job: str, preset: str) -> Path:
    """A preset name (launch/presets/<job>/<name>.yaml) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix or os.sep in preset or "/" in preset:  # a file, not a preset name
        if path.is_dir():
            raise ConfigError(f"--preset {preset}: a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"--preset {preset}: no such file")
        if path.suffix.lower() not in PRESET_SUFFIXES:
            raise ConfigError(f"--preset {preset}: not a YAML file ({' or '.join(PRESET_SUFFIXES)}); a preset is a "
                              "YAML mapping of sections (run:, data:, model:, optim: ...)")
        return path
    path = PRESETS_DIR / job / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (PRESETS_DIR / job).glob("*.yaml"))
        close = difflib.get_close_matches(preset, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"--preset {preset}: unknown preset for {job}; {hint}presets: {', '.join(names)}")
    return path


def _flatten(tree: Any, prefix: str, where: str) -> list[tuple[str, Any]]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(tree).__name__}")
    items = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        # a section (run:, optim: ...) holds a mapping; a key with a dict value at depth 2 is a type error later
        if isinstance(v, dict) and "." not in key:
            items.extend(_flatten(v, key + ".", where))
        else:
            items.append((key, v))
    return items


def load_preset(path: Path) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs of a preset file, in file order. A config.yaml of an earlier run loads too."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"--preset {path}: not valid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--preset {path}: cannot be read as text ({e})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--preset {path}: holds a YAML {type(tree).__name__}; a preset is a YAML mapping of "
                          "sections (run:, data:, model:, optim: ...)")
    tree.pop("derived", None)  # a run's config.yaml records derived values; they are recomputed
    return _flatten(tree, "", str(path))


@dataclass(frozen=True)
class CliValue:
    """A command-line value: str fields take the text as typed (`run.name=yes` stays "yes"), others the YAML."""

    text: str
    parsed: Any


def parse_override(text: str) -> tuple[str, CliValue]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"'{text}' is not a key=value override (e.g. optim.base_lr=1.5e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), CliValue(raw, value)


def build(task_config: type, items: list[tuple[str, Any]], archs: dict[str, dict] | None = None) -> JobConfig:
    """JobConfig from defaults updated by `items` (dotted key, value), later items winning.

    `model.arch=NAME` (when the job has named architectures) expands to that architecture's model fields at the
    point where it appears, so later `model.*` items still override it.
    """
    schema = sections(task_config)
    types_ = {name: _field_types(cls) for name, cls in schema.items()}
    values: dict[str, dict[str, Any]] = {name: {} for name in schema}
    errors: list[str] = []
    for key, value in items:
        section, _, name = key.partition(".")
        try:
            if key == "model.arch" and archs:
                if isinstance(value, CliValue):
                    value = value.text
                if value not in archs:
                    raise ConfigError(f"model.arch={value!r} is not a known architecture: {', '.join(archs)}")
                for k, v in archs[value].items():
                    values["model"][k] = coerce(f"model.{k}", v, types_["model"][k])
                continue
            if section not in schema or name not in types_[section]:
                raise _unknown_key(key, task_config, archs)
            values[section][name] = coerce(key, value, types_[section][name])
        except ConfigError as e:
            errors.append(str(e))
    parts = {}
    for name, cls in schema.items():
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values[name] and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            errors.extend(f"{name}.{m} is required" + REQUIRED_HINTS.get(f"{name}.{m}", "") for m in missing)
            continue
        try:
            parts[name] = make_section(name, cls, values[name])
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    cfg = JobConfig(**parts)
    check(cfg)
    return cfg


def check(cfg: JobConfig) -> None:
    """Value checks that need no world: ranges, and a local data path that does not exist."""
    # each field's own range and finiteness: section_errors (every section, LIMITS); here what needs several sections
    errors = []
    if cfg.data.batch_size <= 0:
        errors.append(f"data.batch_size={cfg.data.batch_size} must be > 0")
    if cfg.data.num_workers < 0:
        errors.append(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    if cfg.engine.precision != "auto":
        errors += precision_errors(cfg.engine.precision, cfg.engine.zero_stage)
    if cfg.optim.max_steps == 0 and cfg.optim.epochs == 0:
        errors.append("set optim.max_steps or optim.epochs (the length of training)")
    if not cfg.data.train:
        errors.append("data.train is required" + REQUIRED_HINTS["data.train"])
    for key in ("train", "val", "zero_shot"):
        url = getattr(cfg.data, key)
        if url.startswith(PIPE_PREFIX):
            if not cfg.data.allow_pipe:
                errors.append(f"data.{key}: a {PIPE_PREFIX} URL runs a shell command for every shard; set "
                              "data.allow_pipe=true if you trust it (s3://, gs://, https:// URLs need no shell)")
            continue
        missing = missing_local_path(url)
        if missing:
            where = "" if missing == url else f": {missing}"
            errors.append(f"data.{key}={url}{where} does not exist")
    o = cfg.optim
    if o.schedule == "multistep" and list(o.milestones) != sorted(set(o.milestones)):
        errors.append(f"optim.milestones={list(o.milestones)} must be distinct epochs in increasing order")
    if o.schedule == "multistep" and not o.milestones:
        errors.append("optim.schedule=multistep needs optim.milestones=[EPOCH, ...] (the epochs where the lr is "
                      "multiplied by optim.gamma)")
    if o.schedule == "cosine" and o.milestones:
        errors.append(f"optim.milestones={list(o.milestones)} go with optim.schedule=multistep (the cosine has none)")
    if cfg.optim.optimizer == "lars" and cfg.engine.zero_stage != 0:
        errors.append(f"optim.optimizer=lars needs engine.zero_stage=0 (LARS scales each tensor by its own norm; ZeRO "
                      f"{cfg.engine.zero_stage} flattens and partitions the parameter groups)")
    if cfg.run.resume not in ("auto", "none") and not Path(cfg.run.resume).exists():
        errors.append(f"run.resume={cfg.run.resume}: no such checkpoint directory (or use auto | none)")
    if errors:
        raise ConfigError("; ".join(errors))


def check_run_paths(cfg: JobConfig, job: str) -> None:
    """run.name must be one folder name and run.dir a folder path where <dir>/<job>/<name> can be created and
    written: not an existing file (nor under one), not in /proc, /sys or /dev, not too long. Nothing is created."""
    errors = []
    name, run_dir = cfg.run.name, cfg.run.dir
    if "/" in name or os.sep in name or "\0" in name or name in (".", ".."):
        errors.append(f"run.name={name!r} must be a single folder name (no '/', not . or ..)")
    elif len(name.encode()) > MAX_RUN_NAME_BYTES:
        errors.append(f"run.name is {len(name)} characters ({len(name.encode())} bytes); a run name is one folder "
                      f"name of at most {MAX_RUN_NAME_BYTES} bytes")
    if not run_dir.strip() or "\0" in run_dir:
        errors.append(f"run.dir={run_dir!r} must be a folder path")
    if errors:
        raise ConfigError("; ".join(errors))
    target = Path(os.path.abspath(run_dir)) / job / name
    real = Path(os.path.realpath(target))
    def under(path: Path, folders: tuple[str, ...]) -> bool:
        return any(path == Path(d) or Path(d) in path.parents for d in folders)

    if under(real, SYSTEM_DIRS) and not under(real, SYSTEM_DIRS_ALLOWED):
        raise ConfigError(f"run.dir={run_dir}: runs cannot be written under {real.parts[0]}{real.parts[1]} "
                          f"(the run directory would be {real})")
    if len(str(target).encode()) > MAX_RUN_DIR_BYTES:
        raise ConfigError(f"run.dir={run_dir[:80]}...: the run directory path is {len(str(target).encode())} bytes; "
                          f"at most {MAX_RUN_DIR_BYTES}")
    for folder in (target, *target.parents):  # the deepest part that exists must be a writable folder
        if not os.path.lexists(folder):
            continue
        if not folder.is_dir():
            where = "" if folder == Path(os.path.abspath(run_dir)) else f": {folder} is in its path"
            raise ConfigError(f"run.dir={run_dir}: not a directory{where} (a file is there; runs are written to "
                              f"<run.dir>/{job}/{name}/)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"run.dir={run_dir}: {folder} is not writable, so {target} cannot be created")
        break


def precision_errors(precision: str, zero_stage: int) -> list[str]:
    """16-bit training needs ZeRO >= 1: DeepSpeed 0.19 refuses a 16-bit model with fp32 gradient accumulation
    at stage 0 (and with 16-bit accumulation it would train without fp32 master weights)."""
    if precision in ("bf16", "fp16") and zero_stage == 0:
        return [f"engine.precision={precision} needs engine.zero_stage >= 1 (fp32 master weights and gradient "
                "accumulation live in DeepSpeed's ZeRO optimizer; stage 1 on one rank is plain data parallel); or "
                "use engine.precision=fp32"]
    return []


def missing_local_path(url: str) -> str | None:
    """The first local path in a data URL that does not exist, else None (remote URLs are not checked here)."""
    if not url or url.startswith("embedded:"):
        return None
    for part in url.split(","):
        part = part.strip()
        if part.startswith("file://"):
            part = part[len("file://"):]
        elif "://" in part or "::" in part:
            continue
        if "{" in part:  # a brace pattern: check its folder
            part = str(Path(part).parent)
        if part and not Path(part).exists():
            return part
    return None


# --- command line -----------------------------------------------------------------------------------------------

def _help_epilog(task_config: type, archs: dict | None, aliases: dict[str, str] | None = None) -> str:
    lines = ["keys (section.field=value; defaults before the preset):"]
    for name, cls in sections(task_config).items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            lines.append(f"  {name}.{f.name} = {default!r}  [{_type_name(_field_types(cls)[f.name])}]"
                         if default != "(required)" else f"  {name}.{f.name}  (required)")
    if archs:
        lines.append(f"  model.arch = one of {', '.join(archs)} (sets the model's architecture fields)")
    for short, key in (aliases or {}).items():
        lines.append(f"  {short}=VALUE is short for {key}=VALUE")
    return "\n".join(lines)


def parse_args(job: str, task_config: type, argv: list[str] | None = None,
               archs: dict[str, dict] | None = None,
               aliases: dict[str, str] | None = None) -> tuple[JobConfig, ParsedArgs]:
    """Command line -> validated JobConfig (not yet resolved) and the launcher's arguments.

    `aliases` maps short command-line keys to full ones (finetune_cls: {"mode": "model.mode"}, so `mode=linprobe`
    works). Raises ConfigError for anything wrong in the configuration; argparse itself exits 2 on malformed flags.
    """
    parser = argparse.ArgumentParser(
        prog=f"{job}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{job}: key=value overrides over a preset (launch/presets/{job}/*.yaml).",
        epilog=_help_epilog(task_config, archs, aliases))
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="preset name or YAML path (default: %(default)s)")
    parser.add_argument("--deepspeed_config", default="", help="DeepSpeed JSON merged over the generated config")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused "
                        "(ranks come from LOCAL_RANK/RANK)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --preset

    path = preset_path(job, args.preset)
    overrides = [parse_override(o) for o in args.overrides]
    items = load_preset(path) + [((aliases or {}).get(k, k), v) for k, v in overrides]
    cfg = build(task_config, items, archs)
    preset = path.stem if path.parent == PRESETS_DIR / job else str(path)
    if not cfg.run.name:
        cfg.run.name = path.stem
    check_run_paths(cfg, job)
    user_ds: dict[str, Any] = {}
    if args.deepspeed_config:
        user_ds = load_deepspeed_json(args.deepspeed_config)
        check_deepspeed_overrides(cfg, user_ds)
    return cfg, ParsedArgs(preset=preset, deepspeed_config=user_ds, deepspeed_config_path=args.deepspeed_config,
                           local_rank=args.local_rank)


def load_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        tree = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object")
    return tree


def check_deepspeed_overrides(cfg: JobConfig, user: dict[str, Any]) -> None:
    """Refuse user DeepSpeed keys that the job config owns (batch, accumulation, ZeRO stage, precision, clipping,
    optimizer, lr schedule): the run's config.yaml must stay the truth. Everything else merges."""
    errors = []
    owned = {("train_micro_batch_size_per_gpu",): ("data.batch_size", cfg.data.batch_size),
             ("gradient_accumulation_steps",): ("engine.grad_accum", cfg.engine.grad_accum),
             ("gradient_clipping",): ("engine.grad_clip", cfg.engine.grad_clip),
             ("zero_optimization", "stage"): ("engine.zero_stage", cfg.engine.zero_stage)}
    for path, (key, value) in owned.items():
        node: Any = user
        for part in path:
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError and node != value:
            errors.append(f"--deepspeed_config sets {'.'.join(path)}={node} but {key}={value}; set {key} instead")
    for block in ("bf16", "fp16"):
        if isinstance(user.get(block), dict) and "enabled" in user[block]:
            errors.append(f"--deepspeed_config sets {block}.enabled; set engine.precision instead")
    if "train_batch_size" in user:
        errors.append("--deepspeed_config sets train_batch_size; set data.batch_size (per rank) and "
                      "engine.grad_accum instead")
    for block in ("optimizer", "scheduler"):
        if block in user:
            errors.append(f"--deepspeed_config has a '{block}' block; the job builds AdamW and sets the "
                          "warmup-cosine lr itself (optim.*)")
    if errors:
        raise ConfigError("; ".join(errors))


# --- derived values and the DeepSpeed config --------------------------------------------------------------------

def resolve_precision(precision: str, on_gpu: bool, bf16_supported: bool) -> str:
    if precision != "auto":
        return precision
    if not on_gpu:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def resolve(cfg: JobConfig, *, job: str, preset: str, run_dir: str, world_size: int,
            batches_per_epoch: int | None, num_samples: int | None, device: str, precision: str) -> Derived:
    """Compute the derived values (MAE's rules) and store them in `cfg.derived`.

    Epoch counts convert with the micro-batches each rank draws per epoch; with a stream that has no epochs
    (resampled), an epoch is num_samples / (batch_size * world_size) micro-batches.
    """
    o, e = cfg.optim, cfg.engine
    errors = precision_errors(precision, e.zero_stage)
    if errors:
        raise ConfigError(f"engine.precision={e.precision} resolves to {precision} on {device}: " + errors[0])
    global_batch = cfg.data.batch_size * e.grad_accum * world_size
    lr = o.lr if o.lr > 0 else o.base_lr * global_batch / LR_REFERENCE_BATCH
    micro_per_epoch = batches_per_epoch
    if micro_per_epoch is None and num_samples:
        micro_per_epoch = max(1, num_samples // (cfg.data.batch_size * world_size))
    if (o.max_steps == 0 or (o.warmup_steps == 0 and o.warmup_epochs > 0) or o.milestones) and not micro_per_epoch:
        raise ConfigError("optim.epochs/optim.warmup_epochs/optim.milestones need the stream's epoch length, which it "
                          "does not know; set optim.max_steps and optim.warmup_steps (and no milestones)")
    steps_per_epoch = micro_per_epoch / e.grad_accum if micro_per_epoch else 0.0
    total = o.max_steps if o.max_steps > 0 else math.ceil(o.epochs * steps_per_epoch)
    warmup = o.warmup_steps if o.warmup_steps > 0 else round(o.warmup_epochs * steps_per_epoch)
    if total <= 0:
        raise ConfigError(f"optim.epochs={o.epochs} is less than one optimizer step "
                          f"({micro_per_epoch} batches per epoch, engine.grad_accum={e.grad_accum})")
    if warmup > total:
        logger.warning("warmup (%d steps) is longer than training (%d steps); warming up over all of it", warmup, total)
        warmup = total
    cfg.derived = Derived(job=job, preset=preset, run_dir=run_dir, world_size=world_size, global_batch=global_batch,
                          lr=lr, total_steps=total, warmup_steps=warmup, batches_per_epoch=batches_per_epoch,
                          precision=precision, device=device,
                          milestone_steps=tuple(round(m * steps_per_epoch) for m in o.milestones))
    return cfg.derived


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, recursively for nested dicts (over wins)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(cfg: JobConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for a resolved job config, pinning what DeepSpeed would otherwise choose.

    - gradient_clipping always written: DeepSpeed's default became 1.0 (PR #8068); 0.0 means off.
    - data_types.grad_accum_dtype fp32: otherwise gradients accumulate in bf16 under ZeRO (#1800, #2768).
    - data_types.buffer_dtype = the 16-bit precision: DeepSpeed 0.19 stopped casting buffers with the parameters, and
      a float buffer that meets activations then promotes them to fp32 in front of a bf16 weight (timm Beit's
      k_bias zeros: "self and mat2 must have the same dtype" in BEiT's first step). Older versions cast both.
    - no scheduler and no optimizer block: the job passes its AdamW and sets the lr per step itself.
    """
    d, e = cfg.derived, cfg.engine
    assert d is not None, "resolve(cfg, ...) first"
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.zero_stage > 0:
        # contiguous gradients keep the GPU caching allocator from fragmenting during backward; on a CPU they are
        # only one more copy of every gradient per step (5% of a tiny-preset step at batch 32, 20% at batch 4:
        # bench/RESULTS.md), and there is no communication on a CPU to overlap
        zero.update(contiguous_gradients=on_gpu, overlap_comm=on_gpu,
                    reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    if e.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_batch_size": d.global_batch,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": float(e.grad_clip),
        "steps_per_print": 10**12,          # the job logs progress itself
        "wall_clock_breakdown": False,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "data_types": {"grad_accum_dtype": "fp32",
                       **({"buffer_dtype": d.precision} if d.precision in ("bf16", "fp16") else {})},
        "zero_optimization": zero,
        # torch.optim.AdamW is a client optimizer DeepSpeed does not list as ZeRO-tested; it works with all stages
        "zero_allow_untested_optimizer": True,
    }


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_credentials(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def dump_yaml(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=120)
