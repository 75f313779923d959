"""dVAE tokenizer: token grid shape and range, decoding, the loss terms, schedules, the tokenizer files and their
errors, and the train_dvae job on real shards (metrics, TensorBoard, export, resume, 2 DeepSpeed ranks)."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.train_dvae import main
from pretrain.dvae import (DiscreteVAE, DVAEConfig, DVAETask, anneal, code_perplexity, kl_weight_at, load_tokenizer,
                           logit_laplace_nll, psnr, save_tokenizer, temperature_at, unmap_pixels)

# 8x downsampling with 16-wide first group and 64 codes: milliseconds per forward at 32-112 px
SMALL = DVAEConfig(img_size=32, vocab_size=64, hidden=16, blocks_per_group=1, decoder_init=16)
TINY_MODEL = ["model.img_size=32", "model.vocab_size=32", "model.hidden=8", "model.blocks_per_group=1",
              "model.decoder_init=8", "model.temperature_steps=6", "model.kl_warmup_steps=3"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_args(data_url: str, run_dir: Path, *extra: str) -> list[str]:
    return TINY_MODEL + [f"data.train={data_url}", f"data.val={data_url}", "data.batch_size=4", "data.num_workers=0",
                         "optim.max_steps=6", "optim.lr=1e-3", "log.every=1", "log.eval_every=3",
                         "log.images_every=3", "ckpt.every=3", "ckpt.keep=1", f"run.dir={run_dir}", "run.name=t",
                         *extra]


@pytest.fixture
def photo_shards(shard_factory):
    """3 shards x 4 random 32-px PNG images with index.json."""
    return shard_factory.write([[shard_factory.sample(f"{s * 4 + i:06d}", size=32) for i in range(4)]
                                for s in range(3)], name="photos")


# --- the model ----------------------------------------------------------------------------------------------------

def test_token_grid_is_14x14_for_112_px_and_in_range():
    torch.manual_seed(0)
    model = DiscreteVAE(SMALL).eval()
    images = torch.rand(2, 3, 112, 112)
    logits = model.encode_logits(images)
    assert logits.shape == (2, 64, 14, 14)
    codes = model.get_codebook_indices(images)
    assert codes.shape == (2, 14, 14) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 64
    assert torch.equal(codes, logits.argmax(dim=1))
    assert model.downsample == 8 and model.vocab_size == 64
    # a different view size gives its own grid; one that is not a multiple of 8 is refused
    assert model.get_codebook_indices(torch.rand(1, 3, 64, 48)).shape == (1, 8, 6)
    with pytest.raises(ValueError, match="multiple"):
        model.encode_logits(torch.rand(1, 3, 60, 64))


def test_decode_indices_shape_range_and_equals_the_one_hot_conv():
    torch.manual_seed(0)
    model = DiscreteVAE(SMALL).eval()
    codes = torch.randint(0, 64, (2, 14, 14))
    images = model.decode_indices(codes)
    assert images.shape == (2, 3, 112, 112) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    # the table lookup of hard codes equals the 1x1 conv of their one-hot (what training decodes)
    one_hot = F.one_hot(codes, 64).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(model.decode_stats(codes), model.decode_stats(one_hot), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="integer codes"):
        model.decode_indices(codes.float())


def test_logit_laplace_is_a_normalised_density():
    """exp(-NLL) over the mapped pixel range y in (0.1, 0.9) holds exactly the Laplace mass of (logit 0.1, logit 0.9)
    in logit space: the NLL is a proper density, so beta keeps DALL-E's meaning."""
    y = torch.linspace(0.1, 0.9, 200_001, dtype=torch.float64)[1:-1]
    x01 = unmap_pixels(y)

    def laplace_cdf(z: float, mu: float, b: float) -> float:
        return 0.5 * math.exp((z - mu) / b) if z < mu else 1 - 0.5 * math.exp(-(z - mu) / b)

    for mu, log_b in [(0.0, 0.0), (1.3, -1.5), (-0.7, -3.0)]:
        stats = torch.tensor([mu] * 3 + [log_b] * 3, dtype=torch.float64).view(1, 6, 1, 1).expand(1, 6, 1, y.numel())
        density = torch.exp(-logit_laplace_nll(x01.view(1, 1, 1, -1).expand(1, 3, 1, -1), stats).double())[0, 0, 0]
        mass = torch.trapezoid(density.double(), y).item()
        edge, b = math.log(0.9 / 0.1), math.exp(log_b)
        assert mass == pytest.approx(laplace_cdf(edge, mu, b) - laplace_cdf(-edge, mu, b), abs=2e-4), (mu, log_b)


def test_loss_terms_kl_to_uniform_and_its_weight():
    torch.manual_seed(0)
    model = DiscreteVAE(SMALL)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # uniform logits: KL(q || uniform) = 0
        model.encoder.output.conv.weight.zero_()
        model.encoder.output.conv.bias.zero_()
    out = model(images, temperature=1.0, kl_weight=5.0)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(out.recon_loss.item())
    # one code certain everywhere: KL = log K per token, weighted per sub-pixel (3 * 8 * 8 sub-pixels per token)
    with torch.no_grad():
        model.encoder.output.conv.bias[3] = 100.0
    torch.manual_seed(1)
    out = model(images, temperature=1.0, kl_weight=5.0)
    assert out.kl.item() == pytest.approx(math.log(64), rel=1e-4)
    assert out.loss.item() == pytest.approx(out.recon_loss.item() + 5.0 * math.log(64) / 192, rel=1e-4)
    assert out.recon.shape == images.shape and out.logits.shape == (2, 64, 4, 4)
    out.loss.backward()
    assert model.encoder.input.weight.grad is not None and model.decoder.input.conv.weight.grad is not None


@pytest.mark.parametrize("recon_loss", ["mse", "l1"])
def test_pixel_losses_decode_three_channels(recon_loss):
    model = DiscreteVAE(replace(SMALL, recon_loss=recon_loss))
    assert model.decoder.output.conv.out_channels == 3
    out = model(torch.rand(1, 3, 32, 32), temperature=0.5)
    assert out.recon_loss.item() > 0 and 0 <= out.recon.min() and out.recon.max() <= 1


def test_schedules_at_given_steps():
    cfg = DVAEConfig()  # DALL-E: tau 1 -> 1/16 over 150k updates, beta 0 -> 6.6 over 5000, both cosine
    assert temperature_at(cfg, 0) == 1.0
    assert temperature_at(cfg, 75_000) == pytest.approx((1 + 1 / 16) / 2)
    assert temperature_at(cfg, 150_000) == temperature_at(cfg, 10**7) == 1 / 16
    assert kl_weight_at(cfg, 0) == 0.0
    assert kl_weight_at(cfg, 2500) == pytest.approx(3.3)
    assert kl_weight_at(cfg, 1250) == pytest.approx(6.6 * (1 - math.cos(math.pi / 4)) / 2)
    assert kl_weight_at(cfg, 5000) == kl_weight_at(cfg, 10**6) == 6.6
    exp = replace(cfg, temperature_schedule="exponential")
    assert temperature_at(exp, 75_000) == pytest.approx(0.25)  # geometric mean of 1 and 1/16
    assert anneal(1.0, 0.0, 1, 4, "linear") == pytest.approx(0.75)
    assert anneal(2.0, 1.0, 5, 0) == 1.0  # no annealing steps: the end value throughout


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.img_size=100"):
        DVAEConfig(img_size=100)
    with pytest.raises(ValueError, match="model.hidden=30"):
        DVAEConfig(hidden=30)
    with pytest.raises(ValueError, match="temperature"):
        DVAEConfig(temperature_start=0.5, temperature_end=1.0)


def test_codebook_statistics_and_psnr():
    assert code_perplexity(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0)
    assert code_perplexity(torch.tensor([0, 9, 0, 0])).item() == pytest.approx(1.0)
    x = torch.full((1, 3, 4, 4), 0.5)
    assert psnr(x + 0.1, x).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01


def test_flops_are_counted_and_scale_with_pixels():
    small = DVAETask(SMALL).flops_per_sample()
    large = DVAETask(replace(SMALL, img_size=64)).flops_per_sample()
    assert small > 0 and large / small == pytest.approx(4.0, rel=0.02)


# --- the tokenizer files -----------------------------------------------------------------------------------------

def test_save_and_load_round_trip_gives_identical_codes(tmp_path):
    torch.manual_seed(0)
    model = DiscreteVAE(replace(SMALL, recon_loss="mse")).eval()
    folder = save_tokenizer(tmp_path / "tok", model)
    meta = json.loads((folder / "tokenizer.json").read_text())
    assert meta["type"] == "dvae" and meta["vocab_size"] == 64 and meta["downsample"] == 8
    assert meta["input_size"] == 32 and meta["input_range"] == [0, 1] and meta["model"]["recon_loss"] == "mse"
    loaded = load_tokenizer(folder)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.cfg == model.cfg
    images = torch.rand(3, 3, 112, 112)
    codes = model.get_codebook_indices(images)
    assert torch.equal(loaded.get_codebook_indices(images), codes)
    with torch.no_grad():
        assert torch.equal(loaded.decode_indices(codes), model.decode_indices(codes))
    # a run directory resolves to its export/
    (tmp_path / "run").mkdir()
    (folder).rename(tmp_path / "run" / "export")
    assert torch.equal(load_tokenizer(tmp_path / "run").get_codebook_indices(images), codes)


def test_load_tokenizer_errors_name_the_folder_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*launch/train_dvae.py"):
        load_tokenizer(missing)
    backbone = tmp_path / "backbone_export"
    backbone.mkdir()
    (backbone / "backbone.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*backbone_export.*backbone export"):
        load_tokenizer(backbone)

    folder = save_tokenizer(tmp_path / "tok", DiscreteVAE(SMALL))
    meta = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**meta, "type": "vqkd"}))
    with pytest.raises(ValueError, match="'vqkd'"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text(json.dumps({**meta, "model": {**meta["model"], "vocab_size": 128}}))
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text(json.dumps({**meta, "model": {**meta["model"], "depth": 3}}))
    with pytest.raises(ValueError, match="unknown model fields"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text(json.dumps(meta))
    (folder / "tokenizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.safetensors"):
        load_tokenizer(folder)


# --- the job ------------------------------------------------------------------------------------------------------

def test_train_job_logs_exports_and_resumes_its_schedules(photo_shards, tmp_path):
    assert main(run_args(photo_shards.url, tmp_path)) == 0
    run_dir = tmp_path / "train_dvae" / "t"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = {r["step"]: r for r in rows if "train/loss" in r}
    cfg = DVAEConfig(**{k.split(".", 1)[1].split("=")[0]: json.loads(k.split("=")[1]) for k in TINY_MODEL})
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    for step, row in train.items():  # the schedules follow the optimizer step (log.every=1: one step per row)
        assert row["train/temperature"] == pytest.approx(temperature_at(cfg, step - 1))
        assert row["train/kl_weight"] == pytest.approx(kl_weight_at(cfg, step - 1))
        for key in ("train/recon_loss", "train/kl", "train/perplexity", "train/psnr"):
            assert math.isfinite(row[key]), key
    final = [r for r in rows if "val/psnr" in r][-1]
    assert final["step"] == 6
    for key in ("val/psnr", "val/psnr_soft", "val/psnr_mean_colour", "val/psnr_bicubic", "val/perplexity"):
        assert math.isfinite(final[key]) and final[key] > 0, key
    assert 1 <= final["val/perplexity"] <= 32 and 0 < final["val/codes_used"] <= 1

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for tag in ("val/psnr", "val/perplexity", "val/codes_used", "train/kl", "train/temperature"):
        assert tag in events.Tags()["scalars"], tag
    picture = events.Images("images/reconstruction")[-1]
    # rows: input | hard | soft, 4 val images of 32 px with 2-px padding
    assert (picture.height, picture.width) == (3 * 34 + 2, 4 * 34 + 2)

    export = run_dir / "export"
    meta = json.loads((export / "tokenizer.json").read_text())
    assert meta["trained_steps"] == 6 and meta["final_temperature"] == pytest.approx(temperature_at(cfg, 6))
    tokenizer = load_tokenizer(export)
    assert tokenizer.vocab_size == 32 and tokenizer.cfg == cfg
    ckpt_weights = load_file(str(export / "tokenizer.safetensors"))
    assert set(ckpt_weights) == set(DiscreteVAE(cfg).state_dict())

    # resume: the schedules continue from the checkpoint's step, not from 0
    assert main(run_args(photo_shards.url, tmp_path, "optim.max_steps=8", "run.resume=auto")) == 0
    resumed = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}
    assert resumed[7]["train/temperature"] == pytest.approx(temperature_at(cfg, 6))
    assert json.loads((export / "tokenizer.json").read_text())["trained_steps"] == 8

    # the converter writes the tokenizer files of any checkpoint of the run, with the schedule step it was saved at
    from launch import convert_checkpoint
    assert convert_checkpoint.main([str(run_dir), "--out", str(tmp_path / "converted")]) == 0
    converted = load_tokenizer(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "tokenizer.json").read_text())["trained_steps"] == 8
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(),
                                                  load_tokenizer(export).state_dict().values()))


@pytest.mark.multiproc
def test_two_ranks_reduce_psnr_and_code_usage_over_the_whole_val_set(photo_shards, tmp_path):
    """2 ranks under the deepspeed launcher, ZeRO-2: the reported val PSNR and code usage (all-reduced, padding
    excluded) equal the exported tokenizer's over the whole validation set in one process."""
    from data_pipeline.stream import build_stream
    from tests.test_deepspeed_multiproc import deepspeed_launch

    # 12 val images on 2 ranks x 5 per batch: the last batch pads, so padding must be excluded to match (training
    # resampled: in epoch mode a batch of 5 is more than the 4 images rank 1 reads, a config error)
    deepspeed_launch("launch/train_dvae.py", *run_args(photo_shards.url, tmp_path, "optim.max_steps=4",
                                                       "engine.zero_stage=2", "data.batch_size=5",
                                                       "data.mode=resampled"), timeout=480)
    run_dir = tmp_path / "train_dvae" / "t"
    final = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/psnr" in r][-1]
    tokenizer = load_tokenizer(run_dir / "export")
    task = DVAETask(tokenizer.cfg)
    task.model = tokenizer
    task.step = 4
    stream = build_stream(photo_shards.url, map_fn=task.eval_transform, batch_size=12, num_workers=0, train=False)
    reference = task.evaluate(tokenizer, list(stream))
    for key in ("psnr", "psnr_soft", "psnr_mean_colour", "psnr_bicubic", "perplexity", "codes_used"):
        assert final[f"val/{key}"] == pytest.approx(reference[key], rel=1e-4, abs=1e-4), key
