"""Image classification: finetune a pretrained backbone (MAE/BEiT recipe), train from scratch, or linear-probe.

With no arguments: a small ViT from scratch on the embedded scikit-learn digits, on the CPU, in a few minutes:
    python launch/finetune_cls.py
    python launch/finetune_cls.py model.init=runs/pretrain_mae/tiny/export          # from an MAE backbone
    python launch/finetune_cls.py model.init=timm:resnet18 data.train=embedded:fashion_mnist \
        data.val=embedded:fashion_mnist_val
    python launch/finetune_cls.py --preset linprobe model.init=runs/pretrain_mae/tiny/export  # or mode=linprobe
The papers' recipes on GPU nodes (ViT-B/16, 100 epochs; linear probe, 90 epochs):
    deepspeed --hostfile hostfile launch/finetune_cls.py --preset vit_b16 model.init=/ckpt/mae_vit_b16 \
        data.train=s3://bucket/imagenet/train data.val=s3://bucket/imagenet/val
    deepspeed launch/finetune_cls.py --preset vit_b16_linprobe model.init=/ckpt/mae_vit_b16 data.train=... data.val=...
Overrides are section.key=value (see --help); runs/finetune_cls/<run.name>/ holds config.yaml, tb/ (loss, lr,
top-1/top-5, confusion matrix), checkpoints/ (+ best), export/ and export_best/ (timm classifier), metrics.jsonl.
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("finetune_cls", argv)


if __name__ == "__main__":
    sys.exit(main())
