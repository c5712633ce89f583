"""Grad-CAM of the classifiers an evaluation trains (``--gradcam``); the pure parts are in
:mod:`evaluation.gradcam` and :mod:`evaluation.cam_shares`."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from evaluation import cam_shares
from evaluation import gradcam as gcam
from evaluation.data import Fold, make_transforms
from models.encoder_io import NORM_MEAN, NORM_STD, build_resnet18
from utils.io import DataError

CAM_MASKS_NAME = "covid_data{k}_cam_masks.npz"


def arm_name(ckpt_path: str | None) -> str:
    """``random`` or the checkpoint's file stem, safe as part of a file name."""
    if not ckpt_path:
        return "random"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(ckpt_path).stem) or "checkpoint"


def check_gradcam_args(args) -> None:
    """The Grad-CAM flags, before any work: N >= 0 and an input size whose layer4 map is a map."""
    if args.gradcam < 0:
        raise DataError(f"--gradcam {args.gradcam}: must be >= 0 (test images per class to explain; 0 = off)")
    if args.gradcam:
        gcam.cam_grid(build_resnet18(2), args.img_size)


def load_cam_masks(path: Path, n: int | None = None, hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """``sector`` and ``region`` (N x H x W bool) of a ``covid_data<k>_cam_masks.npz``, checked
    (against the fold's ``n`` test images of size ``hw`` when given); read without pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            masks = {k: z[k] for k in ("sector", "region") if k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable mask file ({type(e).__name__}: {e})") from None
    if set(masks) != {"sector", "region"}:
        raise DataError(f"{path}: needs arrays 'sector' and 'region' (N x H x W bool)")
    shapes = {k: v.shape for k, v in masks.items()}
    if any(len(sh) != 3 for sh in shapes.values()) or shapes["sector"] != shapes["region"]:
        raise DataError(f"{path}: 'sector' and 'region' must be N x H x W arrays of one shape, found {shapes}")
    if n is not None and shapes["sector"] != (n, *hw):
        raise DataError(f"{path}: masks of shape {shapes['sector']}, but the fold has {n} test images of "
                        f"{hw[0]}x{hw[1]}")
    return {k: v.astype(bool) for k, v in masks.items()}


def fold_cam_masks(fold: Fold) -> dict[str, np.ndarray] | None:
    """The fold's sector/region masks from the file beside its pickle, or None (then the
    sector is derived from each image and the region is unknown)."""
    path = Path(fold.source).parent / CAM_MASKS_NAME.format(k=fold.index)
    if not fold.source.endswith(".pkl") or not path.is_file():
        return None
    return load_cam_masks(path, len(fold.y_test), fold.X_test.shape[2:])


def explain_fold(fold: Fold, model: nn.Module, args, device: torch.device, png: Path) -> tuple[dict, np.ndarray]:
    """Grad-CAM of ``args.gradcam`` test images per class of ``fold``; writes the montage
    ``png`` and its ``.npy``. Returns the fold's JSON entry and the records."""
    classes = fold.classes
    idx = cam_shares.pick_per_class(fold.y_test, args.gradcam, len(classes))
    tf = make_transforms(args.img_size, False)
    x = torch.stack([tf(torch.from_numpy(fold.X_test[i])) for i in idx]).to(device)  # n x 3 x S x S
    model = model.to(device).eval()
    with torch.no_grad():
        pred = np.concatenate([model(xb).argmax(1).cpu().numpy() for xb in x.split(2 * args.batch_size)])
    target = fold.y_test[idx] if args.cam_target == "true" else pred
    cams, _ = gcam.compute_cams(model, x, target, args.cam, 2 * args.batch_size)
    images = cam_shares.display_images(x, NORM_MEAN, NORM_STD)
    masks = fold_cam_masks(fold)
    if masks is None:
        sector, region = np.stack([cam_shares.sector_mask(im) for im in images]), None
    else:
        sector = cam_shares.to_input_geometry(masks["sector"][idx], args.img_size)
        region = cam_shares.to_input_geometry(masks["region"][idx], args.img_size)
    rec = cam_shares.cam_records(idx, fold.y_test[idx], pred, target, cams, classes, cam_shares.energy_share(cams, sector),
                           None if region is None else cam_shares.energy_share(cams, region),
                           None if region is None else region.mean(axis=(1, 2)))
    title = (f"{args.cam} ({args.cam_target} class), {args.protocol}/{args.selection}, "
             f"{arm_name(args.ckpt_path)}, fold {fold.index}")
    cam_shares.write_cam_outputs(rec, images, png, title, cols=max(1, min(args.gradcam, len(idx))))
    entry = {"montage": str(png), "maps": str(png.with_suffix(".npy")), "sector_from": (
        "image" if masks is None else "masks file"), **cam_summary(rec, classes)}
    return entry, rec


def cam_summary(rec: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Mean shares per class (maps without energy left out and counted) of some records."""
    known = bool(np.isfinite(rec["region_share"]).any())
    out = {"images": {c: int((rec["label"] == i).sum()) for i, c in enumerate(classes)},
           "empty_maps": {c: int(((rec["label"] == i) & ~np.isfinite(rec["sector_share"])).sum())
                          for i, c in enumerate(classes)}}
    for key in ("sector_share", "region_share", "region_area"):
        if key != "sector_share" and not known:
            out[key] = None
            continue
        v = rec[key]
        out[key] = {**cam_shares.class_means(v, rec["label"], classes),
                    "all": float(np.nanmean(v)) if np.isfinite(v).any() else None}
    return out
