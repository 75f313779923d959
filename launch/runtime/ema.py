"""The EMA of a task's weights, owned by the runtime: `optim.ema_decay` (0 = off), any task, ZeRO 0-3.

timm's `ModelEmaV3` keeps an fp32 copy of the task's model (an fp32 copy: a bf16 EMA at decay 0.9999 would round
every update away), made before DeepSpeed wraps the model, so it holds whole tensors on every rank. After every
optimizer step (step counts from 1) it moves towards the engine's weights: `ema = decay * ema + (1 - decay) * w`,
buffers included (timm's rule; at step 1 it copies the weights). Under ZeRO-3 the engine's parameters are
partitioned: they are gathered for the update (`deepspeed.zero.GatheredParameters`, the whole model on every rank
for the duration of the update), so every rank's EMA is the same. The EMA is saved in every checkpoint's client
state ("ema") and restored on resume, evaluated after each evaluation by the task's `evaluate_ema` (val/<name>_ema),
and exported beside export/ to export_ema/ (the same files, from the EMA's weights).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class RuntimeEMA:
    """An EMA of `model`'s weights (parameters and persistent buffers), updated from the engine after each step."""

    def __init__(self, model: nn.Module, decay: float, device: torch.device) -> None:
        from timm.utils import ModelEmaV3

        self.decay = decay
        self.ema = ModelEmaV3(model, decay=decay, dtype=torch.float32, device=device)
        self.ema.module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def update(self, engine: Any, step: int) -> None:
        """Move the EMA towards the engine's weights (collective under ZeRO-3: every rank calls it)."""
        module = getattr(engine, "module", engine)
        params = [p for p in module.parameters() if hasattr(p, "ds_id")]
        gather: Any = contextlib.nullcontext()
        if params:  # ZeRO-3: whole tensors on every rank while the EMA reads them
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params)
        with gather:
            self.ema.update(module, step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA's weights on the CPU (what a checkpoint holds and an export reads)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
