"""finetune_ipt end to end: a multi-task run on the embedded photographs (degradations made in a data worker),
its TensorBoard pictures and per-task metrics, a single-task finetune from its export, and 2 DeepSpeed ranks whose
all-reduced PSNR/SSIM equal a one-process evaluation of the exported model."""
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipeline.stream import build_stream
from finetune.ipt.task import IPTConfig, IPTTask
from launch import finetune_ipt
from launch.runtime import config

ROOT = Path(__file__).resolve().parents[1]
JOB = "finetune_ipt"
# 12-px inputs, 8 features x 2 x 2 patches = 32-d tokens, 1 + 1 layers: a forward takes milliseconds.
TINY = ["model.img_size=12", "model.n_feats=8", "model.patch_dim=2", "model.num_heads=2", "model.enc_layers=1",
        "model.dec_layers=1", "model.head_kernel=3", "model.eval_size=24", "model.tile_overlap=4",
        "data.batch_size=8", "optim.warmup_steps=1", "log.every=2"]
METRICS = ("psnr_y", "psnr_rgb", "ssim_y", "ssim_rgb")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_presets_and_tasks_alias():
    cfg, args = config.parse_args(JOB, IPTConfig, ["tasks=sr2,derain"], aliases={"tasks": "model.tasks"})
    assert args.preset == "tiny" and cfg.model.tasks == ("sr2", "derain") and cfg.data.train == "embedded:photos"
    cfg, _ = config.parse_args(JOB, IPTConfig, ["--preset", "ipt_paper", "data.train=s3://b/in1k/train"])
    m = cfg.model
    assert (m.img_size, m.n_feats, m.patch_dim, m.num_heads, m.enc_layers, m.dec_layers, m.head_kernel) == \
        (48, 64, 3, 12, 12, 12, 5)
    assert m.contrastive_weight == 0.1 and m.contrastive_temperature == 0.07 and cfg.optim.base_lr == 5e-5
    for path in sorted((ROOT / "launch/presets" / JOB).glob("*.yaml")):
        items = config.load_preset(path)
        config.build(IPTConfig, [("data.train", "s3://b/x")] + items)  # every key valid, types right
        for key, value in items:  # none restating its default
            section, _, name = key.partition(".")
            cls = config.sections(IPTConfig)[section]
            default = {f.name: f.default for f in config.dataclasses.fields(cls)}[name]
            assert config.coerce(key, value, config._field_types(cls)[name]) != default, f"{path.name}: {key}"
    for bad, message in (("model.tasks=deblur", "unknown task"), ("model.eval_size=50", "multiple of every SR"),
                         ("model.init=/no/such/dir", "does not exist")):
        with pytest.raises(config.ConfigError, match=message):
            config.parse_args(JOB, IPTConfig, [bad])


def test_multitask_run_then_single_task_finetune(tmp_path):
    """Two tasks on the embedded photographs with a data worker (the collate runs there): per-task val metrics with
    baselines and gains, train losses, pictures per task; then `--preset finetune` from its export on one task."""
    args = TINY + ["tasks=denoise30,sr2", "data.num_workers=1", "optim.max_steps=4", "model.eval_images=8",
                   "log.images_every=2", f"run.dir={tmp_path}", "run.name=multi"]
    assert finetune_ipt.main(args) == 0
    run_dir = tmp_path / JOB / "multi"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["train/l1"]) and r["train/contrastive"] > 0 for r in train)
    final = [r for r in rows if "val/mean_gain_psnr_y" in r][-1]
    for task in ("denoise30", "sr2"):
        for m in METRICS:
            assert math.isfinite(final[f"val/{task}/{m}"]) and math.isfinite(final[f"val/{task}/baseline_{m}"])
        assert final[f"val/{task}/gain_psnr_y"] == pytest.approx(final[f"val/{task}/psnr_y"]
                                                                 - final[f"val/{task}/baseline_psnr_y"])
    # the Y-channel and RGB figures are different numbers, each labelled
    assert final["val/sr2/baseline_psnr_y"] != pytest.approx(final["val/sr2/baseline_psnr_rgb"], abs=0.01)
    # sigma-30 noise is ~18.6 dB RGB before clamping (20 log10(255 / 30)); the clamp and Y's averaging raise it
    assert 18.0 < final["val/denoise30/baseline_psnr_rgb"] < 21.0
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"images/denoise30", "images/sr2"} <= set(events.Tags()["images"])
    picture = events.Images("images/sr2")[-1]
    assert picture.width > 3 * 24 and "val/sr2/psnr_y" in events.Tags()["scalars"]
    meta = json.loads((run_dir / "export" / "ipt.json").read_text())
    assert meta["format"] == "ipt" and meta["arch"]["tasks"] == ["denoise30", "sr2"]
    assert meta["eval"]["sr2/psnr_y"] == pytest.approx(final["val/sr2/psnr_y"])

    finetune = TINY + ["--preset", "finetune", f"model.init={run_dir}", "tasks=sr2", "data.num_workers=0",
                       "optim.max_steps=2", "model.eval_images=8", "model.self_ensemble=true", f"run.dir={tmp_path}",
                       "run.name=single"]
    assert finetune_ipt.main(finetune) == 0
    meta = json.loads((tmp_path / JOB / "single" / "export" / "ipt.json").read_text())
    assert meta["arch"]["tasks"] == ["sr2"] and meta["init"] == str(run_dir)
    final = [r for r in read_jsonl(tmp_path / JOB / "single" / "metrics.jsonl") if "val/mean_gain_psnr_y" in r][-1]
    assert "val/sr2/psnr_y" in final and "val/denoise30/psnr_y" not in final


@pytest.mark.multiproc
def test_two_ranks_metrics_equal_a_single_process_evaluation(tmp_path, shard_factory):
    """2 ranks under the deepspeed launcher (ZeRO-2) on the photographs, validation on 6 images (3 per rank, one
    padding sample each): the all-reduced per-task metrics equal the exported model's in one process."""
    from test_deepspeed_multiproc import deepspeed_launch

    val = shard_factory.write([[shard_factory.sample(f"{s * 3 + i:06d}", size=30) for i in range(3)]
                               for s in range(2)], name="val")
    deepspeed_launch("launch/finetune_ipt.py", *TINY, "tasks=denoise50,sr2,derain", "data.num_workers=0",
                     f"data.val={val.url}", "data.batch_size=4", "optim.max_steps=3", "engine.zero_stage=2",
                     f"run.dir={tmp_path}", "run.name=ds")
    run_dir = tmp_path / JOB / "ds"
    final = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/mean_gain_psnr_y" in r][-1]
    args = dict(a.removeprefix("model.").split("=") for a in TINY if a.startswith("model."))
    task = IPTTask(IPTConfig(init=str(run_dir), tasks=("denoise50", "sr2", "derain"),
                             eval_size=int(args["eval_size"]), tile_overlap=int(args["tile_overlap"])))
    stream = build_stream(val.url, map_fn=task.eval_transform, collate_fn=task.eval_collate, batch_size=4,
                          num_workers=0, train=False)
    ours = task.evaluate(task.model, stream)
    for key, value in ours.items():
        assert final[f"val/{key}"] == pytest.approx(value, abs=1e-3), key  # threads may round a pixel apart
    assert torch.isfinite(torch.tensor(list(ours.values()))).all()
