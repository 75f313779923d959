"""VT-ResNet (contracts/visual_transformer.py, Wu et al. 2020): the tokenizers and the projector against the paper's
formulas written out directly, the recurrent tokenizer fed by the previous module's tokens, timm ResNet weights of
stages 1-4 loading as they are, the export round trip through the backbone contract and plain timm (in a process
that imports nothing of the project but contracts.backbone), a 2-step finetune_cls run with the vt_resnet18 preset,
and fewer FLOPs than ResNet-18 at 224 px."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.optim import param_groups_layer_decay

from contracts import backbone as bb
from contracts import visual_transformer as vt
from finetune.classification import ClassificationConfig
from launch import finetune_cls
from launch.runtime import config

ROOT = Path(__file__).resolve().parents[1]
# a VT-ResNet-18 with narrow tokens: the geometry of the real one (2 modules, 16 tokens, ResNet-18 stages 1-4)
SMALL = dict(token_dim=32, num_heads=2, num_classes=7)


def small_model(**kwargs) -> vt.VTResNet:
    torch.manual_seed(0)
    return timm.create_model("vitpretrain_vt_resnet18", **{**SMALL, **kwargs}).eval()


def test_filter_tokenizer_is_the_papers_formula():
    """T = softmax_HW(X W_A)^T X (§3.1.1, eq. 1), then the value projection: (A^T X) W_V = A^T (X W_V)."""
    torch.manual_seed(0)
    n, hw, c, l, ct = 2, 12, 8, 4, 6
    x = torch.randn(n, hw, c)
    tok = vt.FilterTokenizer(c, c, l)
    with torch.no_grad():
        tok.value.weight.copy_(torch.eye(c))             # W_V = I: exactly the paper's T
    w_a = tok.attn.weight.t()                             # [C, L]
    a = torch.softmax(x @ w_a, dim=1)                     # softmax over the HW pixels
    torch.testing.assert_close(tok(x), a.transpose(1, 2) @ x)
    torch.testing.assert_close(tok.attention(x).sum(dim=1), torch.ones(n, l))

    wide = vt.FilterTokenizer(c, ct, l)
    a = torch.softmax(torch.einsum("npc,cl->npl", x, wide.attn.weight.t()), dim=1)
    expected = torch.einsum("npl,npd->nld", a, torch.einsum("npc,cd->npd", x, wide.value.weight.t()))
    torch.testing.assert_close(wide(x), expected)
    assert wide(x).shape == (n, l, ct)


def test_recurrent_tokenizer_uses_the_previous_tokens():
    """W_R = T_in W_{T->R}, T = softmax_HW(X W_R^T)^T X W_V (§3.1.2, eq. 2): other previous tokens, other tokens."""
    torch.manual_seed(0)
    n, hw, c, l, ct = 2, 12, 8, 4, 6
    x, t_in = torch.randn(n, hw, c), torch.randn(n, l, ct)
    tok = vt.RecurrentTokenizer(c, ct, l)
    w_r = t_in @ tok.token_to_filter.weight.t()           # [N, L, C]
    a = torch.softmax(x @ w_r.transpose(1, 2), dim=1)     # [N, HW, L]
    torch.testing.assert_close(tok(x, t_in), a.transpose(1, 2) @ x @ tok.value.weight.t())
    assert not torch.allclose(tok(x, t_in), tok(x, t_in.flip(1)))   # the token order sets the new tokens' order
    with pytest.raises(ValueError, match="previous module's tokens"):
        tok(x)


def test_projector_formula_and_residual():
    """X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T / sqrt(C)) T W_V (§3.3, eq. 5): shape of X_in, and X_in itself
    when the tokens carry nothing back (W_V = 0)."""
    torch.manual_seed(0)
    n, hw, c, l, ct = 2, 12, 8, 4, 6
    x, t = torch.randn(n, hw, c), torch.randn(n, l, ct)
    proj = vt.Projector(c, ct)
    q, k, v = x @ proj.q.weight.t(), t @ proj.k.weight.t(), t @ proj.v.weight.t()
    expected = x + torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1) @ v
    out = proj(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)
    with torch.no_grad():
        proj.v.weight.zero_()
    torch.testing.assert_close(proj(x, t), x)


def test_model_shapes_and_module_chain():
    """Tokens [N, 16, C_T] from forward_features, logits from forward, the projected map [N, 256, H/16, W/16] from
    forward_dense; module 0 tokenizes with filters, module 1 recurrently from module 0's tokens and projected map."""
    model = small_model()
    assert isinstance(model.vt[0].tokenizer, vt.FilterTokenizer)
    assert isinstance(model.vt[1].tokenizer, vt.RecurrentTokenizer) and len(model.vt) == 2
    x = torch.randn(2, 3, 64, 96)
    seen = {}
    model.vt[0].register_forward_hook(lambda m, args, out: seen.update(first=out))
    model.vt[1].tokenizer.register_forward_pre_hook(lambda m, args: seen.update(second_in=args))
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model(x)
        dense = model.forward_dense(x)
        stage4 = model.forward_stages(x)
    assert tokens.shape == (2, 16, 32) and logits.shape == (2, 7)
    assert dense.shape == stage4.shape == (2, 256, 4, 6)
    projected, first_tokens = seen["first"]
    second_x, second_tokens = seen["second_in"]
    torch.testing.assert_close(second_tokens, first_tokens)            # the recurrent tokenizer's T_in
    torch.testing.assert_close(second_x, projected)                    # and module 0's X_out
    assert not torch.allclose(projected, stage4.flatten(2).transpose(1, 2))
    torch.testing.assert_close(model.forward_head(tokens), logits)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)


def test_timm_resnet_stage_weights_load():
    """timm's resnet18 weights of stages 1-4 (stem, layer1..layer3) load under the same keys and give the same map."""
    torch.manual_seed(1)
    resnet = timm.create_model("resnet18").eval()
    model = small_model()
    missing, unexpected = model.load_state_dict(vt.resnet_stage_weights(resnet.state_dict()), strict=False)
    assert not unexpected and missing and all(k.startswith(("vt.", "norm.", "head.")) for k in missing)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.act1(resnet.bn1(
            resnet.conv1(x)))))))
        torch.testing.assert_close(model.forward_stages(x), expected)


def test_layer_decay_groups_follow_depth():
    """timm's layer decay through group_matcher: stem < ResNet blocks < VT modules < norm + head."""
    model = small_model()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scale = {name: g["lr_scale"] for g in groups for name, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert scale["conv1.weight"] < scale["layer1.0.conv1.weight"] < scale["layer3.1.conv2.weight"]
    assert scale["layer3.1.conv2.weight"] < scale["vt.0.tokenizer.attn.weight"] < scale["vt.1.projector.q.weight"]
    assert scale["vt.1.projector.q.weight"] < scale["head.weight"] == 1.0


def test_export_round_trip_through_the_contract(tmp_path):
    """save_backbone writes a timm folder that names its requirement; load_strict, load_resampled and plain timm
    (a fresh process importing contracts.backbone and nothing else of the project) rebuild the same model."""
    model = small_model()
    with torch.no_grad():
        for p in model.parameters():   # away from the zero / constant inits, so that any misplaced tensor shows
            p.add_(torch.randn_like(p) * 0.02)
    folder = bb.save_backbone(tmp_path / "export", model, architecture="vitpretrain_vt_resnet18",
                              model_args=SMALL, pretrained_cfg={"input_size": [3, 64, 64]}, extra={"source": "test"})
    config = json.loads((folder / bb.CONFIG_NAME).read_text())
    assert config["architecture"] == "vitpretrain_vt_resnet18"
    assert "import contracts.backbone" in config["vitpretrain"]["requires"]
    assert bb.read_config(folder)["model_kwargs"] == {"num_classes": 7, "token_dim": 32, "num_heads": 2}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(bb.load_strict(folder).eval()(x), expected)
        new, _, report = bb.load_resampled(folder, num_classes=4)
        torch.testing.assert_close(new.eval().forward_features(x), model.forward_features(x))
        assert sorted(report.missing) == ["head.bias", "head.weight"] and not report.unexpected
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, timm, contracts.backbone\n"
        f"m = timm.create_model('local-dir:{folder}', pretrained=True).eval()\n"
        f"x = torch.load('{tmp_path / 'x.pt'}', weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(x), '{tmp_path / 'y.pt'}')\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in "
        "('contracts', 'data_pipeline', 'pretrain', 'finetune', 'launch')))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['contracts', 'contracts.backbone', 'contracts.visual_transformer']"
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_finetune_cls_two_steps_with_the_preset(tmp_path):
    """The vt_resnet18 preset (model.init=timm:vitpretrain_vt_resnet18) on the embedded digits at 32 px: two steps,
    an export that plain timm reloads key for key."""
    args = ["--preset", "vt_resnet18", "data.train=embedded:digits", "data.val=", "model.num_classes=10",
            "model.img_size=32", "data.batch_size=8", "data.num_workers=0", "optim.max_steps=2",
            "optim.warmup_steps=1", "log.every=1", "ckpt.every=0", "ckpt.best_metric=", f"run.dir={tmp_path}",
            "run.name=vt"]
    assert finetune_cls.main(args) == 0
    export = tmp_path / "finetune_cls" / "vt" / "export"
    meta = bb.read_config(export)
    assert meta["architecture"] == "vitpretrain_vt_resnet18" and meta["model_kwargs"]["num_classes"] == 10
    tensors = load_file(str(export / bb.WEIGHTS_NAME))
    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    assert set(tensors) == set(model.state_dict())
    rows = [json.loads(line) for line in (tmp_path / "finetune_cls" / "vt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    # the export is a backbone folder like any other: finetune_cls takes it (the CNN is built without the image
    # size and drop path a ViT would take) and starts from its weights
    args = [a for a in args if not a.startswith(("--preset", "vt_resnet18", "run.name="))]
    assert finetune_cls.main(args + [f"model.init={export}", "optim.max_steps=1", "run.name=again"]) == 0
    again = bb.read_config(tmp_path / "finetune_cls" / "again" / "export")
    assert again["architecture"] == "vitpretrain_vt_resnet18" and again["model_kwargs"]["num_classes"] == 10


def load_bench(name: str):
    """A bench/ script as a module (bench is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_preset_recipe_and_quality_claim_commands(tmp_path):
    """The ImageNet preset resolves on 8 GPUs (lr 0.1 per 256 images); the quality claim's arms, in both of its
    presets, parse as finetune_cls commands and differ only in model.init and the run name."""
    cfg, _ = config.parse_args("finetune_cls", ClassificationConfig, ["--preset", "vt_resnet18",
                                                                      "data.train=s3://b/in1k/train"])
    config.resolve(cfg, job="finetune_cls", preset="vt_resnet18", run_dir="r", world_size=8, batches_per_epoch=1251,
                   num_samples=None, device="cuda:0", precision="bf16")
    assert (cfg.model.init, cfg.model.img_size, cfg.optim.optimizer) == ("timm:vitpretrain_vt_resnet18", 224, "sgd")
    assert cfg.derived.global_batch == 1024 and cfg.derived.lr == pytest.approx(0.4)
    quality = load_bench("quality")
    for preset in (quality.CPU, quality.GPU):
        steps, comparisons = quality.build_plan(preset, ["vt"], [0, 1], quality.Layout(tmp_path))
        runs = {s.key: s for s in steps if s.claim == "vt"}
        assert sorted(runs) == ["vt.resnet18-s0", "vt.resnet18-s1", "vt.vt-resnet18-s0", "vt.vt-resnet18-s1"]
        assert [c.arms for c in comparisons] == [("VT-ResNet-18", "ResNet-18")]
        for seed in (0, 1):
            a, b = runs[f"vt.vt-resnet18-s{seed}"], runs[f"vt.resnet18-s{seed}"]
            strip = ("model.init=", "run.name=")
            assert [x for x in a.argv if not x.startswith(strip)] == [x for x in b.argv if not x.startswith(strip)]
            for step, init in ((a, "timm:vitpretrain_vt_resnet18"), (b, "timm:resnet18")):
                args = [x for x in step.argv[2:] if not x.startswith(("data.train=", "data.val="))]  # not written
                cfg, _ = config.parse_args("finetune_cls", ClassificationConfig, args)
                assert cfg.model.init == init and cfg.model.layer_decay == 1.0


def test_fewer_flops_than_resnet18_at_224():
    """bench/vt_flops.py's count (FlopCounterMode / 2): VT-ResNet-18 below ResNet-18 at 224 px, above it at 32 px
    (16 tokens of 1024 channels cost the same at any image size)."""
    flops = load_bench("vt_flops")
    with torch.device("meta"):
        resnet, model = timm.create_model("resnet18").eval(), timm.create_model("vitpretrain_vt_resnet18").eval()
    r224, v224 = flops.macs(resnet, 224, device="meta"), flops.macs(model, 224, device="meta")
    assert 1.7e9 < r224 < 1.9e9          # ResNet-18's well-known 1.8 G multiply-adds
    assert v224 < r224
    assert flops.macs(model, 32, device="meta") > flops.macs(resnet, 32, device="meta")
