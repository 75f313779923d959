"""MAE: parity with transformers' ViTMAEForPreTraining, masking, loss, positions, init, groups, pictures, counts."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from pretrain.mae import MAE_ARCHS, MAEConfig, MAETask, MaskedAutoencoderViT, patchify, per_patch_loss, unpatchify
from pretrain.masking import num_visible, random_masking
from pretrain.pos_embed import sincos_2d

# 4 x 4 patches of 8 px, 2 x 32 encoder, 1 x 32 decoder: small enough for milliseconds per forward
SMALL = MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                  decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)


def hf_config(cfg: MAEConfig) -> ViTMAEConfig:
    return ViTMAEConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.mlp_ratio * cfg.embed_dim), decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth, decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.mlp_ratio * cfg.decoder_embed_dim), image_size=cfg.img_size,
        patch_size=cfg.patch_size, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
        layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)


def to_hf_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (timm-style) keys -> ViTMAEForPreTraining keys; the fused qkv is split into q, k, v."""
    block_names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    fixed = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
             "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
             "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
             "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed"}
    out = {}
    for key, value in ours.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        if key.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
            out["decoder." + key] = value
            continue
        stack, idx, rest = key.split(".", 2)
        prefix = {"blocks": "vit.layers", "decoder_blocks": "decoder.decoder_layers"}[stack] + f".{idx}."
        sub, param = rest.rsplit(".", 1)
        if sub == "attn.qkv":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.{name}.{param}"] = part
        else:
            out[f"{prefix}{block_names[sub]}.{param}"] = value
    return out


@pytest.mark.parametrize("norm_pix_loss,mask_ratio", [(True, 0.75), (False, 0.75), (True, 0.6)])
def test_matches_transformers_vit_mae(norm_pix_loss, mask_ratio):
    torch.manual_seed(0)
    cfg = replace(SMALL, norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)
    ours = MaskedAutoencoderViT(cfg).eval()
    # LayerNorms leave init at 1/0 and biases at 0; randomise them so a swapped or dropped tensor shows
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and (p.ndim == 1):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    hf = ViTMAEForPreTraining._from_config(hf_config(cfg), attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    assert not missing and not unexpected

    imgs = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    noise = torch.rand(3, ours.num_patches)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, noise=noise)
        ref = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, ref.mask)
    torch.testing.assert_close(pred, ref.logits, rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - ref.loss.item()) < 1e-5
    assert int((mask == 0).sum(1)[0]) == int(ours.num_patches * (1 - mask_ratio))


def test_num_visible_rounds_like_mae():
    # int(L * (1 - r)): 49 of 196 at 0.75; 78 (not lucidrains' 79) at 0.6; 39 at 0.8
    assert [num_visible(196, r) for r in (0.75, 0.6, 0.8, 0.0)] == [49, 78, 39, 196]
    with pytest.raises(ValueError):
        num_visible(196, 1.0)


def test_random_masking_keeps_smallest_noise_and_restores():
    torch.manual_seed(0)
    n, length, dim = 8, 16, 5
    x = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(n, length, dim).clone()
    noise = torch.rand(n, length)
    visible, mask, ids_restore = random_masking(x, 0.75, noise)
    len_keep = num_visible(length, 0.75)

    assert visible.shape == (n, len_keep, dim) and mask.shape == (n, length) and ids_restore.shape == (n, length)
    assert torch.all(mask.sum(1) == length - len_keep)
    # visible tokens are the len_keep smallest-noise patches, in ascending noise order
    assert torch.equal(visible[..., 0].long(), noise.argsort(dim=1)[:, :len_keep])
    # the mask marks exactly the other patches
    kept = torch.zeros(n, length).scatter_(1, visible[..., 0].long(), 1.0)
    assert torch.equal(mask, 1 - kept)
    # ids_restore inverts the shuffle: visible tokens + fillers gathered with it land on their own positions
    filled = torch.cat([visible, torch.full((n, length - len_keep, dim), -1.0)], dim=1)
    restored = torch.gather(filled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    assert torch.equal(restored[..., 0], torch.where(mask.bool(), -1.0, x[..., 0]))
    # per-sample masks differ (196 patches: a repeat among 8 draws of C(196, 49) masks is impossible in practice)
    _, masks, _ = random_masking(torch.zeros(n, 196, 1), 0.75)
    assert len({tuple(m.tolist()) for m in masks}) == n


def test_random_masking_draws_noise_and_checks_shape():
    x = torch.randn(4, 16, 3)
    _, mask_a, _ = random_masking(x, 0.5)
    _, mask_b, _ = random_masking(x, 0.5)
    assert not torch.equal(mask_a, mask_b)
    with pytest.raises(ValueError):
        random_masking(x, 0.5, noise=torch.rand(4, 15))


def test_patchify_is_channel_last_and_inverts():
    imgs = torch.randn(2, 3, 16, 16)
    x = patchify(imgs, 8)
    assert x.shape == (2, 4, 8 * 8 * 3)
    # MAE's order: patch (row 0, col 1), pixel (p=2, q=5), channel c at index (p * 8 + q) * 3 + c
    assert torch.equal(x[1, 1, (2 * 8 + 5) * 3 + 2], imgs[1, 2, 2, 8 + 5])
    assert torch.equal(unpatchify(x, 8), imgs)


def test_loss_only_counts_removed_patches():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(SMALL)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss, pred, mask = model(imgs)
        visible = ~mask.bool()
        changed = pred.clone()
        changed[visible] += 10.0
        assert model.forward_loss(imgs, changed, mask).item() == pytest.approx(loss.item(), abs=1e-6)
        changed = pred.clone()
        changed[mask.bool()] += 10.0
        assert model.forward_loss(imgs, changed, mask).item() > loss.item() + 1.0

        # the explicit formula: per-patch standardised target (unbiased var + 1e-6), MSE per patch, mean on removed
        target = patchify(imgs, 8)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        assert loss.item() == pytest.approx(per_patch[mask.bool()].mean().item(), rel=1e-6)


def mae_numpy_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, transcribed in float64 NumPy (np.float -> np.float64)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_pos_embed_is_mae_layout():
    table = sincos_2d(32, 4, cls_token=True)
    assert table.shape == (17, 32)
    np.testing.assert_allclose(table.numpy(), mae_numpy_pos_embed(32, 4), atol=1e-6)
    assert torch.all(table[0] == 0)
    # first half codes the column: tokens 1 (row 0, col 1) and 5 (row 1, col 1) share it, and differ in the second
    assert torch.equal(table[1 + 1, :16], table[1 + 5, :16]) and not torch.equal(table[1 + 1, 16:], table[1 + 5, 16:])
    # transformers builds [sin_h|cos_h|sin_w|cos_w] and swaps the halves to MAE's layout
    hf = build_2d_sinusoidal_position_embedding(4, 4, 32, cls_token=True)
    torch.testing.assert_close(table, torch.cat([hf[:, 16:], hf[:, :16]], dim=1), atol=1e-6, rtol=0)

    model = MaskedAutoencoderViT(SMALL)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert "pos_embed" in model.state_dict() and "decoder_pos_embed" in model.state_dict()
    torch.testing.assert_close(model.pos_embed[0], table)


def test_reference_initialisation():
    torch.manual_seed(0)
    cfg = replace(SMALL, embed_dim=192, num_heads=3, decoder_embed_dim=128, depth=1, decoder_depth=1)
    model = MaskedAutoencoderViT(cfg)
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 192))  # xavier on the [out, c*p*q] view
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_out, fan_in = m.weight.shape
            assert m.weight.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out)), name
            assert torch.all(m.bias == 0), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6, name
    for token in (model.cls_token, model.mask_token):
        assert token.mean().abs() < 0.006 and token.std().item() == pytest.approx(0.02, rel=0.2)


def test_param_groups_follow_mae():
    task = MAETask(SMALL)
    groups = task.param_groups()
    names = {id(p): n for n, p in task.model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    all_grouped = [names[id(p)] for g in groups for p in g["params"]]
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}

    assert len(all_grouped) == len(set(all_grouped)) and set(all_grouped) == trainable
    assert "pos_embed" not in trainable | set(all_grouped) and "decoder_pos_embed" not in set(all_grouped)
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= decay
    assert {"patch_embed.proj.bias", "blocks.0.norm1.weight", "norm.weight", "decoder_pred.bias"} <= no_decay
    assert all(n.endswith(".bias") or task.model.get_parameter(n).ndim <= 1 for n in no_decay)


def test_training_step_learns_and_evaluate_is_repeatable():
    torch.manual_seed(0)
    task = MAETask(SMALL)
    imgs = torch.randn(4, 3, 32, 32)
    batch = {"image": imgs, "is_padding": torch.tensor([False, False, False, True])}
    optimizer = torch.optim.AdamW(task.param_groups(), lr=3e-3)
    first = task.evaluate(task.model, [batch])["val_loss"]
    assert task.evaluate(task.model, [batch])["val_loss"] == first  # fixed noise
    losses = []
    for _ in range(15):
        loss, metrics = task.training_step(task.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(metrics["loss"])
    assert losses[-1] < losses[0]
    assert task.evaluate(task.model, [batch])["val_loss"] < first
    assert task.model.training

    # the padded sample is excluded: a batch of the 3 real images gives the same mean
    with torch.no_grad():
        padded = task.evaluate(task.model, [batch])["val_loss"]
        # same noise rows for the first 3 samples: draw [4, L] then drop the last row, as evaluate does
        gen = torch.Generator().manual_seed(0)
        noise = torch.rand(4, task.model.num_patches, generator=gen)[:3]
        _, pred, mask = task.model(imgs[:3], noise=noise)
        real = ((per_patch_loss(imgs[:3], pred, 8, True) * mask).sum(1) / mask.sum(1)).mean().item()
    assert padded == pytest.approx(real, rel=1e-6)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(SMALL)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(imgs, noise=noise)[0].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_images_grid():
    torch.manual_seed(0)
    task = MAETask(SMALL)
    grid = task.images(task.model, {"image": torch.randn(3, 3, 32, 32)})["reconstruction"]
    # 3 rows (original | masked | reconstruction) of 3 images, 2 px padding
    assert grid.shape == (3, 3 * 34 + 2, 3 * 34 + 2)
    assert grid.min() >= 0 and grid.max() <= 1
    model = task.model
    original = grid[:, 2:34, 2:34]
    recon = grid[:, 2 + 2 * 34:34 + 2 * 34, 2:34]
    masked = grid[:, 2 + 34:34 + 34, 2:34]
    grey = (masked == 0.5).all(0)
    assert 0 < grey.float().mean() <= 0.8  # 12 of 16 patches removed (unless a pixel is 0.5 by chance)
    assert torch.equal(recon[:, ~grey], original[:, ~grey])  # visible patches are pasted from the original
    assert model.training


def test_flops_per_sample_is_three_forwards():
    cfg = SMALL
    task = MAETask(cfg)
    d, dd, p = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size
    length = (cfg.img_size // p) ** 2
    enc_tokens, dec_tokens = 1 + num_visible(length, cfg.mask_ratio), 1 + length

    def blocks(tokens, width, depth):  # qkv + proj + 2 MLP matmuls, then q@k and attn@v
        return depth * (2 * tokens * 12 * width * width + 2 * 2 * tokens * tokens * width)

    patch_embed = 2 * length * 3 * p * p * d
    forward = (patch_embed + blocks(enc_tokens, d, cfg.depth) + 2 * enc_tokens * d * dd
               + blocks(dec_tokens, dd, cfg.decoder_depth) + 2 * dec_tokens * dd * p * p * 3)
    # backward is two forwards, except the patch embedding needs no gradient for its input
    assert task.flops_per_sample() == 3 * forward - patch_embed


@pytest.mark.parametrize("name,encoder,decoder", [("vit_b16", 85_798_656, 26_109_184)])
def test_vit_b16_counts_match_mae_paper(name, encoder, decoder):
    with torch.device("meta"):
        model = MaskedAutoencoderViT(MAEConfig(**MAE_ARCHS[name]))
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder_", "mask_token")))
    assert (enc, sum(p.numel() for p in model.parameters()) - enc) == (encoder, decoder)


@pytest.mark.parametrize("name", ["tiny", "vit_b16", "vit_l16", "vit_h14"])
def test_preset_parameter_counts_match_transformers(name):
    cfg = MAEConfig(**MAE_ARCHS[name])
    with torch.device("meta"):
        ours = MaskedAutoencoderViT(cfg)
        ref = ViTMAEForPreTraining(hf_config(cfg))
    enc = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith(("decoder_", "mask_token")))
    dec = sum(p.numel() for n, p in ours.named_parameters() if n.startswith(("decoder_", "mask_token")))
    assert enc == sum(p.numel() for p in ref.vit.parameters())
    assert dec == sum(p.numel() for p in ref.decoder.parameters())


def test_default_config_is_tiny_preset():
    assert MAEConfig() == MAEConfig(**MAE_ARCHS["tiny"])


def test_uint8_batches_are_normalised_on_the_device_like_the_float_transform():
    """The train stream ships uint8 crops; `pixels` must give what the float transform's Normalize gives."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    task = MAETask(MAEConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2))
    assert task.train_transform.normalize is False
    raw = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(task.pixels(raw), (raw.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    already = torch.randn(2, 3, 16, 16)
    assert task.pixels(already) is already
