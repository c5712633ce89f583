"""utils.plots: log parsing (pure) and that each figure is written."""
from __future__ import annotations

import json

import numpy as np
import pytest

from utils.plots import (PALETTE, LogError, group_terms, overlay_labels, parse_log_lines, plot_loss_curves,
                         plot_mask_overlays, plot_method_losses, plot_results_bar, smooth, term_series)


def _log_lines(method: str = "aclus", steps: int = 6) -> list[str]:
    lines = []
    for s in range(steps):
        rec = {"kind": "step", "epoch": 1 + s // 3, "step": s, "lr": 0.1, "momentum": 0.99}
        for sc in ("c5", "p4", "p3", "p2"):
            rec[f"{'regression' if method == 'byol' else 'contrast'}/{sc}"] = 5.0 - 0.1 * s
            if method == "aclus":
                rec[f"context/{sc}"] = 1.0 - 0.05 * s
        rec["loss"] = 10.0 - s
        lines.append(json.dumps(rec))
        if s % 3 == 2:
            lines.append(json.dumps({"kind": "epoch", "epoch": 1 + s // 3, "seconds": 1.0, "loss": 9.0}))
    return lines


def test_term_series_and_groups():
    series = term_series(parse_log_lines(_log_lines()))
    assert list(series)[:4] == ["context/c5", "context/p4", "context/p3", "context/p2"]
    assert list(series)[-1] == "loss"
    x, y = series["loss"]
    assert x.tolist() == list(range(6)) and y[0] == 10.0
    assert list(group_terms(series)) == ["context", "contrast", "loss"]
    epochs = term_series(parse_log_lines(_log_lines()), "epoch")
    assert list(epochs) == ["loss"] and epochs["loss"][0].tolist() == [1, 2]


def test_resumed_steps_keep_last_value_and_torn_line_ignored():
    lines = [json.dumps({"kind": "step", "step": 0, "loss": 2.0}),
             json.dumps({"kind": "step", "step": 0, "loss": 1.0}), '{"kind": "st']
    series = term_series(parse_log_lines(lines))
    assert series["loss"][1].tolist() == [1.0]
    with pytest.raises(LogError, match="line 1"):
        parse_log_lines(["nope", "{}"], "x.jsonl")


def test_smooth():
    assert np.allclose(smooth(np.array([1.0, 3.0, 5.0]), 2), [1.0, 2.0, 4.0])
    assert np.allclose(smooth(np.array([1.0, 3.0]), 1), [1.0, 3.0])


def test_plots_written(tmp_path):
    logs = {}
    for m in ("aclus", "byol"):
        p = tmp_path / m / "log.jsonl"
        p.parent.mkdir()
        p.write_text("\n".join(_log_lines(m)) + "\n")
        logs[m] = p
        assert plot_loss_curves(p, tmp_path / f"{m}.png", title=m, smooth_window=3).stat().st_size > 0
    assert plot_method_losses(logs, tmp_path / "all.png").is_file()
    with pytest.raises(LogError, match="not found"):
        plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x80\xff\x00")
    with pytest.raises(LogError, match=f"{binary}: not a text file"):
        plot_loss_curves(binary, tmp_path / "x.png")
    with pytest.raises(LogError, match="has the term 'nope'"):
        plot_method_losses(logs, tmp_path / "x.png", term="nope")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="equal length"):
        plot_results_bar(["a", "b"], [0.5], [0.1], tmp_path / "x.png")
    assert plot_results_bar(["a", "b"], [0.5, float("nan")], [0.1, float("nan")], tmp_path / "bar.png").is_file()
    img = np.full((8, 8), 100, np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    lab[:4] = 1
    ov = overlay_labels(img, lab)
    assert ov.shape == (8, 8, 3) and (ov[4:] == 100).all() and not (ov[:4] == 100).all()
    lab[:4, 4:] = 2  # two ids get two colours, each a tint of the grey
    ov = overlay_labels(img, lab)
    assert (ov[0, 0] != ov[0, 4]).any() and (ov[:4, :4] == ov[0, 0]).all() and (ov[:4, 4:] == ov[0, 4]).all()
    edge = overlay_labels(img, lab, outline=True)  # outlines are drawn in the id's pure colour
    assert (edge[0, 0] == PALETTE[0]).all() and (edge[0, 4] == PALETTE[1]).all() and (edge[4:] == 100).all()
    assert plot_mask_overlays([img, img], [lab, lab], tmp_path / "ov.png", titles=["a", "b"]).is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def test_confusion_png_is_an_image_and_leaves_no_temp_file(tmp_path):
    import cv2

    from utils.plots import plot_confusion

    out = plot_confusion(np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]]), ("a", "b", "c"), tmp_path / "cm.png", "t")
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]
