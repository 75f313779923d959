"""Fault injection: jobs killed with SIGKILL (between steps and in the middle of a checkpoint save) and resumed with
run.resume=auto log, step for step, bit for bit the losses of an uninterrupted run (1 rank in epoch mode, 2 DeepSpeed
ranks in resampled mode); checkpoints are atomic and pruning keeps a complete one; non-finite losses are skipped or
stop the run; corrupt samples are counted exactly; bad configs exit 2 without a traceback; pickled payloads are
refused."""
import contextlib
import errno
import json
import logging
import math
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from launch import pretrain_mae
from launch.runtime import checkpoint
from launch.runtime.config import ConfigError
from launch.runtime.loop import run_job
from pretrain.mae import MAEConfig, MAETask

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
              "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
for _key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_key, None)

# A job under a wrapper that SIGKILLs its own process right after the first file DeepSpeed writes for the checkpoint
# of step KILL_SAVE_STEP: a save cut in the middle (model states on disk, optimizer states not, no COMPLETE marker).
KILL_IN_SAVE = """
import os, signal, sys
import torch
from launch.runtime import checkpoint

kill_step = int(os.environ["KILL_SAVE_STEP"])
armed = [False]
original_save, original_torch_save = checkpoint.save, torch.save

def save(engine, ckpt_dir, step, *args, **kwargs):
    armed[0] = step == kill_step
    return original_save(engine, ckpt_dir, step, *args, **kwargs)

def torch_save(obj, f, *args, **kwargs):
    original_torch_save(obj, f, *args, **kwargs)
    if armed[0]:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save, torch.save = save, torch_save
from launch import pretrain_mae
sys.exit(pretrain_mae.main(sys.argv[1:]))
"""


@pytest.fixture
def shards(shard_factory):
    """4 shards x 8 random 32-px images."""
    return shard_factory.write([[shard_factory.sample(f"{s * 8 + i:06d}", size=32) for i in range(8)]
                                for s in range(4)], name="photos")


def job_args(shards, tmp_path: Path, name: str, *extra: str) -> list[str]:
    return TINY_MODEL + [f"data.train={shards.url}", "data.val=", "data.batch_size=4", "optim.max_steps=12",
                         "optim.warmup_steps=2", "optim.base_lr=5e-3", "log.every=1", "log.images_every=0",
                         "ckpt.every=3", "ckpt.keep=2", f"run.dir={tmp_path / 'runs'}", f"run.name={name}", *extra]


def losses(metrics: Path) -> dict[int, float]:
    """step -> the last loss logged for it (a resumed run logs again the steps after its checkpoint)."""
    out = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def logged_steps(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
    return max((r["step"] for r in rows if "train/loss" in r), default=0)


def run(cmd: list[str], kill_at_step: int | None = None, metrics: Path | None = None, timeout: float = 300,
        env: dict | None = None) -> subprocess.CompletedProcess | int:
    """Run a job; with kill_at_step, SIGKILL its whole process group once metrics.jsonl shows that step."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if kill_at_step is None:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-4000:]
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    deadline = time.monotonic() + timeout
    while logged_steps(metrics) < kill_at_step:
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before step {kill_at_step}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def python_job(*args: str) -> list[str]:
    return [sys.executable, "launch/pretrain_mae.py", *args]


def deepspeed_job(port: int, *args: str) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", "2", "--master_port", str(port), "launch/pretrain_mae.py", *args]


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_losses(shards, tmp_path):
    """1 rank, 1 data worker, epoch mode (8 batches per epoch, 12 steps: the kills fall in both epochs)."""
    reference = tmp_path / "runs" / "pretrain_mae" / "ref" / "metrics.jsonl"
    run(python_job(*job_args(shards, tmp_path, "ref", "data.num_workers=1")))
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 13))

    args = job_args(shards, tmp_path, "cut", "data.num_workers=1", "run.resume=auto")
    run_dir = tmp_path / "runs" / "pretrain_mae" / "cut"
    ckpt = run_dir / "checkpoints"
    # 1) killed inside the save of step 6: model states written, optimizer states not
    script = tmp_path / "kill_in_save.py"
    script.write_text(textwrap.dedent(KILL_IN_SAVE))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env={**ENV, "KILL_SAVE_STEP": "6"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpt / "latest").read_text() == "step00000003" and checkpoint.is_complete(ckpt / "step00000003")
    assert (ckpt / "step00000006").is_dir() and not checkpoint.is_complete(ckpt / "step00000006")
    # 2) resumed from step 3, killed again at a random step of the second epoch
    kill_at = random.Random(os.getpid()).randint(9, 11)
    assert run(python_job(*args), kill_at_step=kill_at, metrics=run_dir / "metrics.jsonl") == -signal.SIGKILL
    # 3) resumed to the end
    out = run(python_job(*args)).stdout
    assert "resuming from" in out
    assert losses(run_dir / "metrics.jsonl") == expected  # every step, bit for bit
    assert (ckpt / "latest").read_text() == "step00000012"
    kept = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert kept == ["step00000009", "step00000012"]  # ckpt.keep=2; the partial step-6 leftover is gone too


@pytest.mark.multiproc
def test_two_ranks_resampled_sigkill_then_resume(shards, tmp_path):
    from test_deepspeed_multiproc import free_port

    reference = tmp_path / "runs" / "pretrain_mae" / "ref" / "metrics.jsonl"
    common = ["data.num_workers=1", "data.mode=resampled", "engine.zero_stage=2", "optim.max_steps=8",
              "data.shuffle_buffer=8"]
    run(deepspeed_job(free_port(), *job_args(shards, tmp_path, "ref", *common)))
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 9))
    run_dir = tmp_path / "runs" / "pretrain_mae" / "cut"
    args = job_args(shards, tmp_path, "cut", *common, "run.resume=auto")
    kill_at = random.Random(os.getpid()).randint(4, 6)
    assert run(deepspeed_job(free_port(), *args), kill_at_step=kill_at, metrics=run_dir / "metrics.jsonl") != 0
    run(deepspeed_job(free_port(), *args))
    assert losses(run_dir / "metrics.jsonl") == expected


# --- checkpoints -------------------------------------------------------------------------------------------------

def fake_checkpoint(ckpt_dir: Path, step: int, complete: bool) -> Path:
    tag_dir = ckpt_dir / checkpoint.tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save({"step": step, "config": {}, "skipped": []}, tag_dir / checkpoint.MODEL_STATES[0])
    if complete:
        (tag_dir / checkpoint.COMPLETE_MARKER).write_text("{}")
    return tag_dir


def test_latest_on_a_partial_checkpoint_falls_back_to_the_newest_complete(tmp_path, caplog):
    for step, complete in ((2, True), (4, True), (6, False)):
        fake_checkpoint(tmp_path, step, complete)
    (tmp_path / "latest").write_text("step00000006")
    assert checkpoint.latest_tag(tmp_path) == "step00000004"
    assert "incomplete" in caplog.text and "step00000004" in caplog.text
    assert checkpoint.resume_target("auto", tmp_path) == (tmp_path, "step00000004")
    with pytest.raises(ConfigError, match="incomplete"):
        checkpoint.resume_target(str(tmp_path / "step00000006"), tmp_path)


def test_prune_never_removes_the_only_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2, True)
    for step in (4, 6):
        fake_checkpoint(tmp_path, step, False)
    assert checkpoint.prune(tmp_path, keep=1) == []
    assert checkpoint.is_complete(tmp_path / "step00000002")
    fake_checkpoint(tmp_path, 8, True)
    assert checkpoint.prune(tmp_path, keep=1) == ["step00000002", "step00000004", "step00000006"]


def test_a_newer_complete_checkpoint_wins_over_latest(tmp_path, caplog):
    """A kill between a save's COMPLETE marker and the move of `latest`: `latest` names the older step 2, step 4 is
    whole; resume takes step 4 and says why."""
    for step in (2, 4):
        fake_checkpoint(tmp_path, step, True)
    (tmp_path / "latest").write_text("step00000002")
    assert checkpoint.resume_target("auto", tmp_path) == (tmp_path, "step00000004")
    assert "'latest' -> step00000002 is older" in caplog.text and "step00000004" in caplog.text


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_write_causes_are_named(tmp_path, code, cause):
    text = checkpoint.write_cause(tmp_path / "x.pt", OSError(code, os.strerror(code)))
    assert text.startswith(cause) and "free on its filesystem" in text
    # torch's C++ writer gives no errno: a probe write beside the file finds the cause (here: none, the disk is fine)
    assert checkpoint.write_cause(tmp_path / "x.pt", RuntimeError("basic_ios::clear: iostream error")).startswith(
        "RuntimeError: basic_ios::clear")


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE in this process (root too): writes past `limit` bytes fail with EFBIG, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def permissions_bind(tmp_path: Path) -> bool:
    """Whether a folder's mode stops this process writing into it (not for root with CAP_DAC_OVERRIDE)."""
    folder = tmp_path / "mode-check"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "x").write_text("x")
    except PermissionError:
        return True
    finally:
        folder.chmod(0o755)
    return False


def unwritable(how: str, folder: Path):
    """`folder` made unwritable: chmod 0555 (not for root, whom permissions do not stop) or a file-size limit that
    fails every write (the kernel's EFBIG, root included)."""
    if how == "chmod":
        @contextlib.contextmanager
        def chmod():
            folder.chmod(0o555)
            try:
                yield
            finally:
                folder.chmod(0o755)
        return chmod()
    return file_size_limit(0)


def one_paragraph(caplog) -> str:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert "Traceback" not in caplog.text
    return errors[0].getMessage()


@pytest.mark.parametrize("how", ["chmod", "fsize"])
def test_an_unwritable_checkpoints_folder_is_refused_before_training(shards, tmp_path, caplog, how):
    if how == "chmod" and not permissions_bind(tmp_path):
        pytest.skip("this process writes into read-only folders (root)")
    args = job_args(shards, tmp_path, "ro", "data.num_workers=0", "optim.max_steps=2", "ckpt.every=0")
    assert pretrain_mae.main(args) == 0
    ckpt = tmp_path / "runs" / "pretrain_mae" / "ro" / "checkpoints"
    caplog.clear()
    with unwritable(how, ckpt):
        assert pretrain_mae.main(args + ["run.resume=auto", "optim.max_steps=4"]) == 2
    message = one_paragraph(caplog)
    assert "not writable" in message and str(ckpt if how == "chmod" else ckpt.parent) in message
    assert ("permission denied" if how == "chmod" else "file too large") in message
    assert "step 3" not in caplog.text and "resuming from" not in caplog.text  # nothing trained, nothing loaded


@pytest.mark.parametrize("how", ["chmod", "fsize"])
def test_a_failed_save_exits_1_naming_path_and_cause(shards, tmp_path, caplog, monkeypatch, how):
    """The save of step 4 fails (checkpoints/ read-only, or every write past 16 KiB refused as on a full disk: the
    model states then fail inside DeepSpeed's save): exit 1, one paragraph naming the path, the cause and step 2, the
    last complete checkpoint, which stays whole and resumes."""
    if how == "chmod" and not permissions_bind(tmp_path):
        pytest.skip("this process writes into read-only folders (root)")
    args = job_args(shards, tmp_path, "full", "data.num_workers=0", "optim.max_steps=6", "ckpt.every=2",
                    "ckpt.keep=0")
    ckpt = tmp_path / "runs" / "pretrain_mae" / "full" / "checkpoints"
    original = checkpoint.save
    failing = unwritable(how, ckpt) if how == "chmod" else file_size_limit(16 << 10)
    active = []

    def save(engine, ckpt_dir, step, *a, **k):
        if step == 4:
            active.append(failing)
            failing.__enter__()
        return original(engine, ckpt_dir, step, *a, **k)

    monkeypatch.setattr(checkpoint, "save", save)
    try:
        assert pretrain_mae.main(args) == 1
    finally:
        for context in active:
            context.__exit__(None, None, None)
    message = one_paragraph(caplog)
    assert str(ckpt / "step00000004") in message and str(ckpt / "step00000002") in message and "intact" in message
    assert ("permission denied" if how == "chmod" else "file too large") in message
    assert "step 5" not in caplog.text  # it stopped at the failed save
    tag_dir = ckpt / "step00000002"
    assert checkpoint.is_complete(tag_dir) and not checkpoint.is_complete(ckpt / "step00000004")
    assert checkpoint.missing_files(tag_dir, checkpoint.read_manifest(tag_dir), (0,)) == []
    assert (ckpt / "latest").read_text() == "step00000002"
    monkeypatch.setattr(checkpoint, "save", original)
    caplog.clear()
    assert pretrain_mae.main(args + ["run.resume=auto"]) == 0
    assert f"resuming from {tag_dir}" in caplog.text and checkpoint.is_complete(ckpt / "step00000006")


def test_a_pickled_payload_is_refused(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 2, True)
    torch.save({"optimizer": {"hook": os.system}}, tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="posix.system|os.system|refusing"):
        checkpoint.check_safe(tag_dir)
    (tag_dir / "not_torch.pt").write_bytes(pickle.dumps(ValueError("x")))
    with pytest.raises(checkpoint.UnsafeCheckpointError):
        checkpoint.deepspeed_classes([tag_dir / "not_torch.pt"])


def test_resume_refuses_a_pickled_checkpoint_with_exit_2(shards, tmp_path, caplog):
    args = job_args(shards, tmp_path, "p", "data.num_workers=0", "optim.max_steps=2", "ckpt.every=0")
    assert pretrain_mae.main(args) == 0
    tag_dir = tmp_path / "runs" / "pretrain_mae" / "p" / "checkpoints" / "step00000002"
    torch.save({"evil": os.system}, tag_dir / "extra_states.pt")
    assert pretrain_mae.main(args + ["run.resume=auto", "optim.max_steps=4"]) == 2
    assert "refusing to unpickle" in caplog.text


# --- non-finite losses -------------------------------------------------------------------------------------------

class NaNAfter(MAETask):
    """MAE whose loss is NaN from optimizer step `nan_from` (counted by training_step calls) on."""

    nan_from = 3

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__(cfg)
        self.calls = 0

    def training_step(self, model, batch):
        self.calls += 1
        loss, metrics = super().training_step(model, batch)
        return (loss * math.nan if self.calls >= self.nan_from else loss), metrics


@pytest.mark.parametrize("stage", [1, 3])
def test_nonfinite_skip_keeps_the_weights_and_counts(shards, tmp_path, stage):
    args = job_args(shards, tmp_path, "skip", "data.num_workers=0", "optim.max_steps=4", "ckpt.every=2",
                    "ckpt.keep=0", "engine.on_nonfinite=skip", f"engine.zero_stage={stage}")
    assert run_job(job="pretrain_mae", task_config=MAEConfig, build_task=NaNAfter, argv=args) == 0
    run_dir = tmp_path / "runs" / "pretrain_mae" / "skip"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/nonfinite_skipped"] == 2.0
    # steps 3 and 4 were skipped: the final weights (the fp32 masters, ZeRO-3's partitions included) are step 2's
    at_2, at_4 = (get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
                  for tag in ("step00000002", "step00000004"))
    assert at_2.keys() == at_4.keys() and len(at_2) > 10
    for key, value in at_2.items():
        assert torch.equal(value, at_4[key]), key


def test_nonfinite_stop_exits_1_and_saves_nothing_new(shards, tmp_path, caplog):
    args = job_args(shards, tmp_path, "stop", "data.num_workers=0", "optim.max_steps=6", "ckpt.every=2")
    assert run_job(job="pretrain_mae", task_config=MAEConfig, build_task=NaNAfter, argv=args) == 1
    ckpt = tmp_path / "runs" / "pretrain_mae" / "stop" / "checkpoints"
    assert "non-finite loss at step 3" in caplog.text and "step00000002" in caplog.text
    assert [p.name for p in ckpt.iterdir() if p.is_dir()] == ["step00000002"]


# --- bad input ---------------------------------------------------------------------------------------------------

def test_five_percent_corrupt_samples_are_skipped_and_counted_exactly(shard_factory, tmp_path):
    """40 samples in 4 shards, 2 of them corrupt (5%): one epoch finishes and reports exactly 2, by reason."""
    png = shard_factory.image_bytes("png", size=32)
    shards = [[shard_factory.sample(f"{s * 10 + i:06d}", size=32) for i in range(10)] for s in range(4)]
    shards[1][3] = {"__key__": "000013", "jpg": b"this is not a jpeg"}
    shards[3][7] = {"__key__": "000037", "png": png[: len(png) // 2]}
    dataset = shard_factory.write(shards, name="five_percent")
    args = TINY_MODEL + [f"data.train={dataset.url}", "data.val=", "data.batch_size=4", "data.num_workers=2",
                         "optim.max_steps=0", "optim.epochs=1", "optim.warmup_steps=1", "log.every=1",
                         f"run.dir={tmp_path}", "run.name=bad", "ckpt.every=0"]
    assert pretrain_mae.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "pretrain_mae" / "bad" / "metrics.jsonl").read_text()
            .splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    assert {k: v for k, v in last.items() if k.startswith("data/skipped/")} == {"data/skipped/corrupt_image": 2.0}


@pytest.mark.parametrize("argv, message", [
    (["optim.lr=abc"], "optim.lr"),
    (["optim.lrr=1e-3"], "optim.lr"),
    (["data.batch_size=0"], "batch_size"),
    (["model.mask_ratio=1.5"], "mask_ratio"),
    (["--preset", "nope"], "preset"),
    (["run.resume=/no/such/checkpoint"], "run.resume"),
])
def test_bad_config_exits_2_with_one_paragraph(argv, message):
    proc = subprocess.run(python_job(*argv), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_zero3_checkpoint_of_two_ranks_resumes_on_one(shards, tmp_path):
    """N -> M ranks: the ZeRO-3 checkpoint is converted to DeepSpeed's universal format, the weights arrive whole,
    and training goes on."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from test_deepspeed_multiproc import free_port

    args = job_args(shards, tmp_path, "el", "data.num_workers=0", "engine.zero_stage=3", "optim.max_steps=4",
                    "ckpt.every=4")
    run(deepspeed_job(free_port(), *args))
    ckpt = tmp_path / "runs" / "pretrain_mae" / "el" / "checkpoints"
    written = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step00000004")
    out = run(python_job(*args, "run.resume=auto")).stdout  # nothing left to train: load, then export
    assert "written by 2 ranks, now 1 (via DeepSpeed's universal checkpoint)" in out
    backbone = load_file(str(tmp_path / "runs" / "pretrain_mae" / "el" / "export" / "model.safetensors"))
    for key in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "norm.bias"):
        assert torch.equal(backbone[key], written[key].float()), key
    run(python_job(*args, "run.resume=auto", "optim.max_steps=6"))
    rows = losses(tmp_path / "runs" / "pretrain_mae" / "el" / "metrics.jsonl")
    assert sorted(rows) == list(range(1, 7)) and all(math.isfinite(v) for v in rows.values())


# --- safety: pipe: URLs and credentials ---------------------------------------------------------------------------

def test_pipe_urls_are_refused_unless_allowed(shards, tmp_path, caplog):
    from data_pipeline.stream import build_stream
    from data_pipeline.transforms import EvalTransform

    pattern = f"pipe:cat {shards.root}/train-{{000000..000003}}.tar"
    with pytest.raises(ValueError, match="allow_pipe"):
        build_stream(pattern, map_fn=EvalTransform(32), batch_size=4, num_workers=0)
    stream = build_stream(pattern, map_fn=EvalTransform(32), batch_size=4, num_workers=0, allow_pipe=True)
    assert sum(int((~b["is_padding"]).sum()) for b in stream) == 32
    args = job_args(shards, tmp_path, "pipe", "data.num_workers=0", "optim.max_steps=1")
    args = [a for a in args if not a.startswith("data.train=")] + [f"data.train={pattern}"]
    assert pretrain_mae.main(args) == 2 and "data.allow_pipe=true" in caplog.text


def test_credentials_in_urls_never_reach_logs_config_or_tensorboard(shards, http_server, tmp_path, caplog):
    """Shards read over HTTP with user:password@ in the URL: the password is in no log line, config.yaml,
    TensorBoard event file, metrics.jsonl or checkpoint."""
    secret = "s3cr3tPASS"
    url = http_server.replace("http://", f"http://reader:{secret}@") + f"/{shards.root.name}"
    args = job_args(shards, tmp_path, "cred", "data.num_workers=1", "optim.max_steps=2", "ckpt.every=0")
    args = [a for a in args if not a.startswith("data.train=")] + [f"data.train={url}"]
    assert pretrain_mae.main(args) == 0
    run_dir = tmp_path / "runs" / "pretrain_mae" / "cred"
    assert "reader:***@" in (run_dir / "config.yaml").read_text()
    assert secret not in caplog.text and "reader:***@" in caplog.text
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_signed_query_values_are_redacted():
    from data_pipeline.shards import redact_credentials

    url = ("https://bucket.s3.amazonaws.com/train-000001.tar?X-Amz-Credential=AKIA123&X-Amz-Signature=abcdef"
           "&partNumber=2 and gs://b/x.tar?token=tok123 and https://u:p4ss@host/x")
    assert redact_credentials(url) == ("https://bucket.s3.amazonaws.com/train-000001.tar?X-Amz-Credential=***"
                                       "&X-Amz-Signature=***&partNumber=2 and gs://b/x.tar?token=*** and "
                                       "https://u:***@host/x")
