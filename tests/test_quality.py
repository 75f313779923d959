"""bench/quality.py without training anything: aggregation and verdicts, the RESULTS.md section replacement, the
commands the plan chains (pretrain -> convert -> finetune, seeds), and the report built from fake run outputs."""
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules["bench_quality"] = quality  # dataclasses resolve their module's annotations through sys.modules
_spec.loader.exec_module(quality)


# --- aggregation and verdicts ------------------------------------------------------------------------------------

def test_aggregate_mean_and_sample_std():
    s = quality.aggregate([80.0, 84.0])
    assert s.mean == pytest.approx(82.0)
    assert s.std == pytest.approx(2.8284271, rel=1e-6)   # sample std: |a - b| / sqrt(2)
    assert s.n == 2
    one = quality.aggregate([5.0])
    assert (one.mean, one.std, one.n) == (5.0, 0.0, 1)
    with pytest.raises(ValueError):
        quality.aggregate([])


def _cmp():
    return quality.Comparison("mae", "top-1 (%)", ("pretrained", "scratch"))


def test_verdict_holds_only_beyond_the_seed_noise():
    better, base = quality.Stats(90.0, 1.0, 2), quality.Stats(80.0, 1.0, 2)
    v = quality.verdict(_cmp(), better, base)
    assert v.holds and v.beyond_noise
    assert v.gap == pytest.approx(10.0)
    assert v.noise == pytest.approx(2 ** 0.5)
    assert v.text.startswith("**holds**") and "+10.00" in v.text and "exceeded" in v.text

    within = quality.verdict(_cmp(), quality.Stats(81.0, 2.0, 2), quality.Stats(80.0, 2.0, 2))
    assert not within.holds and not within.beyond_noise
    assert "does not hold at this scale" in within.text and "within the seed noise" in within.text
    assert "not exceeded" in within.text

    worse = quality.verdict(_cmp(), quality.Stats(70.0, 0.5, 2), quality.Stats(80.0, 0.5, 2))
    assert not worse.holds and worse.gap == pytest.approx(-10.0)
    assert worse.text.startswith("**does not hold at this scale**") and "-10.00" in worse.text
    assert "the reverse gap exceeds it" in worse.text
    tie = quality.verdict(_cmp(), quality.Stats(79.0, 2.0, 2), quality.Stats(80.0, 2.0, 2))
    assert "the reverse gap is within it" in tie.text


def test_verdict_with_one_seed_says_there_is_no_std():
    v = quality.verdict(_cmp(), quality.Stats(90.0, 0.0, 1), quality.Stats(80.0, 0.0, 1))
    assert v.holds
    assert "one seed" in v.text


def test_judge_names_a_missing_arm():
    stats = {"mae": {"pretrained": {"top-1 (%)": quality.Stats(1.0, 0.0, 1)}}}
    with pytest.raises(KeyError, match="scratch"):
        quality.judge([_cmp()], stats)


# --- RESULTS.md ---------------------------------------------------------------------------------------------------

DOC = ("# Benchmark results\n\nintro kept\n\n## Learning quality\n\n<!-- quality:begin -->\nNot measured yet.\n"
       "<!-- quality:end -->\n\n## Later section\ntext after\n")


def test_replace_section_keeps_markers_and_outside_text():
    out = quality.replace_section(DOC, "new table\n\n| a | b |")
    before, rest = out.split("<!-- quality:begin -->")
    inside, after = rest.split("<!-- quality:end -->")
    assert before == DOC.split("<!-- quality:begin -->")[0]
    assert after == DOC.split("<!-- quality:end -->")[1]
    assert inside == "\nnew table\n\n| a | b |\n"
    assert "Not measured yet." not in out
    # idempotent: replacing again gives the same text
    assert quality.replace_section(out, "new table\n\n| a | b |") == out


@pytest.mark.parametrize("text, match", [
    ("no markers here\n", "occurs 0 times"),
    ("<!-- quality:begin -->\nx\n", "occurs 0 times"),
    ("<!-- quality:begin -->\n<!-- quality:begin -->\n<!-- quality:end -->\n", "occurs 2 times"),
    ("<!-- quality:end -->\nx\n<!-- quality:begin -->\n", "comes before"),
])
def test_replace_section_refuses_bad_markers(text, match):
    with pytest.raises(ValueError, match=match):
        quality.replace_section(text, "body")


# --- the plan -----------------------------------------------------------------------------------------------------

def _plan(tmp_path, claims=quality.CLAIMS, seeds=(0, 1), preset=quality.CPU):
    steps, comparisons = quality.build_plan(preset, list(claims), list(seeds), quality.Layout(tmp_path))
    return {s.key: s for s in steps}, comparisons


def _arg(step, key):
    """The value of `key=` in a step's command (asserting it occurs exactly once)."""
    values = [a.split("=", 1)[1] for a in step.argv if a.startswith(key + "=")]
    assert len(values) == 1, f"{step.key}: {key} occurs {len(values)} times in {step.command}"
    return values[0]


def test_mae_chain_and_seeds(tmp_path):
    steps, comparisons = _plan(tmp_path, ["mae"])
    for seed in (0, 1):
        pretrain = steps[f"mae.pretrain-s{seed}"]
        assert pretrain.argv[1] == "launch/pretrain_mae.py"
        assert _arg(pretrain, "run.seed") == str(seed)
        convert = steps[f"mae.convert-pretrain-s{seed}"]
        assert convert.argv[1] == "launch/convert_checkpoint.py"
        assert convert.argv[2] == pretrain.run_dir == str(tmp_path / "runs/pretrain_mae" / f"mae-pretrain-s{seed}")
        out = convert.argv[convert.argv.index("--out") + 1]
        finetune, scratch = steps[f"mae.finetune-s{seed}"], steps[f"mae.scratch-s{seed}"]
        assert _arg(finetune, "model.init") == out
        assert _arg(steps[f"mae.probe-s{seed}"], "model.init") == out
        assert _arg(scratch, "model.init") == "none"
        assert _arg(steps[f"mae.probe-random-s{seed}"], "model.init") == "none"
        assert "--preset=linprobe" in steps[f"mae.probe-s{seed}"].argv
        # the two finetuning arms differ only in init and run name
        strip = {"model.init", "run.name"}
        assert ([a for a in finetune.argv if a.split("=")[0] not in strip]
                == [a for a in scratch.argv if a.split("=")[0] not in strip])
        for step in (finetune, scratch):
            assert _arg(step, "run.seed") == str(seed)
            assert _arg(step, "data.train") == str(tmp_path / "shards/digits")
            assert _arg(step, "data.val") == str(tmp_path / "shards/digits_val")
    # every data set the claim reads is written first, once
    assert [k for k in steps if k.startswith("shards.")] == ["shards.digits", "shards.digits_val"]
    assert list(steps)[0] == "shards.digits"
    assert {c.arms[:2] for c in comparisons} == {("MAE -> finetune", "scratch -> finetune"),
                                                ("MAE -> linear probe", "random init -> linear probe")}


def test_beit_chain(tmp_path):
    steps, _ = _plan(tmp_path, ["beit"], seeds=(0, 1, 2))
    dvae = steps["beit.dvae"]
    assert dvae.seed is None and _arg(dvae, "run.seed") == "0"     # shared: one tokenizer for every seed
    for seed in (0, 1, 2):
        pretrain = steps[f"beit.pretrain-s{seed}"]
        assert _arg(pretrain, "tokenizer") == dvae.run_dir + "/export"
        out = steps[f"beit.convert-pretrain-s{seed}"].argv[-1]
        assert steps[f"beit.convert-pretrain-s{seed}"].argv[2] == pretrain.run_dir
        assert _arg(steps[f"beit.finetune-s{seed}"], "model.init") == out
        init = steps[f"beit.init-s{seed}"]
        assert _arg(init, "optim.lr") == "0" and _arg(init, "optim.base_lr") == "0"
        assert _arg(steps[f"beit.scratch-s{seed}"], "model.init") == init.run_dir + "/export"
        assert _arg(steps[f"beit.scratch-s{seed}"], "run.seed") == str(seed)


def test_deit_detr_ipt_chains(tmp_path):
    steps, _ = _plan(tmp_path, ["deit", "detr", "ipt"])
    teacher = steps["deit.teacher"]
    assert teacher.seed is None and _arg(teacher, "model.init") == "timm:resnet18"
    for seed in (0, 1):
        assert _arg(steps[f"deit.hard-s{seed}"], "teacher") == teacher.run_dir + "/export"
        assert _arg(steps[f"deit.hard-s{seed}"], "distill") == "hard"
        assert _arg(steps[f"deit.none-s{seed}"], "distill") == "none"
        assert "teacher" not in {a.split("=")[0] for a in steps[f"deit.none-s{seed}"].argv}

        backbone = steps["detr.convert-pretrain"].argv[-1]
        assert steps["detr.convert-pretrain"].argv[2] == steps["detr.pretrain"].run_dir
        assert _arg(steps[f"detr.pretrained-s{seed}"], "model.init") == backbone
        assert _arg(steps[f"detr.scratch-s{seed}"], "model.init") == "scratch"
        assert _arg(steps[f"detr.scratch-s{seed}"], "data.train") == str(tmp_path / "shards/emoji")
        # both arms: the emoji preset, ViTDet's windowed backbone, the same budget
        for arm in ("pretrained", "scratch"):
            assert "--preset=emoji" in steps[f"detr.{arm}-s{seed}"].argv
            assert _arg(steps[f"detr.{arm}-s{seed}"], "model.backbone") == "vitdet"
        assert _arg(steps[f"detr.pretrained-s{seed}"], "optim.max_steps") == \
            _arg(steps[f"detr.scratch-s{seed}"], "optim.max_steps")

        for task in quality.CPU.ipt_tasks:
            pre = steps[f"ipt.{task}-pretrained-s{seed}"]
            assert "--preset=finetune" in pre.argv
            assert _arg(pre, "model.init") == steps["ipt.pretrain"].run_dir + "/export"
            assert _arg(pre, "tasks") == task and _arg(steps[f"ipt.{task}-scratch-s{seed}"], "tasks") == task
            assert _arg(pre, "optim.max_steps") == _arg(steps[f"ipt.{task}-scratch-s{seed}"], "optim.max_steps")
            assert _arg(pre, "run.seed") == str(seed)


def test_simmim_chain(tmp_path):
    """SimMIM's Swin pretrained per seed, converted, finetuned; the scratch arm finetunes the same Swin exported by a
    run at lr 0; the two finetuning arms differ only in init and run name."""
    steps, comparisons = _plan(tmp_path, ["simmim"])
    for seed in (0, 1):
        pretrain, init = steps[f"simmim.pretrain-s{seed}"], steps[f"simmim.init-s{seed}"]
        assert pretrain.argv[1] == init.argv[1] == "launch/pretrain_simmim.py"
        assert _arg(pretrain, "run.seed") == _arg(init, "run.seed") == str(seed)
        assert _arg(init, "optim.lr") == "0" and _arg(init, "optim.base_lr") == "0"
        for key in ("model.depths", "model.window_size", "model.patch_size", "model.embed_dim"):
            assert _arg(pretrain, key) == _arg(init, key)          # the same Swin in both arms
        convert = steps[f"simmim.convert-pretrain-s{seed}"]
        assert convert.argv[2] == pretrain.run_dir
        finetune, scratch = steps[f"simmim.finetune-s{seed}"], steps[f"simmim.scratch-s{seed}"]
        assert _arg(finetune, "model.init") == convert.argv[-1]
        assert _arg(scratch, "model.init") == init.run_dir + "/export"
        strip = {"model.init", "run.name"}
        assert ([a for a in finetune.argv if a.split("=")[0] not in strip]
                == [a for a in scratch.argv if a.split("=")[0] not in strip])
    assert [k for k in steps if k.startswith("shards.")] == ["shards.digits", "shards.digits_val"]
    assert [c.arms for c in comparisons] == [("SimMIM -> finetune", "Swin init (no pretraining) -> finetune")]


def test_gpu_preset_repeats_every_pretraining_per_seed(tmp_path):
    steps, _ = _plan(tmp_path, preset=quality.GPU)
    shared = [k for k, s in steps.items() if s.seed is None and not k.startswith("shards.")]
    assert shared == ["beit.dvae", "deit.teacher"]   # fixed inputs of their method, never pretraining
    assert "detr.pretrain-s1" in steps and "ipt.pretrain-s1" in steps
    assert _arg(steps["mae.pretrain-s0"], "data.train").endswith("shards/fashion_mnist")


def test_dry_run_prints_every_command(tmp_path, capsys):
    assert quality.main(["--dry-run", "--workdir", str(tmp_path), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    steps, _ = _plan(tmp_path)
    commands = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert commands == [s.command for s in steps.values()]
    assert all(shlex.split(c)[0] == "python" for c in commands)
    assert "(shared by every seed)" in out
    assert not any(tmp_path.iterdir())   # a dry run writes nothing


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        quality.main(["--dry-run", "--only", "mae,vit"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        quality.main(["--dry-run", "--seeds", "0"])


# --- the report from fake run outputs -----------------------------------------------------------------------------

def fake_runner(step, layout, reuse):
    """Instead of training: the job's metrics.jsonl with two rows (the last value must win); baselines score 70,
    the claimed-better arms 90, plus the seed."""
    if step.run_dir:
        run = Path(step.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        seed = step.seed or 0
        baseline = any(word in step.key for word in ("scratch", "none", "random"))
        final = {r.key: (70.0 if baseline else 90.0) + seed for r in step.reads}
        rows = [{"step": 1, **{k: -1.0 for k in final}}, {"step": 2, "train/loss": 1.0, **final}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return quality.StepResult(key=step.key, claim=step.claim, seed=step.seed, command=step.command,
                              log=str(layout.log(step.key)), wall_s=1.0, load_before=(0.5, 0.5, 0.5),
                              load_after=(0.6, 0.6, 0.6))


@pytest.fixture
def fake_machine(monkeypatch):
    monkeypatch.setattr(quality, "machine_info", lambda: {"cpu": "test CPU", "cores": 2, "torch": "x",
                                                          "python": "3", "gpu": None})
    monkeypatch.setattr(quality, "git_commit", lambda: "abc1234")


def test_report_from_fake_runs(tmp_path, fake_machine):
    """The report reads the runs' figures back into per-seed values, stds, verdicts, a table per claim and the plot."""
    assert quality.main(["--only", "mae,deit", "--workdir", str(tmp_path), "--no-write"], runner=fake_runner) == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    top1 = report["results"]["mae"]["arms"]["MAE -> finetune"]["top-1 (%)"]
    assert top1["values"] == [90.0, 91.0] and top1["mean"] == pytest.approx(90.5) and top1["n"] == 2
    assert report["results"]["deit"]["arms"]["teacher"]["top-1 (%)"]["n"] == 1    # shared: one value
    verdicts = report["results"]["mae"]["verdicts"]
    assert [v["holds"] for v in verdicts] == [True, True]
    assert report["results"]["deit"]["verdicts"][0]["gap"] == pytest.approx(20.0)
    md = (tmp_path / "quality.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| MAE -> finetune |"))
    assert row.endswith("| 90.50 ± 0.71 (n=2) |")
    assert "`deit.teacher`" in md and "test CPU" in md and "abc1234" in md
    assert "![quality benchmark, preset cpu](quality.png)" in md
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_missing_markers_stop_before_any_job(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nno quality markers\n")
    monkeypatch.setattr(quality, "RESULTS_MD", results)

    def runner(step, layout, reuse):
        raise AssertionError(f"{step.key} ran")

    assert quality.main(["--only", "mae", "--workdir", str(tmp_path / "w")], runner=runner) == 2
    assert results.read_text() == "# Results\n\nno quality markers\n"


def test_results_md_section_and_files_written(tmp_path, monkeypatch, fake_machine):
    results = tmp_path / "RESULTS.md"
    results.write_text(DOC)
    monkeypatch.setattr(quality, "RESULTS_MD", results)
    monkeypatch.setattr(quality, "RESULTS_DIR", tmp_path / "results")
    assert quality.main(["--only", "deit", "--workdir", str(tmp_path / "w")], runner=fake_runner) == 0
    text = results.read_text()
    assert text.startswith(DOC.split("<!-- quality:begin -->")[0] + "<!-- quality:begin -->\n")
    assert text.endswith("<!-- quality:end -->" + DOC.split("<!-- quality:end -->")[1])
    assert "### 3. DeiT" in text and "![quality benchmark, preset cpu](results/quality-cpu.png)" in text
    assert json.loads((tmp_path / "results" / "quality-cpu.json").read_text())["claims"] == ["deit"]
    assert (tmp_path / "results" / "quality-cpu.png").is_file()


def test_a_claim_rerun_keeps_the_others_in_the_results(tmp_path, monkeypatch, fake_machine):
    """--only deit after a run of mae and deit: deit's figures are replaced, mae's table, verdicts and commands are
    kept, and each claim names the invocation it comes from."""
    results = tmp_path / "RESULTS.md"
    results.write_text(DOC)
    monkeypatch.setattr(quality, "RESULTS_MD", results)
    monkeypatch.setattr(quality, "RESULTS_DIR", tmp_path / "results")
    assert quality.main(["--only", "mae,deit", "--workdir", str(tmp_path / "w")], runner=fake_runner) == 0
    first = json.loads((tmp_path / "results" / "quality-cpu.json").read_text())
    assert quality.main(["--only", "deit", "--seeds", "3", "--workdir", str(tmp_path / "w2")],
                        runner=fake_runner) == 0
    merged = json.loads((tmp_path / "results" / "quality-cpu.json").read_text())
    assert merged["claims"] == ["mae", "deit"]
    assert merged["results"]["mae"] == first["results"]["mae"]
    assert merged["results"]["deit"]["arms"]["no teacher"]["top-1 (%)"]["n"] == 3
    assert merged["runs"]["mae"]["seeds"] == [0, 1] and merged["runs"]["deit"]["seeds"] == [0, 1, 2]
    assert {s["claim"] for s in merged["steps"]} >= {"mae", "deit"}
    text = results.read_text()
    assert "### 1. MAE" in text and "### 3. DeiT" in text
    assert "`python bench/quality.py --only deit --seeds 3 " in text and "seeds 0, 1, 2:" in text
    mae_part, deit_part = text.split("### 3. DeiT")
    assert "deit-hard-s0" in deit_part and f"{tmp_path / 'w2'}/" in deit_part
    assert "mae-finetune-s0" in mae_part and f"{tmp_path / 'w2'}/" not in mae_part
    # a run of every claim replaces everything
    assert quality.merge_previous({**merged, "claims": ["mae", "deit"]}, merged)["claims"] == ["mae", "deit"]


def test_mpp_mp3_chain_and_references(tmp_path, monkeypatch, fake_machine):
    """Claim 8: per seed, pretrain_beit with each of ViT's targets on a plain ViT and pretrain_mp3, each job's own
    export finetuned with the same arguments as the from-scratch arm (init and run name aside); claim 1's rows from
    the same invocation are copied into the table as references, never judged."""
    steps, comparisons = _plan(tmp_path, ["mpp_mp3"])
    for seed in (0, 1):
        scratch = steps[f"mpp_mp3.scratch-s{seed}"]
        assert _arg(scratch, "model.init") == "none"
        for stage, target in (("mean-color", "mean_color"), ("mean-color-4x4", "mean_color_4x4"),
                              ("pixels-l2", "pixels_l2"), ("mp3", None)):
            pretrain, finetune = steps[f"mpp_mp3.{stage}-s{seed}"], steps[f"mpp_mp3.{stage}-finetune-s{seed}"]
            assert pretrain.argv[1] == ("launch/pretrain_mp3.py" if target is None else "launch/pretrain_beit.py")
            if target:
                assert _arg(pretrain, "target") == target and _arg(pretrain, "model.rel_pos_bias") == "none"
            assert _arg(finetune, "model.init") == pretrain.run_dir + "/export"
            strip = {"model.init", "run.name"}
            assert ([a for a in finetune.argv if a.split("=")[0] not in strip]
                    == [a for a in scratch.argv if a.split("=")[0] not in strip])
    assert [c.arms[1] for c in comparisons] == ["ViT from scratch"] * 4
    monkeypatch.setattr(quality, "RESULTS_DIR", tmp_path / "results")   # no previous report
    assert quality.main(["--only", "mae,mpp_mp3", "--workdir", str(tmp_path / "w"), "--no-write"],
                        runner=fake_runner) == 0
    report = json.loads((tmp_path / "w" / "quality.json").read_text())
    arms = report["results"]["mpp_mp3"]["arms"]
    reference = [a for a in arms if a.startswith("reference, claim 1")]
    assert len(reference) == 2 and not any("claim 2" in a for a in arms)
    assert arms[reference[0]]["top-1 (%)"] == report["results"]["mae"]["arms"]["MAE -> finetune"]["top-1 (%)"]
    assert arms["MP3"]["val position chance 1/L (%)"]["n"] == 2
    assert len(report["results"]["mpp_mp3"]["verdicts"]) == 4


def test_sam_chain_shares_claim_4s_backbone(tmp_path):
    """Claim 9 alone pretrains claim 4's MAE backbone once; with claim 4 it reuses claim 4's; the two SAM arms differ
    only in init and run name, and the comparisons are 1-point and box mIoU."""
    steps, comparisons = _plan(tmp_path, ["sam"])
    assert _arg(steps["sam.pretrain"], "optim.max_steps") == _arg(
        _plan(tmp_path, ["detr"])[0]["detr.pretrain"], "optim.max_steps")
    backbone = steps["sam.convert-pretrain"].argv[-1]
    for seed in (0, 1):
        mae, scratch = steps[f"sam.pretrained-s{seed}"], steps[f"sam.scratch-s{seed}"]
        assert mae.argv[1] == "launch/finetune_sam.py" and _arg(mae, "model.init") == backbone
        assert _arg(scratch, "model.init") == "scratch" and _arg(mae, "run.seed") == str(seed)
        strip = {"model.init", "run.name"}
        assert ([a for a in mae.argv if a.split("=")[0] not in strip]
                == [a for a in scratch.argv if a.split("=")[0] not in strip])
    assert [c.figure for c in comparisons] == ["1-point mIoU (%)", "box mIoU (%)"]
    both, _ = _plan(tmp_path, ["detr", "sam"])
    assert "sam.pretrain" not in both
    assert _arg(both["sam.pretrained-s0"], "model.init") == both["detr.convert-pretrain"].argv[-1]
