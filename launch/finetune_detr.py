"""DETR object detection finetuning on a pretrained ViT (MAE, BEiT or DeiT backbone folder), or from scratch.

With no arguments: a small DETR from scratch on the embedded tree-crown boxes (deepforest's bundled NEON aerial
images), on the CPU, in a few minutes:
    python launch/finetune_detr.py
    python launch/finetune_detr.py model.init=runs/pretrain_mae/detr_tiny/export     # from an MAE backbone
COCO on GPU nodes (shards from `python -m data_pipeline.write coco instances_train2017.json ...`):
    deepspeed --hostfile hostfile launch/finetune_detr.py --preset vit_b16 model.init=/ckpt/mae_vit_b16 \
        data.train=s3://bucket/coco/train2017 data.val=s3://bucket/coco/val2017
Overrides are section.key=value (see --help); runs/finetune_detr/<run.name>/ holds config.yaml, tb/ (each loss
term, COCO mAP, images with ground-truth and predicted boxes), checkpoints/ (+ best by val map), export/ (the
finetuned backbone as a timm folder), metrics.jsonl.
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("finetune_detr", argv)


if __name__ == "__main__":
    sys.exit(main())
