"""utils.mask_layout: names and pair lists (pure), and nested image folders through stages 3-5."""
from __future__ import annotations

import pickle
from pathlib import Path, PurePath

import cv2
import numpy as np
import pytest
import torch

from utils import mask_layout as layout
from utils.io import DataError, atomic_pickle_dump, read_label, safe_pickle_load


# ------------------------------------------------------------------ names (pure)
def test_flat_mask_names_are_upstreams_and_nested_ones_keep_their_folders():
    assert str(layout.mask_rel("SubA", "a.png")) == "SubA_a_gt.pkl"            # existing corpora
    assert str(layout.mask_rel("SubA", "syn_00001.jpg")) == "SubA_syn_00001_gt.pkl"
    assert str(layout.mask_rel("SubA", "x/a.png")) == "SubA/x/a_gt.pkl"
    assert str(layout.mask_rel("SubA", PurePath("x/y/a.b.png"))) == "SubA/x/y/a.b_gt.pkl"
    rels = ["a.png", "x/a.png", "y/a.png", "x_a.png", "x/y/a.png", "x_y/a.png"]
    names = {layout.mask_rel("SubA", r) for r in rels} | {layout.mask_rel("SubB", r) for r in rels}
    assert len(names) == 2 * len(rels)                                            # no two images share one
    for bad in ("", "/abs/a.png", "../a.png"):
        with pytest.raises(ValueError):
            layout.mask_rel("SubA", bad)


def test_label_and_pair_list_paths():
    assert layout.label_rel("x/a.jpg") == PurePath("x/a.png")
    assert layout.label_path("/d/train", "SubA", "x/a.jpg") == Path("/d/train/SubA/label/x/a.png")
    assert layout.label_path("/d/train", "SubA", "a.png", "label_exact") == Path("/d/train/SubA/label_exact/a.png")
    assert layout.split_dir("/d") == Path("/d/train")
    assert layout.pairs_file("/d", "train") == Path("/d/train_tf_img_to_gt.pkl")
    assert layout.pairs_file("/d", "") == Path("/d/train_tf_img_to_gt.pkl")     # empty subset: train
    assert layout.pairs_file("/d", "val") == Path("/d/val_tf_img_to_gt.pkl")
    assert layout.mask_path(layout.masks_dir("/d"), "S", "x/a.png") == Path("/d/masks/S/x/a_gt.pkl")
    assert layout.is_image("a.PNG") and layout.is_image("x/a.tiff") and not layout.is_image("a.txt")


def test_pair_entries_are_relative_and_resolve_back():
    root = Path("/data/corpus")
    pairs = [(root / "train/S/img/x/a.png", root / "masks/S/x/a_gt.pkl")]
    entries = layout.pair_entries(pairs, root)
    assert entries == [["train/S/img/x/a.png", "masks/S/x/a_gt.pkl"]]
    assert layout.resolve_pairs(layout.check_pair_list(entries, "p.pkl"), root) == pairs
    # an absolute path in the list stays as it is
    assert layout.resolve_pairs([("/elsewhere/a.png", "m.pkl")], root) == [(Path("/elsewhere/a.png"),
                                                                             root / "m.pkl")]


@pytest.mark.parametrize("entries, message", [
    ({"a": "b"}, "string pairs"),
    ([["a.png"]], "string pairs"),
    ([["a.png", 3]], "string pairs"),
    ([], "the pair list is empty"),
])
def test_bad_pair_lists_are_named_errors(entries, message):
    with pytest.raises(DataError, match=f"p.pkl: .*{message}"):
        layout.check_pair_list(entries, "p.pkl")


def test_mask_dtype_and_checks():
    assert layout.mask_from_label(np.array([[0, 1], [2, 255]])).dtype == np.uint8
    assert layout.mask_from_label(np.array([[0, 256]])).dtype == np.int32
    good = np.ones((4, 5), np.uint8)
    assert layout.check_mask(good, (4, 5), "m.pkl") is good
    with pytest.raises(DataError, match=r"m.pkl: mask size \(4, 5\) differs from its image's size \(5, 4\)"):
        layout.check_mask(good, (5, 4), "m.pkl")
    with pytest.raises(DataError, match="m.pkl: expected a 2-D integer label map"):
        layout.check_mask(good.astype(np.float32), (4, 5), "m.pkl")
    with pytest.raises(DataError, match="m.pkl: expected a 2-D integer label map, found list"):
        layout.check_mask([[1]], (1, 1), "m.pkl")
    with pytest.raises(DataError, match="m.pkl: negative label ids"):
        layout.check_mask(-good.astype(np.int64), (4, 5), "m.pkl")


# ------------------------------------------------------------------ files
def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _scan(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_find_images_is_recursive_sorted_and_images_only(tmp_path):
    for rel in ("SubB/img/b.png", "SubA/img/y/a.png", "SubA/img/x/a.jpg", "SubA/img/z.PNG"):
        _write(tmp_path / rel, _scan(0))
    (tmp_path / "SubA/img/notes.txt").write_text("not an image")
    (tmp_path / "SubA/img/dir.png").mkdir()                        # a folder with an image's name
    _write(tmp_path / "NoImg/label/c.png", _scan(0))               # a subset without img/
    found = layout.find_images(tmp_path)
    assert [(e.sub, str(e.rel)) for e in found] == [("SubA", "x/a.jpg"), ("SubA", "y/a.png"),
                                                     ("SubA", "z.PNG"), ("SubB", "b.png")]
    jobs = layout.label_jobs(tmp_path, tmp_path / "out")
    assert jobs[0] == (tmp_path / "SubA/img/x/a.jpg", tmp_path / "out/SubA/label/x/a.png")


def test_pair_list_and_mask_round_trip(tmp_path):
    img, mask = tmp_path / "train/S/img/x/a.png", tmp_path / "masks/S/x/a_gt.pkl"
    layout.write_mask(np.array([[0, 1], [2, 3]], np.int64), mask)
    assert layout.load_mask(mask, (2, 2)).dtype == np.uint8
    assert layout.write_pairs([(img, mask)], tmp_path) == tmp_path / "train_tf_img_to_gt.pkl"
    assert safe_pickle_load(tmp_path / "train_tf_img_to_gt.pkl") == [["train/S/img/x/a.png", "masks/S/x/a_gt.pkl"]]
    assert layout.load_pairs(tmp_path) == [(img, mask)]
    with pytest.raises(DataError, match="val_tf_img_to_gt.pkl: pair list not found"):
        layout.load_pairs(tmp_path, "val")
    atomic_pickle_dump([], tmp_path / "empty_tf_img_to_gt.pkl")
    with pytest.raises(DataError, match="the pair list is empty"):
        layout.load_pairs(tmp_path, "empty")
    (tmp_path / "evil_tf_img_to_gt.pkl").write_bytes(pickle.dumps([[Path("a"), "b"]]))
    with pytest.raises(DataError, match="evil_tf_img_to_gt.pkl: unsafe or corrupt pickle"):
        layout.load_pairs(tmp_path, "evil")                       # a Path object is not a plain type


# ------------------------------------------------------------------ stages 3 -> 4 -> 5
NESTED = ["SubA/img/flat.png", "SubA/img/x/a.png", "SubA/img/y/a.png", "SubB/img/deep/er/b.jpg"]


def _stage3_asam(tmp_path: Path, train: Path) -> None:
    """SAM/infer_masks.py main with an untrained tiny stage-2 checkpoint (threshold 0: every
    pixel gets some anatomy, so no mask is empty)."""
    from SAM import infer_masks
    from SAM.auto_prompter import AutoPrompter, prompter_grid
    from SAM.checkpoint import save_checkpoint
    from SAM.segmenter import build_segmenter

    torch.manual_seed(0)
    seg = build_segmenter("vit_tiny", 32, random_init=True)
    ckpt = tmp_path / "s2.pt"
    save_checkpoint(ckpt, "asam_stage2", seg, ["Syn/1", "Syn/2"], AutoPrompter(2, grid=prompter_grid(seg.grid)))
    report = infer_masks.main(["--ckpt", str(ckpt), "--data_dir", str(train), "--workers", "0",
                               "--batch_size", "2", "--threshold", "0", "--montage", "none",
                               "--device", "cpu"])
    assert report["written"] == len(NESTED) and not report["bad"]


def _stage3_superpixel(tmp_path: Path, train: Path) -> None:
    from utils.superpixel_masks import main

    assert main(["--data_dir", str(train), "--work_size", "0", "--min_area", "0.05"]) == 0


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("stage3", [_stage3_asam, _stage3_superpixel], ids=["infer_masks", "superpixel"])
def test_nested_folders_reach_pretraining_with_their_own_masks(tmp_path, stage3, caplog):
    from pretraining.data import AnatomyPairDataset, load_pairs
    from utils.generate_masks_pkls import generate

    root = tmp_path / "corpus"
    train = layout.split_dir(root)
    for i, rel in enumerate(NESTED):
        _write(train / rel, _scan(i, 48 + 8 * i, 40))              # sizes differ: masks cannot be swapped
    stage3(tmp_path, train)
    for e in layout.find_images(train):
        assert layout.label_path(train, e.sub, e.rel).is_file()

    report = generate(root)                                        # stage 4
    assert report.written == len(NESTED) and not report.problems
    pairs = load_pairs(root)                                       # what stage 5 reads
    assert [img for img, _ in pairs] == [train / rel for rel in NESTED]
    masks = [m for _, m in pairs]
    assert len(set(masks)) == len(NESTED)                          # x/a.png and y/a.png: one mask each
    assert masks[0] == root / "masks/SubA_flat_gt.pkl"             # flat files keep upstream's name
    assert masks[1:3] == [root / "masks/SubA/x/a_gt.pkl", root / "masks/SubA/y/a_gt.pkl"]
    for (img, mask_pkl), e in zip(pairs, layout.find_images(train)):
        mask = safe_pickle_load(mask_pkl)
        assert np.array_equal(mask, read_label(layout.label_path(train, e.sub, e.rel)))
        assert mask.shape == cv2.imread(str(img)).shape[:2]

    ds = AnatomyPairDataset(pairs, size=32, seed=0)
    with caplog.at_level("WARNING"):
        for i in range(len(ds)):
            item = ds[(i, 0)]
            assert item["view1"].shape == (3, 32, 32) and item["mask1"].max() >= 1
    assert "skipping" not in caplog.text                           # no pair was unreadable
    assert generate(root).kept == len(NESTED)                      # re-run: every mask found again
