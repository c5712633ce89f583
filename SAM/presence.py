"""Presence decisions for A-SAM prompts: "is this anatomy in this image at all?" (issue 27).

A prompt-free segmenter marks *something* for every prompt on every image; a presence score
per (image, prompt) and a threshold turn that into "present / absent". This module holds the
model-free parts: choosing the threshold on a validation split under a false-positive budget,
and the metrics of a decision (pure functions, numpy in, numbers out). Which score to use (a
presence head on the prompter's tokens, or SAM's predicted IoU with the mask's area) is
decided by measuring these metrics on the alternatives.
"""
from __future__ import annotations

import numpy as np


def choose_threshold(scores: np.ndarray, present: np.ndarray, max_fpr: float = 0.05) -> dict:
    """The lowest threshold ``t`` (decision: ``score >= t``) whose false-positive rate on the
    absent images is at most ``max_fpr``: the most recall the budget allows.

    Returns ``{"threshold", "fpr", "tpr", "n_present", "n_absent"}`` measured on these scores.
    With no absent image every threshold is free: the lowest score is taken; with no present
    image, the threshold is just above the highest score (nothing is kept)."""
    scores, present = np.asarray(scores, np.float64), np.asarray(present, bool)
    if scores.shape != present.shape or scores.ndim != 1 or not len(scores):
        raise ValueError(f"scores {scores.shape} and present {present.shape}: two 1-D arrays of one length")
    if not 0 <= max_fpr <= 1:
        raise ValueError(f"max_fpr {max_fpr}: must be in [0, 1]")
    absent = scores[~present]
    candidates = np.unique(np.concatenate([scores, [np.nextafter(scores.max(), np.inf)]]))
    for t in candidates:                                    # ascending: the first that fits is the lowest
        fpr = float((absent >= t).mean()) if len(absent) else 0.0
        if fpr <= max_fpr:
            return {"threshold": float(t), **decision_rates(scores, present, float(t))}
    raise AssertionError("unreachable: the threshold above every score has FPR 0")


def decision_rates(scores: np.ndarray, present: np.ndarray, threshold: float) -> dict:
    """False-positive rate on the absent, true-positive rate on the present, of ``score >= threshold``."""
    scores, present = np.asarray(scores, np.float64), np.asarray(present, bool)
    keep = scores >= threshold
    return {"fpr": float(keep[~present].mean()) if (~present).any() else None,
            "tpr": float(keep[present].mean()) if present.any() else None,
            "n_present": int(present.sum()), "n_absent": int((~present).sum())}


def presence_metrics(scores: np.ndarray, present: np.ndarray, threshold: float) -> dict:
    """:func:`decision_rates` at ``threshold`` and the AUROC of the score (None with one class only)."""
    from sklearn.metrics import roc_auc_score

    present = np.asarray(present, bool)
    auroc = float(roc_auc_score(present, scores)) if 0 < present.sum() < len(present) else None
    return {"threshold": float(threshold), "auroc": auroc, **decision_rates(scores, present, threshold)}
