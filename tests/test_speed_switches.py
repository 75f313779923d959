"""The speed switches are config keys that change what runs, not only what is logged: fused AdamW, SDPA attention,
torch.compile, pinned memory and prefetch (their measured effects are in bench/RESULTS.md)."""
import copy
import math

import pytest
import torch
import yaml

from launch.pretrain_mae import main
from launch.runtime import engine as engine_lib
from pretrain.mae import MAEConfig, MaskedAutoencoderViT
from test_runtime import photo_shards, read_jsonl, tiny_run_args  # noqa: F401 - photo_shards is a fixture


def test_fused_adamw_switch_reaches_the_optimizer():
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    for fused, expected in (("auto", True), (True, True), (False, False)):
        opt = engine_lib.build_optimizer([{"params": params}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                         on_gpu=False, fused=fused)
        assert bool(opt.defaults["fused"]) is expected
    with pytest.raises(ValueError, match="optim.fused"):
        engine_lib.build_optimizer([{"params": params}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                   on_gpu=False, fused="maybe")


def test_fused_and_plain_adamw_take_the_same_step():
    torch.manual_seed(0)
    w = torch.randn(8, 8)
    grads = [torch.randn(8, 8) for _ in range(3)]
    results = []
    for fused in (True, False):
        p = torch.nn.Parameter(w.clone())
        opt = engine_lib.build_optimizer([{"params": [p]}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05,
                                         on_gpu=False, fused=fused)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_fused_attention_switch_changes_the_kernel_not_the_result():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)).eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert engine_lib.set_fused_attention(model, True) == 3        # 2 encoder + 1 decoder attention modules
    with torch.no_grad():
        fused = model(imgs, noise=noise)[1]
    assert engine_lib.set_fused_attention(model, False) == 3
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    with torch.no_grad():
        plain = model(imgs, noise=noise)[1]
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_compiled_job_trains_like_the_eager_one(photo_shards, tmp_path):  # noqa: F811
    """engine.compile=true: the forward runs through torch.compile, parameter names and so the checkpoints and the
    export are unchanged, and the losses equal the eager run's. The aot_eager backend traces and partitions the graph
    as inductor does, without inductor's minute of C++ code generation on a CPU (bench/ measures inductor); it also
    keeps the eager random stream, so both runs draw the same masks."""
    common = {"optim.max_steps": 3, "log.every": 1, "log.eval_every": 0, "log.images_every": 0, "ckpt.every": 0,
              "data.val": "", "data.pin_memory": "off", "data.prefetch_factor": 3, "data.num_workers": 1}
    losses = {}
    for name, extra in (("eager", {}), ("compiled", {"engine.compile": "true", "engine.compile_backend": "aot_eager",
                                        "engine.fused_attention": "false"})):
        args = tiny_run_args(photo_shards.url, tmp_path, **{**common, **extra, "run.name": name})
        assert main(args) == 0
        run_dir = tmp_path / "pretrain_mae" / name
        losses[name] = [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
        assert (run_dir / "export" / "model.safetensors").exists()
    cfg = yaml.safe_load((tmp_path / "pretrain_mae" / "compiled" / "config.yaml").read_text())
    assert cfg["engine"]["compile"] is True and cfg["engine"]["fused_attention"] is False
    assert cfg["data"]["prefetch_factor"] == 3 and cfg["data"]["pin_memory"] is False
    assert len(losses["eager"]) == 3 and all(math.isfinite(v) for v in losses["compiled"])
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)


@pytest.mark.parametrize("override, message", [
    ("optim.fused=maybe", "optim.fused"),
    ("data.pin_memory=sometimes", "pin_memory"),
    ("data.prefetch_factor=0", "prefetch_factor"),
    ("engine.compile=sometimes", "engine.compile"),
    ("engine.compile=true engine.compile_backend=turbo", "engine.compile_backend"),
])
def test_bad_switch_values_are_config_errors(override, message, tmp_path, caplog):
    assert main([f"run.dir={tmp_path}", *override.split()]) == 2
    assert any("config error" in r.getMessage() and message in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text, value", [("on", True), ("off", False), ("true", True), ("false", False),
                                         ("auto", "auto")])
def test_switches_read_on_off_as_yaml_does(text, value, tmp_path):
    """`optim.fused=off` on a command line and `fused: off` in a preset mean the same (YAML reads off as false)."""
    from launch.runtime.config import parse_args
    from pretrain.mae import MAE_ARCHS, MAEConfig

    preset = tmp_path / "p.yaml"
    preset.write_text(f"optim:\n  fused: {text}\ndata:\n  pin_memory: {text}\n")
    for argv in ([f"optim.fused={text}", f"data.pin_memory={text}"], ["--preset", str(preset)]):
        argv = argv + ["data.train=embedded:photos", "optim.max_steps=1"]
        cfg, _ = parse_args("pretrain_mae", MAEConfig, argv, MAE_ARCHS)
        assert cfg.optim.fused == value and cfg.data.pin_memory == value



def test_one_rank_without_zero_skips_the_identity_allreduce_and_steps_like_torch():
    """engine.zero_stage=0 on one rank: DeepSpeed's gradient all-reduce is switched off (it would only flatten and
    copy every gradient back), and two accumulated micro-batches still take exactly torch's AdamW step."""
    from launch.runtime import distributed

    world = distributed.init()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
        reference = copy.deepcopy(model)
        optimizer = engine_lib.build_optimizer([{"params": list(model.parameters())}], lr=0.1, betas=(0.9, 0.95),
                                               eps=1e-8, weight_decay=0.05, on_gpu=False)
        ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**12}
        engine = engine_lib.initialize(model, optimizer, ds)
        assert engine.enable_backward_allreduce is False
        batches = [torch.randn(4, 8) for _ in range(4)]
        for x in batches:   # two optimizer steps of two micro-batches each
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
        for first, second in (batches[:2], batches[2:]):
            ((reference(first).pow(2).mean() + reference(second).pow(2).mean()) / 2).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        for got, want in zip(engine.module.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        distributed.shutdown(world)
