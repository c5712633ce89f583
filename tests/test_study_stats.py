"""study/stats.py against hand-computed values and brute force."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from study.stats import Difference, describe, hierarchical_bootstrap, markdown_table, paired_difference, summarize


def _rows(arm, values, protocol="linear", source="-"):
    """values[(seed, fold)] -> rows."""
    return [{"arm": arm, "mask_source": source, "seed": s, "protocol": protocol, "fold": f,
             "accuracy": v, "macro_f1": v - 0.01} for (s, f), v in values.items()]


def test_summary_is_mean_and_sample_sd_over_seeds_and_folds():
    vals = {(0, 1): 0.7, (0, 2): 0.8, (1, 1): 0.9, (1, 2): 0.6}
    s = summarize(_rows("a", vals), "a", "linear")
    assert s["n"] == 4 and s["seeds"] == 2
    assert s["mean"] == pytest.approx(0.75)
    assert s["sd"] == pytest.approx(math.sqrt(((0.05 ** 2) * 2 + 0.15 ** 2 * 2) / 3))   # ddof = 1


def test_a_constant_shift_is_found_with_a_tight_interval():
    base = {(s, f): 0.6 + 0.05 * f + 0.01 * s for s in range(3) for f in range(1, 6)}
    rows = _rows("random", base) + _rows("aclus", {k: v + 0.02 for k, v in base.items()})
    d = paired_difference(rows, "aclus", "random", "linear")
    assert d.n_pairs == 15 and d.mean == pytest.approx(0.02)
    assert d.lo == pytest.approx(0.02) and d.hi == pytest.approx(0.02) and d.verdict == "higher"
    # unpaired, the fold spread (0.2) would swamp a 0.02 shift: the pairing is what finds it
    assert summarize(rows, "aclus", "linear")["sd"] > 0.05


def test_noise_around_zero_is_not_distinguishable_and_pairs_follow_keys_not_order():
    rng = np.random.default_rng(0)
    base = {(s, f): float(rng.uniform(0.6, 0.9)) for s in range(3) for f in range(1, 6)}
    noisy = {k: v + float(rng.normal(0, 0.03)) for k, v in base.items()}
    rows = _rows("random", base) + _rows("byol", noisy)
    d = paired_difference(rows, "byol", "random", "linear")
    assert d.lo < 0 < d.hi and d.verdict == "not distinguishable"
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert paired_difference(shuffled, "byol", "random", "linear") == d
    # brute force: the mean difference of the matched keys
    assert d.mean == pytest.approx(np.mean([noisy[k] - base[k] for k in base]))


def test_only_common_pairs_count_and_duplicates_are_refused():
    rows = _rows("a", {(0, 1): 0.5, (0, 2): 0.6, (1, 1): 0.9}) + _rows("b", {(0, 1): 0.4, (0, 2): 0.4})
    d = paired_difference(rows, "a", "b", "linear")
    assert d.n_pairs == 2 and d.mean == pytest.approx(0.15)
    assert paired_difference(rows, "a", "c", "linear").verdict == "no pairs"
    with pytest.raises(ValueError, match="appears twice"):
        summarize(rows + _rows("a", {(0, 1): 0.1}), "a", "linear")


def test_table():
    rows = _rows("random", {(0, f): 0.6 for f in range(1, 6)}) + _rows("aclus", {(0, f): 0.7 for f in range(1, 6)})
    md = markdown_table(rows, "linear", ["random", "aclus"], ["random"])
    assert "| aclus | 5 (1 seeds) | 0.700 ± 0.000 | +0.100 [+0.100, +0.100] higher |" in md
    assert describe(Difference("a", "b", 0.01, -0.02, 0.03, 10)) == "+0.010 [-0.020, +0.030] not distinguishable"


def test_the_resampling_unit_is_the_fold_then_the_seed_within_it():
    """Hand-computed: two folds whose three seeds agree (differences 0 and 1). Resampling folds,
    the replicate is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the 95 % interval is [0, 1].
    Resampling the six (seed, fold) pairs as if independent would give [1/6, 5/6] (P(all six
    from one fold) = 2 / 64 < 5 %): that narrower interval is the bug this test catches."""
    rep = hierarchical_bootstrap([np.zeros(3), np.ones(3)], n_boot=20_000, seed=0)
    values, counts = np.unique(rep, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    rows = _rows("random", {(s, f): 0.5 for s in range(3) for f in (1, 2)}) + \
        _rows("aclus", {(s, f): 0.5 + (f - 1) for s in range(3) for f in (1, 2)})
    d = paired_difference(rows, "aclus", "random", "linear")
    assert (d.mean, d.lo, d.hi, d.n_pairs) == (pytest.approx(0.5), 0.0, 1.0, 6)


def test_seeds_are_resampled_within_a_fold():
    """One fold, two seeds with differences 0 and 1: only the within-fold draw can move the
    replicate (0, 1/2, 1 w.p. 1/4, 1/2, 1/4); resampling folds alone would pin it at 1/2."""
    rep = hierarchical_bootstrap([np.array([0.0, 1.0])], n_boot=20_000, seed=3)
    assert np.percentile(rep, [2.5, 97.5]).tolist() == [0.0, 1.0]
    assert np.mean(rep == 0.5) == pytest.approx(0.5, abs=0.01)


def test_a_verdict_that_depends_on_the_bootstrap_seed_is_not_distinguishable():
    """Search a noisy case whose seed-0 interval just excludes 0 while another seed's does not:
    the reported verdict must then be "not distinguishable", with the union of both intervals."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        by_fold = [rng.normal(0.02, 0.03, 3) for _ in range(5)]
        lo0, _ = np.percentile(hierarchical_bootstrap(by_fold, 2000, 0), [2.5, 97.5])
        lo1, _ = np.percentile(hierarchical_bootstrap(by_fold, 2000, 1), [2.5, 97.5])
        if (lo0 > 0) != (lo1 > 0):
            break
    else:
        pytest.skip("no borderline case found")
    rows = _rows("random", {(s, f): 0.5 for s in range(3) for f in range(1, 6)}) + _rows(
        "aclus", {(s, f): 0.5 + float(by_fold[f - 1][s]) for s in range(3) for f in range(1, 6)})
    d = paired_difference(rows, "aclus", "random", "linear", n_boot=2000, seeds=(0, 1))
    assert d.verdict == "not distinguishable" and d.lo <= min(lo0, lo1) + 1e-12


def test_sweep_chooses_the_best_final_linear_probe_and_pairs_by_fold(tmp_path):
    """Three sweep variants as study_real_data writes them: the choice is the base_lr with the highest
    mean linear accuracy at 100 % (not at an earlier probe point, not on another protocol), and a
    variant without its final rows makes the choice provisional."""
    from study import results as res
    from study.sweep import sweep_markdown, sweep_rows

    def variant(lr, final_linear, early_linear, knn):
        sub = tmp_path / f"epochs10_base_lr{lr}"
        sub.mkdir()
        res.write_json(sub / "settings.json", {"preset": {"base_lr": lr}})
        rows = [{"arm": "byol", "method": "byol", "mask_source": "", "seed": 0, "fraction": f, "steps": 1,
                 "protocol": p, "fold": k, "n_test": 10, "accuracy": v + 0.01 * k, "macro_f1": v}
                for f, p, v in ((0.5, "linear", early_linear), (1.0, "linear", final_linear), (1.0, "knn", knn))
                for k in range(1, 6) if not (final_linear is None and f == 1.0)]
        res.write_rows(sub / "per_fold.csv", rows, res.FOLD_COLUMNS)

    variant(2.0, 0.80, 0.90, 0.95)      # best early and on kNN, not at the end of the linear probe
    variant(8.0, 0.82, 0.70, 0.60)
    variant(16.0, None, 0.99, 0.99)     # unfinished
    md, choice = sweep_markdown(sweep_rows(tmp_path))
    assert choice["chosen_base_lr"] == 8.0 and choice["unfinished"] == ["lr=16"]
    assert "PROVISIONAL" in md and "-0.020 [-0.020, -0.020] lower" in md
    assert "lr=16" not in choice["final"]["linear"]          # no NaN for the unfinished variant


def test_spread_false_alarm_is_one_third_with_two_seeds():
    """Hand-computed: with 2 seeds of unit-normal means, u = (x_1 + x_2) / sqrt(2) and v = (x_1 - x_2) /
    sqrt(2) are i.i.d. N(0, 1); mean_a - mean_b = (u_a - u_b) / sqrt(2) ~ N(0, 1) and the sample sd is
    |v|, so the check compares three i.i.d. |N(0, 1)| values and fails when the first is the largest:
    probability 1/3. The population sd (ddof 0) would give ~0.46."""
    from study.stats import spread_false_alarm

    assert spread_false_alarm(2) == pytest.approx(1 / 3, abs=0.005)
    assert spread_false_alarm(3) < spread_false_alarm(2)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        spread_false_alarm(1)


def test_within_spread_compares_with_the_larger_sd():
    from study.stats import within_spread

    assert within_spread(0.03, 0.01, 0.03) and within_spread(-0.03, 0.03, 0.01)
    assert not within_spread(0.031, 0.03, 0.01)


def test_the_parity_note_gives_the_rate_for_the_studys_seeds():
    from study.render import parity_note
    from study.stats import spread_false_alarm

    rows = [{"arm": "byol", "seed": s} for s in (0, 1, 2)] + [{"arm": "lightly_byol", "seed": 0}]
    assert f"With 3 seeds per arm, two arms of one algorithm fail that at {spread_false_alarm(3):.0%}" in parity_note(rows)
    assert "needs at least two seeds" in parity_note(rows[:1])
