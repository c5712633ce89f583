"""The study's statistics: per-fold rows -> arm summaries and paired differences (pure).

A row is one (arm, mask source, seed, protocol, fold) result with its accuracy and
macro-F1, as ``docs/results/study/per_fold.csv`` holds them (:mod:`study.results`). Arms are compared *paired*:
a difference is taken between two arms on the same (seed, fold), so the fold-to-fold
spread that both share cancels. The seeds of a study share the same five folds, so the
(seed, fold) pairs are not independent: the 95 % interval is a two-level percentile
bootstrap that resamples folds, then seeds within each drawn fold (:func:`hierarchical_bootstrap`).
A difference whose interval contains 0 is "not distinguishable", never a ranking; so is one
whose verdict changes with the bootstrap's own random seed (:data:`CHECK_SEEDS`).
:func:`unit_bootstrap` is the same scheme for many shared units (the test images of the
segmentation study) and :func:`unit_difference` its paired comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    """Mean paired difference ``arm - reference`` of one metric, with its 95 % bootstrap interval."""
    arm: str
    reference: str
    mean: float
    lo: float
    hi: float
    n_pairs: int

    @property
    def verdict(self) -> str:
        if self.n_pairs == 0:
            return "no pairs"
        if self.lo > 0:
            return "higher"
        if self.hi < 0:
            return "lower"
        return "not distinguishable"


def _values(rows: list[dict], arm: str, protocol: str, metric: str) -> dict[tuple[int, int], float]:
    """{(seed, fold): value} of one arm and protocol; a repeated key is an error."""
    out: dict[tuple[int, int], float] = {}
    for r in rows:
        if r["arm"] == arm and r["protocol"] == protocol:
            key = (int(r["seed"]), int(r["fold"]))
            if key in out:
                raise ValueError(f"arm {arm!r}, protocol {protocol!r}: seed {key[0]} fold {key[1]} appears twice")
            out[key] = float(r[metric])
    return out


def summarize(rows: list[dict], arm: str, protocol: str, metric: str = "accuracy") -> dict:
    """Mean and sample standard deviation (ddof = 1) over every seed x fold of one arm."""
    v = np.array(list(_values(rows, arm, protocol, metric).values()), dtype=np.float64)
    return {"arm": arm, "protocol": protocol, "metric": metric, "n": int(v.size),
            "mean": float(v.mean()) if v.size else math.nan,
            "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
            "seeds": len({s for s, _ in _values(rows, arm, protocol, metric)})}


#: resamples of every interval, and the bootstrap seeds whose verdicts must agree
N_BOOT = 20_000
CHECK_SEEDS = (0, 1)


def hierarchical_bootstrap(by_fold: list[np.ndarray], n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the mean of fold means.

    Each replicate draws as many folds as there are, with replacement, and, independently for
    every drawn fold, as many of that fold's values (one per seed) as it has, with
    replacement; the replicate is the mean over the drawn folds of the mean of their drawn
    values. ``by_fold``: one 1-D array of paired differences (one per seed) per fold.
    """
    rng = np.random.default_rng(seed)
    n_folds = len(by_fold)
    # within[f][r, j]: the mean of fold f's values as redrawn for position j of replicate r
    within = np.stack([v[rng.integers(0, v.size, size=(n_boot, n_folds, v.size))].mean(axis=2)
                       for v in by_fold])                                     # F x n_boot x F
    folds = rng.integers(0, n_folds, size=(n_boot, n_folds))                  # n_boot x F
    return within[folds, np.arange(n_boot)[:, None], np.arange(n_folds)[None, :]].mean(axis=1)


def unit_bootstrap(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, chunk: int = 1000) -> np.ndarray:
    """The same two-level bootstrap as :func:`hierarchical_bootstrap` for a full design of many
    units: ``values[u, s]`` (units x seeds, every unit has every seed; e.g. test images that all
    seeds score). Each replicate draws as many units as there are, with replacement, and for
    each drawn unit as many of its seeds, with replacement; it is the mean over the drawn units
    of the mean of their drawn values. Draws only what a replicate uses (memory ~ chunk x units
    x seeds), so hundreds of units are cheap where :func:`hierarchical_bootstrap` is quadratic."""
    values = np.asarray(values, dtype=np.float64)
    n_units, n_seeds = values.shape
    rng = np.random.default_rng(seed)
    # per drawn position: [unit, seed draw 1..n_seeds], replicate by replicate from one stream,
    # so the chunk size changes no number
    high = np.array([n_units] + [n_seeds] * n_seeds, dtype=np.int64)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        n = min(chunk, n_boot - start)
        draw = rng.integers(0, high, size=(n, n_units, 1 + n_seeds), dtype=np.int64)
        out[start:start + n] = values[draw[..., :1], draw[..., 1:]].mean(axis=(1, 2))
    return out


def _checked_interval(replicates, seeds: tuple[int, ...]) -> tuple[float, float]:
    """2.5 / 97.5 percentiles of ``replicates(seed)`` for the first of ``seeds``; where another
    bootstrap seed gives another verdict, the union of the intervals (so "not distinguishable")."""
    intervals = [tuple(float(q) for q in np.percentile(replicates(s), [2.5, 97.5])) for s in seeds]
    lo, hi = intervals[0]
    if len({(lo_ > 0) - (hi_ < 0) for lo_, hi_ in intervals}) > 1:
        lo, hi = min(i[0] for i in intervals), max(i[1] for i in intervals)
    return lo, hi


def unit_difference(a: dict[tuple, float], b: dict[tuple, float], arm: str, reference: str,
                    n_boot: int = N_BOOT, seeds: tuple[int, ...] = CHECK_SEEDS) -> Difference:
    """Mean of ``arm - reference`` over the units both have for every common seed, with the
    interval of :func:`unit_bootstrap`. ``a`` / ``b``: {(unit, seed): value}; a unit that lacks
    one of the common seeds in either is left out (the design must be full)."""
    common_seeds = sorted({s for _, s in a} & {s for _, s in b})
    units = sorted({u for u, _ in a} & {u for u, _ in b})
    units = [u for u in units if all((u, s) in a and (u, s) in b for s in common_seeds)]
    if not units or not common_seeds:
        return Difference(arm, reference, math.nan, math.nan, math.nan, 0)
    d = np.array([[a[u, s] - b[u, s] for s in common_seeds] for u in units])
    lo, hi = _checked_interval(lambda s: unit_bootstrap(d, n_boot, s), seeds)
    return Difference(arm, reference, float(d.mean()), lo, hi, int(d.size))


def paired_difference(rows: list[dict], arm: str, reference: str, protocol: str, metric: str = "accuracy",
                      n_boot: int = N_BOOT, seeds: tuple[int, ...] = CHECK_SEEDS) -> Difference:
    """Mean of ``arm - reference`` over the (seed, fold) pairs both have (the mean of fold
    means), and the 2.5 / 97.5 percentiles of :func:`hierarchical_bootstrap` with the first of
    ``seeds``. Where the interval of another of ``seeds`` gives another verdict, the interval
    reported is the union of them (so the verdict is "not distinguishable")."""
    a, b = _values(rows, arm, protocol, metric), _values(rows, reference, protocol, metric)
    keys = sorted(a.keys() & b.keys())
    if not keys:
        return Difference(arm, reference, math.nan, math.nan, math.nan, 0)
    folds = sorted({f for _, f in keys})
    by_fold = [np.array([a[k] - b[k] for k in keys if k[1] == f], dtype=np.float64) for f in folds]
    mean = float(np.mean([v.mean() for v in by_fold]))
    lo, hi = _checked_interval(lambda s: hierarchical_bootstrap(by_fold, n_boot, s), seeds)
    return Difference(arm, reference, mean, lo, hi, len(keys))


def describe(diff: Difference, digits: int = 3) -> str:
    """One table cell: ``+0.021 [+0.004, +0.038] higher`` or ``... not distinguishable``."""
    if diff.n_pairs == 0:
        return "no pairs"
    f = f"{{:+.{digits}f}}"
    return f"{f.format(diff.mean)} [{f.format(diff.lo)}, {f.format(diff.hi)}] {diff.verdict}"


def markdown_table(rows: list[dict], protocol: str, arms: list[str], references: list[str],
                   metric: str = "accuracy") -> str:
    """Per arm: mean ± sd (seeds x folds) and the paired difference from each reference."""
    head = f"| arm | n (seeds x folds) | {metric} mean ± sd | " + " | ".join(
        f"difference from {r} (95 % CI)" for r in references) + " |"
    lines = [head, "|" + "---|" * (3 + len(references))]
    for arm in arms:
        s = summarize(rows, arm, protocol, metric)
        if s["n"] == 0:
            continue
        cells = ["–" if ref == arm else describe(paired_difference(rows, arm, ref, protocol, metric))
                 for ref in references]
        sd = "–" if math.isnan(s["sd"]) else f"{s['sd']:.3f}"
        lines.append(f"| {arm} | {s['n']} ({s['seeds']} seeds) | {s['mean']:.3f} ± {sd} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def within_spread(difference, sd_a, sd_b):
    """The parity tables' check: ``|difference| <= max(sd_a, sd_b)`` (the larger sd of the two arms'
    seed means); elementwise on arrays."""
    return np.abs(difference) <= np.maximum(sd_a, sd_b)


def spread_false_alarm(seeds: int, draws: int = 200_000, rng_seed: int = 0) -> float:
    """How often two arms of *one* algorithm fail the parity tables' "within the seed spread" check.

    The check (:func:`within_spread`, as ``study.render.parity_table`` applies it) calls a difference
    within the spread when ``|mean_a - mean_b| <= max(sd_a, sd_b)``, the means and sample sds (ddof 1)
    taken over each arm's ``seeds`` seed means. With seed means drawn i.i.d. normal for both arms (Monte Carlo, ``draws``
    pairs of arms): the share of draws the check calls outside. With 2 seeds it is 1/3 exactly (the
    difference and the two sds are then three i.i.d. |N(0, 1)| values).
    """
    if seeds < 2:
        raise ValueError(f"seeds={seeds}: the sample sd needs at least 2 seeds")
    rng = np.random.default_rng(rng_seed)
    a = rng.standard_normal((draws, seeds))
    b = rng.standard_normal((draws, seeds))
    inside = within_spread(a.mean(axis=1) - b.mean(axis=1), a.std(axis=1, ddof=1), b.std(axis=1, ddof=1))
    return float(np.mean(~inside))
