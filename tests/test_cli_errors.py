"""Bad inputs of the data tools and the converter (issue 18 item 7): `python -m data_pipeline.write`,
`python -m data_pipeline.inspect` and `launch/convert_checkpoint.py` exit 2 for what the user fixes in the command or
its inputs and 1 for failures at run time (a URL still unreachable after the retries), always with one paragraph that
names the path, URL or flag, and never a traceback. The launch scripts' own table is tests/test_bad_config.py.

Most cases call the tool's `main(argv)` in this process; a representative few run as real processes, because some
faults only exist there (`python -m data_pipeline.write` once held two copies of its module, so the SourceError the
embedded datasets raised was not the one its main caught: a traceback, exit 1)."""
import ast
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch

from data_pipeline import embedded
from data_pipeline import inspect as inspect_cli
from data_pipeline import write as write_cli
from launch import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"write": write_cli.main, "inspect": inspect_cli.main, "convert": convert_checkpoint.main}
COMMANDS = {"write": [sys.executable, "-m", "data_pipeline.write"],
            "inspect": [sys.executable, "-m", "data_pipeline.inspect"],
            "convert": [sys.executable, "launch/convert_checkpoint.py"]}
TAMPERED_STATES = "{tmp}/run/checkpoints/step00000001/mp_rank_00_model_states.pt"
FAST = ["--retries", "2", "--retry-backoff", "0.05"]   # inspect: a closed port fails after 2 quick attempts


def _unreadable_folder(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """{tmp}/images cannot be listed (as chmod 000 would do for any user but root, which these tests may run as)."""
    iterdir = pathlib.Path.iterdir

    def guarded(self: Path):
        if self == tmp / "images":
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)
    monkeypatch.setattr(pathlib.Path, "iterdir", guarded)


def _read_only(module) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """Every folder seen as not writable (a read-only mount; chmod cannot stop root)."""
    def patch(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        monkeypatch.setattr(module.os, "access", lambda path, mode: False)
    return patch


def _no_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.setattr(embedded, "FASHION_DIR", tmp / "no-fashion-mnist")


def _no_sklearn(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # its import raises ModuleNotFoundError


@dataclass(frozen=True)
class Case:
    tool: str                       # write | inspect | convert
    argv: list[str]                 # {tmp}: the workspace; {port}: a closed local port
    code: int                       # the exit status
    names: tuple[str, ...]          # what the message must name (path, URL, flag) and say
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    absent: tuple[str, ...] = ()    # what the output must not say


CASES = {
    # --- python -m data_pipeline.write SOURCE OUT_URL ------------------------------------------------------------
    "write-missing-source": Case("write", ["{tmp}/nope", "{tmp}/out"], 2, ("{tmp}/nope", "does not exist")),
    "write-unreadable-source": Case("write", ["{tmp}/images", "{tmp}/out"], 2, ("{tmp}/images", "Permission denied"),
                                    patch=_unreadable_folder),
    "write-text-file-source": Case("write", ["{tmp}/notes.txt", "{tmp}/out"], 2, ("{tmp}/notes.txt", "COCO")),
    "write-device-source": Case("write", ["/dev/null", "{tmp}/out"], 2, ("/dev/null", "neither a folder nor a file")),
    "write-empty-folder": Case("write", ["{tmp}/emptydir", "{tmp}/out"], 2, ("{tmp}/emptydir", "holds no files")),
    "write-all-unreadable": Case("write", ["{tmp}/junk", "{tmp}/out", "--quiet"], 2, ("{tmp}/junk", "unreadable")),
    "write-garbage-coco": Case("write", ["{tmp}/bad_coco.json", "{tmp}/out"], 2, ("{tmp}/bad_coco.json",)),
    "write-embedded-unknown": Case("write", ["embedded:unknown", "{tmp}/out"], 2, ("'unknown'", "embedded:digits")),
    "write-embedded-missing-package": Case("write", ["embedded:fashion_mnist", "{tmp}/out"], 2,
                                           ("apt-get install dataset-fashion-mnist",), patch=_no_fashion_mnist),
    "write-embedded-package-not-installed": Case("write", ["embedded:digits", "{tmp}/out"], 2,
                                                 ("embedded:digits", "pip install scikit-learn"), patch=_no_sklearn),
    "write-out-under-a-file": Case("write", ["{tmp}/images", "{tmp}/afile/out"], 2,
                                   ("{tmp}/afile/out", "{tmp}/afile is a file")),
    "write-out-is-a-file": Case("write", ["{tmp}/images", "{tmp}/afile"], 2, ("{tmp}/afile is a file",)),
    "write-out-read-only": Case("write", ["{tmp}/images", "{tmp}/ro/out"], 2, ("{tmp}/ro/out", "not writable"),
                                patch=_read_only(write_cli)),
    "write-out-under-proc": Case("write", ["{tmp}/images", "/proc/vitpretrain-out"], 2, ("/proc/vitpretrain-out",)),
    "write-out-http": Case("write", ["{tmp}/images", "http://127.0.0.1:{port}/out"], 2,
                           ("http://127.0.0.1:{port}/out", "read-only")),
    "write-out-unknown-protocol": Case("write", ["{tmp}/images", "nosuch://bucket/out"], 2,
                                       ("nosuch://bucket/out", "Protocol not known")),
    "write-maxcount-0": Case("write", ["{tmp}/images", "{tmp}/out", "--maxcount", "0"], 2, ("--maxcount",)),
    # --- python -m data_pipeline.inspect URL --------------------------------------------------------------------
    "inspect-missing": Case("inspect", ["{tmp}/nope"], 2, ("{tmp}/nope",)),
    "inspect-empty-folder": Case("inspect", ["{tmp}/emptydir"], 2, ("{tmp}/emptydir", "no *.tar shards")),
    "inspect-text-file": Case("inspect", ["{tmp}/notes.txt"], 2, ("{tmp}/notes.txt",)),
    "inspect-empty-tar": Case("inspect", ["{tmp}/empty.tar"], 2, ("{tmp}/empty.tar", "no samples")),
    "inspect-garbage-index": Case("inspect", ["{tmp}/garbage"], 2, ("{tmp}/garbage/index.json", "JSONDecodeError"),
                                  absent=("retrying",)),
    "inspect-empty-index": Case("inspect", ["{tmp}/emptyindex"], 2, ("{tmp}/emptyindex/index.json",)),
    "inspect-not-an-index": Case("inspect", ["{tmp}/notindex"], 2, ("{tmp}/notindex/index.json",)),
    "inspect-index-without-shards": Case("inspect", ["{tmp}/noshards"], 2, ("{tmp}/noshards/index.json",)),
    "inspect-embedded-unknown": Case("inspect", ["embedded:unknown"], 2, ("'unknown'", "embedded:digits")),
    "inspect-unknown-protocol": Case("inspect", ["nosuch://bucket/data"], 2, ("nosuch://bucket/data",)),
    "inspect-workers-negative": Case("inspect", ["{tmp}/images", "--workers", "-1"], 2, ("--workers", "'-1'")),
    "inspect-world-size-0": Case("inspect", ["{tmp}/images", "--world-size", "0"], 2, ("--world-size",)),
    "inspect-batch-size-0": Case("inspect", ["{tmp}/images", "--batch-size", "0"], 2, ("--batch-size",)),
    "inspect-require-unknown": Case("inspect", ["{tmp}/images", "--require", "image,label"], 2, ("--require",)),
    "inspect-closed-port": Case("inspect", ["http://127.0.0.1:{port}/data", *FAST], 1,
                                ("http://127.0.0.1:{port}/data", "after 2 attempt(s)", "--retries")),
    # --- python launch/convert_checkpoint.py SOURCE --out DIR ---------------------------------------------------
    "convert-missing": Case("convert", ["{tmp}/nope", "--out", "{tmp}/c"], 2, ("{tmp}/nope",)),
    "convert-no-checkpoint": Case("convert", ["{tmp}/emptydir", "--out", "{tmp}/c"], 2,
                                  ("{tmp}/emptydir", "no DeepSpeed checkpoint")),
    "convert-unknown-tag": Case("convert", ["{tmp}/run", "--tag", "step9", "--out", "{tmp}/c"], 2,
                                ("'step9'", "step00000001")),
    "convert-tampered-model-states": Case("convert", ["{tmp}/run", "--out", "{tmp}/c"], 2,
                                          (TAMPERED_STATES, "not a trustworthy checkpoint"), absent=("weights_only",)),
    "convert-tampered-model-states-file": Case("convert", [TAMPERED_STATES, "--out", "{tmp}/c"], 2,
                                               (TAMPERED_STATES, "not a trustworthy checkpoint"),
                                               absent=("weights_only",)),
    "convert-tampered-pth": Case("convert", ["{tmp}/tampered.pth", "--out", "{tmp}/c"], 2,
                                 ("{tmp}/tampered.pth", "not a trustworthy checkpoint"), absent=("weights_only",)),
    "convert-empty-pth": Case("convert", ["{tmp}/empty.pth", "--out", "{tmp}/c"], 2, ("{tmp}/empty.pth",)),
    "convert-text-file": Case("convert", ["{tmp}/notes.txt", "--out", "{tmp}/c"], 2, ("{tmp}/notes.txt",)),
    "convert-garbage-safetensors": Case("convert", ["{tmp}/garbage.safetensors", "--out", "{tmp}/c"], 2,
                                        ("{tmp}/garbage.safetensors", "safetensors")),
    "convert-out-under-a-file": Case("convert", ["{tmp}/vit.pth", "--out", "{tmp}/afile/out"], 2,
                                     ("--out {tmp}/afile/out", "under the file {tmp}/afile")),
    "convert-out-is-a-file": Case("convert", ["{tmp}/vit.pth", "--out", "{tmp}/afile"], 2,
                                  ("--out {tmp}/afile is a file",)),
    "convert-out-read-only": Case("convert", ["{tmp}/vit.pth", "--out", "{tmp}/ro/c"], 2,
                                  ("--out {tmp}/ro/c", "not writable"), patch=_read_only(convert_checkpoint)),
    "convert-out-under-proc": Case("convert", ["{tmp}/vit.pth", "--no-check", "--out", "/proc/vitpretrain-c"], 2,
                                   ("--out /proc/vitpretrain-c",)),
    "convert-atol-negative": Case("convert", ["{tmp}/vit.pth", "--out", "{tmp}/c", "--atol", "-1"], 2, ("--atol",)),
    "convert-num-heads-0": Case("convert", ["{tmp}/vit.pth", "--out", "{tmp}/c", "--num-heads", "0"], 2,
                                ("--num-heads",)),
}

# Run as real processes: the module-as-__main__ fault, a retry-free deterministic failure, the network one, the
# converter's refusal of a tampered file, and an argparse refusal (exit status and stderr as a user sees them).
SUBPROCESS_CASES = ["write-embedded-unknown", "write-out-under-a-file", "inspect-garbage-index", "inspect-closed-port",
                    "inspect-workers-negative", "convert-tampered-model-states", "convert-out-under-a-file",
                    "convert-atol-negative"]
# Answered before torch loads (write imports webdataset, convert torch and timm, only once the arguments pass): well
# under a second on an idle machine; 5 s leaves room for a loaded one.
QUICK = {"write-embedded-unknown", "write-out-under-a-file", "convert-out-under-a-file", "convert-atol-negative"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "afile").write_text("a plain file\n")
    (tmp / "notes.txt").write_text("some notes, not shards\n")
    (tmp / "empty.tar").write_bytes(b"")
    (tmp / "emptydir").mkdir()
    (tmp / "images").mkdir()
    (tmp / "images" / "a.png").write_bytes(_png())
    (tmp / "junk").mkdir()
    (tmp / "junk" / "broken.jpg").write_text("not an image")
    (tmp / "bad_coco.json").write_text("{")
    for folder, text in {"garbage": "{not json", "emptyindex": "", "notindex": "[1, 2]",
                         "noshards": json.dumps({"format": "webdataset", "shards": []})}.items():
        (tmp / folder).mkdir()
        (tmp / folder / "index.json").write_text(text)
    tag_dir = tmp / "run" / "checkpoints" / "step00000001"
    tag_dir.mkdir(parents=True)
    # unpickling either of these would call os.system
    torch.save({"module": {"w": torch.zeros(2)}, "hook": os.system}, tag_dir / "mp_rank_00_model_states.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "hook": os.system}, tmp / "tampered.pth")
    (tmp / "empty.pth").write_bytes(b"")
    (tmp / "garbage.safetensors").write_text("nope")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            num_classes=0)
    torch.save({"model": vit.state_dict()}, tmp / "vit.pth")  # a convertible MAE-format encoder
    return tmp


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _fill(text: str, tmp: Path, port: int) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{port}", str(port))


def _check_message(case: Case, text: str, tmp: Path, port: int) -> None:
    assert "Traceback" not in text, text
    assert text.strip() and "\n\n" not in text.strip(), f"not one paragraph:\n{text}"
    for name in case.names:
        assert _fill(name, tmp, port) in text, f"{_fill(name, tmp, port)!r} not in:\n{text}"
    for word in case.absent:
        assert word not in text, f"{word!r} in:\n{text}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_in_process(name, workspace, closed_port, monkeypatch, capsys, caplog):
    case = CASES[name]
    if case.patch is not None:
        case.patch(monkeypatch, workspace)
    argv = [_fill(arg, workspace, closed_port) for arg in case.argv]
    with caplog.at_level(logging.WARNING):
        try:
            code = MAINS[case.tool](argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    out, err = capsys.readouterr()
    # convert reports through logging: its error records are the message (one, whatever else it logged)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == case.code, f"exit {code}, expected {case.code}:\n{out}{err}{errors}"
    if case.tool == "convert" and errors:
        assert len(errors) == 1, errors
        _check_message(case, errors[0], workspace, closed_port)
    else:
        _check_message(case, err, workspace, closed_port)
    assert not (workspace / "out").exists() and not (workspace / "c").exists()


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_as_a_process(name, workspace, closed_port):
    case = CASES[name]
    argv = [_fill(arg, workspace, closed_port) for arg in case.argv]
    start = time.perf_counter()
    proc = subprocess.run([*COMMANDS[case.tool], *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - start
    assert proc.returncode == case.code, proc.stdout + proc.stderr
    _check_message(case, proc.stdout + proc.stderr, workspace, closed_port)
    assert elapsed < (5 if name in QUICK else 60), f"{elapsed:.1f} s"  # 5 retries of a garbage index.json: 15 s


def test_a_deterministic_failure_is_not_retried(workspace, capsys):
    """A garbage index.json fails at its first attempt whatever --retries says (the backoff would take minutes)."""
    start = time.perf_counter()
    assert inspect_cli.main([str(workspace / "garbage"), "--retries", "5", "--retry-backoff", "60"]) == 2
    assert time.perf_counter() - start < 30
    assert "index.json" in capsys.readouterr().err


def test_one_source_error_class_however_write_is_started():
    """data_pipeline.embedded imports the shared types from shard_writer, not from the command's module (no import
    circle), and the command's __main__ runs the imported module's main: one SourceError, whoever raises it."""
    from data_pipeline import shard_writer

    assert embedded.SourceError is shard_writer.SourceError is write_cli.SourceError
    for module in ("embedded", "shard_writer"):
        tree = ast.parse((ROOT / "data_pipeline" / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {f"data_pipeline.{alias.name}" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module == "data_pipeline" for alias in node.names}
        assert "data_pipeline.write" not in imported, module
    assert "from data_pipeline.write import main" in (ROOT / "data_pipeline" / "write.py").read_text()


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
