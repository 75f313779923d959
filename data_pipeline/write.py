"""Write image datasets as WebDataset tar shards, with an ``index.json``, to any fsspec URL.

    python -m data_pipeline.write SOURCE OUT_URL [--maxcount N] [--maxsize BYTES] [--seed S]
                                  [--resize SHORT_SIDE] [--prefix train] [--images DIR] [--unlabelled]
                                  [--path-column COL] [--caption-column COL]
    python -m data_pipeline.write --index-only SHARD_DIR

SOURCE is one of:

* an ImageFolder directory: one sub-folder per class, classes numbered in sorted order (``cls`` member);
* a COCO instances ``.json`` (images under ``--images DIR``, default: the json's folder): each sample carries
  its boxes, category ids, image id and size in its ``json`` member (COCO xywh, pixels of the stored image);
* a folder of unlabelled images (no sub-folders, or any folder with ``--unlabelled``);
* image-text (``kind: "captioned"``, the caption in each sample's ``txt`` member; data_pipeline.captions): a folder
  where images have a same-stem ``.txt`` caption beside them (searched recursively, before the two readings
  above); a ``.csv`` / ``.tsv`` / ``.parquet`` table of (path, caption) rows (``--path-column``,
  ``--caption-column``; paths relative to the table's folder or ``--images``; parquet needs pyarrow); a folder of
  captioned ``.tar`` shards (img2dataset's output), re-written in order;
* ``embedded:NAME``: one of the datasets built from data that ships inside packages (data_pipeline.embedded).

``--index-only SHARD_DIR`` writes no shards: it reads captioned tar shards where they are (img2dataset's
``--output_format webdataset`` folder: ``00000.tar`` with ``.jpg`` + ``.txt`` + ``.json`` members) and writes an
``index.json`` beside them (sample counts, caption statistics), so jobs stream the tars as they are.

The samples, sources and the writer itself live in data_pipeline.shard_writer (layout, pre-shuffling, exact shard
sizes); this module recognises SOURCE and is the command. Exit status: 0 written; 2 for what the command or its
inputs must fix (a missing, unreadable or empty source, an unknown embedded name or its missing package, a
destination that cannot be written: read-only, under a file, an http(s) URL, an unknown protocol), each in one
paragraph naming the path or URL; 1 when writing fails at run time (a network or disk error part-way).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from pathlib import Path

import fsspec

from data_pipeline import captions, embedded
from data_pipeline.shard_writer import (  # noqa: F401 - the names callers import from data_pipeline.write
    DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE, INDEX_NAME, LoadedImage, Sample, Skipped, Source, SourceError, UnreadableImage,
    WriteResult, coco_file_source, coco_source, encode_image, format_caption_stats, imagefolder_source, load_image,
    resize_samples, unlabelled_source, write_shards)
from data_pipeline.shard_writer import _is_hidden

log = logging.getLogger(__name__)


class DestinationError(Exception):
    """OUT_URL cannot be written (read-only, under a file, an http URL...); the CLI reports it and exits with 2."""


def open_source(
    source: str,
    *,
    images: str | None = None,
    seed: int = 0,
    resize: int | None = None,
    unlabelled: bool = False,
    path_column: str | None = None,
    caption_column: str | None = None,
) -> Source:
    """Recognise SOURCE (embedded name, COCO json, caption table, folder of image + caption pairs, folder of
    captioned tar shards, ImageFolder, folder of images) and open it.

    Raises:
        SourceError: missing, unreadable, empty or unrecognised source (the message names it and the fix).
    """
    if source.startswith(embedded.PREFIX):
        src = embedded.source(source.removeprefix(embedded.PREFIX), seed=seed)
        if resize is not None:
            src = Source(src.metadata, resize_samples(src.samples, resize), src.total)
        return src
    path = Path(source).expanduser()
    try:
        if not path.exists():
            raise SourceError(
                f"The source {source!r} does not exist. SOURCE must be an ImageFolder directory (one sub-folder of "
                "images per class), a folder of unlabelled images, a COCO instances .json (images under --images "
                "DIR), a folder of image + .txt caption pairs, a .csv/.tsv/.parquet table of (path, caption) rows, a "
                f"folder of captioned .tar shards, or embedded:NAME with NAME one of {', '.join(embedded.REGISTRY)}.")
        image_dir = Path(images).expanduser() if images else None
        if path.is_file():
            if path.suffix.lower() in captions.TABLE_SUFFIXES:
                return captions.caption_table_source(path, images=image_dir, path_column=path_column,
                                                     caption_column=caption_column, seed=seed, resize=resize)
            if path.suffix.lower() != ".json":
                raise SourceError(f"The source {source!r} is a file but neither a COCO .json nor a caption table "
                                  "(.csv, .tsv, .parquet); pass a folder of images, an ImageFolder directory, a COCO "
                                  "instances json or a table of (path, caption) rows.")
            return coco_file_source(path, image_dir, seed=seed, resize=resize)
        if not path.is_dir():
            raise SourceError(f"The source {source!r} is neither a folder nor a file (a device, socket or pipe?); "
                              "pass a folder of images, an ImageFolder directory or a COCO instances json.")
        if captions.is_shard_folder(path):
            return captions.tar_caption_source(path, resize=resize)
        if not unlabelled and captions.has_caption_pairs(path):
            return captions.caption_folder_source(path, seed=seed, resize=resize)
        has_subdirs = any(p.is_dir() and not _is_hidden(p.name) for p in path.iterdir())
        if unlabelled or not has_subdirs:
            return unlabelled_source(path, seed=seed, resize=resize)
        return imagefolder_source(path, seed=seed, resize=resize)
    except OSError as e:  # a folder that cannot be listed (permissions), a path through a file...
        raise SourceError(f"Cannot read the source {source!r}: {e.strerror or e} ({type(e).__name__}); check that "
                          "the path is right and readable by this user.") from e


def check_destination(out_url: str) -> None:
    """Refuse, before any source is read, an OUT_URL that cannot hold shards (see DestinationError).

    Checked: the URL's protocol is known and its fsspec backend installed; http(s) (read-only in fsspec); and for
    local paths, that the nearest existing folder on the way is a folder, writable, and not on a read-only mount.
    Remote stores (s3://, gs://...) are only checked when written: their permissions are the server's.
    """
    try:
        fs, path = fsspec.core.url_to_fs(out_url)
    except ImportError as e:  # fsspec names the package to install ("Install s3fs to access S3")
        raise DestinationError(f"Cannot write to {out_url!r}: {e}") from e
    except ValueError as e:  # "Protocol not known: foo"
        raise DestinationError(f"Cannot write to {out_url!r}: {e}. OUT_URL is a local folder or an fsspec URL "
                               "(file://, s3://, gs://, memory://...).") from e
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"http", "https"}:
        raise DestinationError(f"Cannot write to {out_url!r}: http(s) URLs are read-only. Write the shards to a local "
                               "folder or an object store (s3://, gs://...) and serve that folder over http instead.")
    if not protocols & {"file", "local"}:
        return
    existing, missing = Path(path), []
    while not existing.exists() and existing != existing.parent:
        existing, missing = existing.parent, [existing, *missing]
    if not existing.is_dir():
        raise DestinationError(f"Cannot write to {out_url!r}: {existing} is a file, not a folder; OUT_URL must be a "
                               "folder (new or existing) that is not inside a file.")
    if not os.access(existing, os.W_OK):
        raise DestinationError(f"Cannot write to {out_url!r}: {existing} is not writable by this user (read-only "
                               "folder or mount); choose another OUT_URL or fix its permissions.")
    if missing:  # /proc, /sys and the like pass the checks above: create the folders once, and remove them again
        try:
            os.makedirs(missing[-1])
        except OSError as e:
            raise _destination_error(out_url, e) or DestinationError(f"Cannot create {out_url!r}: {e}") from e
        for folder in reversed(missing):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _destination_error(out_url: str, error: OSError) -> DestinationError | None:
    """A DestinationError for the OSErrors a user fixes by choosing another OUT_URL, None for run-time ones."""
    fixable = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOENT}
    if error.errno in fixable or isinstance(error, (PermissionError, NotADirectoryError, IsADirectoryError)):
        return DestinationError(f"Cannot write to {out_url!r}: {error.strerror or error}"
                                f"{f' ({error.filename})' if error.filename else ''}; choose a folder this user can "
                                "create and write (not under /proc, /sys, a file or a read-only mount).")
    return None


# ----------------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))  # accepts 1e9
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.write", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="ImageFolder dir, folder of images, COCO instances .json, folder of image + .txt "
                   "pairs, .csv/.tsv/.parquet caption table, folder of captioned .tar shards, or embedded:NAME")
    p.add_argument("out_url", nargs="?", default=None,
                   help="destination folder: local path or fsspec URL (file://, s3://, memory://…)")
    p.add_argument("--maxcount", type=_positive_int, default=None,
                   help=f"most samples per shard (default {DEFAULT_MAXCOUNT}; embedded datasets: their own)")
    p.add_argument("--maxsize", type=_positive_int, default=DEFAULT_MAXSIZE,
                   help="most bytes per shard file, e.g. 1e9 (default 1e9)")
    p.add_argument("--seed", type=int, default=0, help="pre-shuffle seed (default 0)")
    p.add_argument("--resize", type=_positive_int, default=None, metavar="SHORT_SIDE",
                   help="downscale images whose shorter side is longer than this (re-encodes them)")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: train, or the embedded split's)")
    p.add_argument("--images", default=None, metavar="DIR", help="image folder of a COCO json (default: its folder)")
    p.add_argument("--unlabelled", action="store_true",
                   help="treat a directory as unlabelled images even if it has sub-folders")
    p.add_argument("--path-column", default=None, metavar="COL",
                   help=f"image path column of a caption table (default: the first of {', '.join(captions.PATH_COLUMNS)})")
    p.add_argument("--caption-column", default=None, metavar="COL",
                   help=f"caption column of a caption table (default: the first of {', '.join(captions.CAPTION_COLUMNS)})")
    p.add_argument("--index-only", action="store_true",
                   help="write index.json beside the captioned .tar shards in SOURCE (img2dataset's output) instead "
                   "of writing shards; no OUT_URL")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (module docstring: 0 written, 2 fix the command or the
    inputs, 1 failed at run time)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.index_only and args.out_url is not None:
        parser.error(f"--index-only writes index.json into SOURCE itself; drop OUT_URL ({args.out_url})")
    if not args.index_only and args.out_url is None:
        parser.error("OUT_URL is required (or --index-only, to index captioned shards where they are)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.index_only:
        return _index_only(args.source)
    maxcount, prefix = args.maxcount, args.prefix
    try:
        check_destination(args.out_url)
        src = open_source(args.source, images=args.images, seed=args.seed, resize=args.resize,
                          unlabelled=args.unlabelled, path_column=args.path_column,
                          caption_column=args.caption_column)
        if args.source.startswith(embedded.PREFIX):
            ds = embedded.REGISTRY[args.source.removeprefix(embedded.PREFIX)]
            maxcount = maxcount or embedded.maxcount_for(ds, src.total)
            prefix = prefix or ds.prefix
        metadata = {**src.metadata, "seed": args.seed, "resize": args.resize}
        try:
            result = write_shards(src.samples, args.out_url, metadata, maxcount=maxcount or DEFAULT_MAXCOUNT,
                                  maxsize=args.maxsize, prefix=prefix or "train", total=src.total,
                                  progress=not args.quiet)
        except NotImplementedError as e:  # an fsspec filesystem without writing (zip://, github://...)
            raise DestinationError(f"Cannot write to {args.out_url!r}: its fsspec filesystem cannot write files; "
                                   "write to a local folder or an object store (s3://, gs://...).") from e
        except OSError as e:
            raise _destination_error(args.out_url, e) or e
    except (SourceError, DestinationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a network or disk failure part-way: the command itself was right
        print(f"error: writing the shards to {args.out_url!r} failed: {type(e).__name__}: {e}. Nothing is complete "
              f"there until {INDEX_NAME} is written; run the command again.", file=sys.stderr)
        return 1
    index = result.index
    print(f"wrote {index['num_samples']} samples in {len(index['shards'])} shards "
          f"({index['num_bytes'] / 1e6:.1f} MB) to {args.out_url} (index: {INDEX_NAME})")
    if "captions" in index["metadata"]:
        print(f"captions: {format_caption_stats(index['metadata']['captions'])}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable files:")
        for s in result.skipped[:20]:
            print(f"  {s.path}: {s.reason}")
        if len(result.skipped) > 20:
            print(f"  … and {len(result.skipped) - 20} more (all listed in {INDEX_NAME} metadata.skipped)")
    return 0


def _index_only(folder: str) -> int:
    """--index-only: index.json beside existing captioned shards (data_pipeline.captions.index_caption_shards)."""
    from data_pipeline.shards import DatasetInputError

    try:
        if check_local_folder(folder):
            check_destination(folder)
        index = captions.index_caption_shards(folder)
    except (SourceError, DestinationError, DatasetInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: indexing the shards in {folder!r} failed: {type(e).__name__}: {e}; run the command again.",
              file=sys.stderr)
        return 1
    meta = index["metadata"]
    print(f"indexed {index['num_samples']} samples in {len(index['shards'])} shards "
          f"({index['num_bytes'] / 1e6:.1f} MB) in {folder} (wrote {INDEX_NAME})")
    print(f"captions: {format_caption_stats(meta['captions'])}")
    if meta["skipped"]["count"]:
        print(f"{meta['skipped']['count']} samples without a usable image or caption (the stream skips them; listed in "
              f"{INDEX_NAME} metadata.skipped): {'; '.join(meta['skipped']['paths'][:5])}")
    return 0


def check_local_folder(folder: str) -> bool:
    """True for a local SOURCE of --index-only (then checked as a destination too); SourceError when it is missing."""
    fs, path = fsspec.core.url_to_fs(folder)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"file", "local"}:
        return False
    if not Path(path).is_dir():
        raise SourceError(f"--index-only needs the folder that holds the .tar shards; {folder!r} is not a folder.")
    return True


if __name__ == "__main__":
    # Run the main of the imported module, not of this __main__ copy, so that there is one data_pipeline.write
    # (its classes included) however the command is started.
    from data_pipeline.write import main as _main

    sys.exit(_main())
