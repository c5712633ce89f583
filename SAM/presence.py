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
import torch
import torch.nn.functional as F

from SAM.seg_metrics import asam_loss

# the score the decision reads, and the alternatives measured beside it (SAM/train_auto_prompter.py
# --eval_test, benchmarks/bench_asam.py): the prompter's presence head, SAM's predicted IoU,
# the mask's highest probability and its area (share of the image's pixels above 0.5)
SCORES = ("head", "pred_iou", "max_prob", "area")


def presence_loss(presence_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of (B,) presence logits against "the target mask is not empty", target (B, L, L).
    An empty target (a negative line, or an image without the anatomy) is "absent"."""
    present = target.flatten(1).amax(1) > 0
    return F.binary_cross_entropy_with_logits(presence_logits.float(), present.float())


MASK_LOSS_ON = ("all", "present")


def prompt_free_loss(mask_logits: torch.Tensor, target: torch.Tensor, presence_logits: torch.Tensor | None = None,
                     presence_weight: float = 1.0, mask_loss_on: str = "all") -> torch.Tensor:
    """Stage 2's loss: :func:`SAM.seg_metrics.asam_loss` on the masks plus ``presence_weight`` x
    :func:`presence_loss` when there is a presence head.

    ``mask_loss_on``: ``all`` (every line, an empty target too: the mask decoder itself learns to
    mark nothing where the anatomy is absent); ``present`` (only lines whose target is not
    empty: absence is the presence head's alone, and the decoder is never pulled towards an
    empty mask; needs a presence head). mask_logits (B, 1, L, L), target (B, L, L), presence (B,).
    """
    if mask_loss_on not in MASK_LOSS_ON:
        raise ValueError(f"mask_loss_on {mask_loss_on!r}; expected one of {MASK_LOSS_ON}")
    if mask_loss_on == "present":
        if presence_logits is None:
            raise ValueError("mask_loss_on 'present' needs a presence head (nothing else would learn absence)")
        keep = target.flatten(1).amax(1) > 0
        value = asam_loss(mask_logits[keep], target[keep]) if keep.any() else mask_logits.sum() * 0.0
    else:
        value = asam_loss(mask_logits, target)
    if presence_logits is not None:
        value = value + presence_weight * presence_loss(presence_logits, target)
    return value


def mask_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model-free presence scores of low-res mask logits (B, H, W): the highest probability
    and the area share above 0.5, each (B,)."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    return {"max_prob": prob.amax(1), "area": (prob > 0.5).float().mean(1)}


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


def presence_record(rows: list[dict], keys: list[str], max_fpr: float, split: str) -> dict:
    """What a checkpoint keeps of its presence decision, from validation rows of
    :func:`SAM.seg_training.presence_rows`: per prompt key the threshold on the head's logit
    (``None``: always present, when the split has no image without that anatomy to calibrate
    on, or no line of it at all), its validation rates, and every score's AUROC there."""
    thresholds, auroc = {}, {name: {} for name in SCORES}
    for k in keys:
        mine, present = _rows_of(rows, k)
        if present.all():                                   # also: no line of this prompt at all
            thresholds[k] = {"threshold": None, "n_present": int(present.sum()), "n_absent": 0,
                             "why": "no validation image without this anatomy: always present"}
        else:
            thresholds[k] = choose_threshold(np.array([r["head"] for r in mine]), present, max_fpr)
        by_score = _auroc_by_score(mine, present)
        for name in SCORES:
            auroc[name][k] = by_score.get(name)
    return {"score": "head", "rule": f"present when the presence logit >= the prompt's threshold, the lowest "
                                     f"with false-positive rate <= {max_fpr:g} on the {split} split",
            "max_fpr": float(max_fpr), "split": split, "thresholds": thresholds, "auroc": auroc}


def threshold_vector(record: dict | None, keys: list[str], override: float | None = None) -> np.ndarray | None:
    """Thresholds of ``keys`` in order (-inf where always present); ``override`` replaces every
    one; None without a record (and no override): no decision."""
    if override is not None:
        return np.full(len(keys), float(override))
    if record is None:
        return None
    t = [record["thresholds"].get(k, {}).get("threshold") for k in keys]
    return np.array([-np.inf if v is None else v for v in t], np.float64)


def presence_test_metrics(rows: list[dict], record: dict) -> dict:
    """Per prompt key on test rows: the decision's rates at the stored threshold, the head's
    AUROC, and the AUROC of each alternative score (None where one class is missing)."""
    out = {}
    for k in sorted({r["key"] for r in rows}):
        mine, present = _rows_of(rows, k)
        t = record["thresholds"].get(k, {}).get("threshold")
        metrics = presence_metrics(np.array([r["head"] for r in mine]), present,
                                   -np.inf if t is None else t)
        out[k] = metrics | {"threshold": t, "auroc_by_score": _auroc_by_score(mine, present)}
    return out


def _rows_of(rows: list[dict], key: str) -> tuple[list[dict], np.ndarray]:
    """The rows of one prompt key and their "present" flags."""
    mine = [r for r in rows if r["key"] == key]
    return mine, np.array([r["present"] for r in mine], bool)


def _auroc_by_score(mine: list[dict], present: np.ndarray) -> dict[str, float | None]:
    """AUROC of every score the rows carry (None where one class is missing)."""
    return {name: presence_metrics(np.array([r[name] for r in mine]), present, 0.0)["auroc"]
            for name in SCORES if mine and name in mine[0]}


def format_presence(record: dict) -> str:
    """The thresholds and validation AUROCs of a presence record, as a small table."""
    names = [n for n in SCORES if any(v is not None for v in record["auroc"][n].values())]
    lines = [f"presence ({record['rule']}):",
             f"{'prompt':<28} {'threshold':>9} {'FPR':>6} {'TPR':>6} " + " ".join(f"{'AUROC ' + n:>15}" for n in names)]
    for k, t in record["thresholds"].items():
        thr = "always" if t["threshold"] is None else f"{t['threshold']:.3f}"
        fpr = "-" if t.get("fpr") is None else f"{t['fpr']:.3f}"
        tpr = "-" if t.get("tpr") is None else f"{t['tpr']:.3f}"
        au = " ".join("-".rjust(15) if record["auroc"][n][k] is None else f"{record['auroc'][n][k]:>15.3f}"
                      for n in names)
        lines.append(f"{k:<28} {thr:>9} {fpr:>6} {tpr:>6} {au}")
    return "\n".join(lines)
