"""Shard-level pieces of the stream: which shards a URL names, how one is opened and read, who reads what.

Everything here is torch-free and shared by `data_pipeline.stream` (training/eval) and `data_pipeline.inspect`
(the CLI), so what `inspect` prints is what a job reads:

- `load_index(url)` turns a dataset URL (a folder with index.json, a brace pattern, a comma list, a list) into a
  `DatasetIndex`: absolute shard URLs with their sample counts (from index.json, or counted by scanning).
- `ShardReader` opens a shard with fsspec (retrying with backoff; optional `simplecache::` for remote shards) and
  yields its raw samples (`{"__key__", "__url__", suffix: bytes}`), reporting unusable ones to a callback instead
  of raising, so bad data never stops a run.
- `plan_epoch(...)` is the one pure function that decides which shards each (rank, worker) reads in an epoch and
  how many batches each worker must yield (see `data_pipeline.stream` for the policy).

Errors, by what the user can do about them (the CLIs and the runtime map them to exit codes):

- `DatasetInputError` (a ValueError): the input is wrong and trying again cannot help, so it is raised at once,
  never retried: an index.json that is not valid JSON or not an index (garbage, a truncated write, shard entries
  without "url"/"samples"), a URL that names no shards, a folder without index.json and without shards, a
  protocol fsspec does not know or whose package is not installed, a `pipe:` URL without allow_pipe. Exit 2.
- `LocalPathError` (a DatasetInputError and a ShardOpenError): a local file or folder that does not exist or
  cannot be read (missing, a folder where a file is expected, no permission). Raised at once. Exit 2.
- `ShardOpenError` (an OSError), any other: a URL that could not be opened after `open_retries` attempts with
  exponential backoff (network errors, timeouts, refused connections, a remote "not found", which can be an
  object store lagging behind its writer or a server that is down). It may succeed later. Exit 1.

So a caller catches DatasetInputError first (exit 2), then ShardOpenError / OSError (exit 1).
"""

from __future__ import annotations

import ctypes
import heapq
import json
import logging
import math
import random
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec
from webdataset.tariterators import base_plus_ext

from data_pipeline.multiscale import MultiScale

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff"})
ALLOWED_EXTENSIONS = IMAGE_EXTENSIONS | {"cls", "json", "txt"}
# Never decoded: unpickling bytes from a shard would run arbitrary code.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl"})
# Logical member names a caller can require in every sample ("image" = any image extension).
REQUIRABLE = {"image": "missing_image", "cls": "missing_label", "json": "missing_json", "txt": "missing_txt"}

# on_skip(reason, key, url, detail, count): how readers report samples they could not use.
SkipCallback = Callable[[str, "str | None", str, str, int], None]


class DatasetInputError(ValueError):
    """The dataset as given cannot be used and retrying cannot help (a malformed index.json, a URL naming no shards,
    ...): the user must fix the input (exit 2). The message names the URL and the fix. See the module docstring."""


class ShardOpenError(OSError):
    """A shard or index could not be opened, even after retrying (network, timeouts: it may work later; exit 1).
    The message names the URL and the cause."""


class LocalPathError(DatasetInputError, ShardOpenError):
    """A local file or folder that does not exist or cannot be read: raised at once, never retried (exit 2)."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its absolute fsspec URL, its number of samples and (if known) its size in bytes."""

    url: str
    samples: int
    bytes: int | None = None


@dataclass(frozen=True)
class DatasetIndex:
    """The shards of a dataset, in their canonical order, and the index.json metadata (or {})."""

    url: str
    shards: tuple[ShardInfo, ...]
    metadata: dict[str, Any]
    counted: bool  # True when there was no usable index.json and samples were counted by reading every shard

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def num_bytes(self) -> int | None:
        sizes = [shard.bytes for shard in self.shards]
        return None if any(size is None for size in sizes) else sum(sizes)


def is_remote(url: str) -> bool:
    """True for URLs whose bytes come over a network (anything but plain paths and file://)."""
    if url.startswith(PIPE_PREFIX):
        return True
    protocol = fsspec.utils.get_protocol(url)
    return protocol not in ("file", "local")


def _with_retries(action: Callable[[], Any], url: str, retries: int, backoff_s: float, what: str) -> Any:
    """Run `action` up to `retries` times with exponential backoff; raise ShardOpenError naming `url` at the end.

    Only what can succeed later is retried. Raised at once: a ValueError from `action` (a malformed file: JSON or
    Unicode decode errors, an unknown protocol) or an ImportError (fsspec's protocol package is not installed) as
    DatasetInputError; a missing or unreadable local path as LocalPathError. Remote "not found" is retried: fsspec's
    HTTP filesystem reports refused connections as FileNotFoundError, and object stores can lag behind a writer.
    """
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            return action()
        except DatasetInputError:
            raise
        except (ValueError, ImportError) as error:
            raise DatasetInputError(f"could not {what} {redact_credentials(url)}: {_describe_error(error)}"
                                    f"{_INPUT_FIXES.get(what, '')}") from error
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as error:
            if not is_remote(url):
                raise LocalPathError(f"could not {what} {url}: {_describe_error(error)} (a local path: not retried; "
                                     f"is the path right?)") from error
            last_error = error
        except Exception as error:  # noqa: BLE001 - other failures to open (network) are retried, then reported
            last_error = error
        if attempt < retries:
            delay = backoff_s * 2 ** (attempt - 1)
            logger.warning("could not %s %s (attempt %d/%d: %s); retrying in %.1f s",
                           what, url, attempt, retries, _describe_error(last_error), delay)
            time.sleep(delay)
    message = f"could not {what} {url} after {attempt} attempt(s): {_describe_error(last_error)}"
    raise ShardOpenError(message) from last_error


_INPUT_FIXES = {
    "read index": f"; {INDEX_FILE} must be the JSON that python -m data_pipeline.write writes: write the shards "
                  f"again, or delete it to have the shards counted",
}


def _describe_error(error: BaseException | None) -> str:
    """`Type: message`, followed by the chain of causes (fsspec wraps connection errors in FileNotFoundError)."""
    parts = []
    while error is not None and len(parts) < 4:
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- caused by ".join(parts)


PIPE_PREFIX = "pipe:"
# Credentials a URL can carry: user:password@ and signed/tokenised query parameters (S3/GCS presigned URLs, tokens).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]+):(?P<secret>[^/\s@]+)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:token|access_token|auth|sig|signature|key|secret|password|"
                           r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
                           r"X-Goog-Credential)=)[^&\s'\"]+", re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """`text` with the passwords of `scheme://user:password@host` URLs and credential query values replaced by ***.
    Applied to every log line, to config.yaml, TensorBoard and checkpoints (launch.runtime)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


def _die_with_parent() -> None:
    """preexec_fn of `pipe:` commands (Linux): the kernel kills the shell when the process reading it dies (a data
    worker killed with its training process), and the command it execs inherits that."""
    libc = ctypes.CDLL(None)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


class PipeFile:
    """The standard output of a shell command (`pipe:CMD`, webdataset's convention), read as a binary stream; a
    non-zero exit is an OSError naming the (redacted) command. On Linux the command dies with the process reading it
    (PR_SET_PDEATHSIG; set only in a single-threaded reader such as a data worker, where preexec_fn is safe); a
    command that outlives it anyway gets SIGPIPE at its next write."""

    def __init__(self, command: str) -> None:
        self.command = command
        preexec = _die_with_parent if sys.platform.startswith("linux") and threading.active_count() == 1 else None
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20,
                                        preexec_fn=preexec)

    def read(self, size: int = -1) -> bytes:
        return self.process.stdout.read(size)

    def close(self) -> None:
        if self.process.stdout is not None and not self.process.stdout.closed:
            self.process.stdout.close()
        if self.process.poll() is None:
            self.process.terminate()  # closed early (a truncated read, or the consumer stopped)
            self.process.wait()
        elif self.process.returncode != 0:
            raise OSError(f"{PIPE_PREFIX}{redact_credentials(self.command)} exited with {self.process.returncode}")

    def __enter__(self) -> "PipeFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _open_file(url: str, cache_dir: str | None, mode: str = "rb"):
    """Open `url` for streaming reads; remote URLs go through `simplecache::` into `cache_dir` when it is given;
    `pipe:CMD` runs CMD (the caller checks it is allowed)."""
    if url.startswith(PIPE_PREFIX):
        if "b" not in mode:
            raise DatasetInputError(f"{PIPE_PREFIX} URLs hold shards, not text files")
        return PipeFile(url[len(PIPE_PREFIX):])
    protocol = fsspec.utils.get_protocol(url)
    # block_size=0: one streaming GET instead of range requests (tar is read front to back; plain HTTP servers
    # such as http.server do not answer range requests).
    http_options = {"block_size": 0} if protocol in ("http", "https") else {}
    if cache_dir and is_remote(url) and "::" not in url:
        return fsspec.open(f"simplecache::{url}", mode, simplecache={"cache_storage": cache_dir},
                           **({protocol: http_options} if http_options else {})).open()
    return fsspec.open(url, mode, **http_options).open()


def check_pipe(url: str, allowed: bool) -> None:
    if url.startswith(PIPE_PREFIX) and not allowed:
        raise DatasetInputError(f"{redact_credentials(url)[:80]}: a {PIPE_PREFIX} URL runs a shell command for every shard; "
                         "set data.allow_pipe=true if you trust it (fsspec URLs need no shell: s3://, gs://, "
                         "https://...)")


def _join(folder: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return folder.rstrip("/") + "/" + name


def expand_urls(url: str | Sequence[str]) -> list[str]:
    """Shard URLs named by a brace pattern, a comma-separated string or a list (each item may be a pattern)."""
    items = [url] if isinstance(url, str) else list(url)
    urls: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part:
                urls.extend(braceexpand.braceexpand(part))
    return urls


def _is_shard_list(url: str | Sequence[str]) -> bool:
    if not isinstance(url, str):
        return True
    return "{" in url or "," in url or url.endswith(".tar")


def _read_index(index_url: str, retries: int, backoff_s: float) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with _open_file(index_url, cache_dir=None, mode="rt") as handle:
            return json.load(handle)

    index = _with_retries(read, index_url, retries, backoff_s, "read index")
    problem = None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        problem = "expected a JSON object with a 'shards' list"
    elif not isinstance(index.get("metadata") or {}, dict):
        problem = "its 'metadata' is not a JSON object"
    else:
        for number, entry in enumerate(index["shards"]):
            if not (isinstance(entry, dict) and isinstance(entry.get("url"), str) and entry["url"]
                    and _count(entry.get("samples")) is not None):
                problem = (f"shard entry {number} is {json.dumps(entry)[:120]}, not "
                           f'{{"url": "<tar file>", "samples": <count >= 0>, "bytes": <size>}}')
                break
    if problem is not None:
        raise DatasetInputError(f"{index_url} is not a dataset index: {problem}{_INPUT_FIXES['read index']}")
    return index


def _count(value: Any) -> int | None:
    """A sample count from index.json (an integer >= 0, or its decimal string), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        count = int(value)
    except ValueError:
        return None
    return count if count >= 0 else None


def _exists(url: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    except Exception:  # noqa: BLE001 - "cannot tell" is treated as absent; the caller then lists the folder
        return False


def load_index(url: str | Sequence[str], reader: ShardReader | None = None) -> DatasetIndex:
    """Resolve a dataset URL into its shards and sample counts.

    Args:
        url: a folder (any fsspec URL) holding index.json (or, without one, `*.tar` shards); a path to an
            index.json; a brace pattern `.../train-{000000..000127}.tar`; `"a.tar,b.tar"`; or a list of these.
            For patterns and lists, an index.json beside the shards supplies their counts when it lists them all.
        reader: how shards are opened when they must be counted (no index.json); defaults to `ShardReader()`.
    """
    reader = reader or ShardReader()
    retries, backoff = reader.open_retries, reader.retry_backoff_s
    if _is_shard_list(url):
        label = url if isinstance(url, str) else ",".join(map(str, url))
        shard_urls = expand_urls(url)
        if not shard_urls:
            raise DatasetInputError(f"dataset URL {url!r} names no shards")
        folders = {shard.rsplit("/", 1)[0] if "/" in shard else "." for shard in shard_urls}
        if len(folders) == 1:
            index_url = _join(folders.pop(), INDEX_FILE)
            if _exists(index_url):
                index = _read_index(index_url, retries, backoff)
                listed = {_join(index_url.rsplit("/", 1)[0], entry["url"]): entry for entry in index["shards"]}
                if all(shard in listed for shard in shard_urls):
                    shards = tuple(ShardInfo(shard, int(listed[shard]["samples"]), listed[shard].get("bytes"))
                                   for shard in shard_urls)
                    return DatasetIndex(label, shards, index.get("metadata") or {}, counted=False)
        return _counted_index(label, shard_urls, reader)

    folder = url[: -len(INDEX_FILE)].rstrip("/") if url.endswith("/" + INDEX_FILE) else url.rstrip("/")
    index_url = _join(folder, INDEX_FILE)
    if _exists(index_url):
        index = _read_index(index_url, retries, backoff)
        shards = tuple(ShardInfo(_join(folder, entry["url"]), int(entry["samples"]), entry.get("bytes"))
                       for entry in index["shards"])
        if not shards:
            raise DatasetInputError(f"{index_url} lists no shards")
        return DatasetIndex(url, shards, index.get("metadata") or {}, counted=False)

    def list_tars() -> list[str]:
        fs, path = fsspec.core.url_to_fs(folder)
        found = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
        # Keep the protocol the caller wrote (s3://, file://...); plain paths stay plain paths.
        return [fs.unstrip_protocol(item) if "://" in folder else item for item in found]

    shard_urls = _with_retries(list_tars, folder, retries, backoff, "list")
    if not shard_urls:
        error = LocalPathError if not is_remote(folder) else DatasetInputError
        raise error(f"{folder} has no {INDEX_FILE} and no *.tar shards (is the URL right?)")
    return _counted_index(url, shard_urls, reader)


def _counted_index(url: str, shard_urls: list[str], reader: ShardReader) -> DatasetIndex:
    logger.warning("no %s lists the shards of %s: counting samples by reading all %d shards once "
                   "(python -m data_pipeline.write produces an index and avoids this)",
                   INDEX_FILE, url, len(shard_urls))
    shards = tuple(ShardInfo(shard, reader.count_samples(shard), _size_or_none(shard)) for shard in shard_urls)
    return DatasetIndex(url, shards, metadata={}, counted=True)


def _size_or_none(url: str) -> int | None:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.size(path)
    except Exception:  # noqa: BLE001 - a size is informative only
        return None


def member_problem(members: dict[str, bytes], required: Iterable[str]) -> str | None:
    """The skip reason for a raw sample's set of members, or None when its members are acceptable.

    Args:
        members: suffix (lower case, e.g. "jpg", "cls") -> raw bytes.
        required: logical members every sample must have: "image" (any image extension), "cls", "json", "txt".
    """
    suffixes = list(members)
    if any(suffix.rsplit(".", 1)[-1] in PICKLE_EXTENSIONS for suffix in suffixes):
        return "pickle_member"
    if any(suffix not in ALLOWED_EXTENSIONS for suffix in suffixes):
        return "unexpected_member"
    images = [suffix for suffix in suffixes if suffix in IMAGE_EXTENSIONS]
    if len(images) > 1:
        return "multiple_images"
    for name in required:
        present = bool(images) if name == "image" else name in members
        if not present:
            return REQUIRABLE[name]
    return None


@dataclass(frozen=True)
class ShardReader:
    """Opens shards through fsspec and turns them into raw samples. Picklable: each DataLoader worker holds one.

    Attributes:
        cache_dir: when set, remote shards are read through `simplecache::` and kept in this folder.
        open_retries: attempts to open a URL before ShardOpenError.
        retry_backoff_s: delay before the 2nd attempt; doubles after each further failure.
        required: logical members every sample must have (see `member_problem`).
    """

    cache_dir: str | None = None
    open_retries: int = 5
    retry_backoff_s: float = 1.0
    required: tuple[str, ...] = ("image",)
    allow_pipe: bool = False      # `pipe:CMD` URLs run shell commands: only when the user opted in

    def __post_init__(self) -> None:
        unknown = set(self.required) - set(REQUIRABLE)
        if unknown:
            raise ValueError(f"required members {sorted(unknown)} are not among {sorted(REQUIRABLE)}")
        if self.open_retries < 1:
            raise ValueError(f"open_retries must be >= 1, got {self.open_retries}")

    def open(self, url: str):
        """A binary file object for `url`, opened with retries; raises ShardOpenError naming the URL (LocalPathError
        or DatasetInputError, at once, when retrying cannot help)."""
        check_pipe(url, self.allow_pipe)
        return _with_retries(lambda: _open_file(url, self.cache_dir), url, self.open_retries,
                             self.retry_backoff_s, "open")

    def _groups(self, url: str) -> Iterator[tuple[str, dict[str, bytes], str | None] | BaseException]:
        """Members of one shard grouped by key, in tar order: (key, {suffix: bytes}, problem or None).

        A read error (a truncated or corrupt tar) ends the shard: it is yielded, as the exception, after the
        groups it ends, and only the samples it cut are marked "truncated_tar":
        - the error is in a member's data (its name is known): that member's sample is marked, with the members
          read so far (none when the cut member is its first); the sample before it ended before the cut and is
          yielded as read;
        - the error is in a header (no name): the sample being read is yielded as read when it holds every kind of
          member its predecessor held (any image counts as "image") (the cut fell between samples, whose members writers keep uniform; for the
          shard's first sample: every required member), and is marked otherwise. A tar that ends inside a header
          or without its end-of-archive blocks is such an error too (tarfile alone would read a shorter archive).
        """
        previous: set[str] | None = None  # member kinds of the last complete sample

        def kinds(group: dict[str, bytes]) -> set[str]:  # member suffixes, any image extension as "image"
            return {"image" if suffix in IMAGE_EXTENSIONS else suffix for suffix in group}

        def whole(group: dict[str, bytes]) -> bool:
            if previous is None:  # the shard's first sample: whole if it holds what a sample must
                return member_problem(group, self.required) is None
            return previous <= kinds(group)

        with self.open(url) as handle:
            members = _tar_members(handle)
            key, group, problem = None, {}, None
            while True:
                try:
                    name, data = next(members)
                except StopIteration:
                    break
                except Exception as error:  # noqa: BLE001 - tarfile, zlib and network errors all end the shard
                    cut = base_plus_ext(error.name)[0] if isinstance(error, _MemberReadError) else None
                    if cut is not None and cut != key:  # the cut member starts a sample: the one before is whole
                        if key is not None:
                            yield key, group, problem
                        yield cut, {}, "truncated_tar"
                    elif key is not None:
                        intact = cut is None and whole(group)
                        yield key, group, (problem if intact else "truncated_tar")
                    yield error.cause if isinstance(error, _MemberReadError) else error
                    return
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue  # a member without an extension belongs to no sample (webdataset ignores it too)
                suffix = suffix.lower()
                if prefix != key:
                    if key is not None:
                        yield key, group, problem
                        previous = kinds(group)
                    key, group, problem = prefix, {}, None
                if suffix in group:
                    problem = problem or "duplicate_member"
                group[suffix] = data
            if key is not None:
                yield key, group, problem

    def samples(self, shard: ShardInfo, on_skip: SkipCallback) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard, `{"__key__": str, "__url__": str, suffix: bytes, ...}`, in tar order.

        Samples that cannot be used (bad members, missing required members, a truncated tar) are reported to
        `on_skip` and not yielded. Samples that index.json lists but the tar does not hold are reported as
        "truncated_tar" (with the read error that ended the tar, if one did). A truncated tar's counts are the
        samples it lost: the one the cut fell in (when any of it was read) plus those after it; a sample that
        ended before the cut is yielded.
        Raises ShardOpenError if the shard cannot be opened at all.
        """
        seen = 0
        read_error: BaseException | None = None
        for item in self._groups(shard.url):
            if isinstance(item, BaseException):
                read_error = item
                break
            key, members, problem = item
            seen += 1
            problem = problem or member_problem(members, self.required)
            if problem is not None:
                on_skip(problem, key, shard.url, f"members {sorted(members)}", 1)
                continue
            yield {"__key__": key, "__url__": shard.url, **members}
        missing = shard.samples - seen
        if read_error is not None or missing > 0:
            detail = f"read error {type(read_error).__name__}: {read_error}" if read_error else "tar ends early"
            if missing > 0:
                on_skip("truncated_tar", None, shard.url, f"{detail}; {missing} listed sample(s) not in the tar",
                        missing)
            elif read_error is not None and seen == 0:
                on_skip("truncated_tar", None, shard.url, detail, 1)

    def count_samples(self, url: str) -> int:
        """Number of sample keys in a shard (bad ones included), read once; a truncated tar counts what it holds
        (a sample cut in its first member included)."""
        return sum(1 for item in self._groups(url) if not isinstance(item, BaseException))


class _MemberReadError(Exception):
    """The data of the tar member `name` could not be read (the tar is cut or corrupt inside it)."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"{name}: {cause}")
        self.name, self.cause = name, cause


_CUT_HEADER = "vitpretrain_cut_header"


class _CutAwareTarInfo(tarfile.TarInfo):
    """tarfile ends an archive silently at a header that is cut, empty or invalid (not at offset 0), which is how a
    truncated tar reads; this records the cause on the TarFile, so the end is reported as the read error it is. A
    proper end (a zero block: EOFHeaderError) is not recorded."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as error:
            setattr(tarfile_, _CUT_HEADER, error)
            raise


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: archive metadata, not sample members


def _tar_members(handle: Any) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream (any compression tarfile reads), in order.

    webdataset's `tar_file_iterator`, except that an error while reading a member's data raises _MemberReadError
    naming the member, so the caller knows which sample a cut falls in; errors in headers propagate as raised.
    """
    stream = tarfile.open(fileobj=handle, mode="r|*", tarinfo=_CutAwareTarInfo)
    while True:
        info = stream.next()
        if info is None:
            cut = getattr(stream, _CUT_HEADER, None)
            if cut is not None:
                raise tarfile.ReadError(f"the tar ends inside a header ({type(cut).__name__}: {cut})")
            return
        name = info.name
        if not info.isreg() or not name or _META_MEMBER.match(name):
            continue
        try:
            data = stream.extractfile(info).read()
        except Exception as error:  # noqa: BLE001 - any failure inside the member is reported with its name
            raise _MemberReadError(name, error) from error
        stream.members = []  # streaming: do not keep every TarInfo of the shard
        yield name, data


@dataclass(frozen=True)
class WorkerPlan:
    """What one DataLoader worker of one rank reads in an epoch.

    Attributes:
        shards: the shards it reads, in reading order; each shard of the dataset is in exactly one WorkerPlan.
        samples: the samples those shards hold (from the index).
        batches: the exact number of full batches it yields.
        capacity: the images those batches hold, `batches * batch_size` (multi-scale: the sum of its scheduled
            batch sizes); `capacity - samples` are padding.
    """

    rank: int
    worker: int
    shards: tuple[ShardInfo, ...]
    samples: int
    batches: int
    capacity: int


@dataclass(frozen=True)
class EpochPlan:
    """Which shards every (rank, worker) reads in one epoch, and the batches each yields (epoch mode)."""

    epoch: int
    seed: int
    world_size: int
    num_workers: int  # readers per rank (DataLoader num_workers, or 1 when it is 0)
    batch_size: int
    shuffle: bool
    workers: tuple[WorkerPlan, ...]  # index rank * num_workers + worker
    batches_per_epoch: int  # identical on every rank

    def worker(self, rank: int, worker: int) -> WorkerPlan:
        return self.workers[rank * self.num_workers + worker]

    def rank_workers(self, rank: int) -> tuple[WorkerPlan, ...]:
        return self.workers[rank * self.num_workers:(rank + 1) * self.num_workers]

    def rank_samples(self, rank: int) -> int:
        return sum(plan.samples for plan in self.rank_workers(rank))

    def rank_padding(self, rank: int) -> int:
        return sum(plan.capacity for plan in self.rank_workers(rank)) - self.rank_samples(rank)


def readers_per_rank(num_workers: int) -> int:
    """DataLoader num_workers=0 reads in the main process: one reader."""
    return max(1, num_workers)


def shuffled_shards(shards: Sequence[ShardInfo], epoch: int, seed: int, shuffle: bool) -> list[ShardInfo]:
    """The shard order of an epoch: a permutation seeded by (seed, epoch), the same on every rank."""
    order = list(shards)
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def _deal(positions: list[int], sizes: list[int], bins: int, minimum: int) -> list[list[int]]:
    """Deal items (already largest first) to `bins`: each to the bin with the fewest samples so far (ties: fewest
    items, then lowest bin), except that bins holding fewer than `minimum` items are served first."""
    dealt: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0, 0, 0, b) for b in range(bins)]  # (has minimum, samples, items, bin)
    for position in positions:
        _, load, count, b = heapq.heappop(heap)
        dealt[b].append(position)
        heapq.heappush(heap, (int(count + 1 >= minimum), load + sizes[position], count + 1, b))
    return dealt


def plan_epoch(shards: Sequence[ShardInfo], world_size: int, num_workers: int, epoch: int, seed: int,
               batch_size: int, shuffle: bool, multiscale: MultiScale | None = None) -> EpochPlan:
    """Assign every shard to exactly one (rank, worker) and give every worker an exact batch quota.

    Assignment: the shards are shuffled with (seed, epoch) and dealt largest first (equal sizes in shuffled
    order), first to the ranks and then, within each rank, to its workers. Each shard goes to a rank (worker)
    that still holds fewer than num_workers shards (one shard) if there is one, otherwise to the one holding the
    fewest samples so far (ties: fewest shards, then lowest index). Each worker reads its shards in shuffled
    order. The dealing only looks at sample counts, so every epoch has the same per-reader loads and the same
    `batches_per_epoch`; shards of equal size (all but the last, as data_pipeline.write makes them) trade places
    between readers from one epoch to the next.

    Quotas: a worker holding n samples yields ceil(n / batch_size) batches (multi-scale: `multiscale.batches_for(n)`,
    the fewest batches of its size schedule that hold n whatever the order; data_pipeline/multiscale.py); every rank
    must yield B = max over ranks of the sum of its workers' batches, and a rank short of B gives its extra batches
    to its workers that hold samples, largest first, round-robin.

    Raises:
        ValueError: fewer shards than readers, or a rank whose shards hold no samples.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size and batch_size must be >= 1, got {world_size} and {batch_size}")
    readers = readers_per_rank(num_workers)
    total = world_size * readers
    if len(shards) < total:
        raise ValueError(
            f"{len(shards)} shard(s) cannot be split over {world_size} rank(s) x {readers} worker(s) = {total} "
            f"readers in epoch mode: every reader needs at least one shard. Fix: write the dataset as at least "
            f"{total} shards (python -m data_pipeline.write ... --maxcount <fewer samples per shard>), use fewer "
            f"workers (num_workers), or use mode='resampled'.")
    order = shuffled_shards(shards, epoch, seed, shuffle)
    largest_first = sorted(range(len(order)), key=lambda position: (-order[position].samples, position))
    sizes = [shard.samples for shard in order]
    assigned: list[list[int]] = []  # per slot (rank * readers + worker): positions in `order`
    for rank_positions in _deal(largest_first, sizes, bins=world_size, minimum=readers):
        assigned.extend(_deal(rank_positions, sizes, bins=readers, minimum=1))
    loads = [sum(sizes[position] for position in slot) for slot in assigned]

    natural = [multiscale.batches_for(load) if multiscale else math.ceil(load / batch_size) for load in loads]
    rank_batches = [sum(natural[r * readers:(r + 1) * readers]) for r in range(world_size)]
    batches_per_epoch = max(rank_batches)
    quotas = list(natural)
    for rank in range(world_size):
        slots = [s for s in range(rank * readers, (rank + 1) * readers) if loads[s] > 0]
        if not slots:
            urls = [order[p].url for s in range(rank * readers, (rank + 1) * readers) for p in assigned[s]]
            raise ValueError(f"rank {rank} would read no samples in epoch {epoch}: its shards {urls} are empty")
        slots.sort(key=lambda s: (-loads[s], s))
        for extra in range(batches_per_epoch - rank_batches[rank]):
            quotas[slots[extra % len(slots)]] += 1

    def capacity(slot: int) -> int:
        if multiscale is None:
            return quotas[slot] * batch_size
        return multiscale.capacity(seed, epoch, slot % readers, quotas[slot])

    workers = tuple(
        WorkerPlan(rank=slot // readers, worker=slot % readers,
                   shards=tuple(order[position] for position in sorted(assigned[slot])),
                   samples=loads[slot], batches=quotas[slot], capacity=capacity(slot))
        for slot in range(total))
    return EpochPlan(epoch=epoch, seed=seed, world_size=world_size, num_workers=readers, batch_size=batch_size,
                     shuffle=shuffle, workers=workers, batches_per_epoch=batches_per_epoch)
