"""MAE pretraining of a ViT on WebDataset shards under DeepSpeed (He et al., arXiv 2111.06377).

With no arguments: the tiny preset on the embedded photographs, on the CPU, in a few minutes:
    python launch/pretrain_mae.py
    deepspeed --num_gpus 2 launch/pretrain_mae.py                        # 2 ranks (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 launch/pretrain_mae.py optim.max_steps=100
The paper's recipe on GPU nodes (hostfile lines "node-1 slots=8"; ZeRO-2, bf16):
    deepspeed --hostfile hostfile launch/pretrain_mae.py --preset vit_l16 \
        data.train=s3://bucket/imagenet/train data.cache_dir=/local/cache engine.zero_stage=2 engine.precision=bf16
Overrides are section.key=value (see --help for every key); run.resume=auto continues the run in
runs/pretrain_mae/<run.name>/ (config.yaml, tb/, checkpoints/, export/, metrics.jsonl).
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("pretrain_mae", argv)


if __name__ == "__main__":
    sys.exit(main())
