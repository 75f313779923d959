"""The one registry of the jobs this project runs, by the name the runtime records in a checkpoint
(`config["derived"]["job"]`).

The launch scripts take everything from here (`run("pretrain_mae", argv)`: the task config, the task builder, the
named architectures, the short keys); tools that start from a checkpoint rather than a command line
(launch/convert_checkpoint.py) look the job up here to rebuild its task from the saved `model.*` section. A new job
adds one entry (a function returning its Job) and a ten-line script in launch/.
"""
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple

from torch import Tensor, nn


class Job(NamedTuple):
    task_config: type                          # the model.* dataclass (MAEConfig, ...)
    build_task: Callable[[Any], Any]           # task_config instance -> Task
    archs: dict[str, dict[str, Any]] | None    # named architectures (model.arch=NAME), or None
    # task.model, imgs [N, C, H, W] -> encoder features [N, T, D] equal to the exported timm model's forward_features;
    # None: the converter cannot compare features for this job
    encoder_features: Callable[[nn.Module, Tensor], Tensor] | None = None
    aliases: dict[str, str] = {}               # short command-line keys for full ones, e.g. {"mode": "model.mode"}
    # task_config instance -> Task for a training run, when it needs more than build_task (BEiT's tokenizer, DeiT's
    # teacher); None = build_task
    run_task: Callable[[Any], Any] | None = None


# Each entry imports its task's modules when it is first looked up: a launch script loads its own task only, so a bad
# command line is answered in the time it takes to import that task.

def _pretrain_mae() -> Job:
    from pretrain.mae import MAE_ARCHS, MAEConfig, MAETask
    from pretrain.reference_checkpoints import mae_encoder_features

    return Job(MAEConfig, MAETask, MAE_ARCHS, mae_encoder_features)


def _pretrain_beit() -> Job:
    from pretrain.beit import BEIT_ARCHS, BEiTConfig, BEiTTask, beit_encoder_features

    # the export needs no tokenizer: the saved config holds the LM head's resolved vocab_size
    return Job(BEiTConfig, partial(BEiTTask, load_tokenizer=False), BEIT_ARCHS, beit_encoder_features,
               aliases={"tokenizer": "model.tokenizer", "target": "model.target"}, run_task=BEiTTask)


def _pretrain_simmim() -> Job:
    from pretrain.simmim import SIMMIM_ARCHS, SimMIMConfig, SimMIMTask, simmim_encoder_features

    return Job(SimMIMConfig, SimMIMTask, SIMMIM_ARCHS, simmim_encoder_features)


def _pretrain_mp3() -> Job:
    from pretrain.mp3 import MP3_ARCHS, MP3Config, MP3Task, mp3_encoder_features

    return Job(MP3Config, MP3Task, MP3_ARCHS, mp3_encoder_features, aliases={"context_ratio": "model.context_ratio"})


def _pretrain_flip() -> Job:
    from pretrain.flip import FLIP_ARCHS, FLIPConfig, FLIPTask, flip_encoder_features

    # the image tower as the backbone; the dual encoder for open_clip (export/open_clip/) is an extra export
    return Job(FLIPConfig, FLIPTask, FLIP_ARCHS, flip_encoder_features,
               aliases={"mask_ratio": "model.mask_ratio", "init": "model.init"})


def _train_dvae() -> Job:
    from pretrain.dvae import DVAEConfig, DVAETask

    return Job(DVAEConfig, DVAETask, None, None)   # the tokenizer (tokenizer.safetensors + .json), not a backbone


def _pretrain_deit() -> Job:
    from launch.teachers import load_teacher
    from pretrain.deit import DEIT_ARCHS, DeiTConfig, DeiTTask, deit_encoder_features

    # built without a teacher: the export needs none
    return Job(DeiTConfig, DeiTTask, DEIT_ARCHS, deit_encoder_features,
               aliases={"teacher": "model.teacher", "teacher_weights": "model.teacher_weights",
                        "distill": "model.distill"},
               run_task=partial(DeiTTask, load_teacher=load_teacher))


def _finetune_cls() -> Job:
    from finetune.classification import ClassificationConfig, ClassificationTask, classification_features

    return Job(ClassificationConfig, ClassificationTask, None, classification_features, aliases={"mode": "model.mode"})


def _finetune_detr() -> Job:
    from finetune.detr.task import DETRConfig, DETRTask, detr_encoder_features

    # the finetuned ViT as a backbone (the detector itself: detector.safetensors + .json, an extra export)
    return Job(DETRConfig, DETRTask, None, detr_encoder_features)


def _finetune_sam() -> Job:
    from finetune.sam.task import SAMConfig, SAMTask

    # the image encoder as a backbone (the whole SAM in segment-anything's layout: sam.safetensors + .json, extra);
    # no feature comparison: the exported timm SAM ViT's block norms have timm's eps 1e-5 where the model (as
    # segment-anything) has 1e-6, a difference of order 1e-5 (tests/test_sam.py compares them at 1e-3)
    return Job(SAMConfig, SAMTask, None, None)


def _finetune_ipt() -> Job:
    from finetune.ipt.task import IPTConfig, IPTTask

    # the IPT model (ipt.safetensors + ipt.json: body, heads, tails), not a timm backbone
    return Job(IPTConfig, IPTTask, None, None, aliases={"tasks": "model.tasks"})


class _Registry(Mapping[str, Job]):
    """name -> Job, each built (its modules imported) on first lookup; iterating the names imports nothing."""

    def __init__(self, entries: dict[str, Callable[[], Job]]) -> None:
        self._entries, self._jobs = entries, {}

    def __getitem__(self, name: str) -> Job:
        if name not in self._jobs:
            self._jobs[name] = self._entries[name]()
        return self._jobs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


JOBS: Mapping[str, Job] = _Registry({
    "pretrain_mae": _pretrain_mae,
    "pretrain_beit": _pretrain_beit,
    "pretrain_simmim": _pretrain_simmim,
    "pretrain_mp3": _pretrain_mp3,
    "pretrain_flip": _pretrain_flip,
    "train_dvae": _train_dvae,
    "pretrain_deit": _pretrain_deit,
    "finetune_cls": _finetune_cls,
    "finetune_detr": _finetune_detr,
    "finetune_ipt": _finetune_ipt,
    "finetune_sam": _finetune_sam,
})


def run(job: str, argv: list[str] | None = None) -> int:
    """Run the registered `job` from its command line (what every launch script's main does); the exit code."""
    from launch.runtime import run_job

    entry = JOBS[job]
    return run_job(job=job, task_config=entry.task_config, build_task=entry.run_task or entry.build_task, argv=argv,
                   archs=entry.archs, aliases=entry.aliases)
