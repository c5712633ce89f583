"""POCUS fold builder: the pure parts, a fake checkout end to end, and the real data when present."""
from __future__ import annotations

import csv
import json
from collections import defaultdict

import cv2
import numpy as np
import pytest

import evaluation_aclus as ev
from evaluation.data import iter_folds
from utils.io import safe_pickle_load
from utils.pocus_folds import assign_folds, build, class_from_filename, site_baseline_accuracy, site_leakage


# --------------------------------------------------------------------------- #
# pure parts
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, cls", [
    ("data/pocus_videos/convex/Cov-Atlas+(44).gif", "covid19"),
    ("Cov_combatting_Image1.mp4", "covid19"),
    ("Pneu_Avi_Video_001.mp4", "pneumonia"),
    ("pneu-radiopaeda.mp4", "pneumonia"),
    ("Reg_Image_18122_crop.mp4", "regular"),
    ("Vir_prospective_file1.mp4", "viral"),
    ("data/pocus_videos/linear/label_uncertain/Vir_or_Pneu_x.mp4", "uncertain"),
    ("README.md", "other"),
])
def test_class_from_filename(name, cls):
    assert class_from_filename(name) == cls


def _toy_sources(seed=0):
    rng = np.random.default_rng(seed)
    src = {}
    for cls, n in (("covid19", 27), ("pneumonia", 36), ("regular", 56)):
        for i in range(n):
            src[f"{cls}_{i}"] = (cls, int(rng.choice([1, 16, 16, 16, 9])))  # stills, full and short videos
    return src


def test_assign_folds_stratified_balanced_deterministic():
    src = _toy_sources()
    folds = assign_folds(src, 5, seed=0)
    assert set(folds) == set(src) and set(folds.values()) == {1, 2, 3, 4, 5}
    for cls in ("covid19", "pneumonia", "regular"):
        n_src = np.bincount([folds[s] for s in src if src[s][0] == cls], minlength=6)[1:]
        frames = np.bincount([folds[s] for s in src if src[s][0] == cls],
                             weights=[src[s][1] for s in src if src[s][0] == cls], minlength=6)[1:]
        assert n_src.min() >= 5, (cls, n_src)  # every fold gets several sources of every class
        assert frames.max() - frames.min() <= 16, (cls, frames)  # at most one video apart
    assert assign_folds(dict(reversed(list(src.items()))), 5, seed=0) == folds  # input order irrelevant
    assert assign_folds(src, 5, seed=1) != folds


def test_site_leakage_by_hand():
    sites = ["A", "A", "B", "", "A", "C"]
    folds = np.array([1, 1, 1, 1, 2, 2])
    # fold 1 tests A, A, B, unknown; training (fold 2) has sites A and C -> 2 of 4 shared.
    # fold 2 tests A, C; training has A and B -> 1 of 2. Fold 3 is empty.
    assert site_leakage(sites, folds, 3) == {1: 0.5, 2: 0.5, 3: 0.0}


def test_site_baseline_accuracy_by_hand():
    sites = ["A", "A", "B", "", "A", "A", "B", "C"]
    classes = ["cov", "cov", "reg", "reg", "cov", "reg", "reg", "pneu"]
    folds = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    # fold 1 test, trained on fold 2 (A: cov 1 / reg 1 -> tie -> "cov"; B: reg; overall: reg):
    #   A cov ok, A cov ok, B reg ok, unknown -> overall "reg" ok            -> 4
    # fold 2 test, trained on fold 1 (A: cov; B: reg; overall: cov 2, reg 2 -> "cov"):
    #   A cov ok, A reg no, B reg ok, C unseen -> overall "cov" vs pneu no    -> 2
    assert site_baseline_accuracy(sites, classes, folds, 2) == 6 / 8


# --------------------------------------------------------------------------- #
# a fake covid19_ultrasound checkout, end to end (also feeds the evaluation script)
# --------------------------------------------------------------------------- #
def _write_video(path, n_frames, value, size=(40, 48)):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size[1], size[0]))
    assert vw.isOpened()
    for i in range(n_frames):
        img = np.full((*size, 3), value, np.uint8)
        img[:, (i * 3) % size[1]] = 255  # moving line: frames differ
        vw.write(img)
    vw.release()


@pytest.fixture(scope="module")
def fake_checkout(tmp_path_factory):
    root = tmp_path_factory.mktemp("covid19_ultrasound")
    vid, img = root / "data/pocus_videos/convex", root / "data/pocus_images/convex"
    vid.mkdir(parents=True)
    img.mkdir(parents=True)
    (root / "data/pocus_videos/linear/label_uncertain").mkdir(parents=True)
    meta = []
    for cls, prefix, value in (("covid19", "Cov", 40), ("pneumonia", "Pneu", 120), ("regular", "Reg", 200)):
        for i in range(6):
            _write_video(vid / f"{prefix}_v{i}.avi", 12 + i, value)
            meta.append({"Filename": f"{prefix}_v{i}", "License": "CC BY 4.0", "LinkToLicense": "x",
                         "ChangesMade": "", "Source ID": "7" if prefix == "Cov" else "18"})
        cv2.imwrite(str(img / f"{prefix}_still.png"), np.full((30, 30, 3), value, np.uint8))
    _write_video(vid / "Vir_v0.avi", 12, 90)
    _write_video(root / "data/pocus_videos/linear/label_uncertain/Vir_or_Pneu_v.avi", 12, 90)
    (vid / "Cov_broken.mp4").write_bytes(b"not a video at all")
    with open(root / "data/dataset_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Filename", "License", "LinkToLicense", "ChangesMade", "Source ID"])
        w.writeheader()
        w.writerows(meta)
    return root


def _check_fold_set(out, report, classes_every_fold=True):
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["num_images"]
    fold_of = defaultdict(set)
    for r in rows:
        fold_of[r["source"]].add(int(r["fold"]))
        assert (out / r["file"]).is_file()
    assert all(len(v) == 1 for v in fold_of.values()), "a source video sits in two folds"
    for k in range(1, 6):
        Xtr, ytr, Xte, yte = safe_pickle_load(out / f"covid_data{k}.pkl")
        assert Xtr.dtype == np.uint8 and Xtr.ndim == 4 and Xtr.shape[1] == 3 and Xtr.shape[2] == Xtr.shape[3]
        assert len(Xtr) + len(Xte) == len(rows) and len(ytr) == len(Xtr) and len(yte) == len(Xte)
        assert [int(r["label"]) for r in rows if int(r["fold"]) == k] == yte.tolist()  # manifest order = pickle order
        if classes_every_fold:
            assert set(yte.tolist()) == {0, 1, 2}, f"fold {k} lacks a class"
    return rows


def test_build_fake_checkout(fake_checkout, tmp_path, capsys):
    out = tmp_path / "folds"
    report = build(fake_checkout, out, frames_per_video=3, size=32, probe="both", seed=0, verbose=False)
    err = capsys.readouterr().err
    assert report["unreadable"] == ["pocus_videos/convex/Cov_broken.mp4"] and "Cov_broken.mp4" in err
    assert report["skipped"] == {"uncertain": 1, "viral": 1}
    # the left-out files are named on the console too, not only in build_report.json
    for cls, rels in report["skipped_files"].items():
        assert f"class '{cls}'" in err and all(r in err for r in rels)
    assert report["num_images"] == 18 * 3 + 3 and report["per_class"] == {"covid19": 19, "pneumonia": 19, "regular": 19}
    rows = _check_fold_set(out, report)
    assert {r["license"] for r in rows if r["type"] == "video"} == {"CC BY 4.0"}
    assert {r["site_id"] for r in rows if r["type"] == "video"} == {"7", "18"}
    # stills have no metadata row: their site is unknown
    assert report["sources_per_site"] == {"18": {"pneumonia": 6, "regular": 6}, "7": {"covid19": 6},
                                          "unknown": {"covid19": 1, "pneumonia": 1, "regular": 1}}
    assert set(report["test_frames_from_a_training_site"]) == {"1", "2", "3", "4", "5"}
    assert 0 <= report["site_only_accuracy"] <= 1
    assert json.loads((out / "build_report.json").read_text())["num_images"] == report["num_images"]
    # deterministic by seed
    again = build(fake_checkout, tmp_path / "again", frames_per_video=3, size=32, probe="both", seed=0, verbose=False)
    assert again["per_fold"] == report["per_fold"]
    assert (tmp_path / "again/manifest.csv").read_text() == (out / "manifest.csv").read_text()


def test_evaluation_reads_image_folders_with_video_groups(fake_checkout, tmp_path):
    out = tmp_path / "folds"
    build(fake_checkout, out, frames_per_video=3, size=32, probe="convex", seed=0, verbose=False)
    from_png = list(iter_folds(out / "images", img_size=32))  # the folder layout is resized on load
    from_pkl = list(iter_folds(out))
    assert len(from_png) == len(from_pkl) == 5
    for a, b in zip(from_png, from_pkl):
        assert sorted(a.y_test.tolist()) == sorted(b.y_test.tolist()) and a.X_train.shape == b.X_train.shape
        # both layouts know which video every training frame came from (val split by video)
        assert a.groups_train is not None and b.groups_train is not None
        assert len(set(a.groups_train)) == len(set(b.groups_train))
    code = ev.main(["--data_path", str(out), "--protocol", "linear", "--selection", "val", "--img_size", "32",
                    "--workers", "0", "--out_dir", str(tmp_path / "eval")])
    assert code == 0
    r = json.loads((tmp_path / "eval/eval_linear_val.json").read_text())
    assert r["summary"]["pooled_total"] == 57
    # the three classes differ in brightness: even a random encoder separates them
    assert r["summary"]["pooled_accuracy"] >= 0.8


def test_cli_bad_source(tmp_path, capsys):
    from utils.pocus_folds import main

    assert main(["--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a covid19_ultrasound checkout" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# the real data (skipped when ../shared/data is absent)
# --------------------------------------------------------------------------- #
def test_build_real_pocus(shared_data, tmp_path):
    src = shared_data / "pocus"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    out = tmp_path / "pocus"
    report = build(src, out, frames_per_video=2, size=16, probe="convex", seed=0, verbose=False)
    assert report["unreadable"] == []
    assert report["skipped"].get("viral", 0) >= 1  # viral videos are counted, not used
    _check_fold_set(out, report, classes_every_fold=True)
    assert report["num_sources"] >= 100
    # site leakage: one site holds about half the convex videos, so nearly every test frame
    # comes from a site seen in training, and the site alone predicts ~3/4 of the classes
    assert max(sum(v.values()) for v in report["sources_per_site"].values()) >= 60
    assert min(report["test_frames_from_a_training_site"].values()) > 0.9
    assert 0.6 < report["site_only_accuracy"] < 0.85
