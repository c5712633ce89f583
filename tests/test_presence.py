"""Presence thresholds of A-SAM prompts (SAM/presence.py) against brute force and sklearn."""
from __future__ import annotations

import numpy as np
import pytest

from SAM.presence import choose_threshold, presence_metrics


def test_the_chosen_threshold_is_the_lowest_within_the_false_positive_budget():
    rng = np.random.default_rng(0)
    present = rng.random(200) < 0.5
    scores = np.where(present, rng.normal(1.0, 0.6, 200), rng.normal(0.0, 0.6, 200))
    for budget in (0.0, 0.05, 0.2):
        r = choose_threshold(scores, present, budget)
        fits = [t for t in np.unique(scores) if (scores[~present] >= t).mean() <= budget]   # brute force
        assert r["threshold"] == pytest.approx(min(fits)) and r["fpr"] <= budget
        assert r["tpr"] == pytest.approx((scores[present] >= min(fits)).mean())


def test_edge_cases_and_metrics():
    assert choose_threshold(np.array([0.2, 0.9]), np.array([True, True]))["threshold"] == 0.2   # nothing absent
    r = choose_threshold(np.array([0.2, 0.9]), np.array([False, False]), 0.0)
    assert r["threshold"] > 0.9 and r["fpr"] == 0.0 and r["tpr"] is None                     # nothing kept
    from sklearn.metrics import roc_auc_score

    scores, present = np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])
    m = presence_metrics(scores, present, 0.3)
    assert m["auroc"] == pytest.approx(roc_auc_score(present, scores)) and m["fpr"] == 0.5 and m["tpr"] == 1.0
    assert presence_metrics(scores, np.ones(4, bool), 0.3)["auroc"] is None
    with pytest.raises(ValueError, match="max_fpr"):
        choose_threshold(scores, present, 1.5)
