"""pretrain_flip: masking in training only, retrieval recall, zero-shot prompts, the two exports (timm and open_clip,
loaded by the libraries themselves), and the job end to end (pictures, metrics, unmasked tuning from its export)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

from contracts.backbone import save_export
from data_pipeline.shard_writer import Sample, write_shards
from launch import pretrain_flip
from pretrain.flip import FLIPConfig, FLIPTask, flip_encoder_features, recall_at_k

# a model that builds and runs in milliseconds
TINY = dict(img_size=16, patch_size=4, width=32, depth=1, num_heads=2, text_width=32, text_depth=1, text_heads=2,
            embed_dim=16, context_length=8)
WORDS = ["red", "green", "blue", "dog", "cat", "fox", "sun", "moon"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 30), (200, 30, 200), (30, 200, 200),
           (250, 250, 250), (90, 90, 90)]


def _png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_masking_in_training_only_and_the_loss():
    task = FLIPTask(FLIPConfig(**TINY, mask_ratio=0.75))
    model = task.model
    imgs = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert model.visual._embeds(task.pixels(imgs)).shape[1] == 1 + 4       # class token + int(16 * 0.25)
    model.eval()
    assert model.visual._embeds(task.pixels(imgs)).shape[1] == 1 + 16      # evaluation sees every patch
    model.train()
    text = task.train_transform.tokenize(["red dog", "cat", "a blue moon"])
    assert text.shape == (3, 8) and text[0, 0] == 49406                    # BPE start token, padded to 8
    loss, metrics = task.training_step(model, {"image": imgs, "text": text})
    loss.backward()
    assert torch.isfinite(loss) and abs(metrics["temperature"] - 0.07) < 1e-6
    assert model.logit_scale.grad is not None and model.visual.conv1.weight.grad is not None
    # the scale is clamped at 100 in the forward, so the loss stops pushing it
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert task.training_step(model, {"image": imgs, "text": text})[1]["logit_scale"] == pytest.approx(100.0)
    no_decay, decay = task.param_groups()
    assert any(p is model.logit_scale for p in no_decay["params"]) and decay["weight_decay"] == 0.2
    assert not any(p is model.visual.positional_embedding for g in (no_decay, decay) for p in g["params"])  # sin-cos
    unmasked = FLIPTask(FLIPConfig(**TINY, mask_ratio=0.0))
    assert isinstance(unmasked.model.visual.patch_dropout, torch.nn.Identity)
    # a bf16 engine's weights: the normalised float32 crops are cast to them
    bf16 = unmasked.model.to(torch.bfloat16)
    assert torch.isfinite(unmasked.training_step(bf16, {"image": imgs, "text": text})[0])


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0],     # row 0: own column first
                        [0.8, 0.5, 0.1],     # row 1: own column second
                        [0.3, 0.2, 0.05]])   # row 2: own column last
    assert recall_at_k(sim, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    assert recall_at_k(sim.T, ks=(1,))[1] == pytest.approx(2 / 3)


def test_config_errors():
    with pytest.raises(ValueError, match="mask_ratio=0.99 leaves no visible patch"):
        FLIPConfig(**{**TINY, "mask_ratio": 0.99})
    with pytest.raises(ValueError, match="text_heads=3 does not divide"):
        FLIPConfig(**{**TINY, "text_heads": 3})
    with pytest.raises(ValueError, match="model.init=/nonexistent"):
        FLIPConfig(**TINY, init="/nonexistent")


def test_exports_load_with_timm_and_open_clip(tmp_path):
    task = FLIPTask(FLIPConfig(**TINY))
    with torch.no_grad():
        task.model.logit_scale.fill_(5.0)          # above log(100): exported clamped, as training used it
    state = task.model.state_dict()
    tensors, meta = task.export(state)
    save_export(tmp_path, "backbone", tensors, meta)
    for name, (t, m) in task.extra_exports(state).items():
        save_export(tmp_path, name, t, m)
    model = task.model.eval()
    imgs = torch.randn(2, 3, 16, 16)

    timm_model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    oc_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'open_clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'open_clip'}")
    oc_model.eval()
    with torch.no_grad():
        ours = model.encode_image(imgs)
        torch.testing.assert_close(timm_model(imgs), ours, atol=1e-5, rtol=0)          # the projection is the head
        torch.testing.assert_close(timm_model.forward_features(imgs), flip_encoder_features(model, imgs),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(oc_model.encode_image(imgs), ours, atol=1e-6, rtol=0)
        text = ["a red fox", "green moon"]
        assert tokenizer.context_length == 8
        torch.testing.assert_close(oc_model.encode_text(tokenizer(text)),
                                   model.encode_text(task.eval_transform.tokenize(text)), atol=1e-6, rtol=0)
        assert oc_model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    assert preprocess.transforms[1].size == (16, 16)
    config = json.loads((tmp_path / "open_clip" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["patch_dropout"] == 0.0 and config["vitpretrain"]["mask_ratio"] == 0.5


def test_zero_shot_prompts_from_metadata():
    task = FLIPTask(FLIPConfig(**TINY))
    model = task.model.eval()
    with torch.no_grad():
        by_name = task.zero_shot_weights(model, {"classes": ["dog", "cat"]})
        by_prompts = task.zero_shot_weights(model, {"classes": ["dog", "cat"], "prompts": [["dog", "puppy"], ["cat"]]})
        dog, puppy, cat = model.encode_text(task.eval_transform.tokenize(["dog", "puppy", "cat"]), normalize=True)
    assert by_name.shape == (16, 2)
    torch.testing.assert_close(by_prompts[:, 1], cat)
    mean = (dog + puppy) / 2
    torch.testing.assert_close(by_prompts[:, 0], mean / mean.norm())
    with pytest.raises(ValueError, match="metadata names no classes"):
        task.zero_shot_weights(model, {})


def _shards(root: Path) -> tuple[str, str, str]:
    """Captioned train / held-out sets (a colour per word) and a labelled zero-shot set named by metadata classes."""
    rng = np.random.default_rng(0)
    train = [Sample(_png(COLOURS[i % 8]), "png", txt=f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]}") for i in range(32)]
    val = [Sample(_png(COLOURS[i]), "png", txt=WORDS[i]) for i in range(8)]
    labelled = [Sample(_png(COLOURS[int(c)]), "png", cls=int(c)) for c in rng.integers(0, 3, 12)]
    urls = []
    for name, samples, meta in (("train", train, {"kind": "captioned"}), ("val", val, {"kind": "captioned"}),
                                ("zs", labelled, {"kind": "classification", "classes": WORDS[:3]})):
        write_shards(samples, str(root / name), {**meta, "source": "test"}, maxcount=8, progress=False)
        urls.append(str(root / name))
    return tuple(urls)


def test_job_end_to_end_then_unmasked_tuning(tmp_path):
    train, val, zero_shot = _shards(tmp_path / "data")
    model = [f"model.{k}={v}" for k, v in TINY.items()]
    common = [*model, f"data.train={train}", f"data.val={val}", f"data.zero_shot={zero_shot}", "data.batch_size=8",
              "data.num_workers=0", "optim.max_steps=2", "optim.warmup_steps=1", "log.every=1",
              f"run.dir={tmp_path / 'runs'}", "ckpt.every=0"]
    assert pretrain_flip.main([*common, "run.name=masked"]) == 0
    run = tmp_path / "runs" / "pretrain_flip" / "masked"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for row in rows for k, v in row.items()}
    for key in ("train/temperature", "val/i2t_r1", "val/t2i_r10", "val/zero_shot_top1", "val/loss"):
        assert key in final, key
    assert final["val/pairs"] == 8 and 0 <= final["val/zero_shot_top1"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert "images/similarity" in events.Tags()["images"]
    picture = events.Images("images/similarity")[-1]
    assert (picture.width, picture.height) == (3 * 64 + 8 * 64, 64 + 8 * 64)   # 8 pairs: thumbnails + captions
    assert (run / "export" / "open_clip" / "open_clip_model.safetensors").is_file()
    timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)

    # the second stage: every patch visible, from the first stage's weights
    assert pretrain_flip.main([*common, "run.name=tuned", f"init={run}", "mask_ratio=0", "optim.max_steps=1"]) == 0
    tuned = tmp_path / "runs" / "pretrain_flip" / "tuned"
    assert json.loads((tuned / "export" / "open_clip" / "open_clip_config.json").read_text())[
        "vitpretrain"]["mask_ratio"] == 0.0
    # another geometry cannot start from it: one paragraph, exit 2
    assert pretrain_flip.main([*common, "run.name=bad", f"init={run}", "model.embed_dim=8"]) == 2
    # a job that does not classify zero-shot refuses data.zero_shot
    from launch import pretrain_mae
    assert pretrain_mae.main([f"data.train={train}", f"data.zero_shot={zero_shot}", "data.num_workers=0",
                              "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=1",
                              "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
                              "model.decoder_num_heads=2", f"run.dir={tmp_path / 'runs'}"]) == 2


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert pretrain_flip.main(["model.mask_ratio=1.0", "data.train=embedded:photos"]) == 2
    assert pretrain_flip.main(["model.pool=cls", "data.train=embedded:photos"]) == 2
    assert pretrain_flip.main([f"data.zero_shot={tmp_path / 'missing'}", "data.train=embedded:photos"]) == 2



def test_clip_loss_across_ranks_scores_local_rows_against_all(monkeypatch):
    """The task's ClipLoss as rank 1 of 2 (the gather stubbed with rank 0's features): local rows against every
    rank's columns, labels offset by the rank, features gathered with gradients; so the mean of the ranks' losses
    is the loss of the whole batch (the real 2-rank gather is open_clip's, run by the job on several ranks)."""
    import open_clip.loss as oc_loss
    from torch.nn import functional as F

    import pretrain.flip as flip

    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(2))
    seen = {}

    def gather(image_features, text_features, **kw):
        seen.update(kw)
        return torch.cat([img[:4], image_features]), torch.cat([txt[:4], text_features])

    monkeypatch.setattr(flip, "_world", lambda: (1, 2))
    monkeypatch.setattr(oc_loss, "gather_features", gather)
    task = FLIPTask.__new__(FLIPTask)            # the loss alone: no model needed
    task.cfg, task._loss = FLIPConfig(**TINY), None
    scale = torch.tensor(10.0)
    rank1 = task.loss_fn()(img[4:], txt[4:], scale)
    assert seen == {"local_loss": True, "gather_with_grad": True, "rank": 1, "world_size": 2, "use_horovod": False}
    logits = scale * img @ txt.T                                            # the whole batch, one process
    rows = torch.arange(8)
    per_row = (F.cross_entropy(logits, rows, reduction="none") + F.cross_entropy(logits.T, rows, reduction="none")) / 2
    assert rank1.item() == pytest.approx(per_row[4:].mean().item(), rel=1e-5)
    whole = oc_loss.ClipLoss()(img, txt, scale)
    assert (per_row[:4].mean() + rank1).item() / 2 == pytest.approx(whole.item(), rel=1e-5)


def test_presets_parse_and_unmasked_tuning_needs_its_init(tmp_path):
    """The presets resolve (FLIP's recipe in vit_b16); the unmasked tuning stage refuses to start without init=, and
    the job says so with exit 2."""
    from launch.jobs import JOBS
    from launch.runtime import config

    job = JOBS["pretrain_flip"]

    def parse(*argv: str) -> config.JobConfig:
        return config.parse_args("pretrain_flip", FLIPConfig, list(argv), archs=job.archs, aliases=job.aliases)[0]

    cfg = parse("--preset", "vit_b16", "data.train=s3://b/x")
    assert (cfg.model.mask_ratio, cfg.optim.betas, cfg.optim.weight_decay) == (0.5, (0.9, 0.95), 0.2)
    assert cfg.model.crop_scale == (0.5, 1.0)
    tuned = parse("--preset", "unmasked_tuning", "data.train=s3://b/x", f"init={tmp_path}")
    assert (tuned.model.stage, tuned.model.mask_ratio, tuned.model.init) == ("unmasked_tuning", 0.0, str(tmp_path))
    with pytest.raises(config.ConfigError, match="model.stage=unmasked_tuning .* give init=RUN"):
        parse("--preset", "unmasked_tuning", "data.train=s3://b/x")
    assert pretrain_flip.main(["--preset", "unmasked_tuning", "data.train=embedded:emoji_captions",
                               f"run.dir={tmp_path}"]) == 2


def _gathered_loss_rank(rank: int, world: int, port: int, feats: tuple[torch.Tensor, torch.Tensor], out: dict):
    """One of 2 gloo ranks: the task's ClipLoss on its half of the batch, features gathered with gradients."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = feats[0].shape[0] // world
        img = feats[0][rank * n:(rank + 1) * n].clone().requires_grad_(True)
        txt = feats[1][rank * n:(rank + 1) * n].clone().requires_grad_(True)
        task = FLIPTask.__new__(FLIPTask)            # the loss alone: no model needed
        task.cfg, task._loss = FLIPConfig(**TINY), None
        loss = task.loss_fn()(img, txt, torch.tensor(10.0))
        loss.backward()
        out[rank] = (loss.item(), img.grad, txt.grad)
    finally:
        dist.destroy_process_group()


def test_clip_loss_gathered_across_ranks_equals_one_batch():
    """local_loss + gather_with_grad on 2 ranks: the mean of the ranks' losses is the loss of the whole batch, and
    the gradients summed over ranks (what reaches each rank's features through the gather) are the whole batch's
    (x 2: data parallelism then averages the ranks' parameter gradients)."""
    import socket

    import torch.multiprocessing as mp
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    feats = tuple(torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    # spawned, not forked: a forked child would inherit a process group an earlier test left in this process
    mp.start_processes(_gathered_loss_rank, args=(2, port, feats, out), nprocs=2, start_method="spawn")
    img, txt = (f.clone().requires_grad_(True) for f in feats)
    whole = ClipLoss()(img, txt, torch.tensor(10.0))
    whole.backward()
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(whole.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), 2 * img.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]), 2 * txt.grad, atol=1e-6, rtol=1e-5)
