"""Token masking for masked-image pretraining.

`random_masking` is MAE's per-sample random masking (He et al., arXiv 2111.06377, Sec. 3 "Masking";
facebookresearch/mae@efb2a80: models_mae.py `random_masking`): each sample draws uniform noise per patch, the
patches with the smallest noise are kept, and exactly `int(L * (1 - mask_ratio))` survive in every sample, so
the visible tokens batch without padding. The rounding matters: lucidrains' MAE masks `int(r * L)` instead and
keeps one patch more at r = 0.6 or 0.8.
"""
import torch
from torch import Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """How many of `num_patches` tokens stay visible: MAE's `len_keep = int(L * (1 - mask_ratio))`."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of tokens per sample by sorting per-sample noise.

    x: [N, L, D], noise: [N, L] (uniform in [0, 1) if None; pass it to reproduce a reference)
    -> x_visible [N, len_keep, D] (in shuffled order), mask [N, L] (0 = kept, 1 = removed, in the original
    patch order, float32), ids_restore [N, L] (argsort that puts shuffled tokens back in place).
    """
    n, length, dim = x.shape
    len_keep = num_visible(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must be [N, L] = {[n, length]}, got {list(noise.shape)}")

    # ascending sort: small noise is kept, large is removed
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    # argsort of a permutation is its inverse: gathering with it undoes the shuffle
    ids_restore = torch.argsort(ids_shuffle, dim=1)

    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

    # the mask is built in shuffled order (first len_keep kept) and un-shuffled into patch order
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_visible, mask, ids_restore
