"""The segmentation tables of README / RESULTS are the ones benchmarks/render_results.py makes
from the committed JSON files (a hand edit, or a JSON re-measured without re-rendering, fails)."""
from __future__ import annotations

import json

from benchmarks import render_results


def test_splice_replaces_only_between_its_own_markers():
    text = "a\n<!-- results:x -->\nold\n<!-- results:x:end -->\nb\n"
    assert render_results.splice(text, "x", "new") == "a\n<!-- results:x -->\nnew\n<!-- results:x:end -->\nb\n"
    assert render_results.splice(text, "y", "new") == text


def test_committed_tables_match_their_files():
    blocks = render_results.render()
    assert set(blocks) == set(render_results.BLOCKS)            # every JSON is committed
    results_md = render_results.DOCS[1].read_text()
    assert all(f"<!-- results:{name} -->" in results_md for name in blocks)   # and has its place
    for doc in render_results.DOCS:
        text = doc.read_text()
        for name, block in blocks.items():
            assert render_results.splice(text, name, block) == text, f"{doc.name}: block {name} is stale; " \
                "run python benchmarks/render_results.py"


def test_the_present_only_run_is_set_beside_stage_2_without_negatives(tmp_path):
    def run(before, after, fp):
        keys = {"A/1": {"dice": after, "fp_rate": fp}, "mean": {"dice": after, "fp_rate": fp}}
        return {"test": keys, "presence": {"rule": "r", "presence": {"A/1": {"threshold": 1.0}},
                                           "without_decision": {"A/1": {"dice": before, "fp_rate": 1.0},
                                                                "mean": {"dice": before, "fp_rate": 1.0}}}}
    settings = {"epochs": 1, "max_train": 2, "max_val": 1, "max_test": 1, "mask_loss_on": "present"}
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"settings": settings | {"mask_loss_on": "all"}, "prompt_free": {"0": run(0.5, 0.1, 0.0)}}))
    d = {"settings": settings, "prompt_free": {"0.5": run(0.48, 0.47, 0.02)}, "machine": {}}
    text = render_results.presence_present_block(d, ref)
    assert "mask loss on the lines whose anatomy is present only" in text
    assert text.splitlines()[-1] == ("negatives 0.5: mean test Dice 0.500 without negatives (no decision, `ref.json`) "
                                     "-> 0.480 trained so, no decision -> 0.470 with the decision (-0.030); "
                                     "largest FP rate of a prompt 0.020.")
    ref.write_text(json.dumps({"settings": settings | {"epochs": 2}, "prompt_free": {"0": run(0.5, 0.1, 0.0)}}))
    assert render_results.presence_present_block(d, ref).endswith("Not comparable with `ref.json`: other epochs.")
    assert "without negatives" not in render_results.presence_present_block(d, tmp_path / "absent.json")
    # another seed draws other lines: not paired with the reference, whose file predates the flag (seed 0)
    ref.write_text(json.dumps({"settings": settings, "prompt_free": {"0": run(0.5, 0.1, 0.0)}}))
    assert render_results.presence_present_block(d | {"settings": settings | {"seed": 1}}, ref).endswith(
        "other seed (lines and initialisation).")


def test_the_lung_presence_table_sets_each_prompt_before_and_after(tmp_path):
    """One row per lung prompt: its threshold, the share of real frames kept by the lung A-SAM without
    negatives (the reference file), by this one without and with its decision, and the synthetic test
    Dice / FP rate both ways. Breaks if a column reads another source or the no-decision numbers."""
    def real(fires):
        return {"overall": {"frames": 4, "fires": 1.0, "regions_per_frame": {"mean": 1.0}, "total_share": {"mean": 0.1},
                            "c5_survival": {"share": 0.5}}, "per_prompt": {k: {"fires": f} for k, f in fires.items()}}
    ref = tmp_path / "old.json"
    ref.write_text(json.dumps({"settings": {"lung_frames": "f"}, "real": {"asam_lung": real({"L/1": 1.0, "L/2": 0.75})}}))
    d = {"settings": {"max_train": 2, "epochs": 1, "negative_rate": 0.5, "mask_loss_on": "present", "style": "s",
                      "lung_frames": "f"},
         "data": {"datasets": ["L"]}, "real_frames": {"frames": 4, "videos": 2}, "machine": {},
         "test": {"L/1": {"n": 3, "dice": 0.8, "fp_rate": 0.0}, "L/2": {"n": 3, "dice": 0.4, "fp_rate": 0.1}},
         "test_presence": {"rule": "r", "presence": {"L/1": {"threshold": 1.5}, "L/2": {"threshold": -0.25}},
                           "without_decision": {"L/1": {"dice": 0.9, "fp_rate": 1.0}, "L/2": {"dice": 0.5, "fp_rate": 1.0}}},
         "real": {"asam_lung": real({"L/1": 0.5, "L/2": 0.25}), "asam_lung_no_decision": real({"L/1": 1.0, "L/2": 1.0}),
                  "asam_lung_absent_prompts": real({"H/1": 0.0})}}
    text = render_results.lung_presence_block(d, ref)
    assert "| L/1 | 1.50 | 1.00 | 1.00 | 0.50 | 0.900 / 0.800 | 1.000 / 0.000 |" in text
    assert "| L/2 | -0.25 | 0.75 | 1.00 | 0.25 | 0.500 / 0.400 | 1.000 / 0.100 |" in text
    assert "presence decision of the checkpoint: r" in text and "from the same frames" in text
    assert text.endswith("keep a region on this share of the real frames: H/1 0.00.")


def test_the_lung_presence_table_without_a_presence_record_shows_one_set_of_masks(tmp_path):
    """A checkpoint without presence thresholds applied no decision: both Dice / FP columns show the
    test masks (not '-' beside them), and a reference file without settings does not break the block."""
    ref = tmp_path / "old.json"
    ref.write_text(json.dumps({"real": {}}))
    real = {"overall": {"frames": 1, "fires": 1.0, "regions_per_frame": {"mean": 1.0}, "total_share": {"mean": 0.1},
                        "c5_survival": {"share": 0.5}}, "per_prompt": {"L/1": {"fires": 1.0}}}
    d = {"settings": {"max_train": 2, "epochs": 1, "negative_rate": 0.0, "style": "s", "lung_frames": "f"},
         "data": {"datasets": ["L"]}, "real_frames": {"frames": 1, "videos": 1}, "machine": {},
         "test": {"L/1": {"n": 3, "dice": 0.8, "fp_rate": 1.0}}, "test_presence": None, "real": {"asam_lung": real}}
    text = render_results.lung_presence_block(d, ref)
    assert "| L/1 | - | - | - | 1.00 | 0.800 / 0.800 | 1.000 / 1.000 |" in text


def test_the_context_table_sets_each_image_beside_another_images_target():
    """context_block reads the BatchNorm mode the run trained with and prints the gap other - own per
    scale; reading the other mode, or the gap the wrong way round, fails it."""
    def terms(c5, p4):
        return {"context/c5": c5, "context/p4": p4}
    d = {"run": "r", "method": "aclus", "size": 64, "batch": 64, "base_lr": 2.0, "trained_with": "batch",
         "batches": 3, "where": "CPU", "checkpoint": {"file": "latest.pth", "epoch": 40},
         "init": {"batch": terms(2.0, 1.9), "batch_other_image": terms(2.0, 1.9),
                  "running": terms(9.0, 9.0), "running_other_image": terms(9.0, 9.0)},
         "trained": {"batch": terms(0.10, 0.20), "batch_other_image": terms(0.15, 0.20),
                     "running": terms(9.0, 9.0), "running_other_image": terms(9.0, 9.0)}}
    text = render_results.context_block(d)
    assert "| after training | its own image's | 0.100 | 0.200 |" in text
    assert "| | gap | +0.050 | +0.000 |" in text and "9.000" not in text
    assert "`batch` BatchNorm as trained" in text and "after epoch 40" in text


def test_the_lung_negatives_table_sets_each_prompt_before_and_after(tmp_path):
    """lung_negatives_block: per prompt, the share of real frames kept (an absent prompt's from the
    'absent prompts' record, a lung prompt's from the decision's) before / after, test Dice and FP both
    ways; a reference made with other settings is refused, the picking flags aside."""
    def run(fetal_kept, pleura_kept, dice, **settings):
        return {"settings": {"epochs": 8, "negative_videos": 0, **settings},
                "data": {"negative_set": {"name": "N", "lacks": ["FetalHead-HC18"], "frames": {"train": 4, "test": 2},
                                          "videos": {"train": 2, "test": 1}}},
                "real_frames": {"videos": 3, "frames": 9}, "stage2_seconds": 600.0, "machine": {},
                "real": {"asam_lung_absent_prompts": {"per_prompt": {"FetalHead-HC18/1": {"fires": fetal_kept}}},
                         "asam_lung": {"per_prompt": {"SynLung-Lung/3": {"fires": pleura_kept}}}},
                "test": {"FetalHead-HC18/1": {"dice": dice, "fp_rate": 0.05}, "SynLung-Lung/3": {"dice": 0.5, "fp_rate": 0.01},
                         "mean": {"dice": 0.0}}}
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(run(0.72, 0.60, 0.66)))
    text = render_results.lung_negatives_block(run(0.10, 0.58, 0.64, negative_videos=60), ref)
    assert "| FetalHead-HC18/1 (absent from lung) | 0.72 / 0.10 | 0.660 / 0.640 | 0.050 / 0.050 | - / - | - / - |" in text
    assert "| SynLung-Lung/3 | 0.60 / 0.58 |" in text and "mean" not in text.split("|---|")[-1]
    assert render_results.lung_negatives_block(run(0.1, 0.5, 0.6, epochs=4), ref) == \
        "Not comparable with `ref.json`: other epochs."


def test_the_decision_rules_of_one_checkpoint_are_set_side_by_side_in_order(tmp_path):
    """decision_rules_block: one cell per rule, in the order first-measured → references → this file,
    and a reference measured with other settings (not the same checkpoint and lines) is refused."""
    def run(rule, commit, dice, tpr, settings=None):
        return {"settings": settings or {"max_val": 20, "work_dir": commit, "presence_score": rule},
                "test": {"A/1": {"dice": dice, "fp_rate": 0.0}, "mean": {"dice": dice, "fp_rate": 0.0}},
                "test_presence": {"rule": rule, "without_decision": {"mean": {"dice": 0.9}},
                                  "presence": {"A/1": {"auroc": 1.0, "fpr": 0.0, "tpr": tpr}}},
                "real": {"asam_lung": {"per_prompt": {"A/1": {"fires": tpr}}}},
                "machine": {"commit": commit * 7}}
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(run("old", "a", 0.1, 0.0)))
    second.write_text(json.dumps(run("head", "b", 0.5, 0.5)))
    text = render_results.decision_rules_block(run("combined", "c", 0.8, 1.0), [first, second])
    row = next(line for line in text.splitlines() if line.startswith("| A/1"))
    assert "| 0.00 → 0.50 → 1.00 |" in row and "| 0.100 → 0.500 → 0.800 |" in row
    assert "(1) old" in text and "(3) combined" in text
    second.write_text(json.dumps(run("head", "b", 0.5, 0.5, {"max_val": 40})))
    assert render_results.decision_rules_block(run("combined", "c", 0.8, 1.0), [first, second]) \
        == "Not comparable with `second.json`: other max_val."


def test_the_stepwise_table_keeps_the_first_moved_step_every_twentieth_and_the_last():
    """Step 1 (lr 0, nothing moved: no divergence) is left out; the first step after it is kept, a step
    between the kept ones is not, the last is kept although it is no multiple of 20; each twin's value
    lands in its own column; a modified tree's commit says so."""
    stepwise_block = render_results.stepwise_block

    twins = ["byol_nudged", "lightly_byol_x2", "lightly_byol"]

    def row(step, moved, d):
        return {"step": step, "lr": 0.1, "byol_moved": moved, "divergence": dict(zip(twins, d)),
                "loss": {"byol": 2.0, **{t: 0.5 for t in twins}}}

    d = {"run": "seed0", "config_method": "lightly_byol_x2", "seed": 0, "size": 64, "batch": 64, "base_lr": 2.0,
         "warmup_epochs": 2, "total_epochs": 40, "steps": 25, "where": "CPU", "threads": 1, "code": "abcdef0123",
         "load": "nothing else", "twins": twins,
         "rows": [row(1, 0.0, [float("nan")] * 3), row(10, 1.0, [0.01, 0.02, 0.03]), row(15, 1.5, [9, 9, 9]),
                  row(20, 2.0, [0.1, 0.2, 0.3]), row(25, 3.0, [0.4, 0.5, 0.6])]}
    table = [line for line in stepwise_block(d).splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[0] for line in table] == ["| 10", "| 20", "| 25"]
    assert table[2].split(" | ")[2:5] == ["0.4000", "0.5000", "0.6000"]
    assert "commit `abcdef0`" in stepwise_block(d)
    assert "commit `abcdef0+modified`" in stepwise_block({**d, "code": "abcdef0123+modified"})


def test_the_cache_rounding_line_gives_the_worst_prompt_and_the_flips():
    cache_rounding_block = render_results.cache_rounding_block

    d = {"settings": {"ckpt": "best.pt", "frames": 2}, "presence_decisions": 4,
         "presence_flips": {"A": 1, "B": 0}, "machine": {"cpu_count": 2},
         "agreement": {"pixel_agreement": 0.5, "per_prompt": {"A": {"same_call": 0.5, "iou": None},
                                                              "B": {"same_call": 1.0, "iou": 0.25}}}}
    line = cache_rounding_block(d)
    assert "flip 1 of 4" in line and "1.000 of frames" not in line and "0.500 of frames" in line
    assert "0.2500 to 0.2500" in line and "alike 0.50000" in line
