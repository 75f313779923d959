"""bench/vitdet_memory.py at tiny sizes: every (size, attention) row measured in its own process, and the attention
counts it reports equal what the models' attention layers actually receive (shapes seen by hooks on meta tensors).
No timing ratio is asserted: on a shared CPU they are noise."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import vitdet_memory
from finetune.vitdet import vitdet_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--sizes", "64,128", "--embed-dim", "32", "--depth", "4", "--heads", "2", "--window", "4",
        "--global-blocks", "1,3", "--warmup", "1", "--iters", "1"]


def seen_attention(px: int, dim: int, depth: int, heads: int, window: int, global_blocks: list[int]
                   ) -> tuple[list[tuple[int, ...]], int]:
    """The [sequences, h, w, D] input of every block's attention in a forward at `px` (window 0: all global), run on
    the meta device (shapes only, no memory, no time), and the model's parameter count."""
    shapes: list[tuple[int, ...]] = []
    with torch.device("meta"):
        model = vitdet_from_config(dict(img_size=px, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                                        use_rel_pos=True, window_size=window,
                                        global_attn_indexes=global_blocks if window else [], neck_chans=0,
                                        num_classes=0, global_pool=""))
        for block in model.blocks:
            block.attn.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
        model(torch.empty(1, 3, px, px))
    return shapes, sum(p.numel() for p in model.parameters())


def scores_and_flops(shapes: list[tuple[int, ...]], heads: int) -> tuple[int, int]:
    """Query-key pairs over all heads, and q k^T + attn v FLOPs, of the attention calls seen."""
    scores = sum(n * heads * (h * w) ** 2 for n, h, w, _ in shapes)
    flops = sum(2 * 2 * n * (h * w) ** 2 * d for n, h, w, d in shapes)
    return scores, flops


def test_each_row_in_its_own_process_with_counts_the_models_confirm(tmp_path):
    out = tmp_path / "vitdet.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/vitdet_memory.py"), *TINY, "--isolate", "fork",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})   # the forked children: no thread pools
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"64/windowed", "64/global", "128/windowed", "128/global"}
    for key, r in results.items():
        assert r["status"] == "ok", (key, r)
        assert r["images_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_mib"] > 0 and r["params_mib"] > 0
        assert r["memory_method"].startswith(("VmHWM", "ru_maxrss"))
        shapes, n_params = seen_attention(r["px"], 32, 4, 2, 4 if r["attention"] == "windowed" else 0, [1, 3])
        assert (r["counts"]["score_elements"], r["counts"]["attention_flops"]) == scores_and_flops(shapes, 2)
        assert r["params_mib"] * 2 ** 20 == pytest.approx(4 * n_params)     # fp32 weights
    # the 8x8 grid: blocks 1 and 3 see the whole grid, 0 and 2 four 4x4 windows
    assert [s[:3] for s in seen_attention(128, 32, 4, 2, 4, [1, 3])[0]] == [(4, 4, 4), (1, 8, 8)] * 2
    assert results["128/windowed"]["counts"]["global_blocks"] == 2 and results["128/global"]["counts"][
        "global_blocks"] == 4
    assert len({r["pid"] for r in results.values()}) == 4          # four processes, one per configuration
    # 128 px (an 8x8 grid): a 4x4 window's block scores 4 windows of 16 tokens, a quarter of one global block's
    windowed, global_ = results["128/windowed"]["counts"], results["128/global"]["counts"]
    assert windowed["windowed_block"]["score_elements"] * 4 == global_["global_block"]["score_elements"]
    assert windowed["score_elements"] < global_["score_elements"]
    # 64 px: the 4x4 grid is one window, the two models are the same function of the same size
    assert results["64/windowed"]["counts"]["score_elements"] == results["64/global"]["counts"]["score_elements"]
    assert report["ratios"]["128"]["score_elements"] == pytest.approx(0.625)   # 2 of 4 blocks at a quarter
    assert "| 128 | 8x8 | global |" in proc.stdout


@pytest.mark.parametrize("px", [512, 1024])
def test_counts_at_vitdet_geometry_match_the_model(px):
    """ViTDet's own geometry (window 14 pads the 32x32 and 64x64 grids to 42 and 70), both models."""
    blocks = [2, 5, 8, 11]
    for window in (14, 0):
        counts = vitdet_memory.model_counts(px, 192, 12, 3, window, tuple(blocks))
        assert (counts["score_elements"], counts["attention_flops"]) == scores_and_flops(
            seen_attention(px, 192, 12, 3, window, blocks)[0], 3)


def test_the_worker_a_spawned_child_runs(capsys):
    """What `--isolate spawn` starts in a fresh interpreter (the default, and the GPU's), run here in-process."""
    cfg = vitdet_memory.resolve(argparse.Namespace(
        device="cpu", sizes="128", batch=1, embed_dim=32, depth=4, heads=2, window=4, global_blocks="1,3",
        dtype="auto", warmup=0, iters=2, isolate="spawn"))
    assert vitdet_memory.main(["--worker", json.dumps({**cfg, "px": 128, "attention": "global"})]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line.removeprefix("RESULT "))
    assert line.startswith("RESULT ") and result["status"] == "ok" and len(result["step_times_s"]) == 2
    assert result["images_per_s"] == pytest.approx(1 / statistics.median(result["step_times_s"]))
    assert result["params_mib"] > 0 and result["peak_memory_mib"] > 0


@pytest.mark.parametrize("argv,words", [
    (["--sizes", "500"], ["--sizes 500", "multiple of the patch"]),
    (["--depth", "4", "--global-blocks", "0,1,2,3"], ["--global-blocks 0,1,2,3", "at least one windowed block"]),
    (["--depth", "4", "--global-blocks", "7"], ["0..3"]),
    (["--embed-dim", "100", "--heads", "3"], ["divisible by the heads"]),
    (["--sizes", "512,big"], ["comma-separated list of integers"]),
])
def test_bad_options_exit_2_with_one_paragraph(argv, words, capsys):
    assert vitdet_memory.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(w in err for w in words), err
