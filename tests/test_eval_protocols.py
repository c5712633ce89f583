"""The evaluation protocols beside the paper's fine-tune: knn, finetune_cached, comma lists.

kNN is checked against a loop written from its spec and against scikit-learn; the cached
fine-tune against a plain training loop over a full torchvision ResNet-18; a comma-list
run against single-protocol runs and a count of encoder forward passes. Tiny synthetic
folds (32 px) keep the file to seconds on a 2-core CPU.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

import evaluation.features
import evaluation.protocols
import evaluation_aclus as ev
from evaluation.data import Fold, iter_folds, make_transforms
from evaluation.features import FeatureCache
from evaluation.protocols import knn_predict, run_finetune_cached_fold, train_and_select
from evaluation.runner import evaluate, get_args_parser
from models.encoder_io import build_resnet18

FAST = ["--img_size", "32", "--workers", "0", "--batch_size", "16"]


@pytest.fixture(scope="module")
def syn_small(pocus_pickles_32px):
    return pocus_pickles_32px


def _run(argv, capsys):
    code = ev.main([str(a) for a in argv])
    return code, capsys.readouterr()


# --------------------------------------------------------------------------- #
# knn
# --------------------------------------------------------------------------- #
def knn_brute_force(F_train, y_train, F_test, k, num_classes):
    """The spec, one test image at a time: sort the training images by cosine similarity
    (rounded to 10 decimals; equal: lower index first), take k, count votes; a tie goes to the
    larger summed similarity, then to the lower class index."""
    pred = []
    for f in F_test:
        sims = [round(float(np.dot(f, g) / (np.linalg.norm(f) * np.linalg.norm(g))), 10) for g in F_train]
        order = sorted(range(len(F_train)), key=lambda j: -sims[j])[:k]
        votes, sim_sum = [0] * num_classes, [0.0] * num_classes
        for j in order:
            votes[y_train[j]] += 1
            sim_sum[y_train[j]] += sims[j]
        pred.append(min(range(num_classes), key=lambda c: (-votes[c], -sim_sum[c], c)))
    return np.array(pred)


def test_knn_matches_the_spec_loop_with_forced_ties():
    # bugs caught: ties to the first-seen neighbour's class or to the higher class instead of
    # the summed similarity, k off by one, unnormalised (dot-product) similarity
    rng = np.random.default_rng(0)
    base = rng.normal(size=(15, 8)) * rng.uniform(0.1, 5, size=(15, 1))  # norms differ: cosine != dot
    # every training vector twice, with two different labels: vote ties and equal summed similarities
    F_train = np.concatenate([base, base * 3.0])
    y_train = np.concatenate([rng.integers(0, 3, 15), rng.integers(0, 3, 15)])
    F_test = np.concatenate([rng.normal(size=(40, 8)), base[:5] * 0.5])
    for k in (1, 2, 4, 5, 20, 100):  # 100 > N: all training images vote
        got = knn_predict(F_train, y_train, F_test, k, 3)
        want = knn_brute_force(F_train, y_train, F_test, min(k, len(y_train)), 3)
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
    # the tie rules were exercised: some test images had tied votes
    tied = 0
    for f in F_test:
        sims = F_train @ f / np.linalg.norm(F_train, axis=1)
        v = np.bincount(y_train[np.argsort(-sims, kind="stable")[:4]], minlength=3)
        tied += int((v == v.max()).sum() > 1)
    assert tied >= 5, tied


def test_knn_matches_sklearn_without_ties():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 16)) * 0.4
    y_train = rng.integers(0, 2, 200)
    F_train = centres[y_train] + rng.normal(size=(200, 16))
    y_test = rng.integers(0, 2, 60)
    F_test = centres[y_test] + rng.normal(size=(60, 16))
    for k in (1, 7, 21):  # two classes, odd k: no vote ties
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(F_train, y_train).predict(F_test)
        got = knn_predict(F_train, y_train, F_test, k, 2)
        np.testing.assert_array_equal(got, ref)
    assert 0.6 < (got == y_test).mean() < 1.0  # a test where the answer is not trivial


# --------------------------------------------------------------------------- #
# finetune_cached
# --------------------------------------------------------------------------- #
def _tiny_fold(seed=0, n_train=40, n_test=12, size=32):
    rng = np.random.default_rng(seed)
    y_tr, y_te = rng.integers(0, 3, n_train), rng.integers(0, 3, n_test)
    # class-dependent brightness so that training has something to learn
    X_tr = (rng.integers(0, 120, (n_train, 3, size, size)) + 60 * y_tr[:, None, None, None]).astype(np.uint8)
    X_te = (rng.integers(0, 120, (n_test, 3, size, size)) + 60 * y_te[:, None, None, None]).astype(np.uint8)
    return Fold(1, X_tr, y_tr, X_te, y_te, None, "tiny")


def _reference_finetune(state, fold, epochs, batch, lr, wd, seed):
    """Plain loop, full torchvision ResNet-18: conv1..layer4.0 frozen and in eval mode,
    un-augmented images, batches = randperm per epoch of a generator seeded with ``seed``."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(state, strict=False)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("layer4.1.") or name.startswith("fc.")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    to_input = lambda X: (torch.from_numpy(X).float() / 255 - 0.5) / 0.25  # noqa: E731
    x_tr, y_tr = to_input(fold.X_train), torch.from_numpy(fold.y_train)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for frozen in (model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4[0]):
            frozen.eval()
        perm = torch.randperm(len(y_tr), generator=g)
        for s in range(0, len(perm) - batch + 1, batch):  # full batches only (drop_last)
            idx = perm[s:s + batch]
            loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return model(to_input(fold.X_test))


def test_finetune_cached_equals_a_full_network_trained_on_the_same_images():
    # bugs caught: frozen BatchNorm in train mode (or layer4.1 in eval mode), the head not
    # trained, the wrong block cached, the encoder's weights not loaded, a different schedule
    # or batch order, a returned classifier that does not hold the trained blocks
    torch.manual_seed(123)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    for k in state:  # running statistics away from 0/1, so that eval vs train mode matters
        if k.endswith("running_mean"):
            state[k] = torch.randn_like(state[k]) * 0.1
        elif k.endswith("running_var"):
            state[k] = torch.rand_like(state[k]) + 0.5
    fold = _tiny_fold()
    args = get_args_parser().parse_args(["--data_path", "x", "--epochs", "3", "--save_classifiers", *FAST])
    features = FeatureCache(state, args, torch.device("cpu"), keep_maps=True)
    out = run_finetune_cached_fold(fold, features, args, torch.device("cpu"))
    ref_logits = _reference_finetune(state, fold, 3, 16, args.lr, args.weight_decay, args.seed)
    np.testing.assert_array_equal(out["pred"], ref_logits.argmax(1).numpy())
    with torch.no_grad():  # the full network handed to Grad-CAM / --save_classifiers
        tf = make_transforms(32, False)
        logits = out["model"](torch.stack([tf(torch.from_numpy(x)) for x in fold.X_test]))
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert len(out["train_loss"]) == 3 and out["selected"] == {"epoch": 3}
    # the encoder's frozen layers were not touched (weights nor BatchNorm statistics)
    sd = out["model"].state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "layer4.0.bn2.running_var", "layer4.0.conv2.weight"):
        assert torch.equal(sd[k], state[k]), k
    assert not torch.equal(sd["layer4.1.bn1.running_mean"], state["layer4.1.bn1.running_mean"])


def test_finetune_cached_val_and_paper_selection(tmp_path):
    fold = _tiny_fold(n_train=60)
    fold.groups_train = np.arange(60) // 3
    for sel in ("val", "paper"):
        args = get_args_parser().parse_args(["--data_path", "x", "--epochs", "3", "--selection", sel, *FAST])
        features = FeatureCache(None, args, torch.device("cpu"), keep_maps=True)
        out = run_finetune_cached_fold(fold, features, args, torch.device("cpu"))
        scores = out["val_accuracy"] if sel == "val" else out["test_accuracy_per_epoch"]
        assert len(scores) == 3 and out["selected"]["epoch"] == int(np.argmax(scores)) + 1
        if sel == "paper":
            assert (out["pred"] == fold.y_test).mean() == max(scores)


def test_val_selection_restores_the_weights_of_the_selected_epoch():
    """A stand-in network whose one weight is the epoch it finished; validation is best after
    epoch 2 of 4. The test predictions and the returned weights must be epoch 2's: a loop that
    records the best epoch but keeps the last weights (epoch 4) fails this."""
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

    model = Counter()

    def train_epoch(epoch):
        with torch.no_grad():
            model.w.fill_(epoch + 1)
        return 0.0

    y_val = np.zeros(4, dtype=int)
    val_scores = {1: 1, 2: 3, 3: 2, 4: 3}          # correct validation answers per epoch (first max: 2)
    predict_val = lambda: np.r_[np.zeros(val_scores[int(model.w)]), np.ones(4 - val_scores[int(model.w)])]
    predict_test = lambda: np.full(5, int(model.w))  # the test "prediction" names the epoch it came from
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), lambda e: 1.0)
    args = get_args_parser().parse_args(["--data_path", "x", "--epochs", "4", "--selection", "val"])
    out = train_and_select(model, train_epoch, sched, predict_test, np.zeros(5, dtype=int),
                              predict_val=predict_val, y_val=y_val, args=args)
    assert out["selected"]["epoch"] == 2 and out["val_accuracy"] == [0.25, 0.75, 0.5, 0.75]
    assert out["pred"].tolist() == [2] * 5 and float(model.w) == 2.0


# --------------------------------------------------------------------------- #
# several protocols in one run
# --------------------------------------------------------------------------- #
def test_comma_list_encodes_each_image_once_and_equals_single_runs(syn_small, tmp_path, capsys, monkeypatch):
    # bugs caught: an image encoded once per protocol or per fold, finetune_cached running the
    # frozen layers itself, one protocol's state (RNG, cache) changing another's result, a
    # protocol's JSON missing or overwritten by another's
    calls = []
    orig = build_resnet18

    def counting(n, state=None):
        model = orig(n, state)
        model.conv1.register_forward_hook(lambda m, i, o: calls.append(len(o)))
        return model

    for module in (evaluation.features, evaluation.protocols):  # the cache's encoder and the protocols' networks
        monkeypatch.setattr(module, "build_resnet18", counting)
    both = tmp_path / "both"
    code, out = _run(["--data_path", syn_small, "--protocol", "linear, knn,finetune_cached", "--epochs", "2",
                      "--knn_k", "5", "--out_dir", both, *FAST], capsys)
    assert code == 0, out.err[-2000:]
    distinct = {x.tobytes() for f in iter_folds(syn_small) for x in np.concatenate([f.X_train, f.X_test])}
    assert sum(calls) == len(distinct) == 30, (sum(calls), len(distinct))
    reports = {}
    for p in ("linear", "knn", "finetune_cached"):
        r = json.loads((both / f"eval_{p}_last.json").read_text())
        assert r["protocol"] == p and r["config"]["protocol"] == p
        assert r["summary"]["pooled_total"] == 30 and [f["fold"] for f in r["folds"]] == [1, 2, 3, 4, 5]
        assert r["wall_time_s"] > 0 and r["timing"]["shared_features"]["images_encoded"] == 30
        assert (both / f"confusion_{p}_last.png").stat().st_size > 1000
        reports[p] = r
    assert "k = 5" in reports["knn"]["selection_note"] and not reports["knn"]["optimistic"]
    assert all(f["selected"] == {"k": 5} for f in reports["knn"]["folds"])
    assert "no RandomResizedCrop" in reports["finetune_cached"]["protocol_note"]
    # each protocol alone gives the same folds
    for p in ("knn", "finetune_cached"):
        code, out = _run(["--data_path", syn_small, "--protocol", p, "--epochs", "2", "--knn_k", "5",
                          "--out_dir", tmp_path / p, *FAST], capsys)
        assert code == 0, out.err[-2000:]
        alone = json.loads((tmp_path / p / f"eval_{p}_last.json").read_text())
        assert [f["confusion_matrix"] for f in alone["folds"]] == [f["confusion_matrix"] for f in reports[p]["folds"]]
        if p == "finetune_cached":
            np.testing.assert_allclose([f["train_loss"] for f in alone["folds"]],
                                       [f["train_loss"] for f in reports[p]["folds"]], rtol=1e-5)


def test_evaluate_returns_one_result_per_protocol(syn_small, tmp_path, capsys):
    args = get_args_parser().parse_args(["--data_path", str(syn_small), "--protocol", "knn,linear",
                                            "--out_dir", str(tmp_path), *FAST])
    res = evaluate(args)
    assert set(res) == {"knn", "linear"} and res["linear"]["protocol"] == "linear"
    args.protocol = "knn"
    assert evaluate(args)["protocol"] == "knn"  # a single protocol: the result itself, as before


@pytest.mark.parametrize("argv, expect", [
    (["--protocol", "foo"], "--protocol"),
    (["--protocol", ""], "--protocol"),
    (["--protocol", "linear,,knn"], "--protocol"),
    (["--protocol", "linear,linear"], "twice"),
    (["--protocol", "linear,knn", "--gradcam", "1"], "no gradient"),
    (["--protocol", "knn", "--knn_k", "0"], "--knn_k"),
])
def test_bad_protocol_flags_are_one_line_errors_before_any_work(syn_small, tmp_path, capsys, argv, expect):
    out_dir = tmp_path / "o"
    code, out = _run(["--data_path", syn_small, "--out_dir", out_dir, *argv, *FAST], capsys)
    assert code == 2 and expect in out.err and "Traceback" not in out.err, out.err
    assert len([l for l in out.err.splitlines() if l.startswith("error:")]) == 1
    assert not out_dir.exists()  # nothing was done


def test_finetune_cached_gradcam(syn_small, tmp_path, capsys):
    """Grad-CAM explains the full ResNet-18 holding the trained layer4.1 + head (needs >= 33 px)."""
    code, out = _run(["--data_path", syn_small, "--protocol", "finetune_cached", "--epochs", "1",
                      "--gradcam", "1", "--out_dir", tmp_path, "--img_size", "64", "--workers", "0",
                      "--batch_size", "16"], capsys)
    assert code == 0, out.err[-2000:]
    r = json.loads((tmp_path / "eval_finetune_cached_last.json").read_text())
    assert r["gradcam"]["images"] == {"covid19": 5, "pneumonia": 5, "regular": 5}
    assert (tmp_path / "gradcam" / "gradcam_finetune_cached_last_random_fold1.png").is_file()
