"""FLIP: language-image pretraining of a ViT that sees only the visible patches (Li et al., arXiv 2212.00794).

With no arguments: the tiny preset on the embedded emoji captions (Noto glyphs named by Unicode), on the CPU, in a few
minutes; evaluated by retrieval on held-out glyphs and zero-shot on Fashion-MNIST:
    python launch/pretrain_flip.py
    python launch/pretrain_flip.py mask_ratio=0                         # plain CLIP (every patch seen)
    torchrun --nproc_per_node 2 launch/pretrain_flip.py optim.max_steps=100   # features gathered across ranks
FLIP's recipe on GPU nodes (a CLIP ViT-B/16; captioned shards from python -m data_pipeline.write), then the
unmasked tuning stage from its weights:
    deepspeed --hostfile hostfile launch/pretrain_flip.py --preset vit_b16 data.train=s3://bucket/laion/train
    deepspeed --hostfile hostfile launch/pretrain_flip.py --preset unmasked_tuning \
        init=runs/pretrain_flip/vit_b16 data.train=s3://bucket/laion/train
Exports: runs/pretrain_flip/<name>/export/ (the image tower, a timm backbone for finetune_cls / finetune_detr) and
export/open_clip/ (open_clip.create_model_and_transforms("local-dir:runs/pretrain_flip/<name>/export/open_clip")).
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("pretrain_flip", argv)


if __name__ == "__main__":
    sys.exit(main())
