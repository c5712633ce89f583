#!/usr/bin/env python
"""Felzenszwalb superpixels as DetCon's mask source (no segmentation model, no labels).

    python utils/superpixel_masks.py --data_dir dataset/train
    python utils/superpixel_masks.py --data_dir frames --out_dir masks_superpixel --scale 500

reads ``<data_dir>/<Sub>/img/**/<name>.<png|jpg|...>`` and writes
``<out_dir>/<Sub>/label/**/<name>.png`` (out_dir defaults to data_dir): uint8 index maps at
each image's own size, every pixel in one segment, ids 1..K with K <= ``--max_segments``
(<= 255): the layout of ``utils/mask_layout.py`` (:func:`~utils.mask_layout.label_jobs`), which
``SAM/infer_masks.py`` writes too and ``utils/generate_masks_pkls.py`` reads.

The segmentation (:func:`superpixel_labels`) is a pure function: the image is converted to
grey and shrunk so that its longer side is ``--work_size`` (speckle makes full-resolution
Felzenszwalb both slow and over-segmented), segmented with
``skimage.segmentation.felzenszwalb`` (``scale``, ``sigma``, ``min_size`` = ``min_area``
× pixels of the working image), segments still smaller than ``min_area`` of the image or
beyond ``max_segments`` are merged into the neighbour they share the longest border with
(smallest first), and the map is enlarged back (nearest neighbour) and renumbered 1..K.

Resumable: a label that exists is complete (writes are atomic) and is skipped. A bad image
is reported by name (stderr and ``<out_dir>/bad_images_superpixel.txt``) and skipped.
The parameters go to ``<out_dir>/superpixel_params.json``.
"""
from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.flags import AT_LEAST_0, check_flag_ranges  # noqa: E402
from utils.io import DataError, atomic_write, atomic_write_png, ensure_writable_dir, read_image  # noqa: E402
from utils.mask_layout import ensure_label_dirs, label_jobs  # noqa: E402

MAX_IDS = 255  # uint8 label PNGs


@dataclass(frozen=True)
class SuperpixelParams:
    scale: float = 30.0         # Felzenszwalb (image in [0, 1]): higher = larger segments
    sigma: float = 1.0          # Gaussian pre-smoothing (pixels of the working image)
    min_area: float = 0.004     # smallest segment, as a fraction of the image
    max_segments: int = 32      # K cap (<= 255)
    work_size: int = 160        # longer side of the working image (0 = full size)

    def check(self) -> "SuperpixelParams":
        if not 1 <= self.max_segments <= MAX_IDS:
            raise ValueError(f"max_segments must be in 1..{MAX_IDS}, got {self.max_segments}")
        if not 0 <= self.min_area < 1:
            raise ValueError(f"min_area must be a fraction in [0, 1), got {self.min_area}")
        if self.scale <= 0 or self.sigma < 0 or self.work_size < 0:
            raise ValueError("scale must be > 0, sigma and work_size >= 0")
        return self


# --------------------------------------------------------------------------- #
# pure functions
# --------------------------------------------------------------------------- #
def relabel_sequential(seg: np.ndarray, start: int = 1) -> np.ndarray:
    """Ids renumbered ``start, start+1, ...`` in order of their first raster appearance."""
    flat = seg.ravel()
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return (rank[inverse] + start).reshape(seg.shape)


def boundary_counts(seg: np.ndarray) -> dict[tuple[int, int], int]:
    """``{(a, b): length}`` with a < b: pixel edges (4-neighbourhood) between ids a and b."""
    pairs = []
    for a, b in ((seg[:, :-1], seg[:, 1:]), (seg[:-1, :], seg[1:, :])):
        diff = a != b
        lo, hi = np.minimum(a[diff], b[diff]), np.maximum(a[diff], b[diff])
        pairs.append(np.stack([lo, hi], axis=1))
    allp = np.concatenate(pairs)
    if not len(allp):
        return {}
    uniq, counts = np.unique(allp, axis=0, return_counts=True)
    return {(int(a), int(b)): int(c) for (a, b), c in zip(uniq, counts)}


def merge_segments(seg: np.ndarray, min_pixels: int, max_segments: int) -> np.ndarray:
    """Merge segments, smallest first, into the neighbour with the longest shared border,
    until every segment has >= ``min_pixels`` pixels and there are <= ``max_segments``.

    Ties go to the larger neighbour. A segment with no neighbour (the whole image) stays.
    Returns a map with ids renumbered 1..K.
    """
    seg = relabel_sequential(seg, start=0)
    n = int(seg.max()) + 1
    area = np.bincount(seg.ravel(), minlength=n).astype(np.int64)
    nbrs: list[dict[int, int]] = [dict() for _ in range(n)]
    for (a, b), c in boundary_counts(seg).items():
        nbrs[a][b] = c
        nbrs[b][a] = c
    parent = np.arange(n)
    live = n
    heap = [(int(area[i]), i) for i in range(n)]
    heapq.heapify(heap)
    while heap and live > 1:
        a_size, i = heapq.heappop(heap)
        if parent[i] != i or a_size != area[i]:
            continue  # merged away or stale entry
        if a_size >= min_pixels and live <= max_segments:
            break
        if not nbrs[i]:
            continue
        j = max(nbrs[i], key=lambda k: (nbrs[i][k], area[k], -k))
        # merge i into j
        parent[i] = j
        area[j] += area[i]
        area[i] = 0
        for k, c in nbrs[i].items():
            if k == j:
                continue
            nbrs[j][k] = nbrs[j].get(k, 0) + c
            nbrs[k][j] = nbrs[k].get(j, 0) + c
            del nbrs[k][i]
        del nbrs[j][i]
        nbrs[i] = {}
        live -= 1
        heapq.heappush(heap, (int(area[j]), j))
    # resolve merge chains to their roots
    root = parent.copy()
    for _ in range(n):
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return relabel_sequential(root[seg], start=1)


def to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[..., 0]
    raise ValueError(f"expected an H x W or H x W x 3 image, got shape {image.shape}")


def superpixel_labels(image: np.ndarray, params: SuperpixelParams = SuperpixelParams()) -> np.ndarray:
    """Felzenszwalb superpixels of one image: H x W uint8, every pixel in 1..K, K <= max_segments."""
    from skimage.segmentation import felzenszwalb

    params.check()
    gray = to_gray(np.asarray(image))
    if gray.size == 0:
        raise ValueError("empty image")
    h, w = gray.shape
    f = min(1.0, params.work_size / max(h, w)) if params.work_size else 1.0
    small = gray if f >= 1.0 else cv2.resize(gray, (max(1, round(w * f)), max(1, round(h * f))),
                                             interpolation=cv2.INTER_AREA)
    min_pixels = int(round(params.min_area * small.size))
    seg = felzenszwalb(small.astype(np.float64) / 255.0, scale=params.scale, sigma=params.sigma,
                       min_size=max(1, min_pixels), channel_axis=None)
    seg = merge_segments(seg, min_pixels, params.max_segments)
    if small.shape != gray.shape:
        seg = cv2.resize(seg.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
        seg = relabel_sequential(seg, start=1)  # a sliver may vanish when enlarged
    return seg.astype(np.uint8)


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def run(data_dir: Path, out_dir: Path, params: SuperpixelParams, limit: int = 0) -> dict:
    """Write the missing labels; returns counts and the bad images (``path: reason``)."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: folder not found; expected <Sub>/img/ sub-folders")
    jobs = label_jobs(data_dir, out_dir)
    if not jobs:
        raise DataError(f"{data_dir}: no images found under <Sub>/img/")
    if limit:
        jobs = jobs[:limit]
    ensure_label_dirs(jobs)
    atomic_write(out_dir / "superpixel_params.json",
                 lambda f: f.write(json.dumps(asdict(params), indent=2).encode()))
    written, kept, bad, segments = 0, 0, [], []
    for img_path, lab_path in jobs:
        if lab_path.is_file():
            kept += 1
            continue
        try:
            seg = superpixel_labels(read_image(img_path, "rgb"), params)
        except (DataError, ValueError) as e:
            msg = str(e) if str(img_path) in str(e) else f"{img_path}: {e}"
            print(f"skipping bad image: {msg}", file=sys.stderr)
            bad.append(msg)
            continue
        atomic_write_png(seg, lab_path)
        written += 1
        segments.append(int(seg.max()))
    if bad:
        atomic_write(out_dir / "bad_images_superpixel.txt", lambda f: f.write(("\n".join(bad) + "\n").encode()))
    return {"images": len(jobs), "written": written, "kept": kept, "bad": bad,
            "segments_mean": float(np.mean(segments)) if segments else None}


def main(argv=None) -> int:
    d = SuperpixelParams()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder with <Sub>/img/ sub-folders")
    p.add_argument("--out_dir", default=None, help="where <Sub>/label/ goes (default: --data_dir)")
    p.add_argument("--scale", type=float, default=d.scale, help="Felzenszwalb scale (larger = bigger segments)")
    p.add_argument("--sigma", type=float, default=d.sigma, help="Felzenszwalb Gaussian pre-smoothing")
    p.add_argument("--min_area", type=float, default=d.min_area, help="smallest segment, fraction of the image")
    p.add_argument("--max_segments", type=int, default=d.max_segments, help=f"K cap (<= {MAX_IDS})")
    p.add_argument("--work_size", type=int, default=d.work_size, help="longer side segmented (0 = full size)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (smoke runs)")
    a = p.parse_args(argv)
    try:
        check_flag_ranges(a, {"--limit": AT_LEAST_0})
        params = SuperpixelParams(a.scale, a.sigma, a.min_area, a.max_segments, a.work_size).check()
    except ValueError as e:  # DataError of a flag range, or the parameters' own check
        print(f"superpixel_masks.py: error: {e}", file=sys.stderr)
        return 2
    data_dir = Path(a.data_dir)
    try:
        if a.out_dir or data_dir.is_dir():  # a missing --data_dir is reported by run(), not created
            ensure_writable_dir(Path(a.out_dir) if a.out_dir else data_dir, "--out_dir")
        r = run(data_dir, Path(a.out_dir) if a.out_dir else data_dir, params, a.limit)
    except DataError as e:
        print(f"superpixel_masks.py: error: {e}", file=sys.stderr)
        return 2
    seg = f", {r['segments_mean']:.1f} segments per image" if r["segments_mean"] is not None else ""
    print(f"{r['images']} images: {r['written']} labels written, {r['kept']} already done, "
          f"{len(r['bad'])} bad skipped{seg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
