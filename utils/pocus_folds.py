"""Build the POCUS 5-fold set (USCL format) from a covid19_ultrasound checkout.

Input: a checkout of the public covid19_ultrasound repository, i.e. a folder holding
``data/pocus_videos/{convex,linear}/…``, ``data/pocus_images/{convex,linear}/…`` and
``data/dataset_metadata.csv`` (the checkout root or its ``data/`` folder may be given).

Output in ``--out``:

* ``covid_data1.pkl … covid_data5.pkl`` — the USCL format: each a pickled tuple
  ``(X_train, y_train, X_test, y_test)``; ``X`` is ``N x 3 x S x S`` uint8 (RGB), ``y`` is
  ``N`` int64 with ``{covid19: 0, pneumonia: 1, regular: 2}``. Fold ``k`` is the test set
  of file ``k``; its training set is the other four folds.
* ``images/fold<k>/<class>/<source stem>__f<frame>.png`` — the same frames as plain PNGs.
* ``manifest.csv`` — one row per frame: PNG path, source file, frame index, class, label,
  fold, probe, site (the metadata's ``Source ID``), licence columns of the metadata. Row
  order = the order inside the pickles (fold by fold; a fold's training set is the other
  folds' rows in manifest order), so an evaluation can recover which video a training
  frame came from.
* ``build_report.json`` — counts per class and fold, sources per site and class, the share
  of each fold's test frames that come from a site which also supplies training frames,
  the accuracy of guessing each frame's class from its site alone, skipped files and
  unreadable videos.

Folds are split by source file: all frames of one video land in one fold (frames of one
video are near-duplicates; splitting them across folds leaks the test set into training).
Sources are stratified by class and the split is deterministic given ``--seed``.

The pure parts (class from a file name, frame indices, fold assignment) are I/O-free
functions so they can be unit-tested.

Usage::

    python -m utils.pocus_folds --src ../shared/data/pocus --out dataset/pocus_5fold
    python -m utils.pocus_folds --src <checkout> --out <dir> --frames_per_video 16 --size 224 --probe convex --seed 0
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath

import cv2
import numpy as np

from utils.extract_frames import even_frame_indices
from utils.flags import AT_LEAST_1, SEED, check_flag_ranges, exit_code
from utils.io import DataError, atomic_pickle_dump, atomic_write, atomic_write_png, ensure_writable_dir, read_image

#: label ids of the USCL pickles
CLASSES = ("covid19", "pneumonia", "regular")
CLASS_TO_LABEL = {c: i for i, c in enumerate(CLASSES)}
NUM_FOLDS = 5
VIDEO_EXTS = {".mp4", ".mov", ".avi", ".gif", ".mpeg", ".mpg", ".m4v", ".ogv", ".webm"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
PROBES = ("convex", "linear")


# --------------------------------------------------------------------------- #
# pure functions (no I/O)
# --------------------------------------------------------------------------- #
def class_from_filename(path: str | PurePath) -> str:
    """Diagnostic class of a covid19_ultrasound file from its name (upstream convention).

    ``Cov…`` -> ``covid19``, ``Pneu…``/``pneu…`` -> ``pneumonia`` (bacterial), ``Reg…`` ->
    ``regular``, ``Vir…`` -> ``viral``; anything inside a ``label_uncertain`` folder ->
    ``uncertain``; any other name -> ``other``. Only the first three are used for POCUS.
    """
    p = PurePath(path)
    if "label_uncertain" in p.parts[:-1]:
        return "uncertain"
    name = p.name.lower()
    for prefix, cls in (("cov", "covid19"), ("pneu", "pneumonia"), ("reg", "regular"), ("vir", "viral")):
        if name.startswith(prefix):
            return cls
    return "other"


def assign_folds(sources: dict[str, tuple[str, int]], num_folds: int = NUM_FOLDS,
                 seed: int = 0) -> dict[str, int]:
    """Assign whole sources (videos or still images) to folds, stratified by class.

    Args:
        sources: ``{source id: (class, number of frames it contributes)}``.
        num_folds: number of folds.
        seed: the only source of randomness; same input + seed -> same folds.

    Returns:
        ``{source id: fold}`` with folds numbered ``1..num_folds``.

    Per class the sources are shuffled (seeded), then placed largest first into the fold
    that so far holds the fewest frames of that class (ties: fewest sources, then lowest
    fold). This keeps both the number of videos and the number of frames per class close
    across folds, which a plain round-robin does not when video lengths differ.
    """
    if num_folds < 1:
        raise ValueError("num_folds must be >= 1")
    rng = random.Random(seed)
    by_class: dict[str, list[str]] = {}
    for sid in sorted(sources):  # sorted: independent of dict order
        by_class.setdefault(sources[sid][0], []).append(sid)
    out: dict[str, int] = {}
    for cls in sorted(by_class):
        ids = by_class[cls]
        rng.shuffle(ids)
        ids.sort(key=lambda s: -sources[s][1])  # stable: equal sizes keep the shuffled order
        frames, count = [0] * num_folds, [0] * num_folds
        for sid in ids:
            f = min(range(num_folds), key=lambda j: (frames[j], count[j], j))
            out[sid] = f + 1
            frames[f] += sources[sid][1]
            count[f] += 1
    return out


def site_leakage(site_ids: list[str], folds: np.ndarray, num_folds: int = NUM_FOLDS) -> dict[int, float]:
    """Per fold, the share of its test frames whose site (metadata ``Source ID``) also
    supplies training frames, i.e. the other folds. Frames without a site id count as not
    shared. Folds split by video keep a video out of training, not its site: a classifier
    can score by recognising the site's device and presets (site leakage).
    """
    out = {}
    for k in range(1, num_folds + 1):
        test = folds == k
        train_sites = {s for s, t in zip(site_ids, test) if not t and s}
        shared = [bool(s) and s in train_sites for s, t in zip(site_ids, test) if t]
        out[k] = float(np.mean(shared)) if shared else 0.0
    return out


def site_baseline_accuracy(site_ids: list[str], classes: list[str], folds: np.ndarray,
                           num_folds: int = NUM_FOLDS) -> float:
    """Accuracy over all folds of a "classifier" that sees only the site: each test frame
    gets the majority class of its site's training frames (the overall training majority
    for an unknown or unseen site). A reference floor for the 5-fold results: accuracy up
    to here can come from recognising where a video was recorded."""
    def majority(counts: Counter) -> str | None:  # ties: alphabetical, so deterministic
        return min(counts, key=lambda c: (-counts[c], c)) if counts else None

    correct = 0
    for k in range(1, num_folds + 1):
        test = folds == k
        per_site: dict[str, Counter] = {}
        overall: Counter = Counter()
        for s, c, t in zip(site_ids, classes, test):
            if not t:
                overall[c] += 1
                if s:
                    per_site.setdefault(s, Counter())[c] += 1
        for s, c, t in zip(site_ids, classes, test):
            if t:
                correct += majority(per_site.get(s) or overall) == c
    return correct / len(classes) if classes else 0.0


def fold_arrays(images: np.ndarray, labels: np.ndarray, folds: np.ndarray, k: int):
    """USCL tuple for test fold ``k``: ``(X_train, y_train, X_test, y_test)``.

    Args:
        images: ``N x 3 x S x S`` uint8; labels: ``N`` int; folds: ``N`` fold numbers.
    """
    test = folds == k
    return images[~test], labels[~test], images[test], labels[test]


# --------------------------------------------------------------------------- #
# I/O
# --------------------------------------------------------------------------- #
@dataclass
class Source:
    path: Path          # file on disk
    rel: str            # path relative to the data folder (stable id)
    kind: str           # 'video' | 'image'
    probe: str
    cls: str


def find_data_dir(src: Path) -> Path:
    """Accept the checkout root or its ``data/`` folder."""
    for cand in (src / "data", src):
        if (cand / "pocus_videos").is_dir() or (cand / "pocus_images").is_dir():
            return cand
    raise DataError(f"{src}: not a covid19_ultrasound checkout (no data/pocus_videos or data/pocus_images)")


def read_metadata(data_dir: Path) -> dict[str, dict]:
    """``dataset_metadata.csv`` rows keyed by ``Filename`` (which upstream stores without extension)."""
    path = data_dir / "dataset_metadata.csv"
    if not path.is_file():
        print(f"warning: {path} not found; licence columns will be empty", file=sys.stderr)
        return {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return {row.get("Filename", "").strip(): row for row in csv.DictReader(f)}


def list_sources(data_dir: Path, probes: tuple[str, ...]) -> list[Source]:
    out = []
    for kind, folder, exts in (("video", "pocus_videos", VIDEO_EXTS), ("image", "pocus_images", IMAGE_EXTS)):
        for probe in probes:
            root = data_dir / folder / probe
            if not root.is_dir():
                continue
            for p in sorted(root.rglob("*")):
                if p.is_file() and p.suffix.lower() in exts:
                    rel = p.relative_to(data_dir).as_posix()
                    out.append(Source(p, rel, kind, probe, class_from_filename(rel)))
    return out


def count_frames(path: Path) -> int:
    """Frames that actually decode (container frame counts are unreliable for GIF/MOV)."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    try:
        if not cap.isOpened():
            return 0
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n


def read_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    """Decode the frames at ``indices`` (sorted) as RGB ``H x W x 3`` uint8."""
    want, out = set(indices), []
    cap = cv2.VideoCapture(str(path))
    try:
        i = 0
        while len(out) < len(want) and cap.grab():
            if i in want:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise DataError(f"{path}: frame {i} does not decode")
                if frame.ndim == 2:
                    frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
                out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            i += 1
    finally:
        cap.release()
    if len(out) != len(want):
        raise DataError(f"{path}: only {len(out)} of {len(want)} requested frames decoded")
    return out


def to_square(img: np.ndarray, size: int) -> np.ndarray:
    """``H x W x 3`` -> ``size x size x 3``; a plain resize as in USCL (no crop; aspect not kept)."""
    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def build(src: str | Path, out: str | Path, frames_per_video: int = 16, size: int = 224,
          probe: str = "convex", seed: int = 0, num_folds: int = NUM_FOLDS, verbose: bool = True) -> dict:
    """Build the fold set; returns the build report (also written to ``build_report.json``)."""
    from tqdm import tqdm

    data_dir = find_data_dir(Path(src))
    out = Path(out)
    probes = PROBES if probe == "both" else (probe,)
    meta = read_metadata(data_dir)
    sources = list_sources(data_dir, probes)
    if not sources:
        raise DataError(f"{data_dir}: no videos or images found for probe {probe!r}")

    skipped: dict[str, list[str]] = {}
    unreadable: list[str] = []
    frames: list[tuple[Source, int, np.ndarray]] = []  # (source, frame index, S x S x 3)
    for s in tqdm(sources, desc="reading", disable=not verbose):
        if s.cls not in CLASS_TO_LABEL:
            skipped.setdefault(s.cls, []).append(s.rel)
            continue
        try:
            if s.kind == "image":
                frames.append((s, 0, to_square(read_image(s.path, "rgb"), size)))
                continue
            n = count_frames(s.path)
            if n == 0:
                raise DataError(f"{s.path}: no frame decodes")
            for i, fr in zip(even_frame_indices(n, frames_per_video),
                             read_frames(s.path, even_frame_indices(n, frames_per_video))):
                frames.append((s, i, to_square(fr, size)))
        except (DataError, cv2.error) as e:  # a broken file is reported, never a crash
            unreadable.append(s.rel)
            print(f"warning: skipping unreadable {s.rel}: {e}", file=sys.stderr)
    for cls, rels in sorted(skipped.items()):  # named here, not only in build_report.json
        print(f"note: left out {len(rels)} file(s) of class '{cls}' (not one of {', '.join(CLASSES)}): "
              + ", ".join(rels), file=sys.stderr)
    if not frames:
        raise DataError(f"{data_dir}: no readable covid19/pneumonia/regular frames")

    per_source: dict[str, list[str | int]] = {}
    for s, _, _ in frames:
        per_source.setdefault(s.rel, [s.cls, 0])[1] += 1
    fold_of = assign_folds({k: (v[0], v[1]) for k, v in per_source.items()}, num_folds, seed)
    # order = fold, then source, then frame: the pickles and manifest share it
    frames.sort(key=lambda t: (fold_of[t[0].rel], t[0].rel, t[1]))

    images = np.stack([f[2] for f in frames]).transpose(0, 3, 1, 2).copy()  # N x 3 x S x S
    labels = np.array([CLASS_TO_LABEL[f[0].cls] for f in frames], dtype=np.int64)
    folds = np.array([fold_of[f[0].rel] for f in frames], dtype=np.int64)

    rows = []
    for (s, i, img), fold in zip(frames, folds):
        png = f"images/fold{fold}/{s.cls}/{Path(s.rel).stem}__f{i:05d}.png"
        atomic_write_png(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), out / png)
        m = meta.get(Path(s.rel).stem) or meta.get(Path(s.rel).name) or {}
        rows.append({"file": png, "source": s.rel, "frame_index": i, "class": s.cls,
                     "label": CLASS_TO_LABEL[s.cls], "fold": int(fold), "type": s.kind, "probe": s.probe,
                     "site_id": m.get("Source ID", "").strip(),
                     "license": m.get("License", ""), "link_to_license": m.get("LinkToLicense", ""),
                     "changes_made": m.get("ChangesMade", "")})
    site_of = {r["source"]: r["site_id"] for r in rows}
    sites: dict[str, Counter] = {}  # site -> class -> number of sources
    for rel, (cls, _) in sorted(per_source.items()):
        sites.setdefault(site_of[rel] or "unknown", Counter())[cls] += 1
    for k in range(1, num_folds + 1):
        atomic_pickle_dump(fold_arrays(images, labels, folds, k), out / f"covid_data{k}.pkl")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "manifest.csv", lambda f: f.write(buf.getvalue().encode("utf-8")))

    report = {
        "src": str(data_dir), "probe": probe, "frames_per_video": frames_per_video, "size": size,
        "seed": seed, "num_images": int(len(labels)), "num_sources": len(per_source),
        "per_class": {c: int((labels == l).sum()) for c, l in CLASS_TO_LABEL.items()},
        "per_fold": {str(k): {c: int(((folds == k) & (labels == l)).sum()) for c, l in CLASS_TO_LABEL.items()}
                     for k in range(1, num_folds + 1)},
        "sources_per_fold": {str(k): sum(1 for v in fold_of.values() if v == k) for k in range(1, num_folds + 1)},
        "sources_per_site": {k: dict(v) for k, v in sorted(sites.items(), key=lambda kv: -kv[1].total())},
        "test_frames_from_a_training_site": {
            str(k): round(v, 4) for k, v in site_leakage([r["site_id"] for r in rows], folds, num_folds).items()},
        "site_only_accuracy": round(site_baseline_accuracy([r["site_id"] for r in rows],
                                                           [r["class"] for r in rows], folds, num_folds), 4),
        "skipped": {k: len(v) for k, v in sorted(skipped.items())},
        "skipped_files": skipped,
        "unreadable": unreadable,
    }
    atomic_write(out / "build_report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    if verbose:
        print(f"{report['num_images']} images from {report['num_sources']} sources -> {out}")
        print("per fold:", json.dumps(report["per_fold"]))
        print("skipped:", report["skipped"] or "none", "| unreadable:", unreadable or "none")
        print("test frames whose site also supplies training frames, per fold:",
              json.dumps(report["test_frames_from_a_training_site"]),
              f"| site-only accuracy: {report['site_only_accuracy']}")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build the POCUS 5-fold set (USCL pickles + image folders + "
                                "manifest) from a covid19_ultrasound checkout.")
    p.add_argument("--src", required=True, help="covid19_ultrasound checkout (or its data/ folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--frames_per_video", type=int, default=16,
                   help="frames sampled evenly per video (0 = all). 16 gives ~1.9k convex images "
                        "(USCL's set has 2,116)")
    p.add_argument("--size", type=int, default=224, help="square side in pixels (USCL: 224)")
    p.add_argument("--probe", choices=("convex", "linear", "both"), default="convex",
                   help="probe type to include (USCL: convex)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def run() -> None:
        check_flag_ranges(args, {"--frames_per_video": AT_LEAST_1, "--size": AT_LEAST_1, "--seed": SEED})
        ensure_writable_dir(args.out, "--out")
        build(args.src, args.out, args.frames_per_video, args.size, args.probe, args.seed)

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
