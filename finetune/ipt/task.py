"""IPT restoration finetuning for the shared runtime: multi-task pretraining and single-task finetuning.

Data (Chen et al. 2021, arXiv 2012.00364; finetune-anchors.md, C): the map function cuts one clean crop per image,
large enough for the largest SR scale (`img_size x max scale` px, random flips and 90-degree rotations as EDSR /
IPT augment); `DegradeBatch`, the task's `train_collate`, runs in the data workers, draws ONE task per batch from
torch's RNG (the stream seeds it from (seed, epoch, rank, worker): ranks and workers draw different tasks), cuts each
sample's target (`img_size x scale` px) from its crop and synthesises the degraded inputs for the whole batch
(finetune/ipt/degradations.py). Batches: `{"input": [B, 3, S, S] float 0..255, "target": [B, 3, sS, sS] uint8,
"task": int64 [B] (one value)}`.

Loss (mindspore IPT src/utils.py MyTrain): `L1(output, target) + contrastive_weight x SupCon(body tokens)`, the L1
in 0..255 pixel units as IPT's (rgb_range 255), the contrastive term on the body's last patch features (see
`model.patch_contrastive_loss`; weight 0.1, temperature 0.07 in the paper).

Evaluation: every validation image is degraded for every task with a generator seeded by its key (the same inputs
at every evaluation, on any number of ranks), restored by tiled inference over the fixed-size body (optionally
x8 self-ensembled), quantised to 8 bits and scored with PSNR / SSIM on the Y channel and on RGB, with the shave =
scale for SR. The degraded input (noisy / rainy image, bicubic enlargement for SR) is scored the same way as the
baseline, and the gain is the difference. Keys: `<task>/psnr_y`, `<task>/psnr_rgb`, `<task>/ssim_y`,
`<task>/ssim_rgb`, `<task>/baseline_*`, `<task>/gain_psnr_y`, `<task>/gain_psnr_rgb`, and `mean_gain_psnr_y`
over the tasks (a `ckpt.best_metric`). Per-image values are summed over the non-padding samples of all ranks.

Initialisation (`model.init`): none; an IPT export of an earlier run (its `export/` or the run dir: the body and
the heads, tails and embeddings of the tasks both runs share, by name; the architecture comes from its ipt.json);
or a ViT backbone folder of this project (backbone.json: its blocks become the encoder, see `load_vit_body`).

Ranks draw their tasks independently, so a step runs different heads and tails on different ranks: fine for ZeRO
0-2 (DeepSpeed reduces zero gradients for the unused ones), refused under ZeRO-3 with more than one task.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from contracts.task import TaskHooks
from finetune import backbone as bb
from finetune.ipt import degradations as deg
from finetune.ipt import metrics
from finetune.ipt.model import (EXPORT_NAME, IPT, IPTArch, arch_from_export, export_meta, load_ipt_export,
                                load_vit_body, patch_contrastive_loss, read_export)

logger = logging.getLogger(__name__)

# Marks the decayed parameter group; the runtime puts optim.weight_decay on it (IPT trains with Adam, no decay).
WEIGHT_DECAY = 0.05
# Samples per task shown by images().
NUM_VIS = 4
METRIC_NAMES = ("psnr_y", "psnr_rgb", "ssim_y", "ssim_rgb")


@dataclass
class IPTConfig:
    """The `model.*` section of the finetune_ipt job. Defaults: the tiny preset (embedded photographs, CPU, minutes);
    `ipt_paper` holds the paper's sizes."""

    # where the weights come from: "none", an IPT export (a finetune_ipt run dir or its export/), or a ViT backbone
    # folder (backbone.json + backbone.safetensors: its blocks initialise the body's encoder)
    init: str = "none"
    # restoration tasks: denoise30, denoise50, sr2, sr3, sr4, derain (or denoiseN / srN); one = single-task finetune
    tasks: tuple[str, ...] = ("denoise30", "denoise50", "sr2", "sr3", "sr4", "derain")
    # --- architecture (taken from ipt.json when init is an IPT export) ---
    img_size: int = 24             # input crop side the body takes (paper 48); targets are img_size x scale
    n_feats: int = 32              # head / tail channels (paper 64)
    patch_dim: int = 2             # feature patch side: tokens of n_feats x patch_dim^2 dims (paper 3: 576)
    num_heads: int = 4             # paper 12
    enc_layers: int = 2            # paper 12
    dec_layers: int = 2            # paper 12
    mlp_ratio: float = 4.0
    head_kernel: int = 3           # ResBlock kernel in the heads (paper 5)
    res_blocks: int = 2
    # --- training ---
    contrastive_weight: float = 0.1     # x SupCon on the body's patch features; 0 = L1 only
    contrastive_temperature: float = 0.07
    augment: bool = True           # random flips / 90-degree rotations of the training crops
    # --- evaluation ---
    eval_size: int = 96            # centre crop of each val image (a multiple of every SR scale); 0 = whole images
                                   # (cropped to multiples of the scales; not with engine.zero_stage=3)
    tile_overlap: int = 8          # px of the input between neighbouring tiles (< img_size)
    tile_blend: Literal["crop", "average"] = "crop"   # average: IPT's forward_chop
    self_ensemble: bool = False    # x8 flips/rotations at evaluation (8x slower)
    eval_batch: int = 64           # tiles per forward at evaluation
    # evaluate on about this many validation images (whole batches of all ranks, the first ones in shard order);
    # 0 = all of data.val
    eval_images: int = 0

    # each field's range, checked (with finiteness) by the job config before the dataclass is built; the geometry
    # (img_size a multiple of patch_dim, heads dividing the token width, odd kernels) in IPTArch.check
    LIMITS: ClassVar[dict[str, str]] = {
        "img_size": ">= 1", "n_feats": ">= 1", "patch_dim": ">= 1", "num_heads": ">= 1", "enc_layers": ">= 1",
        "dec_layers": ">= 1", "mlp_ratio": "> 0", "head_kernel": ">= 1", "res_blocks": ">= 0",
        "contrastive_weight": ">= 0", "contrastive_temperature": "> 0", "eval_size": ">= 0", "tile_overlap": ">= 0",
        "eval_batch": ">= 1", "eval_images": ">= 0"}

    def __post_init__(self) -> None:
        # the architecture's checks name its fields ("img_size=25 must be ..."): as keys of this section
        errors = [f"model.{e}" if e.split("=", 1)[0].isidentifier() else e for e in self.arch().check()]
        init = self.init.strip()
        if init != "none":
            try:
                if read_export(init) is None:
                    bb.find_backbone(init)
            except ValueError as e:
                errors.append(f"model.init={init}: {e}")
        if errors:  # the rest needs valid tasks
            raise ValueError("; ".join(errors))
        scales = [deg.parse_task(t).scale for t in self.tasks]
        if self.eval_size and any(self.eval_size % s for s in scales):
            errors.append(f"model.eval_size={self.eval_size} must be a multiple of every SR scale ({scales})")
        if not 0 <= self.tile_overlap < self.img_size:
            errors.append(f"model.tile_overlap={self.tile_overlap} must be in [0, img_size={self.img_size})")
        if self.eval_images < 0 or self.eval_batch < 1:
            errors.append("model.eval_images must be >= 0 and model.eval_batch >= 1")
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            errors.append("model.contrastive_weight must be >= 0 and model.contrastive_temperature > 0")
        if errors:
            raise ValueError("; ".join(errors))

    def arch(self) -> IPTArch:
        return IPTArch(img_size=self.img_size, n_feats=self.n_feats, patch_dim=self.patch_dim,
                       num_heads=self.num_heads, enc_layers=self.enc_layers, dec_layers=self.dec_layers,
                       mlp_ratio=self.mlp_ratio, head_kernel=self.head_kernel, res_blocks=self.res_blocks,
                       tasks=list(self.tasks))


# --- data (runs in the loader workers: picklable) -----------------------------------------------------------------

def _to_uint8_chw(image: Any) -> Tensor:
    """PIL RGB [H, W] -> uint8 [3, H, W], contiguous."""
    return torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
                            ).permute(2, 0, 1).contiguous()


class CleanCrop:
    """Training map function: a random `size` x `size` crop of the clean image, randomly flipped / rotated by 90
    degrees: sample -> {"image": uint8 [3, size, size]}. Images smaller than the crop are skipped (counted under
    data/skipped/smaller_than_crop)."""

    def __init__(self, size: int, augment: bool = True) -> None:
        self.size, self.augment = size, augment

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        from data_pipeline.stream import SkipSample

        img = _to_uint8_chw(sample["image"])
        h, w = img.shape[-2:]
        if min(h, w) < self.size:
            raise SkipSample("smaller_than_crop", f"{w}x{h} < {self.size}")
        y = int(torch.randint(h - self.size + 1, ()))
        x = int(torch.randint(w - self.size + 1, ()))
        img = img[:, y:y + self.size, x:x + self.size]
        if self.augment:
            flips = torch.rand(3)
            if flips[0] < 0.5:
                img = img.flip(-1)
            if flips[1] < 0.5:
                img = img.flip(-2)
            if flips[2] < 0.5:
                img = img.transpose(-2, -1)
        return {"image": img.contiguous()}


class DegradeBatch:
    """Training collate: list of {"image": uint8 [3, C, C]} -> one task's batch (see the module docstring).

    The task index is drawn from torch's global RNG, which the stream seeds in each reader from (seed, epoch,
    rank, worker); the noise and rain come from the same RNG, so a resumed epoch replays the same pairs."""

    def __init__(self, tasks: list[str], img_size: int) -> None:
        self.tasks, self.img_size = list(tasks), img_size

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        index = int(torch.randint(len(self.tasks), ()))
        spec = deg.parse_task(self.tasks[index])
        side = self.img_size * spec.scale
        targets = []
        for item in items:
            img = item["image"]
            h, w = img.shape[-2:]
            y, x = int(torch.randint(h - side + 1, ())), int(torch.randint(w - side + 1, ()))
            targets.append(img[:, y:y + side, x:x + side])
        target = torch.stack(targets)                                      # uint8 [B, 3, sS, sS]
        return {"input": deg.degrade(target.float(), spec).contiguous(), "target": target,
                "task": torch.full((len(items),), index, dtype=torch.int64)}


class DegradeEval:
    """Evaluation map function: the clean image (centre crop of `eval_size`, or the whole image cropped to a
    multiple of every scale) and its degraded input for every task, from a generator seeded by the sample's key:
    sample -> {"hr": uint8 [3, H, W], "inputs": {task: float32 [3, H/s, W/s]}}."""

    def __init__(self, tasks: list[str], eval_size: int) -> None:
        self.tasks, self.eval_size = list(tasks), eval_size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        from data_pipeline.stream import SkipSample

        img = _to_uint8_chw(sample["image"])
        h, w = img.shape[-2:]
        if self.eval_size:
            if min(h, w) < self.eval_size:
                raise SkipSample("smaller_than_eval_size", f"{w}x{h} < {self.eval_size}")
            y, x = (h - self.eval_size) // 2, (w - self.eval_size) // 2
            img = img[:, y:y + self.eval_size, x:x + self.eval_size]
        else:
            img = deg.modcrop(img, math.lcm(*(deg.parse_task(t).scale for t in self.tasks)))
        generator = torch.Generator().manual_seed(zlib.crc32(str(sample.get("__key__", "")).encode()))
        inputs = {t: deg.degrade(img.float(), deg.parse_task(t), generator) for t in self.tasks}
        return {"hr": img.contiguous(), "inputs": inputs}


class ListBatch:
    """Evaluation collate: keeps images of different sizes apart: {"hr": [uint8 [3, H, W]], "inputs": {task:
    [float32 [3, h, w]]}}. Nested lists reach the device without a dtype cast (inputs stay float32)."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"hr": [it["hr"] for it in items],
                "inputs": {t: [it["inputs"][t] for it in items] for t in items[0]["inputs"]}}


# --- the task -------------------------------------------------------------------------------------------------------

def build_model(cfg: IPTConfig) -> tuple[IPT, str]:
    """The model `cfg.init` describes, weights loaded; returns (model, a line saying where they came from)."""
    init = cfg.init.strip()
    if init == "none":
        return IPT(cfg.arch()), "from scratch"
    found = read_export(init)
    if found is not None:
        arch = arch_from_export(found[1], cfg.tasks)
        differs = {k: (getattr(cfg, k), v) for k, v in vars(arch).items()
                   if k != "tasks" and hasattr(cfg, k) and getattr(cfg, k) != v}
        if differs:
            logger.info("model.init=%s: the architecture comes from its ipt.json (%s)", init,
                        ", ".join(f"{k}={v} not {c}" for k, (c, v) in differs.items()))
        model = IPT(arch)
        return model, load_ipt_export(model, found[0]).summary()
    model = IPT(cfg.arch())
    return model, load_vit_body(model, init).summary()


class IPTTask(TaskHooks):
    """IPT for the shared runtime (contracts/task.py: the Task interface)."""

    export_name = EXPORT_NAME
    required_members = ("image",)  # what every sample must hold; the stream counts others as missing_*

    def __init__(self, cfg: IPTConfig) -> None:
        self.cfg = cfg
        self.model, source = build_model(cfg)
        self.arch = self.model.arch
        self.specs = self.model.specs
        max_scale = max(s.scale for s in self.specs)
        self.train_transform: Callable[[dict], dict] = CleanCrop(self.arch.img_size * max_scale, cfg.augment)
        self.train_collate = DegradeBatch(self.arch.tasks, self.arch.img_size)
        self.eval_transform: Callable[[dict], dict] = DegradeEval(self.arch.tasks, cfg.eval_size)
        self.eval_collate = ListBatch()
        self._flops: float | None = None
        self._last_eval: dict[str, float] = {}
        self._checked_partitioning = False
        logger.info("IPT: tasks %s, %d px inputs, %d tokens of %d dims, %d+%d layers, %.2fM parameters (%.2fM body); "
                    "%s", ",".join(self.arch.tasks), self.arch.img_size, self.arch.num_tokens, self.arch.embed_dim,
                    self.arch.enc_layers, self.arch.dec_layers, sum(p.numel() for p in self.model.parameters()) / 1e6,
                    sum(p.numel() for p in self.model.body.parameters()) / 1e6, source)

    def on_multiscale(self, sizes: tuple[int, ...]) -> None:
        """IPT trains its body on crops of one size (the paper's 48-px LR patches; evaluation tiles larger images into
        them), so multi-scale batches do not apply: refused as a configuration error."""
        raise ValueError(f"finetune_ipt trains on {self.arch.img_size}-px LR crops of one size (IPT's body and its "
                         "tiled evaluation are built on it); multi-scale batches do not apply. Fix: data.multiscale=[]")

    def param_groups(self) -> list[dict]:
        """Decay on >= 2-D weights except the position and task tables; none on biases and norms."""
        skip = self.model.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": WEIGHT_DECAY}]

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if not self._checked_partitioning:
            self._checked_partitioning = True
            if len(self.specs) > 1 and any(hasattr(p, "ds_id") for p in self.model.parameters()):
                # ZeRO-3 gathers each module's weights collectively as it runs; ranks on different tasks would run
                # different heads and tails and wait for each other forever
                raise RuntimeError("multi-task IPT draws a task per batch on each rank: it needs engine.zero_stage "
                                   "<= 2 (ZeRO-3 partitions the weights); single-task finetuning runs on ZeRO-3")
        task = batch["task"]
        out, tokens = model(batch["input"], task, return_features=True)
        target = batch["target"].float()
        l1 = F.l1_loss(out.float(), target)
        metrics_: dict[str, float] = {"l1": l1.item()}
        loss = l1
        if self.cfg.contrastive_weight > 0:
            con = patch_contrastive_loss(tokens, self.cfg.contrastive_temperature)
            loss = loss + self.cfg.contrastive_weight * con
            metrics_["contrastive"] = con.item()
        with torch.no_grad():
            metrics_["psnr_rgb"] = metrics.psnr(deg.quantize(out.detach()), target).clamp(max=100).mean().item()
        return loss, metrics_

    # --- evaluation ---------------------------------------------------------------------------------------------

    def restore(self, model: nn.Module, x: Tensor, spec: deg.TaskSpec) -> Tensor:
        """Whole images of any size: x [N, 3, H, W] 0..255 -> [N, 3, sH, sW] quantised to 8 bits (float32)."""
        def tile_fn(t: Tensor) -> Tensor:
            return model(t, spec.name).float()

        def whole(z: Tensor) -> Tensor:
            return metrics.tiled_forward(tile_fn, z, self.arch.img_size, self.cfg.tile_overlap, spec.scale,
                                         self.cfg.tile_blend, self.cfg.eval_batch)
        out = metrics.self_ensemble(whole, x) if self.cfg.self_ensemble else whole(x)
        return deg.quantize(out)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """PSNR / SSIM (Y and RGB) of the restorations and of the degraded inputs, per task, over the non-padding
        images of all ranks (sums all-reduced). Collective; padding images are restored too, so every rank makes
        the same forward calls (ZeRO-3) when the images have equal sizes (model.eval_size > 0)."""
        was_training = model.training
        model.eval()
        device = next(self.model.parameters()).device
        if not self.cfg.eval_size and any(hasattr(p, "ds_id") for p in self.model.parameters()):
            raise RuntimeError("model.eval_size=0 (whole images of different sizes) makes ranks call the model "
                               "unequally often, which ZeRO-3 cannot do: set model.eval_size or engine.zero_stage<=2")
        width = 2 * len(METRIC_NAMES) + 1
        sums = torch.zeros(len(self.specs), width, dtype=torch.float64, device=device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        seen = 0
        for batch in loader:
            if self.cfg.eval_images and seen >= self.cfg.eval_images:
                break  # every rank stops after the same number of batches (epoch mode: equal batch counts)
            seen += len(batch["hr"]) * world
            keep = ~batch["is_padding"].bool().cpu() if "is_padding" in batch else torch.ones(len(batch["hr"]),
                                                                                              dtype=torch.bool)
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, hr in enumerate(batch["hr"]):
                groups.setdefault(tuple(hr.shape), []).append(i)
            for t, spec in enumerate(self.specs):
                for idx in groups.values():
                    x = torch.stack([batch["inputs"][spec.name][i] for i in idx]).to(device).float()
                    target = torch.stack([batch["hr"][i] for i in idx]).to(device).float()
                    shave = spec.scale if spec.kind == "sr" else 0
                    ours = metrics.image_metrics(self.restore(model, x, spec), target, shave)
                    base = metrics.image_metrics(deg.baseline(x, spec), target, shave)
                    w = keep[idx].to(device=device, dtype=torch.float64)
                    values = [ours[k] for k in METRIC_NAMES] + [base[k] for k in METRIC_NAMES]
                    sums[t, :-1] += torch.stack([(v.clamp(max=100) * w).sum() for v in values])
                    sums[t, -1] += w.sum()
        model.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        results: dict[str, float] = {}
        gains = []
        for t, spec in enumerate(self.specs):
            count = sums[t, -1].item()
            means = (sums[t, :-1] / max(count, 1.0)).tolist() if count else [math.nan] * (width - 1)
            for k, name in enumerate(METRIC_NAMES):
                results[f"{spec.name}/{name}"] = means[k]
                results[f"{spec.name}/baseline_{name}"] = means[len(METRIC_NAMES) + k]
            for name in ("psnr_y", "psnr_rgb", "ssim_y"):
                results[f"{spec.name}/gain_{name}"] = results[f"{spec.name}/{name}"] - \
                    results[f"{spec.name}/baseline_{name}"]
            gains.append(results[f"{spec.name}/gain_psnr_y"])
        results["mean_gain_psnr_y"] = sum(gains) / len(gains)
        self._last_eval = results
        return results

    # --- pictures -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def images(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per task, a [3, H, W] grid in [0, 1]: one row per image, input | output | target (an SR input enlarged
        with nearest neighbours to the target's size). From a validation batch every task; from a training batch
        (no data.val) its task."""
        was_training = model.training
        model.eval()
        device = next(self.model.parameters()).device
        pictures: dict[str, Tensor] = {}
        if "inputs" in batch:
            keep = [i for i in range(len(batch["hr"])) if "is_padding" not in batch or not batch["is_padding"][i]]
            keep = keep[:NUM_VIS]
            shape = tuple(batch["hr"][keep[0]].shape) if keep else None
            keep = [i for i in keep if tuple(batch["hr"][i].shape) == shape]
            for spec in self.specs:
                if not keep:
                    break
                x = torch.stack([batch["inputs"][spec.name][i] for i in keep]).to(device).float()
                target = torch.stack([batch["hr"][i] for i in keep]).to(device).float()
                pictures[spec.name] = self._grid(x, self.restore(model, x, spec), target, spec)
        else:
            spec = self.specs[self.arch.tasks.index(self.model.task_name(batch["task"]))]
            x = batch["input"][:NUM_VIS].float()
            out = deg.quantize(model(x, spec.name).float())
            pictures[spec.name] = self._grid(x, out, batch["target"][:NUM_VIS].float(), spec)
        model.train(was_training)
        return pictures

    @staticmethod
    def _grid(x: Tensor, out: Tensor, target: Tensor, spec: deg.TaskSpec) -> Tensor:
        shown = F.interpolate(x, scale_factor=spec.scale, mode="nearest") if spec.scale > 1 else x
        rows = torch.stack([shown.clamp(0, 255), out, target], dim=1).flatten(0, 1) / 255.0   # [3N, 3, H, W]
        return make_grid(rows.cpu(), nrow=3, padding=2, pad_value=1.0)

    # --- export ---------------------------------------------------------------------------------------------------

    def export(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The whole model (heads, body, tails; keys as `IPT.state_dict()`) and ipt.json (format, geometry, tasks),
        written as ipt.safetensors + ipt.json; `model.init=<that folder>` loads it back by task name."""
        tensors = {}
        for key, value in state_dict.items():
            key = key.removeprefix("module.")
            tensors[key] = value.detach().float().contiguous() if value.is_floating_point() else value.contiguous()
        meta = export_meta(self.arch, source="finetune_ipt", init=self.cfg.init,
                           scales={s.name: s.scale for s in self.specs},
                           eval={k: v for k, v in self._last_eval.items() if math.isfinite(v)})
        return tensors, meta

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) for one sample, averaged over the tasks, counted by FlopCounterMode
        on a meta-device copy."""
        if self._flops is None:
            with torch.device("meta"):
                model = IPT(replace(self.arch))
            total = 0.0
            for spec in self.specs:
                with torch.device("meta"):
                    x = torch.zeros(1, 3, self.arch.img_size, self.arch.img_size)
                with FlopCounterMode(display=False) as counter:
                    out, tokens = model(x, spec.name, return_features=True)
                    (out.float().mean() + tokens.float().mean()).backward()
                total += float(counter.get_total_flops())
            self._flops = total / len(self.specs)
        return self._flops
