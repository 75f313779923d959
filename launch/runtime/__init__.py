"""The runtime every job shares: configuration, DeepSpeed engine, training loop, tracking, checkpoints.

    config.py       dataclasses per component, YAML presets, key=value overrides, the DeepSpeed config
    distributed.py  process group (gloo on CPU, nccl on GPU), device, seeds, small collectives
    engine.py       deepspeed.initialize with the task's AdamW, the per-step lr, consolidated weights
    loop.py         run_job: the training loop, evaluation, pictures, checkpoints, export
    tracking.py     TensorBoard, metrics.jsonl and the console line
    checkpoint.py   save (all ranks) / resume / prune, RNG states
"""
from launch.runtime.loop import run_job

__all__ = ["run_job"]
