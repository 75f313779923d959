"""Real 2-process DeepSpeed runs on the CPU (gloo), through the `deepspeed` launcher, as a user starts them.

`deepspeed --num_gpus 2` on a CPU-only machine starts 2 ranks: the launcher trims its resource list to the
requested count whatever DeepSpeed's CPU accelerator reports (NUMA nodes). DS_ACCELERATOR=cpu makes the choice
explicit. Each test gets a free master port so that runs of the suite side by side do not collide.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from launch.runtime import checkpoint

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
              "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launch(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus", "2", "--master_port", str(free_port()), script, *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture
def shards(shard_factory):
    """4 shards x 8 random 32-px PNG images: 2 ranks x 4 per batch = 4 batches per rank per epoch."""
    return shard_factory.write([[shard_factory.sample(f"{s * 8 + i:06d}", size=32) for i in range(8)]
                                for s in range(4)], name="photos")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stage", [2, 3])
def test_train_checkpoint_resume(shards, tmp_path, stage):
    run_dir = tmp_path / "runs" / "pretrain_mae" / "mp"
    common = TINY_MODEL + [f"data.train={shards.url}", f"data.val={shards.url}", "data.batch_size=4",
                           "data.num_workers=0", f"engine.zero_stage={stage}", "optim.warmup_steps=2",
                           "optim.base_lr=1e-2", "log.every=2", "log.images_every=4", "ckpt.every=2", "ckpt.keep=2",
                           f"run.dir={tmp_path / 'runs'}", "run.name=mp"]
    deepspeed_launch("launch/pretrain_mae.py", *common, "optim.max_steps=4")
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step00000004"
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[0]["perf/images_per_s"] == pytest.approx(2 * rows[0]["perf/images_per_s_per_rank"])
    config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == stage and config["train_batch_size"] == 8

    # the export is the optimizer's fp32 master weights, as DeepSpeed's own consolidation reads them from disk
    backbone = load_file(str(run_dir / "export" / "model.safetensors"))
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="step00000004")
    for key in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "norm.weight"):
        torch.testing.assert_close(backbone[key], reference[key].float(), rtol=0, atol=0)

    proc = deepspeed_launch("launch/pretrain_mae.py", *common, "optim.max_steps=6", "run.resume=auto")
    assert "resuming from" in proc.stderr + proc.stdout and "step00000004" in proc.stderr + proc.stdout
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6] and math.isfinite(rows[-1]["train/loss"])
    assert (ckpt_dir / "latest").read_text().strip() == "step00000006"
    assert not (ckpt_dir / "step00000002").exists()  # ckpt.keep=2
    states = torch.load(checkpoint.model_states_file(ckpt_dir / "step00000006"), map_location="cpu",
                        weights_only=True)
    assert states["step"] == 6 and states["global_steps"] == 6 and states["world_size"] == 2
    assert states["data"] == {"epoch": 1, "batch_in_epoch": 2}  # 4 batches per epoch: 6 = one epoch + 2
    assert len(states["rng"]) == 2 and not torch.equal(states["rng"][0]["torch"], states["rng"][1]["torch"])


LR_SCRIPT = """
import json, sys
import torch
from launch.runtime import distributed, engine as E

world = distributed.init()
torch.manual_seed(0)  # the same weights on both ranks
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
groups = [{"params": list(model[0].parameters()), "lr_scale": 1.0, "weight_decay": 0.0},
          {"params": list(model[1].parameters()), "lr_scale": 0.25, "weight_decay": 0.0}]
opt = E.build_optimizer(groups, lr=1.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, on_gpu=False)
engine = E.initialize(model, opt, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                   "gradient_clipping": 0.0, "zero_optimization": {"stage": 3},
                                   "zero_allow_untested_optimizer": True, "steps_per_print": 10**12})
before = E.full_state_dict(engine, world.is_main)
E.set_lr(engine.optimizer, 0.01)
lrs = E.applied_lrs(engine)
torch.manual_seed(1 + world.rank)  # different data per rank
engine.backward(engine(torch.randn(4, 8)).pow(2).mean())
engine.step()
after = E.full_state_dict(engine, world.is_main)
out = {"lrs": lrs, "optimizer": type(engine.optimizer).__name__}
if world.is_main:
    out["delta"] = {k: [(after[k] - before[k]).abs().min().item(), (after[k] - before[k]).abs().max().item()]
                    for k in before}
with open(sys.argv[-1] + f".rank{world.rank}", "w") as f:  # the launcher puts --local_rank first
    json.dump(out, f)
"""


def test_lr_scale_applied_under_zero3(tmp_path):
    """Under ZeRO-3 on 2 ranks, the optimizer that steps gets lr * lr_scale, and Adam's first step shows it."""
    script = tmp_path / "lr_check.py"
    script.write_text(textwrap.dedent(LR_SCRIPT))
    out = tmp_path / "lr"
    deepspeed_launch(str(script), str(out))
    results = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    for result in results:
        assert "Stage3" in result["optimizer"]
        assert result["lrs"] == [pytest.approx(0.01), pytest.approx(0.0025)]
    delta = results[0]["delta"]
    for name, scale in (("0.weight", 1.0), ("0.bias", 1.0), ("1.weight", 0.25), ("1.bias", 0.25)):
        low, high = delta[name]
        assert low == pytest.approx(0.01 * scale, rel=1e-3) and high == pytest.approx(0.01 * scale, rel=1e-3), name


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_launch(shards, tmp_path):
    """The same script under torchrun (no --local_rank argument; ranks from the environment)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "launch/pretrain_mae.py", *TINY_MODEL, f"data.train={shards.url}", "data.val=",
           "data.batch_size=4", "data.num_workers=0", "engine.zero_stage=1", "optim.max_steps=2", "log.every=1",
           f"run.dir={tmp_path}", "run.name=tr"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_jsonl(tmp_path / "pretrain_mae" / "tr" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((tmp_path / "pretrain_mae" / "tr" / "deepspeed_config.json").read_text())["train_batch_size"] == 8
