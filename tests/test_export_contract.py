"""The backbone contract (contracts/backbone.py) end to end: every registered job that exports a backbone trains two
steps on the CPU through its real launch script, exports, and plain timm (`timm.create_model("local-dir:...")`)
rebuilds the export with the features of the task's own model; old backbone.json folders still load and convert;
class names travel with a classifier."""
import importlib
import json

import pytest
import timm
import torch

import contracts.backbone as cb
from launch import convert_checkpoint
from launch.jobs import JOBS

TINY_VIT = ["model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
COMMON = ["optim.max_steps=2", "optim.warmup_steps=1", "data.num_workers=0", "data.val=", "log.every=1",
          "log.images_every=0", "ckpt.every=0", "ckpt.best_metric="]
# the tiny model of each job (its preset's embedded data set)
JOB_ARGS = {
    "pretrain_mae": TINY_VIT + ["model.img_size=32", "model.decoder_embed_dim=32", "model.decoder_depth=1",
                                "model.decoder_num_heads=2", "data.batch_size=4"],
    "pretrain_beit": TINY_VIT + ["model.img_size=32", "target=mean_color", "data.batch_size=4"],
    "pretrain_mp3": TINY_VIT + ["model.img_size=32", "context_ratio=0.5", "data.batch_size=4"],
    "pretrain_deit": TINY_VIT + ["model.img_size=32", "distill=none", "data.batch_size=4"],
    "pretrain_simmim": ["model.img_size=32", "model.embed_dim=16", "model.depths=1,1", "model.num_heads=1,2",
                        "model.window_size=4", "model.mask_patch_size=8", "data.batch_size=4"],   # a Swin
    "pretrain_flip": ["model.img_size=16", "model.patch_size=4", "model.width=32", "model.depth=1",
                      "model.num_heads=2", "model.text_width=32", "model.text_depth=1", "model.text_heads=2",
                      "model.embed_dim=16", "model.context_length=8", "data.zero_shot=", "data.batch_size=4"],
    "finetune_cls": TINY_VIT + ["model.img_size=32", "data.batch_size=4"],
    "finetune_detr": TINY_VIT + ["model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=1",
                                 "model.dim_feedforward=32", "model.num_queries=5", "model.scales=48,48",
                                 "model.max_size=64", "model.crop_resize=48,56", "model.crop_size=32,48",
                                 "model.eval_size=48", "data.batch_size=2"],
}
BACKBONE_JOBS = [name for name, job in JOBS.items() if job.encoder_features is not None]


def test_every_backbone_job_is_covered():
    """A new job that exports a backbone gets its tiny arguments here (and so its export is checked below)."""
    assert sorted(BACKBONE_JOBS) == sorted(JOB_ARGS)


@pytest.mark.parametrize("job", BACKBONE_JOBS)
def test_job_export_loads_in_plain_timm(job, tmp_path):
    script = importlib.import_module(f"launch.{job}")
    assert script.main(JOB_ARGS[job] + COMMON + [f"run.dir={tmp_path}", "run.name=t"]) == 0
    run_dir = tmp_path / job / "t"
    export = run_dir / "export"
    assert sorted(p.name for p in export.iterdir() if p.name.startswith(("config", "model"))) == \
        [cb.CONFIG_NAME, cb.WEIGHTS_NAME]
    config = json.loads((export / cb.CONFIG_NAME).read_text())
    assert {"architecture", "model_args", "pretrained_cfg"} <= config.keys()
    assert {"mean", "std", "input_size", "num_classes"} <= config["pretrained_cfg"].keys()

    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    # the task's own model, rebuilt from the run's checkpoint through the registry, gives the same features
    converted = convert_checkpoint.convert_run(run_dir, "latest")
    imgs = torch.randn(2, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.forward_features(imgs)
    theirs = converted.features(imgs)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # and the strict loader and the resampling loader read the same folder
    strict = cb.load_strict(export).eval()
    with torch.no_grad():
        torch.testing.assert_close(strict.forward_features(imgs), ours)
    _, _, report = cb.load_resampled(export)
    assert report.resampled is None


def _legacy_folder(tmp_path, classes=None):
    """A folder in the format before config.json, written as the old save_backbone wrote it."""
    from safetensors.torch import save_file

    meta = {"architecture": cb.GENERIC_VIT,
            "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                             "mlp_ratio": 2.0, "qkv_bias": True, "class_token": True, "global_pool": "token",
                             "num_classes": len(classes) if classes else 0},
            "pretrained_cfg_overlay": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 32, 32]},
            "source": "mae"}
    if classes:
        meta.update(source="finetune_cls", classes=classes)
    torch.manual_seed(0)
    model = cb.create_from_config(meta).eval()
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / cb.LEGACY_WEIGHTS_NAME))
    (folder / cb.LEGACY_CONFIG_NAME).write_text(json.dumps(meta))
    return folder, meta, model


def test_legacy_folder_loads_and_converts(tmp_path):
    folder, meta, model = _legacy_folder(tmp_path)
    read, state = cb.read_backbone(folder)
    assert read == meta and state.keys() == model.state_dict().keys()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_features(imgs)
        torch.testing.assert_close(cb.load_strict(folder).eval().forward_features(imgs), expected)
    out = tmp_path / "new"
    assert convert_checkpoint.main([str(folder), "--out", str(out)]) == 0
    assert not (out / cb.LEGACY_CONFIG_NAME).exists() and (out / cb.CONFIG_NAME).is_file()
    converted = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted.forward_features(imgs), expected)
    assert converted.pretrained_cfg["mean"] == meta["pretrained_cfg_overlay"]["mean"]
    read_new = cb.read_config(out)
    assert read_new["converted_from"]["format"] == "backbone.json"
    assert {k: v for k, v in read_new.items() if k != "converted_from"} == meta


def test_label_names_survive_conversion(tmp_path):
    classes = ["cat", "dog", "fish"]
    folder, meta, model = _legacy_folder(tmp_path, classes=classes)
    out = tmp_path / "new"
    assert convert_checkpoint.main([str(folder), "--out", str(out)]) == 0
    config = json.loads((out / cb.CONFIG_NAME).read_text())
    assert config["pretrained_cfg"]["label_names"] == classes and config["num_classes"] == 3
    classifier = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert classifier.pretrained_cfg["label_names"] == classes and classifier.num_classes == 3
    assert cb.read_config(out)["classes"] == classes
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(imgs), model(imgs))


def test_conv_stem_family_round_trip(tmp_path):
    """The project's conv-stem ViT: registered with timm by contracts.backbone, so local-dir rebuilds it; the meta
    reads back exactly as written."""
    meta = {"architecture": cb.GENERIC_VIT, "embed_layer": {"type": "conv_stem", "channels": [8, 16, 24]},
            "pos_embed": "sincos",
            "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                             "num_classes": 0, "global_pool": "avg", "fc_norm": True}}
    model = cb.create_from_config(meta).eval()
    cb.save_backbone(tmp_path, model, meta)
    assert cb.read_config(tmp_path) == meta
    config = json.loads((tmp_path / cb.CONFIG_NAME).read_text())
    assert config["architecture"] == cb.CONV_STEM_VIT and "contracts.backbone" in config[cb.PROJECT_KEY]["requires"]
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
                                   .forward_features(imgs), model.forward_features(imgs))
