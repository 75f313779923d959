"""bench/gpu_check.py: the whole plan rehearsed on the CPU at tiny sizes (so the GPU command cannot rot), and the
runner's promises: a hung row is stopped at its limit with its children, the next row still runs, a failed input skips
what needs it, every process of the check is gone at the end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check
from bench.gpu_check import MARKER, Row, Runner

ROOT = Path(__file__).resolve().parents[1]


def marked_processes() -> list[int]:
    """Processes (any check's) whose environment carries the check's marker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(v.startswith(MARKER.encode() + b"=") for v in (entry / "environ").read_bytes().split(b"\0")):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.multiproc
def test_cpu_rehearsal_runs_every_row_and_leaves_nothing(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), str(out), "--cpu", "--work", str(work)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    failed = {name: r.get("error") for name, r in rows.items() if r["status"] != "pass"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], (out / "logs.txt").read_text()[-6000:])
    assert list(rows) == [r.name for r in gpu_check.plan(gpu_check.CPU, work, out)]
    assert report["mode"] == "cpu" and not report["leftover_processes_killed"]
    # the figures each row is there for
    assert rows["mae_resume"]["figures"]["step"] == 3   # resumed at step 2, ran to 1.5 x 2
    assert "model.safetensors" in rows["convert"]["figures"]["files"]
    assert rows["detr"]["figures"]["val/map"] >= 0 and "val/top1" in rows["cls"]["figures"]
    for method in ("mae", "beit"):
        numerics = rows["numerics"]["figures"][method]
        assert 0 <= numerics["rel_diff"] < gpu_check.NUMERICS_TOLERANCE and numerics["fp32"] > 0
    tp = rows["throughput_b16"]["figures"]
    assert tp["ours/images_per_s"] > 0 and tp["peer/images_per_s"] > 0 and tp["ours/peer images/s"] > 0
    assert rows["throughput_l16"]["figures"]["ours/mfu"] > 0
    assert 0 <= rows["data_wait"]["figures"]["1/data_wait_frac"] <= 1
    vitdet = rows["vitdet_memory"]["figures"]
    assert vitdet["128/global/peak_memory_mib"] > 0 and vitdet["128 windowed/global images/s"] > 0
    summary = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | pass |" in summary for name in rows) and "ours / peer images/s" in summary
    assert "===== data_wait: pass =====" in (out / "logs.txt").read_text()
    assert not marked_processes()


def write_script(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


def test_a_hung_row_stops_at_its_limit_with_its_children_and_the_next_row_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = write_script(tmp_path / "hang.py", f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({str(pid_file)!r}, "w").write(str(child.pid))
print("started", flush=True)
time.sleep(600)
""")
    ok = write_script(tmp_path / "ok.py", "print('fine')\n")
    rows = [Row("hang", hang, [], limit_s=3), Row("after", ok, [], limit_s=30), Row("needs_hang", ok, [], 30,
                                                                                   needs=("hang",))]
    runner = Runner([sys.executable], fork=False, logs=tmp_path / "logs", env=dict(os.environ))
    t0 = time.monotonic()
    runner.run(rows, parallel=1, budget_s=120, say=lambda line: None)
    assert time.monotonic() - t0 < 20
    hung, after, skipped = (r.result for r in rows)
    assert hung["status"] == "timeout" and "limit of 3 s" in hung["error"] and "started" in hung["error"]
    assert after["status"] == "pass" and skipped["status"] == "skipped" and "hang" in skipped["error"]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the hung row's child outlived it"


def test_failures_report_their_first_error_line_and_the_budget_stops_new_rows(tmp_path):
    bad = write_script(tmp_path / "bad.py", "print('working')\nprint('ValueError: model.depth must be >= 1')\n"
                                            "print('later noise: Error')\nraise SystemExit(2)\n")
    crash = write_script(tmp_path / "crash.py", "import sys\nprint('step 1', flush=True)\n"
                                                "def f():\n    raise RuntimeError('self and mat2 differ')\nf()\n")
    ok = write_script(tmp_path / "ok.py", "import time; time.sleep(4)\n")

    def check(log: Path) -> dict:
        raise gpu_check.RowFailed("metrics.jsonl: last logged step 1, expected 2")

    rows = [Row("bad", bad, [], 30), Row("crash", crash, [], 30), Row("wrong", ok, [], 30, check=check),
            Row("late", ok, [], 60)]
    runner = Runner([sys.executable], fork=False, logs=tmp_path / "logs", env=dict(os.environ))
    runner.run(rows, parallel=1, budget_s=33, say=lambda line: None)   # "late" would start with < 30 s left
    bad_r, crashed, wrong, late = (r.result for r in rows)
    assert bad_r["status"] == "fail" and bad_r["error"] == "exit 2: ValueError: model.depth must be >= 1"
    assert crashed["error"] == "exit 1: RuntimeError: self and mat2 differ"   # the traceback's own error line
    assert wrong["status"] == "fail" and "expected 2" in wrong["error"]
    assert late["status"] == "not run" and "budget" in late["error"]


def test_only_runs_a_row_with_its_inputs(capsys):
    assert gpu_check.main(["--list", "--cpu", "--only", "deit"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["data", "mae", "cls", "deit"]
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--list", "--only", "mea"])
    assert e.value.code == 2


def test_missing_packages_without_wheels_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "NEEDED", ("deepspeed", "no_such_package_here"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))   # --cpu sets it; restored after
    assert gpu_check.main([str(tmp_path / "out"), "--cpu", "--wheels", str(tmp_path / "none"),
                           "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "no_such_package_here" in err and str(tmp_path / "none") in err and ".gpuwheels" in err
