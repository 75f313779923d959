"""Token masking for masked-image pretraining.

`random_masking` is MAE's per-sample random masking (He et al., arXiv 2111.06377, Sec. 3 "Masking";
facebookresearch/mae@efb2a80: models_mae.py `random_masking`): each sample draws uniform noise per patch, the
patches with the smallest noise are kept, and exactly `int(L * (1 - mask_ratio))` survive in every sample, so
the visible tokens batch without padding. The rounding matters: lucidrains' MAE masks `int(r * L)` instead and
keeps one patch more at r = 0.6 or 0.8.

`BlockMaskingGenerator` is BEiT's blockwise masking and `PatchCorruption` ViT's BERT-style masked patch prediction;
both run in the data workers, one mask per image, as does SimMIM's `SimMIMMaskGenerator` (random squares upsampled
to the token grid).
"""
import math
import random
from typing import Any

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


# --- BEiT: blockwise masking --------------------------------------------------------------------------------------

# BEiT's generator for 224/16 inputs (microsoft/unilm beit/run_beit_pretraining.py: num_mask_patches=75,
# min_mask_patches_per_block=16, max_mask_patches_per_block=None, MaskingGenerator min_aspect=0.3); other grids
# scale both patch counts by their number of patches (the same fraction of the image masked, blocks of the same
# relative size).
BEIT_GRID_PATCHES = 196
BEIT_NUM_MASKED = 75
BEIT_MIN_BLOCK = 16
BEIT_MIN_ASPECT = 0.3
# tries per block before the generator gives up adding one (unilm's `for attempt in range(10)`)
BLOCK_ATTEMPTS = 10


class BlockMaskingGenerator:
    """BEiT's blockwise masking (Bao et al., arXiv 2106.08254, Algorithm 1; microsoft/unilm beit/masking_generator.py).

    Rectangular blocks are added until `num_masked` patches are masked: each block draws an area uniformly in
    [min_block, min(remaining, max_block)] and a log-uniform aspect ratio in [min_aspect, 1/min_aspect], gives
    h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)), must fit strictly inside the grid (h, w < side)
    and is placed uniformly; it is kept only if it adds between 1 and `remaining` new patches, with up to 10 tries.
    Generation stops when a round adds nothing, so a draw can end below `num_masked` but never above it
    (unilm's measured statistics for 14x14/75: mean 74.47, 75 exactly in 2/3 of draws, P(centre) 0.72 vs 0.04 in a
    corner; tests/test_beit.py checks ours against them).

    Draws use Python's `random` module by default, which torch's DataLoader seeds differently in every worker
    process (base seed from the rank's torch RNG + worker id), so each rank and worker masks differently. Pass
    `rng` (a `random.Random`) for a reproducible sequence, e.g. evaluation masks seeded by the sample key.
    """

    def __init__(self, grid: tuple[int, int], num_masked: int | None = None, min_block: int | None = None,
                 max_block: int | None = None, min_aspect: float = BEIT_MIN_ASPECT) -> None:
        self.height, self.width = grid
        num_patches = self.height * self.width
        scale = num_patches / BEIT_GRID_PATCHES
        self.num_masked = num_masked if num_masked is not None else round(BEIT_NUM_MASKED * scale)
        self.min_block = min_block if min_block is not None else max(1, round(BEIT_MIN_BLOCK * scale))
        self.max_block = max_block if max_block is not None else self.num_masked
        if not 0 < self.num_masked < num_patches:
            raise ValueError(f"num_masked must be in (0, {num_patches}) for a {self.height}x{self.width} grid, "
                             f"got {self.num_masked}")
        if not 1 <= self.min_block <= self.max_block:
            raise ValueError(f"need 1 <= min_block <= max_block, got {self.min_block} and {self.max_block}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def __repr__(self) -> str:
        return (f"BlockMaskingGenerator({self.height}x{self.width}, num_masked={self.num_masked}, "
                f"blocks {self.min_block}..{self.max_block}, aspect >= {math.exp(self.log_aspect[0]):.2f})")

    def _add_block(self, mask: torch.Tensor, max_new: int, rng: Any) -> int:
        added = 0
        for _ in range(BLOCK_ATTEMPTS):
            area = rng.uniform(self.min_block, max_new)
            ratio = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_new:  # unilm: a block that would overshoot is discarded, not clipped
                    block.fill_(1)
                    added = new
                if added > 0:
                    break
        return added

    def __call__(self, rng: Any = None) -> torch.Tensor:
        """-> [height, width] bool, True = masked."""
        rng = rng if rng is not None else random
        mask = torch.zeros(self.height, self.width, dtype=torch.uint8)
        count = 0
        while count < self.num_masked:
            max_new = min(self.num_masked - count, self.max_block)
            added = self._add_block(mask, max_new, rng)
            if added == 0:
                break
            count += added
        return mask.bool()


# --- ViT's masked patch prediction: BERT-style corruption -----------------------------------------------------------

VISIBLE, MASK_TOKEN, RANDOM_PATCH, UNCHANGED = 0, 1, 2, 3


class PatchCorruption:
    """BERT-style corruption of ViT's masked patch prediction (Dosovitskiy et al., arXiv 2010.11929, appendix B.1.2):
    `ratio` of the patches are chosen uniformly at random; of those 80% are replaced by the mask token, 10% by a
    random other patch embedding, 10% left unchanged; all chosen ones are predicted.

    Returns [L] int8 codes: VISIBLE (0), MASK_TOKEN (1), RANDOM_PATCH (2), UNCHANGED (3). Like
    `BlockMaskingGenerator`, draws use the `random` module unless `rng` is given.
    """

    def __init__(self, num_patches: int, ratio: float = 0.5, mask_token: float = 0.8, random_patch: float = 0.1):
        if not 0 < ratio < 1 or mask_token < 0 or random_patch < 0 or mask_token + random_patch > 1:
            raise ValueError(f"need 0 < ratio < 1 and mask_token + random_patch <= 1, got {ratio}, {mask_token}, "
                             f"{random_patch}")
        self.num_patches = num_patches
        self.num_chosen = max(1, round(ratio * num_patches))
        self.mask_token, self.random_patch = mask_token, random_patch

    def __repr__(self) -> str:
        return (f"PatchCorruption({self.num_chosen}/{self.num_patches}, mask {self.mask_token}, random "
                f"{self.random_patch})")

    def __call__(self, rng: Any = None) -> torch.Tensor:
        rng = rng if rng is not None else random
        codes = torch.zeros(self.num_patches, dtype=torch.int8)
        for index in rng.sample(range(self.num_patches), self.num_chosen):
            u = rng.random()
            codes[index] = (MASK_TOKEN if u < self.mask_token else
                            RANDOM_PATCH if u < self.mask_token + self.random_patch else UNCHANGED)
        return codes


# --- SimMIM: random masking of large square blocks ------------------------------------------------------------------

class SimMIMMaskGenerator:
    """SimMIM's random masking (Xie et al., arXiv 2111.09886, Sec. 3.1; microsoft/SimMIM data/data_simmim.py
    `MaskGenerator`): the image is cut into `mask_patch_size` squares, `ceil(squares * mask_ratio)` of them are chosen
    uniformly without replacement, and the choice is upsampled to the model's token grid (img_size / patch_size per
    side), so each masked square covers (mask_patch_size / patch_size)^2 tokens. At 192 px, squares of 32 and Swin's
    4-px patches: 22 of 36 squares, 8 x 8 tokens each, 1408 of 2304 tokens.

    The count is the reference's `int(np.ceil(count * ratio))` on the same float product. Draws use Python's `random`
    module (which torch's DataLoader seeds per worker) unless `rng` (a `random.Random`) is given, as
    `BlockMaskingGenerator`.
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6) -> None:
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"the mask patch ({mask_patch_size} px) must divide the image ({input_size} px) and be a "
                             f"multiple of the model's patch ({model_patch_size} px)")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.rand_size = input_size // mask_patch_size            # mask squares per side
        self.scale = mask_patch_size // model_patch_size          # tokens per square side
        self.token_count = self.rand_size ** 2
        self.mask_count = math.ceil(self.token_count * mask_ratio)
        if self.mask_count >= self.token_count:
            raise ValueError(f"mask_ratio {mask_ratio} masks all {self.token_count} squares of {mask_patch_size} px; "
                             "leave some visible (a lower ratio or smaller squares)")

    @property
    def grid(self) -> int:
        """Tokens per side of the mask this generator returns."""
        return self.rand_size * self.scale

    def __repr__(self) -> str:
        return (f"SimMIMMaskGenerator({self.mask_count}/{self.token_count} squares of {self.scale}x{self.scale} "
                f"tokens, {self.grid}x{self.grid} grid)")

    def __call__(self, rng: Any = None) -> torch.Tensor:
        """-> [grid, grid] bool, True = masked."""
        rng = rng if rng is not None else random
        mask = torch.zeros(self.token_count, dtype=torch.bool)
        mask[rng.sample(range(self.token_count), self.mask_count)] = True
        mask = mask.view(self.rand_size, self.rand_size)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
