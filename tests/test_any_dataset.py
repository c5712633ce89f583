"""A researcher's own labelled images: a plain ImageFolder in, folds made for them, shapes kept.

The data set is generated here: three classes of unequal sizes (7, 5 and 3 patients), images
of several sizes and formats (grey and RGB PNG, RGBA PNG, 16-bit PNG, JPEG, TIFF), two or three
images per patient, and the patients in a CSV. Everything runs the real evaluation at 32 px.
"""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

import evaluation_aclus as ev
from evaluation.data import DataOptions, fit_square, open_data
from evaluation.splits import group_of, make_split, write_split_csv

CLASSES = ("benign", "malignant", "normal")             # sorted folder names = label order
PATIENTS = {"benign": 7, "malignant": 5, "normal": 3}
FAST = ["--protocol", "linear", "--img_size", "32", "--workers", "0", "--batch_size", "8", "--folds", "3"]


def _write(path, img) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<patient>_<i>.<ext> and groups.csv (file,group)."""
    root = tmp_path_factory.mktemp("my_data")
    rng = np.random.default_rng(0)
    rows = []
    formats = [(".png", "gray"), (".jpg", "rgb"), (".png", "rgba"), (".png", "16bit"), (".tif", "rgb")]
    n = 0
    for ci, cls in enumerate(CLASSES):
        for p in range(PATIENTS[cls]):
            for i in range(2 + (p % 2)):
                ext, kind = formats[n % len(formats)]
                n += 1
                h, w = (40, 56) if n % 2 else (60, 44)
                base = rng.integers(0, 50, (h, w)).astype(np.float64) + 60 * ci
                if kind == "gray":
                    img = base.astype(np.uint8)
                elif kind == "16bit":
                    img = (base * 16).astype(np.uint16)          # a 12-bit scan
                else:
                    img = np.repeat(base.astype(np.uint8)[..., None], 3, 2)
                    if kind == "rgba":
                        img = np.concatenate([img, np.full((h, w, 1), 255, np.uint8)], 2)
                name = f"pat{ci}{p}_{i}{ext}"
                _write(root / cls / name, img)
                rows.append({"file": f"{cls}/{name}", "group": f"patient-{ci}-{p}"})
    (root / "normal" / "notes.txt").write_text("not an image")
    with open(root / "groups.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "group"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_letterbox_keeps_a_known_shapes_aspect_ratio():
    img = np.zeros((40, 80, 3), np.uint8)
    img[10:30, 20:60] = 255                               # a 20 x 40 box: aspect 2
    out = fit_square(img, 32)
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1) == pytest.approx(2.0, rel=0.1)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 0      # padding above and below, centred
    assert fit_square(img, 32, pad_value=7)[0, 0, 0] == 7
    ys, xs = np.nonzero(fit_square(img, 32, "squash")[..., 0] > 127)
    assert (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1) == pytest.approx(1.0, rel=0.1)  # squashed


def test_the_split_is_stratified_and_no_group_crosses_folds():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), rng.integers(1, 5, 30))
    labels = np.array([g % 3 for g in groups])
    fold = make_split(labels, groups.astype(str), 5, seed=0)
    for g in np.unique(groups):                           # brute force over every group
        assert len(set(fold[groups == g])) == 1
    for f in range(1, 6):                                 # every class in every test fold
        assert set(labels[fold == f]) == {0, 1, 2}
    assert np.array_equal(fold, make_split(labels, groups.astype(str), 5, seed=0))
    assert group_of("a/p07/x.png", "folder") == "p07" and group_of("a/vid__f003.png", "frame") == "vid"
    assert group_of("a/pat12_3.png", r"^(pat\d+)_") == "pat12"


def test_evaluation_on_my_own_image_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "o"
    assert ev.main(["--data_path", str(image_folder), *FAST, "--out_dir", str(out),
                    "--groups", str(image_folder / "groups.csv")]) == 0
    printed = capsys.readouterr().out
    assert "notes.txt" in printed and "'.txt'" in printed          # the file it does not read is named
    split = list(csv.DictReader(open(out / "split.csv")))
    assert len(split) == sum(2 + (p % 2) for c in CLASSES for p in range(PATIENTS[c]))
    groups: dict[str, str] = {}
    for r in split:                                                 # no patient on both sides of a fold
        assert groups.setdefault(r["group"], r["fold"]) == r["fold"]
    assert {r["class"] for r in split} == set(CLASSES)
    r = json.loads((out / "eval_linear_last.json").read_text())
    assert r["classes"] == list(CLASSES) and len(r["folds"]) == 3
    assert r["data"]["layout"] == "imagefolder" and r["data"]["resize"] == "letterbox" and r["data"]["pad_value"] == 0
    assert r["data"]["class_counts"] == {c: sum(s["class"] == c for s in split) for c in CLASSES}
    assert set(r["summary"]["pooled_per_class"]) == set(CLASSES)
    assert r["summary"]["pooled_total"] == len(split)
    assert all(c in printed for c in CLASSES)
    # Grad-CAM montages and their summary speak of the folder's classes too
    cam = tmp_path / "cam"
    assert ev.main(["--data_path", str(image_folder), *FAST[:2], "--img_size", "40", *FAST[4:], "--out_dir", str(cam),
                    "--split", str(out / "split.csv"), "--gradcam", "1"]) == 0
    g = json.loads((cam / "eval_linear_last.json").read_text())["gradcam"]
    assert set(g["images"]) == set(CLASSES) and sum(g["images"].values()) == 3 * len(CLASSES)
    assert len(list((cam / "gradcam").glob("*.png"))) == 3
    # a re-run in the same folder uses the same split, even with another --split_seed
    before = (out / "split.csv").read_text()
    assert ev.main(["--data_path", str(image_folder), *FAST, "--out_dir", str(out), "--split_seed", "5",
                    "--groups", str(image_folder / "groups.csv")]) == 0
    assert (out / "split.csv").read_text() == before and "the split of" in capsys.readouterr().out
    # ... the same patients under other names is the same grouping; another grouping is refused in one line
    assert ev.main(["--data_path", str(image_folder), *FAST, "--out_dir", str(out), "--group_rule", r"^(pat\d+)_"]) == 0
    capsys.readouterr()
    assert ev.main(["--data_path", str(image_folder), *FAST, "--out_dir", str(out), "--group_rule", r"^(pat\d)"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with other groups than --group_rule gives (groups by the rule" in err[0]
    assert (out / "split.csv").read_text() == before
    # another encoder's run elsewhere takes it with --split
    other = tmp_path / "other"
    assert ev.main(["--data_path", str(image_folder), *FAST, "--out_dir", str(other),
                    "--split", str(out / "split.csv")]) == 0
    assert (other / "split.csv").read_text() == before


def test_without_groups_the_split_is_per_image_and_says_so(image_folder, tmp_path, capsys):
    data = open_data(image_folder, DataOptions(folds=3))
    assert any("the split is per image" in n for n in data.notes)
    assert len({r["group"] for r in data.rows}) == len(data.rows)
    by_rule = open_data(image_folder, DataOptions(folds=3, group_rule=r"^(pat\d+)_"))
    assert len({r["group"] for r in by_rule.rows}) == sum(PATIENTS.values())


def test_a_split_that_no_longer_matches_the_folder_is_one_line(image_folder, tmp_path, capsys):
    out = tmp_path / "o"
    data = open_data(image_folder, DataOptions(folds=3))
    out.mkdir()
    (out / "split.csv").write_bytes(write_split_csv(data.rows[1:]))   # one image missing from it
    assert ev.main(["--data_path", str(image_folder), *FAST, "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 files are not in it" in err[0] and "delete it to split again" in err[0]
    assert ev.main(["--data_path", str(image_folder), *FAST[:-2], "--folds", "4", "--split",
                    str(out / "split.csv")]) == 2
    assert ev.main(["--data_path", str(image_folder), *FAST, "--out_dir", str(tmp_path / "x"),
                    "--group_rule", "(unclosed"]) == 2
    assert "not a regular expression" in capsys.readouterr().err


def test_every_format_reads_as_the_same_image(tmp_path):
    """Grey, RGB, RGBA, 16-bit PNG, JPEG and TIFF of one picture read to (nearly) the same array."""
    from utils.io import read_image

    base = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (12, 1))
    _write(tmp_path / "g.png", base)
    _write(tmp_path / "rgb.png", np.repeat(base[..., None], 3, 2))
    _write(tmp_path / "rgba.png", np.concatenate([np.repeat(base[..., None], 3, 2), np.full(base.shape + (1,), 255, np.uint8)], 2))
    _write(tmp_path / "deep.png", base.astype(np.uint16) * 257)           # the same picture at 16 bits
    _write(tmp_path / "t.tif", base)
    _write(tmp_path / "j.jpg", base)
    for name in ("g.png", "rgb.png", "rgba.png", "deep.png", "t.tif"):
        assert np.array_equal(read_image(tmp_path / name, "rgb")[..., 0], base), name
    assert np.abs(read_image(tmp_path / "j.jpg", "rgb")[..., 0].astype(int) - base).max() <= 8   # lossy
