"""The Task interface as code (contracts/task.py) and the runtime's EMA (launch/runtime/ema.py, optim.ema_decay)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contracts.task import HOOKS, TaskError, TaskHooks, check_task
from launch import jobs
from launch.runtime import checkpoint, run_job
from pretrain.mae import MAEConfig, MAETask

TINY_MAE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)


def run_args(data_url: str, run_dir: Path, name: str, **overrides) -> list[str]:
    settings = {"data.train": data_url, "data.val": data_url, "data.batch_size": 4, "data.num_workers": 0,
                "optim.max_steps": 4, "optim.warmup_steps": 1, "optim.base_lr": 1e-3, "log.every": 2,
                "log.eval_every": 2, "log.images_every": 0, "ckpt.every": 2, "ckpt.keep": 0, "run.dir": run_dir,
                "run.name": name, **overrides}
    return [f"model.{k}={v}" for k, v in TINY_MAE.items()] + [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture
def photo_shards(shard_factory):
    """2 shards x 8 random 32-px PNG images with index.json."""
    return shard_factory.write([[shard_factory.sample(f"{s * 8 + i:06d}", size=32) for i in range(8)]
                                for s in range(2)], name="photos")


# --- the interface ------------------------------------------------------------------------------------------------

class MisspeltHook(MAETask):
    def after_stepp(self, model, step):  # meant after_step: would silently never run
        raise AssertionError("never called")


def test_every_task_declares_hooks_once():
    assert {"on_dataset", "after_step", "extra_state", "load_extra_state", "train_collate", "eval_collate",
            "export_name", "required_members", "extra_exports", "evaluate_ema"} <= set(HOOKS)
    task = MAETask(MAEConfig(**TINY_MAE))
    check_task(task)
    assert task.train_collate is None and task.extra_state() == {} and task.extra_exports({}) == {}

    class OnEpoch(MAETask):
        def on_epoch(self, epoch):
            pass

    with pytest.raises(TaskError, match="on_epoch"):
        check_task(OnEpoch(MAEConfig(**TINY_MAE)))

    class NoHooks:  # a task that does not inherit TaskHooks
        pass

    with pytest.raises(TaskError, match="TaskHooks"):
        check_task(NoHooks())

    class Missing(TaskHooks):
        model = torch.nn.Linear(1, 1)

    with pytest.raises(TaskError, match="training_step"):
        check_task(Missing())


def test_unknown_hook_fails_at_start(photo_shards, tmp_path, caplog):
    """A misspelt hook is a configuration error (exit 2) naming it and the declared hooks, before any step."""
    args = run_args(photo_shards.url, tmp_path, "typo")
    assert run_job(job="pretrain_mae", task_config=MAEConfig, build_task=MisspeltHook, argv=args) == 2
    assert "after_stepp" in caplog.text and "did you mean after_step" in caplog.text
    assert not (tmp_path / "pretrain_mae" / "typo" / "checkpoints").exists()


# --- the runtime's EMA --------------------------------------------------------------------------------------------

def ema_run(url: str, tmp_path: Path, name: str, stage: int, **overrides) -> Path:
    args = run_args(url, tmp_path, name, **{"optim.ema_decay": 0.5, "engine.zero_stage": stage, **overrides})
    assert jobs.run("pretrain_mae", args) == 0
    return tmp_path / "pretrain_mae" / name


def test_ema_under_zero_0_and_3_is_evaluated_checkpointed_resumed_and_exported(photo_shards, tmp_path, caplog):
    """optim.ema_decay: val/*_ema logged, the EMA in every checkpoint, export_ema/ beside export/; ZeRO-3 (parameters
    partitioned) gives ZeRO-0's EMA; a run stopped at step 2 and resumed ends with the uninterrupted run's EMA."""
    emas = {}
    for stage in (0, 3):
        run_dir = ema_run(photo_shards.url, tmp_path, f"z{stage}", stage)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "val/loss" in r]
        assert [r["step"] for r in evals] == [2, 4] and all("val/loss_ema" in r for r in evals)
        states = torch.load(checkpoint.model_states_file(run_dir / "checkpoints" / "step00000004"),
                            map_location="cpu", weights_only=True)
        export, export_ema = (sorted(p.name for p in (run_dir / d).iterdir()) for d in ("export", "export_ema"))
        assert export == export_ema
        weights = [p for p in (run_dir / "export_ema").iterdir() if p.suffix == ".safetensors"]
        emas[stage] = load_file(str(weights[0]))
        final = load_file(str(run_dir / "export" / weights[0].name))
        assert emas[stage].keys() == final.keys()
        assert any(not torch.equal(emas[stage][k], final[k]) for k in final)  # decay 0.5: not the last weights
        assert set(states["ema"]) == set(MAETask(MAEConfig(**TINY_MAE)).model.state_dict())
    for key, value in emas[0].items():
        torch.testing.assert_close(emas[3][key], value, rtol=1e-4, atol=1e-5)

    # stopped after step 2, resumed: the EMA comes back from the checkpoint
    ema_run(photo_shards.url, tmp_path, "resumed", 3, **{"optim.max_steps": 2})
    caplog.clear()
    run_dir = ema_run(photo_shards.url, tmp_path, "resumed", 3, **{"run.resume": "auto"})
    assert "resuming from" in caplog.text and "holds no EMA" not in caplog.text
    resumed = load_file(str(next((run_dir / "export_ema").glob("*.safetensors"))))
    for key, value in emas[3].items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
