"""IPT image restoration (Chen et al. 2021, arXiv 2012.00364): multi-task pretraining of one transformer body with
per-task heads and tails on degradations synthesised from clean image shards, then single-task finetuning.

With no arguments: a small IPT on the embedded photographs, all six tasks, on the CPU, in a few minutes:
    python launch/finetune_ipt.py
    python launch/finetune_ipt.py tasks=denoise30,sr2                         # any subset (tasks = model.tasks)
    python launch/finetune_ipt.py --preset finetune model.init=runs/finetune_ipt/tiny/export tasks=sr2
    python launch/finetune_ipt.py model.init=runs/pretrain_mae/tiny/export model.n_feats=48 model.patch_dim=2 \
        model.num_heads=3 model.enc_layers=6                                 # encoder from a 192-wide MAE ViT
The paper's sizes on GPU nodes (48-px inputs, 64 features, 3x3 patches = 576-d tokens, 12 + 12 layers):
    deepspeed --hostfile hostfile launch/finetune_ipt.py --preset ipt_paper \
        tasks=denoise30,denoise50,sr2,sr3,sr4,derain data.train=s3://bucket/imagenet/train data.val=s3://bucket/set5
Overrides are section.key=value (see --help); runs/finetune_ipt/<run.name>/ holds config.yaml, tb/ (loss, PSNR per
task, input | output | target pictures), checkpoints/, export/ (ipt.safetensors + ipt.json), metrics.jsonl.
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("finetune_ipt", argv)


if __name__ == "__main__":
    sys.exit(main())
