"""study_real_data.py: presets, result files, rendering, and the smoke preset on the real data (skips without it)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

import study_real_data as srd
from study import StudyError, plan, provenance, render
from study import results as res


def test_parse_runs():
    assert plan.parse_run("byol") == plan.Run("byol", "byol", None, "superpixel")
    assert plan.parse_run("aclus_asam").mask_source == "asam"
    assert plan.parse_run("detcon_sam_auto") == plan.Run("detcon_sam_auto", "detcon", "sam_auto", "sam_auto")
    assert plan.parse_run("aclus_asam_lung") == plan.Run("aclus_asam_lung", "aclus", "asam_lung", "asam_lung")
    assert plan.parse_run("lightly_byol") == plan.Run("lightly_byol", "lightly_byol", None, "superpixel")
    with pytest.raises(ValueError, match="unknown run 'detcon_sam'"):
        plan.parse_run("detcon_sam")


def test_a_model_made_source_without_its_checkpoint_names_the_flag():
    runs, missing = plan.plan_runs(["byol", "aclus_asam_lung", "detcon_asam"], {"superpixel"})
    assert [r.name for r in runs] == ["byol"]
    assert "--asam_lung_ckpt not given" in missing["aclus_asam_lung"]
    assert "--asam_ckpt / --asam_masks not given" in missing["detcon_asam"]


def test_presets_name_only_protocols_the_evaluation_knows():
    """A preset protocol evaluation_aclus.py lacks would fail hours into a study."""
    from evaluation.protocols import PROTOCOLS

    for preset in plan.PRESETS.values():
        assert set(preset.protocols) <= set(PROTOCOLS), preset.name


class _RecordingStages:
    """A stand-in for ResumableStages: records (name, command, outputs) and runs nothing."""

    def __init__(self):
        self.calls = []

    def run(self, name, cmd, outputs, note=""):
        self.calls.append((name, cmd, outputs))


def test_every_mask_source_makes_its_label_tree_or_says_what_it_needs(tmp_path):
    """Every registered source, given its flags, runs one stage per stage it needs whose outputs
    include <labels>/COVID-BLUES/label (what the pair lists read); a model-made source without its
    flags runs nothing and names the flag. Breaks if an entry writes elsewhere, if the parser lacks
    a flag a source reads, or if a source without its checkpoint still runs a stage."""
    from study.mask_sources import MASK_SOURCES, SUB, MaskJob

    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"")
    given = srd.get_args_parser().parse_args(["--asam_ckpt", str(ckpt), "--asam_lung_ckpt", str(ckpt)])
    bare = srd.get_args_parser().parse_args([])
    assert set(plan.MASK_SOURCES) == set(MASK_SOURCES)
    for name, source in MASK_SOURCES.items():
        labels = tmp_path / "masks" / name
        st = _RecordingStages()
        assert source.make(MaskJob(given, st, tmp_path, tmp_path / "frames", labels, "python")) is None, name
        assert st.calls and labels / SUB / "label" in st.calls[-1][2], (name, st.calls)
        st = _RecordingStages()
        why = source.make(MaskJob(bare, st, tmp_path, tmp_path / "frames", labels, "python"))
        if source.needs:
            assert why and not st.calls and not source.given(bare), (name, why, st.calls)
            assert source.given(given)
            assert any(flag in why for flag in source.needs.split(" / ")), (name, why)
        else:
            assert why is None and st.calls, name


def test_the_study_builds_an_asam_that_learns_absence(tmp_path):
    """--asam_build trains stage 2 with negatives and the mask loss on present lines (issue 27), and
    masks the frames with the checkpoint it built. Breaks if the build drops the absence flags (its
    presence head would see no absent target) or infers with another checkpoint."""
    from study.mask_sources import MASK_SOURCES, MaskJob

    args = srd.get_args_parser().parse_args(["--asam_build", str(tmp_path / "seg")])
    st = _RecordingStages()
    assert MASK_SOURCES["asam"].make(MaskJob(args, st, tmp_path, tmp_path / "frames", tmp_path / "l", "py")) is None
    (name, build, outputs), (_, infer, _) = st.calls
    assert name == "asam_build" and build[1] == "SAM/train_auto_prompter.py"
    assert build[build.index("--negative_rate") + 1] == "0.5", build
    assert build[build.index("--mask_loss_on") + 1] == "present", build
    assert infer[infer.index("--ckpt") + 1] == str(outputs[0]), (infer, outputs)


def test_cpu_and_gpu_presets_plan_what_the_issue_asks():
    """The CPU preset: stride-10 corpus, 3 seeds, probes at 25/50/100 %, three protocols; the GPU preset:
    224 px, batch >= 192, >= 100 epochs with 3 warm-up, autocast on CUDA, the paper's fine-tune."""
    cpu, gpu = plan.PRESETS["cpu"], plan.PRESETS["gpu"]
    assert cpu.frame_stride == 10 and len(cpu.seeds) >= 3 and cpu.fractions == (0.25, 0.5, 1.0)
    assert set(cpu.protocols) == {"linear", "knn", "finetune_cached"} and cpu.device == "cpu"
    assert gpu.img_size == 224 and gpu.batch_size >= 192 and gpu.epochs >= 100 and gpu.warmup_epochs == 3
    assert gpu.device == "cuda" and "finetune" in gpu.protocols and len(gpu.seeds) >= 3
    o = plan.pretrain_overrides(plan.parse_run("aclus_asam"), srd.REPO / "d", srd.REPO / "r", img_size=gpu.img_size,
                                batch_size=gpu.batch_size, epochs=gpu.epochs, warmup_epochs=gpu.warmup_epochs,
                                seed=1, workers=gpu.workers, crop_scale=gpu.crop_scale, log_step=5,
                                fractions=plan.arm_fractions("aclus_asam", gpu), extra=gpu.overrides)
    o = dict(x.split("=", 1) for x in o[1::2])
    assert o["amp.opt_level"] == "O1" and o["data.cache"] == "memory" and o["data.train_batch_size"] == "192"
    assert o["checkpoint.snapshot_fractions"] == "[0.25, 0.5]" and o["optimizer.warmup_epochs"] == "3"
    # the overrides make a valid config of the preset's base config
    from pretraining.config import load_config
    cfg = load_config(srd.REPO / gpu.base_config, [f"{k}={v}" for k, v in o.items()])
    assert cfg.checkpoint.snapshot_fractions == (0.25, 0.5) and cfg.data.resize_size == 224
    assert plan.arm_fractions("random", gpu) == (0.0,)
    assert len(plan.expected_keys("byol", cpu)) == 3 * 3 * 5 and len(plan.expected_keys("random", cpu)) == 3 * 5


def test_same_budget_for_every_run(tmp_path):
    def overrides(name):
        o = plan.pretrain_overrides(plan.parse_run(name), tmp_path / "d", tmp_path / name, img_size=112,
                                    batch_size=8, epochs=3, warmup_epochs=1, seed=0, workers=1,
                                    crop_scale=(0.2, 1.0), log_step=5, fractions=(0.25, 0.5, 1.0))
        return dict(x.split("=", 1) for x in o[1::2])
    a, b = overrides("byol"), overrides("aclus_asam")
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"model.method", "checkpoint.ckpt_path"}
    assert a["data.resize_size"] == "112" and a["optimizer.total_epochs"] == "3" and a["seed"] == "0"


def test_equal_step_epochs():
    # 362 frames give 45 steps per epoch at batch 8, 4 epochs = 180 steps;
    # A-SAM left 289 frames (36 steps per epoch), so 5 epochs = 180 steps, warm-up 1.25 epochs = 45 steps
    assert plan.equal_step_epochs(289, 362, 8, 4, 1) == (5, 1.25)
    assert plan.equal_step_epochs(362, 362, 8, 4, 1) == (4, 1)
    assert plan.equal_step_epochs(365, 362, 8, 4, 1) == (4, 1)    # the largest set never shrinks
    assert plan.equal_step_epochs(100, 400, 10, 3, 1) == (12, 4)  # 120 steps, 10 per epoch
    # cpu_long: the lung A-SAM finds anatomy on 3,226 of the 3,323 frames: 41 x 50 = 2,050 steps for 40 x 51 = 2,040
    assert plan.equal_step_epochs(3226, 3323, 64, 40, 2) == (41, 2.04)
    with pytest.raises(StudyError, match="one batch"):
        plan.equal_step_epochs(7, 362, 8, 4, 1)


def _eval_json(protocol, accs):
    return {"protocol": protocol, "folds": [{"fold": k + 1, "n_test": 10, "accuracy": a, "macro_f1": a - 0.1}
                                            for k, a in enumerate(accs)]}


def test_rows_files_and_resume_keys(tmp_path):
    rows = res.fold_rows(_eval_json("knn", [0.5, 0.6, 0.7, 0.8, 0.9]), arm="byol", method="byol", mask_source=None,
                         seed=2, fraction=0.5, steps=48)
    assert [r["fold"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["protocol"] == "knn" and rows[0]["steps"] == 48
    path = tmp_path / "per_fold.csv"
    res.write_rows(path, rows, res.FOLD_COLUMNS)
    back = res.read_rows(path, res.FOLD_COLUMNS)
    assert back == [{**r, "mask_source": None} for r in rows]
    # a re-evaluated probe point replaces its rows instead of adding duplicates
    again = res.fold_rows(_eval_json("knn", [0.1] * 5), arm="byol", method="byol", mask_source=None, seed=2,
                          fraction=0.5, steps=48)
    merged = res.replace_rows(back, again, ("arm", "seed", "fraction", "protocol", "fold"))
    assert len(merged) == 5 and {r["accuracy"] for r in merged} == {0.1}
    assert res.done_keys(merged, "byol", 2) == {(0.5, "knn", k) for k in range(1, 6)}
    assert res.done_keys(merged, "byol", 1) == set()
    # cost of a run: images and forward passes follow from steps x batch and the method
    run = res.run_row(arm="aclus_asam", method="aclus", mask_source="asam", seed=0, frames=100, batch_size=32,
                      epochs=2, steps=6, train_s=1.0, wall_s=2.0)
    assert run["images"] == 192 and run["online_passes"] == 576 and run["target_passes"] == 576
    loss = res.loss_rows([{"kind": "step", "step": 3, "lr": 0.1, "loss": 2.0, "infonce/c5": 1.5},
                          {"kind": "epoch", "epoch": 1, "loss": 9.0}], "aclus_asam", 0)
    assert {(r["term"], r["value"]) for r in loss} == {("loss", 2.0), ("infonce/c5", 1.5)}
    (tmp_path / "bad.csv").write_text("arm,seed\nx,1\n")
    with pytest.raises(StudyError, match="bad.csv: missing column"):
        res.read_rows(tmp_path / "bad.csv", res.FOLD_COLUMNS)
    (tmp_path / "bad2.csv").write_text(res.to_csv(rows, res.FOLD_COLUMNS).replace(",48,", ",many,"))
    with pytest.raises(StudyError, match="bad2.csv: line 2"):
        res.read_rows(tmp_path / "bad2.csv", res.FOLD_COLUMNS)


def _study_rows(shift: float, noise: float = 0.0):
    """Per (seed, fold): random = a base that varies by fold and seed, byol = base + uniform noise,
    aclus_asam = base + shift (half the shift at 50 % of the steps)."""
    import random as rnd

    g = rnd.Random(0)
    rows = []
    for seed in range(3):
        for fold in range(1, 6):
            base = 0.6 + 0.05 * fold + 0.01 * seed
            for arm, frac, value in (("random", 0.0, base), ("byol", 1.0, base + g.uniform(-noise, noise)),
                                     ("byol", 0.5, base), ("aclus_asam", 1.0, base + shift),
                                     ("aclus_asam", 0.5, base + shift / 2)):
                rows.append({"arm": arm, "method": arm, "mask_source": "", "seed": seed, "fraction": frac,
                             "steps": int(100 * frac), "protocol": "linear", "fold": fold, "n_test": 10,
                             "accuracy": value, "macro_f1": value})
    return rows


def test_render_states_differences_with_intervals_and_splices_the_docs(tmp_path):
    """A paired shift of +0.03 must read "higher" against both references; byol (noise around random) must
    read "not distinguishable"; tables are rendered into the marked block of a document and nowhere else."""
    rows = _study_rows(0.03, noise=0.02)
    settings = {"preset": plan.PRESETS["cpu"].to_dict(), "where": "CPU, 2 cores", "steps": 100}
    block = render.summary_block(rows, settings)
    assert "**aclus_asam** (primary) vs random: +0.030 [+0.030, +0.030] higher" in block
    assert "vs byol: " in block and "higher" in block.split("vs byol: ")[1].split("\n")[0]
    assert "**byol** (secondary) vs random:" in block
    assert "not distinguishable" in block.split("**byol** (secondary) vs random:")[1].split("\n")[0]
    assert "resamples the folds, then the seeds within each drawn fold" in block
    assert ", 100 steps per pre-trained arm; seeds" in block
    for r in rows:  # an arm whose frames divide into other epochs: its count is named beside the plan's
        r["steps"] += 2 if r["arm"] == "aclus_asam" and r["fraction"] == 1.0 else 0
    assert ", 100 steps per pre-trained arm (aclus_asam 102: whole epochs over the frames its masks keep); seeds" \
        in render.summary_block(rows, settings)
    curve = render.curve_table(rows, "linear")
    assert "| aclus_asam | 0.775 ± 0.074; vs random +0.015 [+0.015, +0.015] higher | 0.790 ± " in curve
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{render.BEGIN}\nold\n{render.END}\noutro\n")
    md = render.render_all(tmp_path, rows, [], [], {}, settings, docs=(doc,))
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{render.END}\noutro\n") and "\nold\n" not in text
    assert "higher" in text and md.is_file() and (tmp_path / "accuracy_linear.png").is_file()
    assert (tmp_path / "curve_linear.png").is_file()
    with pytest.raises(ValueError, match="no '<!-- study:begin -->'"):
        render.splice("no markers", "x", "README.md")


def test_schedule_table_says_at_which_probe_points_an_arm_differs():
    """aclus_asam is +shift/2 at 50 % and +shift at 100 % of its steps on every (seed, fold); byol equals
    random init at 50 %: the table names both points for a gain, both for a loss, and none for byol. With
    aclus_asam below random at 50 % and above it at 100 %, both verdicts appear at their own point (a bug
    that compared every point at the end, or dropped "lower", fails it)."""
    up = render.schedule_table(_study_rows(0.03), "linear")
    assert "| aclus_asam | higher at 50%, 100% | higher at 50%, 100% |" in up
    assert "| byol | not distinguishable at any point | – |" in up
    down = render.schedule_table(_study_rows(-0.03), "linear")
    assert "| aclus_asam | lower at 50%, 100% | lower at 50%, 100% |" in down
    dip = [{**r, "accuracy": r["accuracy"] - 0.03} if (r["arm"], r["fraction"]) == ("aclus_asam", 0.5) else r
           for r in _study_rows(0.03)]                             # 50 %: base - 0.015; 100 %: base + 0.03
    assert "| aclus_asam | higher at 100%; lower at 50% |" in render.schedule_table(dip, "linear")
    end_only = [r for r in _study_rows(0.03) if r["fraction"] in (0.0, 1.0)]
    assert render.schedule_table(end_only, "linear") == ""          # one probe point: nothing over a schedule


def test_a_results_folder_splices_only_its_own_block(tmp_path):
    """render_all with block_name 'study_cpu_long' rewrites that block and leaves the 'study' block alone."""
    rows = _study_rows(0.03)
    settings = {"preset": plan.PRESETS["cpu_long"].to_dict(), "where": "CPU", "steps": 100}
    doc = tmp_path / "README.md"
    doc.write_text("a\n<!-- study:begin -->\nshort\n<!-- study:end -->\n"
                   "b\n<!-- study_cpu_long:begin -->\nold\n<!-- study_cpu_long:end -->\n")
    render.render_all(tmp_path, rows, [], [], {}, settings, docs=(doc,), block_name="study_cpu_long")
    text = doc.read_text()
    assert "\nshort\n" in text and "\nold\n" not in text
    assert "Over the schedule" in text.split("<!-- study_cpu_long:begin -->")[1]


@pytest.mark.parametrize("name", ["study", "study_cpu_long"])
def test_the_committed_study_blocks_are_rendered_from_their_files(name):
    """README / RESULTS hold what summary_block makes of the committed rows (a hand edit, or rows added
    without --render_only, fails: run python study_real_data.py --render_only --results docs/results/<name>)."""
    from study.results import Results, read_json

    results = srd.REPO / "docs" / "results" / name
    block = render.summary_block(Results(results).rows, read_json(results / "settings.json"))
    begin, end = render.markers(name)
    docs = [srd.REPO / "docs" / "RESULTS.md"] + ([srd.REPO / "README.md"] if name == "study_cpu_long" else [])
    for doc in docs:
        text = doc.read_text()
        assert begin in text, f"{doc.name}: no {begin} block"
        assert render.splice(text, block, doc.name, begin, end) == text, f"{doc.name}: block {name} is stale"


def test_cpu_long_preset_and_its_sweep_variants():
    """The long preset of the campaign: 64 px, batch 64, >= 40 epochs, ~5 % warm-up, probes at 10/25/50/100 %;
    a sweep point (other epochs / base_lr) keeps the warm-up's share, is named, and its rows live apart."""
    p = plan.PRESETS["cpu_long"]
    assert (p.img_size, p.batch_size, p.frame_stride) == (64, 64, 10) and p.epochs >= 40
    assert p.warmup_epochs / p.epochs == pytest.approx(0.05) and p.fractions == (0.1, 0.25, 0.5, 1.0)
    assert set(p.protocols) == {"linear", "knn", "finetune_cached"} and p.base_lr is not None
    same, name = plan.variant_of(p, epochs=p.epochs, base_lr=p.base_lr)
    assert same == p and name == ""
    v, name = plan.variant_of(p, epochs=10, base_lr=8.0)
    assert name == "epochs10_base_lr8" and v.epochs == 10 and v.base_lr == 8.0
    assert v.warmup_epochs == pytest.approx(0.5) and v.fractions == p.fractions
    assert plan.variant_of(p, epochs=10, base_lr=p.base_lr)[1] == f"epochs10_base_lr{p.base_lr:g}"  # both values named
    assert srd.default_results("cpu_long", srd.REPO, name) == srd.REPO / "docs/results/study_cpu_long/variants" / name


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    base = ["--covid_blues", str(tmp_path), "--pocus", str(tmp_path), "--out", str(tmp_path / "o")]
    assert srd.main(base + ["--epochs", "0"]) == 2
    assert "--epochs 0" in capsys.readouterr().err
    assert srd.main(base + ["--base_lr", "nan"]) == 2
    assert "--base_lr nan" in capsys.readouterr().err
    assert srd.main(base + ["--arms", "byol,simclr"]) == 2
    assert "--arms: unknown run 'simclr'" in capsys.readouterr().err
    assert srd.main(base + ["--seeds", "0,a"]) == 2
    assert "--seeds '0,a'" in capsys.readouterr().err
    assert srd.main(base + ["--asam_ckpt", str(tmp_path / "none.pt")]) == 2
    assert "--asam_ckpt" in capsys.readouterr().err
    assert srd.main(["--out", str(tmp_path / "o")]) == 2
    assert "--covid_blues and one of --pocus or --downstream are required" in capsys.readouterr().err
    assert srd.main(base + ["--downstream", str(tmp_path)]) == 2          # both downstream sets at once
    assert "one of --pocus or --downstream" in capsys.readouterr().err
    assert srd.main(["--render_only", "--results", str(tmp_path / "r")]) == 1
    assert "settings.json: not found" in capsys.readouterr().err


def test_results_made_with_other_settings_are_refused(tmp_path):
    res.write_json(tmp_path / "settings.json", {"preset": {**plan.PRESETS["cpu"].to_dict(), "img_size": 64}})
    (tmp_path / "per_fold.csv").write_text(",".join(res.FOLD_COLUMNS) + "\n")
    with pytest.raises(StudyError, match="preset img_size=64, now 112"):
        res.check_results_folder(tmp_path, plan.PRESETS["cpu"])
    res.check_results_folder(tmp_path, plan.PRESETS["cpu"].__class__(**{**plan.PRESETS["cpu"].to_dict(),
                                                                        "img_size": 64, "seeds": (7,)}))
    cpu = plan.PRESETS["cpu"].to_dict()
    res.write_json(tmp_path / "settings.json", {"preset": {**cpu, "base_lr": None}})
    with pytest.raises(StudyError, match="preset base_lr=None, now 2.0"):     # None is a setting too
        res.check_results_folder(tmp_path, plan.PRESETS["cpu"].__class__(**{**cpu, "base_lr": 2.0}))
    res.write_json(tmp_path / "settings.json", {"preset": {k: v for k, v in cpu.items() if k != "base_lr"}})
    res.check_results_folder(tmp_path, plan.PRESETS["cpu"])                   # a key newer than the rows


def test_corrupt_result_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "settings.json").write_text('{"preset": ')
    assert srd.main(["--render_only", "--results", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "settings.json: not valid JSON" in err


def test_smoke_preset_on_real_data(shared_data, tmp_path, capsys):
    """The whole study, tiny: 4 videos x 2 frames, superpixels, 2 seeds, DetCon probed at 50 / 100 %,
    every protocol; a re-run skips every stage, and a study folder without its checkpoints and evaluations
    but with the results folder (another machine) re-runs nothing whose rows are there."""
    blues, pocus = shared_data / "covid_blues", shared_data / "pocus"
    if not (blues / "lus_videos").is_dir() or not (pocus / "data").is_dir():
        pytest.skip("covid_blues/lus_videos or pocus/data missing in the shared data")
    out, results = tmp_path / "study", tmp_path / "results"
    args = ["--covid_blues", str(blues), "--pocus", str(pocus), "--out", str(out), "--results", str(results),
            "--preset", "smoke", "--arms", "random,bn_control,detcon_superpixel,aclus_asam"]
    r = subprocess.run([sys.executable, str(srd.REPO / "study_real_data.py"), *args], cwd=srd.REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = res.read_rows(results / "per_fold.csv", res.FOLD_COLUMNS)
    smoke = plan.PRESETS["smoke"]
    for arm in ("random", "bn_control", "detcon_superpixel"):
        for seed in smoke.seeds:
            assert res.done_keys(rows, arm, seed) == plan.expected_keys(arm, smoke), (arm, seed)
    assert not any(r["arm"] == "aclus_asam" for r in rows)
    settings = json.loads((results / "settings.json").read_text())
    assert "aclus_asam" in settings["missing_arms"] and settings["pending"] == []
    assert settings["corpus"]["frames"] == 8 and settings["steps"] == 2 * (8 // 4)
    runs = res.read_rows(results / "runs.csv", res.RUN_COLUMNS)
    assert {(x["arm"], x["seed"]) for x in runs} == {("detcon_superpixel", 0), ("detcon_superpixel", 1)}
    assert res.read_rows(results / "loss.csv", res.LOSS_COLUMNS)
    stats = json.loads((results / "mask_stats.json").read_text())
    assert stats["superpixel"]["frames"] == 8
    assert (results / "results.md").is_file() and (results / "accuracy_knn.png").is_file()
    # the same folders again: every stage is skipped
    assert srd.main(args) == 0
    printed = capsys.readouterr().out
    assert "[run ]" not in printed
    # another machine: no checkpoints, evaluations or their stage records, only the committed results
    # folder (and, to keep the test short, the frames, masks and folds) -> nothing whose rows exist runs again
    for gone in ("runs", "eval"):
        shutil.rmtree(out / gone)
    for rec in (out / "stages").glob("*.json"):
        if rec.stem.startswith(("pretrain_", "eval_", "random_", "bn_control_")):
            rec.unlink()
    assert srd.main(args) == 0
    printed = capsys.readouterr().out
    assert "[run ] pretrain" not in printed and "[run ] eval" not in printed
    assert "[skip] detcon_superpixel seed 1: its rows are in" in printed
    # --render_only rebuilds the report from the results folder alone
    (results / "results.md").unlink()
    assert srd.main(["--render_only", "--results", str(results)]) == 0
    assert "detcon_superpixel" in (results / "results.md").read_text()


def test_the_render_names_the_downstream_set_of_the_settings(tmp_path):
    rows = _study_rows(0.03)
    settings = {"preset": plan.PRESETS["cpu"].to_dict(), "where": "CPU", "steps": 100,
                "downstream": {"name": "BUSI", "folds": 4, "split": "grouped by groups.csv"}}
    assert "the same 4 BUSI folds (grouped by groups.csv) for every arm" in render.summary_block(rows, settings)
    md = render.results_markdown(rows, [], {}, settings, [])
    assert md.startswith("# Pre-training study: COVID-BLUES -> BUSI (4 folds)") and "POCUS" not in md
    old = {k: v for k, v in settings.items() if k != "downstream"}        # a settings.json of before
    assert "the same 5 POCUS folds (split by video)" in render.summary_block(rows, old)


def test_the_study_on_another_downstream_set(shared_data, tmp_path, capsys):
    """--downstream: an ImageFolder of three classes instead of POCUS; its split is made once and
    every evaluation of the study uses it; a results folder of POCUS rows refuses it."""
    import cv2
    import numpy as np

    blues = shared_data / "covid_blues"
    if not (blues / "lus_videos").is_dir():
        pytest.skip("covid_blues/lus_videos missing in the shared data")
    mine = tmp_path / "my_set"
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(("a", "b", "c")):
        for i in range(10):
            (mine / cls).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mine / cls / f"p{i}_0.png"), rng.integers(0, 40, (30, 40), dtype=np.uint8) + 70 * ci)
    out, results = tmp_path / "study", tmp_path / "results"
    args = ["--covid_blues", str(blues), "--downstream", str(mine), "--downstream_group_rule", r"^(p\d+)_",
            "--out", str(out), "--results", str(results), "--preset", "smoke", "--arms", "random"]
    assert srd.main(args) == 0
    settings = json.loads((results / "settings.json").read_text())
    assert settings["downstream"] == {"name": "my_set", "layout": "imagefolder", "folds": 5,
                                      "classes": ["a", "b", "c"], "split": "grouped by the rule ^(p\\d+)_"}
    split = (out / "downstream" / "split.csv").read_text()
    evals = list((out / "eval").rglob("split.csv"))
    assert evals and all(p.read_text() == split for p in evals)
    assert "my_set folds" in (results / "results.md").read_text()
    capsys.readouterr()
    pocus_args = [a for a in args if a not in ("--downstream", str(mine), "--downstream_group_rule", r"^(p\d+)_")]
    assert srd.main(pocus_args + ["--pocus", str(tmp_path)]) == 1
    assert "its rows were evaluated on" in capsys.readouterr().err


def test_default_results_folders(tmp_path):
    """The CPU and GPU presets commit to docs/results; a smoke run never writes into the repository."""
    assert srd.default_results("cpu", tmp_path) == srd.REPO / "docs/results/study"
    assert srd.default_results("gpu", tmp_path) == srd.REPO / "docs/results/study_gpu"
    assert srd.default_results("smoke", tmp_path) == tmp_path / "results"


def test_settings_record_paths_from_the_repository_root():
    assert provenance.portable(str(srd.REPO.parent / "shared" / "data")) == "../shared/data"
    assert provenance.portable(str(srd.REPO / "docs" / "results")) == "docs/results"
    assert provenance.portable("--preset") == "--preset" and provenance.portable("relative/x") == "relative/x"


def test_settings_name_no_local_folder_and_every_default_arm_not_run():
    assert provenance.recorded_command(["--out", "/home/me/s", "--seeds", "0", "--out=/x"]) == \
        ["--out", "<local study folder>", "--seeds", "0", "--out=<local study folder>"]
    inside = str(srd.REPO / "runs" / "a.pt")
    assert provenance.recorded_command(["--asam_lung_ckpt=" + inside, inside]) == \
        ["--asam_lung_ckpt=runs/a.pt", "runs/a.pt"]
    a = srd.get_args_parser().parse_args(["--arms", "random,byol"])
    why = srd.arms_not_run(["random", "byol"], {}, a)
    assert set(why) == set(plan.DEFAULT_ARMS) - {"random", "byol"}
    assert why["aclus_asam"] == "not in this run's --arms; it needs --asam_ckpt / --asam_masks"
    assert why["detcon_superpixel"] == "not in this run's --arms"
    kept = srd.arms_not_run(["aclus_asam"], {"aclus_asam": "no A-SAM checkpoint"}, a)
    assert kept["aclus_asam"] == "no A-SAM checkpoint"


def test_settings_say_which_commit_made_which_pairs():
    """A study over several sittings at several commits: each (arm, seed) finished in a sitting is
    listed under that sitting's commit, never moved to a later one, and nothing is listed twice."""
    made = res.attribute_pairs({}, "aaa", set(), {"random seed 0", "byol seed 0"})
    assert made == {"aaa": ["byol seed 0", "random seed 0"]}
    made = res.attribute_pairs(made, "bbb", {"random seed 0", "byol seed 0"},
                               {"random seed 0", "byol seed 0", "aclus_superpixel seed 0"})
    assert made == {"aaa": ["byol seed 0", "random seed 0"], "bbb": ["aclus_superpixel seed 0"]}
    assert res.attribute_pairs(made, "ccc", set(), {"byol seed 0"}) == made   # re-listed: stays with aaa
    from study.provenance import code_version

    assert code_version({"commit": "aaa", "modified_tracked_files": []}) == "aaa"
    assert code_version({"commit": "aaa", "modified_tracked_files": [" M models/losses.py"]}) == "aaa+modified"


def test_a_study_killed_without_its_finally_keeps_which_commit_made_its_rows(shared_data, tmp_path):
    """A lost machine ends the study with no ``finally``: settings.json, written after every finished
    (arm, seed), still lists the pairs that have rows (``made_by``) and what is pending."""
    blues, pocus = shared_data / "covid_blues", shared_data / "pocus"
    if not (blues / "lus_videos").is_dir() or not (pocus / "data").is_dir():
        pytest.skip("covid_blues/lus_videos or pocus/data missing in the shared data")
    results = tmp_path / "results"
    results.mkdir()
    (results / "settings.json").write_text(json.dumps({"note": "written by hand"}))  # kept by the study
    args = ["--covid_blues", str(blues), "--pocus", str(pocus), "--out", str(tmp_path / "study"),
            "--results", str(results), "--preset", "smoke", "--arms", "random,bn_control", "--seeds", "0"]
    crash = ("import os, sys, study_real_data as s\n"
             "run = s.ResumableStages.run\n"
             "def dying(self, name, *a, **k):\n"
             "    if name.startswith('bn_control'):\n"
             "        os._exit(9)  # no finally, no atexit: the machine is gone\n"
             "    return run(self, name, *a, **k)\n"
             "s.ResumableStages.run = dying\n"
             "sys.exit(s.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", crash, *args], cwd=srd.REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 9, r.stdout[-3000:] + r.stderr[-3000:]
    settings = json.loads((results / "settings.json").read_text())
    assert list(settings["made_by"].values()) == [["random seed 0"]]
    assert settings["pending"] == ["bn_control seed 0"]
    assert settings["note"] == "written by hand"


def test_a_run_of_fewer_seeds_extends_the_studys_seeds():
    """settings.json's seeds (and so its pending list) are the study's: a run with --seeds 2 after
    seeds 0-1 keeps them, from the settings before it or, where those lost them, from the rows."""
    from study.plan import PRESETS

    one = dataclasses.replace(PRESETS["cpu_long"], seeds=(2,))
    assert res.study_seeds({"preset": {"seeds": [0, 1]}}, [], one) == (0, 1, 2)
    assert res.study_seeds({"preset": {"seeds": [2]}}, [{"seed": "0"}, {"seed": "1"}], one) == (0, 1, 2)
    assert res.study_seeds({}, [], one) == (2,)
