"""How much a backbone's patch tokens differ from position to position, on real images: the diagnostic behind the
DETR reading in bench/RESULTS.md (a detector localises from these differences).

    python bench/feature_spread.py DATA_URL BACKBONE [BACKBONE ...] [--sides 128 320] [--images 8]

BACKBONE is a backbone folder (backbone.json + backbone.safetensors, or a run directory with export/); each is also
measured at its random initialisation (the same timm architecture, weights not loaded). For every backbone and
input side it prints, over the last block's normalised patch tokens [B, D, h, w] (what finetune_detr's neck reads):

* spatial variance: the variance of each channel across the positions of one image, averaged over channels and
  images (0 when every position carries the same vector);
* cosine between positions: the mean cosine similarity of every pair of positions after a LayerNorm over channels
  at each position (what the neck's LayerNorm2d leaves): 1 = identical, ~0 for unrelated vectors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spread(tokens: Tensor) -> tuple[float, float]:
    """tokens [B, D, h, w] -> (spatial variance, mean cosine between positions after a per-position LayerNorm)."""
    x = tokens.flatten(2).float()                                   # [B, D, T]
    spatial_var = x.var(dim=2).mean().item()
    unit = F.normalize(F.layer_norm(x.transpose(1, 2), (x.shape[1],)), dim=-1)   # [B, T, D]
    cosine = (unit @ unit.transpose(1, 2)).mean().item()
    return spatial_var, cosine


def last_tokens(model: torch.nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        (tokens,) = model.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW",
                                                intermediates_only=True)
    return tokens


def load_images(url: str, count: int) -> Tensor:
    """`count` images of the dataset, resized and centre-cropped to 224 and normalised with ImageNet's statistics."""
    from data_pipeline.stream import build_stream
    from data_pipeline.transforms import EvalTransform

    stream = build_stream(url, map_fn=EvalTransform(224), batch_size=count, num_workers=0, train=False)
    return next(iter(stream))["image"][:count]


def main(argv: list[str] | None = None) -> int:
    from finetune import backbone as bb

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="dataset URL (shards with index.json, or embedded:NAME)")
    parser.add_argument("backbones", nargs="+", help="backbone folders (or run directories with export/)")
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 320], help="input sides, px (default 128 320)")
    parser.add_argument("--images", type=int, default=8, help="images measured (default 8)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = load_images(args.data, args.images)
    width = max(len("backbone"), *(len(n) for n in args.backbones))
    print(f"{'backbone':<{width}} {'weights':<8} {'side':>5} {'spatial var':>12} {'cos between positions':>22}")
    for name in args.backbones:
        try:
            folder = bb.find_backbone(name)
        except ValueError as e:
            raise SystemExit(f"{name}: {e}") from None
        meta = bb.read_config(folder)
        for weights in ("trained", "init"):
            model = bb.create_from_config(meta, dynamic_img_size=True).eval()
            if weights == "trained":
                bb.load_weights(model, bb.read_weights(folder), meta)
            for side in args.sides:
                x = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
                var, cos = spread(last_tokens(model, x))
                print(f"{name:<{width}} {weights:<8} {side:>5} {var:>12.3f} {cos:>22.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
