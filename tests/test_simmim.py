"""SimMIM: the mask generator, parity of the loss and reconstruction with transformers' SwinForMaskedImageModeling and
ViTForMaskedImageModeling on the same weights and mask, the mask token, parameter groups, exports read back by plain
timm, the presets, and a whole run through launch/pretrain_simmim.py whose export finetune_cls takes at another size
and window (relative position tables resized exactly as timm's own Swin checkpoint filter does)."""
import json
import math
import random
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.models.swin_transformer import checkpoint_filter_fn
from transformers import SwinConfig, SwinForMaskedImageModeling, ViTConfig, ViTForMaskedImageModeling

from contracts import backbone as cb
from launch import finetune_cls, pretrain_simmim
from launch.runtime import config
from pretrain.masking import SimMIMMaskGenerator
from pretrain.simmim import (SIMMIM_ARCHS, SimMIMConfig, SimMIMEvalTransform, SimMIMTask, SwinForSimMIM,
                             ViTForSimMIM, make_mask_generator, simmim_encoder_features)

ROOT = Path(__file__).resolve().parents[1]
# a Swin with shifted windows in its first two stages (16 and 8 tokens per side, window 4) and a global last stage
SWIN = SimMIMConfig(backbone="swin", img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                    window_size=4, mask_patch_size=16)
SHARED_VIT = SimMIMConfig(backbone="vit", img_size=32, patch_size=8, embed_dim=32, depths=(2,), num_heads=(2,),
                          mask_patch_size=16)   # BEiT-style: shared relative bias, LayerScale, no absolute positions
PLAIN_VIT = SimMIMConfig(backbone="vit", img_size=32, patch_size=8, embed_dim=32, depths=(2,), num_heads=(2,),
                         rel_pos_bias="none", abs_pos_emb=True, layer_scale=0.0, mask_patch_size=16)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor moved away from its (often constant) init, so a swapped or dropped tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def masks(cfg: SimMIMConfig, n: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    generator = make_mask_generator(cfg)
    return torch.stack([generator(rng).flatten() for _ in range(n)])


# --- the mask generator -------------------------------------------------------------------------------------------

def test_mask_generator_paper_setting():
    """192 px, squares of 32, Swin's 4-px tokens, ratio 0.6: ceil(36 x 0.6) = 22 squares, each 8 x 8 tokens."""
    generator = SimMIMMaskGenerator(192, 32, 4, 0.6)
    rng = random.Random(0)
    draws = torch.stack([generator(rng) for _ in range(400)])
    assert draws.shape == (400, 48, 48) and draws.dtype == torch.bool
    assert (draws.sum(dim=(1, 2)) == 22 * 64).all()
    squares = draws[:, ::8, ::8]  # one token per square
    assert torch.equal(draws, squares.repeat_interleave(8, 1).repeat_interleave(8, 2))  # constant within a square
    assert (squares.sum(dim=(1, 2)) == 22).all()
    # uniform over the squares: each one masked in 22/36 of the draws (binomial sd ~0.024 at 400 draws)
    assert (squares.float().mean(0) - 22 / 36).abs().max() < 0.1
    assert len({tuple(d.flatten().tolist()) for d in squares}) == 400  # fresh draws


@pytest.mark.parametrize("size,square,patch,ratio,count,scale", [
    (224, 32, 16, 0.6, 30, 2),     # ViT-B/16: ceil(49 x 0.6) = 30 squares of 2 x 2 tokens
    (64, 16, 4, 0.6, 10, 4),       # the tiny preset: ceil(9.6) = 10 of 16
    (192, 32, 4, 0.5, 18, 8),      # an exact product stays as it is
    (96, 32, 4, 0.1, 1, 8),        # ceil(0.9) = 1
])
def test_mask_generator_counts(size, square, patch, ratio, count, scale):
    generator = SimMIMMaskGenerator(size, square, patch, ratio)
    assert (generator.mask_count, generator.scale, generator.grid) == (count, scale, size // patch)
    assert int(generator().sum()) == count * scale * scale


def test_mask_generator_refuses_bad_geometry():
    with pytest.raises(ValueError, match="must divide the image"):
        SimMIMMaskGenerator(200, 32, 4, 0.6)
    with pytest.raises(ValueError, match="multiple of the model's patch"):
        SimMIMMaskGenerator(192, 32, 12, 0.6)
    with pytest.raises(ValueError, match="masks all"):
        SimMIMMaskGenerator(64, 32, 4, 0.9)   # ceil(4 x 0.9) = 4 of 4


def test_eval_masks_depend_only_on_the_sample():
    from PIL import Image

    transform = SimMIMEvalTransform(SWIN, (0.5,) * 3, (0.25,) * 3)
    image = Image.new("RGB", (80, 70), (10, 200, 30))
    a, b = (transform({"__key__": "000007", "image": image}) for _ in range(2))
    other = transform({"__key__": "000008", "image": image})
    assert a["image"].shape == (3, 64, 64) and a["mask"].shape == (256,)
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["mask"], other["mask"])


# --- parity with transformers ---------------------------------------------------------------------------------------

def swin_to_hf(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin keys (+ mask_token, decoder) -> SwinForMaskedImageModeling keys: timm merges patches at the start of
    stage i, transformers at the end of stage i - 1; the fused qkv splits into q, k, v."""
    block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for key, value in ours.items():
        if key == "mask_token":
            out["swin.embeddings.mask_token"] = value
        elif key.startswith("patch_embed.proj."):
            out["swin.embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("patch_embed.norm."):
            out["swin.embeddings.norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("norm."):
            out["swin.layernorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("decoder."):
            out[key] = value
        elif ".downsample." in key:
            _, stage, rest = key.split(".", 2)
            out[f"swin.encoder.layers.{int(stage) - 1}.{rest}"] = value
        else:
            _, stage, _, index, rest = key.split(".", 4)
            prefix = f"swin.encoder.layers.{stage}.blocks.{index}."
            if rest.startswith("attn.qkv."):
                param = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.{name}.{param}"] = part
            elif rest == "attn.relative_position_bias_table":
                out[prefix + block[rest]] = value
            else:
                sub, param = rest.rsplit(".", 1)
                out[f"{prefix}{block[sub]}.{param}"] = value
    return out


def vit_to_hf(ours: dict[str, torch.Tensor], k_bias_seed: int = 5) -> dict[str, torch.Tensor]:
    """timm Beit keys without relative bias (+ mask_token, decoder) -> ViTForMaskedImageModeling keys. Beit has q and
    v biases only; the k bias transformers has gets random values: it adds q.b_k to every score of a query, which the
    softmax cancels, so the outputs must not change."""
    fixed = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
             "mask_token": "vit.embeddings.mask_token", "norm.weight": "vit.layernorm.weight",
             "norm.bias": "vit.layernorm.bias",
             "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias"}
    block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    generator = torch.Generator().manual_seed(k_bias_seed)
    out = {}
    for key, value in ours.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key.startswith("decoder."):
            out[key] = value
        else:
            _, index, rest = key.split(".", 2)
            prefix = f"vit.layers.{index}.attention."
            if rest == "attn.qkv.weight":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}{name}.weight"] = part
                out[f"{prefix}k_proj.bias"] = torch.randn(value.shape[1], generator=generator)
            elif rest in ("attn.q_bias", "attn.v_bias"):
                out[f"{prefix}{rest[5]}_proj.bias"] = value
            else:
                sub, param = rest.rsplit(".", 1)
                out[f"vit.layers.{index}.{block[sub]}.{param}"] = value
    return out


def test_loss_and_reconstruction_match_transformers_swin():
    torch.manual_seed(0)
    ours = randomised(SwinForSimMIM(SWIN))
    hf_config = SwinConfig(image_size=SWIN.img_size, patch_size=SWIN.patch_size, embed_dim=SWIN.embed_dim,
                           depths=list(SWIN.depths), num_heads=list(SWIN.num_heads), window_size=SWIN.window_size,
                           encoder_stride=SWIN.encoder_stride, drop_path_rate=0.0, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    hf = SwinForMaskedImageModeling(hf_config).eval()
    hf.load_state_dict(swin_to_hf(ours.state_dict()), strict=True)

    images = torch.randn(3, 3, SWIN.img_size, SWIN.img_size, generator=torch.Generator().manual_seed(2))
    mask = masks(SWIN, 3)
    with torch.no_grad():
        loss, reconstruction = ours(images, mask)
        ref = hf(pixel_values=images, bool_masked_pos=mask)
    torch.testing.assert_close(reconstruction, ref.reconstruction, rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - ref.loss.item()) < 1e-5
    # the paper's formula, written out: L1 summed over masked pixels and channels / (masked pixels + 1e-5) / 3
    masked = mask.view(3, 16, 16).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    assert masked.sum() == 3 * 10 * 16 * 16  # 10 squares of 16 x 16 pixels per image
    by_hand = ((images - reconstruction).abs() * masked).sum() / (masked.sum() + 1e-5) / 3
    assert abs(loss.item() - by_hand.item()) < 1e-6


def test_loss_and_reconstruction_match_transformers_vit():
    torch.manual_seed(0)
    ours = randomised(ViTForSimMIM(PLAIN_VIT))
    hf_config = ViTConfig(image_size=PLAIN_VIT.img_size, patch_size=PLAIN_VIT.patch_size,
                          hidden_size=PLAIN_VIT.embed_dim, num_hidden_layers=PLAIN_VIT.depths[0],
                          num_attention_heads=PLAIN_VIT.num_heads[0], intermediate_size=4 * PLAIN_VIT.embed_dim,
                          encoder_stride=PLAIN_VIT.encoder_stride, layer_norm_eps=1e-6, qkv_bias=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = ViTForMaskedImageModeling._from_config(hf_config, attn_implementation="eager").eval()
    hf.load_state_dict(vit_to_hf(ours.state_dict()), strict=True)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = masks(PLAIN_VIT, 3)
    assert int(mask[0].sum()) == 3 * 4  # ceil(4 x 0.6) = 3 squares of 2 x 2 tokens
    with torch.no_grad():
        loss, reconstruction = ours(images, mask)
        ref = hf(pixel_values=images, bool_masked_pos=mask)
    torch.testing.assert_close(reconstruction, ref.reconstruction, rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - ref.loss.item()) < 1e-5


@pytest.mark.parametrize("cfg", [SWIN, PLAIN_VIT], ids=["swin", "vit"])
def test_masked_pixels_reach_the_encoder_only_as_the_mask_token(cfg):
    """Whatever the masked pixels hold, the prediction is the same; a visible pixel changes it."""
    model = randomised(SwinForSimMIM(cfg) if cfg.backbone == "swin" else ViTForSimMIM(cfg))
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    mask = masks(cfg, 2)
    pixels = mask.view(2, 1, cfg.grid, cfg.grid).repeat_interleave(cfg.patch_size, 2) \
        .repeat_interleave(cfg.patch_size, 3).expand(-1, 3, -1, -1)
    with torch.no_grad():
        _, base = model(images, mask)
        _, masked_changed = model(torch.where(pixels, torch.randn_like(images), images), mask)
        _, visible_changed = model(torch.where(pixels, images, images + 1.0), mask)
    torch.testing.assert_close(masked_changed, base, rtol=0, atol=1e-5)
    assert (visible_changed - base).abs().max() > 1e-2


def test_param_groups_follow_simmim():
    for cfg, no_decay_names in ((SWIN, {"mask_token", "layers.0.blocks.0.attn.relative_position_bias_table"}),
                                (SHARED_VIT, {"cls_token"})):
        task = SimMIMTask(cfg)
        names = {id(p): n for n, p in task.model.named_parameters()}
        groups = task.param_groups()
        assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
        no_decay, decay = ({names[id(p)] for p in g["params"]} for g in groups)
        assert no_decay_names <= no_decay and "decoder.0.bias" in no_decay and "decoder.0.weight" in decay
        assert len(no_decay) + len(decay) == len(names)
        assert all(name.endswith(".bias") or task.model.get_parameter(name).ndim == 1 or name in no_decay_names
                   or "relative_position_bias_table" in name for name in no_decay)
    assert {"mask_token", "rel_pos_bias.relative_position_bias_table"} <= decay  # SimMIM's ViT decays both


# --- exports ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [SWIN, SHARED_VIT, PLAIN_VIT], ids=["swin", "vit_shared_rel_pos", "vit_plain"])
def test_export_loads_in_plain_timm_with_the_encoder_features(cfg, tmp_path):
    task = SimMIMTask(cfg)
    randomised(task.model)
    tensors, meta = task.export({"module." + k: v for k, v in task.model.state_dict().items()})
    assert not any(k.startswith(("mask_token", "decoder")) for k in tensors)
    folder = cb.save_backbone(tmp_path / "export", tensors, meta)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    expected_family = {"swin": "swin", "vit": "vit" if cfg.rel_pos_bias == "none" else "beit"}[cfg.backbone]
    assert model.default_cfg["architecture"].startswith(expected_family)
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), simmim_encoder_features(task.model, images))


def test_swin_b192_is_timm_swin_base_and_presets_hold_the_recipes():
    with torch.device("meta"):
        ours = SwinForSimMIM(SimMIMConfig(**SIMMIM_ARCHS["swin_b192"]))
        timm_base = timm.create_model("swin_base_patch4_window7_224", num_classes=0, img_size=192, window_size=6)
    encoder = {k: v.shape for k, v in ours.state_dict().items() if not k.startswith(("mask_token", "decoder."))}
    assert encoder == {k: v.shape for k, v in timm_base.state_dict().items()}
    assert 86e6 < sum(math.prod(s) for s in encoder.values()) < 88e6    # Swin-B: 87.8M with its 1000-class head

    def resolved(preset):
        cfg, _ = config.parse_args("pretrain_simmim", SimMIMConfig, ["--preset", preset, "data.train=s3://b/in1k"],
                                   SIMMIM_ARCHS)
        config.resolve(cfg, job="pretrain_simmim", preset=preset, run_dir="r", world_size=16, batches_per_epoch=625,
                       num_samples=None, device="cuda:0", precision="bf16")
        return cfg

    swin = resolved("swin_b192")
    m, o = swin.model, swin.optim
    assert (m.backbone, m.img_size, m.window_size, m.mask_patch_size, m.mask_ratio, m.crop_scale, m.drop_path) == \
        ("swin", 192, 6, 32, 0.6, (0.67, 1.0), 0.0)
    assert (o.betas, o.weight_decay, o.epochs, o.warmup_epochs, swin.engine.grad_clip) == ((0.9, 0.999), 0.05, 100,
                                                                                             10, 5.0)
    assert swin.derived.global_batch == 2048 and swin.derived.lr == pytest.approx(2e-4 * 2048 / 512)
    vit = resolved("vit_b16")
    m = vit.model
    assert (m.backbone, m.img_size, m.patch_size, m.depths, m.rel_pos_bias, m.abs_pos_emb, m.layer_scale,
            m.drop_path) == ("vit", 224, 16, (12,), "shared", False, 0.1, 0.1)
    assert vit.optim.epochs == 800 and vit.derived.lr == pytest.approx(1e-4 * 2048 / 512)
    for path in sorted((ROOT / "launch/presets/pretrain_simmim").glob("*.yaml")):
        items = config.load_preset(path)
        config.build(SimMIMConfig, [("data.train", "s3://b/x")] + items, SIMMIM_ARCHS)  # keys valid, types right


@pytest.mark.parametrize("override,message", [
    ("model.window_size=3", "does not tile stage 0"),
    ("model.img_size=72", "total stride 16"),
    ("model.depths=2,2", "one value per stage"),
    ("model.mask_patch_size=24", "model.mask_patch_size=24"),
])
def test_bad_geometry_is_a_config_error(override, message, tmp_path, caplog):
    assert pretrain_simmim.main([override, f"run.dir={tmp_path}"]) == 2
    assert message in caplog.text


def test_finetune_window_size_needs_a_windowed_backbone(tmp_path, caplog):
    assert finetune_cls.main(["model.window_size=7", "data.num_workers=0", f"run.dir={tmp_path}"]) == 2
    assert "model.window_size=7 needs a windowed backbone" in caplog.text


# --- a whole run, then finetune_cls at another size and window -------------------------------------------------

def test_job_then_finetune_at_another_size_and_window(shard_factory, tmp_path):
    shards = shard_factory.write([[shard_factory.sample(f"{s * 8 + i:06d}", size=48) for i in range(8)]
                                  for s in range(2)], name="photos")   # 2 shards x 8 random 48-px photographs
    micro = ["model.img_size=32", "model.embed_dim=16", "model.depths=1,1", "model.num_heads=1,2",
             "model.window_size=4", "model.mask_patch_size=8"]
    args = micro + [f"data.train={shards.url}", f"data.val={shards.url}", "data.batch_size=8", "data.num_workers=0",
                    "optim.max_steps=3", "optim.warmup_steps=1",
                    "log.every=1", "log.eval_every=0", "log.images_every=0", "ckpt.every=0", f"run.dir={tmp_path}",
                    "run.name=s"]
    assert pretrain_simmim.main(args) == 0
    run = tmp_path / "pretrain_simmim" / "s"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["train/masked_fraction"] == pytest.approx(10 / 16) for r in train)  # ceil(0.6 x 16) squares
    assert "val/loss" in rows[-1] and 0 < rows[-1]["val/loss"] < 5
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    picture = events.Images("images/reconstruction")[-1]
    assert picture.height > 4 * 32 and picture.width > 8 * 32   # 4 rows x 8 images of 32 px

    export = run / "export"
    meta = cb.read_config(export)
    assert meta["architecture"].startswith("swin") and meta["source"] == "simmim"
    assert meta["model_kwargs"]["window_size"] == 4 and meta["model_kwargs"]["img_size"] == 32
    timm.create_model(f"local-dir:{export}", pretrained=True)   # plain timm reads it

    # the resampling loader resizes every relative position table as timm's own Swin checkpoint filter does
    model, _, report = cb.load_resampled(export, img_size=48, window_size=6)
    reference = checkpoint_filter_fn(cb.read_weights(export), model)
    tables = [k for k in model.state_dict() if k.endswith("relative_position_bias_table")]
    assert len(tables) == 2 and not report.unexpected
    for key in tables:
        assert model.state_dict()[key].shape == (11 * 11, model.get_submodule(key[:-29]).num_heads)
        torch.testing.assert_close(model.state_dict()[key], reference[key], rtol=0, atol=0)

    ft = [f"model.init={export}", "model.img_size=48", "model.window_size=6", "data.batch_size=16", "data.val=",
          "data.num_workers=0", "optim.max_steps=2", "optim.warmup_steps=1", "log.every=1",
          "log.eval_every_epoch=false", "ckpt.best_metric=", f"run.dir={tmp_path}", "run.name=ft"]
    assert finetune_cls.main(ft) == 0   # the embedded digits, 10 classes
    finetuned = cb.read_config(tmp_path / "finetune_cls" / "ft" / "export")
    assert finetuned["architecture"].startswith("swin") and finetuned["model_kwargs"]["num_classes"] == 10
    assert (finetuned["model_kwargs"]["img_size"], finetuned["model_kwargs"]["window_size"]) == (48, 6)
    rows = [json.loads(line) for line in (tmp_path / "finetune_cls" / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]


def test_flops_per_sample_is_three_forwards():
    """The ViT on every token (16 patches + the class token) and the 1x1 head on the 4 x 4 map; backward is two
    forwards, except the patch embedding needs no gradient for its input."""
    cfg = PLAIN_VIT
    tokens, width, depth, p = cfg.grid ** 2 + 1, cfg.embed_dim, cfg.depths[0], cfg.patch_size
    patch_embed = 2 * cfg.grid ** 2 * 3 * p * p * width
    blocks = depth * (2 * tokens * 12 * width * width + 2 * 2 * tokens * tokens * width)  # linears, then q@k, attn@v
    head = 2 * cfg.grid ** 2 * width * p * p * 3
    assert SimMIMTask(cfg).flops_per_sample() == 3 * (patch_embed + blocks + head) - patch_embed
