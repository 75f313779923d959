"""The one registry of the jobs this project runs, by the name the runtime records in a checkpoint
(`config["derived"]["job"]`).

The launch scripts take everything from here (`run("pretrain_mae", argv)`: the task config, the task builder, the
named architectures, the short keys); tools that start from a checkpoint rather than a command line
(launch/convert_checkpoint.py) look the job up here to rebuild its task from the saved `model.*` section. A new job
adds one entry and a ten-line script in launch/.
"""
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from torch import Tensor, nn

from finetune.classification import ClassificationConfig, ClassificationTask, classification_features
from finetune.detr.task import DETRConfig, DETRTask, detr_encoder_features
from finetune.ipt.task import IPTConfig, IPTTask
from pretrain.beit import BEIT_ARCHS, BEiTConfig, BEiTTask, beit_encoder_features
from pretrain.deit import DEIT_ARCHS, DeiTConfig, DeiTTask, deit_encoder_features
from pretrain.dvae import DVAEConfig, DVAETask
from pretrain.mae import MAE_ARCHS, MAEConfig, MAETask
from launch.runtime import run_job
from launch.teachers import load_teacher
from pretrain.reference_checkpoints import mae_encoder_features


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


JOBS: dict[str, Job] = {
    "pretrain_mae": Job(MAEConfig, MAETask, MAE_ARCHS, mae_encoder_features),
    # the export needs no tokenizer: the saved config holds the LM head's resolved vocab_size
    "pretrain_beit": Job(BEiTConfig, partial(BEiTTask, load_tokenizer=False), BEIT_ARCHS, beit_encoder_features,
                         aliases={"tokenizer": "model.tokenizer", "target": "model.target"}, run_task=BEiTTask),
    # the tokenizer (tokenizer.safetensors + tokenizer.json), not a backbone
    "train_dvae": Job(DVAEConfig, DVAETask, None, None),
    # built without a teacher: the export needs none
    "pretrain_deit": Job(DeiTConfig, DeiTTask, DEIT_ARCHS, deit_encoder_features,
                         aliases={"teacher": "model.teacher", "teacher_weights": "model.teacher_weights",
                                  "distill": "model.distill"},
                         run_task=partial(DeiTTask, load_teacher=load_teacher)),
    "finetune_cls": Job(ClassificationConfig, ClassificationTask, None, classification_features,
                        aliases={"mode": "model.mode"}),
    # the finetuned ViT as a backbone (the detector itself stays in the checkpoints)
    "finetune_detr": Job(DETRConfig, DETRTask, None, detr_encoder_features),
    # the IPT model (ipt.safetensors + ipt.json: body, heads, tails), not a timm backbone
    "finetune_ipt": Job(IPTConfig, IPTTask, None, None, aliases={"tasks": "model.tasks"}),
}


def run(job: str, argv: list[str] | None = None) -> int:
    """Run the registered `job` from its command line (what every launch script's main does); the exit code."""
    entry = JOBS[job]
    return run_job(job=job, task_config=entry.task_config, build_task=entry.run_task or entry.build_task, argv=argv,
                   archs=entry.archs, aliases=entry.aliases)
