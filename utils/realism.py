"""How close synthetic scans are to real ones: per-image statistics and set-level distances.

Everything is measured inside the imaged region (:func:`field_of_view`: the fan of a convex
probe, the rectangle of a linear one), on grayscale images resized to ``SIDE`` px:

- intensity histogram (:data:`BINS` bins over 0..255) -> Wasserstein-1 distance (in grey
  levels) between the two sets' mean histograms (each image normalised first, so every image
  counts equally, whatever the size of its field of view);
- depth profile: the mean grey level in :data:`DEPTH_BANDS` equal bands from the top of the
  field of view to its bottom -> mean absolute difference of the two sets' mean profiles;
- speckle: the median over 8x8 patches of std / mean (a fully developed Rayleigh speckle
  gives 0.52 before compression) and the correlation of the high-passed image with itself
  shifted by one pixel axially and laterally (the grain size);
- geometry: the share of the image the field of view covers and its width at 10 % and 90 % of
  its height (a fan widens with depth, a rectangle does not);
- bright structures: the 99th percentile over the median (pleura, rib cortex, A-lines stand out
  of the tissue) and the ridge prominence, the largest excess of a row's mean over the median
  of the 15 rows around it, relative to the mean (a bright horizontal line such as the pleura).

A real-vs-synthetic classifier (:func:`separability`) trained on these features by
cross-validation gives one more number: 0.5 means the features cannot tell the sets apart,
1.0 that they always can. It sees only these hand-made features, so a low accuracy says the
statistics match, not that a network could not tell the images apart.
Pure functions; the script that reads images is ``benchmarks/measure_synthetic_realism.py``.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import median_filter

SIDE = 128
BINS = 32
DEPTH_BANDS = 8
FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"hist_{i}" for i in range(BINS))
    + tuple(f"depth_{i}" for i in range(DEPTH_BANDS))
    + ("speckle_contrast", "corr_axial", "corr_lateral", "fov_share", "width_top", "width_bottom",
       "mean", "std", "bright_ratio", "ridge")
)


def to_gray(img: np.ndarray, side: int = SIDE) -> np.ndarray:
    """HxW or HxWxC uint8 -> side x side float32 grey levels (0..255), area-resized."""
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2) if img.shape[2] in (3, 4) else img[..., 0]   # alpha is not grey
    return cv2.resize(img.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)


def field_of_view(gray: np.ndarray, threshold: float = 6.0) -> np.ndarray:
    """The imaged region: the convex hull of the largest connected area brighter than
    ``threshold`` after a blur and a closing (a hull, so that dark lung or a rib shadow that
    reaches the fan's edge stays in; the fan's concave top arc adds a sliver)."""
    smooth = cv2.GaussianBlur(gray, (0, 0), 2.0)
    on = (smooth > threshold).astype(np.uint8)
    on = cv2.morphologyEx(on, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(on, connectivity=4)
    if n <= 1:
        return np.ones_like(gray, bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    ys, xs = np.nonzero(comp == biggest)
    hull = cv2.convexHull(np.stack([xs, ys], 1).astype(np.int32))
    mask = np.zeros(gray.shape, np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(bool)


def _row_widths(fov: np.ndarray) -> tuple[int, int, np.ndarray]:
    rows = np.flatnonzero(fov.any(axis=1))
    return int(rows[0]), int(rows[-1]), fov.sum(axis=1)


def image_features(img: np.ndarray, side: int = SIDE) -> np.ndarray:
    """One image -> its feature vector (order: :data:`FEATURE_NAMES`)."""
    g = to_gray(img, side)
    fov = field_of_view(g)
    vals = g[fov]
    hist = np.histogram(vals, bins=BINS, range=(0, 256))[0].astype(np.float64)
    hist /= max(hist.sum(), 1)
    top, bottom, widths = _row_widths(fov)
    edges = np.linspace(top, bottom + 1, DEPTH_BANDS + 1).astype(int)
    depth = [float(g[a:b][fov[a:b]].mean()) if fov[a:b].any() else 0.0
             for a, b in zip(edges[:-1], edges[1:])]
    # speckle contrast: std / mean of 8x8 patches wholly inside the field of view and not black
    p = 8
    hh, ww = (side // p) * p, (side // p) * p
    blocks = g[:hh, :ww].reshape(hh // p, p, ww // p, p).transpose(0, 2, 1, 3).reshape(-1, p * p)
    inside = fov[:hh, :ww].reshape(hh // p, p, ww // p, p).all(axis=(1, 3)).reshape(-1)
    means = blocks.mean(1)
    keep = inside & (means > 10)
    contrast = float(np.median(blocks[keep].std(1) / means[keep])) if keep.any() else 0.0
    # grain: correlation of the high-passed image with its one-pixel shifts, inside the fov
    hp = g - cv2.GaussianBlur(g, (0, 0), 3.0)
    inner = cv2.erode(fov.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)

    def corr(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
        a, b = a[m], b[m]
        if a.size < 10:
            return 0.0
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-9))
    corr_ax = corr(hp[:-1], hp[1:], inner[:-1] & inner[1:])
    corr_lat = corr(hp[:, :-1], hp[:, 1:], inner[:, :-1] & inner[:, 1:])
    span = bottom - top
    w_top = widths[top + int(0.1 * span)] / side
    w_bottom = widths[top + int(0.9 * span)] / side
    p50, p99 = np.percentile(vals, [50, 99])
    rows = np.array([g[r][fov[r]].mean() for r in range(top, bottom + 1) if fov[r].any()])
    ridge = float((rows - median_filter(rows, 15, mode="nearest")).max() / (rows.mean() + 1e-6))
    return np.array([*hist, *depth, contrast, corr_ax, corr_lat, fov.mean(), w_top, w_bottom,
                     float(vals.mean()), float(vals.std()), p99 / max(p50, 1.0), ridge], np.float64)


def set_statistics(features: np.ndarray) -> dict:
    """(N, F) features of one set -> its mean histogram, depth profile and scalar statistics
    (mean and sample std over images)."""
    f = np.asarray(features, np.float64)
    names = FEATURE_NAMES
    scal = {n: {"mean": float(f[:, i].mean()), "std": float(f[:, i].std(ddof=1)) if len(f) > 1 else 0.0}
            for i, n in enumerate(names) if not n.startswith(("hist_", "depth_"))}
    return {"n": int(len(f)), "histogram": f[:, :BINS].mean(0).tolist(),
            "depth_profile": f[:, BINS:BINS + DEPTH_BANDS].mean(0).tolist(), "scalars": scal}


def histogram_distance(h1: np.ndarray, h2: np.ndarray) -> float:
    """Wasserstein-1 distance in grey levels between two normalized :data:`BINS`-bin histograms
    over 0..255 (the area between their cumulative distributions)."""
    c1, c2 = np.cumsum(h1) / np.sum(h1), np.cumsum(h2) / np.sum(h2)
    return float(np.abs(c1 - c2).sum() * (256 / len(h1)))


def distances(real: np.ndarray, synthetic: np.ndarray) -> dict:
    """Set-level distances between the features of real and synthetic images."""
    r, s = set_statistics(real), set_statistics(synthetic)
    out = {"histogram_w1": histogram_distance(np.array(r["histogram"]), np.array(s["histogram"])),
           "depth_profile_mad": float(np.mean(np.abs(np.subtract(r["depth_profile"], s["depth_profile"]))))}
    for n in r["scalars"]:
        out[f"{n}_diff"] = s["scalars"][n]["mean"] - r["scalars"][n]["mean"]
    return out


def separability(real: np.ndarray, synthetic: np.ndarray, groups_real: np.ndarray | None = None,
                 groups_synthetic: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated accuracy of a real-vs-synthetic classifier on the features.

    Two classifiers: standardized logistic regression (a linear boundary) and gradient-boosted
    trees (any boundary). Sets are balanced by subsampling the larger one; frames of one video
    (``groups_real``, ``groups_synthetic``; default: every image its own) never sit on both
    sides of a split.
    Returns {classifier: {"accuracy": mean, "std": sample std over folds}, "n_per_set": n}.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(real), len(synthetic))
    ri, si = rng.choice(len(real), n, replace=False), rng.choice(len(synthetic), n, replace=False)
    X = np.concatenate([real[ri], synthetic[si]])
    y = np.r_[np.zeros(n), np.ones(n)]
    g_real = np.asarray(groups_real)[ri] if groups_real is not None else np.arange(n)
    g_syn = np.asarray(groups_synthetic)[si] if groups_synthetic is not None else np.arange(n)
    groups = np.r_[np.unique(g_real, return_inverse=True)[1], n + np.unique(g_syn, return_inverse=True)[1]]
    models = {"logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
              # leaves of >= 20 samples (the default) cannot split a small set at all
              "boosted_trees": lambda: HistGradientBoostingClassifier(
                  min_samples_leaf=max(2, min(20, n // 10)), random_state=seed)}
    out: dict = {"n_per_set": int(n), "folds": folds}
    for name, make in models.items():
        accs = []
        for tr, te in GroupKFold(n_splits=folds).split(X, y, groups):
            accs.append(float((make().fit(X[tr], y[tr]).predict(X[te]) == y[te]).mean()))
        out[name] = {"accuracy": float(np.mean(accs)), "std": float(np.std(accs, ddof=1))}
    return out
