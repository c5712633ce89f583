#!/usr/bin/env python
"""Grad-CAM of a random-init and a learned encoder on synthetic scans: ``python figs/draw_gradcam.py``.

The experiment is the one ``tests/test_gradcam.py::test_learned_encoder_puts_more_of_its_map_on_the_class_anatomy``
asserts on (both import it from evaluation/cam_experiment.py, so they cannot drift apart), over
``--seeds`` (default 0 1 2):

* data: fold 1 of the synthetic POCUS set with ``local_findings`` (the classes differ only at
  their findings: B-lines and an irregular pleura, a consolidation; no global A-line cue),
  96 px scans, 4 videos x 3 frames per class and fold, written and read back as the
  evaluation reads them (``covid_data1.pkl`` + ``covid_data1_cam_masks.npz``);
* arms: one random-init ResNet-18, and the same init trained supervised on fold 1's
  training scans (100 Adam steps); both explained by the evaluation's linear protocol
  (logistic regression, C = 0.1, :func:`evaluation.cam_shares.linear_probe_classifier`), Grad-CAM of
  the true class at ``layer4[-1]``;
* number: the share of each map's energy on the scan's class anatomy
  (:func:`evaluation.cam_shares.synthetic_class_region`), beside the share a uniform map gets (the
  region's area) and the learned encoder's share when the WRONG class is explained.

Writes ``figs/gradcam_synthetic.png`` (seed 0: two test scans per class; row 1 the scan
with its class anatomy outlined, row 2 the random-init map, row 3 the learned one) and
``docs/results/gradcam_synthetic.json`` (per seed and mean +- std, settings, where it ran).
Synthetic pixels only; about a minute per seed on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation import cam_experiment as exp  # noqa: E402
from evaluation import cam_shares  # noqa: E402
from models.encoder_io import NORM_MEAN, NORM_STD  # noqa: E402
from utils.io import atomic_write  # noqa: E402
from utils.plots import overlay_labels, plot_image_grid  # noqa: E402

CLASSES = ("covid19", "pneumonia", "regular")
REGIONS = {"covid19": "pleura + B-lines", "pneumonia": "consolidation", "regular": "pleura + A-lines"}
SHOWN = 2  # scans per class in the figure


def run_seed(seed: int) -> tuple[dict, dict]:
    """The test's experiment for one seed -> (its numbers, the figure's inputs)."""
    with tempfile.TemporaryDirectory() as tmp:
        r = exp.anatomy_experiment(Path(tmp), seed)
    numbers = {arm: {k: r[arm][k] for k in ("share", "per_class", "accuracy") if k in r[arm]}
               for arm in ("random", "learned", "uniform")}
    numbers["learned_wrong_class"] = {"share": r["learned_wrong_class"]["share"]}
    return numbers, r


def draw(r: dict, png: Path, stats: dict) -> None:
    """The first ``SHOWN`` test scans of each class of one seed's run."""
    y = r["data"]["y_test"]
    keep = np.concatenate([np.flatnonzero(y == c)[:SHOWN] for c in range(3)])
    images = cam_shares.display_images(r["data"]["x_test"][keep], NORM_MEAN, NORM_STD)   # K x S x S x 3
    tiles, titles = [], []
    for img, m, c in zip(images, r["data"]["region"][keep], y[keep]):
        tiles.append(overlay_labels((img * 255).astype(np.uint8), m.astype(np.int64), alpha=0.25, outline=True))
        titles.append(f"{CLASSES[c]}: {REGIONS[CLASSES[c]]}\n(area {m.mean():.2f})")
    for arm in ("random", "learned"):
        tiles += cam_shares.overlays(images, r[arm]["cams"][keep])
        titles += [f"{arm}: share {s:.2f}" if np.isfinite(s) else f"{arm}: empty map" for s in r[arm]["shares"][keep]]
    m = {k: v["mean"] for k, v in stats.items()}
    plot_image_grid(tiles, png, titles, cols=len(keep), tile_inches=1.45, dpi=76,
                    suptitle=f"Grad-CAM (layer4[-1]) of the linear probe on synthetic scans; energy share on the "
                          f"class anatomy, mean of {stats['learned']['n']} seeds: learned {m['learned']:.3f}, "
                          f"random {m['random']:.3f}, uniform {m['uniform']:.3f}")


def summary(per_seed: dict, seconds: float) -> dict:
    arms = ("learned", "random", "uniform", "learned_wrong_class")
    stats = {a: {"mean": float(np.mean([s[a]["share"] for s in per_seed.values()])),
                 "std": float(np.std([s[a]["share"] for s in per_seed.values()], ddof=1)) if len(per_seed) > 1 else None,
                 "n": len(per_seed)} for a in arms}
    gap = [s["learned"]["share"] - s["random"]["share"] for s in per_seed.values()]
    stats["learned_minus_random"] = {"mean": float(np.mean(gap)), "min": float(np.min(gap)), "n": len(gap)}
    return {"what": "share of each Grad-CAM map's energy (sum of the non-negative map) on the class-defining "
                    "anatomy (covid19: pleura + B-line columns, pneumonia: consolidation, regular: pleura + A-lines), "
                    "mean over the test scans of synthetic fold 1; 'uniform' = the share a flat map gets (the "
                    "region's area); 'learned_wrong_class' = the learned encoder's maps of a wrong class "
                    "((y + 1) mod 3) scored on the true class's anatomy; per_class in the order "
                    f"{list(CLASSES)}",
            "command": "python figs/draw_gradcam.py",
            "ran_on": {"device": "cpu", "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                       "python": platform.python_version()},
            "settings": {"data": {**exp.ANATOMY_DATA, "fold": 1,
                                  "layout": "synthetic POCUS 5-fold (utils.synthetic_us), seed = run seed"},
                         "img_size": exp.ANATOMY_IMG,
                         "learned": f"the random init trained supervised on fold 1's training scans: "
                                    f"{exp.ANATOMY_STEPS} Adam steps, batch 16, lr 1e-3, horizontal flips "
                                    "(evaluation/cam_experiment.py::train_reference_encoder)",
                         "random": "torch.manual_seed(seed); torchvision ResNet-18",
                         "protocol": f"linear probe (StandardScaler + LogisticRegression, C = {exp.ANATOMY_LIN_C}), "
                                     "centred (evaluation.cam_shares.linear_probe_classifier)",
                         "cam": "gradcam", "cam_target": "true", "layer": "layer4[-1]"},
            "seeds": per_seed, "summary": stats, "wall_time_s": round(seconds, 1),
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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (default: 0 1 2); "
                    "the figure shows the first")
    args = ap.parse_args(argv)
    t0 = time.time()
    per_seed, first = {}, None
    for seed in args.seeds:
        numbers, r = run_seed(seed)
        per_seed[str(seed)] = numbers
        first = first or r
        print(f"seed {seed}: " + ", ".join(f"{a} {numbers[a]['share']:.3f}" for a in numbers), flush=True)
    result = summary(per_seed, time.time() - t0)
    draw(first, Path(args.png), result["summary"])
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(args.json, lambda f: f.write(text.encode()))
    print(f"wrote {args.png} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
