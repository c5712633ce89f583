"""Statistics of label maps as pre-training masks (pure: no I/O, no global state).

Per label map (:func:`frame_stats`): whether the source *fires* (>= 1 non-background
region), how many regions it has, each region's pixel share and their total, and how many
regions still own at least one cell of the C5 grid of a ``view`` x ``view`` pre-training view
(:func:`c5_survivors`): the label map is resized to the view by nearest neighbour, as
``pretraining/data.crop_resize`` does for a crop that is the whole image, and pooled onto
the encoder's grids by :func:`models.losses.label_grids`, the very function the pre-training
calls (majority area per cell, background competing; a region that owns no C5 cell adds
nothing to the C5 loss). Over a set (:func:`summarise`): the means and standard deviations.
Per video (:func:`centroid_spread`): the spread (std) of a named region's vertical centroid
across the frames of one video (a stable anatomy such as the pleura should barely move).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from models.losses import label_grids
from pretraining.data import crop_resize


def resnet_grid_sizes(view: int) -> dict[str, int]:
    """Side of each feature grid of torchvision's ResNet-18 (and so of the FPN levels built on
    it) for a ``view`` x ``view`` input: conv1 (k7 s2 p3), max-pool (k3 s2 p1), then the
    stride-2 first convolutions (k3 s2 p1) of layer2..4. {'p2', 'p3', 'p4', 'c5'} -> side."""
    def down(n: int, k: int, s: int, p: int) -> int:
        return (n + 2 * p - k) // s + 1
    p2 = down(down(view, 7, 2, 3), 3, 2, 1)
    p3 = down(p2, 3, 2, 1)
    p4 = down(p3, 3, 2, 1)
    return {"p2": p2, "p3": p3, "p4": p4, "c5": down(p4, 3, 2, 1)}


def view_label(label: np.ndarray, view: int) -> np.ndarray:
    """H x W label map -> the view x view mask of a view that is the whole image: the
    pre-training's own :func:`pretraining.data.crop_resize` (nearest neighbour)."""
    h, w = label.shape
    return crop_resize(label.astype(np.uint8 if label.max(initial=0) < 256 else np.int32),
                       (0, 0, w, h), view, nearest=True)


SCALES_FINEST_FIRST = ("p2", "p3", "p4", "c5")


def scale_survivors(label: np.ndarray, view: int = 112) -> dict[str, set[int]]:
    """Per scale, the non-background ids of ``label`` that own at least one cell of that
    scale's grid in a ``view`` px view (grids pooled finest first, P2 -> C5, as the
    pre-training does); a region owning no cell adds nothing to that scale's loss."""
    small = torch.from_numpy(view_label(label, view).astype(np.int64))[None]   # 1 x v x v
    num_ids = int(small.max()) + 1
    sizes = resnet_grid_sizes(view)
    grids = label_grids(small, [(sizes[s], sizes[s]) for s in SCALES_FINEST_FIRST], num_ids)
    return {s: {int(i) for i in torch.unique(g) if i != 0} for s, g in zip(SCALES_FINEST_FIRST, grids)}


def c5_survivors(label: np.ndarray, view: int = 112) -> set[int]:
    """The non-background ids of ``label`` that own at least one cell of the C5 grid of a ``view`` px view."""
    return scale_survivors(label, view)["c5"]


def frame_stats(label: np.ndarray, view: int = 112) -> dict:
    """One H x W integer label map (0 = background) ->
    ``{fires, regions, shares {id: pixel share}, total_share, c5_regions}``."""
    ids, counts = np.unique(label, return_counts=True)
    shares = {int(i): float(c) / label.size for i, c in zip(ids, counts) if i != 0}
    survivors = scale_survivors(label, view) if shares else {s: set() for s in SCALES_FINEST_FIRST}
    return {"fires": bool(shares), "regions": len(shares), "shares": shares,
            "total_share": float(sum(shares.values())),
            "c5_regions": len(survivors["c5"]), "scale_regions": {s: len(v) for s, v in survivors.items()}}


def _mean_std(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def summarise(stats: Iterable[dict]) -> dict:
    """:func:`frame_stats` of a set of frames -> the set's summary:

    * ``fires``: share of frames with >= 1 region;
    * ``regions_per_frame``, ``total_share``: mean / std (ddof 1) / n over all frames;
    * ``region_share``: mean / std / n over all regions of all frames;
    * ``c5_survival``: regions owning a C5 cell / all regions (pooled over frames), with its
      counts; ``survival``: the same share at every scale (p2, p3, p4, c5); ``c5_survival_per_frame``: mean / std over the frames that fire."""
    stats = list(stats)
    regions = sum(s["regions"] for s in stats)
    c5 = sum(s["c5_regions"] for s in stats)
    return {
        "frames": len(stats),
        "fires": float(np.mean([s["fires"] for s in stats])) if stats else None,
        "regions_per_frame": _mean_std([s["regions"] for s in stats]),
        "total_share": _mean_std([s["total_share"] for s in stats]),
        "region_share": _mean_std([v for s in stats for v in s["shares"].values()]),
        "c5_survival": {"share": c5 / regions if regions else None, "regions": regions, "c5_regions": c5},
        # per scale: regions owning >= 1 cell of that grid / all regions (pooled over frames)
        "survival": {sc: (sum(s["scale_regions"][sc] for s in stats) / regions if regions else None)
                     for sc in SCALES_FINEST_FIRST} if stats and "scale_regions" in stats[0] else {},
        "c5_survival_per_frame": _mean_std([s["c5_regions"] / s["regions"] for s in stats if s["regions"]]),
    }


def vertical_centroid(label: np.ndarray, region: int) -> float | None:
    """Mean row of ``region``'s pixels as a fraction of the height (0 top, 1 bottom; pixel
    centres at (row + 0.5) / H); None when the region is absent."""
    rows = np.nonzero(label == region)[0]
    return float((rows.mean() + 0.5) / label.shape[0]) if rows.size else None


def centroid_spread(frames: Sequence[np.ndarray], region: int) -> dict:
    """The frames of ONE video -> the std (ddof 0: the spread of these frames, not an estimate)
    of ``region``'s vertical centroid over the frames where it is present, and in how many
    frames it is present; std None when present in fewer than 2 frames."""
    c = [v for v in (vertical_centroid(f, region) for f in frames) if v is not None]
    return {"std": float(np.std(c)) if len(c) >= 2 else None, "present": len(c), "frames": len(frames)}
