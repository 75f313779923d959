"""python -m data_pipeline.inspect: its report matches what build_stream reads, in text, JSON and as a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipeline.inspect import main
from data_pipeline.stream import build_stream

REPO = Path(__file__).resolve().parents[1]


def to_item(sample: dict) -> dict:
    return {"image": torch.from_numpy(np.array(sample["image"])), "key": sample["__key__"]}


def run_json(argv: list[str], capsys) -> tuple[int, dict]:
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_keys_per_rank_are_what_the_stream_reads(uneven_dataset, capsys):
    status, report = run_json([uneven_dataset.url, "--world-size", "2", "--workers", "2", "--batch-size", "3",
                               "--epoch", "1", "--seed", "4", "--keys"], capsys)
    assert status == 0
    assert (report["shards"], report["samples"], report["counted"]) == (6, 27, False)
    assert report["bytes"] == sum(path.stat().st_size for path in uneven_dataset.shard_paths)
    assert report["metadata"]["classes"] == ["c0", "c1", "c2"]
    plan = report["plan"]
    for rank in (0, 1):
        stream = build_stream(uneven_dataset.url, to_item, batch_size=3, rank=rank, world_size=2, num_workers=2,
                              seed=4)
        stream.set_epoch(1)
        batches = list(stream)
        read = sorted(key for batch in batches for key, pad in zip(batch["key"], batch["is_padding"]) if not pad)
        reported = sorted(key for worker in plan["ranks"][rank]["workers"] for key in worker["keys"])
        assert read == reported
        assert len(batches) == plan["batches_per_epoch"]
        assert plan["ranks"][rank]["samples"] == len(read)


def test_text_report_lists_ranks_workers_and_keys(uneven_dataset, capsys):
    assert main([uneven_dataset.url, "--world-size", "2", "--workers", "2", "--batch-size", "2", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "shards    6    samples 27" in out and '"kind": "classification"' in out
    assert "every rank yields 8 batches per epoch" in out
    for rank in (0, 1):
        assert f"  rank {rank}: " in out
    assert out.count("    worker 0: ") == 2 and out.count("    worker 1: ") == 2
    listed = [key for line in out.splitlines() if line.strip().startswith("keys (")
              for key in line.split(":", 1)[1].split()]
    assert sorted(listed) == sorted(uneven_dataset.keys), "every key listed once, under exactly one worker"


def test_unbalanced_plan_is_flagged(shard_factory, capsys):
    dataset = shard_factory.classification(sizes=(12, 2))
    status, report = run_json([dataset.url, "--world-size", "2", "--workers", "1", "--batch-size", "2"], capsys)
    assert status == 0
    assert [rank["samples"] for rank in report["plan"]["ranks"]] == [12, 2]
    assert any("ranks are unbalanced" in warning for warning in report["warnings"])
    assert main([dataset.url, "--world-size", "2", "--workers", "1", "--batch-size", "2"]) == 0
    assert "WARNING: ranks are unbalanced: they read 2 to 12 samples" in capsys.readouterr().out


def test_too_few_shards_is_reported_with_the_fix(uneven_dataset, capsys):
    assert main([uneven_dataset.url, "--world-size", "4", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: 6 shard(s) cannot be split over 4 rank(s) x 2 worker(s) = 8 readers" in out
    assert "--maxcount" in out


def test_verify_reports_bad_samples_by_key(bad_dataset, capsys):
    status, report = run_json([bad_dataset.url, "--workers", "2", "--verify", "--require", "image,cls"], capsys)
    assert status == 1
    by_key = {entry["key"]: entry["reason"] for entry in report["verify"]["bad"] if entry["key"] is not None}
    assert {key: reason for key, reason in by_key.items() if key in bad_dataset.bad_keys} == bad_dataset.bad_keys
    assert report["verify"]["by_reason"] == bad_dataset.expected_skipped
    assert not bad_dataset.pickle_marker.exists()

    assert main([bad_dataset.url, "--workers", "2", "--verify", "--require", "image,cls"]) == 1
    out = capsys.readouterr().out
    assert "BAD corrupt-jpeg  corrupt_image  train-000000.tar" in out
    assert "BAD no-label  missing_label" in out
    assert "truncated_tar  train-000002.tar" in out


def test_verify_passes_clean_data(uneven_dataset, capsys):
    status, report = run_json([uneven_dataset.url, "--verify"], capsys)
    assert status == 0
    assert report["verify"] == {"checked": 27, "bad": [], "by_reason": {}}


def test_module_runs_as_a_subprocess(uneven_dataset):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.inspect", f"file://{uneven_dataset.url}", "--world-size", "2",
         "--workers", "1", "--batch-size", "4", "--json"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 27 and report["plan"]["world_size"] == 2
    shards = [url for rank in report["plan"]["ranks"] for worker in rank["workers"] for url in worker["shards"]]
    assert sorted(shards) == sorted(f"file://{path}" for path in uneven_dataset.shard_paths)
