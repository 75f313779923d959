"""Shared test fixtures: real WebDataset tar shards (written with webdataset's TarWriter) and a loopback HTTP server."""

import functools
import http.server
import io
import json
import pickle
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset
from PIL import Image


@dataclass
class ShardedDataset:
    """A dataset written by `ShardFactory`: a folder of `PREFIX-NNNNNN.tar` shards (+ index.json unless disabled)."""

    root: Path
    shard_paths: list[Path]
    sizes: list[int]  # samples per shard, as written
    keys: list[str]  # every sample key, in writing order
    labels: dict[str, int] = field(default_factory=dict)  # key -> cls, for samples that have one

    @property
    def url(self) -> str:
        return str(self.root)

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)


class ShardFactory:
    """Writes small real shards into a temporary folder. Sample dicts map a member suffix to its content:
    bytes as-is, int -> ASCII integer (for "cls"), dict/list -> JSON, str -> UTF-8."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def image_bytes(fmt: str = "png", size: int = 8, value: int = 0) -> bytes:
        """A tiny RGB image encoded as `fmt` ("png", "jpeg", ...), its pixels derived from `value`."""
        rng = np.random.default_rng(value)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt.upper())
        return buffer.getvalue()

    def sample(self, key: str, label: int | None = None, fmt: str = "png", size: int = 8) -> dict[str, Any]:
        """A well-formed sample: one image member (suffix "jpg" for JPEG) and, if given, its cls label."""
        suffix = "jpg" if fmt in ("jpeg", "jpg") else fmt
        sample: dict[str, Any] = {"__key__": key, suffix: self.image_bytes("jpeg" if suffix == "jpg" else fmt, size,
                                                                          value=int(key) if key.isdigit() else 0)}
        if label is not None:
            sample["cls"] = label
        return sample

    @staticmethod
    def _encode(value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, int):
            return str(value).encode("ascii")
        if isinstance(value, (dict, list)):
            return json.dumps(value).encode("utf-8")
        return str(value).encode("utf-8")

    def write(self, shards: list[list[dict[str, Any]]], name: str = "data", prefix: str = "train",
              index: bool = True, metadata: dict[str, Any] | None = None) -> ShardedDataset:
        """Write one tar per inner list into `root/name`, plus index.json in the contract format when `index`."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=False)
        paths, keys, labels, entries = [], [], {}, []
        for number, samples in enumerate(shards):
            path = folder / f"{prefix}-{number:06d}.tar"
            with webdataset.TarWriter(str(path), encoder=False) as writer:
                for sample in samples:
                    writer.write({k: (v if k == "__key__" else self._encode(v)) for k, v in sample.items()})
                    keys.append(sample["__key__"])
                    if isinstance(sample.get("cls"), int):
                        labels[sample["__key__"]] = int(sample["cls"])
            paths.append(path)
            entries.append({"url": path.name, "samples": len(samples), "bytes": path.stat().st_size})
        if index:
            document = {"format": "webdataset", "version": 1,
                        "num_samples": sum(entry["samples"] for entry in entries),
                        "num_bytes": sum(entry["bytes"] for entry in entries),
                        "shards": entries,
                        "metadata": metadata if metadata is not None else {"kind": "unlabelled", "source": "test"}}
            (folder / "index.json").write_text(json.dumps(document))
        return ShardedDataset(folder, paths, [len(samples) for samples in shards], keys, labels)

    def classification(self, sizes: tuple[int, ...] = (5, 3, 7, 4, 6, 2), name: str = "cls", index: bool = True,
                       num_classes: int = 3) -> ShardedDataset:
        """Uneven shards of labelled samples, PNG and JPEG alternating; keys "000000", "000001", ... in order."""
        shards, number = [], 0
        for size in sizes:
            shard = []
            for _ in range(size):
                shard.append(self.sample(f"{number:06d}", label=number % num_classes,
                                         fmt="png" if number % 2 == 0 else "jpeg"))
                number += 1
            shards.append(shard)
        metadata = {"kind": "classification", "source": "test", "classes": [f"c{i}" for i in range(num_classes)]}
        return self.write(shards, name=name, index=index, metadata=metadata)


@pytest.fixture
def shard_factory(tmp_path: Path) -> ShardFactory:
    """Writes real tar shards under this test's tmp_path."""
    return ShardFactory(tmp_path)


@pytest.fixture
def uneven_dataset(shard_factory: ShardFactory) -> ShardedDataset:
    """27 labelled 8x8 images (PNG/JPEG) in 6 shards of 5, 3, 7, 4, 6 and 2 samples, with index.json."""
    return shard_factory.classification()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    """Serves tmp_path over HTTP on loopback (ThreadingHTTPServer in a thread); yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class BadDataset(ShardedDataset):
    """A dataset with one sample of each kind of bad data among good ones (read with required=("image", "cls"))."""

    good_keys: list[str] = field(default_factory=list)
    bad_keys: dict[str, str] = field(default_factory=dict)  # key -> skip reason, for bad samples that have a key
    expected_skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, truncated tar included
    pickle_marker: Path | None = None  # unpickling the .pyd member would create this file


class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def bad_dataset(shard_factory: ShardFactory, tmp_path: Path) -> BadDataset:
    """4 shards: 11 good samples ("000000".."000012", see good_keys) and every kind of bad sample: corrupt and
    truncated images, missing image, missing label, unexpected member, pickle member, bad label, two images,
    bad json, and a tar cut in the middle of its third sample (index.json still lists all 4 of its samples)."""
    factory = shard_factory
    png = factory.image_bytes("png")
    marker = tmp_path / "PICKLE_WAS_LOADED"
    bad = {
        "corrupt-jpeg": ({"jpg": b"this is not a jpeg", "cls": 1}, "corrupt_image"),
        "truncated-png": ({"png": png[: len(png) // 2], "cls": 1}, "corrupt_image"),
        "no-image": ({"cls": 1}, "missing_image"),
        "no-label": ({"png": png}, "missing_label"),
        "npy-member": ({"png": png, "cls": 1, "npy": b"\x93NUMPY"}, "unexpected_member"),
        "pickle-member": ({"png": png, "cls": 1, "pyd": pickle.dumps(_CreatesFileWhenUnpickled(marker))},
                          "pickle_member"),
        "bad-label": ({"png": png, "cls": b"abc"}, "corrupt_label"),
        "two-images": ({"png": png, "jpg": factory.image_bytes("jpeg"), "cls": 1}, "multiple_images"),
        "bad-json": ({"png": png, "cls": 1, "json": b"{not json"}, "corrupt_json"),
    }
    first = [factory.sample("000000", 0), factory.sample("000001", 1)]
    first += [{"__key__": key, **members} for key, (members, _) in bad.items()]
    shards = [first,
              [factory.sample(f"{n:06d}", n % 3, fmt="jpeg") for n in range(2, 6)],
              [factory.sample(f"{n:06d}", n % 3) for n in range(6, 10)],
              [factory.sample(f"{n:06d}", n % 3) for n in range(10, 13)]]
    dataset = factory.write(shards, name="bad")
    truncated = dataset.shard_paths[2]
    with tarfile.open(truncated) as archive:
        member = archive.getmember("000008.png")
    truncated.write_bytes(truncated.read_bytes()[: member.offset_data + member.size // 2])

    expected: dict[str, int] = {}
    for _, reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["truncated_tar"] = 2  # "000008" (interrupted) and "000009" (listed in index.json, not in the tar)
    good = [f"{n:06d}" for n in range(13) if n not in (8, 9)]
    return BadDataset(dataset.root, dataset.shard_paths, dataset.sizes, dataset.keys, dataset.labels,
                      good_keys=good, bad_keys={key: reason for key, (_, reason) in bad.items()},
                      expected_skipped=expected, pickle_marker=marker)
