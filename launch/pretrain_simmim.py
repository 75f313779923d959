"""SimMIM pretraining of a Swin Transformer or a ViT on WebDataset shards under DeepSpeed (Xie et al. 2021,
arXiv 2111.09886).

With no arguments: the tiny preset (a small Swin) on the embedded photographs, on the CPU, in a few minutes:
    python launch/pretrain_simmim.py
    python launch/pretrain_simmim.py model.arch=vit_tiny                 # the same with a small BEiT-style ViT
    torchrun --nproc_per_node 2 launch/pretrain_simmim.py optim.max_steps=100
The paper's recipes on GPU nodes (Swin-B at 192 px / window 6, 100 epochs; ViT-B/16 at 224 px, 800 epochs):
    deepspeed --hostfile hostfile launch/pretrain_simmim.py --preset swin_b192 data.train=s3://bucket/imagenet/train
    deepspeed --hostfile hostfile launch/pretrain_simmim.py --preset vit_b16 data.train=s3://bucket/imagenet/train
Finetune the export at 224 px and window 7 (relative position tables resized):
    python launch/finetune_cls.py --preset vit_b16 model.init=runs/pretrain_simmim/swin_b192/export \
        model.img_size=224 model.window_size=7 model.layer_decay=0.9 ...
Overrides are section.key=value (see --help for every key); run.resume=auto continues the run in
runs/pretrain_simmim/<run.name>/ (config.yaml, tb/, checkpoints/, export/, metrics.jsonl).
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("pretrain_simmim", argv)


if __name__ == "__main__":
    sys.exit(main())
