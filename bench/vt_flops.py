"""FLOPs and parameters of VT-ResNet-18/34 (contracts/visual_transformer.py) against timm's ResNet-18/34, beside the
paper's figures (Wu et al. 2020, arXiv 2006.03677), and the image side from which VT-ResNet-18 is the cheaper one.

    python bench/vt_flops.py                 # prints the tables, writes bench/results/vt_flops.json and the
                                             # section between <!-- vt_flops:begin --> and <!-- vt_flops:end -->
    python bench/vt_flops.py --no-write      # prints only

Multiply-adds are torch's FlopCounterMode count of one image's forward pass (eval mode) divided by 2: convolutions
and matrix products, which is what the paper's "FLOPs" (ResNet-18: 1.8 G) count; softmax, normalisation and
activations are not counted, by either. "Stage 5" is what VT-ResNet replaces: ResNet's layer4 + classifier against
the VT modules + norm + classifier (the total minus the shared stem and layer1..layer3).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import contracts.backbone  # noqa: E402,F401 - registers the VT-ResNets with timm
from bench.quality import replace_section  # noqa: E402 - the one marker-section writer
from bench.report import header, write_report  # noqa: E402

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
OUT_JSON = ROOT / "bench" / "results" / "vt_flops.json"
BEGIN, END = "<!-- vt_flops:begin -->", "<!-- vt_flops:end -->"
PAIRS = (("resnet18", "vitpretrain_vt_resnet18"), ("resnet34", "vitpretrain_vt_resnet34"))
SIDES = (32, 64, 96, 128, 160, 192, 224)
# The paper's Table (ImageNet, 224 px) as recalled; no copy of the paper was at hand to verify them. The issue that
# asked for this benchmark recalls about 1.14 G for VT-ResNet-18 instead.
PAPER = {"resnet18": {"gmacs": 1.814, "params_m": 11.7, "top1": 69.9},
         "vitpretrain_vt_resnet18": {"gmacs": 1.569, "params_m": 11.7, "top1": 72.1}}


def macs(fn: Any, side: int, device: str = "cpu") -> float:
    """Multiply-adds of `fn` on one [1, 3, side, side] image (FlopCounterMode FLOPs / 2); device "meta" counts a
    model built on the meta device without computing anything."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(torch.zeros(1, 3, side, side, device=device))
    return counter.get_total_flops() / 2


def stages_1_to_4(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stem and layer1..layer3 both families share (timm names): images -> the stride-16 map."""
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    return model.layer3(model.layer2(model.layer1(x)))


def measure(name: str, sides: tuple[int, ...]) -> dict[str, Any]:
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1.",
                                                                                "layer2.", "layer3.")))
    at = {side: macs(model, side) for side in sides}
    stage5 = at[224] - macs(lambda x: stages_1_to_4(model, x), 224)
    return {"params": params, "stage5_params": params - shared, "macs": at, "stage5_macs": stage5}


def markdown(results: dict[str, dict[str, Any]], sides: tuple[int, ...]) -> str:
    lines = ["| model | GMACs at 224 | params (M) | stage 5 GMACs | stage 5 params (M) | paper (recalled): GMACs, "
             "params, ImageNet top-1 |", "|---|---:|---:|---:|---:|---|"]
    for base, vt in PAIRS:
        for name in (base, vt):
            r, paper = results[name], PAPER.get(name)
            cited = (f"{paper['gmacs']:.3f} G, {paper['params_m']:.1f} M, {paper['top1']:.1f}%" if paper
                     else "not recalled")
            lines.append(f"| {name} | {r['macs'][224] / 1e9:.3f} | {r['params'] / 1e6:.2f} | "
                         f"{r['stage5_macs'] / 1e9:.3f} | {r['stage5_params'] / 1e6:.2f} | {cited} |")
    lines += ["", "Multiply-adds (G) by image side:", "",
              "| model | " + " | ".join(f"{s} px" for s in sides) + " |", "|---|" + "---:|" * len(sides)]
    for name in (n for pair in PAIRS for n in pair):
        lines.append(f"| {name} | " + " | ".join(f"{results[name]['macs'][s] / 1e9:.3f}" for s in sides) + " |")
    r18, vt18 = results["resnet18"], results["vitpretrain_vt_resnet18"]
    cheaper = [s for s in sides if vt18["macs"][s] < r18["macs"][s]]
    ratio = r18["stage5_macs"] / vt18["stage5_macs"]
    lines += ["", f"- At 224 px VT-ResNet-18 needs {vt18['macs'][224] / r18['macs'][224]:.2f}x ResNet-18's "
              f"multiply-adds; its stage 5 needs {1 / ratio:.2f}x of ResNet-18's layer4 + fc ({ratio:.1f}x fewer; "
              "the paper's first version: up to 6.9x fewer in the stage) and has "
              f"{vt18['stage5_params'] / r18['stage5_params']:.2f}x its parameters.",
              "- The VT modules work on 16 tokens whatever the image size, so their cost does not shrink with the "
              "image: VT-ResNet-18 is the cheaper model "
              + (f"from {cheaper[0]} px up (of the sides measured)." if cheaper else "at none of the sides measured."),
              "- Against the paper's figures: the transformer here is timm's pre-norm `Block` (q, k, v and output "
              "projections, MLP as wide as the tokens), where the paper's eq. 3-4 have half-width keys and queries "
              "and no value or output projection: about twice its transformer weights and FLOPs, hence more "
              "parameters than ResNet-18 where the paper reports about as many. The paper's figures above are "
              "recalled, not checked against the paper (the issue recalls about 1.14 G for VT-ResNet-18)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/vt_flops.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md and results/")
    args = parser.parse_args(argv)
    results = {name: measure(name, SIDES) for pair in PAIRS for name in pair}
    text = markdown(results, SIDES)
    print(text)
    if not args.no_write:
        write_report({**header(), "torch": torch.__version__, "timm": timm.__version__, "paper_recalled": PAPER,
                      "results": results}, OUT_JSON)
        RESULTS_MD.write_text(replace_section(RESULTS_MD.read_text(), text, BEGIN, END))
        print(f"wrote the section of {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
