"""Realism statistics (utils/realism.py) against values known without the code under test."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from utils import realism
from utils.synthetic_scan import make_scan


def test_field_of_view_is_the_fan():
    for seed in range(3):
        img, lab = make_scan(seed, realism.SIDE, "convex", seed % 3)
        fov = realism.field_of_view(img.astype(np.float32))
        truth = lab > 0                         # the generator's exact fan
        iou = (fov & truth).sum() / (fov | truth).sum()
        assert iou > 0.9, iou                   # the hull adds the sliver under the concave top arc
        assert (truth & ~fov).sum() < 0.03 * truth.sum()   # but loses almost none of the fan


def test_histogram_distance_is_the_wasserstein_distance_of_the_bins():
    rng = np.random.default_rng(0)
    centres = (np.arange(realism.BINS) + 0.5) * 256 / realism.BINS
    for _ in range(5):
        h1, h2 = rng.random(realism.BINS), rng.random(realism.BINS)
        ref = wasserstein_distance(centres, centres, h1, h2)
        assert realism.histogram_distance(h1, h2) == pytest.approx(ref, rel=1e-9)
    one = np.eye(realism.BINS)
    assert realism.histogram_distance(one[2], one[5]) == pytest.approx(3 * 256 / realism.BINS)


def test_speckle_contrast_of_rayleigh_speckle():
    # fully developed speckle: Rayleigh magnitude, std / mean = sqrt(4 / pi - 1) = 0.523
    rng = np.random.default_rng(1)
    z = np.abs(rng.standard_normal((128, 128)) + 1j * rng.standard_normal((128, 128)))
    img = np.clip(z * 40, 0, 255).astype(np.uint8)
    names = list(realism.FEATURE_NAMES)
    f = realism.image_features(img)
    assert f[names.index("speckle_contrast")] == pytest.approx(np.sqrt(4 / np.pi - 1), abs=0.05)
    assert abs(f[names.index("corr_axial")]) < 0.25 and abs(f[names.index("corr_lateral")]) < 0.25


def test_grain_direction_and_fan_width():
    import cv2

    rng = np.random.default_rng(2)
    noise = rng.standard_normal((128, 128)).astype(np.float32)
    vertical = cv2.GaussianBlur(noise, (1, 0), sigmaX=0.1, sigmaY=2.0)   # grain long along the beam
    img = np.clip(100 + 40 * vertical / vertical.std(), 1, 255).astype(np.uint8)
    names = list(realism.FEATURE_NAMES)
    f = realism.image_features(img)
    assert f[names.index("corr_axial")] > f[names.index("corr_lateral")] + 0.3
    convex = realism.image_features(make_scan(0, 128, "convex")[0])
    linear = realism.image_features(make_scan(0, 128, "linear")[0])
    top, bottom = names.index("width_top"), names.index("width_bottom")
    assert convex[bottom] > convex[top] + 0.1                 # a fan widens with depth
    assert linear[bottom] == pytest.approx(linear[top], abs=0.02) and linear[top] > 0.95


def test_separability_is_chance_for_one_distribution_and_one_for_two():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((80, 6)), rng.standard_normal((80, 6))
    same = realism.separability(a, b, groups_real=np.arange(80) // 2)
    assert abs(same["logistic"]["accuracy"] - 0.5) < 0.15
    far = realism.separability(a, b + 3.0)
    assert far["logistic"]["accuracy"] > 0.95 and far["boosted_trees"]["accuracy"] > 0.95


def test_realistic_style_is_the_one_the_committed_fit_chose(repo_root):
    import json

    from utils.synthetic_scan import REALISTIC, ScanStyle

    fit = json.loads((repo_root / "docs/results/synthetic_realism.json").read_text())["fit"]["style"]
    assert REALISTIC == ScanStyle(**{k: tuple(v) if isinstance(v, list) else v for k, v in fit.items()})


def test_a_bright_line_raises_the_ridge_and_the_bright_ratio():
    rng = np.random.default_rng(4)
    plain = np.clip(rng.normal(80, 8, (128, 128)), 1, 255)
    lined = plain.copy()
    lined[60:63] = 200                                      # a pleura-like horizontal line
    names = list(realism.FEATURE_NAMES)
    f_plain, f_lined = realism.image_features(plain.astype(np.uint8)), realism.image_features(lined.astype(np.uint8))
    ridge, bright = names.index("ridge"), names.index("bright_ratio")
    assert f_plain[ridge] < 0.05 and f_lined[ridge] > 0.5   # (200 - 80) / ~83 over three rows
    assert f_plain[bright] < 1.4 and f_lined[bright] > 2.0
