#!/usr/bin/env python
"""Predicted vs true masks of the segmentation downstream task on synthetic scans:
``python figs/draw_segmentation.py``.

The task of ``evaluation_segmentation.py`` (``evaluation/segmentation.py``) on the synthetic
SAMUS set of ``utils.synthetic_us`` (``SynLung-Anatomy``: rib, pleura, consolidation), a
random-init ResNet-18 fine-tuned on all training scans at 64 px; the epoch of the best
validation Dice is kept. Writes ``figs/segmentation_synthetic.png`` (row 1 the test scans,
row 2 the true index maps, row 3 the predicted ones) and ``docs/results/segmentation_synthetic.json``
(the test metrics and settings, where it ran). Synthetic pixels only; a few minutes on a 2-core CPU.
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

from evaluation.segmentation import SegNet, fit, load_split, predict, score  # noqa: E402
from utils.io import atomic_write, atomic_write_png  # noqa: E402
from utils.plots import overlay_labels  # noqa: E402
from utils.synthetic_us import write_samus_layout  # noqa: E402

DATASET = "SynLung-Anatomy"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--images", type=int, default=60, help="synthetic scans (70/10/20 train/val/test)")
    p.add_argument("--show", type=int, default=6, help="test scans in the figure")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_samus_layout(Path(tmp) / "seg", n_images=a.images, size=96, seed=a.seed)
        splits = {s: load_split(root, s, DATASET, a.img_size) for s in ("train", "val", "test")}
    model = SegNet(4)
    record = fit(model, "finetune", splits["train"], splits["val"], 4, epochs=a.epochs, batch_size=8, lr=1e-3,
                 seed=a.seed, device=torch.device("cpu"))
    test = splits["test"]
    pred = predict(model, test.X, torch.device("cpu"))
    metrics = score(pred, test.Y, 4)
    tiles = []
    for row in ("image", "true", "predicted"):
        for i in range(min(a.show, len(test.X))):
            img = test.X[i].transpose(1, 2, 0)
            lab = {"image": np.zeros_like(test.Y[i]), "true": test.Y[i].clip(min=0), "predicted": pred[i]}[row]
            tiles.append(overlay_labels(img, lab.astype(np.int64), outline=True))
    cols = min(a.show, len(test.X))
    s = a.img_size
    grid = np.zeros((3 * s, cols * s, 3), np.uint8)
    for k, t in enumerate(tiles):
        grid[(k // cols) * s:(k // cols + 1) * s, (k % cols) * s:(k % cols + 1) * s] = t
    grid = np.kron(grid, np.ones((3, 3, 1), np.uint8))                  # 3x: readable in the README
    atomic_write_png(grid[..., ::-1], REPO / "figs" / "segmentation_synthetic.png")
    out = {"dataset": DATASET, "classes": {"1": "rib", "2": "pleura", "3": "consolidation"},
           "encoder": "random init, finetune", "img_size": a.img_size, "epochs": a.epochs, "seed": a.seed,
           "n_train": len(splits["train"].names), "n_val": len(splits["val"].names), "n_test": len(test.names),
           "selected_epoch": record["selected_epoch"], "test": metrics,
           "where": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
           "seconds": round(time.time() - t0, 1), "made_by": "figs/draw_segmentation.py"}
    atomic_write(REPO / "docs" / "results" / "segmentation_synthetic.json",
                 lambda f: f.write(json.dumps(out, indent=1).encode()))
    m = metrics["mean"]
    print(f"test Dice {m['dice']:.3f} IoU {m['iou']:.3f} HD95 {m['hd95']:.1f} px; wrote figs/segmentation_synthetic.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
