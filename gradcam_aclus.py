#!/usr/bin/env python
"""Grad-CAM of a saved evaluation classifier on any images: where it looks.

Usage::

    python evaluation_aclus.py --data_path dataset/pocus_5fold --protocol linear --save_classifiers \\
        --out_dir eval_out                       # writes eval_out/classifiers/linear_last_random_fold<k>.pth
    python gradcam_aclus.py --classifier eval_out/classifiers/linear_last_random_fold1.pth \\
        --images dataset/pocus_5fold/images/fold1 --out_dir eval_out/gradcam_fold1
    python gradcam_aclus.py --classifier C --images a.png b.png --cam gradcampp --cam_target pred

Classifier (``--classifier``): a file of ``evaluation_aclus.py --save_classifiers``, either
protocol (finetune: the trained network; linear: the frozen encoder with the scaler and the
logistic regression folded into ``fc``); a torchvision ResNet-18 state dict plus class names,
read weights-only (``utils.checkpoint.safe_torch_load``).

Images (``--images``): files and/or folders (searched recursively, sorted); at most
``--max_images``, evenly spaced over the list. An image inside a folder named like one of
the classifier's classes (``fold1/covid19/x.png``) has that true class; others have none
("?"), and their map explains the predicted class. Each image is resized to the classifier's
``img_size`` as the evaluation's folder loader does, then normalised as in evaluation.

Output in ``--out_dir``: ``<cam>_<classifier stem>.png`` (each map over its image, true and
predicted class and the map's sector share in the title) and ``.npy`` beside it (the maps,
image index into ``<...>.files.txt``, labels, predictions, shares; ``np.load`` without pickle).
The sector share is the share of the map's energy inside the non-black region of the
image (``evaluation.cam_shares.sector_mask``). Bad input is one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from evaluation import cam_shares
from evaluation import gradcam as gcam
from utils.flags import AT_LEAST_0, AT_LEAST_1, check_flag_ranges
from utils.io import DataError, atomic_write, ensure_writable_dir, read_image
from utils.mask_layout import is_image


def list_images(paths: list[str]) -> list[Path]:
    """Image files of ``paths`` (files as given, folders searched recursively and sorted)."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and is_image(f))
        elif p.is_file():
            if not is_image(p):
                raise DataError(f"--images {p}: not an image file (expected .png, .jpg, ...)")
            found.append(p)
        else:
            raise DataError(f"--images {p}: not found")
    if not found:
        raise DataError(f"--images {' '.join(paths)}: no image files there")
    return found


def true_label(path: Path, classes: tuple[str, ...]) -> int:
    """Class id from the nearest parent folder named like a class; -1 when none is."""
    for parent in path.parents:
        if parent.name in classes:
            return classes.index(parent.name)
    return -1


def explain(args) -> Path:
    model, classes, meta = gcam.load_classifier(args.classifier)
    img_size = args.img_size or int(meta.get("img_size", 224))
    gcam.cam_grid(model, img_size)  # a flat 1x1 map is refused before any image is read
    paths = list_images(args.images)
    keep = np.unique(np.round(np.linspace(0, len(paths) - 1, min(args.max_images, len(paths)))).astype(int))
    paths = [paths[i] for i in keep]
    out_dir = ensure_writable_dir(args.out_dir, "--out_dir")

    from evaluation.data import fit_square, make_transforms
    from models.encoder_io import NORM_MEAN, NORM_STD

    tf = make_transforms(img_size, False)
    # as the evaluation read the classifier's images (classifiers saved before letterboxing squashed)
    resize, pad = meta.get("resize", "squash"), int(meta.get("pad_value") or 0)
    batch = []
    for p in paths:
        img = fit_square(read_image(p, "rgb"), img_size, resize, pad)
        batch.append(tf(torch.from_numpy(img.transpose(2, 0, 1).copy())))
    device = torch.device(args.device)
    model = model.to(device)
    x = torch.stack(batch).to(device)                                   # n x 3 x S x S
    with torch.no_grad():
        pred = np.concatenate([model(xb).argmax(1).cpu().numpy() for xb in x.split(args.batch_size)])
    label = np.array([true_label(p, classes) for p in paths], dtype=np.int64)
    target = np.where((label >= 0) & (args.cam_target == "true"), label, pred)
    cams, _ = gcam.compute_cams(model, x, target, args.cam, args.batch_size)
    images = cam_shares.display_images(x, NORM_MEAN, NORM_STD)
    sector = np.stack([cam_shares.sector_mask(im) for im in images])
    rec = cam_shares.cam_records(np.arange(len(paths)), label, pred, target, cams, classes,
                           cam_shares.energy_share(cams, sector))
    stem = f"{args.cam}_{Path(args.classifier).stem}"
    png = out_dir / f"{stem}.png"
    listing = "".join(f"{i}\t{p}\n" for i, p in enumerate(paths)).encode()
    atomic_write(out_dir / f"{stem}.files.txt", lambda f: f.write(listing))
    cam_shares.write_cam_outputs(rec, images, png, f"{args.cam} ({args.cam_target} class where known), "
                           f"{Path(args.classifier).name}", cols=args.cols)
    for p, r in zip(paths, rec):
        share = "no energy" if not np.isfinite(r["sector_share"]) else f"sector share {r['sector_share']:.3f}"
        print(f"{p}: true {r['true_class']}, pred {r['pred_class']}, {share}")
    print(f"wrote {png} and {png.with_suffix('.npy')}")
    return png


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Grad-CAM (pytorch_grad_cam, layer4[-1]) of a classifier saved by "
                                "evaluation_aclus.py --save_classifiers, on image files or folders.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classifier", required=True, help="a classifiers/<...>.pth of evaluation_aclus.py --save_classifiers")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders (recursive)")
    p.add_argument("--out_dir", default="gradcam_out", help="where the montage PNG and the .npy go")
    p.add_argument("--cam", choices=tuple(gcam.CAM_METHODS), default="gradcam",
                   help="gradcam (Grad-CAM) or gradcampp (Grad-CAM++)")
    p.add_argument("--cam_target", choices=gcam.CAM_TARGETS, default="true",
                   help="explain the true class (from a class-named parent folder; else the predicted one) "
                        "or always the predicted class")
    p.add_argument("--max_images", type=int, default=24, help="at most this many images, evenly spaced over the list")
    p.add_argument("--img_size", type=int, default=0, help="input side (0 = the classifier's, as evaluated)")
    p.add_argument("--cols", type=int, default=6, help="tiles per montage row")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        check_flag_ranges(args, {"--max_images": AT_LEAST_1, "--img_size": AT_LEAST_0, "--cols": AT_LEAST_1,
                                 "--batch_size": AT_LEAST_1})
        explain(args)
    except DataError as e:  # bad input: one line naming the file or flag, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
