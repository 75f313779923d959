"""The DeepSpeed engine around a task's model, its AdamW, and the per-step learning rate.

DeepSpeed gets a client optimizer (optim.optimizer: torch AdamW on the task's parameter groups, fused on CUDA; or
timm's LARS / torch SGD) and no scheduler:
the runtime sets the lr of every param group before each optimizer step (linear warmup, then half-cycle cosine
to min_lr, per iteration as MAE's `lr_sched.adjust_learning_rate`), scaled by the group's `lr_scale` (layer
decay in finetuning). Under ZeRO the wrapper's `param_groups` are the real optimizer's groups, so setting them
reaches the optimizer that steps (tests check the applied lr under ZeRO 0-3).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def lr_at(step: int, *, peak: float, total: int, warmup: int, min_lr: float, milestones: Sequence[int] = (),
          gamma: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based): linear 0 -> peak over `warmup`, then cosine to min_lr, or,
    given `milestones` (steps), the peak times gamma ** (milestones passed): SimMIM's multistep schedule."""
    if step < warmup:
        return peak * step / warmup
    if milestones:
        return peak * gamma ** sum(step >= m for m in milestones)
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Any, lr: float) -> None:
    """Set every param group's lr to lr * group["lr_scale"] (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that actually steps, under DeepSpeed's wrappers (ZeRO, bf16, fp16)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def applied_lrs(engine: Any) -> list[float]:
    """The lr of each param group of the optimizer that steps (what the schedule must have reached)."""
    return [g["lr"] for g in innermost_optimizer(engine.optimizer).param_groups]


def param_groups(task_groups: list[dict], weight_decay: float) -> list[dict]:
    """The task's groups, with optim.weight_decay on the groups it decays (weight_decay 0 groups stay exempt).

    Empty groups are dropped (ZeRO flattens each group and fails on an empty one).
    """
    groups = []
    for g in task_groups:
        if not list(g["params"]):
            continue
        g = dict(g)
        g["weight_decay"] = weight_decay if g.get("weight_decay", weight_decay) > 0 else 0.0
        groups.append(g)
    return groups


def build_optimizer(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, on_gpu: bool, name: str = "adamw",
                    momentum: float = 0.9, fused: str | bool = "auto") -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed steps: AdamW (fused kernel unless `fused=False`), timm's LARS or SGD.

    torch's fused AdamW updates every tensor of a group in one kernel (CUDA, and CPU since torch 2.4) instead of a
    loop of per-tensor ops; bench/RESULTS.md has its measured effect.

    LARS (You et al. 2017; MAE's linear probe, util/lars.py) multiplies each tensor's update by
    0.001 * |w| / |g| where the group has weight decay or sets `always_adapt` (MAE adapts every >= 2-D tensor
    and no 1-D one); timm's implementation equals MAE's when the decay is 0.
    """
    if not (fused == "auto" or isinstance(fused, bool)):
        raise ValueError(f"optim.fused must be auto, true or false, got {fused!r}")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=fused is not False)
    if name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=0.001)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adamw | lars | sgd)")


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch every timm-style attention module (a `fused_attn` attribute) between F.scaled_dot_product_attention
    and the explicit softmax(q k^T) v; returns how many modules were set. timm picks SDPA by default."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
            count += 1
    return count


def check_compile_backend(backend: str) -> None:
    """ValueError unless torch.compile knows `backend` (the runtime checks engine.compile_backend before any work)."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"engine.compile_backend={backend!r} is not a torch.compile backend; choose one of "
                         f"{', '.join(torch._dynamo.list_backends())}")


def compile_model(engine: Any, backend: str = "inductor") -> None:
    """torch.compile the engine's module in place (DeepSpeed's `engine.compile`: parameter names, and so checkpoints
    and exports, are unchanged). Only calls through the module's forward are compiled; the first steps compile."""
    engine.compile(backend=backend)
    logger.info("torch.compile (%s): the model's forward is compiled; the first steps pay for the compilation", backend)


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """deepspeed.initialize with a client optimizer and no scheduler; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # one data-parallel rank has nothing to all-reduce, yet DeepSpeed would still flatten every gradient into a
        # buffer and copy it back each step (~4% of a tiny-preset CPU step, bench/RESULTS.md); ZeRO >= 1 needs its
        # reduce path even on one rank (it moves the gradients into the optimizer's flat partition)
        engine.enable_backward_allreduce = False
    return engine


def grad_norm(engine: Any) -> float | None:
    """The global gradient norm of the last optimizer step, when DeepSpeed computed one (ZeRO, clipping, 16-bit)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def local_grad_norm(module: nn.Module) -> float:
    """The 2-norm of the module's gradients; without ZeRO (stage 0) they are already all-reduced at a boundary."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads).item())


def full_state_dict(engine: Any, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The model's full fp32 state dict on the main rank (None elsewhere), under any ZeRO stage and precision.

    Collective: every rank must call it. Trained parameters come from the optimizer's fp32 master copy
    (`safe_get_full_fp32_param`: gathered under ZeRO-3, reassembled under ZeRO-1/2 and bf16); frozen ZeRO-3
    parameters are gathered with `GatheredParameters`; anything else is taken as the module holds it.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        t = safe_get_full_fp32_param(p) if p.requires_grad else None
        if t is None and hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter without an fp32 master (frozen)
            with deepspeed.zero.GatheredParameters([p]):
                t = p.detach().clone()
        if t is None:
            t = p.detach()
        if is_main:
            out[name] = t.float().cpu().clone()
    for name, b in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if is_main and leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            out[name] = b.detach().cpu().clone()
    return out if is_main else None
