"""Data stream throughput: images/s of ``build_stream`` (decode + MAE transform, 224 px) against two references.

    python bench/data_throughput.py [--images 512] [--long-side 500] [--workers 1 2] [--epochs 2] [--repeats 3]
                                    [--uint8] [--out FILE]

On the same JPEGs, in one run:

* stream: ``data_pipeline.stream.build_stream`` over shards written by ``data_pipeline.write`` (epoch mode, training
  shuffles on), map_fn = ``MAETrainTransform(224)``;
* ImageFolder: torchvision ``ImageFolder`` + ``DataLoader`` (shuffle, same transform, workers and batch size);
* floor: one process (one torch thread, like a DataLoader worker) that only decodes in-memory JPEG bytes with PIL
  and applies the same transform, with no file or tar reading, no batching and no inter-process transfer. A
  loader with W workers can at best reach W x floor.

The images are the bundled photographs (data_pipeline.embedded.load_photos), cut into random crops re-encoded as
JPEG (quality 90) at ImageNet-like size (500x375 or 375x500). Each loader runs one untimed warm-up epoch (page
cache, imports), then `--epochs` timed epochs; worker start-up is inside the timed epochs for both loaders (neither
keeps workers alive across epochs). Only real samples count (the stream's padding repeats are excluded).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder

from data_pipeline import embedded
from data_pipeline.stream import build_stream
from data_pipeline.transforms import MAETrainTransform
from data_pipeline.write import main as write_main

log = logging.getLogger("bench.data_throughput")


@dataclass
class Measurement:
    """One timed run: images delivered, wall seconds, and CPU seconds of this process and its finished workers."""

    loader: str
    workers: int
    images: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_rate(self) -> float:
        """Images per CPU-second: the loader's efficiency, insensitive to other processes sharing the cores."""
        return self.images / self.cpu_seconds


def _cpu_seconds() -> float:
    """User + system CPU time of this process plus its waited-for children (the DataLoader workers, which are
    joined at the end of every epoch since neither loader keeps them alive)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class _Timer:
    def __enter__(self) -> "_Timer":
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu_seconds() - self.cpu


class _ImageOnly:
    """ImageFolder transform: PIL image -> the MAE transform's image tensor (picklable for workers)."""

    def __init__(self, transform: MAETrainTransform) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform({"image": image})["image"]


def make_images(n: int, long_side: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`n` (photo name, JPEG bytes) at long_side x 3/4 long_side, a quarter of them portrait."""
    photos = embedded.load_photos()
    names = list(photos)
    rng = np.random.default_rng(seed)
    short = round(long_side * 3 / 4)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        photo = photos[name]
        h, w = photo.shape[:2]
        portrait = i % 4 == 3
        # the largest crop of the output's aspect ratio, times a random 0.5..1 linear scale
        aspect = short / long_side if not portrait else long_side / short  # width / height
        ch = min(h, w / aspect) * rng.uniform(0.5, 1.0)
        cw = ch * aspect
        x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        size = (short, long_side) if portrait else (long_side, short)
        crop = Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append((name, buf.getvalue()))
    return out


def prepare(images: list[tuple[str, bytes]], workdir: Path, shards: int) -> tuple[Path, Path]:
    """Write the images as an ImageFolder, then shard that folder with data_pipeline.write."""
    folder = workdir / "imagefolder"
    for i, (name, data) in enumerate(images):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{i:06d}.jpg").write_bytes(data)
    shard_dir = workdir / "shards"
    maxcount = -(-len(images) // shards)
    if write_main([str(folder), str(shard_dir), "--maxcount", str(maxcount), "--quiet"]) != 0:
        raise RuntimeError("writing the benchmark shards failed")
    return folder, shard_dir


def measure_floor(images: list[tuple[str, bytes]], transform: MAETrainTransform, epochs: int) -> Measurement:
    """Decode + transform in a tight single-thread loop over in-memory bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        for _, data in images[:32]:  # warm-up
            transform({"image": Image.open(io.BytesIO(data)).convert("RGB")})
        with _Timer() as t:
            for _ in range(epochs):
                for _, data in images:
                    transform({"image": Image.open(io.BytesIO(data)).convert("RGB")})
        return Measurement("floor", 1, epochs * len(images), t.wall, t.cpu)
    finally:
        torch.set_num_threads(threads)


def measure_floor_batched(images: list[tuple[str, bytes]], transform: MAETrainTransform, epochs: int,
                          batch_size: int) -> Measurement:
    """The floor plus batching (default_collate every `batch_size`): what any batched loader pays at the least."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _Timer() as t:
            for _ in range(epochs):
                batch = []
                for _, data in images:
                    batch.append(transform({"image": Image.open(io.BytesIO(data)).convert("RGB")}))
                    if len(batch) == batch_size:
                        default_collate(batch)
                        batch = []
        return Measurement("floor + batching", 1, epochs * len(images), t.wall, t.cpu)
    finally:
        torch.set_num_threads(threads)


def measure_decode_only(images: list[tuple[str, bytes]]) -> Measurement:
    """PIL decode alone (context for the floor: how much of it is decoding)."""
    with _Timer() as t:
        for _, data in images:
            Image.open(io.BytesIO(data)).convert("RGB")
    return Measurement("decode only", 1, len(images), t.wall, t.cpu)


def measure_stream(shard_dir: Path, transform: MAETrainTransform, workers: int, batch_size: int,
                   epochs: int) -> Measurement:
    stream = build_stream(str(shard_dir), map_fn=transform, batch_size=batch_size, num_workers=workers, mode="epoch",
                          train=True, seed=0)
    stream.set_epoch(0)
    for _ in stream:  # warm-up epoch
        pass
    count = 0
    with _Timer() as t:
        for epoch in range(1, epochs + 1):
            stream.set_epoch(epoch)
            for batch in stream:
                count += int((~batch["is_padding"]).sum())
    return Measurement("stream", workers, count, t.wall, t.cpu)


def measure_imagefolder(folder: Path, transform: MAETrainTransform, workers: int, batch_size: int,
                        epochs: int) -> Measurement:
    loader = DataLoader(ImageFolder(str(folder), transform=_ImageOnly(transform)), batch_size=batch_size,
                        shuffle=True, num_workers=workers, drop_last=False)
    for _ in loader:  # warm-up epoch
        pass
    count = 0
    with _Timer() as t:
        for _ in range(epochs):
            for images, _labels in loader:
                count += images.shape[0]
    return Measurement("ImageFolder", workers, count, t.wall, t.cpu)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Summary:
    """Repeated runs of one configuration: best wall-clock rate (least disturbed) and median CPU efficiency."""

    loader: str
    workers: int
    runs: list[Measurement]

    @property
    def rate(self) -> float:
        return max(m.rate for m in self.runs)

    @property
    def cpu_rate(self) -> float:
        return statistics.median(m.cpu_rate for m in self.runs)


def table(floor: Summary, rows: list[Summary]) -> str:
    """Markdown table: throughput, per-worker ratio to the floor, ratio to ImageFolder, CPU efficiency."""
    imagefolder = {r.workers: r for r in rows if r.loader == "ImageFolder"}
    lines = ["| loader | workers | img/s | img/s per worker | per worker / floor | / ImageFolder "
             "| img per CPU-s | CPU efficiency / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| floor: decode + transform, 1 process | 1 | {floor.rate:.1f} | {floor.rate:.1f} | 1.00 | "
             f"| {floor.cpu_rate:.1f} | 1.00 |"]
    for r in rows:
        per_worker = r.rate / r.workers
        vs_if = f"{r.rate / imagefolder[r.workers].rate:.2f}" if r.loader == "stream" else ""
        lines.append(f"| {r.loader} | {r.workers} | {r.rate:.1f} | {per_worker:.1f} | {per_worker / floor.rate:.2f} "
                     f"| {vs_if} | {r.cpu_rate:.1f} | {r.cpu_rate / floor.cpu_rate:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="number of distinct JPEGs (default 512)")
    p.add_argument("--long-side", type=int, default=500, help="JPEG size: long side in pixels (default 500)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers to test (default 1 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run, after one warm-up (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every configuration, interleaved (default 3)")
    p.add_argument("--shards", type=int, default=16, help="shards to write (default 16)")
    p.add_argument("--img-size", type=int, default=224, help="transform output side (default 224)")
    p.add_argument("--uint8", action="store_true",
                   help="MAETrainTransform(normalize=False): uint8 crops, to be normalised on the accelerator")
    p.add_argument("--workdir", default=None, help="where to write the images and shards (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("data_pipeline").setLevel(logging.WARNING)  # one line per stream epoch is noise here

    transform = MAETrainTransform(args.img_size, normalize=not args.uint8)
    load_before = os.getloadavg()[0]
    floor_runs: list[Measurement] = []
    runs: dict[tuple[str, int], list[Measurement]] = {}
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        workdir = Path(args.workdir or tmp)
        images = make_images(args.images, args.long_side)
        mean_kb = sum(len(d) for _, d in images) / len(images) / 1024
        log.info("%d JPEGs, %dx%d, mean %.0f KB", len(images), args.long_side, round(args.long_side * 3 / 4), mean_kb)
        folder, shard_dir = prepare(images, workdir, args.shards)
        decode = measure_decode_only(images)
        # interleaved repeats, so a burst of load from elsewhere does not land on one configuration only
        for r in range(args.repeats):
            floor_runs.append(measure_floor(images, transform, args.epochs))
            log.info("[%d] floor: %.1f img/s", r, floor_runs[-1].rate)
            m = measure_floor_batched(images, transform, args.epochs, args.batch_size)
            runs.setdefault(("floor + batching", 1), []).append(m)
            log.info("[%d] floor + batching: %.1f img/s", r, m.rate)
            for w in args.workers:
                for name, fn, src in (("ImageFolder", measure_imagefolder, folder),
                                      ("stream", measure_stream, shard_dir)):
                    m = fn(src, transform, w, args.batch_size, args.epochs)
                    runs.setdefault((name, w), []).append(m)
                    log.info("[%d] %s, %d workers: %.1f img/s, %.1f img per CPU-s", r, name, w, m.rate, m.cpu_rate)
    floor = Summary("floor", 1, floor_runs)
    order = {"floor + batching": 0, "stream": 1, "ImageFolder": 2}
    rows = [Summary(name, w, ms) for (name, w), ms in sorted(runs.items(), key=lambda kv: (kv[0][1], order[kv[0][0]]))]
    text = table(floor, rows)
    print(text)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/data_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": {"cpu": _cpu_name(), "cores": os.cpu_count(), "load_avg_1m_before": load_before,
                   "load_avg_1m_after": os.getloadavg()[0], "python": platform.python_version(),
                   "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                   "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
        "images": {"count": len(images), "size": [args.long_side, round(args.long_side * 3 / 4)],
                   "mean_bytes": round(mean_kb * 1024), "img_size": args.img_size,
                   "output": "uint8" if args.uint8 else "float32 normalised", "batch_size": args.batch_size,
                   "epochs": args.epochs, "repeats": args.repeats},
        "decode_only": asdict(decode) | {"rate": decode.rate},
        "summary": [{"loader": s.loader, "workers": s.workers, "best_rate": s.rate, "median_cpu_rate": s.cpu_rate,
                     "per_worker_vs_floor": s.rate / s.workers / floor.rate,
                     "cpu_efficiency_vs_floor": s.cpu_rate / floor.cpu_rate} for s in [floor, *rows]],
        "runs": [asdict(m) | {"rate": m.rate, "cpu_rate": m.cpu_rate} for s in [floor, *rows] for m in s.runs],
        "table": text,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
