"""Embedded datasets: real images that ship inside installed packages, written once as shards into a cache.

``resolve("embedded:photos")`` returns a local folder holding shards and an index.json (docs/ARCHITECTURE.md), building
it on first use; any other URL comes back unchanged. Nothing here downloads: every dataset is made from files
inside pip wheels or a Debian package (see shared/research/offline-datasets.md), and a missing package is an
error that names the install command. ``python -m data_pipeline.write embedded:NAME OUT_URL`` writes the same
samples to any URL.

The names and what they hold are in :data:`REGISTRY`; ``NAME_val`` is always the held-out split of ``NAME``
(``nuclei_val`` is held out only: there is no training split).

* ``photos`` / ``photos_val``: 96x96 JPEG tiles (quality 95) cut at random positions and four scales from the
  natural photographs bundled with scikit-image, scikit-learn and matplotlib. Unlabelled; each tile's json
  names its photo and crop box. The validation split is made from *held-out photos* (chelsea, china), not
  from other tiles of the training photos, so it measures generalisation to unseen images.
* ``digits`` / ``digits_val``: scikit-learn's 1,797 8x8 digits, upsampled to 32x32 RGB PNG; fixed 80/20
  split stratified by class (seed 0).
* ``fashion_mnist`` / ``fashion_mnist_val``: Fashion-MNIST train (60,000) / test (10,000) from Debian's
  ``dataset-fashion-mnist``, 28x28 RGB PNG.
* ``trees`` / ``trees_val``: NEON aerial RGB with tree-crown boxes bundled in deepforest: 400x400 tiles (stride
  200, boxes clipped, slivers dropped) of the two large YELL images for training; the two annotated 400x400 images
  of other sites, OSBS_029 (61 boxes) and SOAP_061 (37 boxes, "Alive" and "Dead" trees, both "tree" here), held
  out as their 200x200 quadrants (8 images in 8 shards, so 2 ranks x 2 workers can read them in epoch mode).
* ``emoji`` / ``emoji_val``: 1-3 of 8 Noto colour emoji glyphs (Debian ``fonts-noto-color-emoji``), flipped, rotated
  and scaled to 32-64 px, composited without overlap onto 128-px crops of the bundled photographs; each box is the
  extent of its glyph's visible pixels (alpha > 0) and its instance mask (COCO RLE, data_pipeline.masks) those
  pixels, so boxes and masks are exact (the antialiased rim, alpha < 50%, is about 17% of a mask). Validation: the
  held-out photographs, placements of its own. Version 2 added the masks; the images and boxes are version 1's.
* ``nuclei_val``: a real held-out instance-segmentation set: the DSB 2018 fluorescence image that the stardist wheel
  bundles (``stardist/data/images/img2d.tif``, 512x512 grey, and ``mask2d.tif``, its label map of 125 nuclei), cut
  into 16 tiles of 128 px (16 shards); one COCO RLE mask per nucleus, boxes from the masks, one category
  "nucleus". A nucleus the tile edges cut is kept in the tile with its largest part, and in any other where at
  least 40% of it is (and 4 px each way); the slivers left over are unlabelled, so every nucleus is in some tile.
  Read with tifffile from the installed package's folder, without importing stardist (which imports TensorFlow):
  ``pip install --no-deps stardist``. Licences: stardist is BSD-3-Clause (its wheel's LICENSE.txt); the image and
  its annotation come from the 2018 Data Science Bowl stage-1 training set, published by the Broad Institute as
  BBBC038v1 (Caicedo et al., Nature Methods 16, 1247-1253, 2019; bbbc.broadinstitute.org/BBBC038) under CC0 1.0.
* ``emoji_captions`` / ``emoji_captions_val`` (``kind: "captioned"``, image-text for FLIP/CLIP): every
  single-codepoint glyph of U+2600-27BF and U+1F300-1FAFF that Noto Color Emoji draws (1,280), captioned with its
  Unicode name in lower case ("koala", "dog face"; no template: prompts at evaluation are bare names too), drawn at
  64 px: rotated up to 20 degrees, 60-100% of the side, anywhere in the frame, on a random flat or gradient
  background (no flips: "leftwards" must stay true). About 10% of the glyphs, chosen by a hash of the code point,
  are held out: ``emoji_captions_val`` has one image of each (~135), and ``cls`` with metadata ``classes`` (the
  sorted held-out captions) makes it a zero-shot classification set too; ``emoji_captions`` has 8 images of every
  other glyph (~9,160). ``emoji_captions_seen_val``: one new image of each of 256 training glyphs, so retrieval
  on captions the model was trained on (the quick sign of learning) is measured apart from generalisation to unseen
  names (a quarter of the held-out captions share no word with training). Fashion-MNIST's metadata ``prompts`` gives each class its name and the emoji names of the
  same garment, for zero-shot evaluation of a model trained on these captions.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import gzip
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline import masks
from data_pipeline.shard_writer import (INDEX_NAME, Sample, Source, SourceError, coco_source, encode_image,
                                        write_shards)

log = logging.getLogger(__name__)

PREFIX = "embedded:"
CACHE_ENV = "VITPRETRAIN_CACHE"


@dataclass(frozen=True)
class EmbeddedDataset:
    """One registry entry.

    Attributes:
        description: one line saying what the dataset is.
        build: seed -> Source (metadata plus samples in write order).
        shards: number of shards to aim for: epoch-mode streams need at least ranks x workers shards, so
            16-32 lets up to 8 ranks with 2 workers read every split; trees_val has 8 (its 8 images).
        prefix: shard name prefix.
        version: bump when the content changes; a cached copy with another version is rebuilt.
    """

    description: str
    build: Callable[[int], Source]
    shards: int
    prefix: str = "train"
    version: int = 1


# ----------------------------------------------------------------------------------------------- photos

TILE = 96
# crop side as a fraction of the photo's shorter side; never below TILE pixels, so tiles are not upsampled
TILE_SCALES = (0.2, 0.35, 0.5, 0.75)
TILES_PER_TRAIN_PHOTO = 400
TILES_PER_VAL_PHOTO = 150
VAL_PHOTOS = ("chelsea", "china")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()
    return load


def _motorcycle(side: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return skimage.data.stereo_motorcycle()[side]
    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)
    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


# name -> (package it ships in, loader returning HxWx3 uint8)
PHOTOS: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
    "astronaut": ("scikit-image", _skimage("astronaut")),
    "chelsea": ("scikit-image", _skimage("chelsea")),
    "coffee": ("scikit-image", _skimage("coffee")),
    "rocket": ("scikit-image", _skimage("rocket")),
    "immunohistochemistry": ("scikit-image", _skimage("immunohistochemistry")),
    "hubble_deep_field": ("scikit-image", _skimage("hubble_deep_field")),
    "retina": ("scikit-image", _skimage("retina")),
    "motorcycle_left": ("scikit-image", _motorcycle(0)),
    "motorcycle_right": ("scikit-image", _motorcycle(1)),
    "china": ("scikit-learn", _sklearn("china.jpg")),
    "flower": ("scikit-learn", _sklearn("flower.jpg")),
    "grace_hopper": ("matplotlib", _grace_hopper),
}


def photo_names(split: str) -> list[str]:
    """Names of the photos of a split ("train" or "val")."""
    return [n for n in PHOTOS if (n in VAL_PHOTOS) == (split == "val")]


def load_photos(names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The bundled photographs as HxWx3 uint8 arrays (all of them by default)."""
    return {n: np.ascontiguousarray(PHOTOS[n][1]()[..., :3]) for n in (names or list(PHOTOS))}


def _tile_boxes(name: str, photo: np.ndarray, n: int, seed: int) -> list[tuple[int, int, int]]:
    """`n` square crop boxes (x, y, side) at the TILE_SCALES in turn, random positions, flat crops redrawn."""
    h, w = photo.shape[:2]
    # one stream per photo, so adding a photo does not move every other photo's tiles
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    boxes = []
    for i in range(n):
        side = int(min(max(TILE_SCALES[i % len(TILE_SCALES)] * min(h, w), TILE), min(h, w)))
        for _ in range(10):
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            # retina's black surround and hubble's empty sky would otherwise give uniform tiles
            if photo[y:y + side:4, x:x + side:4].std() >= 4.0:
                break
        boxes.append((x, y, side))
    return boxes


def _photos_source(split: str, seed: int) -> Source:
    names = photo_names(split)
    photos = load_photos(names)
    per_photo = TILES_PER_VAL_PHOTO if split == "val" else TILES_PER_TRAIN_PHOTO
    tiles = [(n, box) for n in names for box in _tile_boxes(n, photos[n], per_photo, seed)]
    random.Random(seed).shuffle(tiles)

    def samples() -> Iterator[Sample]:
        for name, (x, y, side) in tiles:
            crop = Image.fromarray(photos[name][y:y + side, x:x + side])
            tile = crop.resize((TILE, TILE), Image.Resampling.BICUBIC, reducing_gap=3.0)
            data, ext = encode_image(tile, "jpg", quality=95)
            yield Sample(data, ext, json={"photo": name, "package": PHOTOS[name][0], "crop_xywh": [x, y, side, side]})

    meta = {"kind": "unlabelled", "source": f"{PREFIX}photos{'_val' if split == 'val' else ''}: {TILE}px tiles of "
            f"{', '.join(names)}", "photos": names}
    return Source(meta, samples(), total=len(tiles))


# ----------------------------------------------------------------------------------------------- digits


DIGITS_SIZE = 32


def _digits_source(split: str, seed: int) -> Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    idx = list(idx_val if split == "val" else idx_train)
    random.Random(seed).shuffle(idx)
    # 16 grey levels -> 0..255
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)

    def samples() -> Iterator[Sample]:
        for i in idx:
            im = Image.fromarray(images[i]).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC)
            data, ext = encode_image(im.convert("RGB"), "png")
            yield Sample(data, ext, cls=int(d.target[i]))

    meta = {"kind": "classification", "source": f"scikit-learn load_digits ({split}, 80/20 stratified, seed 0), "
            f"upsampled to {DIGITS_SIZE}px", "classes": [str(c) for c in range(10)]}
    return Source(meta, samples(), total=len(idx))


# ----------------------------------------------------------------------------------------------- fashion-mnist

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# Zero-shot prompts per class (index.json metadata "prompts"; a text model averages their embeddings, as CLIP's
# prompt ensembles do): the class name in lower case, then the Unicode names of the emoji that show the same
# garment, so a model trained on embedded:emoji_captions meets words it has read ("pullover" and "shirt" have none).
FASHION_PROMPTS = [["t-shirt/top", "t-shirt"], ["trouser", "jeans"], ["pullover"], ["dress"], ["coat"],
                   ["sandal", "womans sandal", "thong sandal"], ["shirt"], ["sneaker", "athletic shoe"],
                   ["bag", "handbag", "purse"], ["ankle boot", "womans boots"]]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed, unsigned bytes) as its N-d uint8 array."""
    raw = gzip.open(path).read()
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX type {raw[2]:#x} is not unsigned byte")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_source(split: str, seed: int) -> Source:
    stem = "t10k" if split == "val" else "train"
    images_path = FASHION_DIR / f"{stem}-images-idx3-ubyte.gz"
    labels_path = FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz"
    if not (images_path.exists() and labels_path.exists()):
        raise SourceError(f"Fashion-MNIST is not installed ({images_path} is missing). It ships in a Debian "
                          "package: apt-get install dataset-fashion-mnist")
    images, labels = read_idx(images_path), read_idx(labels_path)
    idx = list(range(len(labels)))
    random.Random(seed).shuffle(idx)

    def samples() -> Iterator[Sample]:
        for i in idx:
            data, ext = encode_image(Image.fromarray(images[i]).convert("RGB"), "png")
            yield Sample(data, ext, cls=int(labels[i]))

    meta = {"kind": "classification", "source": f"Fashion-MNIST {stem} ({FASHION_DIR}, Debian dataset-fashion-mnist)",
            "classes": FASHION_CLASSES, "prompts": FASHION_PROMPTS}
    return Source(meta, samples(), total=len(idx))


# ----------------------------------------------------------------------------------------------- trees

TREE_TILE = 400
TREE_STRIDE = 200
TREE_TRAIN_IMAGES = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
TREE_VAL_IMAGES = ("OSBS_029", "SOAP_061")
TREE_VAL_TILE = 200   # the held-out images are cut into quadrants: more shards than one image would give
# a clipped box survives if it keeps this much of its area and is at least this many pixels on each side
TREE_MIN_KEPT_AREA = 0.4
TREE_MIN_SIDE = 4


def package_dir(package: str, what: str) -> Path:
    """The installed folder of `package`, found without importing it (deepforest needs lightning, stardist imports
    TensorFlow: only their data files are read); SourceError saying `what` needs it and how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{what}, which is not installed: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def deepforest_data_dir() -> Path:
    """deepforest's bundled data folder, found without importing deepforest (which needs torch, lightning…)."""
    return package_dir("deepforest", "The trees dataset reads the sample data bundled in the deepforest wheel") / "data"


def read_voc_boxes(path: Path) -> list[tuple[int, int, int, int]]:
    """Pascal VOC xml -> [(xmin, ymin, xmax, ymax), ...] in pixels."""
    root = ET.parse(path).getroot()
    return [tuple(int(float(obj.find(f"bndbox/{k}").text)) for k in ("xmin", "ymin", "xmax", "ymax"))
            for obj in root.iter("object")]


def _tile_starts(length: int) -> list[int]:
    """Tile origins along one axis: every TREE_STRIDE, plus one flush with the far edge."""
    if length <= TREE_TILE:
        return [0]
    starts = list(range(0, length - TREE_TILE + 1, TREE_STRIDE))
    return starts if starts[-1] == length - TREE_TILE else starts + [length - TREE_TILE]


def _clip_boxes(boxes: list[tuple[int, int, int, int]], x0: int, y0: int, w: int, h: int) -> list[list[float]]:
    """Boxes (xyxy) clipped to the window, in window-relative COCO xywh; slivers dropped."""
    out = []
    for bx0, by0, bx1, by1 in boxes:
        cx0, cy0 = max(bx0, x0) - x0, max(by0, y0) - y0
        cx1, cy1 = min(bx1, x0 + w) - x0, min(by1, y0 + h) - y0
        cw, ch = cx1 - cx0, cy1 - cy0
        if cw < TREE_MIN_SIDE or ch < TREE_MIN_SIDE:
            continue
        if cw * ch < TREE_MIN_KEPT_AREA * (bx1 - bx0) * (by1 - by0):
            continue
        out.append([float(cx0), float(cy0), float(cw), float(ch)])
    return out


def _trees_source(split: str, seed: int) -> Source:
    data_dir = deepforest_data_dir()
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "tree"}]}
    readers: dict[str, Callable[[], bytes]] = {}

    def add_image(file_name: str, width: int, height: int, boxes: list[list[float]], read: Callable[[], bytes]):
        image_id = len(coco["images"]) + 1
        coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for b in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "bbox": b,
                                        "category_id": 1, "iscrowd": 0, "area": b[2] * b[3]})
        readers[file_name] = read

    if split == "val":
        for stem in TREE_VAL_IMAGES:
            with Image.open(data_dir / f"{stem}.png") as im:
                pixels = np.asarray(im.convert("RGB"))
            boxes_all = read_voc_boxes(data_dir / f"{stem}.xml")
            h, w = pixels.shape[:2]
            for y0 in range(0, h, TREE_VAL_TILE):
                for x0 in range(0, w, TREE_VAL_TILE):
                    tw, th = min(TREE_VAL_TILE, w - x0), min(TREE_VAL_TILE, h - y0)
                    boxes = _clip_boxes(boxes_all, x0, y0, tw, th)

                    def read(p: np.ndarray = pixels, x: int = x0, y: int = y0, tw: int = tw, th: int = th) -> bytes:
                        return encode_image(Image.fromarray(p[y:y + th, x:x + tw]), "png")[0]  # lossless

                    add_image(f"{stem}_x{x0}_y{y0}.png", tw, th, boxes, read)
    else:
        for stem in TREE_TRAIN_IMAGES:
            with Image.open(data_dir / f"{stem}.png") as im:
                pixels = np.asarray(im.convert("RGB"))
            boxes_all = read_voc_boxes(data_dir / f"{stem}.xml")
            h, w = pixels.shape[:2]
            for y0 in _tile_starts(h):
                for x0 in _tile_starts(w):
                    tw, th = min(TREE_TILE, w - x0), min(TREE_TILE, h - y0)
                    boxes = _clip_boxes(boxes_all, x0, y0, tw, th)
                    if not boxes:  # parts of the mosaics are unannotated: a tile without boxes is unlabelled
                        continue

                    def read(p: np.ndarray = pixels, x: int = x0, y: int = y0, tw: int = tw, th: int = th) -> bytes:
                        return encode_image(Image.fromarray(p[y:y + th, x:x + tw]), "jpg", quality=95)[0]

                    add_image(f"{stem}_x{x0}_y{y0}.jpg", tw, th, boxes, read)
    stems = TREE_VAL_IMAGES if split == "val" else TREE_TRAIN_IMAGES
    src = coco_source(coco, lambda name: readers[name](), seed=seed,
                      source=f"deepforest bundled data ({data_dir}): {', '.join(stems)}")
    src.metadata["num_boxes"] = len(coco["annotations"])
    return src


# ----------------------------------------------------------------------------------------------- emoji objects

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109       # NotoColorEmoji is a bitmap (CBDT) font: Pillow renders it only at its strike size
# the classes: single-codepoint glyphs that look unlike each other; names from unicodedata (category names)
EMOJI_CLASSES = ("\U0001F34E", "\U0001F436", "\U0001F697", "\u26BD", "\U0001F33B", "\U0001F511", "\U0001F3B8",
                 "\U0001F41F")
EMOJI_SIZE = 128            # image side, px
EMOJI_OBJECTS = (1, 3)      # objects per image, inclusive range
EMOJI_SIDE = (32, 64)       # object's longer side, px
EMOJI_ROTATION = 15.0       # max |rotation|, degrees
EMOJI_TRAIN_IMAGES = 3000
EMOJI_VAL_IMAGES = 200


def _emoji_font() -> Any:
    from PIL import ImageFont

    if not EMOJI_FONT.exists():
        raise SourceError(f"The emoji datasets draw the glyphs of Noto Color Emoji ({EMOJI_FONT} is missing). "
                          "It ships in a Debian package: apt-get install fonts-noto-color-emoji")
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_SIZE)


def render_glyph(font: Any, ch: str) -> Image.Image | None:
    """One glyph as an RGBA image cropped to its visible pixels (alpha > 0), or None if the font draws nothing."""
    from PIL import ImageDraw

    canvas = Image.new("RGBA", (EMOJI_FONT_SIZE + 40, EMOJI_FONT_SIZE + 40))
    ImageDraw.Draw(canvas).text((0, 0), ch, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return None if box is None else canvas.crop(box)


def emoji_glyphs() -> dict[str, Image.Image]:
    """Each class's glyph as an RGBA image cropped to its visible pixels (alpha > 0), at the font's native size."""
    font = _emoji_font()
    glyphs = {}
    for ch in EMOJI_CLASSES:
        glyph = render_glyph(font, ch)
        if glyph is None:
            raise SourceError(f"{EMOJI_FONT} draws nothing for U+{ord(ch):04X}: Pillow needs FreeType with PNG "
                              "support to render colour bitmap fonts")
        glyphs[ch] = glyph
    return glyphs


def emoji_category_name(ch: str) -> str:
    import unicodedata

    return unicodedata.name(ch).lower()


def _place_objects(rng: np.random.Generator, glyphs: dict[str, Image.Image]) -> list[tuple[str, Image.Image, int, int]]:
    """1-3 glyphs, each flipped, rotated and scaled at random, at positions where no two boxes overlap:
    [(class char, RGBA sprite cropped to its visible pixels, x, y)]."""
    placed: list[tuple[str, Image.Image, int, int]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(EMOJI_OBJECTS[0], EMOJI_OBJECTS[1] + 1))):
        ch = EMOJI_CLASSES[int(rng.integers(len(EMOJI_CLASSES)))]
        sprite = glyphs[ch]
        if rng.random() < 0.5:
            sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        sprite = sprite.rotate(float(rng.uniform(-EMOJI_ROTATION, EMOJI_ROTATION)), Image.Resampling.BICUBIC,
                               expand=True)
        side = int(rng.integers(EMOJI_SIDE[0], EMOJI_SIDE[1] + 1))
        scale = side / max(sprite.size)
        sprite = sprite.resize((max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale))),
                               Image.Resampling.LANCZOS)
        visible = sprite.getchannel("A").getbbox()  # rotation and resampling leave transparent margins
        if visible is None:
            continue
        sprite = sprite.crop(visible)
        w, h = sprite.size
        for _ in range(20):  # a free spot, or the object is left out
            x, y = int(rng.integers(0, EMOJI_SIZE - w + 1)), int(rng.integers(0, EMOJI_SIZE - h + 1))
            if all(x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y for bx, by, bw, bh in boxes):
                placed.append((ch, sprite, x, y))
                boxes.append((x, y, w, h))
                break
    return placed


def _emoji_source(split: str, seed: int) -> Source:
    glyphs = emoji_glyphs()
    names = photo_names(split)
    photos = load_photos(names)
    count = EMOJI_VAL_IMAGES if split == "val" else EMOJI_TRAIN_IMAGES
    # placements and background crops from a stream of the split's own: validation differs from training in both
    rng = np.random.default_rng([seed, zlib.crc32(f"emoji-{split}".encode())])
    categories = [{"id": i + 1, "name": emoji_category_name(ch)} for i, ch in enumerate(EMOJI_CLASSES)]
    class_id = {ch: i + 1 for i, ch in enumerate(EMOJI_CLASSES)}
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    plans: dict[str, tuple[str, tuple[int, int, int], list[tuple[str, Image.Image, int, int]]]] = {}
    for i in range(count):
        name = names[int(rng.integers(len(names)))]
        photo = photos[name]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(EMOJI_SIZE, min(h, w)), min(h, w) + 1))  # background crop, never upsampled
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        objects = _place_objects(rng, glyphs)
        file_name = f"emoji_{split}_{i:05d}.jpg"
        coco["images"].append({"id": i + 1, "file_name": file_name, "width": EMOJI_SIZE, "height": EMOJI_SIZE})
        for ch, sprite, x, y in objects:
            # the mask: every pixel the glyph reaches (alpha > 0), whose extent the box is
            mask = np.zeros((EMOJI_SIZE, EMOJI_SIZE), bool)
            mask[y:y + sprite.height, x:x + sprite.width] = np.asarray(sprite.getchannel("A")) > 0
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "bbox": [float(x), float(y), float(sprite.width), float(sprite.height)],
                                        "category_id": class_id[ch], "iscrowd": 0,
                                        "area": float(sprite.width * sprite.height),
                                        "segmentation": masks.encode(mask)})
        plans[file_name] = (name, (x0, y0, side), objects)

    def read(file_name: str) -> bytes:
        name, (x0, y0, side), objects = plans[file_name]
        background = Image.fromarray(photos[name][y0:y0 + side, x0:x0 + side])
        image = background.resize((EMOJI_SIZE, EMOJI_SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0).convert("RGBA")
        for _, sprite, x, y in objects:
            image.alpha_composite(sprite, (x, y))
        return encode_image(image.convert("RGB"), "jpg", quality=95)[0]

    src = coco_source(coco, read, seed=seed, source=f"Noto Color Emoji glyphs ({EMOJI_FONT}) composited onto "
                      f"{', '.join(names)}")
    src.metadata["num_boxes"] = len(coco["annotations"])
    return src


# ----------------------------------------------------------------------------------------------- emoji captions

# Single-codepoint glyphs of these blocks (Miscellaneous Symbols and Dingbats; the emoji planes U+1F300-1FAFF):
# with Noto Color Emoji 2.042 (Debian bookworm) 1,280 of them are drawn, each with a Unicode name.
EMOJI_CAPTION_BLOCKS = ((0x2600, 0x27BF), (0x1F300, 0x1FAFF))
EMOJI_CAPTION_SIZE = 64         # image side, px
EMOJI_CAPTION_VARIANTS = 8      # images per training glyph (one per held-out glyph)
EMOJI_CAPTION_SIDE = (0.6, 1.0)  # glyph's longer side as a fraction of the image side
EMOJI_CAPTION_ROTATION = 20.0   # max |rotation|, degrees
EMOJI_CAPTION_SEEN = 256       # glyphs of emoji_captions_seen_val
EMOJI_CAPTION_VAL_BUCKETS = 10  # a glyph is held out when crc32 of its code point falls in bucket 0: about 10%
# In the two older blocks the text fonts' "BLACK"/"WHITE" mean filled/outlined, not the colour the emoji shows
# ("BLACK SUN WITH RAYS" is a yellow sun), so the word is dropped there, unless that makes two captions equal.
_STYLE_WORDS = ("BLACK ", "WHITE ")


def emoji_caption(ch: str) -> str:
    """The caption of a glyph: its Unicode name, lower case, with the text-font style word of U+2600-27BF dropped
    ("white smiling face" -> "smiling face"; "koala", "dog face" stay as they are)."""
    import unicodedata

    name = unicodedata.name(ch)
    if ord(ch) < 0x2800:
        for word in _STYLE_WORDS:
            name = name.removeprefix(word)
    return name.lower()


def is_held_out(ch: str) -> bool:
    """Whether a glyph belongs to the held-out split: a hash of its code point, so the split is the same on every
    machine and does not move when a font version adds glyphs."""
    return zlib.crc32(f"U+{ord(ch):04X}".encode()) % EMOJI_CAPTION_VAL_BUCKETS == 0


@functools.cache
def caption_glyphs() -> dict[str, tuple[str, Image.Image]]:
    """Every drawable single-codepoint glyph of EMOJI_CAPTION_BLOCKS with a Unicode name: char -> (caption, RGBA
    glyph cropped to its visible pixels). Captions are unique (a stripped style word that would make two equal is
    kept); rendered once per process (about 1.5 s)."""
    import unicodedata

    font = _emoji_font()
    found: dict[str, Image.Image] = {}
    for lo, hi in EMOJI_CAPTION_BLOCKS:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if not unicodedata.name(ch, ""):
                continue
            glyph = render_glyph(font, ch)
            if glyph is not None:
                found[ch] = glyph
    if not found:
        raise SourceError(f"{EMOJI_FONT} draws none of its emoji: Pillow needs FreeType with PNG support to render "
                          "colour bitmap fonts")
    captions = {ch: emoji_caption(ch) for ch in found}
    counts = collections.Counter(captions.values())
    return {ch: (captions[ch] if counts[captions[ch]] == 1 else unicodedata.name(ch).lower(), glyph)
            for ch, glyph in found.items()}


def render_caption_image(glyph: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A glyph rotated, scaled and placed at random on a random background (a flat colour or a vertical gradient
    between two), EMOJI_CAPTION_SIZE square, RGB. No flips: names such as "leftwards ..." would become false."""
    size = EMOJI_CAPTION_SIZE
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if rng.random() < 0.5:
        bottom = top
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = np.broadcast_to((1 - ramp) * top + ramp * bottom, (size, size, 3))
    image = Image.fromarray(background.round().astype(np.uint8)).convert("RGBA")
    sprite = glyph.rotate(float(rng.uniform(-EMOJI_CAPTION_ROTATION, EMOJI_CAPTION_ROTATION)),
                          Image.Resampling.BICUBIC, expand=True)
    sprite = sprite.crop(sprite.getchannel("A").getbbox())
    scale = float(rng.uniform(*EMOJI_CAPTION_SIDE)) * size / max(sprite.size)
    sprite = sprite.resize((max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale))),
                           Image.Resampling.LANCZOS)
    x, y = int(rng.integers(0, size - sprite.width + 1)), int(rng.integers(0, size - sprite.height + 1))
    image.alpha_composite(sprite, (x, y))
    return image.convert("RGB")


def _emoji_captions_source(split: str, seed: int) -> Source:
    """split: "train" (EMOJI_CAPTION_VARIANTS images of every glyph not held out), "val" (one image of each held-out
    glyph) or "seen" (one new image of each of EMOJI_CAPTION_SEEN training glyphs: their captions were trained on,
    this rendering never was)."""
    glyphs = caption_glyphs()
    held_out = split == "val"
    chars = [ch for ch in glyphs if is_held_out(ch) == held_out]
    if split == "seen":  # a fixed subset, by a hash of its own, so the set stays small and the same everywhere
        chars = sorted(chars, key=lambda ch: zlib.crc32(f"seen-U+{ord(ch):04X}".encode()))[:EMOJI_CAPTION_SEEN]
    variants = EMOJI_CAPTION_VARIANTS if split == "train" else 1
    tag = ("train", "val", "seen").index(split)
    # the evaluation sets are also zero-shot classification sets: one class per glyph, named by its caption
    classes = sorted(glyphs[ch][0] for ch in chars) if split != "train" else None
    order = [(ch, v) for ch in chars for v in range(variants)]
    random.Random(seed).shuffle(order)  # pre-shuffle: a shard holds many glyphs

    def samples() -> Iterator[Sample]:
        for ch, v in order:
            caption, glyph = glyphs[ch]
            # one stream per (glyph, variant, split): adding a glyph moves no other image, and no evaluation image
            # is a training image
            rng = np.random.default_rng([seed, ord(ch), v, tag])
            data, ext = encode_image(render_caption_image(glyph, rng), "jpg", quality=95)
            yield Sample(data, ext, txt=caption, cls=classes.index(caption) if classes else None)

    what = {"train": "training glyphs", "val": "held-out glyphs (never in training)",
            "seen": "training glyphs drawn anew (their captions are trained on, these images are not)"}[split]
    meta: dict[str, Any] = {
        "kind": "captioned",
        "source": f"Noto Color Emoji glyphs ({EMOJI_FONT}) captioned with their Unicode names; {what}, {len(chars)} "
                  f"of {len(glyphs)}",
        "glyphs": len(chars), "images_per_glyph": variants,
        "codepoints": [f"U+{ord(ch):04X}" for ch in chars]}
    if classes:
        meta["classes"] = classes
    return Source(meta, samples(), total=len(order))
# ----------------------------------------------------------------------------------------------- nuclei

NUCLEI_TILE = 128          # the 512x512 image cut into 16 tiles: several samples (and shards), objects at model size
# a nucleus cut by a tile's edge is kept where its largest part is, and in any tile that holds this much of it and
# where it spans this many pixels each way
NUCLEI_MIN_KEPT_AREA = 0.4
NUCLEI_MIN_SIDE = 4


def stardist_images_dir() -> Path:
    """stardist's bundled image folder, found without importing stardist (its __init__ imports TensorFlow)."""
    return package_dir("stardist", "The nuclei set reads the DSB 2018 image bundled in the stardist wheel") / "data" \
        / "images"


def _nuclei_source(seed: int) -> Source:
    import tifffile

    folder = stardist_images_dir()
    try:
        image, labels = tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")
    except OSError as e:
        raise SourceError(f"Cannot read stardist's DSB 2018 image in {folder} ({e}); reinstall it: "
                          "pip install --no-deps --force-reinstall stardist") from e
    if image.ndim != 2 or image.shape != labels.shape:
        raise SourceError(f"{folder}: img2d.tif {image.shape} and mask2d.tif {labels.shape} are not one 2-D image "
                          "and its label map; this stardist version ships other data")
    # 8-bit values in a uint16 file (0-235); a wider range is scaled, never clipped
    peak = int(image.max())
    grey = (image if peak <= 255 else image.astype(np.float64) * (255.0 / peak)).astype(np.uint8)
    pixels = np.repeat(grey[..., None], 3, axis=2)
    sizes = np.bincount(labels.ravel())
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}
    tiles: dict[str, tuple[int, int]] = {}
    h, w = labels.shape
    # the tile that holds the largest part of each nucleus: that part is kept whatever its size
    tile_ids = (np.arange(h)[:, None] // NUCLEI_TILE) * (-(-w // NUCLEI_TILE)) + np.arange(w)[None, :] // NUCLEI_TILE
    parts = np.zeros((labels.max() + 1, tile_ids.max() + 1), np.int64)
    np.add.at(parts, (labels.ravel(), tile_ids.ravel()), 1)
    home = parts.argmax(1)
    dropped = 0
    for y0 in range(0, h, NUCLEI_TILE):
        for x0 in range(0, w, NUCLEI_TILE):
            tile = labels[y0:y0 + NUCLEI_TILE, x0:x0 + NUCLEI_TILE]
            file_name = f"dsb2018_x{x0}_y{y0}.png"
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": file_name, "width": tile.shape[1],
                                   "height": tile.shape[0]})
            tiles[file_name] = (x0, y0)
            for label in np.unique(tile[tile > 0]):
                mask = tile == label
                ys, xs = np.nonzero(mask)
                box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
                sliver = mask.sum() < NUCLEI_MIN_KEPT_AREA * sizes[label] or min(box[2:]) < NUCLEI_MIN_SIDE
                if sliver and home[label] != tile_ids[y0, x0]:
                    dropped += 1  # a sliver of a nucleus whose larger part is in another tile
                    continue
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "bbox": box,
                                            "category_id": 1, "iscrowd": 0, "area": float(mask.sum()),
                                            "segmentation": masks.encode(mask)})

    def read(file_name: str) -> bytes:
        x0, y0 = tiles[file_name]
        return encode_image(Image.fromarray(pixels[y0:y0 + NUCLEI_TILE, x0:x0 + NUCLEI_TILE]), "png")[0]  # lossless

    src = coco_source(coco, read, seed=seed, source=f"stardist's DSB 2018 nuclei image ({folder}/img2d.tif, "
                      f"mask2d.tif), {NUCLEI_TILE}px tiles")
    src.metadata.update({"num_boxes": len(coco["annotations"]), "nuclei": int((sizes[1:] > 0).sum()),
                         "dropped_slivers": dropped})
    return src


# ----------------------------------------------------------------------------------------------- registry


_TRAIN_PHOTOS = len(photo_names("train"))
REGISTRY: dict[str, EmbeddedDataset] = {
    "photos": EmbeddedDataset(
        f"{_TRAIN_PHOTOS * TILES_PER_TRAIN_PHOTO} {TILE}px tiles of {_TRAIN_PHOTOS} bundled photographs, unlabelled",
        partial(_photos_source, "train"), shards=32),
    "photos_val": EmbeddedDataset(
        f"{len(VAL_PHOTOS) * TILES_PER_VAL_PHOTO} {TILE}px tiles of 2 held-out photographs ({', '.join(VAL_PHOTOS)})",
        partial(_photos_source, "val"), shards=16, prefix="val"),
    "digits": EmbeddedDataset(
        f"scikit-learn digits, 80% (1,437), {DIGITS_SIZE}px RGB PNG, 10 classes",
        partial(_digits_source, "train"), shards=16),
    "digits_val": EmbeddedDataset(
        "scikit-learn digits, the held-out 20% (360)", partial(_digits_source, "val"), shards=16, prefix="val"),
    "fashion_mnist": EmbeddedDataset(
        "Fashion-MNIST train (60,000), 28px, 10 classes; needs apt-get install dataset-fashion-mnist",
        partial(_fashion_source, "train"), shards=32, version=2),
    "fashion_mnist_val": EmbeddedDataset(
        "Fashion-MNIST test (10,000); metadata prompts: zero-shot prompts per class", partial(_fashion_source, "val"),
        shards=16, prefix="val", version=2),
    "emoji": EmbeddedDataset(
        f"{EMOJI_TRAIN_IMAGES} {EMOJI_SIZE}px photos with 1-3 of {len(EMOJI_CLASSES)} emoji classes composited, exact "
        "boxes and masks; needs apt-get install fonts-noto-color-emoji", partial(_emoji_source, "train"), shards=16,
        version=2),
    "emoji_val": EmbeddedDataset(
        f"{EMOJI_VAL_IMAGES} such images on the held-out photos ({', '.join(VAL_PHOTOS)}), other placements",
        partial(_emoji_source, "val"), shards=16, prefix="val", version=2),
    "trees": EmbeddedDataset(
        f"tree-crown boxes: {TREE_TILE}px tiles of 2 YELL aerial images; pip install --no-deps deepforest",
        partial(_trees_source, "train"), shards=16),
    "trees_val": EmbeddedDataset(
        f"tree-crown boxes: {TREE_VAL_TILE}px quadrants of deepforest's OSBS_029 and SOAP_061 (400px, 61 + 37 "
        "boxes), held out", partial(_trees_source, "val"), shards=8, prefix="val", version=2),
    "emoji_captions": EmbeddedDataset(
        f"image-text: {EMOJI_CAPTION_VARIANTS} {EMOJI_CAPTION_SIZE}px images of each of ~1,150 emoji glyphs, captioned "
        "with their Unicode names; needs apt-get install fonts-noto-color-emoji",
        partial(_emoji_captions_source, "train"), shards=32),
    "emoji_captions_val": EmbeddedDataset(
        "image-text: one image of each of ~130 held-out glyphs (never in emoji_captions), cls = caption's class",
        partial(_emoji_captions_source, "val"), shards=17, prefix="val", version=2),  # 135: 17 shards of 8
    "emoji_captions_seen_val": EmbeddedDataset(
        f"image-text: a new image of each of {EMOJI_CAPTION_SEEN} training glyphs (captions seen in training, images "
        "not), cls = caption's class", partial(_emoji_captions_source, "seen"), shards=16, prefix="val"),
    "nuclei_val": EmbeddedDataset(
        f"DSB 2018 fluorescence nuclei with instance masks: {NUCLEI_TILE}px tiles of stardist's 512px image (125 "
        "nuclei), held out only; pip install --no-deps stardist", _nuclei_source, shards=16, prefix="val"),
}


def describe() -> str:
    """The registry as text, one dataset per line."""
    return "\n".join(f"{PREFIX}{name:<18} {ds.description}" for name, ds in REGISTRY.items())


def _lookup(name: str) -> EmbeddedDataset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SourceError(f"Unknown embedded dataset {name!r}; the embedded datasets are:\n{describe()}") from None


# import name -> pip name, for the message about a missing package
_PIP_NAMES = {"sklearn": "scikit-learn", "skimage": "scikit-image"}


def source(name: str, seed: int = 0) -> Source:
    """The Source of an embedded dataset (for write_shards), with its name and version in the metadata."""
    ds = _lookup(name)
    try:
        src = ds.build(seed)
    except ModuleNotFoundError as e:  # the package that ships the data (scikit-learn, scikit-image, matplotlib)
        package = (e.name or str(e)).split(".")[0]
        raise SourceError(f"{PREFIX}{name} is built from data inside the package {package!r}, which is not "
                          f"installed: pip install {_PIP_NAMES.get(package, package)}") from e
    src.metadata["embedded"] = {"name": name, "version": ds.version, "seed": seed}
    return src


def maxcount_for(ds: EmbeddedDataset, total: int | None) -> int:
    """Samples per shard that split `total` into about ``ds.shards`` shards."""
    return max(1, math.ceil((total or 1) / ds.shards))


# ----------------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """Where embedded datasets are cached: ``$VITPRETRAIN_CACHE`` or ``~/.cache/vitpretrain/embedded``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitpretrain" / "embedded"


def _is_current(folder: Path, name: str) -> bool:
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return index.get("metadata", {}).get("embedded", {}).get("version") == REGISTRY[name].version


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock, so that one process builds while the others wait (rename keeps it safe without one)."""
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(name: str) -> Path:
    """Build the embedded dataset `name` into the cache unless a current copy is there; return its folder.

    Shards are written into a temporary folder beside the final one and renamed into place, so no process
    ever sees a half-written set. Processes arriving while one builds wait on a lock file and then reuse
    its result; where locks do not work (some network filesystems) the first rename wins and the others
    discard their copies.
    """
    ds = _lookup(name)
    root = cache_root()
    final = root / name
    if _is_current(final, name):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{name}.lock"):
        if _is_current(final, name):
            return final
        log.info("building embedded dataset %s into %s (first use)", name, final)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            src = source(name)
            write_shards(src.samples, str(tmp), src.metadata, maxcount=maxcount_for(ds, src.total), prefix=ds.prefix,
                         total=src.total, progress=sys.stderr.isatty())
            stale = None
            if final.exists():  # an older version: move it aside, then swap (a rename onto a full folder fails)
                stale = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
                os.rename(final, stale / name)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_current(final, name):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process (without the lock) got there first
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built %s in %.1f s", name, time.perf_counter() - start)
    return final


def resolve(url: str) -> str:
    """``embedded:NAME`` -> local folder with its shards and index.json (built on first use); others unchanged.

    Raises:
        SourceError: unknown name, or the package holding the data is not installed (the message says which).
    """
    if not url.startswith(PREFIX):
        return url
    return str(ensure_built(url.removeprefix(PREFIX)))
