#!/usr/bin/env python
"""Draw the ACLUS pipeline diagram of the README: ``python figs/draw_pipeline.py``.

Writes ``figs/pipeline.png`` (boxes = stages with their script, arrows = what flows
between them). Pure matplotlib; rerun after changing a stage name or script.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# (column, row, title, script, colour); rows: 1 = segmentation branch, 0 = pre-training branch
STAGES = [
    (0, 1, "0  ultrasound scans", "SAMUS layout sets\nsynthetic_us, extract_frames", "#dfe7f2"),
    (1, 1, "1  A-SAM stage 1", "SAM/only_train_sam.py\nadapters, click prompts", "#f6e3c8"),
    (2, 1, "2  A-SAM stage 2", "SAM/train_auto_prompter.py\nauto-prompter + decoder", "#f6e3c8"),
    (3, 1, "3  mask inference", "SAM/infer_masks.py\nprompt-free anatomy masks", "#f6e3c8"),
    (3, 0, "4  mask pickles", "utils/generate_masks_pkls.py", "#dfe7f2"),
    (2, 0, "5  ACLUS pre-training", "pretrain_aclus.py\nResNet-18 + FPN, DetCon + context", "#d7ecd9"),
    (1, 0, "6  POCUS evaluation", "evaluation_aclus.py\n5-fold linear / fine-tune", "#e8dcf0"),
]
# (from, to, label)
FLOWS = [
    (0, 1, "labelled\nimages"),
    (1, 2, "stage-1\ncheckpoint"),
    (2, 3, "stage-2\ncheckpoint"),
    (3, 4, "label/*.png"),
    (4, 5, "masks/\n*.pkl"),
    (5, 6, "encoder_\nresnet18.pth"),
]
W, H = 3.0, 1.1   # box size in data units


def centre(i: int) -> tuple[float, float]:
    col, row = STAGES[i][:2]
    return col * 4.0, row * 2.4


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(15, 5.0))
    for i, (_, _, title, script, colour) in enumerate(STAGES):
        x, y = centre(i)
        ax.add_patch(FancyBboxPatch((x - W / 2, y - H / 2), W, H, boxstyle="round,pad=0.05,rounding_size=0.12",
                                    fc=colour, ec="#444", lw=1.2))
        ax.text(x, y + 0.25, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x, y - 0.18, script, ha="center", va="center", fontsize=8, family="monospace")
    for a, b, label in FLOWS:
        (xa, ya), (xb, yb) = centre(a), centre(b)
        if ya == yb:  # horizontal: leave from the side facing the target
            sign = 1 if xb > xa else -1
            start, end = (xa + sign * W / 2, ya), (xb - sign * W / 2, yb)
            text_at, va = ((xa + xb) / 2, ya + 0.08), "bottom"
        else:         # vertical, down
            start, end = (xa, ya - H / 2), (xb, yb + H / 2)
            text_at, va = (xa + 0.1, (ya + yb) / 2), "center"
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#333"))
        ax.text(*text_at, label, ha="left" if ya != yb else "center", va=va, fontsize=8, style="italic")
    # unlabeled scans enter at mask inference (and, with their masks, pre-training)
    x3, y3 = centre(3)
    ax.add_patch(FancyArrowPatch((x3, y3 + H / 2 + 0.75), (x3, y3 + H / 2), arrowstyle="-|>",
                                 mutation_scale=14, lw=1.3, color="#333"))
    ax.text(x3, y3 + H / 2 + 0.8, "unlabeled scans (COVID-BLUES frames, synthetic)", ha="center",
            va="bottom", fontsize=9)
    ax.set_xlim(-1.7, 3 * 4.0 + 1.7)
    ax.set_ylim(-0.9, 3.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("ACLUS: A-SAM masks anatomy without prompts; a ResNet-18 is pre-trained on those anatomies",
                 fontsize=12, pad=22)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "pipeline.png"))
    print(draw(Path(p.parse_args().out)))
