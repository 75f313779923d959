"""IPT restoration, units: PSNR/SSIM against scikit-image, degradation statistics, bicubic against MATLAB's imresize
rule, tiled and self-ensembled inference, the multi-head/multi-tail model, the contrastive loss, body export/import
and the ViT backbone -> body mapping."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from finetune.ipt import degradations as deg
from finetune.ipt import metrics

RNG = np.random.default_rng(0)


def photo_pair(h: int = 40, w: int = 36) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'clean' RGB image and a noisy 8-bit copy, [3, H, W] uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    clean = np.stack([120 + 80 * np.sin(xx / 5.0), 100 + 60 * np.cos(yy / 7.0), 90 + 50 * np.sin((xx + yy) / 9.0)])
    noisy = clean + RNG.normal(0, 12, clean.shape)
    return np.clip(clean, 0, 255).round().astype(np.uint8), np.clip(noisy, 0, 255).round().astype(np.uint8)


# --- metrics -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shave", [0, 3])
def test_psnr_ssim_equal_skimage_on_rgb_and_y(shave):
    clean, noisy = photo_pair()
    c, n = torch.from_numpy(clean).float(), torch.from_numpy(noisy).float()
    ours = metrics.image_metrics(n[None], c[None], shave)
    cs, ns = metrics.shave_border(c, shave).numpy(), metrics.shave_border(n, shave).numpy()
    ref_psnr = peak_signal_noise_ratio(cs.astype(np.float64), ns.astype(np.float64), data_range=255)
    ref_ssim = structural_similarity(cs.astype(np.float64), ns.astype(np.float64), data_range=255, channel_axis=0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    # Y as MATLAB's rgb2ycbcr (BT.601 studio range), unrounded
    y = lambda a: 16 + (65.481 * a[0] + 128.553 * a[1] + 24.966 * a[2]) / 255.0  # noqa: E731
    yc, yn = y(cs.astype(np.float64)), y(ns.astype(np.float64))
    ref_psnr_y = peak_signal_noise_ratio(yc, yn, data_range=255)
    ref_ssim_y = structural_similarity(yc, yn, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False)
    assert abs(float(ours["psnr_rgb"][0]) - ref_psnr) < 1e-4
    assert abs(float(ours["psnr_y"][0]) - ref_psnr_y) < 1e-4
    assert abs(float(ours["ssim_rgb"][0]) - ref_ssim) < 1e-4
    assert abs(float(ours["ssim_y"][0]) - ref_ssim_y) < 1e-4
    assert abs(float(ours["psnr_y"][0]) - float(ours["psnr_rgb"][0])) > 0.05  # the Y-vs-RGB gap is real


def test_y_psnr_equals_ipt_calc_psnr():
    """IPT utility.calc_psnr: the RGB difference / 255 weighted by 65.738/129.057/25.064 over 256, shave = scale."""
    clean, noisy = photo_pair(48, 48)
    sr, hr = torch.from_numpy(noisy).double()[None], torch.from_numpy(clean).double()[None]
    scale = 2
    diff = (sr - hr) / 255.0
    gray = torch.tensor([65.738, 129.057, 25.064], dtype=torch.float64).view(1, 3, 1, 1) / 256
    valid = diff.mul(gray).sum(dim=1)[..., scale:-scale, scale:-scale]
    ipt = -10 * math.log10(valid.pow(2).mean().item())
    assert float(metrics.psnr(metrics.rgb_to_y(sr), metrics.rgb_to_y(hr), scale)[0]) == pytest.approx(ipt, abs=1e-4)


# --- degradations ------------------------------------------------------------------------------------------------

def test_gaussian_noise_sigma_and_clamp():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((3, 128, 128), 128.0)
    for sigma in (30.0, 50.0):
        noisy = deg.add_gaussian_noise(flat, sigma, gen)
        residual = noisy - flat
        assert residual.std().item() == pytest.approx(sigma, rel=0.03)  # mid-grey: clamping is rare
        assert abs(residual.mean().item()) < 1.0
        assert noisy.dtype == torch.float32 and not torch.equal(noisy, noisy.round())  # IPT: not quantised
    bright = deg.add_gaussian_noise(torch.full((3, 128, 128), 245.0), 50.0, gen)
    assert bright.max() <= 255 and bright.min() >= 0
    # near white the clamp cuts the upper tail: smaller spread, darker mean
    assert (bright - 245).std() < 0.8 * 50 and (bright - 245).mean() < -5


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_output_size_and_quantisation(scale):
    hr = torch.randint(0, 256, (2, 3, 48, 48)).float()
    lr = deg.bicubic_downsample(hr, scale)
    assert lr.shape == (2, 3, 48 // scale, 48 // scale) and torch.equal(lr, lr.round())
    assert lr.min() >= 0 and lr.max() <= 255
    assert deg.bicubic_upsample(lr, scale).shape == hr.shape
    with pytest.raises(ValueError, match="modcrop"):
        deg.bicubic_downsample(torch.zeros(3, 50, 50), 3)
    assert deg.modcrop(torch.zeros(3, 50, 47), scale).shape == (3, 50 - 50 % scale, 47 - 47 % scale)


def matlab_imresize_down(img: np.ndarray, s: int) -> np.ndarray:
    """MATLAB imresize(img, 1/s, 'bicubic') along both axes (contributions(): a = -0.5 cubic stretched by s,
    symmetric border), img [H, W] float64."""
    def cubic(x):
        a = np.abs(x)
        return np.where(a <= 1, 1.5 * a ** 3 - 2.5 * a ** 2 + 1,
                        np.where(a <= 2, -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2, 0.0))

    def resize_axis(x, axis):
        n_in = x.shape[axis]
        n_out = n_in // s
        width = 4.0 * s
        u = np.arange(1, n_out + 1) * s + 0.5 * (1 - s)
        left = np.floor(u - width / 2)
        taps = int(math.ceil(width)) + 2
        idx = left[:, None] + np.arange(taps)[None]
        w = cubic((u[:, None] - idx) / s) / s
        w /= w.sum(axis=1, keepdims=True)
        mirror = np.concatenate([np.arange(n_in), np.arange(n_in)[::-1]])
        idx = mirror[np.mod(idx.astype(int) - 1, 2 * n_in)]
        moved = np.moveaxis(x, axis, 0)
        out = np.einsum("ot,ot...->o...", w, moved[idx])
        return np.moveaxis(out, 0, axis)

    return resize_axis(resize_axis(img, 0), 1)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_equals_matlab_imresize_away_from_the_border(scale):
    """torch's antialiased bicubic is MATLAB's kernel and grid: equal to 1e-3 (of 255) wherever the 4s-tap kernel
    stays inside the image; only the border rows differ (mirroring vs renormalising)."""
    img = RNG.uniform(0, 255, (60, 60))
    ours = deg.bicubic_downsample(torch.from_numpy(img).float()[None, None].expand(1, 3, 60, 60), scale,
                                  quantise=False)[0, 0].double().numpy()
    ref = matlab_imresize_down(img, scale)
    m = 2  # output pixels whose support touches the border
    assert np.abs(ours[m:-m, m:-m] - ref[m:-m, m:-m]).max() < 1e-3
    assert np.abs(ours - ref).max() > 1e-2  # and the border does differ: documented, not hidden


def test_rain_adds_streaks():
    gen = torch.Generator().manual_seed(0)
    clean = torch.full((2, 3, 96, 96), 80.0)
    rainy = deg.add_rain(clean, gen)
    added = rainy - clean
    assert rainy.shape == clean.shape and torch.equal(rainy, rainy.round())
    assert (added >= 0).all() and torch.equal(added[:, 0], added[:, 1])  # white, additive
    covered = (added > 5).float().mean().item()
    assert 0.02 < covered < 0.5, covered
    assert added.amax(dim=(1, 2, 3)).min() > 0.4 * 255
    # streaks are long along their direction (near vertical): neighbours down a column are far more alike
    layer = added[:, 0]
    down = (layer[:, 1:] - layer[:, :-1]).abs().mean()
    across = (layer[:, :, 1:] - layer[:, :, :-1]).abs().mean()
    assert down < 0.7 * across
    kernel = deg.line_kernel(11.0, 0.0)
    assert kernel.shape == (11, 11) and kernel[:, 5].min() == 1.0 and kernel[:, 0].max() == 0.0


def test_task_names():
    assert [deg.parse_task(t).name for t in ("denoise30", "sr4", "derain")] == ["denoise30", "sr4", "derain"]
    assert deg.parse_task("denoise15").sigma == 15.0 and deg.parse_task("sr8").scale == 8
    with pytest.raises(ValueError, match="unknown task"):
        deg.parse_task("deblur")


# --- inference over whole images ---------------------------------------------------------------------------------

def local_model(scale: int = 1) -> torch.nn.Module:
    """A size-agnostic convolutional net whose output at a pixel depends on inputs within 2 px (two 3x3 convs)."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3 * scale * scale, 3,
                                                                                      padding=1)]
    if scale > 1:
        layers.append(torch.nn.PixelShuffle(scale))
    return torch.nn.Sequential(*layers).eval()


@pytest.mark.parametrize("scale,size", [(1, (50, 37)), (2, (29, 40)), (3, (16, 16))])
def test_tiled_inference_equals_whole_image(scale, size):
    net = local_model(scale)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        whole = net(x)
        tiled = metrics.tiled_forward(net, x, tile=16, overlap=4, scale=scale, max_batch=5)
        averaged = metrics.tiled_forward(net, x, tile=16, overlap=4, scale=scale, blend="average")
    assert tiled.shape == whole.shape
    if min(size) > 16:
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)
        assert (averaged - whole).abs().max() > 1e-4  # averaging mixes in tile-edge outputs
    # a tile with too little overlap cuts the 2-px receptive field
    if min(size) > 16:
        thin = metrics.tiled_forward(net, x, tile=16, overlap=2, scale=scale)
        assert (thin - whole).abs().max() > 1e-4


def test_tiled_small_image_is_padded():
    calls = []

    def fixed(t):
        calls.append(t.shape)
        assert t.shape[-2:] == (16, 16)
        return t * 2

    x = torch.rand(1, 3, 10, 7)
    out = metrics.tiled_forward(fixed, x, tile=16, overlap=4)
    torch.testing.assert_close(out, x * 2)
    assert len(calls) == 1


def test_self_ensemble_of_an_equivariant_model_is_the_model():
    net = torch.nn.Conv2d(3, 3, 1).eval()  # a 1x1 conv commutes with every flip and transpose
    x = torch.rand(2, 3, 12, 9)
    with torch.no_grad():
        torch.testing.assert_close(metrics.self_ensemble(net, x), net(x), rtol=1e-5, atol=1e-6)
        skewed = torch.nn.Conv2d(3, 3, 3, padding=1).eval()
        assert (metrics.self_ensemble(skewed, x) - skewed(x)).abs().max() > 1e-4


# --- the model -----------------------------------------------------------------------------------------------------

from finetune import backbone as bb  # noqa: E402
from finetune.ipt.model import IPT, IPTArch, load_ipt_export, load_vit_body, patch_contrastive_loss  # noqa: E402
from finetune.ipt.task import CleanCrop, DegradeBatch, DegradeEval, IPTConfig, IPTTask  # noqa: E402

TINY_ARCH = dict(img_size=12, n_feats=8, patch_dim=2, num_heads=2, enc_layers=2, dec_layers=1, head_kernel=3)


def test_model_shapes_per_task_and_fixed_body_size():
    torch.manual_seed(0)
    model = IPT(IPTArch(**TINY_ARCH, tasks=["denoise30", "sr2", "sr3", "sr4", "derain"])).eval()
    x = torch.rand(2, 3, 12, 12) * 255
    for name, scale in (("denoise30", 1), ("sr2", 2), ("sr3", 3), ("sr4", 4), ("derain", 1)):
        out, tokens = model(x, name, return_features=True)
        assert out.shape == (2, 3, 12 * scale, 12 * scale) and tokens.shape == (2, 36, 32)
    assert torch.equal(model(x, 1), model(x, "sr2")) and torch.equal(model(x, torch.tensor([1, 1])), model(x, "sr2"))
    # the task embedding enters the decoder: two tasks with the same head and tail weights still differ
    model.heads["derain"].load_state_dict(model.heads["denoise30"].state_dict())
    model.tails["derain"].load_state_dict(model.tails["denoise30"].state_dict())
    assert not torch.allclose(model(x, "derain"), model(x, "denoise30"))
    with pytest.raises(ValueError, match="tiled_forward"):
        model(torch.rand(1, 3, 16, 16), "sr2")
    # whole-image inference of a larger image through tiles
    big = torch.rand(1, 3, 30, 20) * 255
    with torch.no_grad():
        out = metrics.tiled_forward(lambda t: model(t, "sr2"), big, tile=12, overlap=4, scale=2)
        assert out.shape == (1, 3, 60, 40)
        # one tile covering the image: tiled == whole
        torch.testing.assert_close(metrics.tiled_forward(lambda t: model(t, "sr2"), x, tile=12, overlap=4,
                                                         scale=2), model(x, "sr2"))


def mindspore_supcon(features: np.ndarray, temperature: float = 0.07) -> float:
    """mindspore-ai/models research/cv/IPT src/loss.py SupConLoss (contrast_mode "all"), in NumPy: features
    [B, V, D] with positives = the same batch index; contrast rows ordered view-major (cat(unbind(features, 1)))."""
    f = features / np.linalg.norm(features, axis=2, keepdims=True)
    b, v, _ = f.shape
    contrast = np.concatenate([f[:, i] for i in range(v)])
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    mask = np.tile(np.eye(b), (v, v))
    logits_mask = 1 - np.eye(b * v)
    mask = mask * logits_mask
    log_prob = logits - np.log((np.exp(logits) * logits_mask).sum(1, keepdims=True) + 1e-8)
    return float((-(mask * log_prob).sum(1) / mask.sum(1)).mean())


def test_contrastive_loss_equals_ipts_supcon():
    feats = torch.randn(3, 5, 16, dtype=torch.float64)
    ours = patch_contrastive_loss(feats).item()
    assert ours == pytest.approx(mindspore_supcon(feats.numpy()), rel=1e-5)
    # patches of one image identical, images orthogonal: the minimum, log(4 positives); shuffled identities: more
    basis = torch.eye(16)[:3]
    aligned = basis[:, None, :].expand(3, 5, 16)
    assert patch_contrastive_loss(aligned).item() == pytest.approx(math.log(4), abs=1e-3)
    assert patch_contrastive_loss(aligned.transpose(0, 1).reshape(3, 5, 16)).item() > math.log(4) + 3


def test_train_collate_draws_one_task_per_batch_and_the_right_sizes():
    crop = CleanCrop(48)
    photo = __import__("PIL.Image", fromlist=["Image"]).fromarray(RNG.integers(0, 256, (60, 70, 3), dtype=np.uint8))
    items = [crop({"image": photo}) for _ in range(4)]
    assert items[0]["image"].shape == (3, 48, 48) and items[0]["image"].dtype == torch.uint8
    collate = DegradeBatch(["denoise30", "sr2", "sr4", "derain"], img_size=12)
    seen = set()
    torch.manual_seed(1)
    for _ in range(24):
        batch = collate(items)
        t = int(batch["task"][0])
        assert (batch["task"] == t).all() and batch["task"].shape == (4,)
        scale = (1, 2, 4, 1)[t]
        assert batch["input"].shape == (4, 3, 12, 12) and batch["target"].shape == (4, 3, 12 * scale, 12 * scale)
        assert batch["target"].dtype == torch.uint8 and batch["input"].dtype == torch.float32
        seen.add(t)
    assert seen == {0, 1, 2, 3}
    # workers and ranks seed torch differently: different task sequences
    sequences = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sequences.append([int(collate(items)["task"][0]) for _ in range(8)])
    assert sequences[0] != sequences[1]
    with pytest.raises(Exception, match="smaller_than_crop"):
        CleanCrop(96)({"image": photo})


def test_eval_inputs_are_seeded_by_key():
    photo = __import__("PIL.Image", fromlist=["Image"]).fromarray(RNG.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    ev = DegradeEval(["denoise50", "sr3", "derain"], eval_size=36)
    a, b = ev({"__key__": "a", "image": photo}), ev({"__key__": "a", "image": photo})
    c = ev({"__key__": "c", "image": photo})
    assert a["hr"].shape == (3, 36, 36) and a["inputs"]["sr3"].shape == (3, 12, 12)
    for t in ("denoise50", "derain"):
        assert torch.equal(a["inputs"][t], b["inputs"][t]) and not torch.equal(a["inputs"][t], c["inputs"][t])
    whole = DegradeEval(["sr2", "sr3"], eval_size=0)({"__key__": "a", "image": photo})
    assert whole["hr"].shape == (3, 48, 36)  # cropped to multiples of lcm(2, 3) = 6


def test_export_import_round_trip_single_task(tmp_path):
    """A multi-task model exported as the runtime does (ipt.safetensors + ipt.json) loads into a single-task model by
    name: the body and sr2's head/tail/embedding equal, so its sr2 output is the same; a task the export lacks is
    new."""
    torch.manual_seed(0)
    cfg = IPTConfig(tasks=("denoise30", "sr2", "derain"), **TINY_ARCH)
    multi = IPTTask(cfg)
    tensors, meta = multi.export(multi.model.state_dict())
    save_file(tensors, str(tmp_path / "ipt.safetensors"))
    (tmp_path / "ipt.json").write_text(json.dumps(meta))
    single = IPTTask(IPTConfig(init=str(tmp_path), tasks=("sr2", "sr4"), img_size=24))   # geometry from ipt.json
    assert single.arch.img_size == 12 and single.arch.tasks == ["sr2", "sr4"]
    x = torch.rand(2, 3, 12, 12) * 255
    with torch.no_grad():
        torch.testing.assert_close(single.model.eval()(x, "sr2"), multi.model.eval()(x, "sr2"), rtol=0, atol=0)
    report = load_ipt_export(IPT(single.arch), tmp_path)
    assert any(k.startswith("heads.sr4.") for k in report.new) and "body.task_embed.sr4" in report.new
    assert any(k.startswith("heads.denoise30.") for k in report.unused)
    assert not [k for k in report.new if k.startswith("body.") and "task_embed" not in k]


def test_vit_backbone_maps_onto_the_encoder(tmp_path):
    """A timm ViT of this project's backbone format (32 wide = 8 features x 2 x 2) initialises the encoder: its first
    blocks compute exactly what the ViT's do; its patch table is resampled to the body's grid."""
    torch.manual_seed(0)
    meta = bb.scratch_vit_config(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0,
                                 class_token=True, global_pool="token", num_classes=0)
    vit = bb.create_from_config(meta).eval()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / bb.LEGACY_WEIGHTS_NAME))
    (tmp_path / bb.LEGACY_CONFIG_NAME).write_text(json.dumps(meta))
    model = IPT(IPTArch(**TINY_ARCH, tasks=["sr2"])).eval()
    report = load_vit_body(model, tmp_path)
    tokens = torch.randn(2, 36, 32)
    for i in range(2):
        torch.testing.assert_close(model.body.encoder[i](tokens), vit.blocks[i](tokens), rtol=0, atol=0)
    assert "body.pos_embed" in report.loaded and model.body.pos_embed.shape == (1, 36, 32)
    assert {"cls_token", "norm.weight", "patch_embed.proj.weight"} <= set(report.unused)
    assert any(k.startswith("blocks.2.") for k in report.unused)
    assert any(k.startswith("body.decoder.") for k in report.new) and any(k.startswith("heads.") for k in report.new)
    with pytest.raises(ValueError, match="n_feats x patch_dim"):
        load_vit_body(IPT(IPTArch(**{**TINY_ARCH, "n_feats": 12}, tasks=["sr2"])), tmp_path)
    with pytest.raises(ValueError, match="num_heads=2"):
        load_vit_body(IPT(IPTArch(**{**TINY_ARCH, "num_heads": 4}, tasks=["sr2"])), tmp_path)
    # through the job's config: model.init=<backbone folder>
    task = IPTTask(IPTConfig(init=str(tmp_path), tasks=("denoise30",), **TINY_ARCH))
    torch.testing.assert_close(task.model.body.encoder[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)


def test_multitask_refuses_zero3_partitioned_weights():
    """ZeRO-3 marks partitioned parameters with ds_id; a multi-task step there would deadlock, so it is refused."""
    task = IPTTask(IPTConfig(tasks=("denoise30", "sr2"), **TINY_ARCH))
    batch = {"input": torch.rand(2, 3, 12, 12) * 255, "target": torch.zeros(2, 3, 12, 12, dtype=torch.uint8),
             "task": torch.zeros(2, dtype=torch.int64)}
    loss, logged = task.training_step(task.model, batch)
    assert loss.item() > 0 and set(logged) == {"l1", "contrastive", "psnr_rgb"}
    pictures = task.images(task.model, batch)  # from a training batch (no data.val): its task, 3 columns
    assert list(pictures) == ["denoise30"] and pictures["denoise30"].shape == (3, 2 * 14 + 2, 3 * 14 + 2)
    assert task.flops_per_sample() > 0
    fresh = IPTTask(IPTConfig(tasks=("denoise30", "sr2"), **TINY_ARCH))
    next(fresh.model.parameters()).ds_id = 0
    with pytest.raises(RuntimeError, match="zero_stage <= 2"):
        fresh.training_step(fresh.model, batch)


class BaselineModel(torch.nn.Module):
    """Returns each task's baseline (identity for denoising/deraining, bicubic enlargement for SR): evaluated
    through tiles, it must score exactly the baseline, so every gain is 0 (no shift, crop or scale mismatch)."""

    def __init__(self, scales: dict[str, int]) -> None:
        super().__init__()
        self.scales = scales
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, task):
        s = self.scales[task]
        return x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bicubic", antialias=True)


def test_evaluation_of_the_baseline_itself_gains_nothing():
    tasks = ("denoise30", "sr2", "sr3", "derain")
    task = IPTTask(IPTConfig(tasks=tasks, eval_size=36, **{**TINY_ARCH, "img_size": 12}, tile_overlap=6))
    photo = __import__("PIL.Image", fromlist=["Image"]).fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    items = [task.eval_transform({"__key__": str(i), "image": photo}) for i in range(3)]
    batch = task.eval_collate(items)
    batch["is_padding"] = torch.tensor([False, False, True])
    results = task.evaluate(BaselineModel({t: deg.parse_task(t).scale for t in tasks}), [batch])
    for t in tasks:
        assert results[f"{t}/gain_psnr_y"] == 0.0 and results[f"{t}/gain_psnr_rgb"] == 0.0, t
        assert results[f"{t}/psnr_rgb"] < 40
