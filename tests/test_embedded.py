"""Embedded datasets: built from package data into a (temporary) cache, once, and reused."""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import embedded, masks
from data_pipeline.write import SourceError, main


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _samples(folder: Path) -> tuple[dict, list[dict[str, bytes]]]:
    index = json.loads((folder / "index.json").read_text())
    out: dict[str, dict[str, bytes]] = {}
    for entry in index["shards"]:
        with tarfile.open(folder / entry["url"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(f"{entry['url']}/{key}", {})[ext] = tar.extractfile(m).read()
    return index, list(out.values())


def test_other_urls_unchanged_and_unknown_names_rejected(cache):
    for url in ["/data/shards", "s3://bucket/train-{000000..000009}.tar", "a.tar,b.tar"]:
        assert embedded.resolve(url) == url
    with pytest.raises(SourceError, match="embedded:digits"):
        embedded.resolve("embedded:imagenet")
    assert not cache.exists()


def test_digits_builds_once_and_is_reused(cache, monkeypatch):
    path = Path(embedded.resolve("embedded:digits"))
    assert path == cache / "digits"
    index, samples = _samples(path)
    assert index["num_samples"] == len(samples) == 1437 and len(index["shards"]) == 16
    assert index["metadata"]["classes"] == [str(i) for i in range(10)]
    im = Image.open(io.BytesIO(samples[0]["png"]))
    assert im.size == (32, 32) and im.mode == "RGB"
    counts = collections.Counter(int(s["cls"]) for s in samples)
    assert set(counts) == set(range(10)) and min(counts.values()) >= 138  # 80% of 174..183 per class

    stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(path.iterdir())]
    monkeypatch.setattr(embedded, "write_shards", lambda *a, **k: pytest.fail("rebuilt a cached dataset"))
    assert embedded.resolve("embedded:digits") == str(path)
    assert [(p.name, p.stat().st_mtime_ns) for p in sorted(path.iterdir())] == stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".digits.tmp")]


def test_concurrent_callers_build_once(cache, monkeypatch):
    calls = []
    real = embedded.write_shards

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedded, "write_shards", counting)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(embedded.resolve("embedded:digits_val")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [str(cache / "digits_val")] * 3
    index = json.loads((cache / "digits_val" / "index.json").read_text())
    assert index["num_samples"] == 360 and {s["url"][:4] for s in index["shards"]} == {"val-"}


def test_stale_version_is_rebuilt(cache, monkeypatch):
    embedded.resolve("embedded:digits_val")
    entry = embedded.REGISTRY["digits_val"]
    monkeypatch.setitem(embedded.REGISTRY, "digits_val",
                        embedded.EmbeddedDataset(entry.description, entry.build, entry.shards, entry.prefix, 2))
    path = Path(embedded.resolve("embedded:digits_val"))
    assert json.loads((path / "index.json").read_text())["metadata"]["embedded"]["version"] == 2
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["digits_val"]


def test_photos_tiles_and_held_out_val(cache):
    index, samples = _samples(Path(embedded.resolve("embedded:photos")))
    assert index["num_samples"] == len(samples) == 4000 and len(index["shards"]) == 32
    assert index["metadata"]["kind"] == "unlabelled"
    photos = collections.Counter(json.loads(s["json"])["photo"] for s in samples)
    assert set(photos) == set(embedded.photo_names("train")) and not set(photos) & set(embedded.VAL_PHOTOS)
    for s in samples[:50]:
        assert Image.open(io.BytesIO(s["jpg"])).size == (96, 96)
        x, y, w, h = json.loads(s["json"])["crop_xywh"]
        assert w == h >= 96 and x >= 0 and y >= 0

    val_index, val = _samples(Path(embedded.resolve("embedded:photos_val")))
    assert val_index["num_samples"] == 300
    assert {json.loads(s["json"])["photo"] for s in val} == set(embedded.VAL_PHOTOS)


def test_cli_writes_embedded_dataset_anywhere(tmp_path, cache):
    assert main(["embedded:digits_val", (tmp_path / "out").as_uri(), "--quiet"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_samples"] == 360 and [s["url"] for s in index["shards"]][0] == "val-000000.tar"
    assert not cache.exists()  # writing elsewhere does not touch the cache


@pytest.mark.skipif(importlib.util.find_spec("deepforest") is None, reason="pip install --no-deps deepforest")
def test_trees_detection_boxes(cache):
    index, val = _samples(Path(embedded.resolve("embedded:trees_val")))
    assert index["metadata"]["categories"] == [{"id": 1, "name": "tree"}]
    assert len(index["shards"]) == index["num_samples"] == 8  # the quadrants of OSBS_029 and SOAP_061
    targets = {t["file_name"]: t for t in (json.loads(s["json"]) for s in val)}
    assert all((t["width"], t["height"]) == (200, 200) and set(t["category_ids"]) <= {1} for t in targets.values())
    # OSBS_029.xml's first box, xyxy 203,67,227,90, lies in the top-right quadrant
    assert [3, 67, 24, 23] in targets["OSBS_029_x200_y0.png"]["boxes"]
    assert 61 <= sum(len(t["boxes"]) for n, t in targets.items() if n.startswith("OSBS")) <= 61 + 10

    index, train = _samples(Path(embedded.resolve("embedded:trees")))
    assert index["num_samples"] == len(train) > 100
    for s in train:
        t = json.loads(s["json"])
        assert Image.open(io.BytesIO(s["jpg"])).size == (t["width"], t["height"]) == (400, 400)
        boxes = np.array(t["boxes"])
        assert len(boxes) > 0 and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] >= embedded.TREE_MIN_SIDE).all()
        assert (boxes[:, 0] + boxes[:, 2] <= 400).all() and (boxes[:, 1] + boxes[:, 3] <= 400).all()


def test_missing_packages_name_the_install_command(cache, monkeypatch):
    monkeypatch.setattr(embedded, "FASHION_DIR", cache / "no-such-dir")
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        embedded.resolve("embedded:fashion_mnist")
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError, match="pip install --no-deps deepforest"):
        embedded.resolve("embedded:trees")
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


@pytest.mark.skipif(not embedded.FASHION_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_reader():
    src = embedded.source("fashion_mnist_val")
    assert src.total == 10000 and len(src.metadata["classes"]) == 10
    first = next(iter(src.samples))
    assert Image.open(io.BytesIO(first.image)).size == (28, 28) and 0 <= first.cls < 10
    labels = embedded.read_idx(embedded.FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert np.bincount(labels).tolist() == [1000] * 10


@pytest.mark.skipif(not embedded.EMOJI_FONT.exists(), reason="apt-get install fonts-noto-color-emoji")
def test_emoji_boxes_are_exact_and_apart():
    glyphs = embedded.emoji_glyphs()
    assert len(glyphs) == len(embedded.EMOJI_CLASSES) >= 8
    rng = np.random.default_rng(0)
    for _ in range(40):
        objects = embedded._place_objects(rng, glyphs)
        assert embedded.EMOJI_OBJECTS[0] <= len(objects) <= embedded.EMOJI_OBJECTS[1]
        # composited onto black: every pixel that changed is inside a box, and each box's four edges touch a
        # changed pixel (the box is the tight box of what is visible)
        canvas = Image.new("RGBA", (embedded.EMOJI_SIZE, embedded.EMOJI_SIZE), (0, 0, 0, 255))
        for _, sprite, x, y in objects:
            canvas.alpha_composite(sprite, (x, y))
        changed = np.asarray(canvas.convert("RGB")).any(-1)
        inside = np.zeros_like(changed)
        for _, sprite, x, y in objects:
            w, h = sprite.size
            assert 0 <= x and x + w <= embedded.EMOJI_SIZE and 0 <= y and y + h <= embedded.EMOJI_SIZE
            assert max(w, h) <= embedded.EMOJI_SIDE[1]
            assert not inside[y:y + h, x:x + w].any()  # no two boxes overlap
            inside[y:y + h, x:x + w] = True
            alpha = np.asarray(sprite.getchannel("A")) > 0
            assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()
        assert not (changed & ~inside).any()


@pytest.mark.skipif(not embedded.EMOJI_FONT.exists(), reason="apt-get install fonts-noto-color-emoji")
def test_emoji_detection_set(cache):
    index, val = _samples(Path(embedded.resolve("embedded:emoji_val")))
    meta = index["metadata"]
    assert [c["name"] for c in meta["categories"]][:3] == ["red apple", "dog face", "automobile"]
    assert index["num_samples"] == len(val) == embedded.EMOJI_VAL_IMAGES
    # the held-out backgrounds only
    assert all(n in meta["source"] for n in embedded.VAL_PHOTOS)
    assert not any(n in meta["source"] for n in embedded.photo_names("train"))
    per_image, classes = [], collections.Counter()
    assert meta["masks"] is True and meta["embedded"]["version"] == 2
    for s in val:
        t = json.loads(s["json"])
        assert Image.open(io.BytesIO(s["jpg"])).size == (t["width"], t["height"]) == (embedded.EMOJI_SIZE,) * 2
        per_image.append(len(set(t["category_ids"])))
        classes.update(t["category_ids"])
        # one exact mask per box: the glyph's pixels, whose extent is the box; no two overlap
        stack = masks.decode_stack(t["segmentation"], t["height"], t["width"])
        assert len(stack) == len(t["boxes"]) and (stack.sum(0) <= 1).all()
        assert [masks.bbox(r) for r in t["segmentation"]] == t["boxes"]
    assert set(classes) == {c["id"] for c in meta["categories"]}  # every class is in the validation set
    assert np.mean([n >= 2 for n in per_image]) > 0.5              # most images hold several classes
    assert sum(classes.values()) == meta["num_boxes"]


def test_emoji_without_the_font_names_the_package(cache, monkeypatch):
    monkeypatch.setattr(embedded, "EMOJI_FONT", cache / "NotoColorEmoji.ttf")
    with pytest.raises(SourceError, match="apt-get install fonts-noto-color-emoji"):
        embedded.resolve("embedded:emoji_val")


@pytest.mark.skipif(importlib.util.find_spec("stardist") is None, reason="pip install --no-deps stardist")
def test_nuclei_masks_are_the_label_map(cache):
    """nuclei_val: 16 tiles of 128 px of stardist's DSB 2018 image; each tile's pixels are img2d.tif's and each of
    its masks is exactly one label of mask2d.tif in that tile, with its box; every nucleus is in some tile."""
    import tifffile

    folder = embedded.stardist_images_dir()
    image, labels = tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")
    index, val = _samples(Path(embedded.resolve("embedded:nuclei_val")))
    meta = index["metadata"]
    assert index["num_samples"] == len(index["shards"]) == 16
    assert meta["categories"] == [{"id": 1, "name": "nucleus"}] and meta["masks"] is True and meta["nuclei"] == 125
    found, boxes = set(), 0
    for s in val:
        t = json.loads(s["json"])
        x0, y0 = (int(v[1:]) for v in t["file_name"].removesuffix(".png").split("_")[1:])
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert pixels.shape == (128, 128, 3) and (pixels[..., 0] == image[y0:y0 + 128, x0:x0 + 128]).all()
        tile = labels[y0:y0 + 128, x0:x0 + 128]
        for rle, box in zip(t["segmentation"], t["boxes"]):
            mask = masks.decode(rle).astype(bool)
            (label,) = np.unique(tile[mask])
            assert label > 0 and (mask == (tile == label)).all() and masks.bbox(rle) == box
            found.add(int(label))
        boxes += len(t["boxes"])
    assert boxes == meta["num_boxes"] and len(found) == 125


def test_nuclei_without_stardist_names_the_install(cache, monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError, match="pip install --no-deps stardist"):
        embedded.resolve("embedded:nuclei_val")
