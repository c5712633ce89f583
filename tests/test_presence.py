"""Presence thresholds of A-SAM prompts (SAM/presence.py) against brute force and sklearn."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from SAM import fast_decoder
from SAM.auto_prompter import AutoPrompter
from SAM.checkpoint import load_checkpoint, prompter_from_checkpoint, save_checkpoint
from SAM.presence import (PresenceRule, choose_threshold, decision_values, presence_metrics, presence_record,
                          presence_rule, presence_test_metrics)
from SAM.segmenter import build_segmenter


def test_the_chosen_threshold_keeps_most_within_the_budget_halfway_between_scores():
    # by hand: absent 0, 1, 3; present 2, 10
    scores, present = np.array([0.0, 1.0, 2.0, 3.0, 10.0]), np.array([False, False, True, False, True])
    r = choose_threshold(scores, present, 0.34)          # keep >= 2: one absent of three (0.33)
    assert (r["threshold"], r["fpr"], r["tpr"]) == (1.5, pytest.approx(1 / 3), 1.0)
    r = choose_threshold(scores, present, 0.0)           # keep only 10: halfway from 3
    assert (r["threshold"], r["fpr"], r["tpr"]) == (6.5, 0.0, 0.5)
    # absent 0, 1, 2.5; present 3, 4: the budget would allow 2.5, but keeping it adds no recall
    r = choose_threshold(np.array([0.0, 1.0, 2.5, 3.0, 4.0]), np.array([False, False, False, True, True]), 0.34)
    assert (r["threshold"], r["fpr"], r["tpr"]) == (2.75, 0.0, 1.0)
    # brute force from the spec: every decision "keep scores >= v" (v a score, or above all), the
    # most recall within the budget, then the fewest false positives; the threshold must make that
    # decision and sit halfway in its gap. A threshold at the lowest kept score (the rule before)
    # fails "halfway", one that keeps a needless absent score fails the FPR
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        present = rng.random(n) < 0.5
        scores = np.round(np.where(present, rng.normal(1.0, 0.8, n), rng.normal(0.0, 0.8, n)), 1)   # ties
        if present.all() or not present.any():
            continue
        for budget in (0.0, 0.05, 0.2, 1.0):
            options = []
            for v in [*np.unique(scores), np.inf]:
                fpr, tpr = (scores[~present] >= v).mean(), (scores[present] >= v).mean()
                if fpr <= budget:
                    options.append((tpr, -fpr, v))
            tpr, neg_fpr, v = max(options)
            r = choose_threshold(scores, present, budget)
            assert (r["tpr"], r["fpr"]) == (pytest.approx(tpr), pytest.approx(-neg_fpr))
            if np.isfinite(v):
                lower = scores[scores < v]
                assert r["threshold"] == pytest.approx((lower.max() + v) / 2 if len(lower) else v)
            else:
                assert r["threshold"] > scores.max()


def test_the_threshold_stays_inside_its_gap_and_nan_is_refused():
    a = 1.0
    b = float(np.nextafter(a, 2.0))                     # no float halfway between them
    r = choose_threshold(np.array([a, b]), np.array([False, True]), 0.0)
    assert r["threshold"] == b and r["fpr"] == 0.0 and r["tpr"] == 1.0
    r = choose_threshold(np.array([-np.inf, 2.0]), np.array([False, True]), 0.0)
    assert r["threshold"] == 2.0 and r["fpr"] == 0.0
    big = np.finfo(np.float64).max
    r = choose_threshold(np.array([big / 2, big]), np.array([False, True]), 0.0)
    assert np.isfinite(r["threshold"]) and r["tpr"] == 1.0 and r["fpr"] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        choose_threshold(np.array([0.1, np.nan]), np.array([False, True]))


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
    head_only = PresenceRule(("head",), np.ones((3, 1)), np.zeros(3), np.array([-np.inf, np.inf, -np.inf]))
    decided, dscores = fast_decoder.predict_index_maps(*args, threshold=0.3, return_scores=True,
                                                       presence=head_only)    # prompt 2 (index 1) judged absent
    for b in range(2):
        assert not (decided[b] == 2).any()
        assert [s["kept"] for s in dscores[b]] == [True, False, True]
        assert [s["present"] for s in dscores[b]] == [True, False, True]
        same = maps[b] != 2
        assert np.all(decided[b][same] == maps[b][same])


@torch.inference_mode()
def test_the_decision_reads_the_mask_area_at_the_image_size(tiny_asam_inputs):
    """A rule on the area alone (weight 1 on ``area``, 0 elsewhere) keeps exactly the prompts
    whose mask covers at least their own threshold's share of the image, on letterboxed images of
    two other sizes, the share computed by hand from the calibration's own reading of the logits
    (:func:`SAM.samus_data.restore_logits`: crop the content, resize to the image's size). Bug
    caught: inference reading a feature otherwise than calibration did (the low-res grid, the
    padding, another image's size or prompt), or a weight applied to the wrong feature."""
    from SAM.samus_data import restore_logits

    seg, prompter, images, ids, _, _ = tiny_asam_inputs
    valid, sizes = [(64, 48), (40, 64)], [(90, 68), (50, 80)]   # content of each 64 px input, image sizes
    images = images.clone()
    images[0, :, :, 48:] = 0
    images[1, :, 40:, :] = 0
    _, raw = fast_decoder.predict_index_maps(seg, prompter, images, ids, valid, sizes, return_scores=True)
    emb = seg.embed(images)
    sparse = prompter(images, emb, torch.tensor(ids).expand(2, 3))
    logits, _ = fast_decoder.decode_low_res(seg, emb, sparse, seg.grid, seg.grid, with_iou=True)     # 2 x 3 x L x L
    area = torch.stack([(torch.sigmoid(restore_logits(logits[b], valid[b], seg.img_size, sizes[b])) > 0.5)
                        .float().mean((-1, -2)) for b in range(2)])                                # 2 x 3
    thr = torch.sort(area.flatten()).values[2:4].mean().expand(3).clone()   # between the 3rd and 4th areas
    judged = area >= thr
    assert judged.any(1).any() and (~judged).any(), "the stand-in needs prompts on both sides of the threshold"
    rule = PresenceRule(("head", "pred_iou", "max_prob", "area"), np.tile([0.0, 0.0, 0.0, 1.0], (3, 1)),
                        np.zeros(3), thr.double().numpy())
    _, dscores = fast_decoder.predict_index_maps(seg, prompter, images, ids, valid, sizes, return_scores=True,
                                                 presence=rule)
    for b in range(2):
        assert [s["present"] for s in dscores[b]] == judged[b].tolist()
        assert [s["area"] for s in dscores[b]] == pytest.approx(area[b].tolist(), abs=1e-5)
        assert [s["presence"] for s in dscores[b]] == [s["presence"] for s in raw[b]]


def test_the_combined_score_learns_each_score_s_sign_and_beats_a_useless_head():
    """Rows whose head is noise and whose area is *lower* where the anatomy is present (as
    SAM's predicted IoU was on USGRA, docs/RESULTS.md): the fitted weight of the area is
    negative, the head's near 0, and on fresh rows from the same law the combined value
    ranks present above absent where the head alone is a coin."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)

    def rows(n):
        present = rng.random(n) < 0.4
        return [{"key": "A/1", "present": bool(p), "head": float(rng.normal()), "pred_iou": float(rng.normal()),
                 "max_prob": 0.9, "area": float(rng.normal(0.1 if p else 0.4, 0.05))} for p in present]

    val, test = rows(60), rows(400)
    record = presence_record(val, ["A/1"], 0.05, "val")
    entry = record["thresholds"]["A/1"]
    assert record["score"] == "combined" and entry["weight"]["area"] < 0
    assert abs(entry["weight"]["head"]) < abs(entry["weight"]["area"]) / 5
    present = np.array([r["present"] for r in test])
    assert roc_auc_score(present, decision_values(entry, test)) > 0.99
    assert abs(roc_auc_score(present, [r["head"] for r in test]) - 0.5) < 0.1
    m = presence_test_metrics(test, record)["A/1"]
    assert m["fpr"] <= 0.05 and m["tpr"] > 0.9
    head = presence_record(val, ["A/1"], 0.05, "val", score="head")["thresholds"]["A/1"]
    assert head["weight"] == {"head": 1.0} and head["bias"] == 0.0


def test_thresholds_are_chosen_per_prompt_and_round_trip_through_the_checkpoint(tmp_path):
    rng = np.random.default_rng(3)
    rows = [{"key": k, "present": bool(p), "head": float(rng.normal(2.0 if p else -1.0)), "pred_iou": 0.5,
             "max_prob": 0.9, "area": float(rng.random())}
            for k in ("A/1", "B/1") for p in rng.random(40) < 0.5]
    rows += [{"key": "C/1", "present": True, "head": 0.0, "pred_iou": 0.5, "max_prob": 0.9, "area": 0.1}]
    record = presence_record(rows, ["A/1", "B/1", "C/1", "D/1"], 0.05, "val")
    for k in ("A/1", "B/1"):
        mine = [r for r in rows if r["key"] == k]
        ref = choose_threshold(decision_values(record["thresholds"][k], mine),
                               np.array([r["present"] for r in mine]), 0.05)
        assert {n: record["thresholds"][k][n] for n in ref} == ref
    assert record["thresholds"]["C/1"]["threshold"] is None            # nothing absent to calibrate on
    assert record["thresholds"]["D/1"]["threshold"] is None            # no validation line at all
    seg = build_segmenter("vit_tiny", 64, random_init=True)
    path = tmp_path / "best.pt"
    save_checkpoint(path, "asam_stage2", seg, ["A/1", "B/1", "C/1", "D/1"], AutoPrompter(4, grid=8), presence=record)
    ck = load_checkpoint(path, ("asam_stage2",))
    assert ck["presence"] == record and prompter_from_checkpoint(ck).presence_head is not None
    rule = presence_rule(ck["presence"], ["B/1", "C/1", "A/1"])
    assert rule.threshold.tolist() == [record["thresholds"]["B/1"]["threshold"], -np.inf,
                                       record["thresholds"]["A/1"]["threshold"]]
    # the rule gives the values the record was calibrated on
    mine = [r for r in rows if r["key"] == "B/1"]
    named = {f: torch.tensor([[r[f], 0.0, 0.0] for r in mine]) for f in rule.features}
    assert rule.values(named)[:, 0].numpy() == pytest.approx(decision_values(record["thresholds"]["B/1"], mine),
                                                             abs=1e-4)
    assert presence_rule(ck["presence"], ["A/1"], override=0.25).threshold.tolist() == [0.25]
    assert presence_rule(None, ["A/1"]) is None
    # a record written before the weights existed reads as the head's logit
    old = {"thresholds": {"A/1": {"threshold": 1.5}}}
    legacy = presence_rule(old, ["A/1", "B/1"])
    assert legacy.features == ("head",) and legacy.weight.tolist() == [[1.0], [1.0]]
    assert legacy.threshold.tolist() == [1.5, -np.inf]


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


def test_a_folder_decided_by_another_rule_or_none_is_not_reused():
    """SAM/infer_masks.py keeps label maps only for the settings that made them: a folder decided
    by the first rule (``presence_thresholds``) conflicts with a run without a decision and with one
    of today's rule. Bug caught: comparing only the new run's keys, which let ``--presence off``
    add undecided maps to a decided folder."""
    from SAM.infer_masks import settings_conflict

    base = {"checkpoint_sha256": "x", "prompts": ["A/1"], "threshold": 0.5, "min_pred_iou": None,
            "min_stability": None}
    old = base | {"presence_thresholds": [1.5]}
    assert "presence_thresholds was [1.5], now 'not set'" in settings_conflict(old, None, base, True)
    today = base | {"presence": presence_rule({"thresholds": {"A/1": {"threshold": 1.5}}}, ["A/1"]).settings()}
    assert "presence was 'not set'" in settings_conflict(old, None, today, True)
    assert settings_conflict(today, None, dict(today), True) is None
    assert settings_conflict(old, None, base, False) is None            # no label maps yet: nothing to keep
