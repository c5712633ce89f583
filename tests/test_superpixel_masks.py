"""utils.superpixel_masks: Felzenszwalb superpixel label maps and the resumable CLI."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from utils.io import read_label
from utils.superpixel_masks import (SuperpixelParams, boundary_counts, main, merge_segments, relabel_sequential,
                                    superpixel_labels)


def _blocks(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Four flat quadrants of different grey + mild noise (RGB uint8)."""
    img = np.zeros((h, w), np.float64)
    img[: h // 2, : w // 2], img[: h // 2, w // 2:] = 20, 90
    img[h // 2:, : w // 2], img[h // 2:, w // 2:] = 160, 230
    img += np.random.default_rng(seed).normal(0, 2, img.shape)
    return np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_relabel_and_boundaries():
    seg = np.array([[5, 5, 9], [7, 7, 9]])
    assert relabel_sequential(seg).tolist() == [[1, 1, 2], [3, 3, 2]]
    assert boundary_counts(seg) == {(5, 9): 1, (5, 7): 2, (7, 9): 1}


def test_merge_small_into_longest_border():
    seg = np.zeros((6, 6), np.int64)
    seg[:, 3:] = 1
    seg[0, 2] = 2  # one pixel touching 0 on 2 edges (left, below) and 1 on 1 edge (right)
    out = merge_segments(seg, min_pixels=2, max_segments=10)
    assert out.max() == 2 and out[0, 2] == out[0, 0]
    # the cap merges the smallest segments until K fits
    many = np.arange(36).reshape(6, 6) // 3  # 12 strips of 3 pixels
    assert merge_segments(many, 0, 4).max() == 4


def test_superpixels_find_the_quadrants():
    img = _blocks()
    lab = superpixel_labels(img, SuperpixelParams(scale=30, min_area=0.05, work_size=0))
    assert lab.dtype == np.uint8 and lab.shape == img.shape[:2]
    assert lab.min() == 1 and lab.max() == 4
    assert len({int(lab[5, 5]), int(lab[5, -5]), int(lab[-5, 5]), int(lab[-5, -5])}) == 4
    # working-size shrink keeps the image's own size and contiguous ids
    lab2 = superpixel_labels(img[..., 0], SuperpixelParams(scale=30, min_area=0.05, work_size=24))
    assert lab2.shape == img.shape[:2] and set(np.unique(lab2)) == set(range(1, lab2.max() + 1))


def test_cap_and_param_checks():
    noise = np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)
    lab = superpixel_labels(noise, SuperpixelParams(scale=1, min_area=0.0, max_segments=5, work_size=0))
    assert 1 <= lab.max() <= 5
    assert superpixel_labels(np.zeros((10, 12), np.uint8)).tolist() == np.ones((10, 12)).tolist()
    with pytest.raises(ValueError, match="max_segments"):
        superpixel_labels(noise, SuperpixelParams(max_segments=300))


def test_cli_layout_resume_and_bad_image(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "SubA" / "img" / "nested").mkdir(parents=True)
    cv2.imwrite(str(data / "SubA" / "img" / "a.png"), _blocks())
    cv2.imwrite(str(data / "SubA" / "img" / "nested" / "b.jpg"), _blocks(seed=1))
    (data / "SubA" / "img" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["--data_dir", str(data), "--out_dir", str(out), "--work_size", "0"]) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err
    a, b = out / "SubA" / "label" / "a.png", out / "SubA" / "label" / "nested" / "b.png"
    assert a.is_file() and b.is_file() and not (out / "SubA" / "label" / "broken.png").exists()
    assert read_label(a).shape == (48, 64) and read_label(a).min() >= 1
    assert "broken.png" in (out / "bad_images_superpixel.txt").read_text()
    assert json.loads((out / "superpixel_params.json").read_text())["work_size"] == 0
    mtime = a.stat().st_mtime_ns
    assert main(["--data_dir", str(data), "--out_dir", str(out)]) == 0
    assert a.stat().st_mtime_ns == mtime and "2 already done" in capsys.readouterr().out
    assert main(["--data_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path / 'nope'}: folder not found" in err


def test_labels_feed_generate_masks_pkls(tmp_path):
    from utils.generate_masks_pkls import generate
    from utils.io import safe_pickle_load

    sub = tmp_path / "train" / "S"
    (sub / "img").mkdir(parents=True)
    cv2.imwrite(str(sub / "img" / "x.png"), _blocks())
    assert main(["--data_dir", str(tmp_path / "train"), "--work_size", "0", "--min_area", "0.05"]) == 0
    report = generate(tmp_path)
    assert report.written == 1
    pairs = safe_pickle_load(tmp_path / "train_tf_img_to_gt.pkl")
    assert safe_pickle_load(tmp_path / pairs[0][1]).max() == 4
