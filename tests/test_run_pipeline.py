"""run_pipeline.py end to end in its --tiny mode: every stage script, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import run_pipeline
from utils.io import read_label, safe_pickle_load


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert run_pipeline.main(["--tiny", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("0 synthetic data", "1 A-SAM stage 1", "2 A-SAM stage 2", "3 A-SAM masks",
                  "4 mask pickles", "5 ACLUS pre-training", "6 evaluation"):
        assert f"=== {stage}" in printed
    assert "random init (seed 1)" in printed and "ACLUS pre-trained" in printed
    # pre-training read A-SAM's masks, not the generator's exact labels
    assert list((out / "data" / "train").glob("*/label_exact/*.png"))
    assert json.loads((out / "data" / "train" / "asam_classes.json").read_text())["1"] == "SynLung-Anatomy/1"
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"asam_montage.png", "pretrain_loss_curves.png", "confusion_aclus.png",
            "confusion_random_seed1.png"} <= figures
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["results"]["ACLUS pre-trained"]["accuracy_mean"] <= 1.0

    # what a broken stage would break, stage by stage
    data, runs = out / "data", out / "runs"
    images = sorted(data.glob("train/*/img/*.png"))
    labels = sorted(data.glob("train/*/label/*.png"))
    assert len(images) == 16 and [p.stem for p in labels] == [p.stem for p in images]       # 3: one mask each
    assert any(read_label(p).max() > 0 for p in labels)                                       # 3: anatomy found
    pairs = safe_pickle_load(data / "train_tf_img_to_gt.pkl")                                  # 4: every image
    assert len(pairs) == 16
    image, mask_pkl = (data / p for p in pairs[0])
    mask = safe_pickle_load(mask_pkl)
    assert mask.dtype.kind in "iu" and np.array_equal(mask, read_label(image.parent.parent / "label" / image.name))
    records = [json.loads(line) for line in (runs / "pretrain" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]                                      # 5: ACLUS, all terms
    assert len(epochs) == 1 and np.isfinite(epochs[0]["loss"])
    assert {"contrast/c5", "contrast/p2", "context/c5", "context/p2"} <= set(epochs[0])
    report = json.loads((runs / "eval_aclus" / "eval_linear_last.json").read_text())           # 6: all 5 folds
    assert report["init"] == "checkpoint" and len(report["folds"]) == 5
    assert sum(f["n_test"] for f in report["folds"]) == 15


def test_refuses_to_wipe_a_foreign_folder(tmp_path: Path, capsys):
    (tmp_path / "keep.txt").write_text("not ours")
    assert run_pipeline.main(["--tiny", "--out", str(tmp_path)]) == 1
    assert "was not made by run_pipeline.py" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").is_file()


def test_refuses_a_file_as_output_folder(tmp_path: Path, capsys):
    (tmp_path / "out").write_text("a file")
    assert run_pipeline.main(["--tiny", "--out", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'out'} is a file, not a folder" in capsys.readouterr().err


def test_failing_stage_is_named(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(run_pipeline, "REPO", tmp_path)  # no stage scripts there
    monkeypatch.setattr(run_pipeline.sys, "executable", str(tmp_path / "no-python"))
    assert run_pipeline.main(["--tiny", "--out", str(tmp_path / "demo")]) == 1
    assert "stage '0 synthetic data" in capsys.readouterr().err
