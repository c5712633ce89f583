"""Tests of the synthetic ultrasound generator and its three on-disk layouts."""
from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest

from utils.io import read_image, read_label, safe_pickle_load
from utils.synthetic_scan import ANATOMY_IDS, CLASS_NAMES, derive_seed, make_scan
from utils.synthetic_us import (SAMUS_DATASETS, main, pocus_fold_video_ids, split_names, write_pocus_folds,
                                write_pretrain_layout, write_samus_layout)

VALID_IDS = set(ANATOMY_IDS.values())


# --------------------------------------------------------------------------- #
# make_scan
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("probe", ["convex", "linear"])
@pytest.mark.parametrize("scan_class", [0, 1, 2])
def test_shape_dtype_and_label_ids(probe, scan_class):
    for seed in range(4):
        img, lab = make_scan(seed, (96, 80), probe, scan_class)
        assert img.shape == (96, 80) and img.dtype == np.uint8
        assert lab.shape == (96, 80) and lab.dtype == np.int64
        ids = set(np.unique(lab).tolist())
        assert ids <= VALID_IDS
        assert len(ids) >= 2
        assert {ANATOMY_IDS["soft_tissue"], ANATOMY_IDS["pleura"], ANATOMY_IDS["lung"]} <= ids
        if scan_class == 1:
            assert ANATOMY_IDS["consolidation"] in ids
        else:
            assert ANATOMY_IDS["consolidation"] not in ids
        assert img.std() > 10  # not a blank image


def test_deterministic_and_seed_dependent():
    a_img, a_lab = make_scan(7, 64, "convex", 0, frame=2)
    b_img, b_lab = make_scan(7, 64, "convex", 0, frame=2)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, c_lab = make_scan(8, 64, "convex", 0, frame=2)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)  # geometry, not only speckle, changes


def test_frames_are_a_video_of_one_scene():
    f0_img, f0_lab = make_scan(3, 64, "convex", 2, frame=0)
    f1_img, f1_lab = make_scan(3, 64, "convex", 2, frame=1)
    other_img, _ = make_scan(4, 64, "convex", 2, frame=0)
    assert not np.array_equal(f0_img, f1_img)
    # same scene: labels nearly the same, images far more alike than another seed's
    assert (f0_lab == f1_lab).mean() > 0.9
    d_frame = np.abs(f0_img.astype(float) - f1_img).mean()
    d_other = np.abs(f0_img.astype(float) - other_img).mean()
    assert d_frame < d_other


def test_convex_fan_has_black_corners_and_linear_fills():
    img, lab = make_scan(0, 128, "convex", 2)
    k = 6
    for sl in [(slice(0, k), slice(0, k)), (slice(0, k), slice(-k, None)),
               (slice(-k, None), slice(0, k)), (slice(-k, None), slice(-k, None))]:
        assert (img[sl] == 0).all()
        assert (lab[sl] == ANATOMY_IDS["background"]).all()
    assert (lab[64, 60:68] != 0).all()  # the centre is inside the fan
    _, lab_lin = make_scan(0, 128, "linear", 2)
    assert (lab_lin != ANATOMY_IDS["background"]).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="probe"):
        make_scan(0, 64, "phased")
    with pytest.raises(ValueError, match="scan_class"):
        make_scan(0, 64, "convex", 3)
    with pytest.raises(ValueError, match="seed"):
        make_scan(-1, 64)
    with pytest.raises(ValueError, match="size"):
        make_scan(0, 8)


def test_classes_are_learnable():
    """Logistic regression on simple intensity features separates held-out scenes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(img):
        x = img.astype(np.float32) / 255
        small = cv2.resize(x, (16, 16), interpolation=cv2.INTER_AREA).ravel()    # 256
        rows = cv2.resize(x.mean(1)[:, None], (1, 32), interpolation=cv2.INTER_AREA).ravel()  # depth profile
        cols = np.sort(x[x.shape[0] // 3:].mean(0))[::2]   # lateral profile of the deep half, sorted
        return np.concatenate([small, rows, cols])

    def data(seeds):
        X, y = [], []
        for s in seeds:
            c = s % 3
            img, _ = make_scan(s, 64, "linear" if s % 4 == 3 else "convex", c, frame=s % 5)
            X.append(features(img))
            y.append(c)
        return np.stack(X), np.asarray(y)

    X_tr, y_tr = data(range(120))
    X_te, y_te = data(range(1000, 1090))  # unseen scenes
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1)).fit(X_tr, y_tr)
    acc = clf.score(X_te, y_te)
    print(f"held-out accuracy {acc:.3f}")
    assert acc > 0.8, f"held-out accuracy {acc:.3f}"


# --------------------------------------------------------------------------- #
# pre-training layout
# --------------------------------------------------------------------------- #
def test_pretrain_layout(tmp_path):
    paths = write_pretrain_layout(tmp_path, n_images=4, size=48, seed=5)
    assert len(paths) == 8
    for sub, probe in [("SynConvex", "convex"), ("SynLinear", "linear")]:
        names = sorted(p.stem for p in (tmp_path / "train" / sub / "img").glob("*.png"))
        assert names == [f"syn_{i:05d}" for i in range(4)]
        for i, name in enumerate(names):
            img = read_image(tmp_path / "train" / sub / "img" / f"{name}.png", mode="gray")
            lab = read_label(tmp_path / "train" / sub / "label" / f"{name}.png")
            assert img.shape == lab.shape == (48, 48)
            si = 0 if sub == "SynConvex" else 1
            exp_img, exp_lab = make_scan(derive_seed(5, 1, si, i), 48, probe, i % 3)
            assert np.array_equal(img, exp_img)
            assert np.array_equal(lab, exp_lab)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind


# --------------------------------------------------------------------------- #
# SAMUS layout
# --------------------------------------------------------------------------- #
def test_samus_layout(tmp_path):
    root = write_samus_layout(tmp_path / "samus", n_images=10, size=48, seed=1)
    assert json.loads((root / "MainPatient" / "class.json").read_text()) == {
        "SynLung-Pleura": 2, "SynLung-Anatomy": 4}
    split_of: dict[tuple[str, str], str] = {}
    n_lines = 0
    for split in ("train", "val", "test"):
        for line in (root / "MainPatient" / f"{split}.txt").read_text().splitlines():
            cid, ds, name = line.split("/")
            n_lines += 1
            assert ds in SAMUS_DATASETS
            assert 1 <= int(cid) < SAMUS_DATASETS[ds]
            assert (root / ds / "img" / f"{name}.png").is_file()
            lab = read_label(root / ds / "label" / f"{name}.png")
            assert (lab == int(cid)).any()  # the class of the line is present
            assert split_of.setdefault((ds, name), split) == split  # one split per image
    for ds in SAMUS_DATASETS:
        names = sorted(p.stem for p in (root / ds / "img").glob("*.png"))
        assert len(names) == 10
        assert all((ds, n) in split_of for n in names)
        counts = {s: sum(1 for (d, _), sp in split_of.items() if d == ds and sp == s)
                  for s in ("train", "val", "test")}
        assert counts == {"train": 7, "val": 1, "test": 2}
    # one line per foreground class present
    for (ds, name) in split_of:
        lab = read_label(root / ds / "label" / f"{name}.png")
        assert lab.shape == read_image(root / ds / "img" / f"{name}.png", "gray").shape
    assert n_lines == sum(len(set(np.unique(read_label(root / ds / "label" / f"{n}.png")).tolist()) - {0})
                          for (ds, n) in split_of)
    # binary dataset is really stored 0/255; anatomy is an index map 0..3
    for p in (root / "SynLung-Pleura" / "label").glob("*.png"):
        raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert raw.ndim == 2 and set(np.unique(raw).tolist()) == {0, 255}
    seen = set()
    for p in (root / "SynLung-Anatomy" / "label").glob("*.png"):
        seen |= set(np.unique(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)).tolist())
    assert seen == {0, 1, 2, 3}


def test_split_names_deterministic():
    names = [f"n{i}" for i in range(40)]
    a, b = split_names(names, 0), split_names(list(reversed(names)), 0)
    assert a == b
    assert [len(a[s]) for s in ("train", "val", "test")] == [28, 4, 8]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(names)


# --------------------------------------------------------------------------- #
# POCUS folds
# --------------------------------------------------------------------------- #
def test_pocus_folds(tmp_path):
    vpc, frames, size = 1, 2, 32
    paths = write_pocus_folds(tmp_path, videos_per_class_per_fold=vpc, frames_per_video=frames,
                              size=size, seed=0)
    assert [p.name for p in paths] == [f"covid_data{k}.pkl" for k in range(1, 6)]
    ids = pocus_fold_video_ids(vpc, frames)
    n_fold = 3 * vpc * frames
    test_videos = []
    for k, p in enumerate(paths):
        assert p.read_bytes()[1] == 4  # pickle protocol 4, as the USCL files
        X_tr, y_tr, X_te, y_te = safe_pickle_load(p)
        for X, y, n in [(X_tr, y_tr, 4 * n_fold), (X_te, y_te, n_fold)]:
            assert X.shape == (n, 3, size, size) and X.dtype == np.uint8
            assert y.shape == (n,) and y.dtype == np.int64
            assert set(y.tolist()) == {0, 1, 2}
            assert np.array_equal(X[:, 0], X[:, 1]) and np.array_equal(X[:, 0], X[:, 2])
        tr_ids, te_ids = ids[k]
        assert len(tr_ids) == len(X_tr) and len(te_ids) == len(X_te)
        assert not set(tr_ids.tolist()) & set(te_ids.tolist())
        for vid in set(te_ids.tolist()):  # one class per video
            assert len(set(y_te[te_ids == vid].tolist())) == 1
        test_videos.append(set(te_ids.tolist()))
    # every video is in exactly one test fold
    all_ids = [v for s in test_videos for v in s]
    assert len(all_ids) == len(set(all_ids)) == 5 * 3 * vpc
    assert len(CLASS_NAMES) == 3


def test_pocus_pickle_is_plain_data(tmp_path):
    p = write_pocus_folds(tmp_path, 1, 1, 16)[0]
    data = pickle.loads(p.read_bytes())
    assert isinstance(data, tuple) and len(data) == 4


def test_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["--out", str(out), "--layouts", "pretrain,samus,pocus", "--n", "3", "--size", "32",
                 "--pocus-videos", "1", "--pocus-frames", "1"]) == 0
    text = capsys.readouterr().out
    assert "pretrain" in text and "samus" in text and "pocus" in text
    assert len(list((out / "train" / "SynConvex" / "img").glob("*.png"))) == 3
    assert (out / "samus" / "MainPatient" / "class.json").is_file()
    assert len(list((out / "pocus").glob("covid_data*.pkl"))) == 5
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--layouts", "nope"])


# --------------------------------------------------------------------------- #
# scan styles and the lung anatomy layout
# --------------------------------------------------------------------------- #
def test_style_changes_the_look_not_the_anatomy():
    from utils.synthetic_scan import CLASSIC, REALISTIC, STYLES, make_scan

    assert STYLES["classic"] == CLASSIC and REALISTIC != CLASSIC
    for seed in range(3):
        a_img, a_lab = make_scan(seed, 64, "linear", seed % 3)
        b_img, b_lab = make_scan(seed, 64, "linear", seed % 3, style="realistic")
        c_img, _ = make_scan(seed, 64, "linear", seed % 3, style=CLASSIC)
        np.testing.assert_array_equal(a_lab, b_lab)          # linear: no fan, the same labels
        np.testing.assert_array_equal(a_img, c_img)          # the default is the classic look
        assert np.abs(a_img.astype(int) - b_img.astype(int)).mean() > 5
    with pytest.raises(ValueError, match="unknown scan style 'glossy'"):
        make_scan(0, 32, style="glossy")


def test_lung_layout_labels_are_the_anatomy_ids(tmp_path):
    from utils.synthetic_us import LUNG_DATASET, write_lung_layout

    seg = write_samus_layout(tmp_path / "seg", n_images=5, size=32, seed=1)
    root = write_lung_layout(tmp_path / "lung", n_images=8, size=48, seed=0, style="classic", seg_root=seg)
    classes = json.loads((root / "MainPatient" / "class.json").read_text())
    assert classes == {**SAMUS_DATASETS, LUNG_DATASET: 7}
    for ds in SAMUS_DATASETS:                                  # linked, not copied
        assert (root / ds).is_symlink() and (root / ds / "img").is_dir()
    lines = {s: (root / "MainPatient" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    seg_lines = {s: (seg / "MainPatient" / f"{s}.txt").read_text().split() for s in lines}
    for s in lines:
        assert lines[s][:len(seg_lines[s])] == seg_lines[s]
    lung = [l for s in lines for l in lines[s] if f"/{LUNG_DATASET}/" in l]
    names = {l.split("/")[-1] for l in lung}
    assert len(names) == 8 and sum(len(lines[s]) for s in lines) == len(lung) + sum(map(len, seg_lines.values()))
    for i, name in enumerate(sorted(names)):
        lab = read_label(root / LUNG_DATASET / "label" / f"{name}.png")
        expect = make_scan(derive_seed(0, 4, i), 48, "linear" if i % 4 == 3 else "convex", i % 3, style="classic")[1]
        np.testing.assert_array_equal(lab, expect)
        assert {int(l.split("/")[0]) for l in lung if l.endswith(f"/{name}")} == set(np.unique(expect)) - {0}
        # the ids mean their anatomy: down every column, chest wall above pleura above aerated lung
        tissue, pleura, air = ANATOMY_IDS["soft_tissue"], ANATOMY_IDS["pleura"], ANATOMY_IDS["lung"]
        for col in lab.T:
            rows = {k: np.flatnonzero(col == k) for k in (tissue, pleura, air)}
            if all(len(r) for r in rows.values()):
                assert rows[tissue].min() < rows[pleura].min() < rows[air].max()
