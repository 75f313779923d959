"""Instance masks: COCO polygons, RLE and uncompressed RLE written to shards as compressed RLE, scaled by --resize,
read back through build_stream and the box-aware transforms with masks still on their objects' pixels and boxes,
checked by inspect --verify, and the embedded mask sets (emoji glyph alpha, stardist's DSB 2018 nuclei)."""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from data_pipeline import masks
from data_pipeline.detection_transforms import (DetectionEvalTransform, DetectionTrainTransform, PadCollate,
                                                mask_boxes, read_target)
from data_pipeline.stream import SkipSample, build_stream, decode_sample
from data_pipeline.write import main as write_main

W, H = 96, 64
TRIANGLE = [10.0, 8.0, 40.0, 8.0, 10.0, 50.0]  # a polygon (x, y pairs)


def _shapes() -> dict[str, np.ndarray]:
    """The instances of image 1 as [H, W] bool arrays: a triangle (from PIL, an oracle independent of
    pycocotools), a disc, an L shape and a single pixel."""
    tri = Image.new("L", (W, H))
    ImageDraw.Draw(tri).polygon(TRIANGLE, fill=1)
    yy, xx = np.mgrid[:H, :W]
    disc = (xx - 70) ** 2 + (yy - 20) ** 2 <= 12 ** 2
    ell = np.zeros((H, W), bool)
    ell[40:60, 50:56] = True
    ell[54:60, 50:80] = True
    dot = np.zeros((H, W), bool)
    dot[3, 90] = True
    return {"triangle": np.asarray(tri).astype(bool), "disc": disc, "ell": ell, "dot": dot}


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def test_rle_counts_are_read_and_checked():
    """The vectorised reader of compressed counts gives the run lengths of random masks (counted here from the
    pixels); truncated, out-of-alphabet and short strings are refused, which pycocotools would decode silently."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = rng.random((h, w)) < rng.random()
        rle = masks.encode(mask)
        assert masks._runs(rle["counts"].encode()).tolist() == _uncompressed(mask)["counts"]
        assert (masks.decode(rle) == mask).all()
    rle = masks.encode(_shapes()["disc"])
    for counts, error in [(rle["counts"][:-4], "cover|truncated"), (rle["counts"] + "~", "alphabet"),
                          (rle["counts"][:-1] + "o", "truncated")]:
        with pytest.raises(masks.MaskError, match=error):
            masks.decode({**rle, "counts": counts})


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """A COCO json with the four instances of image 1 (polygon, compressed RLE with bytes-like str counts,
    uncompressed RLE, uncompressed single pixel) painted white on black, and image 2 whose second annotation has no
    segmentation (its sample keeps its boxes, without masks)."""
    root = tmp_path_factory.mktemp("coco_masks")
    shapes = _shapes()
    pixels = np.zeros((H, W, 3), np.uint8)
    for m in shapes.values():
        pixels[m] = 255
    Image.fromarray(pixels).save(root / "a.png")
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(root / "b.png")
    disc_rle = mask_utils.encode(np.asfortranarray(shapes["disc"].astype(np.uint8)))
    segmentations = {"triangle": [TRIANGLE], "disc": {"size": [H, W], "counts": disc_rle["counts"].decode()},
                     "ell": _uncompressed(shapes["ell"]), "dot": _uncompressed(shapes["dot"])}
    boxes = {k: _bbox(m) for k, m in shapes.items()}
    # the box of what pycocotools rasterises (COCO's own bbox, the polygon's extent, may differ by a pixel)
    boxes["triangle"] = mask_utils.toBbox(mask_utils.merge(mask_utils.frPyObjects([TRIANGLE], H, W))).tolist()
    anns = [{"id": i + 1, "image_id": 1, "bbox": boxes[k], "category_id": 1 + i % 2, "iscrowd": 0,
             "segmentation": segmentations[k]} for i, k in enumerate(shapes)]
    anns += [{"id": 10, "image_id": 2, "bbox": [1, 1, 10, 10], "category_id": 1,
              "segmentation": [[1, 1, 11, 1, 11, 11]]},
             {"id": 11, "image_id": 2, "bbox": [20, 5, 8, 8], "category_id": 2}]
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                       {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
            "annotations": anns, "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def _written(folder: Path) -> tuple[dict, dict[int, dict]]:
    """index.json and {image_id: {"json": dict, "png": bytes, ...}} read straight from the tars."""
    index = json.loads((folder / "index.json").read_text())
    samples: dict[str, dict] = {}
    for entry in index["shards"]:
        with tarfile.open(folder / entry["url"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key, "__url__": entry["url"]})[ext] = tar.extractfile(m).read()
    return index, {json.loads(s["json"])["image_id"]: s for s in samples.values()}


@pytest.fixture(scope="module")
def shards(coco_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mask_shards") / "plain"
    assert write_main([str(coco_dir / "instances.json"), str(out), "--quiet"]) == 0
    return out


def test_writer_stores_compressed_rle_per_box(shards):
    index, samples = _written(shards)
    assert index["metadata"]["masks"] is True and index["num_samples"] == 2
    t = json.loads(samples[1]["json"])
    shapes = _shapes()
    assert len(t["segmentation"]) == len(t["boxes"]) == 4
    for rle, box, (name, truth) in zip(t["segmentation"], t["boxes"], shapes.items()):
        assert rle["size"] == [H, W] and isinstance(rle["counts"], str)  # text in the json, compressed
        decoded = masks.decode(rle).astype(bool)
        if name == "triangle":  # pycocotools' rasteriser against PIL's: the same triangle up to edge pixels
            assert (decoded & truth).sum() / (decoded | truth).sum() > 0.9
        else:
            assert (decoded == truth).all(), name
        assert masks.problem(rle, W, H, box) is None
    other = json.loads(samples[2]["json"])  # one annotation without a segmentation: boxes only
    assert "segmentation" not in other and len(other["boxes"]) == 2


def test_resize_scales_masks_with_the_image(coco_dir, tmp_path):
    assert write_main([str(coco_dir / "instances.json"), str(tmp_path / "small"), "--resize", "32", "--quiet"]) == 0
    _, samples = _written(tmp_path / "small")
    t = json.loads(samples[1]["json"])
    assert Image.open(io.BytesIO(samples[1]["png"])).size == (48, 32) == (t["width"], t["height"])
    for rle, box, (name, truth) in zip(t["segmentation"], t["boxes"], _shapes().items()):
        small = masks.decode(rle).astype(bool)
        assert small.shape == (32, 48)
        assert masks.problem(rle, 48, 32, box) is None, name  # decodes, non-empty, its box matches the scaled box
        if name != "dot":
            area_half = np.asarray(Image.fromarray(truth.astype(np.float32)).resize((48, 32), Image.Resampling.BOX))
            expected = area_half >= 0.5
            assert (small & expected).sum() / (small | expected).sum() > 0.9, name
    assert masks.decode(t["segmentation"][3]).sum() == 1  # a pixel a quarter covered keeps its one pixel

    # the embedded datasets' path (resize_samples, as `write embedded:NAME --resize`) scales them the same way
    from data_pipeline.shard_writer import Sample, resize_samples

    png = (coco_dir / "a.png").read_bytes()
    segmentation = [masks.encode(m) for m in _shapes().values()]
    boxes = [_bbox(m) for m in _shapes().values()]
    (out,) = resize_samples([Sample(png, "png", json={"width": W, "height": H, "boxes": boxes, "area": [1.0] * 4,
                                                      "segmentation": segmentation})], 32)
    assert [r["size"] for r in out.json["segmentation"]] == [[32, 48]] * 4
    # the same masks as the COCO path's (the triangle aside: there pycocotools rasterised the polygon, here PIL)
    assert out.json["segmentation"][1:] == t["segmentation"][1:]


def test_malformed_segmentations_skip_the_image(tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "c.png")
    coco = {"images": [{"id": i, "file_name": f"{n}.png", "width": 30, "height": 20} for i, n in enumerate("abc")],
            "annotations": [
                {"id": 1, "image_id": 0, "bbox": [0, 0, 5, 5], "category_id": 1,
                 "segmentation": {"size": [40, 30], "counts": [0, 1200]}},           # another frame
                {"id": 2, "image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 1,
                 "segmentation": [["x", 1, 2, 3, 4, 5]]},                           # not numbers
                {"id": 3, "image_id": 2, "bbox": [0, 0, 5, 5], "category_id": 1,
                 "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]}],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert write_main([str(tmp_path / "c.json"), str(tmp_path / "out"), "--quiet"]) == 0
    index, samples = _written(tmp_path / "out")
    assert sorted(index["metadata"]["skipped"]["paths"]) == ["a.png", "b.png"] and list(samples) == [2]
    with pytest.raises(masks.MaskError, match="20x30"):
        masks.to_rle({"size": [40, 30], "counts": [0, 1200]}, 20, 30)


def _decoded(shards: Path, image_id: int) -> dict:
    return decode_sample(_written(shards)[1][image_id])


def test_train_transform_keeps_masks_on_boxes_and_pixels(shards):
    """Flips, multi-scale resizes and random size crops: each mask is [H, W] of the output, bool, one per box; its
    pixels are the white object's (the image moved with it) and its bounding box is the box within 2 pixels (crops
    recompute a cut object's box from its mask)."""
    sample = _decoded(shards, 1)
    transform = DetectionTrainTransform(scales=(40, 48, 56), max_size=100, crop_resize=(48, 64), crop_size=(24, 48),
                                        mean=(0.5,) * 3, std=(0.5,) * 3)
    random.seed(0)
    torch.manual_seed(0)
    counts, flipped_x = set(), set()
    for _ in range(40):
        out = transform(sample)
        image, t = out["image"], out["target"]
        h, w = t["size"].tolist()
        assert t["masks"].dtype == torch.bool and t["masks"].shape == (len(t["boxes"]), h, w)
        assert len(t["category_ids"]) == len(t["boxes"])
        pixels = image * 0.5 + 0.5  # back to [0, 1]
        xyxy = box_convert(t["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        for mask, box in zip(t["masks"], xyxy):
            assert mask.any()
            # each edge within 2 px: a nearest resize moves it by up to half a pixel, the crop path's two resizes
            # (the first then scaled up by the second) by more
            torch.testing.assert_close(box_convert(mask_boxes(mask[None]), "xywh", "xyxy")[0], box, atol=2.0, rtol=0)
            if mask.sum() >= 9:  # antialiasing blurs edges and dims the dot: bright on average, not every pixel
                assert pixels[:, mask].mean() > 0.6
        # the masks together are the white pixels (a mask left unflipped or uncropped would miss them)
        union, white = t["masks"].any(0), pixels.mean(0) > 0.5
        assert (union & white).sum() / (union | white).sum() > 0.75
        counts.add(len(t["boxes"]))
        if len(t["boxes"]) >= 3 and abs(w / h - W / H) < 0.04:  # not cropped (the dot is too small to keep): the
            # triangle, the first mask, is on the left or, flipped, on the right
            flipped_x.add(bool(mask_boxes(t["masks"][:1])[0, 0] > w / 2))
    assert len(counts) > 1 and flipped_x == {True, False}  # crops dropped instances; both flips happened


def test_stream_eval_transform_and_collate_carry_masks(shards):
    """build_stream -> DetectionEvalTransform -> PadCollate: masks at the resized size; a sample without
    segmentation has no masks (DETR's targets unchanged); masks=False skips decoding."""
    stream = build_stream(str(shards), DetectionEvalTransform(32, 100, mean=(0.5,) * 3, std=(0.5,) * 3),
                          batch_size=2, num_workers=0, train=False, collate_fn=PadCollate(8),
                          required=("image", "json"))
    (batch,) = list(stream)
    targets = {int(t["image_id"]): t for t in batch["targets"]}
    a = targets[1]
    assert a["size"].tolist() == [32, 48] and a["masks"].shape == (4, 32, 48)
    for mask, box in zip(a["masks"], box_convert(a["boxes"], "cxcywh", "xywh") * torch.tensor([48, 32, 48, 32])):
        torch.testing.assert_close(mask_boxes(mask[None])[0], box, atol=1.01, rtol=0)
    assert "masks" not in targets[2] and len(targets[2]["boxes"]) == 2
    plain = DetectionEvalTransform(32, 100, masks=False)(_decoded(shards, 1))
    assert "masks" not in plain["target"]


def test_read_target_rejects_masks_that_do_not_fit(shards):
    sample = _decoded(shards, 1)
    _, target = read_target(sample)
    assert target["masks"].shape == (4, H, W) and target["masks"].dtype == torch.uint8
    short = {**sample, "json": {**sample["json"], "segmentation": sample["json"]["segmentation"][:3]}}
    with pytest.raises(SkipSample) as err:
        read_target(short)
    assert err.value.reason == "corrupt_mask" and "3 masks for 4 boxes" in err.value.detail
    rle = sample["json"]["segmentation"][1]
    cut = {**sample, "json": {**sample["json"], "segmentation": list(sample["json"]["segmentation"])}}
    cut["json"]["segmentation"][1] = {**rle, "counts": rle["counts"][:-2]}
    with pytest.raises(SkipSample) as err:
        read_target(cut)
    assert err.value.reason == "corrupt_mask" and "truncated" in err.value.detail


def test_crop_gives_a_cut_object_the_box_of_its_mask(monkeypatch):
    """A window whose corner cuts the corner of the disc's box: the disc's box becomes the box of its one remaining
    pixel (the clipped box, 5 x 5, would be loose), a square inside the window keeps its box exactly, the triangle
    outside gets an empty box (dropped by the sanitiser)."""
    from torchvision import tv_tensors

    from data_pipeline.detection_transforms import RandomSizeCrop

    shapes = _shapes()
    square = np.zeros((H, W), bool)
    square[40:50, 85:92] = True
    stack = np.stack([shapes["disc"], square, shapes["triangle"]])
    boxes = torch.tensor([_bbox(m) for m in stack])
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=(H, W)),
              "masks": tv_tensors.Mask(torch.from_numpy(stack.astype(np.uint8)))}
    draws = iter([18, 36, 28, 78])  # width, height, top, left: the window x 78..96, y 28..64
    monkeypatch.setattr(random, "randint", lambda a, b: next(draws))
    image, out = RandomSizeCrop(10, 100)(Image.new("RGB", (W, H)), target)
    assert image.size == (18, 36) and out["masks"].shape == (3, 36, 18)
    disc, kept, gone = out["boxes"].tolist()
    assert disc == _bbox(shapes["disc"][28:, 78:]) == [0.0, 0.0, 1.0, 1.0]
    assert F.clamp_bounding_boxes(F.crop(target["boxes"], 28, 78, 36, 18))[0].tolist() == [0.0, 0.0, 5.0, 5.0]
    assert kept == [7.0, 12.0, 7.0, 10.0]
    assert gone[2] * gone[3] == 0
    assert mask_boxes(out["masks"]).tolist()[:2] == [disc, kept]


def test_inspect_verify_decodes_every_mask(tmp_path, capsys):
    """inspect --verify: a truncated RLE, a mask of another size, an empty one, one far from its box and a missing
    mask are reported by key as corrupt_mask; the good sample's masks are counted."""
    from data_pipeline.inspect import main as inspect_main
    from data_pipeline.shard_writer import Sample, encode_image, write_shards

    shapes = _shapes()
    png = encode_image(Image.new("RGB", (W, H)), "png")[0]
    good = [masks.encode(shapes[k]) for k in ("disc", "ell")]
    boxes = [_bbox(shapes[k]) for k in ("disc", "ell")]
    empty = masks.encode(np.zeros((H, W), bool))
    variants = {
        "good": good,
        "truncated": [good[0], {**good[1], "counts": good[1]["counts"][:-3]}],
        "other_size": [good[0], masks.encode(np.ones((H // 2, W), bool))],
        "empty": [empty, good[1]],
        "off_box": [good[1], good[0]],  # each mask with the other's box
        "missing": good[:1],
    }
    samples = [Sample(png, "png", json={"image_id": i, "width": W, "height": H, "boxes": boxes,
                                        "category_ids": [1, 1], "segmentation": segmentation})
               for i, segmentation in enumerate(variants.values())]
    write_shards(samples, str(tmp_path / "set"), {"kind": "detection", "masks": True}, maxcount=3, progress=False)
    assert inspect_main([str(tmp_path / "set"), "--verify", "--workers", "1", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["verify"]
    details = {int(entry["key"]): entry["detail"] for entry in report["bad"] if entry["reason"] == "corrupt_mask"}
    expected = {1: "truncated", 2: "32x96 (h x w), the image 64x96", 3: "mask is empty", 4: "does not match the box",
                5: "1 masks for 2 boxes"}
    assert sorted(details) == sorted(expected) and report["by_reason"] == {"corrupt_mask": 5}
    assert all(expected[k] in details[k] for k in expected), details
    assert report["masks"]["samples"] == 6 and report["masks"]["boxes"] == 12
    assert report["masks"]["masks"] == 2 + 1 + 1  # the good sample's two, and the good ones before a bad one
    assert 0 < report["masks"]["mean_cover"] < 0.1
    assert inspect_main([str(tmp_path / "set"), "--verify", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "masks: 6 of 6 samples carry masks; 4 good masks for 12 boxes" in out
    assert "BAD 000003  corrupt_mask" in out and "mask 0: mask is empty" in out
