"""IPT: multi-task image restoration (denoising, super-resolution, deraining); see finetune/ipt/task.py."""
