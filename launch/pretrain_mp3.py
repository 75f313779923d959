"""MP3 pretraining: a ViT without position embeddings predicts each patch's position from a context share of the
patches (Zhai et al. 2022, "Position Prediction as an Effective Pretraining Strategy").

On the embedded digits (the tiny preset, CPU, a few minutes), then a finetune that adds a zero-initialised position
table:
    python launch/pretrain_mp3.py
    python launch/pretrain_mp3.py context_ratio=0.5               # half of the patches are keys and values
    python launch/finetune_cls.py model.init=runs/pretrain_mp3/tiny/export
    deepspeed --num_gpus 8 launch/pretrain_mp3.py model.arch=vit_b16 data.train=s3://bucket/imagenet/train \
        data.batch_size=256 optim.epochs=100 optim.warmup_epochs=5
Overrides are section.key=value (see --help); runs/pretrain_mp3/<run.name>/ holds config.yaml, tb/ (loss, position
accuracy against chance 1/L, predicted vs true positions, images reassembled from the predicted positions),
checkpoints/, export/ (timm ViT backbone without a position table), metrics.jsonl.
"""
import sys

from launch.jobs import run


def main(argv: list[str] | None = None) -> int:
    return run("pretrain_mp3", argv)


if __name__ == "__main__":
    sys.exit(main())
