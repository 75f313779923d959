"""The contracts `pretrain/`, `finetune/` and `launch/` share (they import this package; it imports none of theirs):

- `contracts.task`: the Task interface the runtime calls (members and hooks).
- `contracts.backbone`: the export folder (timm's own `config.json` + `model.safetensors`), its one writer, its strict
  loader and its resampling loader.
"""
