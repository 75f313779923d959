"""SAM (segment anything) finetuning: a windowed ViT image encoder from a plain ViT export (MAE: the paper's start) or
from scratch, segment-anything's prompt encoder and mask decoder, simulated interactive prompts.

With no arguments: a small SAM from scratch on the embedded emoji instance masks (128 px), on the CPU, in minutes:
    python launch/finetune_sam.py
    python launch/finetune_sam.py model.init=runs/pretrain_mae/emoji        # from an MAE backbone
    python launch/finetune_sam.py model.init=/ckpt/sam_vit_b_folder         # continue a SAM (launch/sam_checkpoint.py)
SA-1B-style shards on GPU nodes (detection shards whose json has segmentation):
    deepspeed --hostfile hostfile launch/finetune_sam.py --preset vit_b16 model.init=/ckpt/mae_vit_b16 \
        data.train=s3://bucket/masks/train data.val=s3://bucket/masks/val
Overrides are section.key=value (see --help); runs/finetune_sam/<run.name>/ holds config.yaml, tb/ (loss terms,
mIoU from 1 point, a box and k points, pictures of prompts and masks), checkpoints/, export/ (the image encoder as a
timm folder, and sam.safetensors + sam.json: the whole model in segment-anything's layout), metrics.jsonl.
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("finetune_sam", argv)


if __name__ == "__main__":
    sys.exit(main())
