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
from typing import Any

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


# --- BEiT-style position tables at another grid (multi-scale batches) ----------------------------------------------

def shared_rel_pos_bias_at(table: Tensor, window: int, grid: int) -> Tensor:
    """A BEiT relative position bias (timm `RelativePositionBias`, one window = the whole grid, with the class token's
    3 extra entries) evaluated on another square grid: table [(2W-1)^2 + 3, heads] -> bias [heads, G^2 + 1, G^2 + 1].

    The table is resized by timm's `resize_rel_pos_bias_table` (unilm's resizing for a new resolution, what timm does
    when a BEiT is finetuned at another size; torch operations, so the gradient reaches the stored table), then
    indexed for G x G patches by timm's `gen_relative_position_index`."""
    from timm.layers import resize_rel_pos_bias_table
    from timm.models.beit import gen_relative_position_index

    heads = table.shape[-1]
    if grid != window:
        table = resize_rel_pos_bias_table(table, new_window_size=(grid, grid),
                                          new_bias_shape=((2 * grid - 1) ** 2 + 3, heads),
                                          old_window_size=(window, window))
    index = gen_relative_position_index((grid, grid), device=table.device)  # [G^2 + 1, G^2 + 1]
    bias = table[index.view(-1)]  # [(G^2 + 1)^2, heads]
    return bias.view(grid * grid + 1, grid * grid + 1, heads).permute(2, 0, 1).contiguous()


def beit_positions_at(model: Any, grid: int) -> tuple[Tensor | None, Tensor | None]:
    """(absolute positions [1, 1 + G^2, D] or None, shared relative bias [heads, G^2 + 1, G^2 + 1] or None) of a timm
    `Beit` for a G x G grid: the stored ones at the model's own grid; at another (multi-scale batches) the learned
    absolute table resampled bicubically (timm's `resample_abs_pos_embed`, as when finetuning at a new size) and the
    shared relative table by `shared_rel_pos_bias_at`."""
    from timm.layers import resample_abs_pos_embed

    own = model.patch_embed.grid_size[0]
    pos = model.pos_embed
    if pos is not None and grid != own:
        pos = resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=1)
    rel = model.rel_pos_bias
    if rel is None:
        return pos, None  # per-block tables are refused by `beit_read_any_size`, so these blocks read one grid
    return pos, rel() if grid == own else shared_rel_pos_bias_at(rel.relative_position_bias_table, own, grid)


def beit_read_any_size(model: Any) -> None:
    """Let a timm `Beit` driven through `beit_positions_at` take square inputs of any multiple of its patch: the patch
    embedding stops asserting one size; ValueError for per-block relative tables (see `beit_positions_at`)."""
    if model.rel_pos_bias is None and any(getattr(b.attn, "relative_position_bias_table", None) is not None
                                         for b in model.blocks):
        raise ValueError("a relative position table per block (model.rel_pos_bias=layer) is tied to one grid; "
                         "multi-scale batches need model.rel_pos_bias=shared or none")
    model.patch_embed.strict_img_size = False
