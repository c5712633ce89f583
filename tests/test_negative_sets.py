"""Negative sets (issue 27): images that show none of the anatomies, e.g. real lung frames beside
fetal-head and nerve scans, used by A-SAM's stage 2 only as negatives for the prompts of the data
sets they lack (SAM/samus_data.py). Broken if such an image is paired with a prompt its set does not
lack (a lung frame taught to have no pleura), if adding one changes the anatomy sets' own draws (the
runs before and after would differ in more than the negatives), or if a negative set's line is taken
for an anatomy line."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from SAM.samus_data import (SAMUSDataset, SplitLine, add_negative_set, negative_lines, read_absent_for, read_split,
                            subset_lines)
from utils.io import DataError
from utils.synthetic_us import write_samus_layout


@pytest.fixture(scope="module")
def base_root(tmp_path_factory):
    return write_samus_layout(tmp_path_factory.mktemp("seg") / "seg", n_images=6, size=48, seed=0)


def _frames(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"vid{i // 2}_f{i:03d}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (40, 56), dtype=np.uint8))
        paths.append(p)
    return paths


@pytest.fixture()
def root(base_root, tmp_path):
    r = tmp_path / "seg"
    shutil.copytree(base_root, r)
    frames = _frames(tmp_path / "frames", 6)
    datasets = sorted(json.loads((r / "MainPatient" / "class.json").read_text()))
    add_negative_set(r, "Neg-Frames", {"train": frames[:4], "test": frames[4:]}, lacks=datasets[:1])
    return r


def test_a_negative_set_is_read_only_when_negatives_are_asked_for(root):
    datasets = sorted(d for d, c in json.loads((root / "MainPatient" / "class.json").read_text()).items() if c > 1)
    plain = read_split(root, "train")
    assert {l.dataset for l in plain} == set(datasets)                       # anatomy lines only
    both = read_split(root, "train", negative_sets=True)
    own = [l for l in both if l.from_negative_set]
    assert len(own) == 4 and {l.dataset for l in own} == {"Neg-Frames"} and all(l.class_id == 0 for l in own)
    assert [l for l in both if not l.from_negative_set] == plain
    assert read_absent_for(root) == {"Neg-Frames": {datasets[0]}}
    assert not (root / "Neg-Frames" / "label").exists()                      # no label is needed


def test_negative_lines_pair_a_negative_sets_images_with_what_it_lacks_only():
    anatomy = [SplitLine(1, "A", f"a{i}") for i in range(4)] + [SplitLine(1, "B", f"b{i}") for i in range(4)]
    frames = [SplitLine(0, "N", f"n{i}") for i in range(6)]
    keys = ["A/1", "B/1"]
    before = negative_lines(anatomy, keys, rate=0.5, seed=3)
    after = negative_lines(anatomy + frames, keys, rate=0.5, seed=3, absent_for={"N": {"A"}})
    assert after[:len(before)] == before                                     # the anatomy sets' draw is unchanged
    extra = after[len(before):]
    assert len(extra) == 3 and all(l.dataset == "N" and l.prompt == "A/1" for l in extra)   # 0.5 x 6 frames
    every = negative_lines(anatomy + frames, keys, rate=100.0, absent_for={"N": {"A"}})
    assert sum(l.dataset == "N" for l in every) == 6                         # never with B's prompt
    unlisted = negative_lines(anatomy + frames, keys, rate=100.0)           # no absent.json: every other set
    assert {l.prompt for l in unlisted if l.dataset == "N"} == {"A/1", "B/1"}


def test_subsets_leave_the_anatomy_sets_draws_alone():
    anatomy = [SplitLine(1, "B", f"b{i}") for i in range(10)] + [SplitLine(1, "C", f"c{i}") for i in range(10)]
    frames = [SplitLine(0, "A-frames", f"n{i}") for i in range(10)]          # sorts before the others
    kept = subset_lines(anatomy + frames, 3, seed=1)
    assert [l for l in kept if not l.from_negative_set] == subset_lines(anatomy, 3, seed=1)
    assert sum(l.from_negative_set for l in kept) == 3


def test_a_negative_sets_items_have_empty_targets_and_only_the_prompts_it_lacks(root):
    keys = sorted({l.prompt_key for l in read_split(root, "train")})
    lacked = next(iter(read_absent_for(root)["Neg-Frames"]))
    ds = SAMUSDataset(root, "train", 64, 16, keys, return_orig=True, negative_rate=1.0)
    mine = [i for i, l in enumerate(ds.lines) if l.dataset == "Neg-Frames"]
    assert len(mine) == 4 and not any(ds.lines[i].from_negative_set for i in range(len(ds)))
    for i in mine:
        item, line = ds[i], ds.lines[i]
        assert line.prompt.split("/")[0] == lacked
        assert item["orig_mask"].shape == (40, 56) and item["orig_mask"].sum() == 0 and item["low_mask"].sum() == 0
    plain = SAMUSDataset(root, "train", 64, 16, keys)
    assert not any(l.dataset == "Neg-Frames" for l in plain.lines)           # no negatives asked: not read


def test_adding_a_negative_set_twice_changes_nothing_and_bad_input_is_named(root, tmp_path):
    before = {p.name: p.read_text() for p in (root / "MainPatient").iterdir()}
    frames = sorted((tmp_path / "frames").glob("*.png"))
    lacks = sorted(read_absent_for(root)["Neg-Frames"])
    add_negative_set(root, "Neg-Frames", {"train": frames[:4], "test": frames[4:]}, lacks=lacks)
    assert {p.name: p.read_text() for p in (root / "MainPatient").iterdir()} == before
    with pytest.raises(DataError, match="not in it"):
        add_negative_set(root, "Neg-Frames", {"train": frames[:1]}, lacks=["Nope"])
    with pytest.raises(DataError, match="no prompt at all"):
        add_negative_set(root, "Neg-Frames", {"train": frames[:1]}, lacks=[])
    with pytest.raises(DataError, match="listed twice"):                    # one frame in two splits: a leak
        add_negative_set(root, "Neg-Frames", {"train": frames[:2], "test": frames[1:2]}, lacks=lacks)
    other = tmp_path / "other" / frames[0].name
    other.parent.mkdir()
    other.write_bytes(frames[0].read_bytes())
    with pytest.raises(DataError, match="have one name"):                   # another video's frame, same name
        add_negative_set(root, "Neg-Frames", {"train": [frames[0], other]}, lacks=lacks)
    assert {p.name: p.read_text() for p in (root / "MainPatient").iterdir()} == before   # refused before writing
    # picked again: the set's lines are replaced, the anatomy sets' kept
    add_negative_set(root, "Neg-Frames", {"train": frames[4:], "val": frames[:1]}, lacks=lacks)
    train = read_split(root, "train", negative_sets=True)
    assert {l.name for l in train if l.from_negative_set} == {f.stem for f in frames[4:]}
    assert not any(l.dataset == "Neg-Frames" for l in read_split(root, "test", negative_sets=True))
    assert (root / "MainPatient" / "train.txt").read_text().startswith(before["train.txt"].split("0/Neg")[0])
    anatomy = read_split(root, "train")[0].dataset
    with pytest.raises(DataError, match="not a negative set"):
        add_negative_set(root, anatomy, {"train": frames[:1]})
    split = root / "MainPatient" / "train.txt"
    split.write_text(split.read_text() + "2/Neg-Frames/x\n")
    with pytest.raises(DataError, match=r"train.txt:\d+: dataset 'Neg-Frames' has 1 class"):
        read_split(root, "train")
    (root / "MainPatient" / "absent.json").write_text('{"Neg-Frames": ["Nope"]}')
    with pytest.raises(DataError, match=r"absent.json: data sets \['Nope'\]"):
        read_absent_for(root)


def test_the_lung_negatives_come_from_videos_that_are_never_measured(tmp_path):
    """benchmarks/measure_lung_asam.py --negative_videos: frames of other videos than the measured ones,
    split by video (no video in two splits), the asked number of frames per video."""
    from benchmarks.measure_lung_asam import pick_negative_videos

    for v in range(10):
        for f in range(4):
            p = tmp_path / "COVID-BLUES" / "img" / f"vid{v}_f{f:04d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), np.zeros((8, 8), np.uint8))
    measured = {"COVID-BLUES/vid0", "COVID-BLUES/vid5"}
    splits = pick_negative_videos(tmp_path, measured, n_videos=7, per_video=2)
    by_split = {k: {f"COVID-BLUES/{f.stem.split('_f')[0]}" for f in v} for k, v in splits.items()}
    assert not set().union(*by_split.values()) & measured
    assert sum(map(len, by_split.values())) == 7 and sum(map(len, splits.values())) == 14
    assert by_split["train"] and not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
    assert len(by_split["test"]) == 1 and len(by_split["val"]) == 1          # 20 % and 10 % of 7, rounded
