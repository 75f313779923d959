"""Learning-quality benchmark: each central claim of the project, run at small scale on the embedded datasets, as a
user would run it (shards -> pretrain -> convert -> finetune, every job through its launch script), with several
seeds, reported as mean ± std and turned into a verdict computed from the numbers.

    python bench/quality.py                                  # CPU preset, 2 seeds, every claim
    python bench/quality.py --only mae,deit --seeds 1        # a subset (calibration)
    python bench/quality.py --dry-run                        # print the commands, run nothing
    python bench/quality.py --preset gpu --seeds 3           # larger models and budgets (needs a GPU; not run yet)

The claims (issue 11):
1. mae:  MAE pretraining then finetuning beats the same ViT finetuned from scratch with the same budget, and MAE
         features beat random features of the same architecture under the linear probe (top-1 on the held-out split).
2. beit: the project's dVAE tokenizer (reconstruction PSNR from its argmax codes, codebook usage) and BEiT pretraining
         with it, then finetuning, against the same BEiT architecture finetuned from its initialisation.
3. deit: the hard-distilled student beats the same student trained without a teacher; both heads reported.
4. detr: DETR on ViTDet's windowed backbone, MAE-pretrained against scratch (COCO AP and AP50 on the emoji set's
         held-out backgrounds and placements).
5. ipt:  PSNR gain over the degraded input for denoising sigma 30 and SR x2; the multi-task pretrained body
         finetuned per task against a single-task body from scratch with the same number of steps.
6. vt:   VT-ResNet-18 (Wu et al. 2020: ResNet-18's last stage replaced by visual-token transformer modules) against
         ResNet-18, both from scratch with the same recipe, image size and epochs (top-1 on the held-out split).
7. simmim: SimMIM pretraining of a small Swin, then finetuning, against the same Swin finetuned from its
         initialisation (issue 21), pretraining repeated per seed.
8. mpp_mp3: the rest of ViT-era self-supervision (issue 24): ViT's masked patch prediction with each of its three
         targets (3-bit mean colour, 4x4 downsized patch in 3-bit colours, L2 on the pixels; pretrain_beit on a plain
         ViT: no relative bias, learned absolute positions, no LayerScale) and MP3 position prediction
         (pretrain_mp3), each finetuned, against the same plain ViT finetuned from scratch, all with claim 1's
         geometry and finetuning budget and BEiT's pretraining budget; claim 1's and 2's finetuning rows are copied
         into its table as references (never judged), from this invocation or the previous report.
9. sam:  SAM (finetune_sam) with an MAE-pretrained image encoder against the same encoder from scratch: mIoU from one
         click and from the box on the emoji set's held-out instance masks (issue 23); the MAE backbone is claim 4's
         recipe (and claim 4's own run when both are planned).
10. flip: FLIP (mask 0.5) against CLIP (mask 0, the same model and recipe) at equal training wall time on the emoji
         captions (issue 22): retrieval R@1 on the held-out glyphs' names, zero-shot top-1 on Fashion-MNIST. Equal
         wall time is set by step counts: CLIP's, and FLIP's scaled by the step-time ratio of the two arms measured
         in the job at this geometry on this CPU (the preset's `flip_steps`); each run's own step time is reported.

Every job is a subprocess of its launch script (`python launch/<job>.py key=value ...`); its stdout and stderr go to
WORKDIR/logs/<step>.log, its run directory to WORKDIR/runs/<job>/<name>/ (`run.dir=`, `run.name=`), converted
backbones to WORKDIR/backbones/, shards to WORKDIR/shards/. Figures are read back from each run's metrics.jsonl
(the last value of each `val/*` key: the evaluation at the end of training, never the best one, since the
validation split is also the test split). Budgets are key=value overrides in one `QualityPreset` per preset below.

Outputs: WORKDIR/quality.json and WORKDIR/quality.png always; unless --no-write also bench/results/quality-<preset>
.json, bench/results/quality-<preset>.png and the section between `<!-- quality:begin -->` and
`<!-- quality:end -->` in bench/RESULTS.md (nothing outside the markers changes). A run of some claims (`--only`)
keeps the other claims of the previous bench/results/quality-<preset>.json in all three, each claim naming the
invocation its figures come from.

A fresh run (no --reuse) deletes WORKDIR's shards/, runs/, backbones/ and logs/ first, so no figure comes from an
earlier run; --reuse instead skips every step whose identical command already succeeded in WORKDIR (recovery after
a failure, or calibration stage by stage).

Presets:
- cpu (default): 81 commands for 2 seeds, about 2 h 15 min on an idle 2-core CPU, the sum of each claim's own
  measured run (claims 1-5 as first written: 42 min at load ~1, of which the old DETR claim 6.5; vt 20 min and
  simmim 15 min with --seeds 2 at load 3-8, one thread per job; detr on the emoji set: the 1,500-step MAE ~6.5 min
  and 9-12 min per 2,000-step arm; mpp_mp3 42 min at load 3.6-9 for its 18 jobs, 1.5-5 min each, perhaps 25 min
  idle); sam alone (--only sam --seeds 2): 46 min at load 4-9, the MAE 13.5 of them and
  4.5-11 min per 300-step arm, an estimated 18-20 min idle (not measured), less with detr, whose MAE it reuses;
  flip 18 min with --seeds 2 at load 4-8);
  tiny models (img 32, patch
  4, 128 x 4 for the classification ViT; a 48-96-192 Swin with 2-px patches for SimMIM). MAE, BEiT, SimMIM and
  claim 8's pretraining repeat per seed; the dVAE tokenizer, the DeiT teacher, DETR's MAE backbone and IPT's multi-task pretraining run once (seed 0)
  and are shared by every seed, as the report says (their run-to-run spread is not in the stds).
- gpu: ViT-S-sized models, Fashion-MNIST, longer budgets, every pretraining per seed. It has NOT been run: no GPU
  was available when it was written; its commands were only checked against every job's configuration parser.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger("quality")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_DIR = ROOT / "bench" / "results"
BEGIN_MARKER = "<!-- quality:begin -->"
END_MARKER = "<!-- quality:end -->"
CLAIMS = ("mae", "beit", "deit", "detr", "ipt", "vt", "simmim", "mpp_mp3", "sam", "flip")
CLAIM_TITLES = {
    "mae": "1. MAE: pretrain -> finetune vs scratch; linear probe vs random features",
    "beit": "2. BEiT with the project's dVAE tokenizer",
    "deit": "3. DeiT: hard distillation vs no teacher",
    "detr": "4. DETR on a ViTDet backbone: MAE-pretrained vs scratch (emoji objects)",
    "ipt": "5. IPT: restoration gain; multi-task pretrained body vs single-task scratch",
    "vt": "6. VT-ResNet-18 vs ResNet-18 from scratch, same budget",
    "simmim": "7. SimMIM on a Swin: pretrain -> finetune vs scratch",
    "mpp_mp3": "8. ViT's masked patch prediction (three targets) and MP3 position prediction -> finetune vs scratch",
    "sam": "9. SAM: MAE-pretrained image encoder vs scratch (emoji instance masks)",
    "flip": "10. FLIP (mask 0.5) vs CLIP (mask 0) at equal wall time",
}
# Rows of other claims shown in a claim's table beside its own arms (copied, never judged): claim -> (source claim,
# arm); taken from this invocation when it ran the source claim, else from the previous report of the preset.
REFERENCE_ARMS: dict[str, tuple[tuple[str, str], ...]] = {
    "mpp_mp3": (("mae", "MAE -> finetune"), ("mae", "scratch -> finetune"), ("beit", "BEiT -> finetune"),
                ("beit", "BEiT init (no pretraining) -> finetune")),
}
# The plot's panels: one per claim, BEiT's tokenizer on its own (dB and % do not share an axis).
PANEL_TITLES = {**CLAIM_TITLES, "beit tokenizer": "2b. BEiT's dVAE tokenizer: reconstruction on the held-out split"}
# Lines of a failed job's log repeated in the error message.
LOG_TAIL_LINES = 25


# --- presets ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QualityPreset:
    """Every budget of one preset, as the key=value overrides the launch scripts take (plus a base `--preset` where
    a job has a fitting one). The two arms of a comparison always share the same overrides except their init."""

    name: str
    cls_data: str                    # embedded classification set (train; `<name>_val` is the held-out split)
    photos_data: str                 # embedded unlabelled photographs (IPT)
    det_data: str                    # embedded detection set (DETR and its backbone's MAE pretraining)
    vit: tuple[str, ...]             # the classification ViT's geometry, shared by MAE, BEiT, scratch and probes
    cls_scratch: tuple[str, ...]     # finetune_cls keys that make init=none build that same ViT
    mae_pretrain: tuple[str, ...]    # pretrain_mae (tiny preset) on the classification set's images, labels unused
    finetune: tuple[str, ...]        # finetune_cls (tiny preset): every finetuning arm
    linprobe: tuple[str, ...]        # finetune_cls --preset linprobe: both probe arms
    probe_random: tuple[str, ...]    # extra keys of the random-feature arm: MAE's pooling and fixed sin-cos table
    dvae: tuple[str, ...]            # train_dvae (tiny preset) on the classification set's images
    beit_pretrain: tuple[str, ...]   # pretrain_beit (tiny preset) with that tokenizer
    beit_init: tuple[str, ...]       # pretrain_beit run that trains nothing: the BEiT architecture at its init
    deit_teacher: tuple[str, ...]    # finetune_cls (tiny preset): the frozen teacher
    deit_student: tuple[str, ...]    # pretrain_deit (tiny preset): both student arms
    detr_backbone: tuple[str, ...]   # pretrain_mae on the detection set's images (boxes unused)
    detr: tuple[str, ...]            # finetune_detr (tiny preset): both arms
    detr_scratch: tuple[str, ...]    # finetune_detr keys of the scratch arm (the backbone's geometry)
    ipt_pretrain: tuple[str, ...]    # finetune_ipt (tiny preset): multi-task pretraining
    ipt_finetune: tuple[str, ...]    # finetune_ipt --preset finetune: single-task finetuning of the pretrained body
    ipt_scratch: tuple[str, ...]     # finetune_ipt (tiny preset, the from-scratch recipe): single-task scratch body
    ipt_tasks: tuple[str, ...] = ("denoise30", "sr2")
    detr_preset: str = "emoji"       # finetune_detr's base preset for both arms (data keys are overridden)
    # claims whose pretraining stage runs once per seed; the others run it once (seed 0) and share it
    seeded_pretraining: frozenset[str] = frozenset()
    teacher_init: str = "timm:resnet18"   # DeiT's teacher: a convnet, as the paper's RegNetY
    note: str = ""
    # finetune_cls (tiny preset) of both arms of the vt claim, from scratch (model.init=timm:NAME)
    vt: tuple[str, ...] = ()
    # --- claim 6 (simmim): a Swin on the classification set, pretrained per seed ---
    swin: tuple[str, ...] = ()            # pretrain_simmim keys of the Swin's geometry and its masked squares
    simmim_pretrain: tuple[str, ...] = ()  # pretrain_simmim (tiny preset) on the classification set's images
    simmim_init: tuple[str, ...] = ()     # pretrain_simmim run that trains nothing: the Swin at its initialisation
    simmim_finetune: tuple[str, ...] = ()  # finetune_cls (tiny preset): both Swin arms
    # --- claim 8 (mpp_mp3): ViT's masked patch prediction targets and MP3, on claim 1's ViT (`vit`) ---
    mpp_vit: tuple[str, ...] = ()         # pretrain_beit keys that make its ViT a plain one (with `beit_pretrain`)
    mp3_pretrain: tuple[str, ...] = ()    # pretrain_mp3 (tiny preset) on the classification set's images
    # --- claim 9 (sam): finetune_sam (tiny preset: the emoji masks) on claim 4's MAE backbone recipe ---
    sam: tuple[str, ...] = ()             # finetune_sam keys of both arms
    sam_scratch: tuple[str, ...] = ()     # finetune_sam keys of the scratch arm (the backbone's geometry)
    # --- claim 10 (flip): pretrain_flip (tiny preset) on the emoji captions, both arms per seed ---
    flip: tuple[str, ...] = ()            # keys of both arms (geometry, batch, lr, evaluation)
    flip_steps: tuple[int, int] = (0, 0)  # (CLIP at mask 0, FLIP at mask 0.5): equal wall time at the measured ratio


# Claim 10's step counts on the CPU: CLIP's, and FLIP's at the same wall time. bench/flip_speed.py measures 2.2x at
# the claim's geometry and batch on the model alone (1.82 s against 0.83 s per step; bench/results/
# flip-speed-cpu-quality.json), but inside the job the data worker (decoding and cropping 128 images a step) shares
# the 2 cores: a first run at 2.2x the steps logged 1.7 s per CLIP step against 1.4 s per FLIP step, so FLIP had
# ~1.8x CLIP's wall time. The counts use that in-job ratio, 1.25. 120 CLIP steps are 1.7 epochs of the 9,160 pairs.
FLIP_CPU_STEPS = (120, 150)

# Quiet runs: no intermediate checkpoints, pictures or evaluations unless a stage asks for them.
QUIET = ("log.eval_every=0", "log.images_every=0", "ckpt.every=0", "ckpt.keep=1")

CPU = QualityPreset(
    name="cpu",
    note="2 CPU cores, about 2 h 15 min: tiny models (img 32, patch 4, 128 x 4; a small Swin) and budgets of minutes "
         "per stage",
    cls_data="digits", photos_data="photos", det_data="emoji",
    # 8 x 8 = 64 tokens: enough for MAE's 75% masking and BEiT's block masks; 128 wide so a finetune epoch of the
    # 1,437 digits is ~10 s on one core
    vit=("model.img_size=32", "model.patch_size=4", "model.embed_dim=128", "model.depth=4", "model.num_heads=4"),
    # the tiny preset's conv stem belongs to its own from-scratch ViT; the pretrained ViTs have a patchify stem
    cls_scratch=("model.conv_stem=[]",),
    mae_pretrain=QUIET + ("data.batch_size=64", "optim.max_steps=300", "optim.warmup_steps=20",
                          "model.decoder_embed_dim=96", "model.decoder_depth=2", "model.decoder_num_heads=4",
                          "log.every=50"),
    # 5 epochs: the patchify ViT from scratch is far from saturated there (the tiny preset's note: ~70% after 5-10
    # epochs without the conv stem), so pretraining has room to show. Every job of this preset evaluates once, at
    # the end: the per-epoch evaluations would cost ~1.5 min over the benchmark (the train loss is still logged)
    finetune=("optim.epochs=5", "ckpt.best_metric=", "ckpt.every=0", "log.every=23", "log.eval_every_epoch=false"),
    # the linprobe preset's 10 epochs
    linprobe=("optim.epochs=10", "ckpt.best_metric=", "ckpt.every=0", "log.every=23", "log.eval_every_epoch=false"),
    probe_random=("model.global_pool=token", "model.pos_embed=sincos"),
    # downsample 4 (3 groups): the 8 x 8 token grid of a 32-px view, the ViT's own grid; the tiny preset's 600 steps
    dvae=QUIET + ("model.img_size=32", "model.num_groups=3", "log.every=100"),
    beit_pretrain=QUIET + ("data.batch_size=32", "optim.max_steps=300", "optim.warmup_steps=20", "log.every=50"),
    # one step at lr 0 changes no weight (AdamW: p -= 0 * ..., decay factor 1 - 0 * wd): the export is the BEiT
    # architecture with unilm's initialisation; target=mean_color so no tokenizer is loaded
    beit_init=QUIET + ("target=mean_color", "optim.max_steps=1", "optim.lr=0", "optim.base_lr=0",
                       "optim.warmup_steps=0", "data.val="),
    # the tiny presets' 10 epochs: ResNet-18 teacher (96% top-1 when measured), 6 x 192 patch-8 students
    deit_teacher=("ckpt.best_metric=", "ckpt.every=0", "log.every=23", "log.eval_every_epoch=false"),
    deit_student=("ckpt.every=0", "log.every=23", "log.eval_every_epoch=false"),
    # DETR's tiny backbone geometry (4 x 192, patch 16) pretrained on the emoji set's 128-px training images (boxes
    # unused) for 1,500 steps: the 200 steps used on the trees left tokens ~90% alike (the diagnosis below the
    # section), 1,500 leave them about as varied as at initialisation (cosine 0.41 vs 0.30, bench/feature_spread.py)
    detr_backbone=QUIET + ("model.img_size=128", "model.patch_size=16", "model.embed_dim=192", "model.depth=4",
                           "model.num_heads=3", "model.decoder_embed_dim=96", "model.decoder_depth=2",
                           "model.decoder_num_heads=4", "data.batch_size=32", "optim.max_steps=1500",
                           "optim.warmup_steps=50", "log.every=100"),
    # the emoji preset for both arms, each on ViTDet's windowed form of that geometry (windows of 4 x 4 tokens on the
    # 8 x 8 grid of a 128-px image, blocks 1 and 3 global, relative positions), for 2,000 of its 4,000 steps (about
    # 9 min per arm on an idle 2-core CPU): where both arms have left DETR's plateau (measured: MAE 19.7 and scratch
    # 5.6 AP50 at step 1,500) but not converged
    detr=("model.backbone=vitdet", "model.img_size=128", "model.window_size=4", "model.global_blocks=[1,3]",
          "optim.max_steps=2000", "log.eval_every=0", "ckpt.best_metric=", "ckpt.every=0",
          "log.eval_every_epoch=false", "log.images_every=0"),
    detr_scratch=("model.init=scratch",),
    # the tiny preset's six tasks, 200 steps (~33 per task) at batch 16; then 50 single-task steps per arm, the same
    # 10 warmup steps for both (the tiny preset's 30 would be most of a 50-step run), each arm at its preset's lr
    ipt_pretrain=QUIET + ("optim.max_steps=200", "log.every=50"),
    ipt_finetune=QUIET + ("optim.max_steps=50", "optim.warmup_steps=10", "log.every=25"),
    ipt_scratch=QUIET + ("optim.max_steps=50", "optim.warmup_steps=10", "log.every=25"),
    seeded_pretraining=frozenset({"mae", "beit", "mpp_mp3"}),
    # the tiny preset's 32 px (the DeiT teacher's ResNet-18 size) and the other finetuning claims' 5 epochs; no layer
    # decay (nothing is pretrained). At 32 px layer3's map is 2 x 2: the 16 tokens pool 4 pixels, and the VT modules'
    # cost (on 16 tokens whatever the image size) dominates: VT-ResNet-18 has fewer FLOPs than ResNet-18 only from
    # about 180 px up (6.6x ResNet-18's at 32 px; bench/vt_flops.py), so this compares quality at the same epochs
    # and recipe, not at the same FLOPs. 4 runs for 2 seeds: 20 min at a load of 3-8 (VT-ResNet-18 6-11 min each,
    # ResNet-18 1-1.5 min)
    vt=("model.img_size=32", "model.layer_decay=1.0", "optim.epochs=5", "ckpt.best_metric=", "ckpt.every=0",
        "log.every=23", "log.eval_every_epoch=false"),
    # a Swin at the digits' 32 px: 2-px patches (16 x 16 tokens), 3 stages of 2 blocks (48-96-192 wide), window 4
    # (stage grids 16, 8, 4), total stride 8; masked squares of 8 px (10 of 16); ~0.5 s per step of 64 on one core.
    # 300 steps at lr 1e-3 (base_lr 4e-3; the tiny preset's 2.5e-4 left the val L1 at 0.64 instead of 0.57 and the
    # finetuned top-1 at 69% instead of 81%, seed 0)
    swin=("model.img_size=32", "model.patch_size=2", "model.embed_dim=48", "model.depths=[2,2,2]",
          "model.num_heads=[3,6,12]", "model.window_size=4", "model.mask_patch_size=8"),
    simmim_pretrain=QUIET + ("data.batch_size=64", "optim.max_steps=300", "optim.warmup_steps=20",
                             "optim.base_lr=4e-3", "log.every=50"),
    simmim_init=QUIET + ("optim.max_steps=1", "optim.lr=0", "optim.base_lr=0", "optim.warmup_steps=0", "data.val="),
    # 10 epochs with SimMIM's finetuning layer decay 0.9, on the Swin's own 32 px: after the MAE claim's 5 epochs at
    # the tiny preset's 0.75 both arms were still near 45% and within each other's seed noise
    simmim_finetune=("model.img_size=32", "model.layer_decay=0.9", "optim.epochs=10", "ckpt.best_metric=",
                     "ckpt.every=0", "log.every=23", "log.eval_every_epoch=false"),
    # the ViT paper's setting: a plain ViT (learned absolute positions, no relative bias, no LayerScale), exported
    # with VisionTransformer keys, so it finetunes as exactly the scratch arm's architecture (init aside)
    mpp_vit=("model.rel_pos_bias=none", "model.abs_pos_emb=true", "model.layer_scale=0"),
    # BEiT's budget (300 steps at batch 32); lr 1e-3 absolute: val position accuracy 9.4% after 300 steps against
    # 9.1% at 3e-4 (chance 1.6%; one calibration run each, seed 0)
    mp3_pretrain=QUIET + ("data.batch_size=32", "optim.max_steps=300", "optim.warmup_steps=20", "optim.lr=1e-3",
                          "log.every=50"),
    # finetune_sam's tiny preset (the emoji masks at 128 px; its encoder geometry is the MAE backbone's: 4 x 192,
    # windows of 4, blocks 1 and 3 global) for 300 steps of 8 images at lr 4e-4, 2 rounds per mask (the first prompt
    # and one correction point) instead of the preset's 4, evaluated once at the end (1 click, box, 3 clicks)
    sam=("optim.max_steps=300", "optim.warmup_steps=30", "optim.base_lr=1.28e-2", "model.correction_points=1",
         "model.mask_only_rounds=0", "model.eval_points=3", "log.every=50", "log.eval_every=0",
         "log.images_every=0", "ckpt.best_metric=", "ckpt.every=0"),
    sam_scratch=("model.init=scratch",),
    # the glyphs at 32 px, patch 4 (64 patches, 32 visible at mask 0.5), a 4 x 128 image tower and a 2 x 128 text
    # tower, 16 tokens, batch 128; evaluated once, at the end
    flip=QUIET + ("model.img_size=32", "model.patch_size=4", "model.width=128", "model.depth=4", "model.num_heads=4",
                  "model.text_width=128", "model.text_depth=2", "model.text_heads=2", "model.embed_dim=128",
                  "data.batch_size=128", "optim.warmup_steps=20", "log.every=25"),
    flip_steps=FLIP_CPU_STEPS,
)

GPU = QualityPreset(
    name="gpu",
    note="one GPU: ViT-S-sized models on Fashion-MNIST (needs `apt-get install dataset-fashion-mnist`), longer "
         "budgets, every pretraining repeated per seed. Not run yet: no GPU was available when it was written",
    cls_data="fashion_mnist", photos_data="photos", det_data="emoji",
    vit=("model.img_size=32", "model.patch_size=4", "model.embed_dim=384", "model.depth=12", "model.num_heads=6"),
    cls_scratch=("model.conv_stem=[]",),
    mae_pretrain=QUIET + ("data.batch_size=256", "data.num_workers=8", "optim.epochs=100", "optim.warmup_epochs=5",
                          "optim.base_lr=1.5e-4", "model.decoder_embed_dim=256", "model.decoder_depth=4",
                          "model.decoder_num_heads=8", "log.every=50"),
    finetune=("data.batch_size=256", "data.num_workers=8", "optim.epochs=10", "ckpt.best_metric=", "ckpt.every=0",
              "log.every=50"),
    linprobe=("data.batch_size=256", "data.num_workers=8", "optim.epochs=20", "ckpt.best_metric=", "ckpt.every=0",
              "log.every=50"),
    probe_random=("model.global_pool=token", "model.pos_embed=sincos"),
    dvae=QUIET + ("model.img_size=32", "model.num_groups=3", "model.hidden=64", "data.batch_size=128",
                  "data.num_workers=8", "optim.max_steps=5000", "model.temperature_steps=3000",
                  "model.kl_warmup_steps=500", "log.every=100"),
    beit_pretrain=QUIET + ("data.batch_size=256", "data.num_workers=8", "optim.epochs=100", "optim.warmup_epochs=5",
                           "log.every=50"),
    beit_init=QUIET + ("target=mean_color", "optim.max_steps=1", "optim.lr=0", "optim.base_lr=0",
                       "optim.warmup_steps=0", "data.val="),
    deit_teacher=("data.batch_size=256", "data.num_workers=8", "optim.epochs=20", "ckpt.best_metric=",
                  "ckpt.every=0", "log.every=50"),
    deit_student=("data.batch_size=256", "data.num_workers=8", "optim.epochs=30", "ckpt.every=0", "log.every=50",
                  "model.embed_dim=384", "model.depth=12", "model.num_heads=6"),
    detr_backbone=QUIET + ("model.img_size=128", "model.patch_size=16", "model.embed_dim=384", "model.depth=12",
                           "model.num_heads=6", "data.batch_size=64", "data.num_workers=8", "optim.max_steps=5000",
                           "optim.warmup_steps=250", "log.every=50"),
    detr=("model.backbone=vitdet", "model.img_size=128", "model.window_size=4", "data.batch_size=16",
          "data.num_workers=8", "optim.max_steps=20000", "ckpt.best_metric=", "ckpt.every=0",
          "log.eval_every_epoch=false", "log.eval_every=2000", "log.images_every=0"),
    detr_scratch=("model.init=scratch", "model.embed_dim=384", "model.depth=12", "model.num_heads=6"),
    ipt_pretrain=QUIET + ("data.batch_size=64", "data.num_workers=8", "model.img_size=48", "model.n_feats=64",
                          "model.enc_layers=6", "model.dec_layers=6", "optim.max_steps=20000", "log.every=100"),
    ipt_finetune=QUIET + ("data.batch_size=64", "data.num_workers=8", "optim.max_steps=2000", "log.every=100"),
    ipt_scratch=QUIET + ("data.batch_size=64", "data.num_workers=8", "model.img_size=48", "model.n_feats=64",
                         "model.enc_layers=6", "model.dec_layers=6", "optim.max_steps=2000", "log.every=100"),
    seeded_pretraining=frozenset(CLAIMS),
    # the paper's geometry: 224 px, so stage 4's map is 14 x 14 and VT-ResNet-18 runs at fewer FLOPs than ResNet-18
    vt=("model.img_size=224", "model.layer_decay=1.0", "data.batch_size=256", "data.num_workers=8",
        "optim.epochs=10", "ckpt.best_metric=", "ckpt.every=0", "log.every=50"),
    # Swin-T's widths and depths (96-192-384-768, 2-2-6-2) with 2-px patches at 32 px (stage grids 16, 8, 4, 2),
    # window 4; SimMIM's 100-epoch schedule shape at a tenth
    swin=("model.img_size=32", "model.patch_size=2", "model.embed_dim=96", "model.depths=[2,2,6,2]",
          "model.num_heads=[3,6,12,24]", "model.window_size=4", "model.mask_patch_size=8"),
    simmim_pretrain=QUIET + ("data.batch_size=256", "data.num_workers=8", "optim.epochs=100",
                             "optim.warmup_epochs=10", "optim.base_lr=1e-4", "log.every=50"),
    simmim_init=QUIET + ("optim.max_steps=1", "optim.lr=0", "optim.base_lr=0", "optim.warmup_steps=0", "data.val="),
    simmim_finetune=("model.img_size=32", "model.layer_decay=0.9", "data.batch_size=256", "data.num_workers=8",
                     "optim.epochs=10", "ckpt.best_metric=", "ckpt.every=0", "log.every=50"),
    mpp_vit=("model.rel_pos_bias=none", "model.abs_pos_emb=true", "model.layer_scale=0"),
    mp3_pretrain=QUIET + ("data.batch_size=256", "data.num_workers=8", "optim.epochs=100", "optim.warmup_epochs=5",
                          "optim.base_lr=1e-3", "log.every=50"),
    # the detection backbone's 12 x 384 geometry with ViTDet's 4 global blocks, the paper's 11 rounds per mask
    sam=("model.global_blocks=[2,5,8,11]", "data.batch_size=32", "data.num_workers=8", "optim.max_steps=5000",
         "optim.warmup_steps=250", "model.correction_points=8", "model.mask_only_rounds=2", "model.eval_points=3",
         "log.every=50", "log.eval_every=0", "log.images_every=0", "ckpt.best_metric=", "ckpt.every=0"),
    sam_scratch=("model.init=scratch", "model.embed_dim=384", "model.depth=12", "model.num_heads=6"),
    # the tiny preset's model at 64 px, batch 512; the step ratio is a guess until bench/flip_speed.py runs there
    flip=QUIET + ("data.batch_size=512", "data.num_workers=8", "optim.warmup_steps=100", "log.every=50"),
    flip_steps=(3000, 5000),
)

PRESETS: dict[str, QualityPreset] = {"cpu": CPU, "gpu": GPU}


# --- the plan -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Read:
    """One figure read from a step's metrics.jsonl: `key`'s last value x `scale`, filed under (arm, figure)."""

    arm: str
    figure: str
    key: str
    scale: float = 1.0


@dataclass(frozen=True)
class Step:
    """One command of the flow."""

    key: str                         # unique, also the log file's name: "<claim>.<stage>[.s<seed>]"
    claim: str                       # the claim it belongs to ("shards" for the data stage)
    argv: tuple[str, ...]            # the command, as typed from the repository root
    seed: int | None                 # None: run once and shared by every seed
    run_dir: str = ""                # the job's run directory (figures are read from its metrics.jsonl)
    reads: tuple[Read, ...] = ()

    @property
    def command(self) -> str:
        """The command as a user types it (`python` for this interpreter)."""
        return shlex.join(["python" if a == sys.executable else a for a in self.argv])


@dataclass(frozen=True)
class Comparison:
    """A claim as a test: `arms[0]` beats `arms[1]` on `figure`; further arms are only drawn beside them in the
    plot's group `label` (plot=False: judged, not drawn, because another group shows the same bars)."""

    claim: str
    figure: str
    arms: tuple[str, ...]
    label: str = ""
    plot: bool = True


@dataclass
class Layout:
    """Where everything of one benchmark run lives. Paths in commands are relative to the repository root when the
    workdir is inside it (the jobs run there), absolute otherwise."""

    workdir: Path

    def path(self, *parts: str) -> str:
        p = self.workdir.joinpath(*parts)
        try:
            return str(p.relative_to(ROOT))
        except ValueError:
            return str(p)

    def shards(self, name: str) -> str:
        return self.path("shards", name)

    def runs(self) -> str:
        return self.path("runs")

    def run_dir(self, job: str, name: str) -> str:
        return self.path("runs", job, name)

    def backbone(self, name: str) -> str:
        return self.path("backbones", name)

    def log(self, key: str) -> Path:
        return self.workdir / "logs" / f"{key}.log"


def _launch(job: str) -> list[str]:
    return [sys.executable, f"launch/{job}.py"]


def _seed_name(stem: str, seed: int | None) -> str:
    return stem if seed is None else f"{stem}-s{seed}"


def _data(layout: Layout, name: str, val: bool = True) -> list[str]:
    return [f"data.train={layout.shards(name)}"] + ([f"data.val={layout.shards(name + '_val')}"] if val else [])


class Planner:
    """Builds the ordered list of steps for the chosen claims and seeds; each step depends only on earlier ones."""

    def __init__(self, preset: QualityPreset, layout: Layout, seeds: Sequence[int]) -> None:
        self.p, self.layout, self.seeds = preset, layout, list(seeds)
        # claim 4's MAE backbones by seed, which claim 9 (sam) reuses when both are planned
        self.mae_detection_backbones: dict[int | None, str] = {}
        self.steps: list[Step] = []
        self.comparisons: list[Comparison] = []

    def job(self, claim: str, stage: str, job: str, seed: int | None, args: Sequence[str],
            reads: Sequence[Read] = (), base_preset: str = "") -> str:
        """Add a training job; returns its run directory."""
        name = _seed_name(f"{claim}-{stage}", seed)
        run_dir = self.layout.run_dir(job, name)
        argv = _launch(job) + ([f"--preset={base_preset}"] if base_preset else []) + list(args) + [
            f"run.seed={0 if seed is None else seed}", f"run.dir={self.layout.runs()}", f"run.name={name}"]
        self.steps.append(Step(key=_seed_name(f"{claim}.{stage}", seed), claim=claim, argv=tuple(argv), seed=seed,
                               run_dir=run_dir, reads=tuple(reads)))
        return run_dir

    def convert(self, claim: str, stage: str, seed: int | None, run_dir: str) -> str:
        """Add the conversion of a run's checkpoint into a timm backbone folder; returns the folder."""
        out = self.layout.backbone(_seed_name(f"{claim}-{stage}", seed))
        argv = _launch("convert_checkpoint") + [run_dir, "--out", out]
        self.steps.append(Step(key=_seed_name(f"{claim}.convert-{stage}", seed), claim=claim, argv=tuple(argv),
                               seed=seed))
        return out

    def pretrain_seeds(self, claim: str) -> list[int | None]:
        """The seeds a claim's pretraining runs with: every seed, or once (None: shared, run with seed 0)."""
        return list(self.seeds) if claim in self.p.seeded_pretraining else [None]

    @staticmethod
    def pick(produced: dict[int | None, str], seed: int) -> str:
        return produced[seed] if seed in produced else produced[None]

    # --- the data ---

    def shards(self, claims: Sequence[str]) -> None:
        names: list[str] = []
        for claim in claims:
            if claim == "flip":   # captioned pairs, their held-out glyphs, and a labelled set for zero-shot
                names += [n for n in ("emoji_captions", "emoji_captions_val", "fashion_mnist_val") if n not in names]
                continue
            base = {"mae": self.p.cls_data, "beit": self.p.cls_data, "deit": self.p.cls_data,
                    "detr": self.p.det_data, "ipt": self.p.photos_data, "vt": self.p.cls_data,
                    "simmim": self.p.cls_data, "mpp_mp3": self.p.cls_data,
                    "sam": self.p.det_data}[claim]
            names += [n for n in (base, base + "_val") if n not in names]
        for name in names:
            argv = [sys.executable, "-m", "data_pipeline.write", f"embedded:{name}", self.layout.shards(name),
                    "--quiet"]
            self.steps.append(Step(key=f"shards.{name}", claim="shards", argv=tuple(argv), seed=None))

    # --- the claims ---

    def mae(self) -> None:
        p, cls = self.p, self.p.cls_data
        top1 = "top-1 (%)"
        backbones: dict[int | None, str] = {}
        for seed in self.pretrain_seeds("mae"):
            run = self.job("mae", "pretrain", "pretrain_mae", seed, _data(self.layout, cls) + list(p.vit)
                           + list(p.mae_pretrain), [Read("MAE pretraining", "val masked-patch loss", "val/loss")])
            backbones[seed] = self.convert("mae", "pretrain", seed, run)
        for seed in self.seeds:
            backbone = self.pick(backbones, seed)
            common = _data(self.layout, cls) + list(p.vit) + list(p.cls_scratch)
            self.job("mae", "finetune", "finetune_cls", seed, [f"model.init={backbone}"] + common + list(p.finetune),
                     [Read("MAE -> finetune", top1, "val/top1")])
            self.job("mae", "scratch", "finetune_cls", seed, ["model.init=none"] + common + list(p.finetune),
                     [Read("scratch -> finetune", top1, "val/top1")])
            self.job("mae", "probe", "finetune_cls", seed, [f"model.init={backbone}"] + common + list(p.linprobe),
                     [Read("MAE -> linear probe", top1, "val/top1")], base_preset="linprobe")
            self.job("mae", "probe-random", "finetune_cls", seed,
                     ["model.init=none"] + common + list(p.probe_random) + list(p.linprobe),
                     [Read("random init -> linear probe", top1, "val/top1")], base_preset="linprobe")
        self.comparisons += [
            Comparison("mae", top1, ("MAE -> finetune", "scratch -> finetune"), "finetune, top-1 (%)"),
            Comparison("mae", top1, ("MAE -> linear probe", "random init -> linear probe"), "linear probe, top-1 (%)")]

    def beit(self) -> None:
        p, cls = self.p, self.p.cls_data
        top1, psnr = "top-1 (%)", "val PSNR (dB)"
        tokenizer_reads = [Read("dVAE: argmax codes", psnr, "val/psnr"),
                           Read("dVAE: argmax codes", "perplexity", "val/perplexity"),
                           Read("dVAE: argmax codes", "codes used (%)", "val/codes_used", 100.0),
                           Read("dVAE: soft codes", psnr, "val/psnr_soft"),
                           Read("reference: each image's mean colour", psnr, "val/psnr_mean_colour"),
                           Read("reference: bicubic from the token grid", psnr, "val/psnr_bicubic")]
        # the tokenizer is a fixed input of BEiT (BEiT used DALL-E's): trained once, shared by every seed
        tokenizer = self.job("beit", "dvae", "train_dvae", None, _data(self.layout, cls) + list(p.dvae),
                             tokenizer_reads) + "/export"
        backbones: dict[int | None, str] = {}
        inits: dict[int | None, str] = {}
        for seed in self.pretrain_seeds("beit"):
            run = self.job("beit", "pretrain", "pretrain_beit", seed,
                           [f"tokenizer={tokenizer}"] + _data(self.layout, cls) + list(p.vit) + list(p.beit_pretrain),
                           [Read("BEiT pretraining", "val masked-token accuracy (%)", "val/mlm_accuracy", 100.0)])
            backbones[seed] = self.convert("beit", "pretrain", seed, run)
        for seed in self.seeds:
            inits[seed] = self.job("beit", "init", "pretrain_beit", seed,
                                   _data(self.layout, cls, val=False) + list(p.vit) + list(p.beit_init)) + "/export"
        for seed in self.seeds:
            common = _data(self.layout, cls) + list(p.vit) + list(p.cls_scratch) + list(p.finetune)
            self.job("beit", "finetune", "finetune_cls", seed, [f"model.init={self.pick(backbones, seed)}"] + common,
                     [Read("BEiT -> finetune", top1, "val/top1")])
            self.job("beit", "scratch", "finetune_cls", seed, [f"model.init={inits[seed]}"] + common,
                     [Read("BEiT init (no pretraining) -> finetune", top1, "val/top1")])
        self.comparisons += [
            Comparison("beit", top1, ("BEiT -> finetune", "BEiT init (no pretraining) -> finetune"),
                       "finetune, top-1 (%)"),
            Comparison("beit", psnr, ("dVAE: argmax codes", "reference: each image's mean colour", "dVAE: soft codes",
                                      "reference: bicubic from the token grid"), "tokenizer reconstruction, PSNR (dB)")]

    def deit(self) -> None:
        p, cls = self.p, self.p.cls_data
        top1 = "top-1 (%)"
        # the teacher is frozen and fixed, as DeiT's RegNetY: trained once, shared by every seed; its final
        # weights (export/), not the epoch that scored best on the validation split
        teacher = self.job("deit", "teacher", "finetune_cls", None,
                           [f"model.init={p.teacher_init}"] + _data(self.layout, cls) + list(p.deit_teacher),
                           [Read("teacher", top1, "val/top1")]) + "/export"
        for seed in self.seeds:
            self.job("deit", "hard", "pretrain_deit", seed,
                     [f"teacher={teacher}", "distill=hard"] + _data(self.layout, cls) + list(p.deit_student),
                     [Read("distilled (hard): cls + dist heads", top1, "val/top1"),
                      Read("distilled: cls head alone", top1, "val/top1_cls"),
                      Read("distilled: dist head alone", top1, "val/top1_dist")])
            self.job("deit", "none", "pretrain_deit", seed,
                     ["distill=none"] + _data(self.layout, cls) + list(p.deit_student),
                     [Read("no teacher", top1, "val/top1")])
        self.comparisons.append(Comparison("deit", top1, (
            "distilled (hard): cls + dist heads", "no teacher", "distilled: cls head alone",
            "distilled: dist head alone", "teacher"), "student top-1 (%)"))

    def detr(self) -> None:
        p, det = self.p, self.p.det_data
        ap, ap50 = "AP (%)", "AP50 (%)"
        backbones: dict[int | None, str] = {}
        for seed in self.pretrain_seeds("detr"):
            run = self.job("detr", "pretrain", "pretrain_mae", seed, _data(self.layout, det) + list(p.detr_backbone),
                           [Read("MAE pretraining (detection images)", "val masked-patch loss", "val/loss")])
            backbones[seed] = self.convert("detr", "pretrain", seed, run)
        for seed in self.seeds:
            arms = (("pretrained", "MAE backbone -> DETR", [f"model.init={self.pick(backbones, seed)}"]),
                    ("scratch", "scratch backbone -> DETR", list(p.detr_scratch)))
            for stage, arm, init in arms:
                self.job("detr", stage, "finetune_detr", seed, init + _data(self.layout, det) + list(p.detr),
                         [Read(arm, ap, "val/map", 100.0), Read(arm, ap50, "val/map50", 100.0),
                          Read(arm, "AR@100 (%)", "val/mar100", 100.0)], base_preset=p.detr_preset)
        self.comparisons += [Comparison("detr", f, ("MAE backbone -> DETR", "scratch backbone -> DETR"), f)
                             for f in (ap, ap50)]
        self.mae_detection_backbones = backbones

    def sam(self) -> None:
        p, det = self.p, self.p.det_data
        backbones = dict(self.mae_detection_backbones)
        if not backbones:   # claim 4's MAE pretraining on the detection images, unless claim 4 already runs it
            for seed in self.pretrain_seeds("sam"):
                run = self.job("sam", "pretrain", "pretrain_mae", seed, _data(self.layout, det) + list(p.detr_backbone),
                               [Read("MAE pretraining (detection images)", "val masked-patch loss", "val/loss")])
                backbones[seed] = self.convert("sam", "pretrain", seed, run)
        figures = (("1-point mIoU (%)", "val/miou_1pt"), ("box mIoU (%)", "val/miou_box"))
        for seed in self.seeds:
            arms = (("pretrained", "MAE encoder -> SAM", [f"model.init={self.pick(backbones, seed)}"]),
                    ("scratch", "scratch encoder -> SAM", list(p.sam_scratch)))
            for stage, arm, init in arms:
                reads = [Read(arm, f, key, 100.0) for f, key in figures]
                reads += [Read(arm, "1-point oracle mIoU (%)", "val/miou_1pt_oracle", 100.0),
                          Read(arm, "3-point mIoU (%)", "val/miou_3pt", 100.0)]
                self.job("sam", stage, "finetune_sam", seed, init + _data(self.layout, det) + list(p.sam), reads)
        self.comparisons += [Comparison("sam", f, ("MAE encoder -> SAM", "scratch encoder -> SAM"), f)
                             for f, _ in figures]

    def ipt(self) -> None:
        p, photos = self.p, self.p.photos_data
        pretrain_reads = []
        for task in p.ipt_tasks:
            pretrain_reads.append(Read("multi-task pretraining (no finetune)", f"{task} PSNR-Y (dB)",
                                       f"val/{task}/psnr_y"))
        exports: dict[int | None, str] = {}
        for seed in self.pretrain_seeds("ipt"):
            exports[seed] = self.job("ipt", "pretrain", "finetune_ipt", seed,
                                     _data(self.layout, photos) + list(p.ipt_pretrain), pretrain_reads) + "/export"
        for seed in self.seeds:
            for task in p.ipt_tasks:
                psnr = f"{task} PSNR-Y (dB)"
                reads = [Read("pretrained -> finetune", psnr, f"val/{task}/psnr_y"),
                         Read("degraded input", psnr, f"val/{task}/baseline_psnr_y"),
                         Read("pretrained -> finetune", f"{task} gain over input (dB)", f"val/{task}/gain_psnr_y")]
                self.job("ipt", f"{task}-pretrained", "finetune_ipt", seed,
                         [f"model.init={self.pick(exports, seed)}", f"tasks={task}"]
                         + _data(self.layout, photos) + list(p.ipt_finetune), reads, base_preset="finetune")
                self.job("ipt", f"{task}-scratch", "finetune_ipt", seed,
                         [f"tasks={task}"] + _data(self.layout, photos) + list(p.ipt_scratch),
                         [Read("scratch (single task)", psnr, f"val/{task}/psnr_y"),
                          Read("scratch (single task)", f"{task} gain over input (dB)", f"val/{task}/gain_psnr_y")])
        for task in p.ipt_tasks:
            psnr = f"{task} PSNR-Y (dB)"
            self.comparisons += [
                Comparison("ipt", psnr, ("pretrained -> finetune", "degraded input"), psnr, plot=False),
                Comparison("ipt", psnr, ("pretrained -> finetune", "scratch (single task)", "degraded input"), psnr)]

    def vt(self) -> None:
        p, cls = self.p, self.p.cls_data
        top1 = "top-1 (%)"
        arms = (("vt-resnet18", "VT-ResNet-18", "timm:vitpretrain_vt_resnet18"),
                ("resnet18", "ResNet-18", "timm:resnet18"))
        for seed in self.seeds:
            for stage, arm, init in arms:   # the two arms differ only in model.init (and the run name)
                self.job("vt", stage, "finetune_cls", seed, [f"model.init={init}"] + _data(self.layout, cls)
                         + list(p.vt), [Read(arm, top1, "val/top1")])
        self.comparisons.append(Comparison("vt", top1, ("VT-ResNet-18", "ResNet-18"), "from scratch, top-1 (%)"))


    def simmim(self) -> None:
        p, cls = self.p, self.p.cls_data
        top1 = "top-1 (%)"
        for seed in self.seeds:   # SimMIM is the method under test: its pretraining is repeated per seed, as MAE's
            run = self.job("simmim", "pretrain", "pretrain_simmim", seed,
                           _data(self.layout, cls) + list(p.swin) + list(p.simmim_pretrain),
                           [Read("SimMIM pretraining", "val masked-pixel L1", "val/loss")])
            backbone = self.convert("simmim", "pretrain", seed, run)
            # one step at lr 0 changes no weight: the export is the same Swin at SimMIM's (timm's) initialisation
            init = self.job("simmim", "init", "pretrain_simmim", seed, _data(self.layout, cls, val=False)
                            + list(p.swin) + list(p.simmim_init)) + "/export"
            common = _data(self.layout, cls) + list(p.simmim_finetune)
            self.job("simmim", "finetune", "finetune_cls", seed, [f"model.init={backbone}"] + common,
                     [Read("SimMIM -> finetune", top1, "val/top1")])
            self.job("simmim", "scratch", "finetune_cls", seed, [f"model.init={init}"] + common,
                     [Read("Swin init (no pretraining) -> finetune", top1, "val/top1")])
        self.comparisons.append(Comparison("simmim", top1, ("SimMIM -> finetune",
                                                            "Swin init (no pretraining) -> finetune"),
                                           "finetune, top-1 (%)"))


    def mpp_mp3(self) -> None:
        p, cls = self.p, self.p.cls_data
        top1, accuracy, mse = "top-1 (%)", "val pretext accuracy (%)", "val pretext MSE"
        targets = (("mean_color", "mean-color", "ViT MPP: mean colour"),
                   ("mean_color_4x4", "mean-color-4x4", "ViT MPP: 4x4 colours"),
                   ("pixels_l2", "pixels-l2", "ViT MPP: pixels L2"))
        for seed in self.seeds:   # every method pretrained per seed; each job's own export is what it finetunes
            exports: list[tuple[str, str, str]] = []
            for target, stage, arm in targets:
                figure = (Read(arm, mse, "val/mse") if target == "pixels_l2"
                          else Read(arm, accuracy, "val/mlm_accuracy", 100.0))
                run = self.job("mpp_mp3", stage, "pretrain_beit", seed,
                               [f"target={target}"] + _data(self.layout, cls) + list(p.vit) + list(p.mpp_vit)
                               + list(p.beit_pretrain), [figure])
                exports.append((stage, arm, run + "/export"))
            run = self.job("mpp_mp3", "mp3", "pretrain_mp3", seed, _data(self.layout, cls) + list(p.vit)
                           + list(p.mp3_pretrain),
                           [Read("MP3", accuracy, "val/pos_accuracy", 100.0),
                            Read("MP3", "val position chance 1/L (%)", "val/pos_chance", 100.0)])
            exports.append(("mp3", "MP3", run + "/export"))
            common = _data(self.layout, cls) + list(p.vit) + list(p.cls_scratch) + list(p.finetune)
            for stage, arm, export in exports:
                self.job("mpp_mp3", f"{stage}-finetune", "finetune_cls", seed, [f"model.init={export}"] + common,
                         [Read(arm, top1, "val/top1")])
            self.job("mpp_mp3", "scratch", "finetune_cls", seed, ["model.init=none"] + common,
                     [Read("ViT from scratch", top1, "val/top1")])
        self.comparisons += [Comparison("mpp_mp3", top1, (arm, "ViT from scratch"), label)
                             for arm, label in (("ViT MPP: mean colour", "mean colour"),
                                                ("ViT MPP: 4x4 colours", "4x4 colours"),
                                                ("ViT MPP: pixels L2", "pixels L2"), ("MP3", "MP3"))]

    def flip(self) -> None:
        p = self.p
        data = [f"data.train={self.layout.shards('emoji_captions')}",
                f"data.val={self.layout.shards('emoji_captions_val')}",
                f"data.zero_shot={self.layout.shards('fashion_mnist_val')}"]
        figures = (("image->text R@1 (%)", "val/i2t_r1"), ("text->image R@1 (%)", "val/t2i_r1"),
                   ("image->text R@5 (%)", "val/i2t_r5"), ("zero-shot top-1 (%)", "val/zero_shot_top1"))
        clip_steps, flip_steps = p.flip_steps
        for seed in self.seeds:   # the two arms differ only in the mask ratio and their step counts
            for stage, arm, mask, steps in (("flip", "FLIP mask 0.5", 0.5, flip_steps),
                                            ("clip", "CLIP mask 0", 0.0, clip_steps)):
                reads = [Read(arm, figure, key, 100.0) for figure, key in figures]
                reads.append(Read(arm, "step time (s)", "perf/step_time_s"))
                self.job("flip", stage, "pretrain_flip", seed, data + list(p.flip)
                         + [f"model.mask_ratio={mask}", f"optim.max_steps={steps}"], reads)
        for figure, _ in figures:
            self.comparisons.append(Comparison("flip", figure, ("FLIP mask 0.5", "CLIP mask 0"),
                                               figure.replace(" (%)", ""), plot=True))


def add_references(report: dict[str, Any], previous: dict[str, Any]) -> None:
    """Copy REFERENCE_ARMS' top-1 rows into their claim's table (this invocation's when it ran the source claim,
    else the previous report's of the same preset), each labelled with its claim and date; never judged."""
    for claim, refs in REFERENCE_ARMS.items():
        if claim not in report["claims"]:
            continue
        for source, arm in refs:
            if source in report["results"]:
                results, date = report["results"][source], report["date"]
            elif previous.get("preset") == report["preset"] and source in previous.get("results", {}):
                results = previous["results"][source]
                date = ((previous.get("runs") or {}).get(source) or previous)["date"]
            else:
                continue
            figure = results["arms"].get(arm, {}).get("top-1 (%)")
            if figure is not None:
                label = f"reference, claim {CLAIMS.index(source) + 1} ({date[:10]}): {arm}"
                report["results"][claim]["arms"][label] = {"top-1 (%)": figure}


def build_plan(preset: QualityPreset, claims: Sequence[str], seeds: Sequence[int],
               layout: Layout) -> tuple[list[Step], list[Comparison]]:
    """Every command of the benchmark in run order, and the comparisons its figures are judged by."""
    planner = Planner(preset, layout, seeds)
    planner.shards(claims)
    for claim in CLAIMS:
        if claim in claims:
            getattr(planner, claim)()
    keys = [s.key for s in planner.steps]
    assert len(keys) == len(set(keys)), f"duplicate step keys: {keys}"
    return planner.steps, planner.comparisons


# --- running ------------------------------------------------------------------------------------------------------

class StepFailed(RuntimeError):
    """A job exited with a non-zero code."""


@dataclass
class StepResult:
    """What a step's run left: its wall time (seconds) and the 1/5/15-min load averages before and after it."""

    key: str
    claim: str
    seed: int | None
    command: str
    log: str
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    reused: bool = False


def _done_marker(layout: Layout, key: str) -> Path:
    return layout.workdir / "logs" / f"{key}.done.json"


def run_step(step: Step, layout: Layout, reuse: bool) -> StepResult:
    """Run one command from the repository root, stdout + stderr into its log file; raise StepFailed on failure."""
    log = layout.log(step.key)
    marker = _done_marker(layout, step.key)
    if reuse and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("command") == step.command:
            logger.info("%s: reused (%.0f s when it ran): %s", step.key, done["wall_s"], step.command)
            return StepResult(**{**done, "reused": True})
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    load_before = os.getloadavg()
    logger.info("%s: %s", step.key, step.command)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write(f"$ {step.command}\n")
        out.flush()
        rc = subprocess.call(list(step.argv), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise StepFailed(f"step {step.key} failed with exit code {rc} after {wall:.0f} s\n  command: {step.command}\n"
                         f"  log: {log}\n  last lines of the log:\n{tail}")
    result = StepResult(key=step.key, claim=step.claim, seed=step.seed, command=step.command, log=str(log),
                        wall_s=round(wall, 1), load_before=tuple(round(x, 2) for x in load_before),
                        load_after=tuple(round(x, 2) for x in load_after))
    marker.write_text(json.dumps(asdict(result), indent=1) + "\n")
    logger.info("%s: done in %s (load average %.2f -> %.2f)", step.key, format_duration(wall), load_before[0],
                load_after[0])
    return result


def clean_workdir(workdir: Path) -> None:
    """Remove what an earlier run left in the workdir's own subfolders (a job moves an existing run dir aside
    instead of replacing it, which would keep stale runs around)."""
    for sub in ("shards", "runs", "backbones", "logs"):
        shutil.rmtree(workdir / sub, ignore_errors=True)


# --- figures ------------------------------------------------------------------------------------------------------

def last_values(metrics_jsonl: Path) -> dict[str, float]:
    """The last value of every key in a run's metrics.jsonl (rows in step order: the final evaluation wins)."""
    values: dict[str, float] = {}
    for line in metrics_jsonl.read_text().splitlines():
        if line.strip():
            values.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
    return values


def read_figures(steps: Sequence[Step], root: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """claim -> arm -> figure -> values, one per seed in seed order (a shared step gives a single value)."""
    figures: dict[str, dict[str, dict[str, list[float]]]] = {}
    for step in steps:
        if not step.reads:
            continue
        path = root / step.run_dir / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"step {step.key}: {path} does not exist (did the job run?)")
        values = last_values(path)
        for read in step.reads:
            if read.key not in values:
                raise KeyError(f"step {step.key}: {path} has no {read.key!r} (it has: {', '.join(sorted(values))})")
            arm = figures.setdefault(step.claim, {}).setdefault(read.arm, {})
            arm.setdefault(read.figure, []).append(values[read.key] * read.scale)
    return figures


@dataclass(frozen=True)
class Stats:
    """One figure over seeds, in the figure's units."""

    mean: float
    std: float      # sample standard deviation over seeds (n - 1); 0 for a single value
    n: int


def aggregate(values: Sequence[float]) -> Stats:
    """Mean and sample std of per-seed values."""
    if not values:
        raise ValueError("no values to aggregate")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stats(mean=mean, std=std, n=len(values))


def format_stats(s: Stats, digits: int = 2) -> str:
    if s.n == 1:
        return f"{s.mean:.{digits}f} (n=1)"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} (n={s.n})"


@dataclass(frozen=True)
class Verdict:
    claim: str
    figure: str
    better: str
    baseline: str
    better_stats: Stats
    baseline_stats: Stats
    gap: float           # better - baseline, in the figure's units (every figure here: higher is better)
    noise: float         # sqrt(std_better^2 + std_baseline^2): the seed spread the gap is compared with
    holds: bool
    beyond_noise: bool
    text: str


def verdict(comparison: Comparison, better: Stats, baseline: Stats) -> Verdict:
    """The claim holds when the gap favours it AND exceeds the seed noise (the two arms' seed stds combined);
    a positive gap within the noise does not establish it. With one seed there is no noise estimate: said so."""
    gap = better.mean - baseline.mean
    noise = math.hypot(better.std, baseline.std)
    single = better.n < 2 and baseline.n < 2
    beyond = gap > noise if not single else gap > 0
    holds = gap > 0 and beyond
    figures = (f"{comparison.arms[0]} {better.mean:.2f} vs {comparison.arms[1]} {baseline.mean:.2f} "
               f"{comparison.figure}: gap {gap:+.2f}")
    if single:
        spread = "one seed, no seed std to compare the gap with"
    elif gap > 0:
        spread = f"seed std {noise:.2f} ({'exceeded' if beyond else 'not exceeded'})"
    else:  # the baseline is ahead: say whether that reversal itself stands out of the noise
        spread = f"seed std {noise:.2f} (the reverse gap {'exceeds' if -gap > noise else 'is within'} it)"
    if holds:
        word = "holds"
    elif gap > 0:
        word = "does not hold at this scale (the gap is within the seed noise)"
    else:
        word = "does not hold at this scale"
    return Verdict(claim=comparison.claim, figure=comparison.figure, better=comparison.arms[0],
                   baseline=comparison.arms[1], better_stats=better, baseline_stats=baseline, gap=gap, noise=noise,
                   holds=holds, beyond_noise=beyond, text=f"**{word}**: {figures}, {spread}")


def judge(comparisons: Sequence[Comparison], stats: dict[str, dict[str, dict[str, Stats]]]) -> list[Verdict]:
    out = []
    for c in comparisons:
        arms = stats.get(c.claim, {})
        missing = [a for a in c.arms[:2] if c.figure not in arms.get(a, {})]
        if missing:
            raise KeyError(f"claim {c.claim}: no {c.figure!r} for {missing}")
        out.append(verdict(c, arms[c.arms[0]][c.figure], arms[c.arms[1]][c.figure]))
    return out


# --- the report ---------------------------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def replace_section(text: str, body: str, begin: str = BEGIN_MARKER, end: str = END_MARKER) -> str:
    """`text` with what lies between the `begin` and `end` marker lines replaced by `body`; the markers and
    everything outside them are kept byte for byte. ValueError if a marker is missing, repeated or misordered."""
    for marker in (begin, end):
        count = text.count(marker)
        if count != 1:
            raise ValueError(f"{marker!r} occurs {count} times in the results file (expected once); add the line "
                             f"{begin} and, below it, {end} where the section belongs")
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise ValueError(f"{end!r} comes before {begin!r} in the results file")
    return text[:start] + "\n" + body.strip("\n") + "\n" + text[stop:]


def markdown_table(arms: dict[str, dict[str, Stats]]) -> str:
    figures: list[str] = []
    for per_arm in arms.values():
        figures += [f for f in per_arm if f not in figures]
    lines = ["| arm | " + " | ".join(figures) + " |", "|---|" + "---:|" * len(figures)]
    for arm, per_arm in arms.items():
        lines.append(f"| {arm} | " + " | ".join(format_stats(per_arm[f]) if f in per_arm else "" for f in figures)
                     + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import torch  # the jobs' torch: its version and the accelerator they ran on

    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_info(report: dict[str, Any]) -> dict[str, Any]:
    """What identifies the invocation a claim's figures come from."""
    return {k: report[k] for k in ("date", "commit", "command", "seeds")}


def merge_previous(report: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The report of a run of some claims (--only), completed with the other claims of the previous report of the
    same preset (their tables, verdicts, steps and the invocation they came from, in `runs`), so that re-running one
    claim does not erase the others from RESULTS.md. A previous report of another preset is ignored."""
    if previous.get("preset") != report["preset"]:
        return report
    runs = dict(previous.get("runs") or {c: run_info(previous) for c in previous.get("claims", [])})
    kept = [c for c in previous.get("claims", []) if c not in report["claims"] and c in previous.get("results", {})]
    if not kept:
        return report
    runs.update({c: run_info(report) for c in report["claims"]})
    order = [c for c in CLAIMS if c in kept or c in report["claims"]]
    return {**report, "claims": order, "runs": {c: runs[c] for c in order},
            "results": {c: (report["results"][c] if c in report["claims"] else previous["results"][c]) for c in order},
            "steps": [s for s in previous.get("steps", []) if s["claim"] in kept] + report["steps"],
            "total_wall_s": round(sum(s["wall_s"] for s in previous.get("steps", []) if s["claim"] in kept)
                                  + report["total_wall_s"], 1)}


def render_markdown(report: dict[str, Any], plot_link: str) -> str:
    """The RESULTS.md section: machine, date, commit, command, wall time, one table + verdicts per claim, plot. A
    merged report (claims from several invocations) names each claim's own invocation under its heading."""
    m = report["machine"]
    runs = report.get("runs") or {}
    merged = len({json.dumps(r, sort_keys=True) for r in runs.values()}) > 1
    shared = [s for s in report["steps"] if s["seed"] is None and s["claim"] != "shards"]
    loads = [s["load_before"][0] for s in report["steps"]]
    reused = sum(s["reused"] for s in report["steps"])
    lines = [
        f"Preset `{report['preset']}` ({report['preset_note']}).",
        "",
        f"- Machine: {m.get('cpu', 'unknown CPU')}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; torch {m['torch']}, Python {m['python']}. "
        f"1-min load average before each job: {min(loads, default=0):.1f} to {max(loads, default=0):.1f}"
        f" (the jobs themselves add about 1-2).",
        f"- Date: {report['date']}; commit {report['commit']}.",
        f"- Command: `{report['command']}`",
        f"- Total wall time: {format_duration(report['total_wall_s'])} for {len(report['steps'])} commands"
        + (f" ({reused} of them reused from an earlier invocation: their recorded times are included)" if reused
           else "") + "; seeds "
        f"{', '.join(map(str, report['seeds']))} (`run.seed=` of every job).",
        "- Shared across seeds (run once with seed 0, so their spread is not in the stds): "
        + (", ".join(f"`{s['key']}`" for s in shared) if shared else "nothing") + ".",
        "- Figures: the evaluation at the end of each run on the held-out split (never the best epoch); "
        "mean ± sample std over seeds (n = seeds). A claim holds when its gap is positive and larger than the "
        "two arms' seed stds combined (sqrt(std_a^2 + std_b^2)).",
        "",
    ]
    if merged:
        lines.insert(-1, "- Claims from earlier invocations are kept (re-running some claims with `--only` replaces "
                     "only theirs): each claim below names the date, commit, command and seeds its figures come from.")
    for claim in report["claims"]:
        data = report["results"][claim]
        wall = sum(s["wall_s"] for s in report["steps"] if s["claim"] == claim)
        run = runs.get(claim)
        seeds = run["seeds"] if run else report["seeds"]
        origin = (f" From {run['date']}, commit {run['commit']}, seeds {', '.join(map(str, seeds))}: "
                  f"`{run['command']}`." if merged and run else "")
        lines += [f"### {data.get('title') or CLAIM_TITLES[claim]}", "", f"Wall time {format_duration(wall)}.{origin}", "",
                  markdown_table({arm: {f: Stats(st["mean"], st["std"], st["n"]) for f, st in figs.items()}
                                  for arm, figs in data["arms"].items()}), ""]
        lines += [f"- {v['text']}" for v in data["verdicts"]]
        lines += ["", "<details><summary>commands (seed 0 and shared stages)</summary>", "", "```bash"]
        lines += [s["command"] for s in report["steps"]
                  if s["claim"] == claim and s["seed"] in (None, seeds[0])]
        lines += ["```", "", "</details>", ""]
    lines += [f"![quality benchmark, preset {report['preset']}]({plot_link})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], comparisons: Sequence[Comparison], out: Path) -> None:
    """One panel per claim (BEiT: finetuning and tokenizer), grouped bars with ±std error bars: the claimed-better
    arm first, its baseline second, reference arms after (lighter). Each arm keeps one colour within its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[Comparison]]] = []
    for claim in report["claims"]:
        own = [c for c in comparisons if c.claim == claim and c.plot]
        if claim == "beit":  # top-1 and PSNR do not share an axis
            panels += [(claim, [c for c in own if c.figure.startswith("top-1")]),
                       ("beit tokenizer", [c for c in own if not c.figure.startswith("top-1")])]
        else:
            panels.append((claim, own))
    panels = [(t, cs) for t, cs in panels if cs]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:gray"]
    for ax, (title, group) in zip(axes.flat, panels):
        claim = title.split()[0]
        arms = report["results"][claim]["arms"]
        width = 0.8 / max(len(c.arms) for c in group)
        colour_of: dict[str, str] = {}
        for gi, c in enumerate(group):
            present = [a for a in c.arms if c.figure in arms.get(a, {})]
            for ai, arm in enumerate(present):
                st = arms[arm][c.figure]
                err = st["std"] if st["n"] > 1 else 0.0
                x = gi + (ai - (len(present) - 1) / 2) * width
                colour = colour_of.setdefault(arm, colours[len(colour_of) % len(colours)])
                ax.bar(x, st["mean"], width, yerr=err, capsize=3, color=colour, alpha=1.0 if ai < 2 else 0.55,
                       label=arm)
                ax.annotate(f"{st['mean']:.1f}", (x, st["mean"] + err), ha="center", va="bottom", fontsize=6.5,
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([c.label or c.figure for c in group], fontsize=8)
        ax.set_title(PANEL_TITLES[title], fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=6.5, loc="lower right", framealpha=0.9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Learning quality, preset {report['preset']} ({report['date'][:10]}): mean ± std over seeds "
                 f"{', '.join(map(str, report['seeds']))}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def build_report(args_command: str, preset: QualityPreset, claims: Sequence[str], seeds: Sequence[int],
                 results: Sequence[StepResult], steps: Sequence[Step], comparisons: Sequence[Comparison],
                 total_wall: float, started: datetime, commit: str) -> dict[str, Any]:
    figures = read_figures(steps, ROOT)
    stats = {claim: {arm: {f: aggregate(v) for f, v in figs.items()} for arm, figs in arms.items()}
             for claim, arms in figures.items()}
    verdicts = judge(comparisons, stats)
    return {
        "preset": preset.name, "preset_note": preset.note, "command": args_command, "claims": list(claims),
        "seeds": list(seeds), "date": started.strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
        "machine": machine_info(), "total_wall_s": round(total_wall, 1),
        "budgets": {k: list(v) if isinstance(v, (tuple, frozenset)) else v for k, v in asdict(preset).items()},
        "steps": [asdict(r) for r in results],
        "results": {claim: {
            "title": CLAIM_TITLES[claim],   # kept with the figures: a later merge may render them under newer code
            "arms": {arm: {f: {**asdict(st), "values": figures[claim][arm][f]} for f, st in figs.items()}
                     for arm, figs in stats.get(claim, {}).items()},
            "verdicts": [{**asdict(v), "better_stats": asdict(v.better_stats),
                          "baseline_stats": asdict(v.baseline_stats)} for v in verdicts if v.claim == claim],
        } for claim in claims},
    }


# --- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default %(default)s)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CLAIMS)}")
    parser.add_argument("--workdir", default="", help="shards, runs, backbones and logs (default runs/quality/PRESET)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--no-write", action="store_true",
                        help="leave bench/RESULTS.md and bench/results/ alone (results stay in the workdir)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the workdir and skip steps whose identical command already succeeded there")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CLAIMS]
    if unknown:
        parser.error(f"--only: unknown claim(s) {', '.join(unknown)}; choose from {', '.join(CLAIMS)}")
    args.claims = [c for c in CLAIMS if not only or c in only]
    args.workdir = Path(args.workdir or ROOT / "runs" / "quality" / args.preset).resolve()
    return args


def main(argv: Sequence[str] | None = None,
         runner: Callable[[Step, Layout, bool], StepResult] = run_step) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    seeds = list(range(args.seeds))
    layout = Layout(args.workdir)
    steps, comparisons = build_plan(preset, args.claims, seeds, layout)
    command = shlex.join(["python", "bench/quality.py"] + list(argv if argv is not None else sys.argv[1:]))
    if args.dry_run:
        for step in steps:
            shared = step.seed is None and step.claim != "shards"
            print(f"# {step.key}" + (" (shared by every seed)" if shared else ""))
            print(step.command)
        print(f"# {len(steps)} commands; workdir {args.workdir}")
        return 0
    if args.seeds < 2:
        logger.warning("--seeds %d: no seed std; the issue asks for at least 2 seeds per claim", args.seeds)
    if not args.no_write:  # fail now, not after the benchmark, when the section cannot be written
        try:
            replace_section(RESULTS_MD.read_text(), "")
        except (OSError, ValueError) as e:
            logger.error("%s: %s (or run with --no-write)", RESULTS_MD, e)
            return 2
    if not args.reuse:
        clean_workdir(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    commit = git_commit()   # the code the jobs start from (others may commit while the benchmark runs)
    t0 = time.perf_counter()
    results: list[StepResult] = []
    for i, step in enumerate(steps, 1):
        logger.info("[%d/%d] elapsed %s", i, len(steps), format_duration(time.perf_counter() - t0))
        try:
            results.append(runner(step, layout, args.reuse))
        except StepFailed as e:
            logger.error("%s", e)
            logger.error("stopped; rerun with --reuse to skip the %d steps that succeeded", len(results))
            return 1
    # steps reused from an earlier invocation count with the wall time they took then
    total = time.perf_counter() - t0 + sum(r.wall_s for r in results if r.reused)
    report = build_report(command, preset, args.claims, seeds, results, steps, comparisons, total, started, commit)
    previous_json = RESULTS_DIR / f"quality-{preset.name}.json"
    previous = json.loads(previous_json.read_text()) if previous_json.is_file() else {}
    add_references(report, previous)
    if not args.no_write and previous:  # keep the claims this invocation did not run
        report = merge_previous(report, previous)
        comparisons = build_plan(preset, report["claims"], seeds, layout)[1]
    out_json, out_png = args.workdir / "quality.json", args.workdir / "quality.png"
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, comparisons, out_png)
    section = render_markdown(report, plot_link=out_png.name)
    (args.workdir / "quality.md").write_text(section)
    if not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        json_dst, png_dst = RESULTS_DIR / f"quality-{preset.name}.json", RESULTS_DIR / f"quality-{preset.name}.png"
        shutil.copyfile(out_json, json_dst)
        shutil.copyfile(out_png, png_dst)
        text = replace_section(RESULTS_MD.read_text(), render_markdown(
            report, plot_link=os.path.relpath(png_dst, RESULTS_MD.parent)))
        RESULTS_MD.write_text(text)
        logger.info("wrote %s, %s and the quality section of %s", json_dst, png_dst, RESULTS_MD)
    for claim in args.claims:
        for v in report["results"][claim]["verdicts"]:
            logger.info("%s: %s", claim, v["text"].replace("**", ""))
    logger.info("total wall time %s; report in %s", format_duration(total), args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
