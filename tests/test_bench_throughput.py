"""bench/train_throughput.py without timing anything: "ours" runs under the DeepSpeed config the jobs generate, and
--repeats alternates the rows and reports each one's median run; bench/feature_spread.py's measure and
bench/data_wait.py's reading of a run's metrics."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from launch.runtime import config
from test_config import resolved

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_train_throughput", ROOT / "bench" / "train_throughput.py")
throughput = importlib.util.module_from_spec(_spec)
sys.modules["bench_train_throughput"] = throughput  # dataclasses resolve their module's annotations through it
_spec.loader.exec_module(throughput)


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("stage,grad_accum,precision", [(1, 1, "fp32"), (0, 2, "fp32"), (3, 1, "bf16")])
def test_ours_runs_under_the_jobs_deepspeed_config(device, stage, grad_accum, precision):
    job = resolved("data.train=memory://x", "data.batch_size=16", f"engine.zero_stage={stage}",
                   f"engine.grad_accum={grad_accum}", f"engine.precision={precision}", precision=precision)
    want = config.deepspeed_config(job, on_gpu=device == "cuda")
    got = throughput.job_deepspeed_config(16, grad_accum, stage, precision == "bf16", torch.device(device))
    assert got == want


def test_repeats_alternate_the_rows_and_report_each_median(monkeypatch):
    calls = []
    speeds = {"ours": iter([100.0, 140.0, 120.0]), "peer": iter([90.0, 95.0, 130.0])}

    def fake_run_side(side, args, switches, device):
        calls.append(side)
        ips = next(speeds[side])
        return {"images_per_s": ips, "step_time_s": 32 / ips, "peak_memory_gib": 1.0}

    monkeypatch.setattr(throughput, "run_side", fake_run_side)
    runs = [("ours", "ours", throughput.Switches()), ("peer", "peer", throughput.Switches())]
    rows = throughput.repeated(runs, argparse.Namespace(repeats=3), torch.device("cpu"))
    assert calls == ["ours", "peer"] * 3
    assert rows["ours"]["images_per_s"] == 120.0 and rows["ours"]["step_time_s"] == pytest.approx(32 / 120)
    assert rows["peer"]["images_per_s"] == 95.0
    assert rows["ours"]["images_per_s_runs"] == [100.0, 140.0, 120.0]


def test_precision_auto_is_what_the_jobs_resolve():
    assert throughput.is_bf16("auto", torch.device("cuda")) and not throughput.is_bf16("auto", torch.device("cpu"))
    assert throughput.is_bf16("bf16", torch.device("cpu")) and not throughput.is_bf16("fp32", torch.device("cuda"))


@pytest.mark.parametrize("preset", ["tiny", "vit_b16"])
def test_beit_tokenizer_view_is_the_tokenizers_own(preset):
    """The bench hands BEiT a tokenizer built in place: the task's tokenizer view (what the batches hold and what
    flops_per_sample counts the tokenizer at) is the tokenizer's image size, not patch x grid."""
    task = throughput.build_task("beit", preset, throughput.Switches(), torch.device("cpu"))
    assert task.tokenizer_size == throughput.TOKENIZER[preset]["img_size"]


def test_feature_spread_of_identical_and_unrelated_positions():
    feature_spread = _bench_module("feature_spread")
    torch.manual_seed(0)
    same = torch.randn(2, 64, 1, 1).expand(2, 64, 6, 6)          # every position carries its image's vector
    var, cos = feature_spread.spread(same)
    assert var == pytest.approx(0.0, abs=1e-6) and cos == pytest.approx(1.0, abs=1e-5)
    var, cos = feature_spread.spread(torch.randn(2, 256, 12, 12))  # unrelated positions
    assert var == pytest.approx(1.0, abs=0.05) and abs(cos - 1 / 144) < 0.02   # only the diagonal is 1


def test_data_wait_leaves_out_the_start_up_window_and_runs_the_job_as_asked(tmp_path):
    data_wait = _bench_module("data_wait")
    rows = [{"step": 5, "perf/data_wait_frac": 0.9, "perf/images_per_s": 10.0, "perf/step_time_s": 3.0},
            {"step": 5, "val/loss": 1.0},
            {"step": 10, "perf/data_wait_frac": 0.02, "perf/images_per_s": 100.0, "perf/step_time_s": 0.3},
            {"step": 15, "perf/data_wait_frac": 0.04, "perf/images_per_s": 120.0, "perf/step_time_s": 0.25}]
    summary = data_wait.summarise(rows)
    assert summary["data_wait_frac"] == pytest.approx(0.03) and summary["images_per_s"] == pytest.approx(110.0)
    assert summary["windows"] == 2 and "mfu" not in summary
    with pytest.raises(ValueError, match="at least 2 windows"):
        data_wait.summarise(rows[:2])
    cmd = data_wait.run_command("deepspeed --num_gpus 8", "pretrain_mae", "vit_b16", 16, 100, tmp_path,
                                ["data.train=s3://b/x"])
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"] and cmd[3].endswith("launch/pretrain_mae.py")
    assert {"data.num_workers=16", "optim.max_steps=100", "log.every=25", "data.val=", "data.train=s3://b/x",
            f"run.dir={tmp_path}"} <= set(cmd)
