"""BEiT pretraining: masked image modelling of a ViT on the visual tokens of the project's dVAE (Bao et al. 2021).

First a tokenizer, then BEiT on the same data (the embedded photographs by default, on the CPU, minutes each):
    python launch/train_dvae.py
    python launch/pretrain_beit.py tokenizer=runs/train_dvae/tiny/export
    python launch/pretrain_beit.py target=mean_color         # ViT's masked patch prediction: no tokenizer
    deepspeed --num_gpus 2 launch/pretrain_beit.py tokenizer=runs/train_dvae/tiny/export
The paper's recipe on GPU nodes (ViT-B/16, 800 epochs, batch 2048, lr 1.5e-3, shared relative position bias):
    deepspeed --hostfile hostfile launch/pretrain_beit.py --preset vit_b16 tokenizer=/ckpt/dvae_8192 \
        data.train=s3://bucket/imagenet/train data.cache_dir=/local/cache
Overrides are section.key=value (see --help); runs/pretrain_beit/<run.name>/ holds config.yaml, tb/ (loss, masked
token accuracy, predictions decoded by the tokenizer), checkpoints/, export/ (timm Beit or ViT backbone), metrics.jsonl.
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("pretrain_beit", argv)


if __name__ == "__main__":
    sys.exit(main())
