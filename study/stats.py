"""The study's statistics: per-fold rows -> arm summaries and paired differences (pure).

A row is one (arm, mask source, seed, protocol, fold) result with its accuracy and
macro-F1, as ``docs/results/study/per_fold.csv`` holds them (:mod:`study.results`). Arms are compared *paired*:
a difference is taken between two arms on the same (seed, fold), so the fold-to-fold
spread that both share cancels. Its 95 % interval is a percentile bootstrap over the
pairs; a difference whose interval contains 0 is "not distinguishable", never a ranking.
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


def paired_difference(rows: list[dict], arm: str, reference: str, protocol: str, metric: str = "accuracy",
                      n_boot: int = 10_000, seed: int = 0) -> Difference:
    """Mean of ``arm - reference`` over the (seed, fold) pairs both have, and the 2.5 / 97.5
    percentiles of that mean over ``n_boot`` resamplings of the pairs (with replacement)."""
    a, b = _values(rows, arm, protocol, metric), _values(rows, reference, protocol, metric)
    keys = sorted(a.keys() & b.keys())
    if not keys:
        return Difference(arm, reference, math.nan, math.nan, math.nan, 0)
    d = np.array([a[k] - b[k] for k in keys], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Difference(arm, reference, float(d.mean()), float(lo), float(hi), len(keys))


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
