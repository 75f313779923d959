"""finetune_detr: box-aware transforms, padding masks, COCO mAP through pycocotools, boxes drawn for TensorBoard,
backbones (scratch, an MAE export) with resampled positions, and whole runs on real shards written from a COCO json
(one process, and two under the DeepSpeed launcher)."""
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.ops import box_convert

from data_pipeline.detection_transforms import DetectionEvalTransform, DetectionTrainTransform, PadCollate
from data_pipeline.write import main as write_main
from finetune import backbone as bb
from finetune.detr.coco_eval import CocoEvaluator, coco_map, post_process
from finetune.detr.task import DETRConfig, DETRTask, draw_detections
from launch import finetune_detr
from launch.runtime import config

ROOT = Path(__file__).resolve().parents[1]
JOB = "finetune_detr"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# A detector small enough for CPU tests: ViT 2 x 32 at patch 8, a 1 + 1 layer 32-wide transformer, 10 queries.
TINY_MODEL = ["model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.hidden_dim=32",
              "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64",
              "model.num_queries=10", "model.scales=48,64", "model.max_size=80", "model.crop_resize=56,64",
              "model.crop_size=32,48", "model.eval_size=64"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- data ------------------------------------------------------------------------------------------------------

def painted_sample(w: int = 120, h: int = 90) -> dict:
    """A black image with white boxes (one touching the right edge) and a crowd box, as the stream decodes it."""
    boxes = [[10, 12, 30, 20], [60, 40, 25, 35], [w - 20, 5, 20, 30]]
    pixels = np.zeros((h, w, 3), np.uint8)
    for x, y, bw, bh in boxes:
        pixels[y:y + bh, x:x + bw] = 255
    meta = {"image_id": 7, "width": w, "height": h, "boxes": boxes + [[0, 60, 10, 10]],
            "category_ids": [3, 1, 3, 1], "iscrowd": [0, 0, 0, 1], "area": [600.0, 875.0, 600.0, 100.0]}
    return {"__key__": "k", "image": Image.fromarray(pixels), "json": meta}


def box_pixels(image: torch.Tensor, boxes: torch.Tensor) -> list[float]:
    """Mean de-normalised brightness inside each normalised cxcywh box (shrunk by a pixel against resampling)."""
    h, w = image.shape[1:]
    pixels = image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    out = []
    for x0, y0, x1, y1 in (box_convert(boxes, "cxcywh", "xyxy") * torch.tensor([w, h, w, h])).tolist():
        out.append(pixels[:, math.ceil(y0) + 1:int(y1) - 1, math.ceil(x0) + 1:int(x1) - 1].mean().item())
    return out


def test_train_transform_moves_boxes_with_the_pixels():
    """Flip, multi-scale resize and random size crop: every kept box still covers white pixels only, the clipped
    ones stay inside the image, the crowd box is gone, the category ids follow their boxes."""
    transform = DetectionTrainTransform(scales=(60, 72), max_size=100, crop_resize=(80,), crop_size=(30, 60),
                                        mean=MEAN, std=STD)
    random.seed(0)
    torch.manual_seed(0)
    sizes, counts, flipped = set(), set(), set()
    for _ in range(40):
        out = transform(painted_sample())
        image, t = out["image"], out["target"]
        boxes = t["boxes"]
        assert image.shape[1:] == tuple(t["size"].tolist()) and min(image.shape[1:]) <= 72
        assert t["orig_size"].tolist() == [90, 120] and int(t["image_id"]) == 7
        assert (t["iscrowd"] == 0).all() and len(t["category_ids"]) == len(boxes) == len(t["area"])
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all() and (boxes[:, 2:] > 0).all()
        assert all(v > 0.95 for v in box_pixels(image, boxes) if not math.isnan(v))
        sizes.add(tuple(image.shape[1:]))
        counts.add(len(boxes))
        if len(boxes) == 3:  # not cropped: the category-1 box (centre x 72.5 of 120) is on the left when mirrored
            (cx,) = boxes[t["category_ids"] == 1, 0].tolist()
            assert cx == pytest.approx(72.5 / 120, abs=0.02) or cx == pytest.approx(47.5 / 120, abs=0.02)
            flipped.add(cx < 0.5)
    assert len(sizes) > 3 and len(counts) > 1 and flipped == {True, False}  # scales, crops, flips all happened


def test_eval_transform_and_padding_collate():
    transform = DetectionEvalTransform(60, max_size=100, mean=MEAN, std=STD)
    a = transform(painted_sample())
    b = transform(painted_sample(w=40, h=90))
    assert a["image"].shape == (3, 60, 80) and b["image"].shape == (3, 100, 44)  # longer side capped: 135 -> 100
    t = a["target"]
    assert t["orig_boxes"].tolist()[3] == [0, 60, 10, 10] and t["iscrowd"].tolist() == [0, 0, 0, 1]  # crowd kept
    assert all(v > 0.95 for v in box_pixels(a["image"], t["boxes"][:3]))
    torch.testing.assert_close(box_convert(t["boxes"], "cxcywh", "xywh") * 1.5 * torch.tensor([80, 60, 80, 60]),
                               t["orig_boxes"], atol=1e-3, rtol=0)
    batch = PadCollate(16)([a, b])
    assert batch["image"].shape == (2, 3, 112, 80) and batch["mask"].shape == (2, 112, 80)
    assert not batch["mask"][0, :60, :80].any() and batch["mask"][0, 60:].all()
    assert not batch["mask"][1, :100, :44].any() and batch["mask"][1, :, 44:].all()
    assert (batch["image"][0, :, :60, :80] == a["image"]).all() and (batch["image"][0, :, 60:] == 0).all()
    assert batch["targets"][1] is b["target"]


# --- mAP -------------------------------------------------------------------------------------------------------

def test_perfect_predictions_score_map_1_with_category_id_gaps():
    """Ground truth with COCO-like id gaps (1, 5, 90), predictions equal to it through post_process from the
    normalised model outputs of a contiguous head: every AP is 1.0; no matches: 0."""
    ids = [1, 5, 90]
    evaluator = CocoEvaluator(ids, [{"id": i, "name": f"c{i}"} for i in ids])
    g = torch.Generator().manual_seed(0)
    for image_id, (h, w) in enumerate([(100, 150), (80, 60), (120, 120)], start=3):
        n = 3
        xy = torch.rand(n, 2, generator=g) * 0.5
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        norm_xywh = torch.cat([xy, wh], 1)
        orig = norm_xywh * torch.tensor([w, h, w, h])
        labels = torch.randint(0, 3, (n,), generator=g)
        evaluator.add_ground_truth({"image_id": torch.tensor(image_id), "orig_size": torch.tensor([h, w]),
                                    "orig_boxes": orig, "category_ids": torch.tensor(ids)[labels],
                                    "iscrowd": torch.zeros(n, dtype=torch.int64), "area": orig[:, 2] * orig[:, 3]})
        logits = torch.full((1, 5, 4), -10.0)
        logits[0, :, 3] = 10.0                               # 2 spare queries say no-object
        logits[0, torch.arange(n), labels] = 10.0
        logits[0, torch.arange(n), 3] = -10.0
        boxes = torch.full((1, 5, 4), 0.5)
        boxes[0, :n] = box_convert(norm_xywh, "xywh", "cxcywh")
        (result,) = post_process(logits, boxes, torch.tensor([[h, w]]))
        evaluator.add_predictions(image_id, result)
    stats = evaluator.summarize()
    assert stats["map"] == pytest.approx(1.0) and stats["map50"] == pytest.approx(1.0)
    assert stats["map75"] == pytest.approx(1.0) and stats["mar100"] == pytest.approx(1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + 500, *d["bbox"][1:]]} for d in evaluator.detections]
    assert coco_map(evaluator.images, evaluator.annotations, shifted)["map"] == 0.0


def test_per_class_ap_equals_cocoeval_restricted_to_each_category():
    """Random ground truth of categories 1, 3, 8 and noisy detections of 1, 3 and 12 on 6 images (one with more
    than 10 detections): the per-class AP and AP50 equal COCOeval run with params.catIds=[c]; category 8 (no
    detections) scores 0, category 12 (no ground truth) is not reported; names with a space or a slash become one
    tag each, a clash gets the id."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    categories = [{"id": 1, "name": "traffic light"}, {"id": 3, "name": "traffic/light"}, {"id": 8, "name": "dog"},
                  {"id": 12, "name": "cat"}]
    images, annotations, detections = [], [], []
    for image_id in range(1, 7):
        images.append({"id": image_id, "height": 100, "width": 120})
        for _ in range(int(rng.integers(2, 6))):
            x, y, w, h = (float(v) for v in (*rng.uniform(0, 60, 2), *rng.uniform(10, 50, 2)))
            cat = int(rng.choice([1, 3, 8]))
            annotations.append({"image_id": image_id, "bbox": [x, y, w, h], "category_id": cat, "iscrowd": 0,
                                "area": w * h})
            if cat != 8 and rng.random() < 0.8:  # a detection near the box (IoU from ~1 to ~0), mostly confident
                jitter = rng.normal(0, rng.choice([1.0, 3.0, 10.0]), 4)
                detections.append({"image_id": image_id, "bbox": [x + jitter[0], y + jitter[1],
                                                                  max(2.0, w + jitter[2]), max(2.0, h + jitter[3])],
                                   "score": float(rng.uniform(0.2, 1)), "category_id": cat})
        for _ in range(2):  # false positives, some of a category absent from the ground truth
            detections.append({"image_id": image_id, "bbox": [*rng.uniform(0, 80, 2).tolist(), 20.0, 20.0],
                               "score": float(rng.uniform(0, 0.8)), "category_id": int(rng.choice([1, 3, 12]))})
    # image 1: a category-1 box found only by its 12th best detection, so that maxDets 100 counts it and 10 would not
    annotations.append({"image_id": 1, "bbox": [90.0, 70.0, 25.0, 25.0], "category_id": 1, "iscrowd": 0,
                        "area": 625.0})
    detections += [{"image_id": 1, "bbox": [95.0, 2.0 + 8 * i, 5.0, 5.0], "score": 0.9 + 0.005 * i, "category_id": 1}
                   for i in range(11)]
    detections.append({"image_id": 1, "bbox": [90.0, 70.0, 25.0, 25.0], "score": 0.15, "category_id": 1})
    stats = coco_map(images, annotations, detections, categories)

    gt = COCO()
    gt.dataset = {"images": images, "annotations": [{**a, "id": i + 1} for i, a in enumerate(annotations)],
                  "categories": categories}
    gt.createIndex()
    dt = gt.loadRes(detections)
    for cid, tag in ((1, "traffic_light"), (3, "traffic_light_3"), (8, "dog")):
        oracle = COCOeval(gt, dt, iouType="bbox")
        oracle.params.catIds = [cid]
        oracle.evaluate()
        oracle.accumulate()
        oracle.summarize()
        assert stats[f"ap_per_class/{tag}"] == pytest.approx(oracle.stats[0], abs=1e-12), tag
        assert stats[f"ap50_per_class/{tag}"] == pytest.approx(oracle.stats[1], abs=1e-12), tag
    assert stats["ap_per_class/dog"] == 0.0 and stats["ap50_per_class/dog"] == 0.0
    assert all(0 < stats[f"ap_per_class/{t}"] < stats[f"ap50_per_class/{t}"] < 1
               for t in ("traffic_light", "traffic_light_3"))
    per_class = {k for k in stats if "_per_class/" in k}
    assert per_class == {f"{p}_per_class/{t}" for p in ("ap", "ap50") for t in ("traffic_light", "traffic_light_3",
                                                                                 "dog")}
    # no detections at all: every category with ground truth scores 0, the others are absent
    empty = coco_map(images, annotations, [], categories)
    assert {k for k in empty if "_per_class/" in k} == per_class and not any(empty[k] for k in per_class)


# --- pictures --------------------------------------------------------------------------------------------------

def test_drawn_boxes_land_where_the_data_says():
    """A ground-truth box through the eval transform and collate, drawn: green exactly on its outline pixels."""
    sample = painted_sample()
    out = DetectionEvalTransform(90, max_size=200, mean=MEAN, std=STD)(sample)  # size unchanged: 90 x 120
    target = out["target"]
    picture = draw_detections(out["image"], target["boxes"][:1], torch.zeros(0, 4), MEAN, STD)
    assert picture.shape == (3, 90, 120) and 0 <= picture.min() and picture.max() <= 1
    x, y, w, h = sample["json"]["boxes"][0]                 # [10, 12, 30, 20]
    green = (picture[1] == 1) & (picture[0] == 0) & (picture[2] == 0)
    ys, xs = torch.nonzero(green, as_tuple=True)
    assert (xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()) == (x, y, x + w, y + h)
    assert green[y, x:x + w].all() and green[y:y + h, x].all()  # the top and left edges
    # labelled: the name on a green patch inside the box's top-left corner, the rest of the picture unchanged
    labelled = draw_detections(out["image"], target["boxes"][:1], torch.zeros(0, 4), MEAN, STD, gt_labels=["a"])
    ys, xs = torch.nonzero((labelled != picture).any(0), as_tuple=True)
    assert len(ys) and xs.min() > x and ys.min() > y and xs.max() < x + w and ys.max() < y + h


def test_pictures_label_boxes_with_category_names_and_skip_padding(monkeypatch):
    """task.images: ground truth labelled with its category's name, every prediction (draw_score 0) with the name of
    its best class (contiguous classes: categories by id) and its score; the stream's padding sample not drawn."""
    import finetune.detr.task as detr_task

    task = DETRTask(DETRConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2, hidden_dim=32, nheads=2,
                               enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=5, num_classes=2,
                               draw_score=0.0))
    task.on_dataset({"kind": "detection", "categories": [{"id": 7, "name": "seven"}, {"id": 2, "name": "two"}]})
    samples = []
    for w in (120, 90, 60):
        sample = painted_sample(w=w)
        sample["json"]["category_ids"] = [7, 2, 7, 2]
        samples.append(DetectionEvalTransform(64, 128, mean=task.mean, std=task.std)(sample))
    batch = {**PadCollate(task.model.size_divisibility)(samples), "is_padding": torch.tensor([False, True, False])}
    drawn = []
    monkeypatch.setattr(detr_task, "draw_detections", lambda image, gt, pred, mean, std, **labels: drawn.append(
        (image.shape, len(pred), labels)) or torch.zeros(3, 1, 1))
    pictures = task.images(task.model, batch)
    assert sorted(pictures) == ["detections/0", "detections/1"] and task.model.training
    with torch.no_grad():
        scores, labels = task.model.eval()(batch["image"], batch["mask"])["pred_logits"].softmax(-1)[..., :-1].max(-1)
    for (shape, n, got), i in zip(drawn, (0, 2)):
        assert shape[1:] == tuple(samples[i]["target"]["size"].tolist()) and n == 5
        assert got["gt_labels"] == ["seven", "two", "seven", "two"]
        assert got["pred_labels"] == [f"{['two', 'seven'][c]} {p:.2f}" for c, p in zip(labels[i].tolist(),
                                                                                        scores[i].tolist())]


# --- backbones and the job -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory) -> dict[str, str]:
    """Train and val shards written by data_pipeline.write from a COCO json: 16 (8) noisy 64-px images with 1-3
    bright squares of categories 2 and 7 (a gap), some images without boxes; 4 shards each."""
    root = tmp_path_factory.mktemp("coco")
    urls = {}
    for split, n in (("train", 16), ("val", 8)):
        rng = np.random.default_rng(len(split))
        folder = root / split
        folder.mkdir()
        coco = {"images": [], "annotations": [], "categories": [{"id": 2, "name": "two"}, {"id": 7, "name": "seven"}]}
        for i in range(n):
            w, h = int(rng.integers(48, 80)), int(rng.integers(48, 80))
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            coco["images"].append({"id": 100 + i, "file_name": f"{i}.png", "width": w, "height": h})
            for _ in range(int(rng.integers(0, 4)) if i % 5 else 0):
                s = int(rng.integers(8, 20))
                x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
                cat = int(rng.choice([2, 7]))
                pixels[y:y + s, x:x + s] = (255, 200, 0) if cat == 2 else (0, 200, 255)
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": 100 + i, "area": s * s,
                                            "bbox": [x, y, s, s], "category_id": cat, "iscrowd": 0})
            Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / "instances.json").write_text(json.dumps(coco))
        assert write_main([str(folder / "instances.json"), str(root / f"{split}_shards"), "--maxcount",
                           str(n // 4), "--quiet"]) == 0
        urls[split] = str(root / f"{split}_shards")
    return urls


def job_args(tmp_path: Path, shards: dict[str, str], *overrides: str, name: str = "t") -> list[str]:
    return TINY_MODEL + [f"data.train={shards['train']}", f"data.val={shards['val']}", "model.num_classes=2",
                         "data.batch_size=2", "data.num_workers=0", "optim.warmup_steps=1", "log.every=2",
                         f"run.dir={tmp_path}", f"run.name={name}", *overrides]


def test_presets_parse():
    cfg, args = config.parse_args(JOB, DETRConfig, [])
    assert args.preset == "tiny" and cfg.data.train == "embedded:trees" and cfg.engine.grad_clip == 0.1
    cfg, _ = config.parse_args(JOB, DETRConfig, ["--preset", "vit_b16", "data.train=s3://b/coco/train"])
    m = cfg.model
    assert (m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward, m.num_queries) == (
        256, 8, 6, 6, 2048, 100)
    assert (m.num_classes, m.layer_decay, m.feature_stride) == (80, 0.7, 32)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.engine.grad_clip) == (1e-4, 1e-4, 0.1)
    cfg, _ = config.parse_args(JOB, DETRConfig, ["--preset", "vitdet_b16", "data.train=s3://b/coco/train"])
    m = cfg.model
    assert (m.backbone, m.img_size, m.window_size, m.global_blocks, m.rel_pos) == ("vitdet", 1024, 14, (2, 5, 8, 11),
                                                                                   True)
    assert (m.layer_decay, m.drop_path, m.max_size, m.eval_size) == (0.7, 0.1, 1024, 1024)
    for path in sorted((ROOT / "launch/presets" / JOB).glob("*.yaml")):
        config.build(DETRConfig, [("data.train", "s3://b/x")] + config.load_preset(path))


def test_param_groups_split_backbone_lr_and_layer_decay():
    cfg = DETRConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                     layer_decay=0.5, backbone_lr_scale=0.1)
    task = DETRTask(cfg)
    names = {id(p): n for n, p in task.model.named_parameters()}
    scales = {names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"]) for g in task.param_groups()
              for p in g["params"]}
    assert set(scales) == set(names.values())  # every parameter in exactly one group
    assert scales["backbone.blocks.1.attn.qkv.weight"][0] == pytest.approx(0.1 * 0.5)
    assert scales["backbone.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.1 * 0.25)
    assert scales["backbone.pos_embed"] == (pytest.approx(0.1 * 0.125), 0.0)
    assert scales["class_embed.weight"] == (1.0, 1e-4) and scales["class_embed.bias"] == (1.0, 0.0)


@pytest.fixture(scope="module")
def mae_export(tmp_path_factory) -> Path:
    """A real MAE backbone folder: the MAE task's own export (timm keys, backbone.json) of a 32-px, patch-8, 2 x 32
    encoder, as pretrain_mae writes it at the end of a run."""
    from pretrain.export import save_backbone
    from pretrain.mae import MAEConfig, MAETask

    task = MAETask(MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                             decoder_depth=1, decoder_num_heads=2))
    tensors, meta = task.export(task.model.state_dict())
    return save_backbone(tmp_path_factory.mktemp("mae") / "export", tensors, meta)


def test_mae_backbone_loads_with_resampled_positions(mae_export):
    cfg = DETRConfig(init=str(mae_export), img_size=64, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                     dim_feedforward=64)
    task = DETRTask(cfg)
    source = load_file(str(mae_export / bb.WEIGHTS_NAME))
    model = task.model.backbone
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])
    assert source["pos_embed"].shape[1] == 1 + 16 and model.pos_embed.shape[1] == 1 + 64  # 4x4 -> 8x8 grid
    images, mask = torch.randn(2, 3, 48, 72), torch.zeros(2, 48, 72, dtype=torch.bool)
    mask[1, 40:], mask[1, :, 56:] = True, True
    out = task.model(images, mask)  # a grid the table was not built for: resampled in the forward
    assert out["pred_logits"].shape == (2, 100, 2) and out["pred_boxes"].shape == (2, 100, 4)
    assert len(out["aux_outputs"]) == 0 and (out["pred_boxes"] > 0).all() and (out["pred_boxes"] < 1).all()


def test_detector_export_loads_alone_and_predicts_in_input_pixels(mae_export, tmp_path):
    """The whole detector (MAE backbone, simple-FPN neck, 7-px-wide feature map) saved as the runtime saves
    extra_exports, loaded by load_detector after the backbone folder is gone: same outputs as the task's model,
    and predict() equals the eval transform -> padded batch -> DETR -> PostProcess path, boxes in input pixels."""
    import shutil

    from safetensors.torch import save_file

    from finetune.detr.detector import DETECTOR_NAME, load_detector

    cfg = DETRConfig(init=str(mae_export), img_size=64, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                     dim_feedforward=64, num_queries=12, num_classes=2, eval_size=56, max_size=96, feature_stride=16)
    task = DETRTask(cfg)
    task.on_dataset({"kind": "detection", "categories": [{"id": 7, "name": "seven"}, {"id": 2, "name": "two"}]})
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking weights: the heads must not be at their init for the check to bite
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {f"module.{k}": v for k, v in task.model.state_dict().items()}
    out = tmp_path / "run" / "export"
    out.mkdir(parents=True)
    for name, (tensors, meta) in task.extra_exports(state).items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(meta))
    shutil.rmtree(mae_export.parent)   # the backbone folder the run started from is not needed any more

    detector = load_detector(tmp_path / "run")   # a run directory: its export/ is found
    assert detector.meta["init"] == str(mae_export) and detector.category_ids == [2, 7]
    task.model.eval()
    images, mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 48:] = True
    with torch.no_grad():
        want, got = task.model(images, mask), detector.model(images, mask)
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"])

    photos = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8))
              for i, (w, h) in enumerate(((120, 90), (70, 140)))]
    found = detector.predict(photos, threshold=0.0)
    samples = [DetectionEvalTransform(56, 96, mean=task.mean, std=task.std)({"image": p, "json": {"boxes": []}})
               for p in photos]
    batch = PadCollate(task.model.size_divisibility)(samples)
    with torch.no_grad():
        raw = task.model(batch["image"], batch["mask"])
    reference = post_process(raw["pred_logits"], raw["pred_boxes"], torch.tensor([[90, 120], [140, 70]]))
    for photo, f, ref in zip(photos, found, reference):
        assert len(f["scores"]) == 12 and (f["scores"][:-1] >= f["scores"][1:]).all()   # every query, best first
        order = ref["scores"].argsort(descending=True)
        torch.testing.assert_close(f["scores"], ref["scores"][order])
        torch.testing.assert_close(f["boxes"], ref["boxes"][order])
        assert f["category_ids"] == [[2, 7][int(i)] for i in ref["labels"][order]]
        assert set(f["names"]) <= {"two", "seven"}
        w, h = photo.size
        assert (f["boxes"][:, 2] <= w + 1e-3).all() and (f["boxes"][:, 3] <= h + 1e-3).all()
    strict = detector.predict(photos, threshold=float(found[0]["scores"][2]))
    assert len(strict[0]["scores"]) >= 3 and (strict[0]["scores"] >= found[0]["scores"][2]).all()
    with pytest.raises(FileNotFoundError, match=f"{DETECTOR_NAME}.json"):
        load_detector(tmp_path)


def test_job_runs_and_logs_every_loss_term_and_map(tmp_path, coco_shards, caplog):
    caplog.set_level("INFO")
    assert finetune_detr.main(job_args(tmp_path, coco_shards, "optim.max_steps=4", "log.images_every=2",
                                       "model.neck=project")) == 0
    run_dir = tmp_path / JOB / "t"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_aux", "class_error", "cardinality_error"):
        assert all(math.isfinite(r[f"train/{key}"]) for r in train), key
    final = [r for r in rows if "val/map" in r][-1]
    assert {"val/map", "val/map50", "val/map75", "val/map_small", "val/map_medium", "val/map_large"} <= set(final)
    assert 0 <= final["val/map"] <= 1
    # per-class AP of exactly the categories with a box in the validation set, in TensorBoard and metrics.jsonl
    val_dir = Path(coco_shards["val"]).parent / "val"
    val_coco = json.loads((val_dir / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in val_coco["categories"]}
    in_val = sorted({names[a["category_id"]] for a in val_coco["annotations"]})
    assert in_val and {k for k in final if "_per_class/" in k} == {f"val/{p}_per_class/{n}" for p in ("ap", "ap50")
                                                                    for n in in_val}
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    for name in in_val:
        for prefix in ("ap", "ap50"):
            [last] = events.Scalars(f"val/{prefix}_per_class/{name}")[-1:]
            assert last.step == 4 and last.value == pytest.approx(final[f"val/{prefix}_per_class/{name}"])
            assert 0 <= last.value <= 1
    assert any(r.getMessage().startswith("AP50 per class: ") for r in caplog.records)
    evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval step 4:")]
    assert evals and "val/map " in evals[-1] and "_per_class" not in evals[-1]
    # the pictures are validation images (the eval transform's pixels, not an augmented training crop) with boxes
    assert {"images/detections/0", "images/detections/1"} <= set(events.Tags()["images"])
    transform = DetectionEvalTransform(64, max_size=80, mean=MEAN, std=STD)
    val_images = []
    for i in range(8):
        out = transform({"image": Image.open(val_dir / f"{i}.png").convert("RGB"), "json": {"boxes": []}})
        pixels = out["image"] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        val_images.append((pixels.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy())
    for tag in ("images/detections/0", "images/detections/1"):
        event = events.Images(tag)[-1]
        picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), dtype=np.float64)
        same = [np.mean(np.abs(picture - v) <= 2) for v in val_images if v.shape == picture.shape]
        assert same and max(same) > 0.8, tag
    # the export is the finetuned backbone as a timm folder
    meta = bb.read_config(run_dir / "export")
    assert meta["categories"] == [{"id": 2, "name": "two"}, {"id": 7, "name": "seven"}]
    model = bb.create_from_config(meta)
    model.load_state_dict(load_file(str(run_dir / "export" / bb.WEIGHTS_NAME)), strict=True)
    # and the whole detector beside it, loadable on its own
    from finetune.detr.detector import load_detector

    detector = load_detector(run_dir)
    [found] = detector.predict([Image.new("RGB", (70, 50), (200, 30, 30))], threshold=0.0)
    assert found["boxes"].shape == (10, 4) and set(found["names"]) <= {"two", "seven"}
    # the converter writes the same detector from the run's last checkpoint (categories from its client state)
    from launch import convert_checkpoint

    assert convert_checkpoint.main([str(run_dir), "--out", str(tmp_path / "converted")]) == 0
    converted = load_file(str(tmp_path / "converted" / "detector.safetensors"))
    exported = load_file(str(run_dir / "export" / "detector.safetensors"))
    assert converted.keys() == exported.keys() and all(torch.equal(converted[k], exported[k]) for k in exported)
    meta = json.loads((tmp_path / "converted" / "detector.json").read_text())
    assert meta["categories"] == detector.categories and meta["category_ids"] == [2, 7]


def test_category_count_must_match(tmp_path, coco_shards, caplog):
    assert finetune_detr.main(job_args(tmp_path, coco_shards, "model.num_classes=3", "optim.max_steps=1")) == 2
    assert any("2 categories in its index.json but model.num_classes=3" in r.getMessage() for r in caplog.records)
    assert finetune_detr.main(job_args(tmp_path, coco_shards, "model.category_map=id", "optim.max_steps=1",
                                       name="id")) == 2
    assert any("set model.num_classes=8" in r.getMessage() for r in caplog.records)


@pytest.mark.multiproc
def test_two_rank_deepspeed_smoke(tmp_path, coco_shards):
    """2 ranks under the deepspeed launcher (gloo, ZeRO-2): losses finite, mAP gathered over the 8 val images."""
    from tests.test_deepspeed_multiproc import deepspeed_launch

    proc = deepspeed_launch("launch/finetune_detr.py", *job_args(tmp_path, coco_shards, "optim.max_steps=3",
                                                                   "engine.zero_stage=2"))
    rows = read_jsonl(tmp_path / JOB / "t" / "metrics.jsonl")
    assert all(math.isfinite(r["train/loss_giou"]) for r in rows if "train/loss" in r)
    assert "val/map" in rows[-1] or any("val/map" in r for r in rows)
    assert "COCO bbox evaluation: 8 images" in proc.stdout + proc.stderr


# --- ViTDet backbone (model.backbone=vitdet) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def vitdet_source(tmp_path_factory) -> Path:
    """The same MAE export as `mae_export`, in a folder of its own (a test above deletes that one)."""
    from pretrain.export import save_backbone
    from pretrain.mae import MAEConfig, MAETask

    task = MAETask(MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                             decoder_depth=1, decoder_num_heads=2))
    tensors, meta = task.export(task.model.state_dict())
    return save_backbone(tmp_path_factory.mktemp("mae_vitdet") / "export", tensors, meta)


VITDET = dict(backbone="vitdet", img_size=64, window_size=4, global_blocks=(1,), hidden_dim=32, nheads=2,
              enc_layers=1, dec_layers=1, dim_feedforward=64, num_classes=2)


def test_vitdet_backbone_builds_runs_on_padded_batches_and_decays_by_block(vitdet_source):
    """backbone=vitdet from the MAE export at 64 px (an 8x8 grid, windows of 4, block 1 global): the forward takes
    padded batches of two sizes (grids 6x9 and 10x7, not multiples of the window); layer decay by block, the
    position table and patch embedding below block 0, each block's relative position tables with its block."""
    from finetune.vitdet import ViTDetBackbone

    task = DETRTask(DETRConfig(init=str(vitdet_source), layer_decay=0.5, backbone_lr_scale=0.1, **VITDET))
    backbone = task.model.backbone
    assert isinstance(backbone, ViTDetBackbone) and task.backbone_meta["model_kwargs"]["global_attn_indexes"] == [1]
    assert backbone.blocks[0].window_size == 4 and backbone.blocks[1].window_size == 0
    assert backbone.blocks[0].attn.use_rel_pos and (backbone.blocks[0].attn.rel_pos_h == 0).all()
    source = load_file(str(vitdet_source / bb.WEIGHTS_NAME))
    torch.testing.assert_close(backbone.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])
    task.model.eval()
    for h, w in ((48, 72), (80, 56)):
        images, mask = torch.randn(2, 3, h, w), torch.zeros(2, h, w, dtype=torch.bool)
        mask[1, h - 16:], mask[1, :, w - 8:] = True, True
        out = task.model(images, mask)
        assert out["pred_logits"].shape == (2, 100, 3) and out["pred_boxes"].shape == (2, 100, 4)
        assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    names = {id(p): n for n, p in task.model.named_parameters()}
    scales = {names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"]) for g in task.param_groups()
              for p in g["params"]}
    assert set(scales) == set(names.values())
    assert scales["backbone.blocks.1.attn.qkv.weight"][0] == pytest.approx(0.1 * 0.5)
    assert scales["backbone.blocks.1.attn.rel_pos_h"][0] == pytest.approx(0.1 * 0.5)
    assert scales["backbone.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.1 * 0.25)
    assert scales["backbone.blocks.0.attn.rel_pos_w"][0] == pytest.approx(0.1 * 0.25)
    assert scales["backbone.pos_embed"] == (pytest.approx(0.1 * 0.125), 0.0)
    assert scales["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.1 * 0.125)
    assert scales["class_embed.weight"] == (1.0, 1e-4)
    assert task.flops_per_sample() > 0


def test_scratch_vitdet_is_the_random_plain_vit_converted():
    """init=scratch with backbone=vitdet: the random plain ViT of the scratch fields (timm's ViT initialisation, as
    a pretraining run would start from), converted; all blocks global and no relative positions give that ViT's
    blocks on its patch tokens (the class token dropped), before its final norm."""
    geometry = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path=0.0)
    torch.manual_seed(0)
    task = DETRTask(DETRConfig(**{**VITDET, "global_blocks": (0, 1), "rel_pos": False}, **geometry))
    torch.manual_seed(0)
    plain = bb.create_from_config(bb.scratch_vit_config(img_size=64, patch_size=8, embed_dim=32, depth=2,
                                                        num_heads=2, mlp_ratio=4.0, class_token=True,
                                                        global_pool="token", num_classes=0)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = task.model.backbone.eval()(images)                               # [2, 32, 8, 8]
        # ViTDet has no class token: the plain blocks on the patch tokens alone, with their positions
        tokens = plain.blocks(plain.patch_embed(images) + plain.pos_embed[:, 1:])   # [2, 64, 32]
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), tokens, atol=1e-5, rtol=0)
    assert task.backbone_meta["vitdet"] and task.flops_per_sample() > 0


def test_vitdet_job_runs_and_its_exports_reload(tmp_path, coco_shards, vitdet_source):
    """2 steps with model.backbone=vitdet: the backbone export loads with timm's local-dir (SAM ViT, features
    equal to the detector's), the detector export reloads alone with equal outputs."""
    import timm

    from finetune.detr.detector import load_detector
    from finetune.detr.task import detr_encoder_features

    args = job_args(tmp_path, coco_shards, "optim.max_steps=2", f"model.init={vitdet_source}", "model.backbone=vitdet",
                    "model.img_size=64", "model.window_size=4", "model.global_blocks=[1]", "model.feature_stride=16")
    assert finetune_detr.main(args) == 0
    run_dir = tmp_path / JOB / "t"
    assert all(math.isfinite(r["train/loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r)
    model = timm.create_model(f"local-dir:{run_dir / 'export'}", pretrained=True).eval()
    assert type(model).__name__ == "VisionTransformerSAM" and model.blocks[0].window_size == 4
    detector = load_detector(run_dir)
    assert detector.model.backbone.vitdet_kwargs["global_attn_indexes"] == [1]
    exported = load_file(str(run_dir / "export" / "detector.safetensors"))
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, exported["backbone.blocks.1.attn.qkv.weight"])
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), detr_encoder_features(detector.model, images),
                                   atol=1e-4, rtol=0)
        mask = torch.zeros(2, 64, 48, dtype=torch.bool)
        mask[1, 40:] = True
        got = detector.model(images, mask)
    # the same detector rebuilt the job's way (from the MAE export) with the exported weights: equal outputs
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in detector.meta["detr"].items()}
    task = DETRTask(DETRConfig(**values))
    task.model.load_state_dict(exported, strict=True)
    with torch.no_grad():
        want = task.model.eval()(images, mask)
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"])
    state = detector.model.state_dict()
    assert state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in exported)
    # the converter rebuilds the task from the checkpoint and compares the timm folder's features with the job's
    from launch import convert_checkpoint

    assert convert_checkpoint.main([str(run_dir), "--out", str(tmp_path / "converted")]) == 0
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["model_args"]["window_size"] == 4
