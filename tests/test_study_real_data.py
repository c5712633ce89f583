"""study_real_data.py: pure helpers, and the --smoke path on the real data (skips without it)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import study_real_data as srd
from study import StudyError, plan, report


def test_parse_and_plan_runs():
    assert plan.parse_run("byol") == plan.Run("byol", "byol", None, "superpixel")
    assert plan.parse_run("aclus_asam").mask_source == "asam"
    with pytest.raises(ValueError, match="unknown run 'detcon_sam'"):
        plan.parse_run("detcon_sam")
    runs, missing = plan.plan_runs(["byol", "detcon_superpixel", "aclus_asam"], {"superpixel"})
    assert [r.name for r in runs] == ["byol", "detcon_superpixel"]
    assert list(missing) == ["aclus_asam"] and "A-SAM" in missing["aclus_asam"]


def test_same_budget_for_every_run(tmp_path):
    def overrides(name):
        o = plan.pretrain_overrides(plan.parse_run(name), tmp_path / "d", tmp_path / name, img_size=112,
                                   batch_size=8, epochs=3, warmup_epochs=1, seed=0, workers=1,
                                   crop_scale=(0.2, 1.0), log_step=5)
        return dict(x.split("=", 1) for x in o[1::2])
    a, b = overrides("byol"), overrides("aclus_asam")
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"model.method", "checkpoint.ckpt_path"}
    assert a["data.resize_size"] == "112" and a["optimizer.total_epochs"] == "3" and a["seed"] == "0"


def test_equal_step_epochs():
    # the study's case: 362 frames give 45 steps per epoch at batch 8, 4 epochs = 180 steps;
    # A-SAM left 289 frames (36 steps per epoch), so 5 epochs = 180 steps
    assert plan.equal_step_epochs(289, 362, 8, 4, 1) == (5, 1)
    assert plan.equal_step_epochs(362, 362, 8, 4, 1) == (4, 1)
    assert plan.equal_step_epochs(365, 362, 8, 4, 1) == (4, 1)    # the largest set never shrinks
    assert plan.equal_step_epochs(100, 400, 10, 3, 1) == (12, 4)  # 120 steps, 10 per epoch
    assert plan.equal_step_epochs(289, 362, 16, 4, 1) == (5, 1)   # 88 steps wanted, 90 is closest
    with pytest.raises(StudyError, match="one batch"):
        plan.equal_step_epochs(7, 362, 8, 4, 1)


def test_table_and_helpers():
    ev = {"summary": {"accuracy_mean": 0.8, "accuracy_std": 0.05, "macro_f1_mean": 0.7, "macro_f1_std": 0.1,
                      "pooled_accuracy": 0.81}, "wall_time_s": 3.0}
    rows = [report.result_row("byol", "byol", None, {"images": 10, "steps": 4, "wall_s": 200.0}, ev),
            report.result_row("aclus_asam", "aclus", "asam", None, None, "no A-SAM masks")]
    md = report.markdown_table(rows)
    assert "| byol | byol | - (whole image) | 10 | 4 | 3.3 min | 0.800 ± 0.050 | 0.700 ± 0.100 | 0.810 |" in md
    assert "missing: no A-SAM masks" in md
    recs = [{"kind": "step", "step": 0}, {"kind": "step", "step": 7}, {"kind": "epoch", "epoch": 1, "seconds": 2.5},
            {"kind": "epoch", "epoch": 2, "seconds": 1.5}]
    assert report.log_summary(recs) == {"logged_steps_max": 8, "epochs_done": 2, "train_s": 4.0}
    assert report.pick_evenly(list(range(10)), 3) == [0, 3, 6] and report.pick_evenly([1], 4) == [1]
    import numpy as np
    st = report.label_stats([np.array([[0, 1], [2, 2]]), np.array([[3, 3], [3, 3]])])
    assert st == {"images": 2, "regions_mean": 1.5, "regions_min": 1, "regions_max": 2,
                  "background_fraction_mean": 0.125}
    assert "| A-SAM | 2 | 1.5 (1-2) | 0.125 |" in report.mask_stats_markdown({"asam": st})


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    base = ["--covid_blues", str(tmp_path), "--pocus", str(tmp_path), "--out", str(tmp_path / "o")]
    assert srd.main(base + ["--runs", "byol,simclr"]) == 2
    assert "unknown run 'simclr'" in capsys.readouterr().err
    assert srd.main(base + ["--mask_sources", "sam"]) == 2
    assert "unknown mask source 'sam'" in capsys.readouterr().err
    assert srd.main(base + ["--epochs", "2", "--warmup_epochs", "2"]) == 2
    assert "--warmup_epochs must be < --epochs" in capsys.readouterr().err
    assert srd.main(base + ["--asam_ckpt", str(tmp_path / "none.pt")]) == 2
    assert "--asam_ckpt" in capsys.readouterr().err
    assert srd.main(["--out", str(tmp_path / "o")]) == 2
    assert "--covid_blues and --pocus are required" in capsys.readouterr().err
    assert srd.main(["--report_only", "--out", str(tmp_path / "o")]) == 2
    assert "settings.json: not found" in capsys.readouterr().err


@pytest.mark.parametrize("bad_file, text, says", [
    ("settings.json", '{"args": ', "settings.json: not valid JSON"),
    ("settings.json", "[]", "settings.json: expected a JSON object"),
    ("settings.json", "{}", "settings.json: no 'args' section"),
    ("stages/pretrain_byol.json", "{", "pretrain_byol.json: not valid JSON"),
])
def test_corrupt_study_files_are_one_line_errors(tmp_path, capsys, bad_file, text, says):
    out = tmp_path / "o"
    (out / "stages").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"args": {"runs": "byol", "eval_selection": "last"}}))
    (out / bad_file).write_text(text)
    assert srd.main(["--report_only", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err and str(out) in err


def test_smoke_on_real_data(shared_data, tmp_path, capsys):
    """The whole study, tiny: 4 videos x 2 frames, superpixels, DetCon 4 steps, 5-fold probe."""
    blues, pocus = shared_data / "covid_blues", shared_data / "pocus"
    if not (blues / "lus_videos").is_dir() or not (pocus / "data").is_dir():
        pytest.skip("covid_blues/lus_videos or pocus/data missing in the shared data")
    out = tmp_path / "study"
    args = ["--covid_blues", str(blues), "--pocus", str(pocus), "--out", str(out), "--smoke",
            "--mask_sources", "superpixel", "--runs", "detcon_superpixel,aclus_asam"]
    r = subprocess.run([sys.executable, str(srd.REPO / "study_real_data.py"), *args], cwd=srd.REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    rows = {row["run"]: row for row in res["rows"]}
    assert rows["detcon_superpixel"]["accuracy_mean"] is not None and rows["detcon_superpixel"]["pretrain_images"] == 8
    assert rows["random init"]["accuracy_mean"] is not None and rows["aclus_asam"]["missing"]
    md = (out / "results.md").read_text()
    assert "| detcon_superpixel | detcon | Felzenszwalb superpixels | 8 |" in md
    assert "| Felzenszwalb superpixels | 8 |" in md and res["mask_stats"]["superpixel"]["images"] == 8
    settings = json.loads((out / "settings.json").read_text())
    assert settings["packages"]["torch"] and "pretrain_detcon_superpixel" in settings["stages"]
    assert "model.method=detcon" in settings["stages"]["pretrain_detcon_superpixel"]["cmd"]
    for fig in ("loss_detcon_superpixel.png", "masks_superpixel.png", "accuracy.png",
                "confusion_linear_last_detcon_superpixel.png", "confusion_linear_last_random.png"):
        assert (out / "figures" / fig).is_file(), fig
    # a second invocation skips every finished stage and rebuilds the report
    assert srd.main(args) == 0
    printed = capsys.readouterr().out
    assert "[run ]" not in printed and "[skip] pretrain_detcon_superpixel" in printed
    (out / "results.md").unlink()
    assert srd.main(["--report_only", "--out", str(out)]) == 0
    assert "| detcon_superpixel | detcon | Felzenszwalb superpixels | 8 |" in (out / "results.md").read_text()
    assert "[run ]" not in capsys.readouterr().out
    # the same folder with another budget is refused, naming the stage
    assert srd.main(args + ["--seed", "5"]) == 1
    assert "fixed_budget.seed=0, now 5" in capsys.readouterr().err
    assert json.loads((out / "settings.json").read_text())["args"]["seed"] == 0
