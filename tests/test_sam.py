"""finetune_sam: the model against segment-anything's own forward on the same weights (a published-style checkpoint
converted in, the export converted out and used through SamPredictor), the loss and the prompt simulation, the
encoder from a plain ViT export, and the job end to end on shards with instance masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.build_sam import sam_model_registry
from safetensors.torch import load_file

from contracts.backbone import save_backbone
from finetune import backbone as bb
from finetune.sam import prompts as pr
from finetune.sam.model import SamSpec, build_reference, load_segment_anything, spec_from_segment_anything
from finetune.sam.task import SAMConfig, SAMTask, read_sam_folder
from launch import sam_checkpoint

# grid 4 with windows of 3: every windowed block pads (the case where timm's and segment-anything's code differ most)
SMALL = SamSpec(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=[1],
                prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2, iou_head_hidden_dim=32)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict]:
    """A segment-anything Sam of SMALL's geometry with every weight random (relative tables too), saved as
    build_sam.py's checkpoints are: torch.save of the state dict."""
    torch.manual_seed(0)
    sam = build_reference(SMALL)
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("sam") / "sam_small.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def test_geometry_is_read_from_the_weights():
    with torch.device("meta"):
        state = sam_model_registry["vit_b"]().state_dict()
    spec = spec_from_segment_anything(state)
    assert spec == SamSpec() and spec.registry_key() == "vit_b"
    assert SMALL.registry_key() is None


def test_published_checkpoint_converts_in_and_predicts_as_segment_anything(published, tmp_path):
    path, state = published
    assert sam_checkpoint.main(["from-pth", str(path), str(tmp_path / "in"), "--decoder-heads", "2"]) == 0
    task = SAMTask(SAMConfig(init=str(tmp_path / "in"), img_size=0))
    assert task.spec == SMALL
    reference = load_segment_anything(SMALL, state)
    model = task.model.eval()
    torch.manual_seed(1)
    image = torch.rand(3, 64, 64) * 255
    points, labels = torch.tensor([[[20.0, 30.0], [40.0, 9.0]]]), torch.tensor([[1, 0]])
    box, mask = torch.tensor([[5.0, 6.0, 50.0, 40.0]]), torch.randn(1, 1, 16, 16)
    ours_in = ((image - reference.pixel_mean) / reference.pixel_std)[None]
    with torch.no_grad():
        embedding = model(ours_in)
        for prompts, multimask in (({"points": (points, labels)}, True),
                                   ({"points": (points, labels), "boxes": box, "mask_input": mask}, False)):
            theirs = reference([{"image": image, "original_size": (64, 64), "point_coords": points,
                                 "point_labels": labels, "boxes": prompts.get("boxes"),
                                 "mask_inputs": prompts.get("mask_input")}], multimask_output=multimask)[0]
            logits, iou = model(embedding=embedding, multimask=multimask, **prompts)
            assert logits.shape == theirs["low_res_logits"].shape
            torch.testing.assert_close(logits, theirs["low_res_logits"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou, theirs["iou_predictions"], atol=1e-4, rtol=1e-4)
    # and back out: the same tensors, loadable by segment-anything with weights_only=True
    assert sam_checkpoint.main(["to-pth", str(tmp_path / "in"), str(tmp_path / "out.pth")]) == 0
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_bad_checkpoints_exit_2(tmp_path, capsys):
    assert sam_checkpoint.main(["from-pth", str(tmp_path / "missing.pth"), str(tmp_path / "o")]) == 2
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "vit.pth")
    assert sam_checkpoint.main(["from-pth", str(tmp_path / "vit.pth"), str(tmp_path / "o")]) == 2
    assert "not a segment-anything SAM state dict" in capsys.readouterr().err
    assert sam_checkpoint.main(["to-pth", str(tmp_path), str(tmp_path / "x.pth")]) == 2


def test_loss_backpropagates_through_the_best_output_only():
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    logits = torch.randn(2, 3, 16, 16)
    logits[0, 1] = torch.where(gt[0], 8.0, -8.0)     # mask 0's output 1 and mask 1's output 2 are (nearly) perfect
    logits[1, 2] = torch.where(gt[1], 8.0, -8.0)
    logits.requires_grad_(True)
    iou_pred = torch.zeros(2, 3, requires_grad=True)
    loss, terms = pr.sam_loss(logits, iou_pred, gt)
    loss.backward()
    touched = logits.grad.flatten(2).abs().sum(-1) > 0
    assert touched.tolist() == [[False, True, False], [False, False, True]]
    assert terms["iou"] == pytest.approx(1.0) and iou_pred.grad.abs().min() > 0   # every IoU score supervised
    focal = pr.focal_loss(logits.detach(), gt)
    assert torch.allclose(focal[0, 1], torch.tensor(0.0), atol=1e-4) and (focal[0, 0] > focal[0, 1])


def test_prompts_come_from_the_object_and_its_errors():
    torch.manual_seed(0)
    gt = torch.zeros(3, 20, 30, dtype=torch.bool)
    gt[:, 5:15, 10:26] = True
    pred = gt.clone()
    pred[0, 5:15, 10:14] = False          # a false negative strip: positive point inside it
    pred[1, 0:3, 0:30] = True             # a false positive band: negative point inside it
    coords, labels = pr.error_points(pred, gt)
    x, y = coords[:, 0].long(), coords[:, 1].long()
    assert labels.tolist() == [1, 0, 1]
    assert 10 <= x[0] < 14 and 5 <= y[0] < 15 and y[1] < 3 and bool(gt[2, y[2], x[2]])   # perfect: inside
    square = torch.zeros(1, 20, 30, dtype=torch.bool)
    square[0, 5:15, 10:20] = True
    assert pr.center_points(square)[0].tolist() in ([14.0, 9.0], [15.0, 9.0], [14.0, 10.0], [15.0, 10.0])
    c, lab = pr.corrective_points(pred[:2], gt[:2])
    assert lab.tolist() == [1, 0] and 10 <= c[0, 0] < 14 and c[1, 1] < 3
    boxes = torch.tensor([[10.0, 5.0, 26.0, 15.0]])
    noisy = pr.noisy_boxes(boxes.repeat(100, 1), img_size=1024)
    assert (noisy - boxes).abs().max() <= 20 and (noisy - boxes).abs().max() > 0


def test_encoder_starts_from_a_plain_vit_export(tmp_path):
    torch.manual_seed(0)
    meta = bb.scratch_vit_config(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                                 class_token=True, global_pool="token", num_classes=0)
    vit = bb.create_from_config(meta)
    save_backbone(tmp_path / "vit", vit, meta)
    task = SAMTask(SAMConfig(init=str(tmp_path / "vit"), img_size=64, window_size=2, prompt_dim=32,
                             decoder_mlp_dim=64, decoder_heads=2, iou_head_hidden_dim=32))
    encoder = task.model.image_encoder
    assert torch.equal(encoder.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(encoder.pos_embed[0].flatten(0, 1), vit.pos_embed[0, 1:])   # same grid: rows unchanged
    assert task.spec.global_attn_indexes == [0, 1] and task.spec.window_size == 2
    assert task.model(torch.zeros(2, 3, 64, 64)).shape == (2, 32, 4, 4)


@pytest.fixture(scope="module")
def mask_shards(tmp_path_factory) -> dict[str, str]:
    """Train and val shards written by data_pipeline.write from a COCO json with polygon masks: 8 (4) noisy 64-px
    images with 1-2 bright squares or diamonds each; 2 shards per split."""
    from PIL import Image

    from data_pipeline.write import main as write_main

    root = tmp_path_factory.mktemp("masks")
    urls = {}
    for split, n in (("train", 8), ("val", 4)):
        rng = np.random.default_rng(len(split))
        folder = root / split
        folder.mkdir()
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "shape"}]}
        for i in range(n):
            pixels = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
            for j in range(1 + i % 2):
                s, x, y = 20, 4 + 36 * j, int(rng.integers(4, 40))
                polygon = [x, y, x + s, y, x + s, y + s, x, y + s] if j == 0 else \
                    [x + s / 2, y, x + s, y + s / 2, x + s / 2, y + s, x, y + s / 2]
                yy, xx = np.mgrid[:64, :64]
                inside = (abs(xx + 0.5 - x - s / 2) + abs(yy + 0.5 - y - s / 2) <= s / 2) if j else \
                    ((xx >= x) & (xx < x + s) & (yy >= y) & (yy < y + s))
                pixels[inside] = (255, 200, 0)
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "area": s * s,
                                            "bbox": [x, y, s, s], "category_id": 1, "iscrowd": 0,
                                            "segmentation": [polygon]})
            Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / "instances.json").write_text(json.dumps(coco))
        assert write_main([str(folder / "instances.json"), str(root / split / "shards"), "--maxcount", str(n // 2),
                           "--quiet"]) == 0
        urls[split] = str(root / split / "shards")
    return urls


TINY_SAM = ["model.img_size=64", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.window_size=2",
            "model.global_blocks=[1]", "model.prompt_dim=32", "model.decoder_mlp_dim=64", "model.decoder_heads=2",
            "model.iou_head_hidden_dim=32", "model.correction_points=1", "model.mask_only_rounds=1",
            "model.eval_points=2"]


def test_job_trains_evaluates_draws_and_its_export_predicts_in_segment_anything(tmp_path, mask_shards):
    import timm

    from launch import finetune_sam

    args = TINY_SAM + [f"data.train={mask_shards['train']}", f"data.val={mask_shards['val']}", "data.batch_size=2",
                       "data.num_workers=0", "optim.max_steps=2", "optim.warmup_steps=1", "log.every=1",
                       "log.eval_every=2", "log.images_every=2", f"run.dir={tmp_path}", "run.name=t"]
    assert finetune_sam.main(args) == 0
    run = tmp_path / "finetune_sam" / "t"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/miou_1pt" in r][-1]
    assert val["val/masks"] == 6 and 0 <= val["val/miou_box"] <= 1 and "val/miou_2pt" in val
    assert val["val/miou_1pt_oracle"] >= val["val/miou_1pt"]
    assert any("train/dice" in r and "train/iou_first" in r for r in records)
    assert list((run / "tb").glob("events.out.tfevents.*"))

    # the export: segment-anything's Sam through SamPredictor gives the task model's masks on the same image
    export = run / "export"
    spec, state, meta = read_sam_folder(export)
    assert meta["registry"] is None and spec.img_size == 64
    sam = load_segment_anything(spec, state)
    task = SAMTask(SAMConfig(init=str(export), img_size=0))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    point, label = np.array([[30.0, 20.0]]), np.array([1])
    masks, scores, low_res = predictor.predict(point_coords=point, point_labels=label, multimask_output=True)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(task.mean)[:, None, None], torch.tensor(task.std)[:, None, None]
    with torch.no_grad():
        embedding = task.model((pixels - mean)[None] / std)
        logits, iou = task.model(embedding=embedding, points=(torch.tensor([[[30.0, 20.0]]]), torch.tensor([[1]])),
                                 multimask=True)
    torch.testing.assert_close(torch.from_numpy(low_res), logits[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(torch.from_numpy(scores), iou[0], atol=1e-3, rtol=1e-3)
    # ... and the encoder alone loads in plain timm
    encoder = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features((pixels - mean)[None] / std), embedding,
                                   atol=1e-3, rtol=1e-3)
    assert set(load_file(str(export / "sam.safetensors"))) == set(sam.state_dict())


@pytest.mark.parametrize("argv,named", [(["model.init=/nonexistent/mae"], "model.init=/nonexistent/mae"),
                                        (["model.prompt_dim=20"], "model.prompt_dim=20"),
                                        (["model.box_prob=2"], "model.box_prob")])
def test_bad_config_exits_2_naming_the_key(argv, named, caplog):
    import logging

    from launch import finetune_sam

    with caplog.at_level(logging.ERROR):
        assert finetune_sam.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and named in errors[0] and "Traceback" not in errors[0], errors


def test_bf16_model_trains_with_fp32_prompt_positions():
    """DeepSpeed's bf16 casts every weight and buffer; segment-anything computes prompt positions in fp32."""
    from torchvision.ops import masks_to_boxes

    torch.manual_seed(0)
    task = SAMTask(SAMConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=2, prompt_dim=32,
                             decoder_mlp_dim=64, decoder_heads=2, iou_head_hidden_dim=32, correction_points=1))
    model = task.model.to(torch.bfloat16)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 10:30, 20:40] = masks[1, 40:60, 30:50] = True
    batch = {"image": torch.randn(2, 3, 64, 64).bfloat16(),
             "targets": [{"masks": masks, "boxes": masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])}] * 2}
    loss, metrics = task.training_step(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.mask_decoder.iou_token.weight.grad is not None
    assert model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    assert task.evaluate(model, [batch])["masks"] == 4


def test_presets_parse():
    from launch.runtime import config

    cfg, args = config.parse_args("finetune_sam", SAMConfig, [])
    assert args.preset == "tiny" and cfg.data.train == "embedded:emoji" and cfg.model.img_size == 128
    cfg, _ = config.parse_args("finetune_sam", SAMConfig, ["--preset", "vit_b16", "data.train=s3://b/masks/train"])
    spec = SamSpec(img_size=cfg.model.img_size, embed_dim=cfg.model.embed_dim, depth=cfg.model.depth,
                   num_heads=cfg.model.num_heads, window_size=cfg.model.window_size,
                   global_attn_indexes=list(cfg.model.global_blocks), prompt_dim=cfg.model.prompt_dim,
                   decoder_mlp_dim=cfg.model.decoder_mlp_dim, decoder_heads=cfg.model.decoder_heads,
                   iou_head_hidden_dim=cfg.model.iou_head_hidden_dim)
    assert spec.registry_key() == "vit_b"          # the paper's ViT-B: segment-anything's registry builds the export
    assert 1 + cfg.model.correction_points + cfg.model.mask_only_rounds == 11
