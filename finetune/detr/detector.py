"""The finetuned detector on its own: detector.safetensors + detector.json beside the backbone in a finetune_detr
run's export/ (and export_best/), loadable without the run, its DeepSpeed checkpoints or the backbone folder the run
started from.

    from PIL import Image
    from finetune.detr.detector import load_detector

    detector = load_detector("runs/finetune_detr/tiny/export")
    [found] = detector.predict([Image.open("photo.jpg")], threshold=0.5)
    found["boxes"], found["scores"], found["category_ids"], found["names"]   # xyxy in the photo's pixels

detector.json holds the DETR config (`detr`), the backbone's timm architecture and model_kwargs (`backbone`), the
categories and class -> category id table, and the evaluation resize and normalisation; the safetensors hold the
whole DETR state dict (backbone.*, neck, transformer, heads). `predict` runs the job's evaluation transform
(shorter side to eval_size, longer side capped at max_size), pads like the job's collate, and maps the boxes back to
each input's pixels (DETR's PostProcess).
"""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.detr.coco_eval import post_process
from finetune.detr.model import DETR
# the export format is the task's (DETRTask.extra_exports writes it); this module reads it
from finetune.detr.task import DETECTOR_NAME, FORMAT, DETRConfig, build_backbone_from_meta, build_detr

__all__ = ["DETECTOR_NAME", "Detector", "load_detector"]

class Detector:
    """A DETR with its evaluation transform and categories; `predict` takes PIL images."""

    def __init__(self, model: DETR, meta: dict[str, Any]) -> None:
        from data_pipeline.detection_transforms import DetectionEvalTransform, PadCollate

        self.model = model.eval()
        self.meta = meta
        self.categories: list[dict[str, Any]] = meta["categories"]
        self.category_ids: list[int] | None = meta["category_ids"]
        self.transform = DetectionEvalTransform(meta["eval_size"], meta["max_size"], mean=meta["mean"],
                                                std=meta["std"])
        self.collate = PadCollate(model.size_divisibility)
        self._names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.categories}

    def category_id(self, label: int) -> int:
        """The dataset's category id of class index `label` (the index itself under category_map=id)."""
        return self.category_ids[label] if self.category_ids is not None else label

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image], threshold: float = 0.5) -> list[dict[str, Any]]:
        """One dict per image: "boxes" [n, 4] xyxy in that image's pixels, "scores" [n], "labels" [n] (class
        indices), "category_ids" and "names" (lists), the queries scoring at least `threshold`, best first."""
        if not images:
            return []
        samples = [self.transform({"image": image.convert("RGB"), "json": {"boxes": []}}) for image in images]
        batch = self.collate(samples)
        device = next(self.model.parameters()).device
        out = self.model(batch["image"].to(device), batch["mask"].to(device))
        sizes = torch.stack([s["target"]["orig_size"] for s in samples]).to(device)
        results = []
        for found in post_process(out["pred_logits"], out["pred_boxes"], sizes):
            keep = found["scores"] >= threshold
            order = found["scores"][keep].argsort(descending=True)
            scores, labels, boxes = (found[k][keep][order].cpu() for k in ("scores", "labels", "boxes"))
            ids = [self.category_id(int(label)) for label in labels]
            results.append({"boxes": boxes, "scores": scores, "labels": labels, "category_ids": ids,
                            "names": [self._names.get(i, str(i)) for i in ids]})
        return results


def load_detector(folder: str | Path, device: str | torch.device = "cpu") -> Detector:
    """The Detector in `folder` (an export/ folder, or a finetune_detr run directory holding export/)."""
    folder = Path(folder)
    if not (folder / f"{DETECTOR_NAME}.json").exists() and (folder / "export" / f"{DETECTOR_NAME}.json").exists():
        folder = folder / "export"
    path = folder / f"{DETECTOR_NAME}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a finetune_detr run writes {DETECTOR_NAME}.json and "
                                f"{DETECTOR_NAME}.safetensors to its export/ folder")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    known = {f.name for f in fields(DETRConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["detr"].items() if k in known}
    # the weights are all in the file: the backbone folder the run started from is not needed (nor checked)
    # the ViT's geometry is the backbone's (a run from a backbone folder left the scratch fields at their defaults)
    kwargs = meta["backbone"].get("model_kwargs", {})
    geometry = {k: kwargs[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
                if isinstance(kwargs.get(k), int) and not isinstance(kwargs.get(k), bool)}
    # a hierarchical backbone has no scratch geometry: its timm architecture stands for the init (nothing is loaded)
    init = f"timm:{meta['backbone']['architecture']}" if values.get("backbone") == "hierarchical" else "scratch"
    cfg = replace(DETRConfig(**{**values, "init": init, **geometry}), drop_path=0.0)
    backbone = build_backbone_from_meta(meta["backbone"], drop_path_rate=0.0)  # ViTDet's, timm's ViT, Swin, ...
    model = build_detr(cfg, backbone)
    state = load_file(str(folder / f"{DETECTOR_NAME}.safetensors"))
    model.load_state_dict(state, strict=True)
    return Detector(model.to(device), meta)
