"""Presence decisions for A-SAM prompts: "is this anatomy in this image at all?" (issue 27).

A prompt-free segmenter marks *something* for every prompt on every image; a presence score
per (image, prompt) and a threshold turn that into "present / absent". This module holds the
model-free parts: choosing the threshold on a validation split under a false-positive budget,
and the metrics of a decision (pure functions, numpy in, numbers out). Which score to use (a
presence head on the prompter's tokens, or SAM's predicted IoU with the mask's area) is
decided by measuring these metrics on the alternatives.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """Model-free presence scores of mask logits (B, H, W): :func:`prob_scores` of their sigmoid."""
    return prob_scores(torch.sigmoid(logits.float()))


def prob_scores(prob: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model-free presence scores of mask probabilities (B, H, W): the highest probability and
    the area share above 0.5, each (B,)."""
    prob = prob.flatten(1)
    return {"max_prob": prob.amax(1), "area": (prob > 0.5).float().mean(1)}


def choose_threshold(scores: np.ndarray, present: np.ndarray, max_fpr: float = 0.05) -> dict:
    """A threshold ``t`` (decision: ``score >= t``) with the most recall whose false-positive
    rate on the absent images is at most ``max_fpr``, and among those the fewest false
    positives, placed halfway between the lowest present score it keeps and the next lower
    score (the widest margin: a threshold at the lowest kept score itself, the rule before,
    passes only some of the present images of another split whose scores fall a little lower;
    one below an absent score it need not keep spends the budget for nothing). Where nothing
    lies below that present score (or the halfway point is not a number between the two), the
    threshold is the score itself.

    Returns ``{"threshold", "fpr", "tpr", "n_present", "n_absent"}`` measured on these scores.
    With no absent image every threshold is free: the lowest score is taken; with no present
    image, or none that fits, the threshold is just above the highest score (nothing is kept).
    Scores may be infinite, not NaN."""
    scores, present = np.asarray(scores, np.float64), np.asarray(present, bool)
    if scores.shape != present.shape or scores.ndim != 1 or not len(scores):
        raise ValueError(f"scores {scores.shape} and present {present.shape}: two 1-D arrays of one length")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} score(s) are NaN")
    if not 0 <= max_fpr <= 1:
        raise ValueError(f"max_fpr {max_fpr}: must be in [0, 1]")
    absent = scores[~present]
    if not len(absent):
        t = float(scores.min())
        return {"threshold": t, **decision_rates(scores, present, t)}
    values = np.unique(scores)                              # ascending
    kept_present = np.unique(scores[present])
    for v in values:                                        # keep every score >= v: the first that fits keeps most
        if float((absent >= v).mean()) <= max_fpr:
            above = kept_present[kept_present >= v]
            if not len(above):                              # no present image left to keep
                break
            low = above[0]                                  # the same recall, no absent score below it kept
            i = int(np.searchsorted(values, low))
            t = float(low)
            if i > 0 and np.isfinite(values[i - 1]):           # -inf below: the score itself
                half = values[i - 1] + (low - values[i - 1]) / 2      # no overflow near the float limit
                if values[i - 1] < half <= low:                       # adjacent floats: the score itself
                    t = float(half)
            return {"threshold": t, **decision_rates(scores, present, t)}
    t = float(np.nextafter(scores.max(), np.inf))
    return {"threshold": t, **decision_rates(scores, present, t)}


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


#: what a checkpoint's presence decision reads: ``combined`` (default), a per-prompt logistic
#: regression of "present" on every score above, fitted on the validation split; ``head``, the
#: presence head's logit alone (the first rule; docs/RESULTS.md compares them)
PRESENCE_SCORES = ("combined", "head")


#: the smallest spread over the validation rows for a score to enter the combination (scores are O(1))
MIN_SPREAD = 1e-3


def fit_combination(features: np.ndarray, present: np.ndarray, c: float = 1.0) -> tuple[np.ndarray, float]:
    """Weights ``w`` (F,) and bias ``b`` of an L2-regularised (``c``), class-balanced logistic
    regression of ``present`` (N,) on the standardised ``features`` (N, F), folded back to the raw
    features: ``features @ w + b`` is the regression's logit. A score's sign is learned, so one
    that is higher on absent images (SAM's predicted IoU can be) still helps."""
    from sklearn.linear_model import LogisticRegression

    x, y = np.asarray(features, np.float64), np.asarray(present, bool)
    if x.ndim != 2 or len(x) != len(y) or not 0 < y.sum() < len(y):
        raise ValueError(f"features {x.shape} and present {y.shape}: N x F and N, with both classes")
    mean, scale = x.mean(0), x.std(0)
    # a score that barely moves (a saturated highest probability) weighs 0: its weight would be
    # coefficient / spread, and float32 rounding of the score at inference times that is noise
    varies = scale > MIN_SPREAD
    w = np.zeros(x.shape[1])
    if not varies.any():
        return w, 0.0
    reg = LogisticRegression(C=c, class_weight="balanced").fit((x[:, varies] - mean[varies]) / scale[varies], y)
    w[varies] = reg.coef_[0] / scale[varies]
    return w, float(reg.intercept_[0] - w @ mean)


def decision_values(entry: dict, rows: list[dict]) -> np.ndarray:
    """The value a record's prompt entry thresholds, for rows holding the scores it weighs:
    ``sum(weight[f] * row[f]) + bias`` (an entry without weights: the head's logit)."""
    weight = entry.get("weight", {"head": 1.0})
    return np.array([sum(w * r[f] for f, w in weight.items()) + entry.get("bias", 0.0) for r in rows], np.float64)


def presence_record(rows: list[dict], keys: list[str], max_fpr: float, split: str,
                    score: str = "combined") -> dict:
    """What a checkpoint keeps of its presence decision, from validation rows of
    :func:`SAM.seg_training.presence_rows`: per prompt key the weights of the value it decides on
    (``score``: see :data:`PRESENCE_SCORES`), the threshold on that value (:func:`choose_threshold`;
    ``None``: always present, when the split has no image without that anatomy to calibrate on, or
    no line of it at all), its validation rates and AUROC (in-sample for ``combined``), and every
    single score's AUROC there."""
    if score not in PRESENCE_SCORES:
        raise ValueError(f"presence score {score!r}; expected one of {PRESENCE_SCORES}")
    features = [name for name in SCORES if rows and name in rows[0]] if rows else ["head"]
    if "head" not in features:
        raise ValueError("presence rows without the head's logit: the decision needs a presence head")
    thresholds, auroc = {}, {name: {} for name in SCORES}
    for k in keys:
        mine, present = _rows_of(rows, k)
        if present.all():                                   # also: no line of this prompt at all
            thresholds[k] = {"threshold": None, "n_present": int(present.sum()), "n_absent": 0,
                             "why": "no validation image without this anatomy: always present"}
        else:
            entry = {"weight": {"head": 1.0}, "bias": 0.0}
            if score == "combined" and present.any():       # no present line: nothing to weigh, nothing kept
                w, b = fit_combination(np.array([[r[f] for f in features] for r in mine]), present)
                entry = {"weight": dict(zip(features, w.tolist())), "bias": b}
            values = decision_values(entry, mine)
            thresholds[k] = entry | choose_threshold(values, present, max_fpr) | {
                "auroc": presence_metrics(values, present, 0.0)["auroc"]}
        by_score = _auroc_by_score(mine, present)
        for name in SCORES:
            auroc[name][k] = by_score.get(name)
    what = (f"a logistic regression of the scores ({', '.join(features)}) fitted per prompt"
            if score == "combined" else "the presence logit")
    return {"score": score, "features": features,
            "rule": f"present when {what} >= the prompt's threshold, the one with the most recall at false-positive "
                    f"rate <= {max_fpr:g} on the {split} split (halfway between the scores around it)",
            "max_fpr": float(max_fpr), "split": split, "thresholds": thresholds, "auroc": auroc}


@dataclass(frozen=True)
class PresenceRule:
    """A presence decision for K prompts in a fixed order: prompt k is judged present where
    ``sum_f weight[k, f] * score_f + bias[k] >= threshold[k]`` (``-inf``: always present)."""
    features: tuple[str, ...]
    weight: np.ndarray                                      # K x F
    bias: np.ndarray                                        # K
    threshold: np.ndarray                                   # K

    def values(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """{feature: (..., K)} -> the decided value (..., K), float64 on the CPU as it was calibrated
        (a few numbers per image; MPS has no float64)."""
        first = scores[self.features[0]]
        w = torch.as_tensor(self.weight, dtype=torch.float64)
        out = torch.as_tensor(self.bias, dtype=torch.float64).expand(first.shape).clone()
        for f, name in enumerate(self.features):
            out = out + scores[name].detach().cpu().double() * w[:, f]
        return out

    def present(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """{feature: (..., K)} -> bool (..., K) on the scores' device."""
        device = scores[self.features[0]].device
        return (self.values(scores) >= torch.as_tensor(self.threshold, dtype=torch.float64)).to(device)

    def settings(self) -> dict:
        """JSON-ready: what shapes a label map (SAM/infer_masks.py asam_settings.json)."""
        return {"features": list(self.features),
                "weight": [[round(float(x), 6) for x in row] for row in self.weight],
                "bias": [round(float(x), 6) for x in self.bias],
                "threshold": [None if not np.isfinite(t) else round(float(t), 6) for t in self.threshold]}


def presence_rule(record: dict | None, keys: list[str], override: float | None = None) -> PresenceRule | None:
    """The decision of ``keys`` in order from a checkpoint's record; ``override`` replaces every
    threshold, each on its prompt's decided value (the head's logit where the record fitted no
    weights: a record written before they existed, a prompt it lacks or calibrated as "always
    present", or no record at all); None without a record and no override: no decision. Without
    an override a prompt the record lacks is always present."""
    if record is None and override is None:
        return None
    entries = [(record or {"thresholds": {}})["thresholds"].get(k, {}) for k in keys]
    features = tuple(record.get("features", ["head"])) if record else ("head",)
    weight = np.array([[e.get("weight", {"head": 1.0}).get(f, 0.0) for f in features] for e in entries], np.float64)
    bias = np.array([e.get("bias", 0.0) for e in entries], np.float64)
    t = [override if override is not None else e.get("threshold") for e in entries]
    threshold = np.array([-np.inf if v is None else v for v in t], np.float64)
    return PresenceRule(features, weight.reshape(len(keys), len(features)), bias, threshold)


def presence_test_metrics(rows: list[dict], record: dict) -> dict:
    """Per prompt key on test rows: the decision's rates at the stored threshold, the AUROC of
    the value it decides on, and the AUROC of each single score (None where one class is missing)."""
    out = {}
    for k in sorted({r["key"] for r in rows}):
        mine, present = _rows_of(rows, k)
        entry = record["thresholds"].get(k, {})
        t = entry.get("threshold")
        metrics = presence_metrics(decision_values(entry, mine), present, -np.inf if t is None else t)
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
             f"{'prompt':<28} {'threshold':>9} {'FPR':>6} {'TPR':>6} {'AUROC':>6} "
             + " ".join(f"{'AUROC ' + n:>15}" for n in names)]
    for k, t in record["thresholds"].items():
        thr = "always" if t["threshold"] is None else f"{t['threshold']:.3f}"
        fpr = "-" if t.get("fpr") is None else f"{t['fpr']:.3f}"
        tpr = "-" if t.get("tpr") is None else f"{t['tpr']:.3f}"
        decided = "-" if t.get("auroc") is None else f"{t['auroc']:.3f}"
        au = " ".join("-".rjust(15) if record["auroc"][n][k] is None else f"{record['auroc'][n][k]:>15.3f}"
                      for n in names)
        lines.append(f"{k:<28} {thr:>9} {fpr:>6} {tpr:>6} {decided:>6} {au}")
    return "\n".join(lines)
