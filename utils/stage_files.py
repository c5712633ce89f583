"""The names of the files one stage writes and another reads: spelled here once.

Pre-training (``pretrain_aclus.py``) writes ``ENCODER_NAME`` at the end of a run and
``snapshot_name(steps)`` at given shares of its steps; evaluation, the study and the demo read
them. A-SAM's stages write ``ASAM_BEST`` (the best validation epoch) and ``ASAM_LAST`` (resume);
the next stage and mask inference read ``ASAM_BEST``. ``evaluation_aclus.py`` writes one
``eval_result_name(protocol, selection)`` per protocol.
"""
from __future__ import annotations

ENCODER_NAME = "encoder_resnet18.pth"  # the finished pre-training run's encoder
SNAPSHOT_GLOB = "encoder_resnet18_step*.pth"
ASAM_BEST = "best.pt"
ASAM_LAST = "last.pt"


def snapshot_name(steps: int) -> str:
    """``encoder_resnet18_step<steps>.pth``: the encoder after ``steps`` optimizer steps
    (evaluation reads it like ``encoder_resnet18.pth``; a snapshot cannot resume a run)."""
    return f"encoder_resnet18_step{steps}.pth"


def eval_tag(protocol: str, selection: str) -> str:
    """``<protocol>_<selection>``: the suffix of one evaluation's JSON and confusion matrix."""
    return f"{protocol}_{selection}"


def eval_result_name(protocol: str, selection: str) -> str:
    """``eval_<protocol>_<selection>.json``: one protocol's result in an evaluation's ``--out_dir``."""
    return f"eval_{eval_tag(protocol, selection)}.json"


def confusion_name(protocol: str, selection: str) -> str:
    """``confusion_<protocol>_<selection>.png``, beside :func:`eval_result_name`."""
    return f"confusion_{eval_tag(protocol, selection)}.png"
