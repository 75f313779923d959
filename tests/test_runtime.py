"""The runtime in one process: lr schedule, the lr DeepSpeed's optimizer really applies, and a whole MAE run on
real shards (config.yaml, metrics.jsonl, TensorBoard events read back, checkpoint, export, resume)."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from contracts.backbone import read_config
from launch.pretrain_mae import main
from pretrain.mae import MAEConfig
from launch.runtime import checkpoint, config, distributed, engine as engine_lib

# A MAE small enough for a CPU test: 32 px, 16 patches, 2 x 32 encoder, 1 x 32 decoder.
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
              "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]


def tiny_run_args(data_url: str, run_dir: Path, **overrides) -> list[str]:
    settings = {"data.train": data_url, "data.val": data_url, "data.batch_size": 4, "data.num_workers": 0,
                "optim.max_steps": 6, "optim.warmup_steps": 2, "optim.base_lr": 1e-3, "log.every": 2,
                "log.eval_every": 3, "log.images_every": 3, "ckpt.every": 3, "ckpt.keep": 1, "run.dir": run_dir,
                "run.name": "t", **overrides}
    return TINY_MODEL + [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture
def photo_shards(shard_factory):
    """4 shards x 8 random 32-px PNG images with index.json."""
    shards = [[shard_factory.sample(f"{s * 8 + i:06d}", size=32) for i in range(8)] for s in range(4)]
    return shard_factory.write(shards, name="photos")


# --- the schedule ---------------------------------------------------------------------------------------------

def test_lr_warmup_then_cosine_to_min_lr():
    kw = dict(peak=1.0, total=110, warmup=10, min_lr=0.1)
    assert engine_lib.lr_at(0, **kw) == 0.0
    assert engine_lib.lr_at(5, **kw) == pytest.approx(0.5)
    assert engine_lib.lr_at(10, **kw) == pytest.approx(1.0)
    assert engine_lib.lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert engine_lib.lr_at(110, **kw) == pytest.approx(0.1)
    lrs = [engine_lib.lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert engine_lib.lr_at(5, peak=1.0, total=10, warmup=0, min_lr=0.0) == pytest.approx(0.5)


def test_multistep_schedule_from_epoch_milestones():
    """optim.schedule=multistep (SimMIM's ViT-B recipe): warmup, then the peak times gamma at each milestone, the
    milestones given in epochs and converted with the stream's epoch length; refused without milestones."""
    kw = dict(peak=1.0, total=100, warmup=10, min_lr=0.0, milestones=(70, 90), gamma=0.1)
    assert [engine_lib.lr_at(s, **kw) for s in (5, 10, 69, 70, 89, 90, 99)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    cfg, _ = config.parse_args("pretrain_mae", MAEConfig, ["data.train=s3://b/x", "optim.epochs=8", "optim.max_steps=0",
                                                           "optim.schedule=multistep", "optim.milestones=[7]"])
    derived = config.resolve(cfg, job="pretrain_mae", preset="tiny", run_dir="", world_size=1, batches_per_epoch=10,
                             num_samples=None, device="cpu", precision="fp32")
    assert derived.total_steps == 80 and derived.milestone_steps == (70,)
    for bad in (["optim.schedule=multistep"], ["optim.milestones=[7]"],
                ["optim.schedule=multistep", "optim.milestones=[7,3]"]):
        with pytest.raises(config.ConfigError, match="milestones"):
            config.parse_args("pretrain_mae", MAEConfig,
                              ["data.train=s3://b/x", "optim.max_steps=0", "optim.epochs=8", *bad])


def test_set_lr_honours_lr_scale():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=1.0)
    engine_lib.set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.4)]


def test_weight_decay_from_optim_config():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    groups = engine_lib.param_groups([{"params": [p1], "weight_decay": 0.0}, {"params": [p2], "weight_decay": 0.1},
                                      {"params": []}], weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]  # empty group dropped, exempt group stays exempt


@pytest.fixture
def process_group():
    world = distributed.init()
    yield world
    distributed.shutdown(world)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_applied_lr_carries_lr_scale_under_zero(process_group, stage):
    """The lr reaches the optimizer that steps: Adam's first step moves every weight by exactly lr * lr_scale."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    groups = [{"params": list(model[0].parameters()), "lr_scale": 1.0, "weight_decay": 0.0},
              {"params": list(model[1].parameters()), "lr_scale": 0.25, "weight_decay": 0.0}]
    optimizer = engine_lib.build_optimizer(groups, lr=1.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                           on_gpu=False)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**12}
    engine = engine_lib.initialize(model, optimizer, ds)
    before = {k: v.clone() for k, v in engine_lib.full_state_dict(engine, True).items()}
    engine_lib.set_lr(engine.optimizer, 0.01)
    assert engine_lib.applied_lrs(engine) == [pytest.approx(0.01), pytest.approx(0.0025)]
    loss = engine(torch.randn(4, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    after = engine_lib.full_state_dict(engine, True)
    for name, scale in (("0.weight", 1.0), ("0.bias", 1.0), ("1.weight", 0.25), ("1.bias", 0.25)):
        delta = (after[name] - before[name]).abs()
        torch.testing.assert_close(delta, torch.full_like(delta, 0.01 * scale), rtol=1e-3, atol=1e-6)


# --- a whole run ----------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_single_process_run_then_resume(photo_shards, tmp_path, caplog):
    run_dir = tmp_path / "runs" / "pretrain_mae" / "t"
    assert main(tiny_run_args(photo_shards.url, tmp_path / "runs")) == 0

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["derived"]["total_steps"] == 6 and cfg["derived"]["world_size"] == 1
    assert cfg["derived"]["global_batch"] == 4 and cfg["derived"]["lr"] == pytest.approx(1e-3 * 4 / 256)
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["gradient_clipping"] == 0.0 and ds["data_types"]["grad_accum_dtype"] == "fp32"

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in train_rows)
    assert train_rows[0]["train/lr"] == pytest.approx(cfg["derived"]["lr"] * 1 / 2)  # warmup: step 1 of 2
    assert [r["step"] for r in rows if "val/loss" in r] == [3, 6]

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/epoch", "perf/images_per_s",
                "perf/images_per_s_per_rank", "perf/step_time_s", "perf/data_wait_frac", "mem/cpu_rss_gib",
                "val/loss"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    images = events.Images("images/reconstruction")
    assert [i.step for i in images] == [3, 6] and images[0].width > 32 and images[0].height > 32
    assert "config/text_summary" in events.Tags()["tensors"]

    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step00000006"
    assert not (ckpt_dir / "step00000003").exists()  # ckpt.keep=1 pruned it
    # DeepSpeed's model-states file, with our client state, loads without unpickling arbitrary objects
    states = torch.load(checkpoint.model_states_file(ckpt_dir / "step00000006"), map_location="cpu",
                        weights_only=True)
    assert states["step"] == 6 and states["data"] == {"epoch": 0, "batch_in_epoch": 6}
    assert states["config"]["optim"]["max_steps"] == 6 and len(states["rng"]) == 1

    backbone = load_file(str(run_dir / "export" / "model.safetensors"))
    meta = read_config(run_dir / "export")
    assert meta["model_kwargs"]["embed_dim"] == 32 and meta["model_kwargs"]["depth"] == 2
    assert not any(k.startswith(("decoder", "mask_token")) for k in backbone)
    torch.testing.assert_close(backbone["patch_embed.proj.weight"],
                               states["module"]["patch_embed.proj.weight"].float())
    vit = timm.create_model(meta["architecture"], pretrained=False, **meta["model_kwargs"])
    vit.load_state_dict(backbone, strict=True)  # the contract with finetuning: a timm ViT, every key matched

    # run.resume=auto continues from step 6 to 8: same data position, RNG, and metrics rows kept
    caplog.clear()
    assert main(tiny_run_args(photo_shards.url, tmp_path / "runs", **{"optim.max_steps": 8,
                                                                       "run.resume": "auto"})) == 0
    assert any("resuming from" in r.getMessage() and "step00000006" in r.getMessage() for r in caplog.records)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    assert (ckpt_dir / "latest").read_text().strip() == "step00000008"
    states = torch.load(checkpoint.model_states_file(ckpt_dir / "step00000008"), map_location="cpu",
                        weights_only=True)
    assert states["step"] == 8 and states["global_steps"] == 8 and states["data"]["batch_in_epoch"] == 8

    # run.resume=PATH starts a new run dir from another run's checkpoint
    assert main(tiny_run_args(photo_shards.url, tmp_path / "runs", **{"optim.max_steps": 9, "run.name": "branch",
                                                                       "run.resume": ckpt_dir})) == 0
    branch = tmp_path / "runs" / "pretrain_mae" / "branch"
    assert [r["step"] for r in read_jsonl(branch / "metrics.jsonl") if "train/loss" in r] == [9]
    assert (ckpt_dir / "latest").read_text().strip() == "step00000008"  # the source run is left alone

    # a checkpoint of another model is refused with a message, not a state-dict traceback
    caplog.clear()
    assert main(tiny_run_args(photo_shards.url, tmp_path / "runs", **{"optim.max_steps": 10, "run.resume": "auto",
                                                                       "model.depth": 3})) == 2
    assert any("model.depth=2 there, 3 now" in r.getMessage() for r in caplog.records)

    # a fresh run (run.resume=none) into the same run dir moves the earlier run aside instead of mixing with it
    assert main(tiny_run_args(photo_shards.url, tmp_path / "runs", **{"optim.max_steps": 2})) == 0
    assert (ckpt_dir / "latest").read_text().strip() == "step00000002"
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("t-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step00000008").is_dir()


def test_grad_accum_and_epochs(photo_shards, tmp_path, caplog):
    """Epoch mode with accumulation: 32 samples / 4 per batch = 8 batches per epoch = 4 optimizer steps.
    Also: a --deepspeed_config file is merged into what DeepSpeed gets, and logged."""
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}}))
    args = tiny_run_args(photo_shards.url, tmp_path, **{"optim.max_steps": 0, "optim.epochs": 1.5,
                                                        "optim.warmup_steps": 0, "engine.grad_accum": 2,
                                                        "data.val": "", "log.images_every": 0, "ckpt.every": 0})
    assert main(["--deepspeed_config", str(ds_json)] + args) == 0
    run_dir = tmp_path / "pretrain_mae" / "t"
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 1, "reduce_bucket_size": 12345}
    assert any("zero_optimization.reduce_bucket_size" in r.getMessage() for r in caplog.records)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["derived"]["total_steps"] == 6 and cfg["derived"]["batches_per_epoch"] == 8
    assert cfg["derived"]["global_batch"] == 8
    states = torch.load(checkpoint.model_states_file(run_dir / "checkpoints" / "step00000006"), map_location="cpu",
                        weights_only=True)
    assert states["data"] == {"epoch": 1, "batch_in_epoch": 4} and states["global_steps"] == 6
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["train/epoch"] == pytest.approx(1.5)


def test_missing_data_is_a_clear_error(tmp_path, caplog):
    assert main(tiny_run_args(str(tmp_path / "no_such_dataset"), tmp_path)) == 2
    assert any("no_such_dataset" in r.getMessage() and "does not exist" in r.getMessage() for r in caplog.records)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(tiny_run_args(str(empty), tmp_path, **{"data.val": ""})) in (1, 2)
    assert any(str(empty) in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_resampled_stream_counts_epochs_in_samples(photo_shards, tmp_path):
    """Resampled mode has no epochs of its own: optim.epochs converts with num_samples / (batch x world)."""
    # a small shuffle buffer: the stream's give-up limit for resampled reads assumes the buffer fills from a
    # dataset larger than this 32-sample one
    args = tiny_run_args(photo_shards.url, tmp_path, **{"data.mode": "resampled", "data.shuffle_buffer": 16,
                                                        "optim.max_steps": 0,
                                                        "optim.epochs": 0.5, "data.val": "", "ckpt.every": 0})
    assert main(args) == 0
    cfg = yaml.safe_load((tmp_path / "pretrain_mae" / "t" / "config.yaml").read_text())
    assert cfg["derived"]["total_steps"] == 4 and cfg["derived"]["batches_per_epoch"] is None


def test_bf16_run_exports_fp32_master_weights(photo_shards, tmp_path):
    """bf16 on the CPU under ZeRO-1: inputs cast to the engine's dtype; the export holds the fp32 master copy."""
    args = tiny_run_args(photo_shards.url, tmp_path, **{"engine.precision": "bf16", "optim.max_steps": 2,
                                                        "data.val": "", "log.images_every": 0, "ckpt.every": 0})
    assert main(args) == 0
    run_dir = tmp_path / "pretrain_mae" / "t"
    backbone = load_file(str(run_dir / "export" / "model.safetensors"))
    states = torch.load(checkpoint.model_states_file(run_dir / "checkpoints" / "step00000002"), map_location="cpu",
                        weights_only=True)
    module = states["module"]["blocks.0.attn.qkv.weight"]
    assert module.dtype == torch.bfloat16 and backbone["blocks.0.attn.qkv.weight"].dtype == torch.float32
    torch.testing.assert_close(backbone["blocks.0.attn.qkv.weight"].bfloat16(), module)  # same weights, more bits
    assert not torch.equal(backbone["blocks.0.attn.qkv.weight"], module.float())
