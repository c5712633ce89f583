"""Mask sources side by side: SAM's everything mode (``sam_auto``) and Felzenszwalb superpixels.

    python benchmarks/measure_mask_sources.py --n_seg 20 --n_lung 30

(a) HC18 + USGRA test splits (SAMUS layout, ``--seg_root``): per data set, the share of
    ground-truth anatomies matched by some region at IoU >= 0.5 (mask recall) and the mean
    best IoU, over the regions of the label map AND (sam_auto) over the masks that survive
    NMS before painting; ``--n_seg`` images per data set, drawn seeded across the split;
(b) COVID-BLUES lung frames: the middle frame of ``--n_lung`` videos spread evenly over the
    sorted list (:func:`utils.extract_frames.extract_video`), into ``--work_dir`` (a local
    folder: frames and overlays never go into the repository); per source the statistics of
    :mod:`pretraining.mask_stats` (fires, regions per frame, pixel shares, C5 survival at 112 px);
(c) seconds per image of each source on this machine (model loading excluded).

sam_auto's label maps are measured under both overlap rules of
:func:`SAM.auto_masks.paint_label_map` (the default, small on top, and large on top), painted
from the same NMS survivors.

Writes ``--out`` (default docs/results/mask_sources.json: settings, sample sizes, machine,
load, commit) and a montage of sam_auto on synthetic scans (``--synthetic_png``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.machine import machine  # noqa: E402
from pretraining.mask_stats import frame_stats, summarise  # noqa: E402
from SAM.auto_masks import AutoMaskParams, auto_label_map, min_region_pixels, paint_label_map  # noqa: E402
from SAM.samus_data import read_split  # noqa: E402
from SAM.segmenter import build_segmenter  # noqa: E402
from utils.extract_frames import extract_video, spread_evenly  # noqa: E402
from utils.io import atomic_write, atomic_write_png, read_image, read_label  # noqa: E402
from utils.plots import montage, overlay_labels  # noqa: E402
from utils.superpixel_masks import SuperpixelParams, superpixel_labels  # noqa: E402

MATCH_IOU = 0.5


def best_ious(gt: np.ndarray, regions: np.ndarray) -> float:
    """Best IoU of a binary ground truth (H, W) against any of (N, H, W) binary regions."""
    if regions.shape[0] == 0:
        return 0.0
    flat = regions.reshape(regions.shape[0], -1)
    g = gt.reshape(-1)
    inter = (flat & g).sum(1)
    union = (flat | g).sum(1)
    return float((inter / np.maximum(union, 1)).max())


def label_regions(label: np.ndarray) -> np.ndarray:
    ids = [i for i in np.unique(label) if i != 0]
    return np.stack([label == i for i in ids]) if ids else np.zeros((0,) + label.shape, bool)


def recall_summary(values: list[float]) -> dict:
    v = np.asarray(values)
    return {"anatomies": int(v.size), "recall_at_0.5": float((v >= MATCH_IOU).mean()) if v.size else None,
            "mean_best_iou": float(v.mean()) if v.size else None,
            "std_best_iou": float(v.std(ddof=1)) if v.size > 1 else None}


def both_sources(seg, img: np.ndarray, params: AutoMaskParams, sp: SuperpixelParams, secs: dict):
    """``img`` through SAM's everything mode and the superpixels, timing each into ``secs``;
    returns (sam_auto label map, its filter counts, its masks before painting, superpixel label map)."""
    t = time.perf_counter()
    lab, counts, masks = auto_label_map(seg, img, params, return_masks=True)
    secs["sam_auto"].append(time.perf_counter() - t)
    t = time.perf_counter()
    spl = superpixel_labels(img, sp)
    secs["superpixel"].append(time.perf_counter() - t)
    return lab, counts, masks, spl


def measure_seg(seg, root: Path, n: int, params: AutoMaskParams, sp: SuperpixelParams, seed: int) -> dict:
    """(a): recall / mean best IoU per data set of the test split, plus seconds per image."""
    lines = read_split(root, "test")
    images: dict[tuple[str, str], list[int]] = {}
    for line in lines:
        images.setdefault((line.dataset, line.name), []).append(line.class_id)
    out, secs = {}, {"sam_auto": [], "superpixel": []}
    rng = np.random.default_rng(seed)
    for dataset in sorted({d for d, _ in images}):
        keys = [k for k in images if k[0] == dataset]
        pick = sorted(rng.choice(len(keys), min(n, len(keys)), replace=False).tolist())
        vals = {"sam_auto_label": [], "sam_auto_label_large_on_top": [], "sam_auto_masks": [],
                "superpixel_label": []}
        regions = {"sam_auto": [], "superpixel": []}
        for i in pick:
            d, name = keys[i]
            img = read_image(root / d / "img" / f"{name}.png", "rgb")
            gt = read_label(root / d / "label" / f"{name}.png")
            lab, counts, masks, spl = both_sources(seg, img, params, sp, secs)
            regions["sam_auto"].append(int(lab.max()))
            regions["superpixel"].append(int(spl.max()))
            other = other_order(masks, params, img.shape[:2])
            lab_r, sp_r, other_r = label_regions(lab), label_regions(spl), label_regions(other)
            for k in sorted(set(images[keys[i]])):
                g = gt == k
                if not g.any():
                    continue
                vals["sam_auto_label"].append(best_ious(g, lab_r))
                vals["sam_auto_label_large_on_top"].append(best_ious(g, other_r))
                vals["sam_auto_masks"].append(best_ious(g, masks))
                vals["superpixel_label"].append(best_ious(g, sp_r))
            print(f"  {d}/{name}: sam_auto {counts['regions']} regions, best IoU "
                  f"{vals['sam_auto_label'][-1]:.2f} (masks {vals['sam_auto_masks'][-1]:.2f}), "
                  f"superpixel {vals['superpixel_label'][-1]:.2f}; {secs['sam_auto'][-1]:.1f} s", flush=True)
        out[dataset] = {"images": len(pick), **{k: recall_summary(v) for k, v in vals.items()},
                        "regions_per_image": {k: float(np.mean(v)) for k, v in regions.items()}}
    return out, secs


def other_order(masks: np.ndarray, params: AutoMaskParams, shape: tuple[int, int]) -> np.ndarray:
    """The label map of the same NMS survivors under the other overlap rule (large on top)."""
    return paint_label_map(masks, min_region_pixels(params.min_area, *shape), params.max_regions,
                           small_on_top=not params.small_on_top)


def lung_frames(videos: Path, n: int, work: Path) -> list[Path]:
    """The middle frame of ``n`` videos spread evenly over the sorted list -> frame paths."""
    all_videos = sorted(p for p in videos.iterdir() if p.suffix.lower() == ".mp4")
    chosen = spread_evenly(all_videos, n)
    img_dir = work / "frames" / "COVID-BLUES" / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for video in chosen:
        extract_video(video, img_dir, num=1)
    return sorted(img_dir.glob("*.png"))


def measure_lung(seg, frames: list[Path], params: AutoMaskParams, sp: SuperpixelParams, work: Path) -> tuple[dict, dict]:
    """(b): mask statistics per source on the lung frames; overlays into work/overlays."""
    stats = {"sam_auto": [], "sam_auto_large_on_top": [], "superpixel": []}
    secs = {"sam_auto": [], "superpixel": []}
    tiles = {k: [] for k in stats}
    for f in frames:
        img = read_image(f, "rgb")
        lab, counts, masks, spl = both_sources(seg, img, params, sp, secs)
        other = other_order(masks, params, img.shape[:2])
        for source, m in (("sam_auto", lab), ("sam_auto_large_on_top", other), ("superpixel", spl)):
            stats[source].append(frame_stats(m, 112))
            if len(tiles[source]) < 16:
                tiles[source].append(overlay_labels(img, m, outline=True))
        print(f"  {f.name}: sam_auto {counts} ; superpixel {int(spl.max())} regions; "
              f"{secs['sam_auto'][-1]:.1f} s", flush=True)
    for source, t in tiles.items():
        if t:
            atomic_write_png(cv2.cvtColor(montage(t), cv2.COLOR_RGB2BGR), work / "overlays" / f"lung_{source}.png")
    return {s: summarise(v) for s, v in stats.items()}, secs


def synthetic_montage(seg, params: AutoMaskParams, png: Path, n: int = 4) -> dict:
    from utils.synthetic_scan import make_scan

    tiles, regions = [], []
    for seed in range(n):
        image, _ = make_scan(seed, size=(192, 256), probe="convex" if seed % 2 == 0 else "linear", scan_class=seed % 3)
        rgb = np.repeat(image[..., None], 3, axis=2)
        lab, _ = auto_label_map(seg, rgb, params)
        regions.append(int(lab.max()))
        tiles += [rgb, overlay_labels(rgb, lab, outline=True)]
    atomic_write_png(cv2.cvtColor(montage(tiles, tile=192, cols=4), cv2.COLOR_RGB2BGR), png)
    return {"png": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png), "regions": regions}


def per_s(secs: list[float]) -> dict:
    return {"images": len(secs), "seconds_per_image": float(np.mean(secs)) if secs else None,
            "images_per_s": len(secs) / sum(secs) if secs else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seg_root", default=str(REPO.parent / "shared" / "data" / "seg"))
    p.add_argument("--videos", default=str(REPO.parent / "shared" / "data" / "covid_blues" / "lus_videos"))
    p.add_argument("--n_seg", type=int, default=20, help="test images per segmentation data set")
    p.add_argument("--n_lung", type=int, default=30, help="lung videos (one middle frame each)")
    p.add_argument("--work_dir", default="/tmp/measure_mask_sources", help="frames + overlays (local)")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "mask_sources.json"))
    p.add_argument("--synthetic_png", default=str(REPO / "figs" / "sam_auto_synthetic.png"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    params, sp = AutoMaskParams().check(), SuperpixelParams().check()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    res = {"what": "mask sources: SAM everything mode (box-grid prompts, LiteMedSAM) vs Felzenszwalb superpixels",
           "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "settings": {"sam_auto": {**params.__dict__, "backbone": "lite (LiteMedSAM, bundled weights)"},
                        "superpixel": sp.__dict__, "match_iou": MATCH_IOU, "view": 112, "seed": a.seed,
                        "n_seg_per_dataset": a.n_seg, "n_lung_videos": a.n_lung}}

    def save():
        res["machine"]["load_avg_1min_now"] = os.getloadavg()[0]
        atomic_write(Path(a.out), lambda f: f.write(json.dumps(res, indent=1).encode()))

    seg = build_segmenter("lite", 256).eval()
    res["synthetic"] = synthetic_montage(seg, params, Path(a.synthetic_png))
    save()
    print("(a) segmentation test splits", flush=True)
    res["seg_recall"], seg_secs = measure_seg(seg, Path(a.seg_root), a.n_seg, params, sp, a.seed)
    save()
    print("(b) lung frames", flush=True)
    frames = lung_frames(Path(a.videos), a.n_lung, work)
    res["lung_frames"], lung_secs = measure_lung(seg, frames, params, sp, work)
    res["lung_frames"]["frames"] = len(frames)
    res["lung_frames"]["centroid_spread"] = ("not measured: one frame per video here, and neither "
                                             "source names its regions (ids are not anatomies)")
    res["speed"] = {s: per_s(seg_secs[s] + lung_secs[s]) for s in ("sam_auto", "superpixel")}
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps({k: res[k] for k in ("seg_recall", "speed")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
