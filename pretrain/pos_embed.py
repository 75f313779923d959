"""Fixed 2-D sine-cosine position embeddings in MAE's exact layout.

MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377) freezes a 2-D sin-cos table
(facebookresearch/mae@efb2a80: util/pos_embed.py, `get_2d_sincos_pos_embed`). Its layout is not timm's
`build_sincos2d_pos_embed` (which stacks [sin_h | sin_w | cos_h | cos_w], and with `reverse_coord` changes the
token order too), so it is written out here:

- tokens are row-major (row r, column c -> index r * grid + c), like the patch embedding's `flatten(2)`;
- the first D/2 dims encode the column index, the second D/2 the row index (MAE builds
  `meshgrid(grid_w, grid_h)` and calls the first grid "h");
- each half is [sin | cos] over frequencies omega_i = 1 / 10000^(i / (D/4)), i = 0 .. D/4 - 1;
- with a class token, its slot is an all-zero row in front.

MAE computes in float64 NumPy and casts to float32; so does this (in torch).
"""
import torch
from torch import Tensor


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """One coordinate's sin-cos code, MAE's `get_1d_sincos_pos_embed_from_grid`.

    pos: [M] -> [M, dim] laid out as [sin(pos * omega) | cos(pos * omega)].
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> Tensor:
    """MAE's 2-D table for a square grid of `grid_size` x `grid_size` patches.

    Returns [grid_size**2 (+1), embed_dim] float32; the column code fills the first embed_dim/2 dims.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")  # [G, G] each
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)  # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
