"""The segmentation study (study_segmentation.py, study/segmentation.py, study.stats.unit_bootstrap)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import study_segmentation as ss
from evaluation.segmentation import image_dice, score
from study import segmentation as seg
from study.stats import hierarchical_bootstrap, unit_bootstrap, unit_difference


def test_unit_bootstrap_has_the_two_level_variance_computed_by_hand():
    """Units [0, 1], [2, 2], [4, 6] (two seeds each). A replicate is the mean of 3 draws X, each
    a unit drawn uniformly and then the mean of 2 of its values drawn with replacement:
    E X = mean of unit means = 2.5; Var X = Var(unit means) + E(unit variance (ddof 0) / 2)
    = (4 + 0.25 + 6.25) / 3 + (0.125 + 0 + 0.5) / 3 = 3.70833; Var(replicate) = Var X / 3.
    Without the redraw of seeds within a unit it would be 3.5 / 3 (5.6 % less); without the
    redraw of units, 0.2083 / 3."""
    values = np.array([[0.0, 1.0], [2.0, 2.0], [4.0, 6.0]])
    reps = unit_bootstrap(values, n_boot=200_000, seed=0)
    assert reps.mean() == pytest.approx(2.5, abs=0.01)
    assert reps.var() == pytest.approx(3.708333 / 3, rel=0.015)
    # the same distribution as the fold bootstrap of the classification study
    folds = hierarchical_bootstrap(list(values), n_boot=200_000, seed=1)
    assert folds.mean() == pytest.approx(2.5, abs=0.01) and folds.var() == pytest.approx(3.708333 / 3, rel=0.015)
    assert np.array_equal(unit_bootstrap(values, 1000, seed=3), unit_bootstrap(values, 1000, seed=3, chunk=7))


def test_unit_difference_pairs_by_image_and_seed():
    rng = np.random.default_rng(0)
    base = {(f"im{i}", s): float(rng.uniform(0.3, 0.9)) for i in range(40) for s in (0, 1)}
    shifted = {k: v + 0.05 for k, v in base.items()}
    d = unit_difference(shifted, base, "aclus", "random", n_boot=2000)
    assert d.mean == pytest.approx(0.05) and d.lo == pytest.approx(0.05) and d.hi == pytest.approx(0.05)
    assert d.verdict == "higher" and d.n_pairs == 80
    noisy = {k: v + float(rng.normal(0, 0.1)) for k, v in base.items()}
    assert unit_difference(noisy, base, "byol", "random", n_boot=2000).verdict == "not distinguishable"
    # an image the reference lacks for a seed leaves the comparison; a seed only one arm has too
    partial = {k: v for k, v in base.items() if k != ("im0", 1)} | {("im1", 2): 0.5}
    assert unit_difference(shifted, partial, "a", "random", n_boot=200).n_pairs == 78
    assert unit_difference({}, base, "a", "random").verdict == "no pairs"


def test_image_dice_agrees_with_the_class_means_and_ignores_padding():
    y = np.zeros((3, 6, 6), dtype=np.int64)
    y[0, 1:3, 1:3] = 1
    y[1, 2:5, 2:5] = 1
    y[1, 0, 0] = 2
    y[:, :, 5] = -1                                              # letterbox padding
    p = np.zeros_like(y)
    p[0, 1:3, 1:2] = 1                                           # half of image 0's class 1
    p[1, 2:5, 2:5] = 1
    p[:, :, 5] = 1                                               # marks in the padding do not count
    per = image_dice(p, y, 3)
    assert per[0] == {"1": pytest.approx(2 * 2 / (2 + 4))} and per[1] == {"1": 1.0, "2": 0.0} and per[2] == {}
    s = score(p, y, 3)
    assert s["1"]["dice"] == pytest.approx(np.mean([per[0]["1"], per[1]["1"]]))
    assert s["2"]["dice"] == pytest.approx(0.0)


def _summary(dice_by_image: dict, fractions=(0.5, 1.0), variants=("frozen",)) -> dict:
    return {"results": [{"variant": v, "fraction": f, "n_train": 4, "selected_epoch": 1, "val_dice": 0.5,
                         "test": {"mean": {"dice": 0.5, "iou": 0.4, "hd95": float("nan")}},
                         "test_dice_per_image": dice_by_image, "seconds": 1.0}
                        for v in variants for f in fractions]}


def test_rows_done_and_the_table_pair_arms_with_random_init():
    images, runs = seg.rows_of(_summary({"a": {"1": 0.5, "2": 0.7}, "b": {"1": 0.2}}), dataset="D", arm="random",
                               seed=0)
    assert len(images) == 2 * 3 and runs[0]["hd95"] is None
    assert seg.image_values(images, "D", "random", "frozen", 1.0) == {("a", 0): pytest.approx(0.6), ("b", 0): 0.2}
    assert seg.done(runs, "D", "random", 0, ["frozen"], [0.5, 1.0])
    assert not seg.done(runs, "D", "random", 0, ["frozen", "finetune"], [0.5, 1.0])
    assert not seg.done(runs, "D", "random", 1, ["frozen"], [0.5, 1.0])
    better, _ = seg.rows_of(_summary({"a": {"1": 0.6, "2": 0.8}, "b": {"1": 0.3}}), dataset="D", arm="aclus", seed=0)
    better = [r | {"dice": r["dice"] + 0.2} if r["fraction"] == 0.5 else r for r in better]   # fractions kept apart
    md = seg.table(images + better, "D", "frozen", ["random", "aclus"], [0.5, 1.0], n_boot=500)
    assert "| 100% | aclus | 1 | 0.500 ± – | +0.100 [+0.100, +0.100] higher |" in md
    assert "| 50% | aclus | 1 | 0.700 ± – | +0.300 [+0.300, +0.300] higher |" in md
    assert "| 50% | random | 1 | 0.400 ± – | – |" in md


def _fake_study(tmp_path):
    study = tmp_path / "study"
    enc = study / "runs" / "byol" / "seed0"
    enc.mkdir(parents=True)
    torch.manual_seed(5)
    from study.bn_control import start_encoder

    state = {k: v for k, v in start_encoder(5).state_dict().items() if not k.startswith("fc.")}
    torch.save(state, enc / "encoder_resnet18.pth")
    (study / "stages").mkdir()
    (study / "stages" / "pretrain_byol_s0.json").write_text("{}")          # the study finished it
    mid = study / "runs" / "detcon_superpixel" / "seed0"                     # an encoder, the run not over
    mid.mkdir(parents=True)
    torch.save(state, mid / "encoder_resnet18.pth")
    return study


def test_waiting_is_answered_per_pair_by_the_call_that_looked_at_it():
    earlier = ["aclus seed 0", "aclus seed 1", "detcon seed 0"]
    assert ss.merge_waiting(earlier, [], {"aclus seed 0"}) == ["aclus seed 1", "detcon seed 0"]   # aclus 0 is done
    assert ss.merge_waiting(earlier, ["byol seed 2"], {"byol seed 2"}) == sorted(earlier + ["byol seed 2"])


def test_the_script_runs_resumes_and_renders(tmp_path, capsys, one_torch_thread):
    from utils.synthetic_us import write_samus_layout

    root = write_samus_layout(tmp_path / "seg", n_images=10, size=40, seed=0)
    study, results = _fake_study(tmp_path), tmp_path / "results"
    argv = ["--study", str(study), "--data_root", str(root), "--datasets", "SynLung-Anatomy",
            "--arms", "random,byol,aclus_superpixel,detcon_superpixel", "--seeds", "0", "--img_size", "32", "--pretrain_img_size", "32",
            "--epochs", "1", "--batch_size", "4", "--fractions", "0.5,1", "--variants", "frozen",
            "--threads", "1", "--results", str(results)]
    readme = (ss.REPO / "README.md").read_text()
    assert ss.main(argv) == 0
    assert (ss.REPO / "README.md").read_text() == readme          # a scratch --results leaves the docs alone
    out = capsys.readouterr().out
    assert "waiting for encoders: aclus_superpixel seed 0, detcon_superpixel seed 0" in out
    assert not (study / "runs" / "random").exists()                         # the study's folder untouched
    runs = (results / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 2 * 2                                # header + 2 arms x 2 fractions
    md = (results / "results.md").read_text()
    assert "**SynLung-Anatomy, frozen**" in md and "| 100% | byol | 1 |" in md
    settings = json.loads((results / "settings.json").read_text())
    assert settings["waiting"] == ["aclus_superpixel seed 0", "detcon_superpixel seed 0"] and settings["epochs"] == 1
    assert settings["datasets"] == ["SynLung-Anatomy"]
    assert (tmp_path / "study" / "eval_seg" / "stages" / "random_s0.json").is_file()
    assert ss.main(argv) == 0                                    # rows there: nothing runs again
    assert "[skip] SynLung-Anatomy byol seed 0" in capsys.readouterr().out
    # a call over one arm keeps the others' waiting entries (it was rewritten with its own arms only)
    narrow = argv[:argv.index("--arms") + 1] + ["byol"] + argv[argv.index("--arms") + 2:]
    assert ss.main(narrow) == 0
    assert json.loads((results / "settings.json").read_text())["waiting"] == settings["waiting"]
    # a baseline encoder the study wrote is used as it is, not written again
    bn = tmp_path / "study" / "runs" / "bn_control" / "seed0" / "encoder_resnet18.pth"
    bn.parent.mkdir(parents=True)
    bn.write_bytes((tmp_path / "study" / "eval_seg" / "encoders" / "random" / "seed0" / "encoder_resnet18.pth").read_bytes())
    stamp = bn.stat().st_mtime_ns
    assert ss.main([*argv[:7], "random,bn_control", *argv[8:]]) == 0
    assert bn.stat().st_mtime_ns == stamp and "[rows] SynLung-Anatomy bn_control seed 0" in capsys.readouterr().out
    assert ss.main([*argv, "--epochs", "2"]) == 2                # other settings: refused, one line
    assert capsys.readouterr().err.strip().splitlines() == [
        f"study_segmentation.py: error: {results / 'settings.json'}: its rows were made with epochs=1, now 2; "
        "use another --results"]
    assert ss.main([*argv[:4], "--datasets", "Nope", "--results", str(results)]) == 2
    assert "--datasets 'Nope': not in" in capsys.readouterr().err
    assert ss.main([*argv, "--fractions", "0.1,x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "study_segmentation.py: error: --fractions '0.1,x': expected a comma list of numbers in (0, 1]"]


def test_a_second_call_into_the_same_results_and_bad_numbers_are_one_line(tmp_path, capsys):
    """A --results folder another live call owns is refused before any work (two calls would each write
    back only their own rows); out-of-range numeric flags are one line each. Breaks if the lock is not
    taken, or a zero size reaches the evaluation."""
    from utils.run_lock import RunLock
    from utils.synthetic_us import write_samus_layout

    root = write_samus_layout(tmp_path / "seg", n_images=4, size=32, seed=0)
    study, results = _fake_study(tmp_path), tmp_path / "results"
    argv = ["--study", str(study), "--data_root", str(root), "--datasets", "SynLung-Anatomy", "--results", str(results)]
    results.mkdir()
    with RunLock(results):
        assert ss.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"study_segmentation.py: error: {results}: another run owns this folder")
    assert not (results / "settings.json").exists() and not (results / "run.lock").exists()
    for flag, value in (("--pretrain_img_size", "0"), ("--lr", "0.0"), ("--threads", "0")):
        assert ss.main([*argv, flag, value]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"study_segmentation.py: error: {flag} {value}: must be in "
                                                                f"{ss.NUMERIC_FLAGS[flag]}"]
