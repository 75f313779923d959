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
    pixels are the white object's (the image moved with it) and its bounding box is the box within a pixel (crops
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
        xywh = box_convert(t["boxes"], "cxcywh", "xywh") * torch.tensor([w, h, w, h])
        for mask, box in zip(t["masks"], xywh):
            assert mask.any()
            torch.testing.assert_close(mask_boxes(mask[None])[0], box, atol=1.01, rtol=0)
            assert pixels[:, mask].mean() > 0.6  # resampling blurs edges: bright on average, not every pixel
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
