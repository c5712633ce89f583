"""Figures of the pre-training logs and evaluation results (matplotlib, Agg backend).

* :func:`plot_loss_curves` — one panel per loss term of a ``pretrain_aclus.py`` run
  (``contrast`` / ``regression`` / ``context``, one line per scale c5/p4/p3/p2, plus the
  total ``loss``), read from its ``log.jsonl``.
* :func:`plot_method_losses` — the total loss of several runs on one axis.
* :func:`plot_results_bar` — mean ± std of a metric per method (e.g. accuracy over folds).
* :func:`plot_mask_overlays` — a grid of images with their label maps overlaid.

``log.jsonl`` holds one JSON object per line: ``kind: "step"`` records (``epoch``, ``step``,
``lr``, ``momentum`` and one float per term, e.g. ``contrast/c5``, ``context/p2``, ``loss``)
and ``kind: "epoch"`` records (epoch means of the same terms, ``seconds``). The parsing
functions are pure; the ``plot_*`` functions only write the PNG they are given.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

# keys of a log record that are not loss terms
NON_TERM_KEYS = frozenset({"kind", "epoch", "step", "lr", "momentum", "seconds"})
SCALE_ORDER = ("c5", "p4", "p3", "p2")


class LogError(ValueError):
    """A log file that cannot be plotted; the message names the file."""


def parse_log_lines(lines: Iterable[str], source: str = "<log>") -> list[dict]:
    """JSON records of a ``log.jsonl``; blank lines are skipped, a torn last line is ignored."""
    lines = [ln for ln in lines if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run killed mid-write leaves a partial last line
                break
            raise LogError(f"{source}: line {i + 1} is not JSON") from None
        if not isinstance(rec, dict):
            raise LogError(f"{source}: line {i + 1} is not a JSON object")
        records.append(rec)
    return records


def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise LogError(f"{path}: log file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise LogError(f"{path}: not a text file (expected JSON lines)") from None
    return parse_log_lines(text.splitlines(), str(path))


def term_series(records: Sequence[dict], kind: str = "step") -> "OrderedDict[str, tuple[np.ndarray, np.ndarray]]":
    """``{term: (x, values)}`` for every numeric loss term of the records of ``kind``.

    x is ``step`` for step records and ``epoch`` for epoch records. If the same x occurs
    twice (a resumed run repeats the steps after its last checkpoint), the last value wins.
    """
    xkey = "step" if kind == "step" else "epoch"
    per_term: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.get("kind") != kind or xkey not in rec:
            continue
        for k, v in rec.items():
            if k in NON_TERM_KEYS or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            per_term.setdefault(k, {})[int(rec[xkey])] = float(v)
    out = OrderedDict()
    for k in sorted(per_term, key=_term_sort_key):
        xs = np.array(sorted(per_term[k]), dtype=np.int64)
        out[k] = (xs, np.array([per_term[k][x] for x in xs], dtype=np.float64))
    return out


def _term_sort_key(term: str) -> tuple:
    group, _, scale = term.partition("/")
    rank = SCALE_ORDER.index(scale) if scale in SCALE_ORDER else len(SCALE_ORDER)
    return (group == "loss", group, rank, scale)


def group_terms(terms: Iterable[str]) -> "OrderedDict[str, list[str]]":
    """Terms by panel: ``contrast/c5`` -> panel ``contrast``; ``loss`` -> panel ``loss``."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for t in sorted(terms, key=_term_sort_key):
        groups.setdefault(t.partition("/")[0], []).append(t)
    return groups


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what exists)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | os.PathLike) -> Path:
    """Lay out, write atomically (a reader never sees a half-written figure) and close ``fig``."""
    from utils.io import atomic_write

    fig.tight_layout()
    out = Path(out_png)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    _pyplot().close(fig)
    return out


def plot_loss_curves(log_jsonl_path: str | os.PathLike, out_png: str | os.PathLike,
                     title: str | None = None, smooth_window: int = 0) -> Path:
    """One panel per loss term (lines per scale) of a pre-training ``log.jsonl``.

    Step records are plotted against the step; a log without step records falls back to
    its epoch means. ``smooth_window`` > 1 draws a moving average over the raw curve.
    """
    records = read_log(log_jsonl_path)
    kind = "step" if any(r.get("kind") == "step" for r in records) else "epoch"
    series = term_series(records, kind)
    if not series:
        raise LogError(f"{log_jsonl_path}: no loss terms in {len(records)} records")
    groups = group_terms(series)
    plt = _pyplot()
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), dpi=110, squeeze=False)
    for ax, (group, terms) in zip(axes[0], groups.items()):
        for t in terms:
            x, y = series[t]
            label = t.partition("/")[2] or t
            if smooth_window > 1:
                line, = ax.plot(x, y, alpha=0.25, lw=0.8)
                ax.plot(x, smooth(y, smooth_window), color=line.get_color(), lw=1.4, label=label)
            else:
                ax.plot(x, y, lw=1.2, marker="." if len(x) < 30 else None, label=label)
        ax.set_title(group)
        ax.set_xlabel(kind)
        ax.grid(alpha=0.3)
        if len(terms) > 1 or terms[0] != group:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out_png)


def plot_method_losses(logs: dict[str, str | os.PathLike], out_png: str | os.PathLike,
                       term: str = "loss", title: str | None = None, smooth_window: int = 0) -> Path:
    """``term`` (default: the total loss) of several runs, ``{label: log.jsonl}``, on one axis.

    Logs that are missing or lack the term are left out; none usable is a :class:`LogError`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    drawn = 0
    for label, path in logs.items():
        try:
            series = term_series(read_log(path), "step")
        except LogError:
            continue
        if term not in series:
            continue
        x, y = series[term]
        ax.plot(x, smooth(y, smooth_window) if smooth_window > 1 else y, lw=1.2, label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise LogError(f"no log among {list(map(str, logs.values()))} has the term '{term}'")
    ax.set_xlabel("step")
    ax.set_ylabel(term)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out_png)


def plot_results_bar(labels: Sequence[str], means: Sequence[float], stds: Sequence[float],
                     out_png: str | os.PathLike, ylabel: str = "accuracy",
                     title: str | None = None) -> Path:
    """Bars of ``means`` with ± ``stds`` error bars, one per label (NaN = no bar)."""
    if not (len(labels) == len(means) == len(stds)) or not labels:
        raise ValueError(f"{out_png}: labels, means and stds must be non-empty and of equal length")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 1.5), 3.6), dpi=110)
    x = np.arange(len(labels))
    m = np.array([v if v is not None else math.nan for v in means], dtype=float)
    s = np.array([v if v is not None else math.nan for v in stds], dtype=float)
    ax.bar(x, np.nan_to_num(m), yerr=np.nan_to_num(s), capsize=4, color="#4c72b0")
    for xi, mi in zip(x, m):
        if math.isfinite(mi):
            ax.text(xi, mi, f"{mi:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    finite = m[np.isfinite(m)]
    if finite.size and finite.max() <= 1.0:
        ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out_png)


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], out_png: str | os.PathLike,
                   title: str | None = None) -> Path:
    """A confusion matrix (rows = true, columns = predicted) with its counts written in."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=8)
    return _save(fig, out_png)


#: RGB colour of anatomy id k at PALETTE[(k - 1) % len(PALETTE)]
PALETTE = np.array([[255, 64, 64], [64, 255, 64], [64, 128, 255], [255, 255, 0], [255, 0, 255],
                    [0, 255, 255], [255, 128, 0], [128, 0, 255]], dtype=np.uint8)


def overlay_labels(image: np.ndarray, label: np.ndarray, alpha: float = 0.45,
                   outline: bool = False) -> np.ndarray:
    """RGB uint8 image with each non-zero id of ``label`` tinted in its ``PALETTE`` colour,
    and with ``outline`` also traced in it (pure)."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    out = image[..., :3].astype(np.uint8)  # a copy
    for k in np.unique(label[label != 0]):
        m = label == k
        colour = PALETTE[(int(k) - 1) % len(PALETTE)]
        out[m] = ((1 - alpha) * out[m] + alpha * colour).astype(np.uint8)
        if outline:
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
    return out


def plot_mask_overlays(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                       out_png: str | os.PathLike, titles: Sequence[str] | None = None,
                       cols: int = 4, suptitle: str | None = None) -> Path:
    """A grid of RGB/grey images with their label maps overlaid (see :func:`overlay_labels`)."""
    if len(images) != len(labels) or not images:
        raise ValueError(f"{out_png}: need as many label maps as images (got {len(images)} and {len(labels)})")
    plt = _pyplot()
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), dpi=110, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(overlay_labels(images[k], labels[k], outline=True))  # outlines: the palette repeats
            if titles:
                ax.set_title(titles[k], fontsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save(fig, out_png)


def plot_image_grid(images: Sequence[np.ndarray], out_png: str | os.PathLike,
                    titles: Sequence[str] | None = None, cols: int = 4, suptitle: str | None = None,
                    tile_inches: float = 2.0, dpi: int = 110) -> Path:
    """A grid of ready-made RGB/grey uint8 images (e.g. Grad-CAM overlays), one title each."""
    if not images or (titles is not None and len(titles) != len(images)):
        raise ValueError(f"{out_png}: need at least one image and one title per image "
                         f"(got {len(images)} images, {None if titles is None else len(titles)} titles)")
    plt = _pyplot()
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(tile_inches * cols, (tile_inches + 0.3) * rows), dpi=dpi,
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], cmap="gray" if images[k].ndim == 2 else None)
            if titles:
                ax.set_title(titles[k], fontsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    return _save(fig, out_png)


def montage(tiles: list[np.ndarray], tile: int = 192, cols: int = 4) -> np.ndarray:
    """RGB tiles of any size -> one RGB grid image, each tile letterboxed to tile x tile."""
    rows = (len(tiles) + cols - 1) // cols
    grid = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    for i, t in enumerate(tiles):
        s = tile / max(t.shape[:2])
        r = cv2.resize(t, (max(1, round(t.shape[1] * s)), max(1, round(t.shape[0] * s))),
                       interpolation=cv2.INTER_AREA)
        y, x = (i // cols) * tile, (i % cols) * tile
        grid[y:y + r.shape[0], x:x + r.shape[1]] = r
    return grid
