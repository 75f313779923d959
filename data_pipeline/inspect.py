"""Inspect a sharded dataset: what it holds, and what every rank and worker of a job reads from it.

    python -m data_pipeline.inspect URL [--world-size W] [--workers K] [--epoch E] [--seed S] [--batch-size B]
                                        [--eval] [--keys] [--verify] [--require image,cls] [--json]

Prints the shards, samples, bytes and index.json metadata, then the epoch-mode plan for W ranks x K DataLoader
workers: the shards, samples, batches and padding of each rank and worker, with a warning where they are
unbalanced. `--keys` lists the sample keys each rank and worker reads (in tar order; training reorders them in
its shuffle buffer). `--verify` reads and decodes every sample exactly as a job does and reports the bad ones by
key and reason, and for image-text shards the count and lengths of the captions it read (index.json's
`metadata.captions`, written by data_pipeline.write, is shown for every captioned set). `--json` prints the same report as JSON. The plan comes from `data_pipeline.shards.plan_epoch`,
the function the training stream itself calls, so what this prints is what a job with the same settings reads.

Exit status: 0; 1 when the shards cannot be split for the job (epoch mode), --verify found bad samples, or the
URL could not be read after the retries (network: it may work later); 2 for what the command or the dataset
must fix (a missing or unreadable local path, a folder without shards, a malformed index.json, no samples, an
unknown embedded name, a bad flag), each in one paragraph naming the URL or flag.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from data_pipeline.shard_writer import CaptionStats, SourceError, format_caption_stats
from data_pipeline.shards import (REQUIRABLE, DatasetIndex, DatasetInputError, EpochPlan, ShardInfo, ShardReader,
                                  is_remote, load_index, plan_epoch, redact_credentials)
from data_pipeline.stream import SkipSample, decode_sample

logger = logging.getLogger(__name__)

RANK_IMBALANCE = 1.10  # warn when the busiest rank reads more than this times the samples of the least busy one
WORKER_IMBALANCE = 1.25  # the same between any two workers (the slowest worker sets the epoch's length)
PADDING_FRACTION = 0.10  # warn when padding exceeds this fraction of the samples read


@dataclass
class ShardScan:
    """The keys of one shard in tar order (bad samples included), and the bad samples found."""

    keys: list[str] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)
    captions: CaptionStats = field(default_factory=CaptionStats)


def scan_shard(shard: ShardInfo, reader: ShardReader, decode: bool) -> ShardScan:
    """Read one shard as a job's worker does; with `decode`, also decode every sample (without a map function)."""
    scan = ShardScan()

    def on_skip(reason: str, key: str | None, url: str, detail: str, count: int) -> None:
        if key is not None:
            scan.keys.append(key)
        scan.bad.append({"key": key, "url": url, "reason": reason, "detail": detail, "count": count})

    for sample in reader.samples(shard, on_skip):
        scan.keys.append(sample["__key__"])
        if decode:
            try:
                decoded = decode_sample(sample)
                if "txt" in decoded:
                    scan.captions.add(decoded["txt"])
            except SkipSample as skip:
                scan.bad.append({"key": sample["__key__"], "url": shard.url, "reason": skip.reason,
                                 "detail": skip.detail, "count": 1})
    return scan


def _plan_report(plan: EpochPlan, scans: dict[str, ShardScan] | None) -> dict[str, Any]:
    ranks = []
    for rank in range(plan.world_size):
        workers = []
        for worker in plan.rank_workers(rank):
            entry: dict[str, Any] = {
                "worker": worker.worker, "samples": worker.samples, "batches": worker.batches,
                "padding": worker.capacity - worker.samples,
                "shards": [shard.url for shard in worker.shards]}
            if scans is not None:
                entry["keys"] = [key for shard in worker.shards for key in scans[shard.url].keys]
            workers.append(entry)
        ranks.append({"rank": rank, "samples": plan.rank_samples(rank), "padding": plan.rank_padding(rank),
                      "workers": workers})
    return {"epoch": plan.epoch, "seed": plan.seed, "world_size": plan.world_size, "workers": plan.num_workers,
            "batch_size": plan.batch_size, "shuffle": plan.shuffle, "batches_per_epoch": plan.batches_per_epoch,
            "ranks": ranks}


def _balance_warnings(plan: EpochPlan) -> list[str]:
    warnings = []
    rank_samples = [plan.rank_samples(rank) for rank in range(plan.world_size)]
    if max(rank_samples) > RANK_IMBALANCE * max(1, min(rank_samples)):
        warnings.append(f"ranks are unbalanced: they read {min(rank_samples)} to {max(rank_samples)} samples "
                        f"per epoch (per rank: {rank_samples}); the lighter ranks pad up to the busiest one. "
                        f"More, smaller shards (data_pipeline.write --maxcount) balance better.")
    worker_samples = [worker.samples for worker in plan.workers]
    if max(worker_samples) > WORKER_IMBALANCE * max(1, min(worker_samples)):
        warnings.append(f"workers are unbalanced: they read {min(worker_samples)} to {max(worker_samples)} "
                        f"samples per epoch; the busiest worker sets the epoch's length. More, smaller shards "
                        f"balance better.")
    read = sum(worker_samples)
    padding = sum(plan.rank_padding(rank) for rank in range(plan.world_size))
    if padding > PADDING_FRACTION * read:
        warnings.append(f"{padding} padding samples per epoch ({100 * padding / max(1, read):.0f}% of the "
                        f"{read} read): batch size {plan.batch_size} is large for {plan.num_workers} worker(s) "
                        f"with these few samples each.")
    return warnings


def inspect_dataset(url: str | Sequence[str], *, world_size: int = 1, num_workers: int = 2, epoch: int = 0,
                    seed: int = 0, batch_size: int = 64, train: bool = True, keys: bool = False,
                    verify: bool = False, required: Sequence[str] = ("image",), cache_dir: str | None = None,
                    open_retries: int = 5, retry_backoff_s: float = 1.0) -> dict[str, Any]:
    """Describe a dataset and the epoch-mode plan of a job with these settings, as a JSON-serialisable dict.

    Keys: url, counted (no index.json: samples were counted), shards, samples, bytes, metadata, shard_list,
    plan (None when the shards cannot be split: see plan_error), plan_error, warnings, and with `verify`:
    verify = {"checked", "bad": [{"key", "url", "reason", "detail", "count"}], "by_reason"}.

    Raises:
        DatasetInputError: the URL or the dataset must be fixed (data_pipeline.shards), SourceError: an embedded
        name that does not exist or cannot be built, ShardOpenError (OSError): unreadable after the retries.
    """
    if isinstance(url, str) and url.startswith("embedded:"):
        from data_pipeline import embedded  # lazily, as build_stream does

        url = embedded.resolve(url)
    reader = ShardReader(cache_dir=cache_dir, required=tuple(required), open_retries=open_retries,
                         retry_backoff_s=retry_backoff_s)
    index: DatasetIndex = load_index(url, reader)
    report: dict[str, Any] = {
        "url": index.url, "counted": index.counted, "shards": len(index.shards), "samples": index.num_samples,
        "bytes": index.num_bytes, "metadata": index.metadata,
        "shard_list": [{"url": shard.url, "samples": shard.samples, "bytes": shard.bytes} for shard in index.shards],
        "plan": None, "plan_error": None, "warnings": []}
    scans = None
    if keys or verify:
        scans = {shard.url: scan_shard(shard, reader, decode=verify)
                 for shard in tqdm(index.shards, desc="reading shards", unit="shard", disable=None, file=sys.stderr)}
    try:
        plan = plan_epoch(index.shards, world_size, num_workers, epoch, seed, batch_size, shuffle=train)
    except ValueError as error:
        report["plan_error"] = str(error)
    else:
        report["plan"] = _plan_report(plan, scans if keys else None)
        report["warnings"] = _balance_warnings(plan)
    if verify:
        bad = [entry for scan in scans.values() for entry in scan.bad]
        by_reason: dict[str, int] = {}
        for entry in bad:
            by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + entry["count"]
        report["verify"] = {"checked": sum(len(scan.keys) for scan in scans.values()), "bad": bad,
                            "by_reason": by_reason}
        captions = CaptionStats()
        for scan in scans.values():
            captions.merge(scan.captions)
        if captions.count:
            report["verify"]["captions"] = captions.summary()
    return report


def _format_bytes(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "unknown"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _shard_folder(urls: list[str]) -> str:
    """The longest folder prefix (ending in "/") that all shard URLs share, or ""."""
    prefix = os.path.commonprefix(urls) if urls else ""
    return prefix[: prefix.rfind("/") + 1]


def _short(url: str, folder: str) -> str:
    return url[len(folder):] if folder and url.startswith(folder) else url


LIST_ITEMS_SHOWN = 12  # the text report shows this many items of a long metadata list (--json shows them all)


def _abridged(value: Any) -> Any:
    """Metadata with long lists (1,145 code points, thousands of skipped paths) cut to their first items and a
    count of the rest, so the text report stays readable."""
    if isinstance(value, dict):
        return {k: _abridged(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > LIST_ITEMS_SHOWN:
        return [_abridged(v) for v in value[:LIST_ITEMS_SHOWN]] + [f"... {len(value) - LIST_ITEMS_SHOWN} more"]
    return value


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of `inspect_dataset`'s report."""
    base = _shard_folder([shard["url"] for shard in report["shard_list"]])
    source = "samples counted by reading the shards (no index.json)" if report["counted"] else "from index.json"
    lines = [f"dataset   {report['url']}  ({source})",
             f"shards    {report['shards']}    samples {report['samples']}    bytes {_format_bytes(report['bytes'])}",
             f"metadata  {json.dumps(_abridged(report['metadata']), sort_keys=True)}"]
    if report["metadata"].get("captions"):
        lines.append(f"captions  {format_caption_stats(report['metadata']['captions'])}  (index.json)")
    for shard in report["shard_list"]:
        lines.append(f"  {_short(shard['url'], base)}: {shard['samples']} samples, {_format_bytes(shard['bytes'])}")
    plan = report["plan"]
    if plan is None:
        lines.append(f"ERROR: {report['plan_error']}")
    else:
        lines.append(f"epoch plan: epoch {plan['epoch']}, seed {plan['seed']}, {plan['world_size']} rank(s) x "
                     f"{plan['workers']} worker(s), batch size {plan['batch_size']}, "
                     f"{'shuffled (training)' if plan['shuffle'] else 'in order (evaluation)'}")
        lines.append(f"  every rank yields {plan['batches_per_epoch']} batches per epoch")
        for rank in plan["ranks"]:
            lines.append(f"  rank {rank['rank']}: {rank['samples']} samples, {rank['padding']} padding")
            for worker in rank["workers"]:
                shards = ", ".join(_short(url, base) for url in worker["shards"])
                lines.append(f"    worker {worker['worker']}: {worker['samples']} samples, {worker['batches']} "
                             f"batches ({worker['padding']} padding) from {len(worker['shards'])} shard(s): {shards}")
                if "keys" in worker:
                    lines.append(f"      keys ({len(worker['keys'])}): {' '.join(worker['keys'])}")
    for warning in report["warnings"]:
        lines.append(f"WARNING: {warning}")
    if "verify" in report:
        verify = report["verify"]
        bad_count = sum(verify["by_reason"].values())
        lines.append(f"verify: {verify['checked']} samples read, {bad_count} bad"
                     + (f" {json.dumps(verify['by_reason'], sort_keys=True)}" if bad_count else ""))
        if "captions" in verify:
            lines.append(f"  captions read: {format_caption_stats(verify['captions'])}")
        for entry in verify["bad"]:
            key = entry["key"] if entry["key"] is not None else f"({entry['count']} sample(s))"
            lines.append(f"  BAD {key}  {entry['reason']}  {_short(entry['url'], base)}  {entry['detail']}")
    return "\n".join(lines)


def _int_at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _members(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in REQUIRABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(REQUIRABLE)}, got {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.inspect",
                                     description="Show a sharded dataset and what each rank and worker reads.")
    parser.add_argument("url", help="folder with index.json, brace pattern, 'a.tar,b.tar', or embedded:NAME")
    parser.add_argument("--world-size", type=_int_at_least(1), default=1,
                        help="data-parallel ranks of the job (default 1)")
    parser.add_argument("--workers", type=_int_at_least(0), default=2,
                        help="DataLoader workers per rank (default 2, as data.num_workers; 0: the main process)")
    parser.add_argument("--epoch", type=_int_at_least(0), default=0,
                        help="epoch whose shard shuffle to show (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="the job's run.seed (default 0)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=64,
                        help="per-rank batch size (default 64, as data.batch_size)")
    parser.add_argument("--eval", action="store_true", help="evaluation order: no shard shuffle")
    parser.add_argument("--keys", action="store_true", help="list the sample keys each rank and worker reads")
    parser.add_argument("--verify", action="store_true", help="decode every sample and report the bad ones by key")
    parser.add_argument("--require", type=_members, default=("image",),
                        help="comma-separated members every sample needs: image, cls, json, txt (default image)")
    parser.add_argument("--cache-dir", default=None, help="read remote shards through this local cache")
    parser.add_argument("--retries", type=_int_at_least(1), default=5,
                        help="attempts to open a remote URL before giving up (default 5; local paths: 1)")
    parser.add_argument("--retry-backoff", type=_non_negative_float, default=1.0, metavar="SECONDS",
                        help="wait before the 2nd attempt, doubled after each further one (default 1.0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _error(message: str) -> None:
    print(f"error: {redact_credentials(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        report = inspect_dataset(args.url, world_size=args.world_size, num_workers=args.workers, epoch=args.epoch,
                                 seed=args.seed, batch_size=args.batch_size, train=not args.eval, keys=args.keys,
                                 verify=args.verify, required=args.require, cache_dir=args.cache_dir,
                                 open_retries=args.retries, retry_backoff_s=args.retry_backoff)
    except (DatasetInputError, SourceError) as error:  # LocalPathError (a missing local path) is one too
        _error(f"{error}")
        return 2
    except OSError as error:
        if args.url.startswith("embedded:"):  # building into the cache failed: its folder, not the name
            _error(f"cannot build {args.url} into its cache: {error}; set VITPRETRAIN_CACHE to a writable folder")
            return 2
        if not is_remote(args.url):
            _error(f"cannot read {args.url}: {error}; check the path and its permissions")
            return 2
        _error(f"{error}. The URL is remote and may work later (a server down, the network): check it, then run "
               f"again (--retries and --retry-backoff set how long to keep trying).")
        return 1
    if report["samples"] == 0:
        _error(f"{args.url} holds no samples ({report['shards']} shard(s), all empty): write the dataset again "
               "with python -m data_pipeline.write, or point at the folder that holds it.")
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    failed = report["plan_error"] is not None or bool(report.get("verify", {}).get("bad"))
    return 1 if failed else 0


if __name__ == "__main__":
    # Run the main of the imported module, not of this __main__ copy, so that there is one data_pipeline.inspect
    # however the command is started.
    from data_pipeline.inspect import main as _main

    sys.exit(_main())
