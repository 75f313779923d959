"""Shard writing: real images in, real tar shards and index.json out, read back with tarfile and webdataset."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from data_pipeline.write import Sample, Skipped, SourceError, main, write_shards

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(w: int, h: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    # smooth random colours so JPEG sizes stay small and realistic
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _read_shards(folder: Path) -> tuple[dict, dict[str, list[dict[str, bytes]]]]:
    """index.json and, per shard, its samples as {ext: bytes} read straight from the tar."""
    index = json.loads((folder / "index.json").read_text())
    shards = {}
    for entry in index["shards"]:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(folder / entry["url"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        shards[entry["url"]] = list(samples.values())
    return index, shards


@pytest.fixture
def imagefolder(tmp_path: Path) -> tuple[Path, dict[bytes, int]]:
    """3 classes x 6 images (JPEG and PNG), a truncated JPEG and a text file; returns (root, bytes -> label)."""
    root = tmp_path / "imagefolder"
    originals = {}
    for label, cls in enumerate(["cat", "dog", "emu"]):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
            data = _jpeg(40 + i, 30 + label, seed=10 * label + i, fmt=fmt)
            (root / cls / f"{i}.{ext}").write_bytes(data)
            originals[data] = label
    good = _jpeg(64, 64, seed=99)
    (root / "dog" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (root / "emu" / "notes.txt").write_text("not an image")
    return root, originals


def test_imagefolder_raw_bytes_labels_skips_and_index(imagefolder, tmp_path, capsys):
    root, originals = imagefolder
    out = tmp_path / "shards"
    assert main([str(root), str(out), "--maxcount", "5", "--quiet"]) == 0
    index, shards = _read_shards(out)

    assert index["num_samples"] == 18
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 3]
    assert [s["url"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    for entry in index["shards"]:  # recorded sizes and counts are the real ones
        assert entry["bytes"] == (out / entry["url"]).stat().st_size
        assert entry["samples"] == len(shards[entry["url"]])
    assert index["num_bytes"] == sum((out / s["url"]).stat().st_size for s in index["shards"])

    meta = index["metadata"]
    assert meta["kind"] == "classification" and meta["classes"] == ["cat", "dog", "emu"]
    assert meta["skipped"]["count"] == 2
    assert sorted(Path(p).name for p in meta["skipped"]["paths"]) == ["broken.jpg", "notes.txt"]

    stored = [s for samples in shards.values() for s in samples]
    for s in stored:  # raw bytes, real extension, label of the class folder
        (ext, data), = [(k, v) for k, v in s.items() if k != "cls"]
        assert data in originals and int(s["cls"]) == originals[data]
        assert ext == ("png" if data.startswith(b"\x89PNG") else "jpg")
    assert len({s.get("jpg", s.get("png")) for s in stored}) == 18

    # pre-shuffled: without it the first shard would hold five cats
    for samples in shards.values():
        assert len({s["cls"] for s in samples}) > 1

    summary = capsys.readouterr().out
    assert "wrote 18 samples in 4 shards" in summary and "skipped 2" in summary and "notes.txt" in summary


def test_same_seed_same_bytes_other_seed_other_order(imagefolder, tmp_path):
    root, _ = imagefolder
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        assert main([str(root), str(tmp_path / name), "--seed", seed, "--quiet"]) == 0
    a, b, c = ((tmp_path / n / "train-000000.tar").read_bytes() for n in "abc")
    assert a == b and a != c


def test_maxsize_rolls_shards_within_the_limit(tmp_path):
    images = [_jpeg(64, 64, seed=i) for i in range(12)]
    samples = [Sample(im, "jpg", cls=i % 2) for i, im in enumerate(images)]
    maxsize = 3 * (len(max(images, key=len)) + 3 * 512) + 10240
    result = write_shards(samples, str(tmp_path / "out"), {"kind": "classification", "source": "test"},
                          maxsize=maxsize, progress=False)
    entries = result.index["shards"]
    assert len(entries) > 2 and sum(e["samples"] for e in entries) == 12
    for e in entries:
        size = (tmp_path / "out" / e["url"]).stat().st_size
        assert size == e["bytes"] <= maxsize
    # each shard was closed only because the next sample would not fit
    assert all(e["bytes"] + len(images[0]) > maxsize - 10240 for e in entries[:-1])


def test_coco_json_boxes_round_trip_and_resize(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    sizes = {1: (200, 100), 7: (60, 80), 9: (50, 40)}
    raw = {}
    for image_id, (w, h) in sizes.items():
        raw[image_id] = _jpeg(w, h, seed=image_id)
        (images_dir / f"img{image_id}.jpg").write_bytes(raw[image_id])
    coco = {
        "images": [{"id": i, "file_name": f"img{i}.jpg", "width": w, "height": h} for i, (w, h) in sizes.items()],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 3, "iscrowd": 0, "area": 1000.0},
            {"id": 2, "image_id": 1, "bbox": [100, 0, 100, 100], "category_id": 1, "iscrowd": 1, "area": 9000.0},
            {"id": 3, "image_id": 7, "bbox": [1.5, 2.5, 3, 4], "category_id": 1, "iscrowd": 0, "area": 12.0},
        ],  # image 9 has no annotation: kept as a negative
        "categories": [{"id": 1, "name": "tree", "supercategory": "plant"}, {"id": 3, "name": "emu"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))

    assert main([str(ann), str(tmp_path / "plain"), "--images", str(images_dir), "--quiet"]) == 0
    index, shards = _read_shards(tmp_path / "plain")
    assert index["metadata"]["kind"] == "detection"
    assert index["metadata"]["categories"] == [{"id": 1, "name": "tree"}, {"id": 3, "name": "emu"}]
    targets = {json.loads(s["json"])["image_id"]: s for samples in shards.values() for s in samples}
    assert set(targets) == {1, 7, 9}
    t1 = json.loads(targets[1]["json"])
    assert targets[1]["jpg"] == raw[1]
    assert (t1["file_name"], t1["width"], t1["height"]) == ("img1.jpg", 200, 100)
    assert t1["boxes"] == [[10, 20, 30, 40], [100, 0, 100, 100]]
    assert t1["category_ids"] == [3, 1] and t1["iscrowd"] == [0, 1] and t1["area"] == [1000.0, 9000.0]
    assert json.loads(targets[7]["json"])["boxes"] == [[1.5, 2.5, 3, 4]]
    assert json.loads(targets[9]["json"])["boxes"] == [] == json.loads(targets[9]["json"])["category_ids"]

    # --resize 50: shorter side to 50 px, boxes/areas/sizes rescaled; a 50x40 image is already small: untouched
    assert main([str(ann), str(tmp_path / "small"), "--images", str(images_dir), "--resize", "50", "--quiet"]) == 0
    _, shards = _read_shards(tmp_path / "small")
    targets = {json.loads(s["json"])["image_id"]: s for samples in shards.values() for s in samples}
    t1 = json.loads(targets[1]["json"])
    assert Image.open(io.BytesIO(targets[1]["jpg"])).size == (100, 50) == (t1["width"], t1["height"])
    assert t1["boxes"] == [[5, 10, 15, 20], [50, 0, 50, 50]] and t1["area"] == [250.0, 2250.0]
    t7 = json.loads(targets[7]["json"])
    assert (t7["width"], t7["height"]) == (50, round(80 * 50 / 60))
    assert t7["boxes"][0] == pytest.approx([1.25, 2.5 * (67 / 80), 2.5, 4 * 67 / 80])
    assert targets[9]["jpg"] == raw[9]


def test_coco_size_mismatch_is_skipped(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg(30, 20, seed=0))
    (tmp_path / "b.jpg").write_bytes(_jpeg(30, 20, seed=1))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 20},
                       {"id": 2, "file_name": "b.jpg", "width": 60, "height": 40},
                       {"id": 3, "file_name": "missing.jpg", "width": 60, "height": 40}],
            "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert main([str(tmp_path / "c.json"), str(tmp_path / "out"), "--quiet"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_samples"] == 1
    assert sorted(index["metadata"]["skipped"]["paths"]) == ["b.jpg", "missing.jpg"]


def test_unlabelled_folder_and_webdataset_reads_it(tmp_path):
    import webdataset as wds

    src = tmp_path / "photos"
    (src / "nested").mkdir(parents=True)
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(_jpeg(32, 24, seed=i))
    (src / "nested" / "x.png").write_bytes(_jpeg(16, 16, seed=7, fmt="PNG"))
    # top-level images mean "unlabelled"; --unlabelled also walks sub-folders
    assert main([str(src), str(tmp_path / "out"), "--unlabelled", "--maxcount", "4", "--quiet"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["metadata"]["kind"] == "unlabelled" and index["num_samples"] == 6
    urls = [str(tmp_path / "out" / s["url"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == 6 and all("cls" not in s for s in samples)
    assert sorted(s.get("jpg", s.get("png")).size for s in samples) == [(16, 16)] + [(32, 24)] * 5


def test_writes_to_fsspec_urls(imagefolder, tmp_path):
    root, _ = imagefolder
    assert main([str(root), (tmp_path / "viafile").as_uri(), "--maxcount", "10", "--quiet"]) == 0
    index = json.loads((tmp_path / "viafile" / "index.json").read_text())
    assert index["num_samples"] == 18 and len(index["shards"]) == 2

    url = "memory://vitpretrain-test/shards"
    fs = fsspec.filesystem("memory")
    try:
        assert main([str(root), url, "--maxcount", "10", "--prefix", "val", "--quiet"]) == 0
        with fsspec.open(f"{url}/index.json", "r") as f:
            index = json.load(f)
        assert [s["url"] for s in index["shards"]] == ["val-000000.tar", "val-000001.tar"]
        for s in index["shards"]:
            data = fs.cat(f"/vitpretrain-test/shards/{s['url']}")
            assert len(data) == s["bytes"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                assert len([m for m in tar.getmembers() if m.name.endswith(".cls")]) == s["samples"]
    finally:
        fs.rm("/vitpretrain-test", recursive=True)


def test_missing_empty_and_unreadable_sources_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "embedded:" in err

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "holds no files" in capsys.readouterr().err

    (tmp_path / "classes" / "a").mkdir(parents=True)
    assert main([str(tmp_path / "classes"), str(tmp_path / "out")]) == 2
    assert "no files in them" in capsys.readouterr().err

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("html, not a jpeg")
    assert main([str(tmp_path / "junk"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "all 1 files were unreadable" in capsys.readouterr().err
    assert not (tmp_path / "out" / "index.json").exists()

    (tmp_path / "bad.json").write_text("{not json")
    assert main([str(tmp_path / "bad.json"), str(tmp_path / "out")]) == 2
    assert "Cannot read the COCO json" in capsys.readouterr().err


def test_cli_missing_source_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.write", str(tmp_path / "missing"), str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_write_shards_counts_skipped_records(tmp_path):
    items = [Sample(_jpeg(8, 8, seed=0), "jpg"), Skipped("x.jpg", "truncated"), Sample(_jpeg(8, 8, seed=1), "jpg")]
    result = write_shards(items, str(tmp_path), {"kind": "unlabelled", "source": "t"}, progress=False)
    assert result.num_samples == 2
    assert result.index["metadata"]["skipped"] == {"count": 1, "paths": ["x.jpg"]}
    with pytest.raises(SourceError):
        write_shards([Skipped("y.jpg", "bad")], str(tmp_path / "none"), {"source": "t"}, progress=False)
