"""Crop geometry, views, Models-Genesis damage, sampler and the mask-pickle tool."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pretraining.context_damage import (bezier_intensity_remap, context_damage, inpaint_blocks, local_pixel_shuffle,
                                        outpaint_blocks)
from pretraining.data import (AnatomyPairDataset, EpochSampler, load_pairs, make_views, overlap_box,
                              random_resized_crop_box)
from utils.generate_masks_pkls import generate
from utils.io import DataError, safe_pickle_load


# ------------------------------------------------------------------ geometry
@pytest.mark.parametrize("a, b, expected", [
    ((10, 20, 110, 220), (50, 0, 200, 100), (50, 20, 110, 100)),   # partial overlap
    ((0, 0, 100, 100), (20, 30, 60, 70), (20, 30, 60, 70)),        # b inside a
    ((0, 0, 50, 50), (50, 0, 100, 50), None),                       # touching edges only
    ((0, 0, 50, 50), (60, 60, 90, 90), None),                       # disjoint
    ((0, 0, 50, 50), (45, 0, 100, 50), None),                       # 5 px sliver < min size 8
])
def test_overlap_box_against_hand_computed_boxes(a, b, expected):
    assert overlap_box(a, b) == expected


def test_overlap_box_is_not_top_left_height_width():
    # upstream read (top, left, h, w) as (x1, y1, x2, y2); with x1, y1, x2, y2 the
    # overlap of these two boxes is 30 x 10 px at (40, 50)
    assert overlap_box((10, 50, 70, 200), (40, 0, 100, 60)) == (40, 50, 70, 60)


def test_random_resized_crop_box_in_bounds_and_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, y1, x2, y2 = random_resized_crop_box(rng, 90, 120, (0.2, 1.0))
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 90
        assert (x2 - x1) * (y2 - y1) <= 90 * 120


def test_context_view_shows_only_anatomy_seen_by_both_views():
    # 48 x 48 image of 8 x 8 blocks with distinct ids; views are 64 px (upsampling),
    # so nearest resizing keeps every block a crop touches
    yy, xx = np.mgrid[0:48, 0:48]
    mask = (yy // 8) * 6 + xx // 8 + 1
    image = np.repeat((mask * 6).astype(np.uint8)[..., None], 3, axis=2)
    seen_overlap = 0
    for seed in range(30):
        v = make_views(image, mask, np.random.default_rng(seed), 64, (0.3, 1.0), with_context=True)
        ids1, ids2 = set(v["mask1"].unique().tolist()), set(v["mask2"].unique().tolist())
        if bool(v["ctx_valid"]):
            seen_overlap += 1
            assert set(v["ctx_mask"].unique().tolist()) <= ids1 & ids2
        assert v["view1"].shape == (3, 64, 64) and v["mask1"].dtype == torch.int64
        assert v["ctx_clean"].shape == v["ctx_damaged"].shape == (3, 64, 64)
    assert seen_overlap > 10


def test_views_are_deterministic_per_seed():
    rng_img = np.random.default_rng(0)
    image = rng_img.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    mask = (rng_img.random((40, 50)) > 0.5).astype(np.int64)
    a = make_views(image, mask, np.random.default_rng(5), 32, (0.2, 1.0), True)
    b = make_views(image, mask, np.random.default_rng(5), 32, (0.2, 1.0), True)
    c = make_views(image, mask, np.random.default_rng(6), 32, (0.2, 1.0), True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["view1"], c["view1"])


# ------------------------------------------------------------------ damage
@pytest.mark.parametrize("fn", [bezier_intensity_remap, local_pixel_shuffle, inpaint_blocks, outpaint_blocks,
                                context_damage])
def test_damage_keeps_shape_range_and_changes_image(fn):
    rng = np.random.default_rng(0)
    img = np.linspace(0, 1, 3 * 40 * 40, dtype=np.float32).reshape(3, 40, 40)
    out = fn(img, rng)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.array_equal(out, img)


def test_context_damage_follows_models_genesis_order():
    # shuffle -> Bezier remap -> painting, each gated by one draw of the same generator
    img = np.random.default_rng(0).random((3, 24, 24)).astype(np.float32)
    out = context_damage(img, np.random.default_rng(9), p_shuffle=1.0, p_nonlinear=1.0, p_paint=1.0)
    rng = np.random.default_rng(9)
    rng.random()
    ref = local_pixel_shuffle(img, rng)
    rng.random()
    ref = bezier_intensity_remap(ref, rng)
    rng.random()
    rng.random()  # in- or out-painting
    ref = inpaint_blocks(ref, rng)
    assert np.array_equal(out, np.clip(ref, 0, 1))


def test_context_damage_probabilities():
    # with a constant image: the remap changes the value, painting adds noise, shuffling nothing
    img = np.full((1, 12, 12), 0.3, np.float32)
    n, remapped, painted = 600, 0, 0
    rng = np.random.default_rng(1)
    for _ in range(n):
        out = context_damage(img, rng)
        values = np.unique(out)
        remapped += not np.isclose(np.median(out), 0.3)
        painted += len(values) > 2
    assert abs(remapped / n - 0.9) < 0.05 and abs(painted / n - 0.9) < 0.05


def test_outpainting_keeps_windows_of_the_image():
    img = np.full((1, 28, 28), 0.5, np.float32)
    out = outpaint_blocks(img, np.random.default_rng(3))
    kept = np.isclose(out, 0.5).mean()
    assert 0.15 < kept < 0.9  # at least one 3/7-4/7 window; noise elsewhere


def test_local_pixel_shuffle_only_permutes_values():
    rng = np.random.default_rng(1)
    img = rng.random((1, 30, 30)).astype(np.float32)
    out = local_pixel_shuffle(img, rng, num_blocks=1)
    assert np.allclose(np.sort(out.ravel()), np.sort(img.ravel()))


# ------------------------------------------------------------------ sampler
def test_epoch_sampler_shards_cover_and_reshuffle():
    shards = [list(EpochSampler(10, rank=r, world_size=3, seed=0)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to equal length
    assert {i for s in shards for i, _ in s} == set(range(10))
    s = EpochSampler(10, seed=0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e0] != [i for i, _ in e1] and {e for _, e in e1} == {1}
    s.set_epoch(0)
    assert list(s) == e0


# ------------------------------------------------------------------ mask pickles
def test_generate_masks_pkls_writes_integer_maps_and_pairs(synthetic_pretrain_dir):
    pairs = load_pairs(synthetic_pretrain_dir)
    assert len(pairs) == 24
    from utils.io import read_label
    img, mask_path = pairs[0]
    mask = safe_pickle_load(mask_path)
    assert np.issubdtype(mask.dtype, np.integer) and mask.max() >= 3  # several anatomies kept
    label = read_label(img.parent.parent / "label" / (img.stem + ".png"))
    assert np.array_equal(mask, label)


def test_generate_masks_pkls_reports_bad_files_and_skips_done(tmp_path):
    from utils.synthetic_us import write_pretrain_layout

    write_pretrain_layout(tmp_path, n_images=4, size=32, seed=1, subsets=("SubA",))
    lab_dir, img_dir = tmp_path / "train/SubA/label", tmp_path / "train/SubA/img"
    (img_dir / "syn_00001.png").write_bytes(b"not a png")                       # corrupt image
    import cv2
    cv2.imwrite(str(lab_dir / "syn_00002.png"), np.zeros((32, 32), np.uint8))  # empty mask
    (lab_dir / "syn_00003.png").unlink()                                        # no label
    report = generate(tmp_path)
    assert report.written == 1
    assert len(report.problems["unreadable files"]) == 1 and "syn_00001" in report.problems["unreadable files"][0]
    assert len(report.problems["empty masks"]) == 1 and "syn_00002" in report.problems["empty masks"][0]
    assert len(report.problems["images without a label"]) == 1
    assert "syn_00003" in report.summary()
    assert len(load_pairs(tmp_path)) == 1
    again = generate(tmp_path)  # re-run: the finished mask is kept, not rewritten
    assert again.written == 0 and again.kept == 1


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo owned",))

    bad = tmp_path / "masks.pkl"
    bad.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match="masks.pkl.*unsafe"):
        safe_pickle_load(bad)


def test_dataset_skips_unreadable_image_with_a_warning(synthetic_pretrain_dir, tmp_path, caplog):
    pairs = load_pairs(synthetic_pretrain_dir)[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    pairs[0] = (broken, pairs[0][1])
    ds = AnatomyPairDataset(pairs, size=32, seed=0)
    with caplog.at_level("WARNING"):
        item = ds[(0, 0)]
    assert item["view1"].shape == (3, 32, 32)
    assert "broken.png" in caplog.text


def test_mask_of_wrong_size_is_a_clear_error(synthetic_pretrain_dir, tmp_path):
    from utils.io import atomic_pickle_dump
    from utils.mask_layout import load_mask

    bad = tmp_path / "m.pkl"
    atomic_pickle_dump(np.zeros((5, 5), np.uint8), bad)
    with pytest.raises(DataError, match=r"m.pkl: mask size \(5, 5\) differs"):
        load_mask(bad, (48, 48))
