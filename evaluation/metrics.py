"""Classification metrics, fold aggregation and model selection for the POCUS evaluation.

All functions are pure (numpy in, numbers/dicts out) so ``evaluation_aclus.py`` stays a
thin loop around them and the numbers can be unit-tested.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SELECTIONS = ("last", "val", "paper")
SELECTION_NOTES = {
    "last": "honest: the model after the last epoch (linear: the fixed C)",
    "val": "honest: epoch (linear: C) chosen on a validation split carved from the training folds",
    "paper": "OPTIMISTIC: epoch (linear: C) chosen on the test fold itself, as in the paper/upstream "
             "code; not an unbiased estimate",
}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``num_classes x num_classes`` int64 counts; rows = true class, columns = predicted."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch {y_true.shape} vs {y_pred.shape}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    A class with no predictions (or no samples) gets precision (recall) 0, as sklearn's
    ``zero_division=0``. Macro-F1 averages over the classes that have samples here (sklearn's
    ``f1_score(labels=<present classes>, average="macro")``): a class absent from a test fold
    has no F1 to speak of, and counting it as 0 would lower the fold's score for the fold's
    make-up, not the model. Those classes are listed under ``absent_classes``; a prediction
    *into* an absent class still costs the recall of the true class.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    pred, true = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    present = true > 0
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "absent_classes": [name for i, name in enumerate(class_names) if not present[i]],
        "correct": int(tp.sum()),
        "total": int(total),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(true[i])}
                      for i, name in enumerate(class_names)},
    }


def aggregate_folds(fold_confusions: Sequence[np.ndarray], class_names: Sequence[str]) -> dict:
    """Mean ± std over folds and pooled metrics of the summed confusion matrix.

    ``std`` is the population standard deviation over folds (``ddof=0``), the usual choice
    of k-fold reports; ``pooled_accuracy`` = correct / total over all test folds (the
    number the paper reports).
    """
    per_fold = [metrics_from_confusion(cm, class_names) for cm in fold_confusions]
    acc = np.array([m["accuracy"] for m in per_fold])
    f1 = np.array([m["macro_f1"] for m in per_fold])
    summed = np.sum(np.stack([np.asarray(c) for c in fold_confusions]), axis=0)
    pooled = metrics_from_confusion(summed, class_names)
    return {
        "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
        "macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std()),
        "pooled_accuracy": pooled["accuracy"], "pooled_correct": pooled["correct"],
        "pooled_total": pooled["total"], "pooled_macro_f1": pooled["macro_f1"],
        "pooled_per_class": pooled["per_class"],
        "confusion_matrix_sum": summed.astype(int).tolist(),
        "std_note": "population std over folds (ddof=0)",
    }


def select_index(rule: str, num_candidates: int, val_scores: Sequence[float] | None = None,
                 test_scores: Sequence[float] | None = None) -> int:
    """Which candidate (an epoch, or a C of the linear probe) to report.

    Args:
        rule: ``'last'`` -> the last candidate; ``'val'`` -> best validation score;
            ``'paper'`` -> best test-fold score (optimistic). Ties go to the earliest
            candidate, as upstream's ``if acc > best`` does.
        num_candidates: number of candidates (epochs, C values).
        val_scores / test_scores: one accuracy per candidate, needed by ``'val'`` / ``'paper'``.
    """
    if rule not in SELECTIONS:
        raise ValueError(f"unknown selection {rule!r}; choose from {SELECTIONS}")
    if num_candidates < 1:
        raise ValueError("no candidates")
    if rule == "last":
        return num_candidates - 1
    scores = val_scores if rule == "val" else test_scores
    if scores is None or len(scores) != num_candidates:
        raise ValueError(f"selection {rule!r} needs one score per candidate")
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))  # first maximum
