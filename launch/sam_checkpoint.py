"""Move SAM weights between segment-anything's checkpoint files and this project's SAM folder (sam.json +
sam.safetensors, what finetune_sam exports and takes as model.init).

    # a published checkpoint in: a folder to finetune from (model.init=DIR) or to predict with
    python launch/sam_checkpoint.py from-pth sam_vit_b_01ec64.pth /ckpt/sam_vit_b
    # a finetuned export out: a .pth that segment-anything's own builder loads
    python launch/sam_checkpoint.py to-pth runs/finetune_sam/tiny/export sam_tiny.pth

from-pth reads the state dict with torch.load(weights_only=True) (tensors only; segment-anything's files are plain
state dicts), infers the geometry from the tensor shapes (the decoder's head count leaves no trace: --decoder-heads,
8 in every published SAM), loads it strictly into segment-anything's `Sam` of that geometry as a check, and writes
the folder. to-pth writes the same state dict with torch.save: `sam_model_registry["vit_b"](checkpoint=PATH)` loads it
when sam.json's "registry" names a key; other geometries (the tiny preset's) are built from sam.json's spec with
`finetune.sam.model.load_segment_anything` (segment-anything's classes with those sizes; the registry has only
vit_b/l/h at 1024 px).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    inward = sub.add_parser("from-pth", help="segment-anything .pth -> SAM folder")
    inward.add_argument("pth")
    inward.add_argument("out")
    inward.add_argument("--decoder-heads", type=int, default=8)
    outward = sub.add_parser("to-pth", help="SAM folder (or run dir with export/) -> segment-anything .pth")
    outward.add_argument("folder")
    outward.add_argument("out")
    args = parser.parse_args(argv)

    from contracts.backbone import save_export
    from finetune.sam.model import load_segment_anything, spec_from_segment_anything
    from finetune.sam.task import SAM_EXPORT, read_sam_folder, sam_meta

    if args.direction == "from-pth":
        path = Path(args.pth)
        if not path.is_file():
            print(f"from-pth: {path} is not a file; pass a segment-anything checkpoint (sam_vit_b_01ec64.pth)",
                  file=sys.stderr)
            return 2
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
            print(f"from-pth: {path} does not load as a tensor state dict with weights_only=True ({e}); pass "
                  "segment-anything's checkpoint file", file=sys.stderr)
            return 2
        state = {k.removeprefix("module."): v for k, v in state.items()} if isinstance(state, dict) else {}
        try:
            spec = spec_from_segment_anything(state, args.decoder_heads)
            load_segment_anything(spec, state)   # strict: every key of segment-anything's Sam, no other
        except (KeyError, RuntimeError, ValueError, IndexError) as e:
            print(f"from-pth: {path} is not a segment-anything SAM state dict ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300]}); pass sam_vit_b/l/h_*.pth or a .pth written by to-pth",
                  file=sys.stderr)
            return 2
        save_export(args.out, SAM_EXPORT, {k: v.float().contiguous() for k, v in state.items()},
                    sam_meta(spec, source="segment-anything checkpoint", init=str(path)))
        print(f"wrote {args.out}/{SAM_EXPORT}.safetensors + {SAM_EXPORT}.json (registry {spec.registry_key()}, "
              f"{spec.depth} x {spec.embed_dim} encoder at {spec.img_size} px)")
        return 0
    try:
        spec, state, meta = read_sam_folder(args.folder)
    except ValueError as e:
        print(f"to-pth: {e}; pass a finetune_sam export (or its run directory) or a from-pth folder",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
    except OSError as e:
        print(f"to-pth: cannot write {out} ({e})", file=sys.stderr)
        return 1
    key = meta.get("registry")
    print(f"wrote {out}: " + (f"sam_model_registry['{key}'](checkpoint='{out}')" if key else
                              "a custom geometry: finetune.sam.model.load_segment_anything(SamSpec.from_dict("
                              "sam.json['spec']), torch.load(path, weights_only=True))"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
