"""Grad-CAM maps as numbers and pictures: the share of a map's energy inside a region (the
ultrasound sector, or the anatomy that defines a synthetic scan's class), per-class means, the
records and montages the evaluation writes. The maps themselves: :mod:`evaluation.gradcam`.

Pure functions first; the writers (:func:`write_cam_outputs`, :func:`write_synthetic_cam_masks`)
are at the end.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch


def sector_mask(image: np.ndarray, threshold: int = 4) -> np.ndarray:
    """The ultrasound sector of a frame: its non-black region, made robust.

    A pixel is bright when its local mean (a box of ~1/40 of the side) is above
    ``threshold`` grey levels -- the mean, because speckle and compression noise leave
    single black pixels inside and stray grey ones outside. A closing joins pieces split by
    a dark band; only the largest connected piece is kept (text, depth marks and logos
    outside the fan are separate pieces). Inside the sector, tissue can be as black as the
    background (aerated lung without A-lines, a rib shadow, fluid) and reach the fan's
    border, so a dark pixel also counts when bright pixels lie left and right of it in its
    row AND above it in its column (the chest wall); the black cap above a convex probe's
    top arc has nothing above it and stays out. Remaining holes are filled.

    Args:
        image: H x W or H x W x 3 uint8 (or float in [0, 1]).

    Returns:
        H x W bool.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    gray = img.max(axis=2) if img.ndim == 3 else img
    h, w = gray.shape
    side = min(h, w)
    k = max(3, side // 40) | 1
    fg = (cv2.blur(gray, (k, k)) > threshold).astype(np.uint8)
    kc = max(3, side // 25) | 1
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kc, kc)))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return np.zeros((h, w), bool)
    keep = comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    rows = keep.any(axis=1)
    cols = np.arange(w)
    left = np.where(rows, np.argmax(keep, axis=1), w)                    # first bright column per row
    right = np.where(rows, w - 1 - np.argmax(keep[:, ::-1], axis=1), -1)  # last bright column per row
    between = (cols[None, :] >= left[:, None]) & (cols[None, :] <= right[:, None])
    below_bright = np.maximum.accumulate(keep, axis=0)                   # a bright pixel at or above
    keep = (keep | (between & below_bright)).astype(np.uint8)
    # holes = background not reachable from the border
    outside = np.pad(1 - keep, 1, constant_values=1)
    flood = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2)
    return (outside[1:-1, 1:-1] != 2)


def synthetic_class_region(label: np.ndarray, b_lines: np.ndarray, a_lines: np.ndarray,
                           scan_class: int) -> np.ndarray:
    """The anatomy that defines ``scan_class`` on a synthetic scan (``utils.synthetic_us``).

    covid19 (0): pleura (id 3) + the B-line columns of the lung; pneumonia (1): the
    consolidation (id 5); regular (2): pleura + the A-lines. ``b_lines``/``a_lines`` are
    ``make_scan(..., return_findings=True)``'s findings.

    Args:
        label, b_lines, a_lines: H x W (or N x H x W with ``scan_class`` of length N).

    Returns:
        bool array of ``label``'s shape.
    """
    from utils.synthetic_scan import ANATOMY_IDS

    label = np.asarray(label)
    cls = np.asarray(scan_class).reshape((-1,) + (1,) * (label.ndim - 1)) if label.ndim == 3 else scan_class
    pleura = label == ANATOMY_IDS["pleura"]
    return np.where(cls == 0, pleura | b_lines,
                    np.where(cls == 1, label == ANATOMY_IDS["consolidation"], pleura | a_lines))


def to_input_geometry(masks: np.ndarray, img_size: int) -> np.ndarray:
    """N x H x W bool masks in the geometry of the evaluation's test input (shorter side
    resized to ``img_size``, nearest neighbour; centre crop to ``img_size`` square).

    Returns:
        N x img_size x img_size bool.
    """
    from torchvision.transforms import v2

    ops = v2.Compose([v2.Resize(img_size, interpolation=v2.InterpolationMode.NEAREST),
                      v2.CenterCrop(img_size)])
    return ops(torch.from_numpy(np.asarray(masks, bool).astype(np.uint8))).numpy().astype(bool)


def energy_share(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's energy inside its mask: ``sum(max(cam, 0)[mask]) / sum(max(cam, 0))``.

    Args:
        cams: N x H x W float; masks: N x H x W bool (or one H x W mask for all).

    Returns:
        N float64 in [0, 1]; NaN for a map without energy (all zero).
    """
    e = np.maximum(np.asarray(cams, np.float64), 0.0)
    total = e.sum(axis=(-2, -1))
    inside = (e * np.asarray(masks, bool)).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def class_means(values: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """``{class: mean of values over its images}``, NaNs left out; None where none is left."""
    values, y = np.asarray(values, np.float64), np.asarray(y)
    out = {}
    for i, c in enumerate(classes):
        v = values[(y == i) & np.isfinite(values)]
        out[c] = float(v.mean()) if v.size else None
    return out


def pick_per_class(y: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """Indices of ``n`` images per class, evenly spaced over that class's images in order
    (a fold's frames are grouped by video, so this spreads them over videos); all of a
    class's images when it has fewer. Class by class."""
    y = np.asarray(y)
    picked = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) > n:
            idx = idx[np.unique(np.round(np.linspace(0, len(idx) - 1, n)).astype(int))]
        picked.append(idx)
    return np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, np.int64)


def display_images(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised N x 3 x S x S input -> N x S x S x 3 float32 RGB in [0, 1] (what the model saw)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return np.ascontiguousarray((x.detach().float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def overlays(images: np.ndarray, cams: np.ndarray, image_weight: float = 0.55) -> list[np.ndarray]:
    """The package's ``show_cam_on_image`` (JET colour map) per image: N x S x S x 3 float RGB in
    [0, 1] and N x S x S maps in [0, 1] -> N uint8 RGB overlays."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return [show_cam_on_image(np.ascontiguousarray(im, np.float32), np.clip(c, 0, 1), use_rgb=True,
                              image_weight=image_weight) for im, c in zip(images, cams)]


def cam_records(index: np.ndarray, label: np.ndarray, pred: np.ndarray, target: np.ndarray, cams: np.ndarray,
                classes: Sequence[str], sector_share: np.ndarray, region_share: np.ndarray | None = None,
                region_area: np.ndarray | None = None) -> np.ndarray:
    """One structured row per explained image (what the ``.npy`` beside a montage holds).

    Fields: ``index`` (row in the fold's test set / in the image list), ``label``, ``pred``,
    ``target`` (class ids; ``label`` -1 = unknown), ``true_class``, ``pred_class`` (names),
    ``cam`` (S x S float32), ``sector_share``, ``region_share``, ``region_area`` (NaN =
    not known). Loads with ``np.load(path)`` (no pickle).
    """
    n = len(index)
    nan = np.full(n, np.nan)
    width = max([len(c) for c in classes] + [1])
    dtype = [("index", np.int64), ("label", np.int64), ("pred", np.int64), ("target", np.int64),
             ("true_class", f"U{width}"), ("pred_class", f"U{width}"),
             ("cam", np.float32, tuple(cams.shape[1:])), ("sector_share", np.float64),
             ("region_share", np.float64), ("region_area", np.float64)]
    rec = np.zeros(n, dtype=dtype)
    rec["index"], rec["label"], rec["pred"], rec["target"] = index, label, pred, target
    rec["true_class"] = [classes[i] if i >= 0 else "?" for i in label]
    rec["pred_class"] = [classes[i] for i in pred]
    rec["cam"] = cams
    rec["sector_share"] = sector_share
    rec["region_share"] = nan if region_share is None else region_share
    rec["region_area"] = nan if region_area is None else region_area
    return rec


def tile_title(rec) -> str:
    """``true covid19 / pred regular`` and the shares of one record."""
    text = f"true {rec['true_class']} / pred {rec['pred_class']}\nsector {rec['sector_share']:.2f}"
    if np.isfinite(rec["region_share"]):
        text += f"  anatomy {rec['region_share']:.2f}"
    return text


# --------------------------------------------------------------------------- #
# writers (I/O)
# --------------------------------------------------------------------------- #
def write_cam_outputs(records: np.ndarray, images: np.ndarray, png: str | os.PathLike, suptitle: str,
                      cols: int) -> tuple[Path, Path]:
    """The montage PNG (one tile per record: the map over the image, true/pred class and
    shares in the title) and the records as ``<png stem>.npy`` beside it, both atomic.

    Args:
        images: N x S x S x 3 float RGB in [0, 1], aligned with ``records``.
    """
    from utils.io import atomic_write
    from utils.plots import plot_image_grid

    png = Path(png)
    npy = png.with_suffix(".npy")
    atomic_write(npy, lambda f: np.save(f, records, allow_pickle=False))
    plot_image_grid(overlays(images, records["cam"]), png, titles=[tile_title(r) for r in records],
                    cols=cols, suptitle=suptitle)
    return png, npy


def write_synthetic_cam_masks(root: str | os.PathLike, videos_per_class_per_fold: int = 2,
                              frames_per_video: int = 4, size: int = 64, seed: int = 0,
                              finding_strength: float = 1.0, local_findings: bool = False) -> list[Path]:
    """``root/covid_data<k>_cam_masks.npz`` for the synthetic folds that
    ``utils.synthetic_us.write_pocus_folds`` writes with the same arguments: per fold
    ``sector`` (label != 0) and ``region`` (:func:`synthetic_class_region`), each
    N_test x H x W bool, row-aligned with ``X_test``; ``evaluation_aclus.py --gradcam`` reads them."""
    import io

    from utils.io import atomic_write
    from utils.synthetic_us import make_pocus_folds

    paths = []
    folds = make_pocus_folds(videos_per_class_per_fold, frames_per_video, size, seed,
                             finding_strength=finding_strength, return_findings=True,
                             local_findings=local_findings)
    for k, (_, _, _, y_test, found) in enumerate(folds, start=1):
        buf = io.BytesIO()
        np.savez_compressed(buf, sector=found["label"] != 0,
                            region=synthetic_class_region(found["label"], found["b_lines"], found["a_lines"], y_test))
        path = Path(root) / f"covid_data{k}_cam_masks.npz"
        atomic_write(path, lambda f, b=buf.getvalue(): f.write(b))
        paths.append(path)
    return paths
