"""Checkpoints -> a timm backbone folder: DIR/config.json + DIR/model.safetensors (timm's local-dir format).

    python launch/convert_checkpoint.py runs/pretrain_mae/tiny --out exports/mae_tiny        # the run's latest
    python launch/convert_checkpoint.py runs/pretrain_mae/tiny --tag step00000100 --out DIR
    python launch/convert_checkpoint.py runs/pretrain_mae/tiny/checkpoints/step00000100 --out DIR
    python launch/convert_checkpoint.py mae_pretrain_vit_base.pth --out DIR                  # a published checkpoint
    python launch/convert_checkpoint.py runs/pretrain_mae/old/export --out DIR   # a backbone.json folder, rewritten

A run's checkpoint (a run dir, its checkpoints/ folder or one checkpoint folder):
- ZeRO-1/2/3 shards are consolidated by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (the optimizer's fp32
  master weights, any number of ranks). It unpickles without weights_only, so every file is first checked to pickle
  no class other than DeepSpeed's own. bf16 + ZeRO-1 runs use DeepSpeed's BF16_Optimizer, whose files zero_to_fp32
  does not read ("is not a zero checkpoint"); its fp32 partitions are concatenated here the same way.
- ZeRO stage 0: the module weights of mp_rank_00_model_states.pt.
- Frozen parameters (MAE's fixed sin-cos pos_embed): ZeRO-2/3 save them beside the shards and zero_to_fp32 returns
  them; ZeRO-1 does not, so they are taken from the model-states file's module weights.
The job that wrote it (client state config `derived.job`, else the run's config.yaml) rebuilds its task from the saved
`model.*` section, and `task.export(state_dict)` strips decoder, mask token and heads. A job's further exports are
written beside it, as the job writes them at its end: DeiT's whole classifier (classifier.*), DETR's whole detector
(detector.*, with the categories the checkpoint recorded).

A file: a published MAE / BEiT / DeiT checkpoint (see pretrain/reference_checkpoints.py), detected by its keys.

A folder in the format before config.json (backbone.json + backbone.safetensors, and the classifier.* / detector.*
beside it): rewritten as it is, automatically, into the timm format (weights unchanged; DeiT's classifier becomes the
timm folder DIR/classifier/), and checked like a checkpoint (the old folder's model gives the source features).
Classifiers keep their class names (`classes` -> pretrained_cfg `label_names`); a run's checkpoint carries them in its
client state (`label_names`).

Then the backbone is reloaded (strict) with `finetune.backbone.create_from_config` and its features are compared with the
source model's on a random input; the max abs difference is logged. Exit codes: 0 done; 1 features differ by more
than --atol, or writing --out failed at run time (disk full); 2 for what the command or its inputs must fix: nothing
to convert (no checkpoint, unknown tag, unknown format, unknown job), a file that is not a trustworthy checkpoint (it
pickles more than tensors, plain types and DeepSpeed's own classes: refused before anything is unpickled), an --out
that cannot be written (under a file, read-only), a bad flag; each in one paragraph naming the file, folder or flag.
"""
# ruff: noqa: E402 - the imports below torch-free argument checks (_exit_early), which answer in a fraction of a second
import argparse
import contextlib
import errno
import io
import json
import logging
import math
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

logger = logging.getLogger("convert_checkpoint")

DEFAULT_ATOL = 1e-4


class ConvertError(RuntimeError):
    """Nothing to convert: no checkpoint, a tag that is not there, a file or job this tool does not know."""


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # nan too
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def check_out(out: Path) -> None:
    """Refuse, before converting anything, an --out folder that cannot be written: a file, under a file, read-only."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"is under the file {existing}"
        raise ConvertError(f"--out {out} {what}; --out must be a folder (new or existing) for the backbone files")
    if not os.access(existing, os.W_OK):
        raise ConvertError(f"--out {out}: {existing} is not writable by this user (read-only folder or mount); "
                           "choose another --out")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("source", type=Path,
                        help="run dir, checkpoints folder, checkpoint folder, or a published .pth/.safetensors file")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for config.json + model.safetensors (timm's format)")
    parser.add_argument("--tag", default="latest", help="checkpoint tag (e.g. step00000100); default: 'latest'")
    parser.add_argument("--num-heads", type=_positive_int, default=None,
                        help="attention heads of a published ViT whose width is not a standard one (not in its "
                             "weights)")
    parser.add_argument("--atol", type=_non_negative_float, default=DEFAULT_ATOL,
                        help=f"largest feature difference accepted by the check (default {DEFAULT_ATOL})")
    parser.add_argument("--no-check", action="store_true", help="skip the reload and feature comparison")
    return parser.parse_args(argv)


def _exit_early(argv: list[str]) -> None:
    """As a command: what needs no torch (the arguments, --out, the source's existence) is checked before torch and
    timm load (seconds), so these errors come back at once; main() checks them again for callers of main(argv)."""
    args = parse_args(argv)  # argparse exits 2 on a bad flag
    try:
        check_out(args.out)
        if not args.source.exists():
            raise ConvertError(f"{args.source}: no such file or directory")
    except ConvertError as e:
        logging.basicConfig(format="%(asctime)s [rank0] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logger.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    _exit_early(sys.argv[1:])

import torch
import yaml
from torch import Tensor

from contracts import backbone as contract
from launch.jobs import JOBS
from launch.runtime import checkpoint, config, tracking
from launch.runtime.config import ConfigError
from pretrain.reference_checkpoints import (UnknownFormatError, import_reference, load_checkpoint_file,
                                            source_features)

# Images compared by the feature check.
CHECK_BATCH = 2
# Keys of DeepSpeed's optimizer-states files (deepspeed.checkpoint.constants), read without importing DeepSpeed.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
ZERO_STAGE = "zero_stage"
FP32_PARTITIONS = "single_partition_of_fp32_groups"
PARTITION_COUNT = "partition_count"
# BF16_Optimizer pads each flat group to a multiple of this many elements per rank (nccl_start_alignment_factor).
BF16_ALIGNMENT = 2


class CheckFailed(RuntimeError):
    """The written backbone does not rebuild or load in timm (exit 1: a fault of the conversion, not the input)."""


@dataclass
class Converted:
    state_dict: dict[str, Tensor]                         # timm keys
    config: dict[str, Any]                                # the backbone's meta (contracts.backbone)
    features: Callable[[Tensor], Tensor] | None           # the source model: imgs -> features, None if unknown
    name: str = "backbone"                                # the task's export_name: backbone, tokenizer, ...
    # the task's extra exports (DeiT's whole classifier, DETR's whole detector): name -> (tensors, json)
    extras: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = field(default_factory=dict)


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _is_checkpoint_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in checkpoint.MODEL_STATES)


def available_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint folders (any tag name, not only stepNNNNNNNN) under ckpt_dir, oldest step first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _is_checkpoint_dir(p)), key=_natural_key)


def locate(path: Path, tag: str) -> tuple[Path, str, Path]:
    """(checkpoints folder, tag, run dir) for a run dir, a checkpoints folder or a checkpoint folder."""
    if _is_checkpoint_dir(path) and tag == "latest":
        return path.parent, path.name, path.parent.parent
    if _is_checkpoint_dir(path):  # a checkpoint folder with --tag: a sibling checkpoint
        path = path.parent
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    run_dir = path if ckpt_dir != path else path.parent
    tags = available_tags(ckpt_dir)
    if not tags:
        raise ConvertError(f"{path}: no DeepSpeed checkpoint there (expected a run dir with checkpoints/TAG/, a "
                           f"checkpoints folder, a checkpoint folder holding {' or '.join(checkpoint.MODEL_STATES)}, "
                           "or a published checkpoint file)")
    if tag == "latest":
        tag = checkpoint.latest_tag(ckpt_dir) or ""
        if not tag:
            tag = tags[-1]
            logger.warning("%s has no usable 'latest' file: converting the newest checkpoint, %s", ckpt_dir, tag)
    if tag not in tags:
        raise ConvertError(f"no checkpoint {tag!r} in {ckpt_dir}; available tags: {', '.join(tags)}")
    return ckpt_dir, tag, run_dir


def deepspeed_classes(files: list[Path]) -> list[type]:
    try:
        return checkpoint.deepspeed_classes(files)
    except checkpoint.UnsafeCheckpointError as e:
        raise ConvertError(f"{e}; this is not a trustworthy checkpoint and nothing in it was loaded: convert only "
                           "checkpoints your own runs wrote (or a published .pth/.safetensors file)") from None


def load_model_states(tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's model-states file (module weights + client state), unpickled only after deepspeed_classes
    found nothing in it but tensors, plain types and DeepSpeed's own classes."""
    try:
        path = checkpoint.model_states_file(tag_dir)
    except FileNotFoundError as e:
        raise ConvertError(str(e)) from None
    classes = deepspeed_classes([path])
    try:
        return _load_with(path, classes)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError... for a damaged file
        raise ConvertError(f"{path} cannot be loaded as a DeepSpeed model-states file ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:200]}): a damaged or truncated checkpoint; convert "
                           "another tag (--tag) or checkpoint.") from None


def _load_with(path: Path, classes: list[type]) -> dict[str, Any]:
    with torch.serialization.safe_globals(classes):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _merge_bf16_partitions(optim_files: list[Path], param_shapes: list[dict[str, Any]],
                           classes: list[type]) -> dict[str, Tensor]:
    """BF16_Optimizer (bf16 + ZeRO-1): each rank holds one slice of every group's flat fp32 master vector.

    The flat vector is the group's parameters in `param_shapes` order, padded at the end only (to a multiple of
    2 x world size), the layout zero_to_fp32 reads for ZeRO-1/2; concatenating the ranks' slices restores it.
    """
    parts = [_load_with(f, classes)[OPTIMIZER_STATE_DICT] for f in optim_files]
    counts = parts[0][PARTITION_COUNT]
    world = max(counts) if isinstance(counts, list) else int(counts)
    if world != len(parts):
        raise ConvertError(f"{optim_files[0].parent}: written by {world} ranks but {len(parts)} optimizer-state "
                           "files are there (an interrupted save?)")
    out: dict[str, Tensor] = {}
    for group, shapes in enumerate(param_shapes):
        flat = torch.cat([p[FP32_PARTITIONS][group].float() for p in parts])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            out[name] = flat.narrow(0, offset, numel).view(tuple(shape)).clone()
            offset += numel
        if not 0 <= flat.numel() - offset < BF16_ALIGNMENT * world:
            raise ConvertError(f"{optim_files[0].parent}: parameter group {group} has {flat.numel()} fp32 values for "
                               f"{offset} parameter elements; not the layout this tool knows")
    return out


def consolidate(tag_dir: Path, states: dict[str, Any]) -> dict[str, Tensor]:
    """The full fp32 state dict of one DeepSpeed checkpoint (any ZeRO stage, any number of ranks)."""
    module = states["module"]
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"), key=lambda p: _natural_key(p.name))
    if not optim_files:
        logger.info("ZeRO stage 0 checkpoint: module weights (%s)", next(iter(module.values())).dtype)
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    classes = deepspeed_classes(optim_files + sorted(tag_dir.glob("*_model_states.pt")))
    if ZERO_STAGE in _load_with(optim_files[0], classes)[OPTIMIZER_STATE_DICT]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # zero_to_fp32 reports with print()
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        for line in printed.getvalue().splitlines():
            logger.debug("zero_to_fp32: %s", line)
        logger.info("consolidated %d ZeRO shard(s) with DeepSpeed's zero_to_fp32: %d tensors", len(optim_files),
                    len(state_dict))
    else:
        state_dict = _merge_bf16_partitions(optim_files, states["param_shapes"], classes)
        logger.info("consolidated %d BF16_Optimizer shard(s) (bf16 + ZeRO-1): %d tensors", len(optim_files),
                    len(state_dict))
    # ZeRO-1 does not save frozen parameters beside its shards; its module weights hold them whole (ZeRO-3 keeps
    # only empty placeholders there, and saves frozen ones beside the shards)
    filled = [k for k, v in module.items() if k not in state_dict and v.numel() > 0]
    for k in filled:
        state_dict[k] = module[k].float() if module[k].is_floating_point() else module[k]
    if filled:
        logger.info("not in the optimizer partitions, taken from the module weights (%s): %s",
                    module[filled[0]].dtype, ", ".join(filled))
    return {k: v.contiguous() for k, v in state_dict.items()}


def saved_config(states: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The resolved job config the runtime stored in the client state, else the run dir's config.yaml."""
    if isinstance(states.get("config"), dict):
        return states["config"]
    path = run_dir / "config.yaml"
    if path.is_file():
        logger.info("no config in the checkpoint's client state: reading %s", path)
        return yaml.safe_load(path.read_text())
    raise ConvertError(f"cannot tell which job wrote this checkpoint: no config in its client state and no {path}")


def task_config(cls: type, model: dict[str, Any]) -> Any:
    """The task's config dataclass from a saved `model` section (lists back to tuples, types checked)."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(model) - set(hints))
    if unknown:
        raise ConvertError(f"the checkpoint's model.{unknown[0]} is not a field of {cls.__name__} "
                           "(written by another version of the code?)")
    return config.make_section("model", cls, {k: config.coerce(f"model.{k}", v, hints[k]) for k, v in model.items()})


def no_grad_features(encoder_features: Callable[[torch.nn.Module, Tensor], Tensor], model: torch.nn.Module,
                     imgs: Tensor) -> Tensor:
    """The source model's features for the timm check."""
    with torch.no_grad():
        return encoder_features(model, imgs)


def convert_run(path: Path, tag: str) -> Converted:
    ckpt_dir, tag, run_dir = locate(path, tag)
    tag_dir = ckpt_dir / tag
    logger.info("checkpoint %s", tag_dir)
    states = load_model_states(tag_dir)
    cfg = saved_config(states, run_dir)
    job_name = (cfg.get("derived") or {}).get("job")
    if job_name not in JOBS:
        raise ConvertError(f"the checkpoint was written by job {job_name!r}, which this tool does not know "
                           f"(known: {', '.join(JOBS)})")
    job = JOBS[job_name]
    try:
        task = job.build_task(task_config(job.task_config, cfg.get("model") or {}))
    except (ValueError, TypeError) as e:  # the task config's own checks, or a task that cannot be built from it
        raise ConvertError(f"the {job_name} model cannot be rebuilt from the checkpoint's model.* config: {e}") \
            from None
    if isinstance(states.get("task"), dict):
        task.load_extra_state(states["task"])  # e.g. the dVAE's schedule step, recorded in its export
    if states.get("label_names") and task.class_names is not None:
        task.class_names = [str(c) for c in states["label_names"]]  # the train set's classes, for the exports
    state_dict = consolidate(tag_dir, states)
    tensors, backbone = task.export(state_dict)
    backbone = {**backbone, "converted_from": {"checkpoint": str(tag_dir), "job": job_name,
                                               "step": states.get("step", states.get("global_steps"))}}

    model = task.model
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ConvertError(f"the consolidated weights do not fit the {job_name} model rebuilt from the saved config: "
                           f"missing {missing}, unexpected {unexpected}")
    model.eval()
    features = None if job.encoder_features is None else partial(no_grad_features, job.encoder_features, model)
    extras = task.extra_exports(state_dict)
    return Converted(tensors, backbone, features, task.export_name, extras)


def convert_file(path: Path, num_heads: int | None, check: bool = True) -> Converted:
    """A published checkpoint; with `check`, its own model is built too (for the feature check), before anything is
    written, so a checkpoint that does not load into its own layout is an input error (exit 2). --no-check skips it."""
    try:
        imported = import_reference(load_checkpoint_file(path), num_heads=num_heads)
        features = source_features(imported) if check else None
    except UnknownFormatError as e:
        raise ConvertError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    backbone = {**imported.config, "converted_from": {"file": str(path), "format": imported.format}}
    return Converted(imported.state_dict, backbone, features)


def convert_legacy(path: Path) -> Converted:
    """A folder of the format before config.json: backbone.json + backbone.safetensors (and any NAME.json +
    NAME.safetensors beside them: DeiT's classifier, DETR's detector), read as they are."""
    meta, state = contract.read_backbone(path)
    source = contract.create_from_config(meta).eval()
    source.load_state_dict(state, strict=True)
    extras = {}
    for config_file in sorted(path.glob("*.json")):
        weights = config_file.with_suffix(".safetensors")
        if config_file.name != contract.LEGACY_CONFIG_NAME and weights.is_file():
            from safetensors.torch import load_file

            extras[config_file.stem] = (load_file(str(weights)), json.loads(config_file.read_text()))
    meta = {**meta, "converted_from": {"folder": str(path), "format": "backbone.json"}}

    def features(imgs: Tensor) -> Tensor:
        with torch.no_grad():
            return source.forward_features(imgs)
    return Converted(state, meta, features, contract.BACKBONE_EXPORT, extras)


def save_export(out_dir: Path, name: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """The export NAME as the jobs write it (contracts.backbone.save_export), float32."""
    contract.save_export(out_dir, name, {k: v.detach().float().contiguous() if v.is_floating_point() else v
                                         for k, v in tensors.items()}, meta)


def reload_backbone(out_dir: Path) -> torch.nn.Module:
    """The timm model config.json describes (conv stem and sin-cos positions included), loaded strictly."""
    try:
        model = contract.load_strict(out_dir)
    except (RuntimeError, ValueError) as e:
        raise CheckFailed(f"timm check: the backbone written to {out_dir} does not load strictly into timm: "
                          + " ".join(str(e).split())) from None
    return model


def compare_features(out_dir: Path, features: Callable[[Tensor], Tensor], seed: int = 0) -> float:
    """Max |timm backbone features - source features| on a random batch (timm's forward_features, strict load)."""
    model = reload_backbone(out_dir).eval()
    input_size = model.pretrained_cfg.get("input_size") or (3, 224, 224)
    imgs = torch.randn(CHECK_BATCH, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model.forward_features(imgs)
    theirs = features(imgs)
    if ours.shape != theirs.shape:
        raise ConvertError(f"the timm backbone gives features {list(ours.shape)}, the source {list(theirs.shape)}")
    return (ours - theirs).abs().max().item()


def _out_error(out: Path, error: OSError) -> ConvertError | None:
    """A ConvertError (exit 2) for the OSErrors writing --out that a different --out fixes; None for run-time ones."""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                       errno.ENOENT):
        return ConvertError(f"cannot write --out {out}: {error.strerror or error}"
                            f"{f' ({error.filename})' if error.filename else ''}; choose a folder this user can create "
                            "and write (not under /proc, /sys, a file or a read-only mount)")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracking.setup_logging(0)
    source: Path = args.source
    try:
        check_out(args.out)
        if source.is_file() and source.name.endswith("_model_states.pt"):
            source = source.parent  # a DeepSpeed file: its checkpoint folder
        if source.is_file():
            converted = convert_file(source, args.num_heads, check=not args.no_check)
        elif source.is_dir() and contract.folder_format(source) == "legacy":
            converted = convert_legacy(source)
        elif source.is_dir():
            converted = convert_run(source, args.tag)
        else:
            raise ConvertError(f"{source}: no such file or directory")
        for name, (tensors, meta) in converted.extras.items():
            save_export(args.out, name, tensors, {**meta, "converted_from": converted.config["converted_from"]})
        if converted.name != "backbone":  # not a timm model (the dVAE tokenizer): written as its job exports it
            save_export(args.out, converted.name, converted.state_dict, converted.config)
            logger.info("%s is not a timm backbone: no timm check", converted.name)
            return 0
        save_export(args.out, contract.BACKBONE_EXPORT, converted.state_dict, converted.config)
        if args.no_check:
            return 0
        if converted.features is None:
            reload_backbone(args.out)
            logger.warning("timm check: strict reload done; no source features to compare for this job")
            return 0
        diff = compare_features(args.out, converted.features)
    except (ConvertError, ConfigError) as e:
        logger.error("%s", e)
        return 2
    except CheckFailed as e:
        logger.error("%s", e)
        return 1
    except OSError as e:  # writing --out, mostly (reading the inputs fails as ConvertError)
        name, out = str(e.filename or ""), str(args.out)
        if name and not (name.startswith(out) or out.startswith(name)):
            logger.error("cannot read %s: %s; check the path and its permissions", name, e.strerror or e)
            return 2
        error = _out_error(args.out, e)
        logger.error("%s", error or f"writing --out {args.out} failed: {type(e).__name__}: {e}")
        return 2 if error else 1
    ok = diff <= args.atol
    (logger.info if ok else logger.error)("timm check: %s loads strictly; max |features - source features| = %.3g "
                                          "(atol %.1g)", converted.config["architecture"], diff, args.atol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
