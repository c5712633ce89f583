#!/usr/bin/env python
"""Stage 4: anatomy label PNGs -> mask pickles + the image/mask pair list.

    python utils/generate_masks_pkls.py --data_dir dataset

reads every image ``dataset/train/<Sub>/img/<rel>`` (any depth below ``img/``) with its label
``dataset/train/<Sub>/label/<rel>.png`` (extension replaced) and writes

* ``dataset/masks/<Sub>_<stem>_gt.pkl`` (an image directly in ``img/``) or
  ``dataset/masks/<Sub>/<folders>/<stem>_gt.pkl`` (one in a sub-folder): the H x W integer
  label map (0 = background, 1..K anatomies, ids preserved; 0/255 binary labels become 0/1);
* ``dataset/train_tf_img_to_gt.pkl``: the list of ``[image_path, mask_pkl_path]`` pairs,
  paths relative to ``--data_dir``.

The layout, the names and the pickles' contents are ``utils/mask_layout.py``'s, shared with
stage 3 (which writes the labels) and pre-training (which reads the pairs).

Re-running skips masks that are already written and newer than their label.
Every write is atomic. Images without a label, unreadable files, size mismatches
and empty (all-background) masks are reported by name, counted and left out.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import mask_layout as layout  # noqa: E402
from utils.io import DataError, ensure_writable_dir, read_image, read_label  # noqa: E402


@dataclass
class Report:
    written: int = 0
    kept: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, message: str) -> None:
        self.problems[kind].append(message)

    def summary(self) -> str:
        lines = [f"masks written: {self.written}, already done: {self.kept}"]
        for kind, items in sorted(self.problems.items()):
            lines.append(f"{kind}: {len(items)}")
            lines += [f"  - {m}" for m in items]
        return "\n".join(lines)


def find_items(data_dir: Path) -> list[tuple[str, PurePath, Path, Path | None]]:
    """``(subset, path below img/, image path, label path or None)`` for every image of
    :func:`utils.mask_layout.find_images` under ``data_dir`` (a ``<root>/<split>`` folder)."""
    items = []
    for sub, rel, img in layout.find_images(data_dir):
        lab = layout.label_path(data_dir, sub, rel)
        items.append((sub, rel, img, lab if lab.is_file() else None))
    return items


def check_pair(image_shape: tuple[int, ...], label: np.ndarray, label_path: Path) -> None:
    if tuple(image_shape[:2]) != label.shape:
        raise DataError(f"{label_path}: label size {label.shape} differs from its image's {tuple(image_shape[:2])}")
    if not label.any():
        raise DataError(f"{label_path}: empty mask (background only)")


def generate(data_dir: Path, split: str = "train", masks_dir: Path | None = None,
             pairs_path: Path | None = None) -> Report:
    split_dir = layout.split_dir(data_dir, split)
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found; expected {split}/<Sub>/img and {split}/<Sub>/label")
    masks_dir = masks_dir or layout.masks_dir(data_dir)
    pairs_path = pairs_path or layout.pairs_file(data_dir, split)
    report, pairs = Report(), []
    items = find_items(split_dir)
    if not items:
        raise DataError(f"{split_dir}: no images found under <Sub>/img/")
    for sub, rel, img_path, lab_path in items:
        if lab_path is None:
            report.add("images without a label", str(img_path))
            continue
        out = layout.mask_path(masks_dir, sub, rel)
        if out.is_file() and out.stat().st_mtime >= lab_path.stat().st_mtime:
            report.kept += 1
        else:
            try:
                label = read_label(lab_path)
                check_pair(read_image(img_path, "gray").shape, label, lab_path)
            except DataError as e:
                kind = ("empty masks" if "empty mask" in str(e) else
                        "size mismatches" if "differs" in str(e) else "unreadable files")
                report.add(kind, str(e))
                continue
            layout.write_mask(label, out)
            report.written += 1
        pairs.append((img_path, out))
    if not pairs:
        raise DataError(f"{split_dir}: no usable image/label pair\n{report.summary()}")
    layout.write_pairs(pairs, data_dir, pairs_path)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="dataset", help="folder holding <split>/<Sub>/{img,label}")
    p.add_argument("--split", default="train", help="sub-folder of --data_dir to read (default: train)")
    p.add_argument("--masks_dir", default=None, help="default: <data_dir>/masks")
    p.add_argument("--pairs", default=None, help="default: <data_dir>/<split>_tf_img_to_gt.pkl")
    a = p.parse_args(argv)
    try:
        if a.masks_dir:
            ensure_writable_dir(a.masks_dir, "--masks_dir")
        if a.pairs:
            if Path(a.pairs).is_dir():
                raise DataError(f"--pairs {a.pairs}: is a folder; name the pair-list file")
            ensure_writable_dir(Path(a.pairs).parent, "--pairs (its folder)")
        report = generate(Path(a.data_dir), a.split, a.masks_dir and Path(a.masks_dir), a.pairs and Path(a.pairs))
    except DataError as e:
        print(f"generate_masks_pkls.py: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
