"""DeiT's teacher, loaded for launch/pretrain_deit.py (JOBS["pretrain_deit"]): the task gets it through an injected
loader, since pretrain/ never imports finetune/ (whose backbone folders a teacher may be)."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from finetune import backbone as bb
from launch.runtime.config import ConfigError
from pretrain.deit import DeiTConfig, Teacher
from pretrain.reference_checkpoints import UnknownFormatError, load_checkpoint_file


def load_teacher(cfg: DeiTConfig) -> Teacher:
    """The classifier `model.teacher` names, weights loaded strictly; ConfigError (exit 2) when it cannot be one.

    A folder: a finetune_cls export (backbone.json keeps its head, num_classes and normalisation), built with
    finetune.backbone.create_from_config (conv stems, sin-cos tables). timm:NAME: timm's architecture with
    num_classes = model.num_classes and the state dict of teacher_weights (safetensors, or a weights-only torch file;
    a {"model": ...} wrapper such as DeiT's regnety_160 checkpoint is unwrapped).
    """
    spec = cfg.teacher.strip()
    try:
        if spec.startswith("timm:"):
            model, _ = bb.create_timm(spec[5:], num_classes=cfg.num_classes)
            state = load_checkpoint_file(cfg.teacher_weights)
            pcfg = model.pretrained_cfg
            mean, std = tuple(pcfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(pcfg.get("std", IMAGENET_DEFAULT_STD))
            name = f"{spec} ({cfg.teacher_weights})"
        else:
            folder = bb.find_backbone(spec)
            meta = bb.read_config(folder)
            classes = meta.get("model_kwargs", {}).get("num_classes", 0)
            if not classes:
                raise ConfigError(f"model.teacher={spec}: {folder} is a backbone without a classifier head "
                                  "(num_classes 0); a teacher must classify: give a finetune_cls export")
            model = bb.create_from_config(meta)
            state = bb.read_weights(folder)
            overlay = meta.get("pretrained_cfg_overlay", {})
            mean = tuple(overlay.get("mean", model.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)))
            std = tuple(overlay.get("std", model.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)))
            name = f"{meta['architecture']} from {folder}"
        missing, unexpected = model.load_state_dict(state, strict=False)
    except ConfigError:
        raise
    except (OSError, UnknownFormatError, ValueError, RuntimeError) as e:
        raise ConfigError(f"model.teacher={spec}: cannot load it ({str(e).splitlines()[0][:400]})") from None
    if missing or unexpected:
        raise ConfigError(f"model.teacher={spec}: the weights do not fit {name}: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")
    num_classes = model.num_classes if hasattr(model, "num_classes") else None
    if num_classes != cfg.num_classes:
        raise ConfigError(f"model.teacher={spec} has {num_classes} classes, the student model.num_classes="
                          f"{cfg.num_classes}")
    # a ViT reads a fixed grid (its position table); a CNN reads any size
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and getattr(model, "dynamic_img_size", False):
        img_size = None
    return Teacher(model, mean, std, int(img_size[0]) if img_size is not None else None, name)
