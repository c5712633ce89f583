"""'No such anatomy here' is an answer: empty targets in A-SAM training and evaluation."""
from __future__ import annotations

import numpy as np
import pytest

from SAM.samus_data import SAMUSDataset, SplitLine, negative_lines, read_split
from SAM.seg_metrics import MetricTable
from utils.synthetic_us import write_samus_layout


def test_empty_ground_truth_gives_a_false_positive_rate_not_a_dice():
    t = MetricTable()
    gt = np.zeros((8, 8), bool)
    gt[2:5, 2:5] = True
    t.add("A/1", gt, gt)                                   # perfect on an image with the anatomy
    t.add("A/1", np.zeros_like(gt), np.zeros_like(gt))     # silent where it is absent
    t.add("A/1", gt, np.zeros_like(gt))                    # fires where it is absent
    s = t.summary()["A/1"]
    assert s["dice"] == 1.0 and s["n"] == 1                # empty cases stay out of Dice
    assert s["n_without"] == 2 and s["fp_rate"] == 0.5
    assert s["fp_area"] == pytest.approx((0 + 9 / 64) / 2)  # silent: 0; fires: 9 of 64 pixels
    t2 = MetricTable()
    t2.add("B/1", np.zeros_like(gt), np.zeros_like(gt))     # a prompt that never fires gets no Dice of 1
    assert np.isnan(t2.summary()["B/1"]["dice"]) and t2.summary()["B/1"]["fp_rate"] == 0.0


def test_negative_lines_pair_images_with_other_data_sets_prompts_only():
    lines = [SplitLine(1, "A", f"a{i}") for i in range(4)] + [SplitLine(c, "B", f"b{i}") for i in range(3)
                                                              for c in (1, 2)]
    keys = ["A/1", "B/1", "B/2"]
    neg = negative_lines(lines, keys, rate=0.5, seed=0)
    assert len(neg) == 5 and all(l.negative for l in neg)
    assert all(l.prompt_key.split("/")[0] != l.dataset for l in neg)
    assert negative_lines(lines, keys, rate=0.5, seed=0) == neg
    every = negative_lines(lines, keys, rate=100.0)       # all foreign pairs: 4 x 2 + 3 x 1
    assert len(every) == 11 and len(set(every)) == 11
    only_a = negative_lines(lines, ["A/1"], rate=1.0)      # A's prompt on B's 3 images, nothing else
    assert len(only_a) == 3 and {l.dataset for l in only_a} == {"B"}


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory):
    return write_samus_layout(tmp_path_factory.mktemp("seg") / "seg", n_images=6, size=48, seed=0)


def test_negative_items_have_empty_targets_and_a_foreign_prompt(seg_root):
    keys = sorted({l.prompt_key for l in read_split(seg_root, "train")})
    ds = SAMUSDataset(seg_root, "train", 64, 16, keys, augment=True, return_orig=True, negative_rate=1.0)
    negs = [i for i, l in enumerate(ds.lines) if l.negative]
    assert negs
    for i in negs[:4]:
        item, line = ds[i], ds.lines[i]
        assert item["low_mask"].sum() == 0 and item["orig_mask"].sum() == 0
        assert keys[int(item["prompt_idx"])] == line.prompt_key != f"{line.dataset}/{line.class_id}"
        assert int(item["point_label"][0]) == -1            # nothing to click


def test_a_split_line_whose_anatomy_is_absent_is_accepted(seg_root, tmp_path):
    import shutil

    root = tmp_path / "seg"
    shutil.copytree(seg_root, root)
    line = read_split(root, "train")[0]
    lab = root / line.dataset / "label" / f"{line.name}.png"
    import cv2
    cv2.imwrite(str(lab), np.zeros_like(cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)))
    keys = sorted({l.prompt_key for l in read_split(root, "train")})
    ds = SAMUSDataset(root, "train", 64, 16, keys)
    item = ds[0]
    assert item["mask"].sum() == 0 and float(item["box"].sum()) == 0.0
