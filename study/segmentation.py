"""The segmentation downstream over a study's encoders: rows and paired tables (pure).

``study_segmentation.py`` runs ``evaluation_segmentation.py`` once per (data set, arm, seed)
and keeps two files in its results folder:

* ``per_image.csv``  one row per (data set, arm, seed, variant, fraction, test image, class):
  that image's test Dice for that class (only classes the image shows);
* ``runs.csv``       one row per (data set, arm, seed, variant, fraction): training images,
  the selected epoch, its validation Dice, the test split's class-mean Dice / IoU / HD95, time.

Arms are compared with random init *paired*: same data set, variant, fraction, seed (so the
same label subset) and test image. The unit that all seeds and arms share is the test image,
so the interval resamples test images, then seeds within each (:func:`study.stats.unit_bootstrap`).
An image's value is its Dice averaged over the classes it shows.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from evaluation.segmentation import VARIANTS
from study import stats

IMAGE_COLUMNS = ("dataset", "arm", "seed", "variant", "fraction", "image", "class", "dice")
RUN_COLUMNS = ("dataset", "arm", "seed", "variant", "fraction", "n_train", "selected_epoch", "val_dice",
               "dice", "iou", "hd95", "seconds")
INTS = frozenset({"seed", "n_train", "selected_epoch"})
FLOATS = frozenset({"fraction", "dice", "val_dice", "iou", "hd95", "seconds"})
REFERENCE = "random"


def rows_of(summary: dict, *, dataset: str, arm: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(per-image rows, run rows) of one ``segmentation.json`` of ``evaluation_segmentation.py``."""
    images, runs = [], []
    for r in summary["results"]:
        key = {"dataset": dataset, "arm": arm, "seed": seed, "variant": r["variant"], "fraction": float(r["fraction"])}
        for image, dice in sorted(r["test_dice_per_image"].items()):
            images += [key | {"image": image, "class": c, "dice": round(float(d), 6)} for c, d in sorted(dice.items())]
        m = r["test"]["mean"]
        runs.append(key | {"n_train": r["n_train"], "selected_epoch": r["selected_epoch"],
                           "val_dice": round(float(r["val_dice"]), 6), "dice": round(m["dice"], 6),
                           "iou": round(m["iou"], 6), "hd95": None if math.isnan(m["hd95"]) else round(m["hd95"], 4),
                           "seconds": r["seconds"]})
    return images, runs


def done(runs: list[dict], dataset: str, arm: str, seed: int, variants, fractions) -> bool:
    """Whether every (variant, fraction) of this (data set, arm, seed) has its run row."""
    have = {(r["variant"], r["fraction"]) for r in runs
            if (r["dataset"], r["arm"], r["seed"]) == (dataset, arm, seed)}
    return {(v, float(f)) for v in variants for f in fractions} <= have


def image_values(rows: list[dict], dataset: str, arm: str, variant: str, fraction: float) -> dict[tuple, float]:
    """{(image, seed): the image's Dice averaged over the classes it shows}."""
    per = defaultdict(list)
    for r in rows:
        if (r["dataset"], r["arm"], r["variant"], r["fraction"]) == (dataset, arm, variant, fraction):
            per[r["image"], r["seed"]].append(r["dice"])
    return {k: float(np.mean(v)) for k, v in per.items()}


def seed_means(values: dict[tuple, float]) -> list[float]:
    """The mean over test images of each seed."""
    by_seed = defaultdict(list)
    for (_, seed), v in values.items():
        by_seed[seed].append(v)
    return [float(np.mean(by_seed[s])) for s in sorted(by_seed)]


def table(rows: list[dict], dataset: str, variant: str, arms: list[str], fractions: list[float],
          n_boot: int = stats.N_BOOT) -> str:
    """One data set and variant: per fraction and arm, the test Dice (mean ± sd over seeds of
    the image mean) and the paired difference from random init with its 95 % interval."""
    lines = ["| labels | arm | seeds | test Dice mean ± sd | difference from random (95 % CI) |",
             "|---|---|---|---|---|"]
    for f in fractions:
        ref = image_values(rows, dataset, REFERENCE, variant, f)
        for arm in arms:
            vals = image_values(rows, dataset, arm, variant, f)
            if not vals:
                continue
            means = seed_means(vals)
            sd = f"{np.std(means, ddof=1):.3f}" if len(means) > 1 else "–"
            diff = "–" if arm == REFERENCE else stats.describe(stats.unit_difference(vals, ref, arm, REFERENCE, n_boot))
            lines.append(f"| {f:.0%} | {arm} | {len(means)} | {np.mean(means):.3f} ± {sd} | {diff} |")
    return "\n".join(lines) + "\n"


def results_markdown(rows: list[dict], runs: list[dict], settings: dict, n_boot: int = stats.N_BOOT) -> str:
    """Every data set x variant table, with what made them."""
    arms = [REFERENCE] + sorted({r["arm"] for r in rows} - {REFERENCE})
    fractions = sorted({r["fraction"] for r in rows})
    out = [f"Segmentation downstream of the study `{settings.get('study', '?')}` "
           f"({settings.get('img_size')} px, {settings.get('epochs')} epochs, selection on validation Dice; "
           f"{settings.get('where', '?')}; commit {settings.get('commit') or '?'}). "
           "Test Dice per image (mean over the classes it shows); mean ± sd over an arm's seeds; the difference "
           "from random init is paired by seed and test image over the seeds both arms have (so it can differ "
           "from the difference of the two means), its interval resamples test images, then seeds.\n"]
    for dataset in sorted({r["dataset"] for r in rows}):
        leak = settings.get("leaks", {}).get(dataset)
        for variant in [v for v in VARIANTS if any(r["variant"] == v for r in rows)]:
            out.append(f"\n**{dataset}, {variant}**" + (f" ({leak})" if leak else "") + "\n\n")
            out.append(table(rows, dataset, variant, arms, fractions, n_boot))
    if len({r["seed"] for r in rows}) < 2 or any(len({r["seed"] for r in rows if r["arm"] == a}) < 2 for a in arms):
        out.append("\nWhere an arm has one seed, its interval resamples test images only: it holds the "
                   "test set's variation, not that of pre-training, label subset and decoder seeds.\n")
    return "".join(out)
