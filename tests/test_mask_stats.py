"""pretraining/mask_stats.py against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretraining.mask_stats import (c5_survivors, centroid_spread, frame_stats, resnet_grid_sizes, summarise,
                                    vertical_centroid, view_label)


def hand_map() -> np.ndarray:
    """112 x 112 (the view size, so no resizing) with C5 cells of 28 x 28 px:
    1 = top half (owns C5 rows 0-1); 2 = a 4 x 4 px speck in a background cell (owns none);
    3 = exactly C5 cell (2, 0); in cell (3, 3) 4 covers 12/28 of the columns, 5 covers
    10/28 and background 6/28: 4 has the largest share though not a majority, so it owns
    the cell, and 5 owns none."""
    lab = np.zeros((112, 112), np.uint8)
    lab[:56] = 1
    lab[60:64, 60:64] = 2
    lab[56:84, :28] = 3
    lab[84:, 84:96] = 4
    lab[84:, 96:106] = 5
    return lab


@pytest.mark.parametrize("view", [112, 224, 100])
def test_grid_sizes_match_the_real_backbone(view):
    # a wrong ResNet stride/padding rule would pool the masks onto the wrong grid
    from models.backbone import MultiScaleEncoder
    with torch.no_grad():
        out = MultiScaleEncoder().eval()(torch.zeros(1, 3, view, view))
    assert {k: v.shape[-1] for k, v in out.items()} == resnet_grid_sizes(view)
    assert resnet_grid_sizes(112) == {"p2": 28, "p3": 14, "p4": 7, "c5": 4}


def test_c5_survivors_follow_the_pretraining_rule():
    # the speck and the runner-up of a shared cell own no C5 cell; a plurality (not a
    # majority) wins its cell, as models.losses.label_grids' argmax does
    assert c5_survivors(hand_map(), 112) == {1, 3, 4}


def test_view_label_is_the_pretraining_resize():
    # a label larger than the view is shrunk (nearest) before pooling: 2x the hand map
    # gives the same survivors, and a 1:4 map keeps its left/right halves
    big = np.kron(hand_map(), np.ones((2, 2), np.uint8))
    assert c5_survivors(big, 112) == {1, 3, 4}
    wide = np.zeros((56, 224), np.uint8)
    wide[:, 112:] = 2
    small = view_label(wide, 112)
    assert small.shape == (112, 112) and (small[:, :56] == 0).all() and (small[:, 56:] == 2).all()


def test_frame_stats_hand_values():
    s = frame_stats(hand_map(), 112)
    n = 112 * 112
    assert s["fires"] and s["regions"] == 5 and s["c5_regions"] == 3
    expected = {1: 56 * 112 / n, 2: 16 / n, 3: 28 * 28 / n, 4: 28 * 12 / n, 5: 28 * 10 / n}
    assert s["shares"].keys() == expected.keys()
    for k, v in expected.items():
        assert s["shares"][k] == pytest.approx(v)
    assert s["total_share"] == pytest.approx(sum(expected.values()))


def test_frame_stats_of_an_empty_map():
    # a source that does not fire: no regions, no survivors, share 0 (not a crash on argmax)
    s = frame_stats(np.zeros((40, 30), np.uint8))
    assert s == {"fires": False, "regions": 0, "shares": {}, "total_share": 0.0, "c5_regions": 0,
                 "scale_regions": {"p2": 0, "p3": 0, "p4": 0, "c5": 0}}


def test_summarise_hand_values():
    s = summarise([frame_stats(hand_map()), frame_stats(np.zeros((10, 10), np.uint8))])
    assert s["frames"] == 2 and s["fires"] == 0.5
    assert s["regions_per_frame"]["mean"] == 2.5
    assert s["regions_per_frame"]["std"] == pytest.approx(math.sqrt(2 * 2.5 ** 2))  # ddof 1
    assert s["region_share"]["n"] == 5
    # pooled over regions (3 of 5), and per frame only over frames that fire (one: 3/5)
    assert s["c5_survival"] == {"share": 0.6, "regions": 5, "c5_regions": 3}
    assert s["c5_survival_per_frame"] == {"mean": 0.6, "std": 0.0, "n": 1}
    assert s["total_share"]["mean"] == pytest.approx(frame_stats(hand_map())["total_share"] / 2)


def test_centroid_spread_hand_values():
    a, b, c = (np.zeros((10, 10), np.uint8) for _ in range(3))
    a[2] = 7           # centroid (2 + 0.5) / 10 = 0.25
    b[4] = 7           # 0.45
    c[6] = 3           # region 7 absent: not a frame of the spread
    assert vertical_centroid(a, 7) == pytest.approx(0.25) and vertical_centroid(c, 7) is None
    r = centroid_spread([a, b, c], 7)
    assert r["std"] == pytest.approx(0.1) and r["present"] == 2 and r["frames"] == 3
    assert centroid_spread([a, c], 7)["std"] is None   # one frame: no spread to speak of


def test_survival_per_scale_hand_values():
    """64 px view (grids P2 16, P3 8, P4 4, C5 2): a 4 x 4 px region aligned with one P2 cell owns
    that cell and nothing coarser; a 16 x 16 px region owns P2..P4 cells but no C5 cell (a C5 cell
    is 32 x 32 px, where background wins); a 32 x 32 region owns one cell of every grid."""
    label = np.zeros((64, 64), np.int64)
    label[:4, :4] = 1
    label[32:48, 32:48] = 2
    label[:32, 32:] = 3
    s = frame_stats(label, view=64)
    assert s["scale_regions"] == {"p2": 3, "p3": 2, "p4": 2, "c5": 1} and s["c5_regions"] == 1
    summary = summarise([s, frame_stats(np.zeros((64, 64), np.int64), view=64)])
    assert summary["survival"] == pytest.approx({"p2": 1.0, "p3": 2 / 3, "p4": 2 / 3, "c5": 1 / 3})
