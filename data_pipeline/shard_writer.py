"""The library behind ``python -m data_pipeline.write``: samples, sources and the shard writer.

Shared by the command (data_pipeline.write) and the embedded datasets (data_pipeline.embedded), which both import
it and which it imports neither of; so its classes (SourceError above all) exist once however the command is run.

The layout follows tmbdev's ``imagenet-wds/makeshards.py``: raw encoded bytes (re-encoded only with
``--resize``), records pre-shuffled with ``--seed`` so that no shard holds a single class, and a new shard
whenever ``--maxcount`` samples or ``--maxsize`` bytes would be exceeded. webdataset's ``ShardWriter`` opens
only local paths and its byte count ignores tar headers and padding, so shards are rolled here around
``TarWriter`` on fsspec streams, with exact sizes. ``index.json`` (format in docs/ARCHITECTURE.md) lists every shard
with its samples and bytes, plus the dataset's metadata. Every image is opened and fully decoded with PIL
before it is written; unreadable files are skipped, counted, and listed in the summary and the index.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    import webdataset as wds

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
DEFAULT_MAXCOUNT = 1000
DEFAULT_MAXSIZE = int(1e9)
# tar geometry (USTAR, stream mode "w|"): one 512-byte header per member (our names are < 100 chars), data
# padded to 512, two zero blocks at the end, and the whole file padded to a 20-block record.
_BLOCK = 512
_RECORD = 20 * _BLOCK
# Extensions the stream's decoder (PIL through webdataset) recognises, for the formats PIL reports.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tiff", "BMP": "bmp", "GIF": "gif"}


class SourceError(Exception):
    """A source that is missing, empty or malformed; the CLI reports it in one paragraph and exits with 2."""


class UnreadableImage(Exception):
    """An image that PIL cannot open and fully decode (truncated, not an image, decompression bomb…)."""


@dataclass
class Sample:
    """One sample to write: encoded image bytes, their extension, and optional label, json and caption.

    Attributes:
        image: encoded image bytes, stored as they are.
        ext: extension of the image member (``jpg``, ``png``, ``webp``…), the image's real format.
        cls: integer class label, stored as the ASCII ``cls`` member.
        json: JSON-serialisable dict, stored as the UTF-8 ``json`` member.
        txt: caption (image-text sets, ``kind: "captioned"``), stored as the UTF-8 ``txt`` member.
    """

    image: bytes
    ext: str
    cls: int | None = None
    json: dict[str, Any] | None = None
    txt: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A record that could not be turned into a sample; counted and listed in the index's metadata."""

    path: str
    reason: str


@dataclass
class Source:
    """A dataset ready to write: its metadata and its samples in (pre-shuffled) write order.

    Attributes:
        metadata: the index.json ``metadata`` (``kind``, ``source``, ``classes`` / ``categories``…);
            ``skipped`` is filled in by :func:`write_shards`.
        samples: samples and skipped records, lazily produced, in the order they are written.
        total: number of records, for the progress bar (None if unknown).
    """

    metadata: dict[str, Any]
    samples: Iterable[Sample | Skipped]
    total: int | None = None


@dataclass
class LoadedImage:
    """An image checked by PIL, possibly downscaled: bytes to store and the scale applied to coordinates."""

    data: bytes
    ext: str
    width: int
    height: int
    orig_width: int
    orig_height: int

    @property
    def scale_x(self) -> float:
        return self.width / self.orig_width

    @property
    def scale_y(self) -> float:
        return self.height / self.orig_height


# ----------------------------------------------------------------------------------------------- images


def load_image(data: bytes, resize: int | None = None) -> LoadedImage:
    """Verify encoded image bytes with PIL (open + full decode) and optionally downscale them.

    Args:
        data: encoded image bytes.
        resize: if set and the shorter side is longer than this, resize (Lanczos) so that the shorter side
            equals it and re-encode (JPEG quality 95 for JPEG sources, otherwise the same format). Images that
            are already small enough are stored untouched: upsampling would add bytes and no information.

    Returns:
        The bytes to store, their extension, the stored size and the scale from original to stored pixels.

    Raises:
        UnreadableImage: PIL cannot open or fully decode the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            im.load()  # open() only parses the header; truncated or corrupt pixel data fails here
            width, height = im.size
            ext = _FORMAT_EXT.get(fmt) or _registered_ext(fmt)
            if resize is None or min(width, height) <= resize:
                return LoadedImage(data, ext, width, height, width, height)
            scale = resize / min(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            resized = im.resize(size, Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
    encoded, ext = encode_image(resized, "jpg" if ext == "jpg" else ext)
    return LoadedImage(encoded, ext, size[0], size[1], width, height)


def encode_image(im: Image.Image, ext: str = "jpg", quality: int = 95) -> tuple[bytes, str]:
    """Encode a PIL image; formats PIL cannot write (or JPEG's unsupported modes) fall back sensibly.

    Returns:
        (encoded bytes, extension actually used).
    """
    buf = io.BytesIO()
    if ext == "jpg":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")  # JPEG has no alpha or palette
        im.save(buf, format="JPEG", quality=quality)
    elif ext == "webp":
        im.save(buf, format="WEBP", quality=quality)
    elif ext == "png":
        im.save(buf, format="PNG")
    else:  # GIF, TIFF, BMP…: re-encoding only happens with --resize; PNG is lossless and always decodable
        return encode_image(im, "png")
    return buf.getvalue(), ext


def _registered_ext(fmt: str) -> str:
    for ext, f in Image.registered_extensions().items():
        if f == fmt:
            return ext.lstrip(".").lower()
    raise UnreadableImage(f"format {fmt!r} has no known file extension")


# ----------------------------------------------------------------------------------------------- writing


class _CountingFile:
    """Write-only wrapper counting the bytes that really reach the fsspec stream."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.count = 0

    def write(self, b: bytes) -> int:
        self.count += len(b)
        self.f.write(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


def _tar_bytes(payload_sizes: Iterable[int]) -> int:
    """Bytes the members take in a tar: a header block each plus data padded to whole blocks."""
    return sum(_BLOCK + -(-n // _BLOCK) * _BLOCK for n in payload_sizes)


def _tar_file_bytes(content: int) -> int:
    """Final file size for `content` member bytes: two end blocks, padded to a whole record."""
    return -(-(content + 2 * _BLOCK) // _RECORD) * _RECORD


def sample_members(sample: Sample) -> dict[str, bytes]:
    """The tar members of a sample (without ``__key__``): image, optional ``cls``, ``json`` and ``txt``."""
    members = {sample.ext: sample.image}
    if sample.cls is not None:
        members["cls"] = str(int(sample.cls)).encode("ascii")
    if sample.json is not None:
        members["json"] = json.dumps(sample.json, separators=(",", ":")).encode("utf-8")
    if sample.txt is not None:
        members["txt"] = sample.txt.encode("utf-8")
    return members


class CaptionStats:
    """Counts and lengths of captions, accumulated one at a time (index.json ``metadata.captions``, inspect).

    ``summary()`` gives ``{"count", "unique", "chars": {"min", "mean", "max"}, "words": {"min", "mean", "max"}}``;
    words are whitespace-separated. Unique captions are counted exactly up to ``UNIQUE_LIMIT`` distinct ones
    (then the count says "at least"), so memory stays bounded on web-scale sets.
    """

    UNIQUE_LIMIT = 1_000_000

    def __init__(self) -> None:
        self.count = 0
        self._seen: set[str] = set()
        self._chars: list[int] = [0, 0, 0]  # min, sum, max
        self._words: list[int] = [0, 0, 0]

    def add(self, caption: str) -> None:
        chars, words = len(caption), len(caption.split())
        for acc, n in ((self._chars, chars), (self._words, words)):
            acc[0] = n if self.count == 0 else min(acc[0], n)
            acc[1] += n
            acc[2] = max(acc[2], n)
        self.count += 1
        if len(self._seen) < self.UNIQUE_LIMIT:
            self._seen.add(caption)

    def merge(self, other: CaptionStats) -> None:
        """Add another accumulator's captions (e.g. one per shard) to this one."""
        if other.count == 0:
            return
        for mine, theirs in ((self._chars, other._chars), (self._words, other._words)):
            mine[0] = theirs[0] if self.count == 0 else min(mine[0], theirs[0])
            mine[1] += theirs[1]
            mine[2] = max(mine[2], theirs[2])
        self.count += other.count
        self._seen |= set(list(other._seen)[:max(0, self.UNIQUE_LIMIT - len(self._seen))])

    def summary(self) -> dict[str, Any]:
        def lengths(acc: list[int]) -> dict[str, float]:
            return {"min": acc[0], "mean": round(acc[1] / max(1, self.count), 2), "max": acc[2]}

        unique: int | str = len(self._seen)
        if len(self._seen) >= self.UNIQUE_LIMIT:
            unique = f">={self.UNIQUE_LIMIT}"
        return {"count": self.count, "unique": unique, "chars": lengths(self._chars), "words": lengths(self._words)}


def format_caption_stats(stats: dict[str, Any]) -> str:
    """:meth:`CaptionStats.summary` (index.json ``metadata.captions``) in one line, for the CLIs."""
    chars, words = stats["chars"], stats["words"]
    return (f"{stats['count']} ({stats['unique']} unique); characters {chars['min']}-{chars['max']}, mean "
            f"{chars['mean']}; words {words['min']}-{words['max']}, mean {words['mean']}")


@dataclass
class _OpenShard:
    name: str
    file: Any
    counter: _CountingFile
    tar: wds.TarWriter
    samples: int = 0
    content: int = 0

    def close(self) -> dict[str, Any]:
        self.tar.close()
        self.file.close()  # a remote file is uploaded on close; the shard only exists from here on
        return {"url": self.name, "samples": self.samples, "bytes": self.counter.count}


@dataclass
class WriteResult:
    """What :func:`write_shards` wrote: the index (as written to index.json) and where."""

    index: dict[str, Any]
    url: str
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])


def write_shards(
    samples: Iterable[Sample | Skipped],
    out_url: str,
    metadata: dict[str, Any],
    *,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    prefix: str = "train",
    total: int | None = None,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> WriteResult:
    """Write samples, in the given order, into ``PREFIX-000000.tar``, ``PREFIX-000001.tar``… and ``index.json``.

    A shard is closed before a sample that would take it past `maxcount` samples or `maxsize` bytes (the
    real file size, tar padding included), so shards never exceed either limit unless one sample alone is
    larger than `maxsize`. ``index.json`` is written last: a folder with an index holds a complete set.

    Args:
        samples: samples in write order (already shuffled); ``Skipped`` entries are counted, not written.
        out_url: destination folder, any fsspec URL (local path, ``file://``, ``memory://``, ``s3://``…).
        metadata: index.json metadata; ``skipped`` is added here.
        maxcount: most samples per shard.
        maxsize: most bytes per shard file.
        prefix: shard name prefix.
        total: number of entries in `samples`, for the progress bar.
        progress: show a tqdm progress bar (stderr).
        storage_options: passed to the fsspec filesystem.

    Returns:
        The index and the skipped records.

    Raises:
        SourceError: nothing could be written (every record was skipped or there were none).
    """
    if maxcount < 1 or maxsize < 1:
        raise ValueError(f"maxcount and maxsize must be positive, got {maxcount} and {maxsize}")
    fs, root = fsspec.core.url_to_fs(out_url, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.exists(f"{root}/{INDEX_NAME}"):
        log.warning("%s already holds a dataset; its index.json will be replaced", out_url)
    shards: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    shard: _OpenShard | None = None
    written = 0
    captions = CaptionStats()

    import webdataset as wds  # imported here: it imports torch (seconds), which the command's errors need not wait for

    def open_shard() -> _OpenShard:
        if not shards:  # the folder appears with the first shard: a source with nothing to write leaves nothing
            fs.makedirs(root, exist_ok=True)
        name = f"{prefix}-{len(shards):06d}.tar"
        f = fs.open(f"{root}/{name}", "wb")
        counter = _CountingFile(f)
        # mtime fixed so that the same source and seed give byte-identical shards
        return _OpenShard(name, f, counter, wds.TarWriter(counter, encoder=False, mtime=0))

    bar = tqdm(samples, total=total, unit="img", desc=f"writing {prefix} shards", disable=not progress,
               dynamic_ncols=True)
    try:
        for item in bar:
            if isinstance(item, Skipped):
                skipped.append(item)
                log.debug("skipped %s: %s", item.path, item.reason)
                bar.set_postfix(skipped=len(skipped), refresh=False)
                continue
            members = sample_members(item)
            if item.txt is not None:
                captions.add(item.txt)
            size = _tar_bytes(len(v) for v in members.values())
            if shard is not None and (shard.samples >= maxcount
                                      or _tar_file_bytes(shard.content + size) > maxsize):
                shards.append(shard.close())
                shard = None
            if shard is None:
                shard = open_shard()
            shard.tar.write({"__key__": f"{written:06d}", **members})
            shard.samples += 1
            shard.content += size
            written += 1
        if shard is not None:
            shards.append(shard.close())
            shard = None
    finally:
        bar.close()
        if shard is not None:  # an exception mid-shard: close the file so no handle leaks, index not written
            shard.file.close()
    if written == 0:
        reason = f"all {len(skipped)} files were unreadable" if skipped else "it holds no images"
        raise SourceError(f"Nothing to write from {metadata.get('source', 'the source')}: {reason}.")
    metadata = {**metadata, "skipped": {"count": len(skipped), "paths": [s.path for s in skipped]}}
    if captions.count:
        metadata["captions"] = captions.summary()
    index = {
        "format": "webdataset",
        "version": 1,
        "num_samples": written,
        "num_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "metadata": metadata,
    }
    with fs.open(f"{root}/{INDEX_NAME}", "w") as f:
        json.dump(index, f, indent=1)
    log.debug("wrote %d samples in %d shards (%.1f MB) to %s", written, len(shards), index["num_bytes"] / 1e6,
             out_url)
    return WriteResult(index=index, url=out_url, skipped=skipped)


# ----------------------------------------------------------------------------------------------- sources


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """All non-hidden files below `folder`, recursively, in sorted order (hidden folders are not entered)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f))
    return found


def _read_checked(path: Path, resize: int | None) -> LoadedImage | Skipped:
    try:
        return load_image(path.read_bytes(), resize)
    except OSError as e:  # unreadable file (permissions, broken link)
        return Skipped(str(path), f"{type(e).__name__}: {e}")
    except UnreadableImage as e:
        return Skipped(str(path), str(e))


def imagefolder_source(root: Path, *, seed: int = 0, resize: int | None = None) -> Source:
    """An ImageFolder directory: sub-folders are classes (sorted → 0, 1, …), files below them their images.

    Files directly in `root` belong to no class and are skipped (listed). Hidden files and folders are ignored.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d.name))
    records: list[tuple[Path, int]] = [(p, label) for label, c in enumerate(classes) for p in _files_under(root / c)]
    stray = sorted(p for p in root.iterdir() if p.is_file() and not _is_hidden(p.name))
    if not records:
        raise SourceError(f"The ImageFolder {root} has {len(classes)} class folders ({', '.join(classes[:5])}…) "
                          "but no files in them; put each class's images in its own sub-folder.")
    random.Random(seed).shuffle(records)  # pre-shuffle: neighbours in the stream come from different classes

    def samples() -> Iterator[Sample | Skipped]:
        for p in stray:
            yield Skipped(str(p), "not in a class folder")
        for path, label in records:
            img = _read_checked(path, resize)
            yield img if isinstance(img, Skipped) else Sample(img.data, img.ext, cls=label)

    meta = {"kind": "classification", "source": str(root.resolve()), "classes": classes}
    return Source(meta, samples(), total=len(records) + len(stray))


def unlabelled_source(root: Path, *, seed: int = 0, resize: int | None = None) -> Source:
    """Every (non-hidden) file below `root`, recursively, as an unlabelled image."""
    paths = _files_under(root)
    if not paths:
        raise SourceError(f"The folder {root} holds no files; expected images (or class sub-folders).")
    random.Random(seed).shuffle(paths)

    def samples() -> Iterator[Sample | Skipped]:
        for path in paths:
            img = _read_checked(path, resize)
            yield img if isinstance(img, Skipped) else Sample(img.data, img.ext)

    return Source({"kind": "unlabelled", "source": str(root.resolve())}, samples(), total=len(paths))


def coco_source(
    coco: dict[str, Any],
    read_bytes: Callable[[str], bytes],
    *,
    source: str,
    seed: int = 0,
    resize: int | None = None,
) -> Source:
    """A COCO instances dataset: one sample per image, its annotations in the sample's json.

    The json holds ``image_id``, ``file_name``, ``width``, ``height`` (of the stored image), ``boxes``
    (COCO xywh in stored pixels), ``category_ids``, ``iscrowd`` and ``area`` (docs/ARCHITECTURE.md). Images without
    annotations are kept (they are negatives). An image whose real size differs from the size the
    annotations declare is skipped: its boxes would be in another coordinate frame.

    Args:
        coco: the parsed instances json (``images``, ``annotations``, ``categories``).
        read_bytes: file_name -> encoded image bytes (raises OSError if missing).
        source: description for the metadata (path of the json).
        seed: pre-shuffle seed.
        resize: shorter-side downscale (boxes, sizes and areas are rescaled with the image).
    """
    try:
        images = list(coco["images"])
        categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in coco.get("categories", [])]
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in coco.get("annotations", []):
            by_image[int(ann["image_id"])].append(ann)
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{source} is not a COCO instances json (missing or malformed {e}); it needs 'images', "
                          "'annotations' and 'categories' lists.") from e
    if not images:
        raise SourceError(f"The COCO json {source} lists no images.")
    random.Random(seed).shuffle(images)

    def samples() -> Iterator[Sample | Skipped]:
        for info in images:
            name = str(info["file_name"])
            try:
                img = load_image(read_bytes(name), resize)
            except (OSError, UnreadableImage) as e:
                yield Skipped(name, f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
                continue
            w0, h0 = img.orig_width, img.orig_height
            if "width" in info and "height" in info and (int(info["width"]), int(info["height"])) != (w0, h0):
                yield Skipped(name, f"image is {w0}x{h0} but the annotations say {info['width']}x{info['height']}")
                continue
            anns = by_image.get(int(info["id"]), [])
            sx, sy = img.scale_x, img.scale_y
            boxes = [[a["bbox"][0] * sx, a["bbox"][1] * sy, a["bbox"][2] * sx, a["bbox"][3] * sy] for a in anns]
            target = {
                "image_id": int(info["id"]),
                "file_name": name,
                "width": img.width,
                "height": img.height,
                "boxes": boxes,
                "category_ids": [int(a["category_id"]) for a in anns],
                "iscrowd": [int(a.get("iscrowd", 0)) for a in anns],
                "area": [float(a.get("area", a["bbox"][2] * a["bbox"][3])) * sx * sy for a in anns],
            }
            yield Sample(img.data, img.ext, json=target)

    meta = {"kind": "detection", "source": source, "categories": categories}
    return Source(meta, samples(), total=len(images))


def coco_file_source(path: Path, images: Path | None, *, seed: int = 0, resize: int | None = None) -> Source:
    """A COCO instances json file; images are read from `images` (default: the json's folder)."""
    try:
        coco = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"Cannot read the COCO json {path}: {e}.") from e
    if not isinstance(coco, dict):
        raise SourceError(f"{path} is not a COCO instances json (top level is not an object).")
    folder = images if images is not None else path.parent
    if not folder.is_dir():
        raise SourceError(f"The image folder {folder} for the COCO json {path} does not exist; pass --images DIR.")
    return coco_source(coco, lambda name: (folder / name).read_bytes(), source=str(path.resolve()), seed=seed,
                       resize=resize)


def resize_samples(samples: Iterable[Sample | Skipped], resize: int) -> Iterator[Sample | Skipped]:
    """Downscale samples produced in memory (embedded datasets), rescaling detection json like the COCO path."""
    for s in samples:
        if isinstance(s, Skipped):
            yield s
            continue
        img = load_image(s.image, resize)
        target = s.json
        if target is not None and "boxes" in target:
            sx, sy = img.scale_x, img.scale_y
            target = {**target, "width": img.width, "height": img.height,
                      "boxes": [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in target["boxes"]],
                      "area": [a * sx * sy for a in target["area"]]}
        yield Sample(img.data, img.ext, s.cls, target, s.txt)
