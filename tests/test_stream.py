"""data_pipeline.stream / data_pipeline.shards: real tar shards read back through a path, file:// and HTTP, with
real DataLoader worker processes."""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.shards import ShardInfo, ShardOpenError, plan_epoch
from data_pipeline.stream import DataConfig, SkipSample, build_stream


def to_item(sample: dict) -> dict:
    """Map function used by these tests: the image as a tensor, plus the key, label and shard of the sample."""
    image = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1)
    return {"image": image, "key": sample["__key__"], "label": sample.get("cls", -1), "url": sample["__url__"]}


def to_item_failing_on_some(sample: dict) -> dict:
    if sample["__key__"] == "000002":
        raise ValueError("transform bug")
    if sample["__key__"] == "000003":
        raise SkipSample("too_small")
    return to_item(sample)


def read_epoch(stream) -> tuple[list[dict], list[str]]:
    """All batches of one epoch and the keys of their real (non-padding) samples."""
    batches = list(stream)
    keys = [key for batch in batches for key, pad in zip(batch["key"], batch["is_padding"].tolist()) if not pad]
    return batches, keys


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("access, num_workers", [("path", 0), ("file_url", 2), ("http", 2)])
def test_reads_every_sample_back(uneven_dataset, http_server, access, num_workers):
    url = {"path": uneven_dataset.url, "file_url": f"file://{uneven_dataset.url}",
           "http": f"{http_server}/{uneven_dataset.root.name}"}[access]
    stream = build_stream(url, to_item, batch_size=4, num_workers=num_workers, train=False)
    batches, keys = read_epoch(stream)

    assert sorted(keys) == sorted(uneven_dataset.keys)
    assert stream.num_samples == 27 and stream.metadata["classes"] == ["c0", "c1", "c2"]
    assert len(batches) == stream.batches_per_epoch == len(stream)
    for batch in batches:
        assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.uint8
        assert batch["is_padding"].dtype == torch.bool and batch["is_padding"].shape == (4,)
        for key, label in zip(batch["key"], batch["label"].tolist()):
            assert label == uneven_dataset.labels[key]
    assert stream.skipped == Counter()


def test_brace_pattern_and_list_use_the_index_beside_the_shards(uneven_dataset, caplog):
    pattern = f"{uneven_dataset.url}/train-{{000000..000003}}.tar"
    with caplog.at_level(logging.WARNING):
        stream = build_stream(pattern, to_item, batch_size=2, num_workers=0, train=False)
    assert stream.num_samples == 5 + 3 + 7 + 4 and "counting samples" not in caplog.text
    assert stream.metadata["kind"] == "classification"
    listed = build_stream([str(path) for path in uneven_dataset.shard_paths[:2]], to_item, 2, num_workers=0)
    assert listed.num_samples == 8
    _, keys = read_epoch(listed)
    assert sorted(keys) == uneven_dataset.keys[:8]


def test_without_index_samples_are_counted(shard_factory, caplog):
    dataset = shard_factory.classification(sizes=(3, 2, 4), index=False)
    with caplog.at_level(logging.WARNING):
        stream = build_stream(dataset.url, to_item, batch_size=2, num_workers=0, train=False)
    assert "counting samples by reading all 3 shards" in caplog.text
    assert stream.num_samples == 9 and stream.metadata == {}
    assert sorted(read_epoch(stream)[1]) == dataset.keys


@pytest.mark.parametrize("train", [True, False])
def test_epoch_mode_reads_each_sample_once_with_equal_batches_per_rank(uneven_dataset, train):
    """2 ranks x 2 real worker processes over shards of 5, 3, 7, 4, 6, 2 samples, two epochs."""
    for epoch in (0, 1):
        per_rank_keys, batch_counts = [], []
        for rank in (0, 1):
            stream = build_stream(uneven_dataset.url, to_item, batch_size=3, rank=rank, world_size=2,
                                  num_workers=2, train=train, seed=7, shuffle_buffer=4)
            stream.set_epoch(epoch)
            batches, keys = read_epoch(stream)
            assert all(len(batch["key"]) == 3 for batch in batches)
            padded = {key for batch in batches for key, pad in zip(batch["key"], batch["is_padding"]) if pad}
            assert padded <= set(keys), "padding repeats the rank's own samples"
            per_rank_keys.append(keys)
            batch_counts.append((len(batches), stream.batches_per_epoch))
        all_keys = per_rank_keys[0] + per_rank_keys[1]
        assert Counter(all_keys) == Counter(uneven_dataset.keys), "every sample exactly once across ranks"
        assert batch_counts[0] == batch_counts[1] and batch_counts[0][0] == batch_counts[0][1]


def test_epochs_reshuffle_and_repeat_deterministically(uneven_dataset):
    def rank0_keys(epoch: int) -> list[str]:
        stream = build_stream(uneven_dataset.url, to_item, batch_size=2, rank=0, world_size=2, num_workers=2,
                              seed=3, shuffle_buffer=8)
        stream.set_epoch(epoch)
        return read_epoch(stream)[1]

    assert rank0_keys(0) == rank0_keys(0)
    assert rank0_keys(0) != rank0_keys(1)


def test_plan_covers_every_shard_once_and_equalises_batches():
    shards = [ShardInfo(f"s{i}.tar", samples) for i, samples in enumerate([9, 9, 9, 9, 9, 9, 9, 4, 0, 1])]
    plans = [plan_epoch(shards, world_size=3, num_workers=2, epoch=epoch, seed=0, batch_size=4, shuffle=True)
             for epoch in range(4)]
    for plan in plans:
        urls = [shard.url for worker in plan.workers for shard in worker.shards]
        assert sorted(urls) == sorted(shard.url for shard in shards)
        assert all(worker.shards for worker in plan.workers)
        for rank in range(3):
            assert sum(worker.batches for worker in plan.rank_workers(rank)) == plan.batches_per_epoch
        assert all(worker.batches * 4 >= worker.samples for worker in plan.workers)
    assert plan_epoch(shards, 3, 2, 1, 0, 4, True) == plans[1], "the same plan on every rank"
    assert len({plan.batches_per_epoch for plan in plans}) == 1, "the same number of batches in every epoch"
    assignments = {tuple(tuple(s.url for s in worker.shards) for worker in plan.workers) for plan in plans}
    assert len(assignments) > 1, "shards of equal size move between readers from epoch to epoch"
    evaluation = [plan_epoch(shards, 3, 2, epoch, 0, 4, shuffle=False) for epoch in range(3)]
    assert evaluation[0].workers == evaluation[1].workers == evaluation[2].workers


def test_plan_errors_name_the_numbers_and_the_fix():
    shards = [ShardInfo(f"s{i}.tar", 5) for i in range(3)]
    with pytest.raises(ValueError) as error:
        plan_epoch(shards, world_size=2, num_workers=2, epoch=0, seed=0, batch_size=4, shuffle=True)
    message = str(error.value)
    for part in ("3 shard", "2 rank", "2 worker", "= 4 readers", "--maxcount", "num_workers", "resampled"):
        assert part in message
    assert plan_epoch(shards, 3, 0, 0, 0, 4, True).num_workers == 1, "num_workers=0 reads in one process"
    empty = [ShardInfo("a.tar", 5), ShardInfo("b.tar", 0)]
    with pytest.raises(ValueError, match="rank 1 would read no samples"):
        plan_epoch(empty, 2, 1, 0, 0, 4, shuffle=False)


def test_too_few_shards_fail_at_build_time_but_resampled_works(shard_factory):
    dataset = shard_factory.classification(sizes=(4, 4, 4))
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot be split over 2 rank\(s\) x 2 worker\(s\)"):
        build_stream(dataset.url, to_item, batch_size=2, rank=0, world_size=2, num_workers=2)
    stream = build_stream(dataset.url, to_item, batch_size=2, rank=0, world_size=2, num_workers=2, mode="resampled")
    assert stream.batches_per_epoch is None
    with pytest.raises(TypeError, match="infinite"):
        len(stream)


def test_resampled_streams_differ_per_rank_and_worker(uneven_dataset):
    def first_batches(rank: int, epoch: int = 0, count: int = 20) -> list[tuple[str, ...]]:
        stream = build_stream(uneven_dataset.url, to_item, batch_size=2, rank=rank, world_size=2, num_workers=2,
                              mode="resampled", seed=5, shuffle_buffer=0)
        stream.set_epoch(epoch)
        batches = []
        for batch in stream:  # infinite: more batches than the dataset holds
            assert not batch["is_padding"].any()
            batches.append(tuple(batch["key"]))
            if len(batches) == count:
                break
        return batches

    rank0, rank1 = first_batches(0), first_batches(1)
    assert rank0 != rank1
    assert rank0[0::2] != rank0[1::2], "the two workers of a rank draw different shards"
    assert rank0 == first_batches(0), "seeded: the same rank, worker and epoch draw the same sequence"
    assert rank0 != first_batches(0, epoch=1)


def test_resampled_small_dataset_with_a_large_shuffle_buffer(shard_factory):
    """Filling a buffer larger than the dataset re-reads shards many times; that is not 'unusable data'."""
    dataset = shard_factory.classification(sizes=(4, 4))
    stream = build_stream(dataset.url, to_item, batch_size=4, num_workers=0, mode="resampled", shuffle_buffer=1000)
    batch = next(iter(stream))
    assert len(batch["key"]) == 4


def test_bad_samples_are_skipped_and_counted(bad_dataset):
    stream = build_stream(bad_dataset.url, to_item_failing_on_some, batch_size=2, num_workers=2, train=False,
                          required=("image", "cls"))
    batches, keys = read_epoch(stream)

    expected = Counter(bad_dataset.expected_skipped) + Counter({"map_error": 1, "too_small": 1})
    assert stream.skipped == expected
    assert sorted(keys) == sorted(set(bad_dataset.good_keys) - {"000002", "000003"})
    assert len(batches) == stream.batches_per_epoch
    assert not bad_dataset.pickle_marker.exists(), "a pickle member must never be unpickled"


def test_missing_label_is_fine_unless_required(bad_dataset):
    stream = build_stream(bad_dataset.url, to_item, batch_size=2, num_workers=0, train=False)
    _, keys = read_epoch(stream)
    assert "no-label" in keys and "missing_label" not in stream.skipped


def test_a_worker_without_usable_samples_fails_clearly(shard_factory):
    dataset = shard_factory.write([[{"__key__": "a", "jpg": b"junk"}], [{"__key__": "b", "png": b"junk"}]])
    stream = build_stream(dataset.url, to_item, batch_size=2, num_workers=0, train=False)
    with pytest.raises(RuntimeError, match=r"read no usable sample .*corrupt_image"):
        read_epoch(stream)
    resampled = build_stream(dataset.url, to_item, batch_size=2, num_workers=0, mode="resampled")
    with pytest.raises(RuntimeError, match="found no usable sample"):
        next(iter(resampled))


def test_stale_index_keeps_batch_counts(shard_factory):
    """index.json lists fewer samples than a tar holds: the worker stops at its quota and counts the rest."""
    dataset = shard_factory.classification(sizes=(4, 3))
    index_path = dataset.root / "index.json"
    index_path.write_text(index_path.read_text().replace('"samples": 3', '"samples": 1'))
    stream = build_stream(dataset.url, to_item, batch_size=2, num_workers=0, train=False)
    batches, keys = read_epoch(stream)
    assert len(batches) == stream.batches_per_epoch == 3
    assert len(keys) == 6 and stream.skipped == Counter({"beyond_index": 1})


def test_unreachable_url_is_retried_then_named(caplog):
    url = f"http://127.0.0.1:{closed_port()}/data/train-{{000000..000001}}.tar"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ShardOpenError) as error:
        build_stream(url, to_item, batch_size=2, num_workers=0, open_retries=3, retry_backoff_s=0.05)
    assert "train-000000.tar after 3 attempt(s)" in str(error.value)
    assert re.search(r"http://127\.0\.0\.1:\d+/data/train-000000\.tar", str(error.value))
    assert "attempt 1/3" in caplog.text and "attempt 2/3" in caplog.text
    assert time.monotonic() - started >= 0.05 + 0.1, "exponential backoff between attempts"


def test_shard_missing_at_read_time_fails_in_the_worker_with_its_url(uneven_dataset):
    uneven_dataset.shard_paths[3].unlink()
    stream = build_stream(uneven_dataset.url, to_item, batch_size=2, num_workers=2, open_retries=2,
                          retry_backoff_s=0.01)
    with pytest.raises(ShardOpenError, match=re.escape(str(uneven_dataset.shard_paths[3]))):
        read_epoch(stream)


def test_remote_shards_go_through_the_local_cache(uneven_dataset, http_server, tmp_path):
    cache = tmp_path / "cache"
    stream = build_stream(f"{http_server}/{uneven_dataset.root.name}", to_item, batch_size=4, num_workers=0,
                          cache_dir=str(cache), train=False)
    assert sorted(read_epoch(stream)[1]) == sorted(uneven_dataset.keys)
    assert len([path for path in cache.iterdir() if path.is_file() and path.stat().st_size > 0]) >= 6


def test_data_config_defaults_and_validation():
    config = DataConfig(train="embedded:photos")
    assert (config.val, config.batch_size, config.num_workers, config.mode, config.shuffle_buffer,
            config.cache_dir) == ("", 64, 2, "epoch", 1000, "")
    with pytest.raises(ValueError, match="mode"):
        DataConfig(train="x", mode="sometimes")
    with pytest.raises(ValueError, match=r"data.batch_size=1000000000000 is more than 1048576"):
        DataConfig(train="x", batch_size=10**12)  # refused while parsing the config, before any process starts


# --- truncated tars: exact counts --------------------------------------------------------------------------------

def _member_spans(path) -> dict[str, tuple[int, int, int]]:
    """member name -> (header offset, data offset, data end) in a tar file."""
    with tarfile.open(path) as archive:
        return {m.name: (m.offset, m.offset_data, m.offset_data + m.size) for m in archive.getmembers()}


def test_tar_cut_inside_a_samples_first_member_counts_only_the_lost_samples(shard_factory):
    """The cut falls inside the first member of sample 000005 (its header, or its data): 000005..000009 are lost
    (5), 000004 ended before the cut and is read."""
    big_json = {"note": "x" * 3000}  # "json" sorts before "png": the first member of every sample, and a large one
    samples = [{**shard_factory.sample(f"{n:06d}", fmt="png"), "json": big_json} for n in range(10)]
    dataset = shard_factory.write([samples, [shard_factory.sample("000010")]])
    spans = _member_spans(dataset.shard_paths[0])
    header, data, end = spans["000005.json"]
    assert header < data < end and min(spans) == "000000.json", "json is each sample's first member"
    original = dataset.shard_paths[0].read_bytes()
    for cut in (header + 100, data, data + 1000, end - 1):
        dataset.shard_paths[0].write_bytes(original[:cut])
        stream = build_stream(dataset.url, to_item, batch_size=2, num_workers=0, train=False)
        _, keys = read_epoch(stream)
        assert sorted(keys) == [f"{n:06d}" for n in range(5)] + ["000010"], cut
        assert stream.skipped == Counter({"truncated_tar": 5}), cut


def test_truncated_tar_counts_equal_the_samples_lost_at_every_cut(shard_factory):
    """Cut a shard at many byte positions (headers, PAX records, data, padding): the yielded samples are exactly
    those whose members all precede the cut, and the skip counts add up to the samples lost."""
    from data_pipeline.shards import ShardReader

    dataset = shard_factory.classification(sizes=(5,), name="sweep")
    path = dataset.shard_paths[0]
    ends: dict[str, int] = {}
    for name, (_, _, end) in _member_spans(path).items():
        key = name.split(".")[0]
        ends[key] = max(ends.get(key, 0), end)
    original = path.read_bytes()
    shard = ShardInfo(str(path), 5)
    for cut in range(0, len(original), 53):
        path.write_bytes(original[:cut])
        skips: list[tuple] = []
        keys = [s["__key__"] for s in ShardReader(required=("image", "cls")).samples(shard, lambda *a: skips.append(a))]
        intact = sorted(key for key, end in ends.items() if end <= cut)
        assert keys == intact, cut
        assert sum(skip[4] for skip in skips) == 5 - len(intact), (cut, skips)
        assert all(skip[0] == "truncated_tar" for skip in skips), (cut, skips)


# --- batch size bounds -------------------------------------------------------------------------------------------

def test_a_batch_larger_than_a_rank_reads_per_epoch_is_refused_with_the_numbers(uneven_dataset):
    """27 samples in 6 shards over 2 ranks: the smaller rank reads 13 per epoch."""
    plan = plan_epoch(build_stream(uneven_dataset.url, to_item, batch_size=2, num_workers=0).index.shards,
                      world_size=2, num_workers=1, epoch=0, seed=0, batch_size=2, shuffle=True)
    smallest = min(plan.rank_samples(0), plan.rank_samples(1))
    assert smallest == 13
    with pytest.raises(ValueError) as error:
        build_stream(uneven_dataset.url, to_item, batch_size=14, rank=1, world_size=2, num_workers=1)
    message = str(error.value)
    for part in ("batch_size=14 (data.batch_size)", "13 samples rank", "27 samples in 6 shard(s)",
                 "2 rank(s) x 1 worker(s)", "data.batch_size=13 or less", "fewer ranks"):
        assert part in message, (part, message)
    build_stream(uneven_dataset.url, to_item, batch_size=13, rank=1, world_size=2, num_workers=1)  # the bound itself
    # evaluation drops padding: a large eval batch is allowed; an absurd one is not, in any mode, before any read
    assert build_stream(uneven_dataset.url, to_item, batch_size=100, num_workers=0, train=False).batches_per_epoch == 1
    for mode in ("epoch", "resampled"):
        with pytest.raises(ValueError, match=r"batch_size=1000000000000 .* more than 1048576"):
            build_stream(uneven_dataset.url, to_item, batch_size=10**12, mode=mode, train=False)
    with pytest.raises(ValueError, match=r"batch_size=28 .* larger than the whole dataset \(27 samples"):
        build_stream(uneven_dataset.url, to_item, batch_size=28, mode="resampled")


def test_the_runtime_reports_a_batch_size_out_of_bounds_as_a_config_error(uneven_dataset):
    """launch.runtime's Trainer._build_stream turns it into ConfigError (exit 2), naming data.train."""
    from types import SimpleNamespace

    from contracts.task import TaskHooks
    from launch.runtime.config import ConfigError
    from launch.runtime.loop import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(data=DataConfig(train=uneven_dataset.url, batch_size=5000, num_workers=0),
                                  run=SimpleNamespace(seed=0))
    trainer.world = SimpleNamespace(rank=0, world_size=1)
    trainer.task = TaskHooks()   # the hooks' defaults: default collate, required member "image"
    with pytest.raises(ConfigError, match=r"data.train=.*batch_size=5000 \(data.batch_size\) is larger than the 27 "
                                          r"samples rank 0 reads per epoch"):
        trainer._build_stream(uneven_dataset.url, to_item, train=True)
    (uneven_dataset.root / "index.json").write_text("{garbage")
    with pytest.raises(ConfigError, match="index.json"):
        trainer._build_stream(uneven_dataset.url, to_item, train=False)


# --- missing members ---------------------------------------------------------------------------------------------

def test_a_classification_stream_counts_a_sample_without_label_as_missing_label(bad_dataset):
    from data_pipeline.transforms import ClassificationEvalTransform
    from finetune.classification import ClassificationTask

    transform = ClassificationEvalTransform(8, crop_pct=1.0)
    stream = build_stream(bad_dataset.url, transform, batch_size=2, num_workers=0, train=False,
                          required=ClassificationTask.required_members)
    list(stream)
    assert stream.skipped["missing_label"] == 1 and "map_error" not in stream.skipped
    # a map_fn that needs the label although it was not required: its KeyError counts as missing_label too
    stream = build_stream(bad_dataset.url, transform, batch_size=2, num_workers=0, train=False, required=("image",))
    list(stream)
    assert stream.skipped["missing_label"] == 1 and "map_error" not in stream.skipped


# --- errors that retrying cannot fix -----------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n garbage \xff\xfe", b"{\"shards\": [", b"[1, 2, 3]",
                                     b"{\"shards\": [{\"url\": \"a.tar\"}]}"])
def test_a_malformed_index_fails_at_once_as_an_input_error(uneven_dataset, content):
    from data_pipeline.shards import DatasetInputError

    (uneven_dataset.root / "index.json").write_bytes(content)
    started = time.monotonic()
    with pytest.raises(DatasetInputError, match=r"index\.json") as error:
        build_stream(uneven_dataset.url, to_item, batch_size=2, num_workers=0)  # default: 5 attempts, 1 s backoff
    assert time.monotonic() - started < 1.0, "not retried"
    assert isinstance(error.value, ValueError) and not isinstance(error.value, OSError)
    assert "data_pipeline.write" in str(error.value)


def test_a_missing_local_path_fails_at_once_as_an_input_error(tmp_path):
    from data_pipeline.shards import DatasetInputError, LocalPathError

    started = time.monotonic()
    for url in (str(tmp_path / "nowhere"), str(tmp_path / "nowhere" / "train-{000000..000001}.tar")):
        with pytest.raises(LocalPathError, match="nowhere") as error:
            build_stream(url, to_item, batch_size=2, num_workers=0)
        assert isinstance(error.value, DatasetInputError) and isinstance(error.value, ShardOpenError)
    assert time.monotonic() - started < 1.0, "not retried"


# --- worker processes never outlive their parent -----------------------------------------------------------------

_ORPHAN_SCRIPT = '''
import os, sys, time
from data_pipeline.stream import build_stream

def stuck(sample):
    open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
    time.sleep(120)  # busy in a batch: torch's own watchdog only looks at the parent between batches
    return {}

if __name__ == "__main__":
    for batch in build_stream(sys.argv[1], stuck, batch_size=2, num_workers=2, train=False):
        pass
'''

_FALLBACK_SCRIPT = '''
import multiprocessing, os, sys, time
import data_pipeline.stream as stream

def worker(parent):
    stream._set_parent_death_signal = lambda: False  # as where prctl is unavailable: the watching thread
    stream.die_with_parent(parent)
    open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
    time.sleep(120)

if __name__ == "__main__":
    for _ in range(2):
        multiprocessing.get_context("fork").Process(target=worker, args=(os.getpid(),)).start()
    time.sleep(120)
'''


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # a zombie: dead, not reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("script", [_ORPHAN_SCRIPT, _FALLBACK_SCRIPT], ids=["prctl", "watch_thread"])
def test_no_worker_outlives_a_sigkilled_parent(uneven_dataset, tmp_path, script):
    (tmp_path / "main.py").write_text(script)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "main.py"), uneven_dataset.url, str(pids_dir)],
                              cwd=root, env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            workers = [int(p.name) for p in pids_dir.iterdir()]
        assert len(workers) == 2, f"workers did not start (parent exit {parent.poll()})"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in workers), "a worker outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:  # our own test's processes, by pid
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
