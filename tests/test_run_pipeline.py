"""run_pipeline.py end to end in its --tiny mode: every stage script, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import run_pipeline


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
