"""Image-text sources for ``python -m data_pipeline.write`` (``kind: "captioned"``): each sample is an image and its
caption, the caption stored as the UTF-8 ``txt`` member (docs/ARCHITECTURE.md, "The data formats").

Three inputs, each read as the user has it:

* a folder of image + caption pairs with the same stem (``dog.jpg`` + ``dog.txt``), searched recursively (so
  img2dataset's ``--output_format files`` folders, ``00000/000000012.jpg`` + ``.txt`` + ``.json``, read too);
* a table of (path, caption) rows: ``.csv`` / ``.tsv`` (delimiter sniffed) or ``.parquet`` (read with pyarrow,
  when it is installed); column names are found among common ones (``filepath``, ``path``, ``image``... and
  ``caption``, ``text``, ``title``...) or given; relative paths are relative to the table's folder (or ``--images``);
* shards in img2dataset's webdataset layout (``00000.tar`` holding ``000000000.jpg`` + ``.txt`` + ``.json``, beside
  ``00000_stats.json`` and ``00000.parquet``): :func:`index_caption_shards` scans them and writes ``index.json``
  beside them (``--index-only``), so the stream reads the tars as they are; or they are re-written like any other
  source (``--resize``, other shard sizes), in their own order.

What the user fixes (a table without the caption column, a folder without a single pair, parquet without pyarrow)
is a SourceError (exit 2, one paragraph); a single bad record (an image without its caption file, an empty or
non-UTF-8 caption, a missing or unreadable image) is skipped, counted and listed, as unreadable images are.
img2dataset's ``json`` member (url, status, width, height...) is not detection's json: captioned sets say
``kind: "captioned"``, which the detection task refuses, and the stream accepts a ``json`` member in any sample.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec

from data_pipeline.shard_writer import (INDEX_NAME, CaptionStats, Sample, Skipped, Source, SourceError, UnreadableImage,
                                        _files_under, _read_checked, load_image)

log = logging.getLogger(__name__)

CAPTION_SUFFIX = ".txt"
# files that sit beside image + caption pairs and are not images (img2dataset's files layout writes .json)
COMPANION_SUFFIXES = {".txt", ".json"}
PATH_COLUMNS = ("filepath", "path", "file", "file_name", "filename", "image", "image_path", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "txt", "description")
TABLE_SUFFIXES = {".csv", ".tsv", ".parquet"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DOWNLOAD_FIRST = ("Download them first (img2dataset --url_list TABLE --output_format webdataset), then index its "
                   "output folder where it is: python -m data_pipeline.write --index-only DIR.")


def read_caption(data: bytes) -> str:
    """A caption file's text: UTF-8, surrounding whitespace removed. Raises ValueError if not UTF-8 or empty."""
    try:
        text = data.decode("utf-8-sig").strip()  # -sig: a byte-order mark some editors write is not caption text
    except UnicodeDecodeError as e:
        raise ValueError(f"the caption is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text:
        raise ValueError("the caption is empty")
    return text


def _captioned(path: Path, caption: str | None, resize: int | None, what: str) -> Sample | Skipped:
    """The sample of one image and its caption (already read), or why it is skipped."""
    img = _read_checked(path, resize)
    if isinstance(img, Skipped):
        return Skipped(what, img.reason)
    return Sample(img.data, img.ext, txt=caption)


# ----------------------------------------------------------------------------------------------- folder of pairs


def caption_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[Skipped]]:
    """The (image, caption file) pairs below `root` (same folder, same stem), and the files that have no partner:
    an image without its ``.txt``, a ``.txt`` without an image, several images sharing one stem."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for p in _files_under(root):
        groups.setdefault((p.parent, p.stem), []).append(p)
    pairs, unpaired = [], []
    for (_, stem), files in groups.items():
        captions = [p for p in files if p.suffix.lower() == CAPTION_SUFFIX]
        images = [p for p in files if p.suffix.lower() not in COMPANION_SUFFIXES]
        if captions and len(images) == 1:
            pairs.append((images[0], captions[0]))
        elif captions and not images:
            unpaired.append(Skipped(str(captions[0]), "a caption without an image of the same stem"))
        elif captions:
            unpaired.append(Skipped(str(captions[0]), f"{len(images)} images share the stem {stem!r}: "
                                    f"{', '.join(p.name for p in images)}"))
        else:
            unpaired.extend(Skipped(str(p), f"no caption file {stem}{CAPTION_SUFFIX} beside it") for p in images)
    return pairs, unpaired


def has_caption_pairs(root: Path) -> bool:
    """True when some image below `root` has a same-stem ``.txt`` beside it (the folder is read as image-text)."""
    return bool(caption_pairs(root)[0])


def caption_folder_source(root: Path, *, seed: int = 0, resize: int | None = None) -> Source:
    """Every image below `root` with a same-stem ``.txt`` caption beside it; unpaired files are skipped and listed."""
    pairs, unpaired = caption_pairs(root)
    if not pairs:
        raise SourceError(f"The folder {root} holds no image + caption pairs: an image-text folder needs, for each "
                          f"image, a UTF-8 caption file of the same name with {CAPTION_SUFFIX} (dog.jpg + dog.txt).")
    random.Random(seed).shuffle(pairs)

    def samples() -> Iterator[Sample | Skipped]:
        yield from unpaired
        for image, caption_file in pairs:
            try:
                caption = read_caption(caption_file.read_bytes())
            except (OSError, ValueError) as e:
                yield Skipped(str(caption_file), f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
                continue
            yield _captioned(image, caption, resize, str(image))

    meta = {"kind": "captioned", "source": f"{root.resolve()} (image + {CAPTION_SUFFIX} pairs)"}
    return Source(meta, samples(), total=len(pairs) + len(unpaired))


# ----------------------------------------------------------------------------------------------- tables


def _pick_column(names: Sequence[str], given: str | None, candidates: Sequence[str], what: str, flag: str,
                 table: Path) -> str:
    if given is not None:
        if given in names:
            return given
        raise SourceError(f"The table {table} has no column {given!r} ({flag}); its columns are: "
                          f"{', '.join(map(repr, names))}.")
    lowered = {n.lower().strip(): n for n in names}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    if candidates is PATH_COLUMNS and "url" in lowered:
        raise SourceError(f"The table {table} has a 'url' column and no image path column: its images are on the web. "
                          f"{_DOWNLOAD_FIRST} (A column of local paths is named with --path-column COLUMN.)")
    raise SourceError(f"The table {table} has no {what} column among the usual names ({', '.join(candidates)}); its "
                      f"columns are: {', '.join(map(repr, names))}. Name it with {flag} COLUMN.")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"The table {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                          "CSV.") from e
    if not text.strip():
        raise SourceError(f"The table {path} is empty; it needs a header row (e.g. filepath,caption) and a row per "
                          "image.")
    # the delimiter from the header line alone: captions hold commas and semicolons, column names do not
    header = text.splitlines()[0]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else max(",\t;|", key=header.count)
    if header.count(delimiter) == 0:
        delimiter = ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return list(reader.fieldnames or []), list(reader)


def _read_parquet(path: Path, columns: tuple[str | None, str | None]) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"Reading the parquet table {path} needs pyarrow, which is not installed: pip install "
                          "pyarrow (or save the table as CSV: path and caption columns).") from None
    try:
        names = list(pq.read_schema(path).names)
        path_col = _pick_column(names, columns[0], PATH_COLUMNS, "image path", "--path-column", path)
        caption_col = _pick_column(names, columns[1], CAPTION_COLUMNS, "caption", "--caption-column", path)
        rows = pq.read_table(path, columns=[path_col, caption_col]).to_pylist()
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid...) for a file that is not parquet
        raise SourceError(f"Cannot read the parquet table {path}: {type(e).__name__}: {e}.") from e
    return [path_col, caption_col], rows


def caption_table_source(table: Path, *, images: Path | None = None, path_column: str | None = None,
                         caption_column: str | None = None, seed: int = 0, resize: int | None = None) -> Source:
    """A CSV/TSV or parquet table of (image path, caption) rows; paths relative to `images` (default: its folder)."""
    if table.suffix.lower() == ".parquet":
        names, rows = _read_parquet(table, (path_column, caption_column))
    else:
        names, rows = _read_csv(table)
    path_col = _pick_column(names, path_column, PATH_COLUMNS, "image path", "--path-column", table)
    caption_col = _pick_column(names, caption_column, CAPTION_COLUMNS, "caption", "--caption-column", table)
    if not rows:
        raise SourceError(f"The table {table} has a header but no rows.")
    folder = images if images is not None else table.parent
    if not folder.is_dir():
        raise SourceError(f"The image folder {folder} for the table {table} does not exist; pass --images DIR (the "
                          "folder its relative paths start from).")
    first = str(rows[0].get(path_col) or "")
    if _URL.match(first):
        raise SourceError(f"The column {path_col!r} of {table} holds URLs ({first[:60]}...), not files. "
                          f"{_DOWNLOAD_FIRST}")
    records = list(enumerate(rows, start=2))  # row numbers as a spreadsheet shows them (the header is row 1)
    random.Random(seed).shuffle(records)

    def samples() -> Iterator[Sample | Skipped]:
        for number, row in records:
            where = f"{table.name} row {number}"
            raw_path, raw_caption = row.get(path_col), row.get(caption_col)
            if raw_path is None or not str(raw_path).strip():
                yield Skipped(where, f"no image path in column {path_col!r}")
                continue
            caption = str(raw_caption).strip() if raw_caption is not None else ""
            if not caption:
                yield Skipped(f"{where} ({raw_path})", "the caption is empty")
                continue
            image = Path(str(raw_path).strip()).expanduser()
            image = image if image.is_absolute() else folder / image
            yield _captioned(image, caption, resize, f"{where} ({image})")

    meta = {"kind": "captioned", "source": f"{table.resolve()} (columns {path_col!r}, {caption_col!r})"}
    return Source(meta, samples(), total=len(records))


# ----------------------------------------------------------------------------------------------- tar shards


def _tar_urls(folder: str) -> tuple[Any, str, list[str]]:
    """(filesystem, folder path on it, names of its .tar files in sorted order); any fsspec URL."""
    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{root}/*.tar"))
    return fs, root, names


def is_shard_folder(folder: Path) -> bool:
    """A folder holding ``*.tar`` shards (img2dataset's output, or any webdataset folder)."""
    return any(p.suffix == ".tar" and p.is_file() for p in folder.iterdir())


def _shard_samples(url: str, on_skip: Any) -> Iterator[dict[str, Any]]:
    from data_pipeline.shards import ShardInfo, ShardReader  # imports webdataset (and torch): only when used

    yield from ShardReader(required=("image", "txt")).samples(ShardInfo(url, 0), on_skip)


def tar_caption_source(folder: Path, *, resize: int | None = None) -> Source:
    """Rewrite captioned tar shards (img2dataset's webdataset layout): each sample's image and ``txt`` caption, in
    the shards' own order (their samples cannot be shuffled without reading them all into memory)."""
    fs, root, names = _tar_urls(str(folder))
    if not names:
        raise SourceError(f"The folder {folder} holds no .tar shards.")

    def samples() -> Iterator[Sample | Skipped]:
        captioned = 0
        for name in names:
            bad: list[Skipped] = []

            def on_skip(reason: str, key: str | None, url: str, detail: str, count: int, name: str = name) -> None:
                bad.append(Skipped(f"{name}/{key}" if key else f"{name} ({count} samples)", f"{reason}: {detail}"))

            for raw in _shard_samples(fs.unstrip_protocol(f"{root}/{name}"), on_skip):
                captioned += 1
                where = f"{name}/{raw['__key__']}"
                image = next(v for k, v in raw.items() if k in _image_suffixes())
                try:
                    caption = read_caption(raw["txt"])
                    img = load_image(image, resize)
                except (ValueError, UnreadableImage) as e:
                    yield Skipped(where, str(e))
                    continue
                yield Sample(img.data, img.ext, txt=caption)
            yield from bad
        if not captioned:
            raise SourceError(f"No sample in the {len(names)} tar shards of {folder} has a caption (a .txt member "
                              "beside its image). A folder of tars is read as image-text shards (img2dataset's); "
                              "other shards need no rewriting: jobs read them as they are.")

    meta = {"kind": "captioned", "source": f"{folder.resolve()} ({len(names)} tar shards, rewritten in order)"}
    return Source(meta, samples(), total=None)


def _image_suffixes() -> frozenset[str]:
    from data_pipeline.shards import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def _img2dataset_stats(fs: Any, root: str) -> dict[str, int] | None:
    """img2dataset's per-shard ``NNNNN_stats.json`` summed: how many URLs were tried and how many downloaded."""
    totals: dict[str, int] = {}
    for path in sorted(fs.glob(f"{root}/*_stats.json")):
        try:
            with fs.open(path, "r") as f:
                stats = json.load(f)
        except (OSError, ValueError):
            continue
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            if isinstance(stats.get(key), int):
                totals[key] = totals.get(key, 0) + stats[key]
    return totals or None


def index_caption_shards(folder: str) -> dict[str, Any]:
    """Write ``index.json`` beside existing captioned tar shards (img2dataset's output) and return it.

    Every shard is read once: its sample count is the number of keys it holds (as the stream counts a folder
    without an index; bad samples included, so the stream skips and counts them when it meets them), and every
    caption goes into ``metadata.captions``. Samples without an image or caption are listed in ``metadata.skipped``
    (they stay in the tars; the stream skips them with their reason). Nothing is rewritten.

    Raises:
        SourceError: no tar shards, or no caption in any of them.
    """
    fs, root, names = _tar_urls(folder)
    if not names:
        raise SourceError(f"The folder {folder} holds no .tar shards to index; --index-only indexes a folder of "
                          "captioned tar shards (img2dataset's --output_format webdataset).")
    captions = CaptionStats()
    shards, skipped = [], []
    for name in names:
        count = 0

        def on_skip(reason: str, key: str | None, url: str, detail: str, n: int, name: str = name) -> None:
            nonlocal count
            count += 1 if key is not None else 0
            skipped.append(f"{name}/{key}: {reason}" if key else f"{name}: {reason} ({n} samples; {detail})")

        for raw in _shard_samples(fs.unstrip_protocol(f"{root}/{name}"), on_skip):
            count += 1
            try:
                captions.add(read_caption(raw["txt"]))
            except ValueError as e:  # an empty caption reaches the task, which decides; listed here
                skipped.append(f"{name}/{raw['__key__']}: {e}")
        shards.append({"url": name, "samples": count, "bytes": fs.size(f"{root}/{name}")})
    if captions.count == 0:
        raise SourceError(f"No sample in the {len(names)} tar shards of {folder} has a caption (a UTF-8 .txt member "
                          "beside its image); --index-only indexes image-text shards. Other shards are read without "
                          "an index (the stream counts them).")
    metadata: dict[str, Any] = {
        "kind": "captioned", "source": f"{folder} ({len(names)} tar shards indexed in place)",
        "captions": captions.summary(), "skipped": {"count": len(skipped), "paths": skipped}}
    stats = _img2dataset_stats(fs, root)
    if stats:
        metadata["img2dataset"] = stats
    index = {"format": "webdataset", "version": 1, "num_samples": sum(s["samples"] for s in shards),
             "num_bytes": sum(s["bytes"] for s in shards), "shards": shards, "metadata": metadata}
    if fs.exists(f"{root}/{INDEX_NAME}"):
        log.warning("%s already has an %s; it is replaced", folder, INDEX_NAME)
    with fs.open(f"{root}/{INDEX_NAME}", "w") as f:
        json.dump(index, f, indent=1)
    return index
