"""Two "nodes" on one machine: torchrun --nnodes 2 --node-rank 0|1 --nproc-per-node 1, one process each, each with
its own working directory and its own relative run.dir (as machines without a shared filesystem have).

Without ckpt.node_local the job refuses to start (exit 2, one paragraph); with it each node keeps its own ranks'
checkpoint files, a rank that lacks its files of the chosen checkpoint stops both (exit 2, naming the file), and
run.resume=auto resumes both ranks from the newest complete checkpoint (even when `latest` names an older one) with,
step for step, the losses and final weights of the uninterrupted run.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.runtime import checkpoint
from tests.test_fault_tolerance import losses

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
              "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def free_port() -> int:
    from test_deepspeed_multiproc import free_port as port

    return port()


@pytest.fixture
def shards(shard_factory):
    """4 shards x 8 random 32-px images: 2 ranks x 4 per batch = 4 batches per rank per epoch."""
    return shard_factory.write([[shard_factory.sample(f"{s * 8 + i:06d}", size=32) for i in range(8)]
                                for s in range(4)], name="photos")


def two_nodes(tmp_path: Path, *args: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start node 0 and node 1 (torchrun, 1 process each) in tmp_path/node0 and tmp_path/node1; wait for both."""
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [str(TORCHRUN) if TORCHRUN.exists() else "torchrun", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(ROOT / "launch" / "pretrain_mae.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    deadline = time.monotonic() + timeout
    out = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, ""))
    finally:
        for proc in procs:
            if proc.poll() is None:  # a hang is a failure: never leave it behind
                os.killpg(proc.pid, 9)
                proc.communicate()
    return out


def child_errors(out: str) -> list[str]:
    """The job's own ERROR lines (torchrun's summary of a failed child follows them)."""
    return [line for line in out.splitlines() if " ERROR launch." in line]


def assert_refused(results: list[subprocess.CompletedProcess], *needles: str) -> None:
    for node, result in enumerate(results):
        assert result.returncode != 0, result.stdout[-3000:]
        assert "exitcode  : 2" in result.stdout, result.stdout[-3000:]  # the job's exit code, as torchrun reports it
        errors = child_errors(result.stdout)
        assert len(errors) == 1, (node, result.stdout[-3000:])
        for needle in needles:
            assert needle in errors[0], (node, errors[0])
        assert "Traceback" not in result.stdout.split("torch.distributed.elastic")[0].split(errors[0])[0]




@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_nodes_without_a_shared_run_dir(shards, tmp_path):
    common = TINY_MODEL + [f"data.train={shards.url}", "data.val=", "data.batch_size=4", "data.num_workers=0",
                           "optim.warmup_steps=2", "optim.base_lr=5e-3", "log.every=1", "log.images_every=0",
                           "ckpt.every=2", "ckpt.keep=0", "run.dir=runs", "run.name=mn"]
    run_dirs = [tmp_path / f"node{n}" / "runs" / "pretrain_mae" / "mn" for n in (0, 1)]
    ckpts = [d / "checkpoints" for d in run_dirs]

    # 1) separate run dirs without ckpt.node_local: refused before anything trains
    assert_refused(two_nodes(tmp_path, *common, "optim.max_steps=6"), "do not share the run directory",
                   "ckpt.node_local=true")
    assert not any(d.joinpath("checkpoints").exists() for d in run_dirs)

    # 2) ckpt.node_local: each node holds its own ranks' files; the uninterrupted reference run
    local = [*common, "ckpt.node_local=true"]
    for result in two_nodes(tmp_path, *local, "optim.max_steps=6"):
        assert result.returncode == 0, result.stdout[-4000:]
    expected = losses(run_dirs[0] / "metrics.jsonl")
    assert sorted(expected) == list(range(1, 7))
    assert not (run_dirs[1] / "metrics.jsonl").exists() and not (run_dirs[1] / "export").exists()  # rank 0's node
    reference = load_file(str(run_dirs[0] / "export" / "model.safetensors"))
    for node, ckpt in enumerate(ckpts):
        tag_dir = ckpt / "step00000004"
        assert checkpoint.is_complete(tag_dir)
        assert (tag_dir / f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt").is_file()
        assert not (tag_dir / f"zero_pp_rank_{1 - node}_mp_rank_00_optim_states.pt").exists()
        manifest = checkpoint.read_manifest(tag_dir)
        assert sorted(manifest) == ["0", "1"] and checkpoint.missing_files(tag_dir, manifest, (node,)) == []

    # 3) the run as it is after a kill at step 5 that came between step 4's COMPLETE marker and the move of `latest`
    #    (`latest` names step 2 on both nodes) and a lost file on node 1: both refuse, naming the file
    for ckpt in ckpts:
        shutil.rmtree(ckpt / "step00000006")
        (ckpt / "latest").write_text("step00000002")
    lost = ckpts[1] / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    aside = lost.with_name("aside.pt")
    lost.rename(aside)
    resume = [*local, "optim.max_steps=6", "run.resume=auto"]
    assert_refused(two_nodes(tmp_path, *resume), "cannot resume from step00000004",
                   "zero_pp_rank_1_mp_rank_00_optim_states.pt (missing)", "run.resume=")
    aside.rename(lost)

    # 4) resumed on both nodes from step 4, the newest complete checkpoint: the uninterrupted run's losses and
    #    weights, bit for bit
    results = two_nodes(tmp_path, *resume)
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
    assert "resuming from runs/pretrain_mae/mn/checkpoints/step00000004" in results[0].stdout
    assert "'latest' -> step00000002 is older" in results[0].stdout
    assert losses(run_dirs[0] / "metrics.jsonl") == expected
    resumed = load_file(str(run_dirs[0] / "export" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key
    for ckpt in ckpts:
        assert (ckpt / "latest").read_text() == "step00000006" and checkpoint.is_complete(ckpt / "step00000006")
