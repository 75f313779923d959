"""Training of the discrete VAE tokenizer that BEiT pretraining reads (DALL-E's dVAE, Ramesh et al. arXiv 2102.12092).

With no arguments: the tiny preset on the embedded photographs, on the CPU, in a few minutes:
    python launch/train_dvae.py
    deepspeed --num_gpus 2 launch/train_dvae.py                          # 2 ranks (gloo on CPU, nccl on GPU)
The DALL-E paper's dVAE and schedules on GPU nodes (hostfile lines "node-1 slots=8"; bf16):
    deepspeed --hostfile hostfile launch/train_dvae.py --preset dalle \
        data.train=s3://bucket/imagenet/train data.val=s3://bucket/imagenet/val data.cache_dir=/local/cache
Overrides are section.key=value (see --help for every key; e.g. model.vocab_size=1024 model.recon_loss=mse).
The tokenizer lands in runs/train_dvae/<run.name>/export/tokenizer.safetensors + tokenizer.json;
`pretrain.dvae.load_tokenizer(folder)` reads it (BEiT: model.tokenizer=runs/train_dvae/<run.name>).
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("train_dvae", argv)


if __name__ == "__main__":
    sys.exit(main())
