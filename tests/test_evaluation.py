"""POCUS evaluation: metrics, selection, input checks, and the real script end to end.

The end-to-end runs use the synthetic 5-fold set of ``utils.synthetic_us`` at 32 px so the
file runs in about a minute on a 2-core CPU.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import evaluation.protocols
import evaluation_aclus as ev
from evaluation.data import carve_validation, iter_folds, make_transforms
from evaluation.protocols import run_finetune_fold
from evaluation.runner import get_args_parser
from evaluation.splits import group_from_png_name
from models.encoder_io import build_resnet18
from evaluation.metrics import aggregate_folds, confusion_matrix, metrics_from_confusion, select_index
from utils.synthetic_us import make_pocus_folds, write_pocus_folds

CLASSES = ("covid19", "pneumonia", "regular")
FAST = ["--img_size", "32", "--workers", "0", "--batch_size", "16"]


@pytest.fixture(scope="module")
def syn_folds(tmp_path_factory):
    """covid_data1..5.pkl: 2 videos x 3 classes x 5 folds x 4 frames = 120 images, 64 px."""
    root = tmp_path_factory.mktemp("syn_pocus")
    write_pocus_folds(root, videos_per_class_per_fold=2, frames_per_video=4, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def syn_small(pocus_pickles_32px):
    return pocus_pickles_32px


SUBTLE = 0.2


@pytest.fixture(scope="module")
def syn_subtle(tmp_path_factory):
    """As syn_folds with faint findings (finding_strength 0.2): random features no longer
    separate the classes well (0.65 linear-probe accuracy), a learned encoder still does."""
    root = tmp_path_factory.mktemp("syn_pocus_subtle")
    write_pocus_folds(root, videos_per_class_per_fold=2, frames_per_video=4, size=64, seed=0,
                      finding_strength=SUBTLE)
    return root


def _run(argv, capsys=None):
    code = ev.main([str(a) for a in argv])
    return code, (capsys.readouterr() if capsys else None)


# --------------------------------------------------------------------------- #
# pure parts
# --------------------------------------------------------------------------- #
def test_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
    cm = confusion_matrix(y, p, 3)
    assert cm.sum() == 200 and cm[1, 2] == np.sum((y == 1) & (p == 2))
    m = metrics_from_confusion(cm, CLASSES)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=[0, 1, 2], zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][c]["recall"] == pytest.approx(rec[i])
        assert m["per_class"][c]["f1"] == pytest.approx(f1[i])
        assert m["per_class"][c]["support"] == sup[i]


def test_metrics_class_never_predicted_is_zero_not_nan():
    m = metrics_from_confusion(confusion_matrix([0, 1, 2], [0, 0, 0], 3), CLASSES)
    assert m["per_class"]["pneumonia"]["precision"] == 0.0 and m["macro_f1"] == pytest.approx(0.5 / 3)


def test_macro_f1_of_a_fold_without_some_class_averages_the_classes_present():
    from sklearn.metrics import f1_score

    y, p = np.array([0, 0, 1, 1, 1]), np.array([0, 2, 1, 1, 0])   # class 2 has no test images
    m = metrics_from_confusion(confusion_matrix(y, p, 3), CLASSES)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, labels=[0, 1], average="macro"))
    assert m["absent_classes"] == ["regular"]
    assert m["macro_f1"] > f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0)


def test_aggregate_folds_mean_std_and_pooled():
    # fold A: 9/10 correct, fold B: 1/2 correct -> mean 0.7, pooled 10/12
    a = np.array([[3, 0, 0], [0, 3, 1], [0, 0, 3]])
    b = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    s = aggregate_folds([a, b], CLASSES)
    assert s["accuracy_mean"] == pytest.approx(0.7)
    assert s["accuracy_std"] == pytest.approx(0.2)  # population std of (0.9, 0.5)
    assert s["pooled_accuracy"] == pytest.approx(10 / 12)
    assert (s["pooled_correct"], s["pooled_total"]) == (10, 12)
    assert s["confusion_matrix_sum"] == (a + b).tolist()


def test_select_index_rules():
    val, test = [0.5, 0.9, 0.9, 0.7], [0.95, 0.6, 0.6, 0.8]
    assert select_index("last", 4) == 3
    assert select_index("val", 4, val_scores=val) == 1  # first of the tied best
    assert select_index("paper", 4, test_scores=test) == 0
    with pytest.raises(ValueError):
        select_index("val", 4)
    with pytest.raises(ValueError):
        select_index("best", 4, val, test)


def test_group_from_png_name():
    assert group_from_png_name("Cov_foo_vid1__f00012.png") == "Cov_foo_vid1"
    assert group_from_png_name("Reg_image.png") == "Reg_image"


def test_carve_validation_keeps_videos_together():
    y = np.repeat([0, 1, 2], 20)
    groups = np.array([f"v{i // 4}" for i in range(60)])  # 15 videos of 4 frames
    tr, va = carve_validation(y, groups, 0.2, seed=1)
    assert set(groups[tr]).isdisjoint(groups[va]) and len(va) > 0
    assert set(y[va]) == {0, 1, 2}


# --------------------------------------------------------------------------- #
# bad input: one line, status 2, the file named
# --------------------------------------------------------------------------- #
class _RunsCode:
    """Pickles as a call to os.system: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    data = tmp_path / "evil"
    data.mkdir()
    marker = tmp_path / "pwned"
    for k in range(1, 6):
        with open(data / f"covid_data{k}.pkl", "wb") as f:
            pickle.dump(_RunsCode(marker), f)
    code, out = _run(["--data_path", data, "--protocol", "linear", "--out_dir", tmp_path / "o", *FAST], capsys)
    assert code == 2
    assert not marker.exists(), "the pickle's code ran"
    assert "covid_data1.pkl" in out.err and "refusing" in out.err and "Traceback" not in out.err
    errors = [l for l in out.err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and out.err.rstrip().endswith(errors[0])  # one line, last on stderr


@pytest.mark.parametrize("bad, expect", [
    (lambda X, y: (X.transpose(0, 2, 3, 1).copy(), y, X, y), "channels first"),  # NHWC
    (lambda X, y: (X.astype(np.float32), y, X, y), "uint8"),
    (lambda X, y: (X, y[:-1], X, y), "length"),
    (lambda X, y: (X, y + 5, X, y), "labels"),
    (lambda X, y: (X, y, X), "tuple"),
])
def test_wrong_arrays_are_clear_errors(tmp_path, capsys, bad, expect):
    X, y = np.zeros((6, 3, 16, 16), np.uint8), np.array([0, 1, 2, 0, 1, 2])
    for k in range(1, 6):
        with open(tmp_path / f"covid_data{k}.pkl", "wb") as f:
            pickle.dump(bad(X, y), f)
    code, out = _run(["--data_path", tmp_path, "--protocol", "linear", "--out_dir", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "covid_data1.pkl" in out.err and expect in out.err, out.err


def test_missing_data_and_wrong_checkpoint(tmp_path, syn_folds, capsys):
    code, out = _run(["--data_path", tmp_path / "nope", "--out_dir", tmp_path], capsys)
    assert code == 2 and "nope" in out.err and "not found" in out.err
    code, out = _run(["--data_path", tmp_path, "--out_dir", tmp_path / "o"], capsys)  # empty folder
    assert code == 2 and "covid_data1..5.pkl" in out.err
    ck = tmp_path / "sam.pth"
    torch.save({"kind": "asam_stage1", "model": {}}, ck)
    code, out = _run(["--data_path", syn_folds, "--ckpt_path", ck, "--out_dir", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "sam.pth" in out.err and "asam_stage1" in out.err
    ck2 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), ck2)
    code, out = _run(["--data_path", syn_folds, "--ckpt_path", ck2, "--out_dir", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "r50.pth" in out.err and "not a ResNet-18" in out.err


# --------------------------------------------------------------------------- #
# end to end on the synthetic 5-fold set
# --------------------------------------------------------------------------- #
def _check_report(path, n_total, protocol, selection):
    r = json.loads(path.read_text())
    assert (r["protocol"], r["selection"]) == (protocol, selection)
    assert [f["fold"] for f in r["folds"]] == [1, 2, 3, 4, 5]
    s = r["summary"]
    assert s["pooled_total"] == n_total and sum(f["n_test"] for f in r["folds"]) == n_total
    assert np.array(s["confusion_matrix_sum"]).sum() == n_total
    accs = [f["accuracy"] for f in r["folds"]]
    assert s["accuracy_mean"] == pytest.approx(np.mean(accs)) and s["accuracy_std"] == pytest.approx(np.std(accs))
    for f in r["folds"]:
        assert set(f["per_class"]) == set(CLASSES) and 0.0 <= f["macro_f1"] <= 1.0
    assert (path.parent / f"confusion_{protocol}_{selection}.png").stat().st_size > 1000
    return r


def test_linear_protocol_script_subprocess(syn_folds, tmp_path, repo_root):
    """The real script as a user runs it, with the upstream --data_dir spelling."""
    proc = subprocess.run([sys.executable, str(repo_root / "evaluation_aclus.py"), "--data_dir", str(syn_folds),
                           "--protocol", "linear", "--out_dir", str(tmp_path), *FAST],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pooled accuracy" in proc.stdout
    r = _check_report(tmp_path / "eval_linear_last.json", 120, "linear", "last")
    assert r["init"] == "random" and not r["optimistic"]


def test_finetune_protocol_end_to_end_all_selections(syn_small, tmp_path, capsys):
    for sel in ("last", "val", "paper"):
        code, out = _run(["--data_path", syn_small, "--protocol", "finetune", "--selection", sel,
                          "--epochs", "2", "--out_dir", tmp_path, *FAST], capsys)
        assert code == 0, out.err[-2000:]
        r = _check_report(tmp_path / f"eval_finetune_{sel}.json", 30, "finetune", sel)
        assert all(1 <= f["selected"]["epoch"] <= 2 for f in r["folds"])
        assert r["optimistic"] == (sel == "paper")
        if sel == "paper":
            assert "OPTIMISTIC" in r["selection_note"] and "OPTIMISTIC" in out.out
        if sel == "val":
            assert all(len(f["val_accuracy"]) == 2 for f in r["folds"])


def test_finetune_trains_head_and_only_layer4_1(syn_folds, monkeypatch):
    """Upstream left the head frozen at random init: check what moves and what does not."""
    fold = next(iter_folds(syn_folds))
    args = get_args_parser().parse_args(["--data_path", str(syn_folds), "--epochs", "1", *FAST])
    built = []
    monkeypatch.setattr(evaluation.protocols, "build_resnet18",
                        lambda n, state, _orig=build_resnet18: built.append(_orig(n, state)) or built[-1])
    run_finetune_fold(fold, None, args, torch.device("cpu"))
    torch.manual_seed(args.seed)  # run_finetune_fold seeds the same way before building the model
    before, after = torchvision.models.resnet18(num_classes=3).state_dict(), built[0].state_dict()
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert not torch.equal(before["layer4.1.conv1.weight"], after["layer4.1.conv1.weight"])
    assert torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])


def _train_reference_encoder(path, size=32, epochs=8, batch=32, lr=2e-3):
    """A ResNet-18 that has learned the synthetic classes, trained on a DIFFERENT synthetic draw
    (seed 1) than the evaluation set (seed 0), saved as a plain torchvision state dict."""
    X, y = make_pocus_folds(videos_per_class_per_fold=2, frames_per_video=4, size=64, seed=1,
                            finding_strength=SUBTLE)[0][:2]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    tf = make_transforms(size, train=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(batch):
            xb = torch.stack([tf(x) for x in Xt[idx]])
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.state_dict(), path)


def test_learned_encoder_beats_random_init_by_ten_points(syn_subtle, tmp_path, capsys):
    # bugs caught: the checkpoint not loaded (or loaded into the wrong keys), the probe
    # fitted on random features, a normalisation that differs from training
    ck = tmp_path / "learned_resnet18.pth"
    _train_reference_encoder(ck)
    acc = {}
    for name, extra in (("random", []), ("learned", ["--ckpt_path", ck])):
        code, out = _run(["--data_path", syn_subtle, *extra, "--protocol", "linear",
                          "--out_dir", tmp_path / name, *FAST], capsys)
        assert code == 0, out.err[-2000:]
        r = json.loads((tmp_path / name / "eval_linear_last.json").read_text())
        assert r["init"] == ("checkpoint" if extra else "random")
        acc[name] = r["summary"]["accuracy_mean"]
    assert acc["random"] < 0.70, acc  # the set is hard enough for the comparison to mean something
    assert acc["learned"] >= acc["random"] + 0.10, acc
