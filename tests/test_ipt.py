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
