"""Instance masks in shards: COCO run-length encoding (RLE) through pycocotools, one place for every conversion.

A detection sample's json may carry ``segmentation``: a list aligned with ``boxes``, each a compressed COCO RLE
``{"size": [h, w], "counts": "<string>"}`` in stored pixels (docs/ARCHITECTURE.md, "The data formats"). The writer
converts what a COCO json holds (polygons, uncompressed RLE, compressed RLE) with :func:`to_rle`, scales masks
with ``--resize`` through :func:`resize`; the transforms decode them with :func:`decode_stack`; ``inspect --verify``
checks them with :func:`problem`. pycocotools does the encoding, decoding, polygon rasterisation and bounding boxes
(``pycocotools.mask``: ``encode`` wants a Fortran-order uint8 array, ``counts`` come back as bytes and are stored
as str, so the json stays text).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

__all__ = ["MaskError", "encode", "decode", "decode_stack", "to_rle", "resize", "bbox", "area", "problem"]

# --verify: each edge of a mask's bounding box may differ from its box's by this many pixels, or by this fraction
# of the box's side if that is more (a COCO bbox is the polygon's float extent, the mask its rasterised pixels;
# --resize moves both by up to a pixel).
BOX_TOLERANCE_PX = 2.0
BOX_TOLERANCE_FRACTION = 0.1


class MaskError(ValueError):
    """A segmentation that is malformed or in another frame than its image (the message says which)."""


def encode(mask: np.ndarray) -> dict[str, Any]:
    """[H, W] bool or 0/1 array -> compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _native(rle: dict[str, Any]) -> dict[str, Any]:
    """A stored RLE as pycocotools wants it (counts as bytes)."""
    try:
        size, counts = rle["size"], rle["counts"]
        h, w = int(size[0]), int(size[1])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise MaskError(f"not an RLE dict with 'size' [h, w] and 'counts' ({type(e).__name__}: {e})") from e
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise MaskError(f"compressed RLE counts must be a string, got {type(counts).__name__}")
    return {"size": [h, w], "counts": counts}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Compressed RLE (counts str or bytes) -> [H, W] uint8 0/1.

    Raises:
        MaskError: not an RLE, or counts that do not decode to exactly H x W pixels.
    """
    native = _native(rle)
    _check_counts(native)  # pycocotools decodes a truncated or mangled string without complaint
    return mask_utils.decode(native)


def _check_counts(native: dict[str, Any]) -> None:
    """Raise MaskError unless the compressed counts' run lengths are non-negative and sum to h * w."""
    h, w = native["size"]
    runs = _runs(native["counts"])
    if (runs < 0).any():
        raise MaskError("RLE counts hold a negative run length (a corrupt string)")
    total = int(runs.sum())
    if total != h * w:
        raise MaskError(f"RLE counts cover {total} pixels, not {h} x {w} = {h * w} (a corrupt or truncated string)")


def _runs(counts: bytes) -> np.ndarray:
    """The run lengths of COCO's compressed counts string (maskApi.c rleFrString, vectorised: a mask's string is
    decoded in microseconds, so every sample read can be checked).

    Each run is a little-endian number of 5-bit groups (bit 0x20: another group follows; bit 0x10 of the last group:
    negative), stored from the third run on as the difference from the run two places back.
    """
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if ((c < 0) | (c >= 64)).any():
        raise MaskError("RLE counts hold a byte outside COCO's alphabet (a corrupt string)")
    ends = np.flatnonzero((c & 0x20) == 0)  # the last group of each number
    if ends.size == 0 or ends[-1] != c.size - 1:
        raise MaskError("RLE counts end in the middle of a number (a truncated string)")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 12:  # 60 bits: no real mask has runs that long
        raise MaskError("RLE counts hold a number too long for a run length (a corrupt string)")
    group = np.arange(c.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((c & 0x1F) << (5 * group), starts)
    negative = (c[ends] & 0x10) != 0
    values = np.where(negative, values | np.left_shift(-1, 5 * lengths), values)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run i adds run i - 2 from i = 3 on: running sums of odd and even runs
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def decode_stack(rles: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """RLEs of one image -> [N, height, width] uint8 0/1 (N may be 0).

    Raises:
        MaskError: an RLE is malformed or its size is not (height, width).
    """
    out = np.zeros((len(rles), height, width), np.uint8)
    for i, rle in enumerate(rles):
        mask = decode(rle)
        if mask.shape != (height, width):
            raise MaskError(f"mask {i} is {mask.shape[0]}x{mask.shape[1]} (h x w), the image {height}x{width}")
        out[i] = mask
    return out


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    """A COCO annotation's ``segmentation`` -> compressed RLE with str counts, or None when it has none.

    Polygons (a list of [x0, y0, x1, y1, ...] lists, in pixels of the image) are rasterised by pycocotools and
    merged into one mask; parts with fewer than 3 points are left out. Uncompressed RLE (``counts`` a list, COCO's
    crowd regions) is compressed; compressed RLE is kept. None for an absent or empty segmentation, or one that
    covers no pixel.

    Raises:
        MaskError: malformed, or an RLE whose size is not (height, width).
    """
    if segmentation is None or (isinstance(segmentation, (list, dict)) and not segmentation):
        return None
    if isinstance(segmentation, list):
        try:
            parts = [[float(v) for v in part] for part in segmentation]
        except (TypeError, ValueError) as e:
            raise MaskError(f"a polygon must be a list of [x0, y0, x1, y1, ...] lists of numbers ({e})") from e
        # pycocotools reads a 4-number list as a box, not a polygon: 1 or 2 points enclose nothing anyway
        parts = [p for p in parts if len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    elif isinstance(segmentation, dict):
        counts = segmentation.get("counts")
        size = segmentation.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise MaskError(f"an RLE needs 'size': [h, w], got {size!r}")
        if [int(size[0]), int(size[1])] != [height, width]:
            raise MaskError(f"the RLE is {int(size[0])}x{int(size[1])} (h x w) but the image {height}x{width}")
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != height * width or any(int(c) < 0 for c in counts):
                raise MaskError(f"uncompressed RLE counts cover {sum(int(c) for c in counts)} pixels, not "
                                f"{height} x {width}")
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
        else:
            rle = _native(segmentation)
            _check_counts(rle)
    else:
        raise MaskError(f"segmentation must be polygons (a list) or an RLE (a dict), got {type(segmentation).__name__}")
    if int(mask_utils.area(rle)) == 0:
        return None
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def resize(rle: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """The mask at another size, as the image is resized: the share of each new pixel the mask covers (PIL's box
    filter, the same pixel grid as the image's resize), kept where at least half. A mask that would vanish keeps
    its most covered pixel, so an instance never loses its mask to a downscale."""
    mask = decode(rle).astype(np.float32)
    if mask.shape == (height, width):
        return dict(rle)
    cover = np.asarray(Image.fromarray(mask, mode="F").resize((width, height), Image.Resampling.BOX))
    out = cover >= 0.5
    if not out.any():
        out[np.unravel_index(int(np.argmax(cover)), cover.shape)] = True
    return encode(out)


def bbox(rle: dict[str, Any]) -> list[float]:
    """COCO xywh of the mask's pixels (pycocotools toBbox: [0, 0, 0, 0] for an empty mask)."""
    return [float(v) for v in mask_utils.toBbox(_native(rle))]


def area(rle: dict[str, Any]) -> int:
    """Pixels in the mask."""
    return int(mask_utils.area(_native(rle)))


def problem(rle: Any, width: int, height: int, box: Sequence[float] | None) -> str | None:
    """What is wrong with a stored mask, or None: it must decode, be (height, width), cover at least a pixel and
    have a bounding box within BOX_TOLERANCE of `box` (COCO xywh) on every edge."""
    try:
        mask = decode(rle)
    except MaskError as e:
        return str(e)
    if mask.shape != (height, width):
        return f"mask is {mask.shape[0]}x{mask.shape[1]} (h x w), the image {height}x{width}"
    if not mask.any():
        return "mask is empty"
    if box is None:
        return None
    x, y, w, h = bbox(rle)
    bx, by, bw, bh = (float(v) for v in box)
    tol_x = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * bw)
    tol_y = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * bh)
    if (abs(x - bx) > tol_x or abs(x + w - bx - bw) > tol_x or abs(y - by) > tol_y
            or abs(y + h - by - bh) > tol_y):
        return (f"mask's box [{x:g}, {y:g}, {w:g}, {h:g}] does not match the box [{bx:g}, {by:g}, {bw:g}, {bh:g}] "
                f"(xywh; {BOX_TOLERANCE_PX:g} px or {BOX_TOLERANCE_FRACTION:.0%} allowed)")
    return None
