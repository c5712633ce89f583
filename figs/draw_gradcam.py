#!/usr/bin/env python
"""Grad-CAM of a random-init and a learned encoder on synthetic scans: ``python figs/draw_gradcam.py``.

Writes ``figs/gradcam_synthetic.png`` (fold 1: two test scans per class; row 1 the scan with
its class-defining anatomy outlined, row 2 the random-init linear probe's map, row 3 the
learned encoder's) and ``docs/results/gradcam_synthetic.json`` (the energy shares of both
runs over all five folds, as ``evaluation_aclus.py`` wrote them, and the settings).

The run: the synthetic POCUS 5-fold set (``utils.synthetic_us``: 4 videos x 2 frames per
class and fold, 64 px, seed 0, findings at full strength) with the class-region masks of
``utils.gradcam.write_synthetic_cam_masks``; ``evaluation_aclus.py --protocol linear
--img_size 96 --gradcam 4`` once without a checkpoint and once with the learned encoder,
a ResNet-18 trained supervised on another synthetic draw (seed 1) by the same helper the
evaluation tests use (``tests/test_evaluation.py::_train_reference_encoder``, at 96 px).
Synthetic pixels only. About two minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import evaluation_aclus as ev  # noqa: E402
from models.encoder_io import NORM_MEAN, NORM_STD  # noqa: E402
from tests.test_evaluation import _train_reference_encoder  # noqa: E402
from utils import gradcam as gcam  # noqa: E402
from utils.io import atomic_write, safe_pickle_load  # noqa: E402
from utils.plots import overlay_labels, plot_image_grid  # noqa: E402
from utils.synthetic_us import write_pocus_folds  # noqa: E402

DATA = dict(videos_per_class_per_fold=4, frames_per_video=2, size=64, seed=0, finding_strength=1.0)
IMG_SIZE, PER_CLASS, SHOWN = 96, 4, 2
REGIONS = {"covid19": "pleura + B-lines", "pneumonia": "consolidation", "regular": "pleura + A-lines"}


def run(work: Path) -> dict:
    data = work / "pocus"
    write_pocus_folds(data, **DATA)
    gcam.write_synthetic_cam_masks(data, **DATA)
    ckpt = work / "learned_resnet18.pth"
    _train_reference_encoder(ckpt, size=IMG_SIZE)
    results = {}
    for arm, extra in (("random", []), ("learned", ["--ckpt_path", str(ckpt)])):
        out = work / arm
        argv = ["--data_path", str(data), *extra, "--protocol", "linear", "--img_size", str(IMG_SIZE),
                "--workers", "0", "--device", "cpu", "--gradcam", str(PER_CLASS), "--out_dir", str(out)]
        if ev.main(argv) != 0:
            raise SystemExit(f"evaluation_aclus.py {' '.join(argv)} failed")
        results[arm] = json.loads((out / "eval_linear_last.json").read_text())
    return results


def draw(results: dict, work: Path, png: Path) -> None:
    """Fold 1, the first ``SHOWN`` explained scans of each class."""
    _, _, X_test, _ = safe_pickle_load(work / "pocus" / "covid_data1.pkl")
    region = np.load(work / "pocus" / "covid_data1_cam_masks.npz")["region"]
    recs = {arm: np.load(Path(r["folds"][0]["gradcam"]["maps"])) for arm, r in results.items()}
    keep = np.concatenate([np.flatnonzero(recs["random"]["label"] == c)[:SHOWN] for c in range(3)])
    idx = recs["random"]["index"][keep]
    assert (recs["learned"]["index"][keep] == idx).all()
    tf = ev.make_transforms(IMG_SIZE, False)
    images = gcam.display_images(torch.stack([tf(torch.from_numpy(X_test[i])) for i in idx]), NORM_MEAN, NORM_STD)
    masks = gcam.to_input_geometry(region[idx], IMG_SIZE)
    tiles, titles = [], []
    for k, (img, m, r) in enumerate(zip(images, masks, recs["random"][keep])):
        tiles.append(overlay_labels((img * 255).astype(np.uint8), m.astype(np.int64), alpha=0.25, outline=True))
        titles.append(f"{r['true_class']}: {REGIONS[r['true_class']]}\n(area {r['region_area']:.2f})")
    for arm in ("random", "learned"):
        rec = recs[arm][keep]
        tiles += gcam.overlays(images, rec["cam"])
        titles += [f"{arm} -> {r['pred_class']}\nanatomy share {r['region_share']:.2f}" if np.isfinite(r["region_share"])
                   else f"{arm} -> {r['pred_class']}\nno positive evidence" for r in rec]
    s = {arm: r["gradcam"]["region_share"]["all"] for arm, r in results.items()}
    plot_image_grid(tiles, png, titles, cols=len(keep), tile_inches=1.45, dpi=76,
                    suptitle=f"Grad-CAM (layer4[-1]) of the linear probe, synthetic fold 1; energy share on the class "
                          f"anatomy over 5 folds: random {s['random']:.3f}, learned {s['learned']:.3f}")


def summary(results: dict, seconds: float) -> dict:
    arms = {}
    for arm, r in results.items():
        g = r["gradcam"]
        arms[arm] = {"ckpt": "none (random init)" if arm == "random" else "reference ResNet-18, supervised, "
                     "synthetic seed 1 (tests/test_evaluation.py::_train_reference_encoder, 96 px)",
                     "accuracy_mean": r["summary"]["accuracy_mean"], "macro_f1_mean": r["summary"]["macro_f1_mean"],
                     **{k: g[k] for k in ("images", "empty_maps", "region_share", "region_area", "sector_share")}}
    return {"what": "share of each Grad-CAM map's energy (sum of the non-negative map) on the class-defining "
                    "anatomy (covid19: pleura + B-lines, pneumonia: consolidation, regular: pleura + A-lines) and "
                    "inside the sector (label != 0); mean per class over the maps with energy of all 5 folds; "
                    "region_area = the share a uniform map would get",
            "command": "python figs/draw_gradcam.py",
            "settings": {"data": {**DATA, "layout": "synthetic POCUS 5-fold (utils.synthetic_us)"},
                         "protocol": "linear", "selection": "last", "img_size": IMG_SIZE, "cam": "gradcam",
                         "cam_target": "true", "layer": "layer4[-1]", "images_per_class_per_fold": PER_CLASS,
                         "probe": "centred (utils.gradcam.linear_probe_classifier)"},
            "arms": arms, "wall_time_s": round(seconds, 1),
            "packages": {"torch": torch.__version__, "pytorch_grad_cam": _version("grad-cam")}}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png", default=str(REPO / "figs" / "gradcam_synthetic.png"))
    ap.add_argument("--json", default=str(REPO / "docs" / "results" / "gradcam_synthetic.json"))
    ap.add_argument("--work", default=None, help="keep the run's data and outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = run(work)
        draw(results, work, Path(args.png))
    text = json.dumps(summary(results, time.time() - t0), indent=2) + "\n"
    atomic_write(args.json, lambda f: f.write(text.encode()))
    print(f"wrote {args.png} and {args.json}")
    for arm, r in results.items():
        g = r["gradcam"]
        print(f"  {arm:8s} anatomy share {g['region_share']} (area {g['region_area']['all']:.3f}), "
              f"sector {g['sector_share']['all']:.3f}, empty maps {g['empty_maps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
