"""The Task interface: what the runtime (launch/runtime/loop.py) calls on a pretraining or finetuning method.

A task is an object that owns its `nn.Module` (what DeepSpeed wraps), its transforms, loss, parameter groups,
evaluation and export. The runtime knows nothing about MAE or DETR: it calls the members of `Task` (all required)
and the hooks of `TaskHooks` (optional: every task inherits `TaskHooks`, which declares each hook once with a
default that does nothing, so the runtime calls them without probing). `check_task` runs when the runtime builds
the task: a public member named like a hook but not declared (`after_stepp`, `on_epoch`) is a configuration error
instead of a hook that silently never runs. docs/ARCHITECTURE.md places the interface in the project.

A new method: a `model.*` config dataclass, a task class `class MyTask(TaskHooks)` with the members of `Task`, one
entry in launch/jobs.py (`JOBS`) and a ten-line launch script whose main is `launch.jobs.run(NAME, argv)`.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from torch import Tensor, nn

# the required members (Task); a task's class may define any other name that does not look like a hook
REQUIRED = ("model", "train_transform", "eval_transform", "param_groups", "training_step", "evaluate", "images",
            "export", "flops_per_sample")
# names that look like hooks: a public member starting so must be a declared hook
HOOK_PREFIXES = ("on_", "after_", "before_")


class TaskError(TypeError):
    """A task that breaks the interface (the runtime reports it as a configuration error, exit 2)."""


@runtime_checkable
class Task(Protocol):
    """The members the runtime calls on every task (see `TaskHooks` for the optional ones)."""

    model: nn.Module                                 # what DeepSpeed wraps, trains, checkpoints and exports
    train_transform: Callable[[dict], dict]          # picklable: decoded sample -> tensors, run in the data workers
    eval_transform: Callable[[dict], dict]

    def param_groups(self) -> list[dict]:
        """Optimizer groups of `model`'s parameters: {"params", "weight_decay" (0 = exempt), "lr_scale"?, ...}."""
        ...

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """(loss to backpropagate, metrics to log as train/*); `model` is the DeepSpeed engine."""
        ...

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Metrics over the validation stream (logged as val/*, keys may carry a val_ prefix). Collective: every
        rank calls it; the task all-reduces. `model` is the engine, or the runtime's EMA copy (optim.ema_decay)."""
        ...

    def images(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """TensorBoard pictures [3, H, W] in [0, 1] from a fixed batch (reconstructions, boxes); may be empty."""
        ...

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """(tensors, json) of the export from the consolidated fp32 state dict of `model` (main rank only)."""
        ...

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per sample, for perf/mfu (called on GPUs only)."""
        ...


class TaskHooks:
    """The optional hooks, each declared once with its default; every task inherits this class.

    The runtime calls every hook unconditionally; a task overrides the ones it needs.
    """

    # the members every sample must hold (passed to build_stream, which skips and counts a sample without one)
    required_members: tuple[str, ...] = ("image",)
    # basename of the exported files: "backbone" is timm's folder export/ itself (config.json + model.safetensors),
    # another name export/<name>.safetensors + .json
    export_name: str = "backbone"
    # a classifier's classes by label (the train set's names): saved in every checkpoint as label_names, so that a
    # converted classifier keeps them; None for a task that does not classify
    class_names: list[str] | None = None
    # picklable callables(list of transform outputs) -> batch, run in the data workers; None = torch's default_collate
    train_collate: Callable[[list], dict] | None = None
    eval_collate: Callable[[list], dict] | None = None

    def on_dataset(self, metadata: dict[str, Any]) -> None:
        """The train set's index.json metadata, before the engine is built; a ValueError is a configuration error
        (exit 2), e.g. a class count that does not match the head."""

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """The training image sizes of data.multiscale (multi-scale batches), called only when it is set, before the
        EMA copies the model and DeepSpeed wraps it: a task whose model reads one fixed size (a Swin's attention
        masks, a ViT's position table) makes it read all of them. A ValueError is a configuration error (exit 2).
        The stream refuses multi-scale batches for a train transform without `at_size`, so a task that cannot take
        them needs nothing here."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """After each optimizer step (step counts from 1), e.g. an annealed temperature."""

    def extra_state(self) -> dict[str, Any]:
        """Tensors and plain values saved in every checkpoint's client state (under "task")..."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """... and given back on resume."""

    def extra_exports(self, state_dict: dict[str, Tensor]) -> dict[str, tuple[dict[str, Tensor], dict]]:
        """More files beside the export: {name: (tensors, json)}, written to export/ (and export_best/, export_ema/),
        e.g. DeiT's whole classifier."""
        return {}

    def evaluate_zero_shot(self, model: nn.Module, loader: Iterable[dict[str, Any]],
                           metadata: dict[str, Any]) -> dict[str, float]:
        """Metrics over the labelled set data.zero_shot (its batches from `eval_transform`, every sample with an
        image and a `cls` label; `metadata`: its index.json metadata, e.g. the class names), run with each evaluation
        and logged as val/*. Collective, like `evaluate`. Only a task that overrides it accepts data.zero_shot (the
        runtime refuses the key otherwise); a ValueError is a configuration error (exit 2)."""
        return {}

    def evaluate_ema(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        """The evaluation of the runtime's EMA copy of the weights (optim.ema_decay > 0), logged as val/<name>_ema.
        Default: `evaluate`. A task overrides it to leave out what the EMA does not change (DeiT's teacher) or to
        keep state of the main evaluation (the classifier's confusion matrix)."""
        return self.evaluate(model, loader)  # type: ignore[attr-defined]


HOOKS: tuple[str, ...] = tuple(name for name in vars(TaskHooks) if not name.startswith("_"))


def _public_names(task: Any) -> set[str]:
    names = {name for cls in type(task).__mro__ if cls not in (TaskHooks, object) for name in vars(cls)}
    names |= set(getattr(task, "__dict__", {}))
    return {name for name in names if not name.startswith("_")}


def check_task(task: Any) -> None:
    """TaskError unless `task` is a Task that inherits TaskHooks and defines no unknown hook.

    Unknown hook: a public member starting with on_/after_/before_ that TaskHooks does not declare, or a name close
    to a declared hook's (a misspelling: `after_stepp`, `extra_exprts`). The message names it and the hooks.
    """
    cls = type(task).__name__
    if not isinstance(task, TaskHooks):
        raise TaskError(f"{cls} must inherit contracts.task.TaskHooks (the optional hooks and their defaults)")
    missing = [name for name in REQUIRED if not hasattr(task, name)]
    if missing:
        raise TaskError(f"{cls} lacks the required Task member(s) {', '.join(missing)} (contracts/task.py)")
    unknown = []
    for name in sorted(_public_names(task) - set(HOOKS) - set(REQUIRED)):
        close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.85)
        if name.startswith(HOOK_PREFIXES) or close:
            unknown.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
    if unknown:
        raise TaskError(f"{cls} defines {', '.join(unknown)}, which the runtime never calls: the hooks are "
                        f"{', '.join(HOOKS)} (contracts/task.py TaskHooks); rename it, or make it private (_name)")
