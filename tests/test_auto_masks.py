"""SAM/auto_masks.py: prompts, filters, NMS and label-map rules on hand-made masks; the
wiring of one image through a box-echo stand-in for SAM; the script end to end on LiteMedSAM."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from SAM.auto_masks import (COUNTERS, SCORES_FILE, AutoMaskParams, auto_label_map, box_grid, main, nms_keep,
                            paint_label_map, quality_filter)


def rect(shape, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


# --------------------------------------------------------------------------- #
# pure parts
# --------------------------------------------------------------------------- #
def test_box_grid_counts_and_bounds():
    # 0.3 -> 6 x 6 half-overlapping boxes, 0.6 -> 3 x 3, 1.0 -> the whole content, coarse first
    boxes = box_grid(173, 256, (0.3, 0.6, 1.0))
    assert boxes.shape == (36 + 9 + 1, 4)
    assert torch.allclose(boxes[0], torch.tensor([0.0, 0.0, 256.0, 173.0]))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 256 + 1e-3).all() and (boxes[:, 3] <= 173 + 1e-3).all()
    # the finest boxes reach the far corner (a grid that stops short leaves a strip unprompted)
    assert torch.allclose(boxes[-1], torch.tensor([0.7 * 256, 0.7 * 173, 256.0, 173.0]), atol=1e-3)


def test_quality_filter_counts_each_mask_once():
    # mask 1 fails predicted IoU, mask 2 stability, mask 3 both: it counts under predicted
    # IoU only (SAM's order), so the counters add up to the masks removed
    keep, counts = quality_filter(torch.tensor([0.9, 0.5, 0.9, 0.1]), torch.tensor([0.9, 0.9, 0.5, 0.1]), 0.8, 0.8)
    assert keep.tolist() == [True, False, False, False]
    assert counts == {"removed_pred_iou": 2, "removed_stability": 1}


def test_nms_keeps_the_better_of_two_near_duplicates():
    shape = (20, 20)
    masks = torch.from_numpy(np.stack([rect(shape, 0, 10, 0, 10), rect(shape, 0, 10, 0, 9),
                                       rect(shape, 12, 20, 12, 20), np.zeros(shape, bool)]))
    keep = nms_keep(masks, torch.tensor([0.8, 0.9, 0.5, 0.99]), 0.7)
    # box IoU of the first two is 0.9: the lower-scored one goes; the empty mask (best
    # score) is never kept; best score first
    assert keep.tolist() == [1, 2]
    assert nms_keep(masks, torch.tensor([0.8, 0.9, 0.5, 0.99]), 0.95).tolist() == [1, 0, 2]


def test_label_map_small_on_top():
    # a small region inside a large one stays visible; the large one keeps the rest;
    # ids by area (1 = largest), whatever the input order
    big, small = rect((10, 10), 0, 10, 0, 10), rect((10, 10), 2, 5, 2, 5)
    lab = paint_label_map(np.stack([small, big]))
    want = np.ones((10, 10), np.uint8)
    want[2:5, 2:5] = 2
    assert lab.dtype == np.uint8 and np.array_equal(lab, want)


def test_label_map_large_on_top_hides_the_inner_region():
    big, small = rect((10, 10), 0, 10, 0, 10), rect((10, 10), 2, 5, 2, 5)
    lab = paint_label_map(np.stack([small, big]), small_on_top=False)
    # the small region has nothing visible left: dropped, not kept as an empty id
    assert np.array_equal(lab, np.ones((10, 10), np.uint8))


def test_label_map_drops_a_mostly_hidden_region_and_repaints():
    # c (20 px) is covered by the smaller d except one column (5 px visible) < min 6:
    # c is dropped, its column goes back to a beneath it (not to background), ids renumbered
    a, c, d = rect((10, 10), 0, 10, 0, 10), rect((10, 10), 0, 5, 0, 4), rect((10, 10), 0, 5, 0, 3)
    lab = paint_label_map(np.stack([a, c, d]), min_pixels=6)
    want = np.ones((10, 10), np.uint8)
    want[0:5, 0:3] = 2
    assert np.array_equal(lab, want)


def test_label_map_min_area_and_cap():
    shape = (10, 10)
    tiny, mid, big = rect(shape, 0, 1, 0, 2), rect(shape, 5, 8, 5, 8), rect(shape, 0, 4, 0, 10)
    # a 2-pixel mask below min 3 disappears; the others are 1..2 by area
    lab = paint_label_map(np.stack([tiny, mid, big]), min_pixels=3)
    assert set(np.unique(lab)) == {0, 1, 2} and (lab[0, :2] == 1).all() and (lab[5:8, 5:8] == 2).all()
    # the cap keeps the largest
    capped = paint_label_map(np.stack([tiny, mid, big]), max_regions=1)
    assert np.array_equal(capped, big.astype(np.uint8))
    assert paint_label_map(np.zeros((0, 4, 5), bool)).shape == (4, 5)


@pytest.mark.parametrize("kwargs", [dict(min_pred_iou=1.5), dict(min_stability=-0.1), dict(nms_iou=float("nan")),
                                    dict(min_area=1.0), dict(scales=()), dict(scales=(0.0,)), dict(max_regions=256)])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        AutoMaskParams(**kwargs).check()


# --------------------------------------------------------------------------- #
# one image through a stand-in for SAM: the mask of a box prompt is the box itself
# --------------------------------------------------------------------------- #
class BoxEcho(nn.Module):
    """img_size 32, low-res logits 32 x 32 (+4 inside the prompt box, -4 outside: stability
    1), predicted IoU ``iou`` for every prompt. Not SAM's decoder structure, so
    decode_low_res runs :meth:`decode`."""
    img_size, grid, low_res = 32, 8, 32

    def __init__(self, iou: float):
        super().__init__()
        self.iou = iou
        self.dummy = nn.Parameter(torch.zeros(1))

    def embed(self, images):
        return torch.zeros(images.shape[0], 256, self.grid, self.grid)

    def encode_prompts(self, boxes):
        sparse = torch.zeros(boxes.shape[0], 2, 256)
        sparse[:, 0, :4] = boxes
        return sparse

    def decode(self, emb, sparse, with_iou=False):
        ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
        b = sparse[:, 0, :4]
        inside = ((xs >= b[:, None, None, 0]) & (xs < b[:, None, None, 2])
                  & (ys >= b[:, None, None, 1]) & (ys < b[:, None, None, 3]))
        logits = torch.where(inside, 4.0, -4.0)[:, None]                     # N x 1 x 32 x 32
        return logits, torch.full((b.shape[0], 1), self.iou)


def test_whole_content_box_covers_the_letterboxed_image():
    # a 22 x 32 image is letterboxed into rows 0..21 of 32 (the decoder's rows come in
    # fours: 24): a mask read back without cropping the padding rows leaves the bottom
    # row(s) of the label map empty
    image = np.zeros((22, 32, 3), np.uint8)
    lab, counts = auto_label_map(BoxEcho(0.9), image, AutoMaskParams(scales=(1.0,)))
    assert lab.shape == (22, 32) and (lab == 1).all()
    assert counts == {"prompts": 1, "removed_pred_iou": 0, "removed_stability": 0, "removed_nms": 0,
                      "removed_small": 0, "regions": 1}


def test_low_predicted_iou_leaves_the_map_empty():
    lab, counts = auto_label_map(BoxEcho(0.5), np.zeros((24, 32, 3), np.uint8),
                                 AutoMaskParams(scales=(0.6, 1.0), min_pred_iou=0.6))
    assert not lab.any() and counts["removed_pred_iou"] == counts["prompts"] == 10 and counts["regions"] == 0


# --------------------------------------------------------------------------- #
# the script, end to end, on LiteMedSAM (bundled weights) and two small synthetic scans
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    from utils.io import atomic_write_png
    from utils.synthetic_scan import make_scan

    data = tmp_path_factory.mktemp("auto_masks") / "data"
    for seed, rel in ((0, "a.png"), (1, "clip/b.png")):
        atomic_write_png(make_scan(seed, size=(48, 64))[0], data / "Syn" / "img" / rel)
    return data


@pytest.mark.slow  # ~10 s on an idle 2-core CPU, 34 s measured under a load average of 9
def test_script_end_to_end_and_resume(scans, tmp_path, capsys, monkeypatch):
    from utils.io import read_label
    from utils.mask_layout import label_jobs

    out = tmp_path / "out"
    argv = ["--data_dir", str(scans), "--out_dir", str(out), "--scales", "0.6,1", "--montage", str(tmp_path / "m.png")]
    assert main(argv) == 0
    jobs = label_jobs(scans, out)       # the layout's own label paths, sub-folders kept
    assert [p.relative_to(out).as_posix() for _, p in jobs] == ["Syn/label/a.png", "Syn/label/clip/b.png"]
    summary = json.loads((out / SCORES_FILE).read_text())
    for img, lab_path in jobs:
        lab = read_label(lab_path)
        ids = sorted(set(np.unique(lab)) - {0})
        assert lab.shape == (48, 64) and ids == list(range(1, len(ids) + 1))   # 1..n, no gaps
        c = summary["images"][lab_path.relative_to(out).as_posix()]
        assert set(c) == set(COUNTERS) and c["prompts"] == 10 and c["regions"] == len(ids)
        assert c["prompts"] == c["removed_pred_iou"] + c["removed_stability"] + c["removed_nms"] \
            + c["removed_small"] + c["regions"]
    assert (tmp_path / "m.png").is_file()
    # resumable: existing labels are kept as they are, and the summary keeps their counts
    before = {p: p.stat().st_mtime_ns for _, p in jobs}
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 labels written" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for _, p in jobs} == before
    assert len(json.loads((out / SCORES_FILE).read_text())["images"]) == 2
    # a deleted label is made again, the other kept; '--montage none' writes no file 'none'
    monkeypatch.chdir(tmp_path)
    jobs[1][1].unlink()
    assert main(argv[:-2] + ["--montage", "none"]) == 0
    assert "1 labels written" in capsys.readouterr().out and jobs[1][1].is_file()
    assert jobs[0][1].stat().st_mtime_ns == before[jobs[0][1]] and not (tmp_path / "none").exists()


def test_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import SAM.segmenter

    monkeypatch.setattr(SAM.segmenter, "build_segmenter", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["--data_dir", str(tmp_path / "missing")]) == 2
    assert "folder not found" in capsys.readouterr().err
    (tmp_path / "empty" / "Sub" / "img").mkdir(parents=True)
    assert main(["--data_dir", str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["--data_dir", str(tmp_path), "--min_stability", "1.2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["auto_masks.py: error: min_stability must be in [0, 1], got 1.2"]
