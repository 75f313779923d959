"""DeiT: a ViT student with a distillation token trained against a frozen teacher (Touvron et al., arXiv 2012.12877).

The embedded default (CPU, minutes): train a teacher on the digits with finetune_cls, then distil a small ViT from it:
    python launch/finetune_cls.py model.init=timm:resnet18 run.name=teacher
    python launch/pretrain_deit.py teacher=runs/finetune_cls/teacher/export_best
    python launch/pretrain_deit.py teacher=timm:resnet18 teacher_weights=teacher.safetensors distill=soft
    python launch/pretrain_deit.py distill=none run.name=no_distill                        # plain DeiT training
The paper's recipe on GPU nodes (DeiT-B distilled from its RegNetY-16GF; DeiT III):
    deepspeed --hostfile hostfile launch/pretrain_deit.py --preset deit_b16 teacher=timm:regnety_160 \
        teacher_weights=/ckpt/regnety_160-a5fe301d.pth data.train=s3://bucket/imagenet/train data.val=...
    deepspeed --hostfile hostfile launch/pretrain_deit.py --preset deit3_b16 data.train=... data.val=...
Short keys: teacher, teacher_weights, distill (= model.*). runs/pretrain_deit/<run.name>/ holds config.yaml, tb/,
checkpoints/, metrics.jsonl and export/: backbone.safetensors + .json (a plain timm ViT for finetune_cls
model.init=) and classifier.safetensors + .json (the whole student, timm's deit_*_distilled_* keys).
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("pretrain_deit", argv)


if __name__ == "__main__":
    sys.exit(main())
