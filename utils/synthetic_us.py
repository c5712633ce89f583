"""Synthetic ultrasound data sets, written in the layouts the pipeline reads, so that every ACLUS
stage runs end to end without the real (licence-restricted) data:

* pre-training folders (``write_pretrain_layout``), SAMUS segmentation pairs
  (``write_samus_layout``, ``write_lung_layout``), USCL POCUS 5-fold pickles or folders
  (``write_pocus_folds``);
* ``python -m utils.synthetic_us --out dataset --layouts pretrain,samus,pocus`` writes them.

Every image is a scan of :mod:`utils.synthetic_scan` (the scan model: anatomy ids, classes,
styles) with its exact label map.
"""
from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.flags import AT_LEAST_1, SEED, Range, check_flag_ranges
from utils.io import DataError, atomic_write, atomic_write_png, ensure_writable_dir
from utils.synthetic_scan import ANATOMY_IDS, CLASS_NAMES, PROBES, STYLES, ScanStyle, derive_seed, make_scan

# SAMUS layout: binary pleural-line dataset and a 3-class anatomy dataset
SAMUS_DATASETS: dict[str, int] = {"SynLung-Pleura": 2, "SynLung-Anatomy": 4}  # classes incl. background
SAMUS_ANATOMY_CLASSES: dict[int, int] = {  # anatomy id -> class id in SynLung-Anatomy
    ANATOMY_IDS["rib"]: 1,
    ANATOMY_IDS["pleura"]: 2,
    ANATOMY_IDS["consolidation"]: 3,
}


# --------------------------------------------------------------------------- #
# dataset plans (pure)
# --------------------------------------------------------------------------- #
def pocus_video_plan(videos_per_class_per_fold: int = 2, seed: int = 0, n_folds: int = 5) -> list[dict]:
    """The synthetic POCUS videos, in writing order.

    Returns:
        One dict per video: ``video_id`` (0..), ``fold`` (0..n_folds-1), ``scan_class``,
        ``probe`` (every 5th video is linear, the rest convex, as in POCUS) and ``seed``.
    """
    plan = []
    for fold in range(n_folds):
        for cls in range(len(CLASS_NAMES)):
            for v in range(videos_per_class_per_fold):
                vid = len(plan)
                plan.append({"video_id": vid, "fold": fold, "scan_class": cls,
                             "probe": "linear" if vid % 5 == 4 else "convex",
                             "seed": derive_seed(seed, 3, fold, cls, v)})
    return plan


def pocus_fold_video_ids(videos_per_class_per_fold: int = 2, frames_per_video: int = 4,
                         n_folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold ``(train_video_ids, test_video_ids)``: int64 arrays aligned with the rows of
    ``X_train`` / ``X_test`` in the pickles of :func:`write_pocus_folds` (any seed)."""
    plan = pocus_video_plan(videos_per_class_per_fold, 0, n_folds)
    per_fold = [np.repeat([v["video_id"] for v in plan if v["fold"] == k], frames_per_video).astype(np.int64)
                for k in range(n_folds)]
    return [(np.concatenate([per_fold[j] for j in range(n_folds) if j != k]), per_fold[k])
            for k in range(n_folds)]


def make_pocus_folds(videos_per_class_per_fold: int = 2, frames_per_video: int = 4, size: int = 64,
                     seed: int = 0, n_folds: int = 5, finding_strength: float = 1.0,
                     return_findings: bool = False, local_findings: bool = False) -> list[tuple]:
    """The USCL 5-fold tuples in memory (``finding_strength``, ``local_findings``: see :func:`make_scan`).

    Returns:
        Per fold ``(X_train, y_train, X_test, y_test)``: X is Nx3xHxW uint8 (gray replicated),
        y is N int64 with {covid19: 0, pneumonia: 1, regular: 2}. Fold k's test set is its
        own videos, its train set the videos of all other folds. With ``return_findings``
        a fifth item describes the TEST images, row-aligned with ``X_test``:
        ``{"label": NxHxW uint8 anatomy ids, "b_lines": NxHxW bool, "a_lines": NxHxW bool}``
        (see :func:`make_scan`); the four arrays are the same with or without it.
    """
    plan = pocus_video_plan(videos_per_class_per_fold, seed, n_folds)
    xs: list[list[np.ndarray]] = [[] for _ in range(n_folds)]
    ys: list[list[int]] = [[] for _ in range(n_folds)]
    found: list[list[tuple]] = [[] for _ in range(n_folds)]
    for v in plan:
        for f in range(frames_per_video):
            img, lab, *extra = make_scan(v["seed"], size, v["probe"], v["scan_class"], frame=f,
                                         finding_strength=finding_strength, return_findings=return_findings,
                                         local_findings=local_findings)
            xs[v["fold"]].append(np.repeat(img[None], 3, axis=0))   # 3xHxW
            ys[v["fold"]].append(v["scan_class"])
            if return_findings:
                found[v["fold"]].append((lab.astype(np.uint8), extra[0]["b_lines"], extra[0]["a_lines"]))
    X = [np.stack(x).astype(np.uint8) for x in xs]
    Y = [np.asarray(y, np.int64) for y in ys]
    folds = []
    for k in range(n_folds):
        others = [j for j in range(n_folds) if j != k]
        fold = (np.concatenate([X[j] for j in others]), np.concatenate([Y[j] for j in others]), X[k], Y[k])
        if return_findings:
            fold += ({name: np.stack([t[i] for t in found[k]]) for i, name in
                      enumerate(("label", "b_lines", "a_lines"))},)
        folds.append(fold)
    return folds


def split_names(names: Sequence[str], seed: int = 0, fractions=(0.7, 0.1)) -> dict[str, list[str]]:
    """Sorted names shuffled with ``random.Random(seed)`` and cut train/val/test (70/10/20)."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}


def samus_labels(label: np.ndarray) -> dict[str, np.ndarray]:
    """Anatomy label map (HxW int64) -> the uint8 label images of the two SAMUS datasets.

    ``SynLung-Pleura``: pleural line = 255, rest 0. ``SynLung-Anatomy``: 1 rib, 2 pleura,
    3 consolidation, 0 everything else.
    """
    anat = np.zeros(label.shape, np.uint8)
    for aid, cid in SAMUS_ANATOMY_CLASSES.items():
        anat[label == aid] = cid
    return {"SynLung-Pleura": np.where(label == ANATOMY_IDS["pleura"], 255, 0).astype(np.uint8),
            "SynLung-Anatomy": anat}


# --------------------------------------------------------------------------- #
# writers (I/O)
# --------------------------------------------------------------------------- #
def write_pretrain_layout(root, n_images: int = 64, size: int | tuple[int, int] = 128, seed: int = 0,
                          subsets: Sequence[str] = ("SynConvex", "SynLinear")) -> list[Path]:
    """Write ``root/train/<Sub>/{img,label}/syn_NNNNN.png`` (``n_images`` per subset).

    A subset whose name contains "linear" (any case) uses the linear probe, others the
    convex one. Classes cycle covid19, pneumonia, regular. Labels are uint8 anatomy maps.

    Returns:
        The image paths written, subset by subset.
    """
    root = Path(root)
    written = []
    for si, sub in enumerate(subsets):
        probe = "linear" if "linear" in sub.lower() else "convex"
        for i in range(n_images):
            img, lab = make_scan(derive_seed(seed, 1, si, i), size, probe, i % 3)
            name = f"syn_{i:05d}"
            ip = root / "train" / sub / "img" / f"{name}.png"
            atomic_write_png(img, ip)
            atomic_write_png(lab.astype(np.uint8), root / "train" / sub / "label" / f"{name}.png")
            written.append(ip)
    return written


def write_samus_layout(root, n_images: int = 40, size: int | tuple[int, int] = 128, seed: int = 0) -> Path:
    """Write the SAMUS segmentation layout (METHOD.md §1) with two datasets.

    ``root/<Dataset>/{img,label}/syn_NNNNN.png`` for ``SynLung-Pleura`` (binary 0/255 pleural
    line) and ``SynLung-Anatomy`` (index map 1 rib, 2 pleura, 3 consolidation), each with
    ``n_images`` different scans (probes alternate, classes cycle);
    ``root/MainPatient/{train,val,test}.txt`` with one ``<class ID>/<Dataset>/<name>`` line
    per foreground class present, split 70/10/20 by image; ``root/MainPatient/class.json``.

    Returns:
        ``root``.
    """
    root = Path(root)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for di, ds in enumerate(SAMUS_DATASETS):
        present: dict[str, list[int]] = {}
        for i in range(n_images):
            img, lab = make_scan(derive_seed(seed, 2, di, i), size, PROBES[i % 2], i % 3)
            out = samus_labels(lab)[ds]
            name = f"syn_{i:05d}"
            atomic_write_png(img, root / ds / "img" / f"{name}.png")
            atomic_write_png(out, root / ds / "label" / f"{name}.png")
            # class IDs present: the binary 255 foreground is class 1
            present[name] = [1 if c == 255 else int(c) for c in np.unique(out) if c != 0]
        for split, names in split_names(list(present), seed).items():
            for name in names:
                lines[split] += [f"{c}/{ds}/{name}" for c in present[name]]
    _write_main_patient(root, lines, SAMUS_DATASETS)
    return root


def _write_main_patient(root: Path, lines: dict[str, list[str]], classes: dict[str, int]) -> None:
    """``root/MainPatient/{split}.txt`` (one line each) and ``class.json``, atomically."""
    for split, ls in lines.items():
        text = "".join(l + "\n" for l in ls).encode()
        atomic_write(root / "MainPatient" / f"{split}.txt", lambda f, t=text: f.write(t))
    cls_json = (json.dumps(classes, indent=4) + "\n").encode()
    atomic_write(root / "MainPatient" / "class.json", lambda f: f.write(cls_json))


LUNG_DATASET = "SynLung-Lung"  # every anatomy id of ANATOMY_IDS but background is a class
#: the A-SAM prompt keys of the lung anatomies, in anatomy-id order (soft tissue .. rib shadow)
LUNG_PROMPTS: tuple[str, ...] = tuple(f"{LUNG_DATASET}/{i}" for i in range(1, len(ANATOMY_IDS)))


def write_lung_layout(root, n_images: int = 200, size: int = 256, seed: int = 0,
                      style: ScanStyle | str = "realistic", seg_root=None) -> Path:
    """SAMUS layout of one data set, ``SynLung-Lung``, whose label maps are the anatomy ids
    themselves (1 soft tissue, 2 rib, 3 pleura, 4 lung, 5 consolidation, 6 rib shadow; 0 outside
    the fan): one A-SAM prompt per lung anatomy. Three scans in four are convex (as the
    COVID-BLUES and most POCUS videos), classes cycle; split 70/10/20 by image.

    ``seg_root``: another SAMUS root (e.g. HC18 + USGRA) whose data sets are linked into
    ``root`` (symbolic links, nothing copied) and whose split lines and class.json entries are
    merged in, so one stage 2 trains on both.
    Returns ``root``.
    """
    root = Path(root)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    classes: dict[str, int] = {}
    if seg_root is not None:
        seg_root = Path(seg_root).resolve()
        classes.update(json.loads((seg_root / "MainPatient" / "class.json").read_text()))
        for ds in classes:
            link = root / ds
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(seg_root / ds, target_is_directory=True)
        for split in lines:
            f = seg_root / "MainPatient" / f"{split}.txt"
            if f.is_file():
                lines[split] += [l.strip() for l in f.read_text().splitlines() if l.strip()]
    present: dict[str, list[int]] = {}
    for i in range(n_images):
        probe = "linear" if i % 4 == 3 else "convex"
        img, lab = make_scan(derive_seed(seed, 4, i), size, probe, i % 3, style=style)
        name = f"lung_{i:05d}"
        atomic_write_png(img, root / LUNG_DATASET / "img" / f"{name}.png")
        atomic_write_png(lab.astype(np.uint8), root / LUNG_DATASET / "label" / f"{name}.png")
        present[name] = [int(c) for c in np.unique(lab) if c != ANATOMY_IDS["background"]]
    for split, names in split_names(list(present), seed).items():
        lines[split] += [f"{c}/{LUNG_DATASET}/{n}" for n in names for c in present[n]]
    classes[LUNG_DATASET] = len(ANATOMY_IDS)
    _write_main_patient(root, lines, classes)
    return root


def write_pocus_folds(root, videos_per_class_per_fold: int = 2, frames_per_video: int = 4,
                      size: int = 64, seed: int = 0, finding_strength: float = 1.0,
                      local_findings: bool = False) -> list[Path]:
    """Write ``root/covid_data{1..5}.pkl`` in the USCL format (see :func:`make_pocus_folds`).

    Pickled with protocol 4 (as the USCL files) through the atomic writer of utils.io;
    readable with :func:`utils.io.safe_pickle_load`. Row-aligned video ids:
    :func:`pocus_fold_video_ids`.
    """
    root = Path(root)
    paths = []
    folds = make_pocus_folds(videos_per_class_per_fold, frames_per_video, size, seed,
                             finding_strength=finding_strength, local_findings=local_findings)
    for k, fold in enumerate(folds):
        p = root / f"covid_data{k + 1}.pkl"
        atomic_write(p, lambda f, o=fold: pickle.dump(o, f, protocol=4))
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m utils.synthetic_us",
        description="Write synthetic lung ultrasound data sets in the layouts the ACLUS stages read.")
    ap.add_argument("--out", default="dataset",
                    help="output folder: pretrain -> OUT/train/<Sub>/{img,label}, samus -> OUT/samus, "
                         "pocus -> OUT/pocus, lung -> OUT/lung_seg (default: dataset)")
    ap.add_argument("--layouts", default="pretrain,samus,pocus",
                    help="comma-separated subset of pretrain,samus,pocus,lung (default: the first three; "
                         "lung: one SAMUS class per lung anatomy, write_lung_layout)")
    ap.add_argument("--style", default="realistic", choices=sorted(STYLES),
                    help="look of the lung layout's scans (default: realistic)")
    ap.add_argument("--seg_root", default=None,
                    help="lung layout: link this SAMUS root's data sets in beside it (e.g. HC18 + USGRA)")
    ap.add_argument("--n", type=int, default=64,
                    help="images per pretrain subset, per SAMUS dataset and of the lung layout (default: 64)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; same seed -> same files (default: 0)")
    ap.add_argument("--pocus-videos", type=int, default=2,
                    help="POCUS videos per class per fold (default: 2 -> 30 videos)")
    ap.add_argument("--pocus-frames", type=int, default=4, help="frames per POCUS video (default: 4)")
    args = ap.parse_args(argv)

    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    unknown = set(layouts) - {"pretrain", "samus", "pocus", "lung"}
    if unknown:
        ap.error(f"unknown layout(s) {sorted(unknown)}; choose from pretrain, samus, pocus, lung")
    if args.seg_root and not (Path(args.seg_root) / "MainPatient" / "class.json").is_file():
        ap.error(f"--seg_root {args.seg_root}: no MainPatient/class.json there")
    out = Path(args.out)
    try:
        check_flag_ranges(args, {"--n": AT_LEAST_1, "--size": Range(16), "--seed": SEED,
                                 "--pocus-videos": AT_LEAST_1, "--pocus-frames": AT_LEAST_1})
        ensure_writable_dir(out, "--out")
    except DataError as e:
        print(f"synthetic_us: error: {e}", file=sys.stderr)
        return 2
    if "pretrain" in layouts:
        paths = write_pretrain_layout(out, args.n, args.size, args.seed)
        print(f"pretrain: {len(paths)} image/label pairs under {out / 'train'}")
    if "samus" in layouts:
        root = write_samus_layout(out / "samus", args.n, args.size, args.seed)
        print(f"samus: {len(SAMUS_DATASETS)} datasets x {args.n} pairs, splits in {root / 'MainPatient'}")
    if "pocus" in layouts:
        paths = write_pocus_folds(out / "pocus", args.pocus_videos, args.pocus_frames, args.size, args.seed)
        n_img = 5 * 3 * args.pocus_videos * args.pocus_frames
        print(f"pocus: {len(paths)} fold pickles ({n_img} images) in {out / 'pocus'}")
    if "lung" in layouts:
        root = write_lung_layout(out / "lung_seg", args.n, args.size, args.seed, args.style, args.seg_root)
        print(f"lung: {args.n} {args.style} scans with one class per anatomy in {root / LUNG_DATASET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
