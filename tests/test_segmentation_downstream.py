"""The segmentation downstream task (evaluation_segmentation.py, evaluation/segmentation.py)."""
from __future__ import annotations

import json

import numpy as np
import torch

import evaluation_segmentation as es
from evaluation.segmentation import SegNet, SegSplit, fit, label_subsets, predict, score, strata


def test_label_subsets_are_nested_class_balanced_and_fixed_by_the_seed():
    groups = ["1"] * 40 + ["2"] * 20 + ["1+2"] * 10 + [""] * 5
    subsets = label_subsets(groups, (0.1, 0.25, 1.0), seed=3)
    assert len(subsets[1.0]) == len(groups)
    assert set(subsets[0.1]) <= set(subsets[0.25]) <= set(subsets[1.0])          # nested
    for f in (0.1, 0.25):
        kept = [groups[i] for i in subsets[f]]
        for g in set(groups):                                                     # each stratum its share
            n = groups.count(g)
            assert kept.count(g) == max(1, int(np.ceil(f * n))), (f, g)
    again = label_subsets(groups, (0.1, 0.25, 1.0), seed=3)
    assert all(np.array_equal(again[f], subsets[f]) for f in subsets)
    assert not np.array_equal(label_subsets(groups, (0.25,), seed=4)[0.25], subsets[0.25])
    assert strata(np.array([[[0, 2], [1, 1]], [[0, 0], [0, 0]], [[-1, 2], [0, 2]]])) == ["1+2", "", "2"]


def _disks(n: int, size: int, seed: int) -> SegSplit:
    """A bright disk of random place and radius on speckle: the label is its pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    X, Y = [], []
    for _ in range(n):
        cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 8))]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = rng.integers(0, 60, (size, size)) + 150 * disk
        X.append(np.repeat(img[None].astype(np.uint8), 3, 0))
        Y.append(disk.astype(np.int64))
    return SegSplit(np.stack(X), np.stack(Y), [str(i) for i in range(n)])


class _NoiseFeatures(torch.nn.Module):
    """Stands in for the encoder: features of the right shapes that ignore the image."""

    def __init__(self, encoder):
        super().__init__()
        self.resnet = encoder.resnet                                  # what the frozen variant freezes

    def forward(self, x):
        n, s = len(x), x.shape[-1]
        return {"c5": torch.randn(n, 512, s // 32, s // 32), "p4": torch.randn(n, 256, s // 16, s // 16),
                "p3": torch.randn(n, 256, s // 8, s // 8), "p2": torch.randn(n, 256, s // 4, s // 4)}


def test_a_decoder_on_an_encoder_that_carries_information_beats_one_on_noise(one_torch_thread):
    """Frozen random-init ResNet-18 (its features still say where the disk is) vs features of
    noise: a decoder that ignored its features, or labels misaligned with their images, would
    make both equal."""
    train, val, test = _disks(24, 32, 0), _disks(8, 32, 1), _disks(12, 32, 2)
    dice = {}
    for kind in ("encoder", "noise"):
        torch.manual_seed(0)
        model = SegNet(2)
        if kind == "noise":
            model.encoder = _NoiseFeatures(model.encoder)
        fit(model, "frozen", train, val, 2, epochs=12, batch_size=8, lr=3e-3, seed=0, device=torch.device("cpu"))
        dice[kind] = score(predict(model, test.X, torch.device("cpu")), test.Y, 2)["mean"]["dice"]
    assert dice["encoder"] > dice["noise"] + 0.2, dice


def test_the_frozen_variant_leaves_the_resnet_as_loaded(one_torch_thread):
    train = _disks(6, 32, 0)
    torch.manual_seed(0)
    model = SegNet(2)
    before = {k: v.clone() for k, v in model.encoder.resnet.state_dict().items()}
    fit(model, "frozen", train, train, 2, epochs=1, batch_size=3, lr=1e-2, seed=0, device=torch.device("cpu"))
    after = model.encoder.resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # weights and BatchNorm statistics
    fit(model, "finetune", train, train, 2, epochs=1, batch_size=3, lr=1e-2, seed=0, device=torch.device("cpu"))
    assert not torch.equal(before["conv1.weight"], model.encoder.resnet.state_dict()["conv1.weight"])


def test_the_script_on_a_samus_layout(tmp_path, capsys, one_torch_thread):
    from utils.synthetic_us import write_samus_layout

    root = write_samus_layout(tmp_path / "seg", n_images=14, size=48, seed=0)
    out = tmp_path / "o"
    assert es.main(["--data_root", str(root), "--dataset", "SynLung-Anatomy", "--img_size", "32", "--epochs", "1",
                    "--fractions", "0.5,1", "--batch_size", "4", "--device", "cpu", "--out_dir", str(out)]) == 0
    s = json.loads((out / "segmentation.json").read_text())
    assert [(r["variant"], r["fraction"]) for r in s["results"]] == [("frozen", 0.5), ("frozen", 1.0),
                                                                     ("finetune", 0.5), ("finetune", 1.0)]
    half, full = s["results"][0], s["results"][1]
    assert set(half["train_images"]) < set(full["train_images"]) and "leak" not in s
    assert set(half["test"]) == {"1", "2", "3", "mean"} and s["num_classes"] == 4 and s["init"] == "random"
    assert (out / "seg_finetune_f0.50.json").is_file()
    capsys.readouterr()
    assert es.main(["--data_root", str(root), "--dataset", "Nope", "--out_dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"evaluation_segmentation.py: error: --dataset Nope: not in {root}/MainPatient/class.json "
        "(SynLung-Anatomy, SynLung-Pleura)"]
    assert es.main(["--data_root", str(root), "--dataset", "SynLung-Anatomy", "--fractions", "0.1,1.5",
                    "--out_dir", str(tmp_path / "x")]) == 2
    assert "--fractions 1.5: must be in (0, 1]" in capsys.readouterr().err
