"""The pre-training library; ``pretrain_aclus.py`` is its command line.

config (typed YAML schema) -> data (pairs, crops, views) -> augment / context_damage (on the
device, inside the step) -> step (one optimizer step) -> loop (epochs, logging, checkpoints,
resume); optim (LARS, schedules), precision (autocast, channels-last, compile), run_files (what
a run writes besides checkpoints), mask_stats (what the masks look like at each scale).
"""
