"""A-SAM loss and segmentation metrics (METHOD.md §1)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def asam_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 2.0,
              eps: float = 1.0) -> torch.Tensor:
    """0.2·BCE(pos_weight) + 0.8·soft Dice on low-res logits.

    logits: (B, 1, L, L) raw decoder output; target: (B, L, L) in {0, 1}. Dice is per sample,
    then averaged, so a small anatomy counts as much as a large one.
    """
    logits = logits[:, 0].float()  # fp32 even under autocast: the Dice sums run over L² pixels
    bce = F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device))
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (prob * t).sum(1) + eps) / (prob.sum(1) + t.sum(1) + eps)
    return 0.2 * bce + 0.8 * (1 - dice).mean()


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Binary masks -> (Dice, IoU); both empty counts as a perfect 1."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    inter, ps, gs = np.logical_and(pred, gt).sum(), pred.sum(), gt.sum()
    if ps + gs == 0:
        return 1.0, 1.0
    return 2 * inter / (ps + gs), inter / (ps + gs - inter)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels; NaN if exactly one is empty."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return float("nan")
    sp, sg = _surface(pred), _surface(gt)
    d_to_gt = ndimage.distance_transform_edt(~sg)   # distance of every pixel to the gt surface
    d_to_pred = ndimage.distance_transform_edt(~sp)
    return float(max(np.percentile(d_to_gt[sp], 95), np.percentile(d_to_pred[sg], 95)))


class MetricTable:
    """Accumulate Dice / IoU / HD95 per prompt key ("<Dataset>/<class ID>").

    Convention for images without the anatomy (empty ground truth): they do not enter
    Dice, IoU or HD95, which are means over the images that show the anatomy; they give
    the false-positive rate instead, the share of them on which the prompt still marks
    something (a single pixel counts), and the false-positive area, the mean share of such an
    image's pixels it marks (a speck and a head-sized blob differ there). (The both-empty Dice
    of 1 of :func:`dice_iou` would otherwise reward a prompt that never fires.)
    """

    def __init__(self):
        self.rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        self.fired_on_empty: dict[str, list[bool]] = defaultdict(list)
        self.area_on_empty: dict[str, list[float]] = defaultdict(list)

    def add(self, key: str, pred: np.ndarray, gt: np.ndarray) -> None:
        if not gt.any():
            self.fired_on_empty[key].append(bool(pred.any()))
            self.area_on_empty[key].append(float(pred.astype(bool).mean()))
            return
        d, i = dice_iou(pred, gt)
        self.rows[key].append((d, i, hd95(pred, gt)))

    def summary(self) -> dict[str, dict[str, float]]:
        """{key: {dice, iou, hd95, n, hd95_undefined, n_without, fp_rate, fp_area}} plus 'mean' over
        keys (macro); ``n_without`` images lacked the anatomy, ``fp_rate`` and ``fp_area`` are None
        when there were none."""
        nan = float("nan")
        out = {}
        for key in sorted(set(self.rows) | set(self.fired_on_empty)):
            a = np.array(self.rows.get(key, []), dtype=np.float64).reshape(-1, 3)
            fired = self.fired_on_empty.get(key, [])
            out[key] = {"dice": float(a[:, 0].mean()) if len(a) else nan,
                        "iou": float(a[:, 1].mean()) if len(a) else nan,
                        "hd95": float(np.nanmean(a[:, 2])) if np.isfinite(a[:, 2]).any() else nan,
                        "hd95_undefined": int(np.isnan(a[:, 2]).sum()), "n": len(a),
                        "n_without": len(fired), "fp_rate": float(np.mean(fired)) if fired else None,
                        "fp_area": float(np.mean(self.area_on_empty[key])) if fired else None}
        if out:
            vals = {m: np.array([v[m] for v in out.values()]) for m in ("dice", "iou", "hd95")}
            out["mean"] = {m: float(a[np.isfinite(a)].mean()) if np.isfinite(a).any() else nan
                           for m, a in vals.items()}
            out["mean"]["n"] = sum(v["n"] for k, v in out.items() if k != "mean")
            out["mean"]["n_without"] = sum(v["n_without"] for k, v in out.items() if k != "mean")
            for m in ("fp_rate", "fp_area"):
                vals = [v[m] for k, v in out.items() if k != "mean" and v[m] is not None]
                out["mean"][m] = float(np.mean(vals)) if vals else None
        return out


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'prompt':<28} {'n':>5} {'Dice':>7} {'IoU':>7} {'HD95':>7} {'without':>8} {'FP rate':>8}"]
    for key, v in summary.items():
        fp = "-" if v.get("fp_rate") is None else f"{v['fp_rate']:.3f}"
        lines.append(f"{key:<28} {v['n']:>5} {v['dice']:>7.4f} {v['iou']:>7.4f} {v['hd95']:>7.2f} "
                     f"{v.get('n_without', 0):>8} {fp:>8}")
    return "\n".join(lines)
