"""Presence thresholds of A-SAM prompts (SAM/presence.py) against brute force and sklearn."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from SAM import fast_decoder
from SAM.auto_prompter import AutoPrompter
from SAM.checkpoint import load_checkpoint, prompter_from_checkpoint, save_checkpoint
from SAM.presence import choose_threshold, presence_metrics, presence_record, threshold_vector
from SAM.segmenter import build_segmenter


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


@torch.inference_mode()
def test_an_anatomy_judged_absent_leaves_no_region_and_its_score_is_recorded(tiny_asam_inputs):
    """A prompt whose presence score is below its threshold (a stand-in: threshold +inf, so
    any score of the model is below it) marks nothing;
    the others keep exactly the regions they had. Bug caught: a decision computed but not applied."""
    args = tiny_asam_inputs
    maps, scores = fast_decoder.predict_index_maps(*args, threshold=0.3, return_scores=True)
    assert all("presence" in s for per_image in scores for s in per_image)
    assert any((m == 2).any() for m in maps), "the stand-in needs prompt 2 to mark something first"
    thresholds = np.array([-np.inf, np.inf, -np.inf])                  # prompt 2 (index 1) judged absent
    decided, dscores = fast_decoder.predict_index_maps(*args, threshold=0.3, return_scores=True,
                                                       presence_thresholds=thresholds)
    for b in range(2):
        assert not (decided[b] == 2).any()
        assert [s["kept"] for s in dscores[b]] == [True, False, True]
        same = maps[b] != 2
        assert np.all(decided[b][same] == maps[b][same])


def test_thresholds_are_chosen_per_prompt_and_round_trip_through_the_checkpoint(tmp_path):
    rng = np.random.default_rng(3)
    rows = [{"key": k, "present": bool(p), "head": float(rng.normal(2.0 if p else -1.0)), "pred_iou": 0.5,
             "max_prob": 0.9, "area": 0.1}
            for k in ("A/1", "B/1") for p in rng.random(40) < 0.5]
    rows += [{"key": "C/1", "present": True, "head": 0.0, "pred_iou": 0.5, "max_prob": 0.9, "area": 0.1}]
    record = presence_record(rows, ["A/1", "B/1", "C/1", "D/1"], 0.05, "val")
    for k in ("A/1", "B/1"):
        mine = [r for r in rows if r["key"] == k]
        ref = choose_threshold(np.array([r["head"] for r in mine]), np.array([r["present"] for r in mine]), 0.05)
        assert record["thresholds"][k] == ref
    assert record["thresholds"]["C/1"]["threshold"] is None            # nothing absent to calibrate on
    assert record["thresholds"]["D/1"]["threshold"] is None            # no validation line at all
    seg = build_segmenter("vit_tiny", 64, random_init=True)
    path = tmp_path / "best.pt"
    save_checkpoint(path, "asam_stage2", seg, ["A/1", "B/1", "C/1", "D/1"], AutoPrompter(4, grid=8), presence=record)
    ck = load_checkpoint(path, ("asam_stage2",))
    assert ck["presence"] == record and prompter_from_checkpoint(ck).presence_head is not None
    vec = threshold_vector(ck["presence"], ["B/1", "C/1", "A/1"])
    assert vec.tolist() == [record["thresholds"]["B/1"]["threshold"], -np.inf, record["thresholds"]["A/1"]["threshold"]]
    assert threshold_vector(ck["presence"], ["A/1"], override=0.25).tolist() == [0.25]
    assert threshold_vector(None, ["A/1"]) is None


def test_mask_loss_on_present_leaves_absence_to_the_presence_head():
    """A batch of one present line (a 2x2 anatomy) and one negative (empty target). ``all``: the
    loss is asam_loss over both lines; ``present``: over the present line only, so the negative's
    mask logits get no gradient while its presence logit still does. A loss that kept the
    negative, or dropped the presence term, fails here."""
    from SAM.presence import prompt_free_loss, presence_loss
    from SAM.seg_metrics import asam_loss

    torch.manual_seed(0)
    target = torch.zeros(2, 4, 4)
    target[0, 1:3, 1:3] = 1
    masks = torch.randn(2, 1, 4, 4, requires_grad=True)
    presence = torch.randn(2, requires_grad=True)
    both = prompt_free_loss(masks, target, presence, 0.5, "all")
    assert both.item() == pytest.approx((asam_loss(masks, target) + 0.5 * presence_loss(presence, target)).item())
    only = prompt_free_loss(masks, target, presence, 0.5, "present")
    assert only.item() == pytest.approx((asam_loss(masks[:1], target[:1])
                                         + 0.5 * presence_loss(presence, target)).item())
    only.backward()
    assert masks.grad[1].abs().max() == 0 and masks.grad[0].abs().max() > 0
    assert (presence.grad != 0).all()
    empty = prompt_free_loss(masks, torch.zeros(2, 4, 4), presence, 1.0, "present")     # no present line
    assert torch.isfinite(empty)
    with pytest.raises(ValueError, match="needs a presence head"):
        prompt_free_loss(masks, target, None, 1.0, "present")
