"""DETR object detection on a pretrained plain ViT (finetune_detr).

matcher.py (Hungarian matching), criterion.py (set losses), model.py (ViT backbone + simple feature pyramid + DETR
transformer), coco_eval.py (post-processing, COCO mAP through pycocotools across ranks), task.py (the runtime's task).
"""
