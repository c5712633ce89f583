"""A catalogue of bad inputs and faults, and what the user gets for each.

Every case is what a new user ran into; each gets a one-line answer that names the file or
key, before any expensive work, and no good file is ever lost. Grouped by stage; pre-training's
checkpoints, run folder and config files: tests/test_bad_inputs_pretrain.py.
"""
from __future__ import annotations

import pytest
import torch

import evaluation_aclus
import pretrain_aclus


def _pretrain(cfg, *extra) -> int:
    return pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu", *extra])


# --------------------------------------------------------------------------- #
# evaluation
# --------------------------------------------------------------------------- #
def _folder_layout(root, classes_per_fold, sizes=((40, 48),), seed=0):
    """fold1..5/<class>/*.png with random images, one per (size, class, fold)."""
    import numpy as np

    from utils.io import atomic_write_png

    rng = np.random.default_rng(seed)
    for k, classes in enumerate(classes_per_fold, start=1):
        for ci, c in enumerate(classes):
            for i, (h, w) in enumerate(sizes):
                img = rng.integers(0, 60, (h, w), dtype=np.uint8) + 40 * (ci + 1)
                atomic_write_png(img, root / f"fold{k}" / c / f"v{k}{ci}{i}__f0.png")
    return root


FAST = ["--protocol", "linear", "--img_size", "32", "--workers", "0", "--batch_size", "8"]


def test_bad_fold_file_is_found_before_any_fold_trains(tmp_path, capsys):
    from utils.synthetic_us import write_pocus_folds

    write_pocus_folds(tmp_path, videos_per_class_per_fold=1, frames_per_video=1, size=32, seed=0)
    (tmp_path / "covid_data4.pkl").write_bytes(b"not a pickle")
    assert evaluation_aclus.main(["--data_path", str(tmp_path), *FAST, "--out_dir", str(tmp_path / "o")]) == 2
    out = capsys.readouterr()
    assert "covid_data4.pkl" in out.err and "fold 1:" not in out.out + out.err


def test_classes_come_from_the_folder_layout(tmp_path, capsys):
    import json

    names = ("benign", "malignant")                       # a user's own two-class data set
    root = _folder_layout(tmp_path / "data", [names] * 5, sizes=((40, 48), (52, 36)))  # sizes differ
    assert evaluation_aclus.main(["--data_path", str(root), *FAST, "--out_dir", str(tmp_path / "o")]) == 0
    r = json.loads((tmp_path / "o" / "eval_linear_last.json").read_text())
    assert r["classes"] == list(names) and len(r["summary"]["confusion_matrix_sum"]) == 2
    assert set(r["summary"]["pooled_per_class"]) == set(names)
    assert "malignant" in capsys.readouterr().out
    # classes.txt fixes the label order (and may name a class the folders spell the same)
    (root / "classes.txt").write_text("malignant\nbenign\n")
    assert evaluation_aclus.main(["--data_path", str(root), *FAST, "--out_dir", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "eval_linear_last.json").read_text())["classes"] == ["malignant", "benign"]


def test_class_missing_from_a_folds_training_part_is_an_error(tmp_path, capsys):
    folds = [("a", "b", "c")] + [("a", "b")] * 4            # class c only in fold 1
    root = _folder_layout(tmp_path / "data", folds)
    assert evaluation_aclus.main(["--data_path", str(root), *FAST, "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "fold 1's training part" in err and "'c'" in err and "Traceback" not in err


def test_what_the_evaluation_passes_over_is_named_before_any_work(tmp_path, capsys):
    """A .tif is read (it counts), a .gif and an extra fold are named, a class absent from a
    test fold is named and its fold's macro-F1 averages the classes present."""
    import json

    import cv2
    import numpy as np

    folds = [("a", "b")] * 4 + [("a",)]                    # class b absent from test fold 5
    root = _folder_layout(tmp_path / "data", folds)
    cv2.imwrite(str(root / "fold2" / "a" / "extra__f0.tif"), np.full((40, 48), 90, np.uint8))
    (root / "fold3" / "b" / "clip.gif").write_bytes(b"GIF89a")
    (root / "fold3" / "b" / ".DS_Store").write_bytes(b"")  # hidden files are not worth a word
    (root / "fold6" / "a").mkdir(parents=True)             # ... and a fold6/ beside fold1..5
    cv2.imwrite(str(root / "fold6" / "a" / "x__f0.png"), np.full((40, 48), 90, np.uint8))
    assert evaluation_aclus.main(["--data_path", str(root), *FAST, "--out_dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    first_fold = out.index("fold 1:")
    assert all(out.index(n) < first_fold for n in notes), "notes come before any work"
    assert any("fold 5" in n and "['b']" in n and "macro-F1" in n for n in notes)
    assert any("fold6 not used" in n for n in notes)
    assert any("clip.gif" in n and "'.gif'" in n for n in notes) and not any(".DS_Store" in n for n in notes)
    r = json.loads((tmp_path / "o" / "eval_linear_last.json").read_text())
    assert r["summary"]["pooled_total"] == 2 * 5 - 1 + 1    # one per (class, fold) + the .tif; not fold6
    assert r["folds"][4]["absent_classes"] == ["b"] and r["folds"][0]["absent_classes"] == []


def test_mask_inference_keeps_one_meaning_per_folder(tmp_path, one_torch_thread):
    """Before: a re-run with other --prompts kept the earlier maps and rewrote the id table, so
    one folder mixed meanings; and a SAMUS set's ground-truth labels were taken as done."""
    import json

    import cv2
    import numpy as np

    from SAM import infer_masks
    from SAM.auto_prompter import AutoPrompter, prompter_grid
    from SAM.checkpoint import save_checkpoint
    from SAM.segmenter import build_segmenter
    from utils.io import DataError

    torch.manual_seed(0)
    seg = build_segmenter("vit_tiny", 32, random_init=True)
    ckpt = tmp_path / "s2.pt"
    save_checkpoint(ckpt, "asam_stage2", seg, ["Syn/1", "Syn/2"], AutoPrompter(2, grid=prompter_grid(seg.grid)))
    data = tmp_path / "train"
    for i in range(3):
        (data / "S" / "img").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(data / "S" / "img" / f"f{i}.png"), np.random.default_rng(i).integers(0, 255, (40, 48), np.uint8))
    args = ["--ckpt", str(ckpt), "--data_dir", str(data), "--workers", "0", "--threshold", "0",
            "--montage", "none", "--device", "cpu"]
    assert infer_masks.main(args)["written"] == 3
    labels = sorted((data / "S" / "label").glob("*.png"))
    before = {p: p.read_bytes() for p in labels}
    with pytest.raises(DataError, match=r"asam_settings.json: prompts was \['Syn/1', 'Syn/2'\], now \['Syn/2'\]"):
        infer_masks.main(args + ["--prompts", "Syn/2"])
    with pytest.raises(DataError, match="threshold was 0.0, now 0.5"):
        infer_masks.main(args[:-6] + ["--montage", "none", "--device", "cpu"])
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    save_checkpoint(other, "asam_stage2", build_segmenter("vit_tiny", 32, random_init=True), ["Syn/1", "Syn/2"],
                    AutoPrompter(2, grid=prompter_grid(seg.grid)))
    with pytest.raises(DataError, match="checkpoint_sha256 was"):
        infer_masks.main(["--ckpt", str(other)] + args[2:])
    assert {p: p.read_bytes() for p in labels} == before, "a refused run touches nothing"
    assert infer_masks.main(args)["skipped_existing"] == 3          # the same settings resume
    redo = infer_masks.main(args + ["--prompts", "Syn/2", "--overwrite"])
    assert redo["written"] == 3 and json.loads((data / "asam_classes.json").read_text()) == {"1": "Syn/2"}
    assert set(json.loads(labels[0].with_suffix(".scores.json").read_text())) == {"1"}
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).max() <= 1 for p in labels)
    # label maps this stage did not write (a SAMUS set's ground truth) are never taken as done
    gt = tmp_path / "gt"
    (gt / "S" / "img").mkdir(parents=True)
    (gt / "S" / "label").mkdir()
    for i in range(2):
        cv2.imwrite(str(gt / "S" / "img" / f"f{i}.png"), np.zeros((40, 48), np.uint8))
        cv2.imwrite(str(gt / "S" / "label" / f"f{i}.png"), np.ones((40, 48), np.uint8))
    with pytest.raises(DataError, match="label maps are there that this stage did not write"):
        infer_masks.main(["--ckpt", str(ckpt), "--data_dir", str(gt), "--workers", "0", "--device", "cpu"])
    assert not (gt / "asam_settings.json").exists()


# --------------------------------------------------------------------------- #
# A-SAM data (SAMUS layout)
# --------------------------------------------------------------------------- #
def test_missing_files_of_a_split_are_listed_up_front(tmp_path):
    from SAM.samus_data import SAMUSDataset, read_split
    from utils.io import DataError
    from utils.synthetic_us import write_samus_layout

    root = write_samus_layout(tmp_path / "seg", n_images=6, size=32, seed=0)
    lines = read_split(root, "train")
    gone = [root / lines[0].dataset / "img" / f"{lines[0].name}.png",
            root / lines[-1].dataset / "label" / f"{lines[-1].name}.png"]
    for p in gone:
        p.unlink()
    keys = sorted({l.prompt_key for l in lines})
    with pytest.raises(DataError) as e:
        SAMUSDataset(root, "train", 64, 16, keys)
    assert "train.txt: 2 file(s) named in the split do not exist" in str(e.value)
    assert all(str(p) in str(e.value) for p in gone) and "--skip_missing" in str(e.value)
    ds = SAMUSDataset(root, "train", 64, 16, keys, skip_missing=True)
    named = {(l.dataset, l.name) for l in ds.lines}
    assert (lines[0].dataset, lines[0].name) not in named and (lines[-1].dataset, lines[-1].name) not in named
    assert all((root / l.dataset / "img" / f"{l.name}.png").is_file() for l in ds.lines)


def test_max_items_draws_across_a_class_sorted_split():
    from SAM.samus_data import SplitLine, subset_lines

    lines = [SplitLine(c, "D", f"n{c}_{i}") for c in (1, 2, 3) for i in range(20)]   # sorted by class
    sub = subset_lines(lines, 9, seed=0)
    assert len(sub) == 9 and {l.class_id for l in sub} == {1, 2, 3}                    # not 9 x class 1
    assert sub == [l for l in lines if l in sub]                                       # file order kept
    assert subset_lines(lines, 9, seed=0) == sub and subset_lines(lines, 9, seed=1) != sub


# --------------------------------------------------------------------------- #
# output locations are checked before any work, in every stage
# --------------------------------------------------------------------------- #
def test_an_output_sub_folder_that_is_a_file_is_named_before_any_work(tmp_path, synthetic_pretrain_dir,
                                                                       make_pretrain_config, capsys):
    """The folders a stage writes *inside* its output (TensorBoard's tb/, the evaluation's gradcam/,
    a label tree's <Sub>/label/) are checked with the output itself: before, tb/ as a file was
    a traceback from TensorBoard after the model was built, and a label/ file one after masking."""
    from utils import superpixel_masks
    from utils.synthetic_us import write_pocus_folds

    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("a file")
    assert _pretrain(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pretrain_aclus.py: error: checkpoint.ckpt_path's tb/ {run / 'tb'}: is a file, not a folder"]
    assert not list(run.glob("*.pth"))

    write_pocus_folds(tmp_path / "folds", videos_per_class_per_fold=1, frames_per_video=1, size=32, seed=0)
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "gradcam").write_text("a file")
    assert evaluation_aclus.main(["--data_path", str(tmp_path / "folds"), *FAST, "--out_dir", str(tmp_path / "ev"),
                                  "--gradcam", "2", "--img_size", "64"]) == 2
    out = capsys.readouterr()
    assert "--out_dir's gradcam/" in out.err and "is a file" in out.err and "fold 1" not in out.out

    data = synthetic_pretrain_dir / "train"
    out_dir = tmp_path / "sp"
    sub = next(p.name for p in data.iterdir() if (p / "img").is_dir())
    (out_dir / sub).mkdir(parents=True)
    (out_dir / sub / "label").write_text("a file")
    assert superpixel_masks.main(["--data_dir", str(data), "--out_dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"label folder {out_dir / sub / 'label'}: is a file" in err[0], err


def test_evaluation_out_dir_that_is_a_file_fails_before_any_fold(tmp_path, capsys):
    from utils.synthetic_us import write_pocus_folds

    write_pocus_folds(tmp_path / "d", videos_per_class_per_fold=1, frames_per_video=1, size=32, seed=0)
    (tmp_path / "out").write_text("a file")
    code = evaluation_aclus.main(["--data_path", str(tmp_path / "d"), *FAST, "--out_dir", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 2 and f"--out_dir {tmp_path / 'out'}: is a file, not a folder" in out.err
    assert "fold 1" not in out.out + out.err


@pytest.mark.parametrize("argv, flag", [
    (["-m", "utils.pocus_folds", "--src", "{tmp}", "--out", "{file}"], "--out"),
    (["-m", "utils.synthetic_us", "--out", "{file}", "--layouts", "pocus"], "--out"),
    (["utils/generate_masks_pkls.py", "--data_dir", "{tmp}", "--masks_dir", "{file}"], "--masks_dir"),
    (["utils/superpixel_masks.py", "--data_dir", "{tmp}", "--out_dir", "{file}"], "--out_dir"),
    (["SAM/infer_masks.py", "--ckpt", "{tmp}/x.pt", "--data_dir", "{tmp}", "--out_dir", "{file}"], "--out_dir"),
    (["SAM/train_auto_prompter.py", "--task", "SynLung", "--backbone", "lite", "--data_root", "{tmp}",
      "--out_dir", "{file}"], "--out_dir"),
], ids=["pocus_folds", "synthetic_us", "generate_masks_pkls", "superpixel_masks", "infer_masks", "stage2"])
def test_stage_output_that_is_a_file_is_one_line(tmp_path, repo_root, argv, flag):
    import subprocess
    import sys

    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    cmd = [sys.executable, *(a.format(tmp=tmp_path, file=blocker) for a in argv)]
    out = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{flag} {blocker}: is a file, not a folder" in out.stderr and "Traceback" not in out.stderr


def test_every_asam_task_flag_has_a_help_line():
    import argparse

    from SAM.config import add_task_args

    p = argparse.ArgumentParser()
    add_task_args(p)
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 10 and all(a.help and a.help != "true/false" for a in flags), \
        [a.dest for a in flags if not a.help]


# --------------------------------------------------------------------------- #
# 16-bit images
# --------------------------------------------------------------------------- #
def test_a_12_bit_png_is_read_at_its_depth_not_as_its_top_byte(tmp_path):
    """A 12-bit scan in a 16-bit PNG: 4095 is white and 2048 mid-grey (OpenCV's default read
    keeps the upper byte: 4095 -> 15, a black image)."""
    import cv2
    import numpy as np

    from utils.io import read_image
    img = np.array([[0, 2048, 4095]], np.uint16)
    cv2.imwrite(str(tmp_path / "scan.png"), img)
    gray = read_image(tmp_path / "scan.png", "gray")
    assert gray.dtype == np.uint8 and gray.tolist() == [[0, round(2048 * 255 / 4095), 255]]
    rgb = read_image(tmp_path / "scan.png", "rgb")
    assert rgb.shape == (1, 3, 3) and rgb[0, :, 1].tolist() == gray[0].tolist()


def test_the_bit_depth_is_the_smallest_that_holds_the_maximum():
    import numpy as np

    from utils.io import bit_depth_to_uint8
    assert bit_depth_to_uint8(np.array([1023], np.uint16)).tolist() == [255]       # 10 bits
    assert bit_depth_to_uint8(np.array([1024], np.uint16)).tolist() == [64]        # 12 bits: 1024*255/4095
    assert bit_depth_to_uint8(np.array([65535], np.uint16)).tolist() == [255]      # 16 bits
    assert bit_depth_to_uint8(np.array([200], np.uint8)).tolist() == [200]
    with pytest.raises(ValueError, match="float32"):
        bit_depth_to_uint8(np.zeros(2, np.float32))


# --------------------------------------------------------------------------- #
# numeric options out of range
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("flag,value,says", [
    ("--val_fraction", "1.5", "--val_fraction 1.5: must be in (0, 1)"),
    ("--val_fraction", "0", "--val_fraction 0.0: must be in (0, 1)"),
    ("--batch_size", "0", "--batch_size 0: must be in [1, inf]"),
    ("--epochs", "-3", "--epochs -3: must be in [1, inf]"),
    ("--lr", "nan", "--lr nan: must be in (0, inf]"),
    ("--lr", "0", "--lr 0.0: must be in (0, inf]"),
    ("--seed", "-1", "--seed -1: must be in [0, 4294967295]"),
    ("--seed", "99999999999", "--seed 99999999999: must be in [0, 4294967295]"),
])
def test_evaluation_numbers_out_of_range_are_one_line_before_any_work(flag, value, says, capsys, tmp_path):
    """Before: --val_fraction 1.5 was clamped silently, --seed -1 was a numpy traceback."""
    import evaluation_aclus
    assert evaluation_aclus.main(["--data_path", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o"),
                                  flag, value]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {says}"]
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- #
# numeric flags of every stage script (utils/flags.py), and of -o overrides
# --------------------------------------------------------------------------- #
def _main_of(script: str):
    """The script's main as a callable that returns an exit status (SAM stages raise; their
    command line goes through run_as_script, as here)."""
    import importlib

    from SAM.seg_training import run_as_script

    module = importlib.import_module(script)
    if script.startswith("SAM.") and script != "SAM.auto_masks":
        return lambda argv: run_as_script(lambda: module.main(argv), script)
    return module.main


@pytest.mark.parametrize("script,argv,says", [
    ("pretrain_aclus", ["--cfg", "configs/example.yaml", "--max_steps", "-1"], "--max_steps -1: must be in [0, inf]"),
    ("SAM.only_train_sam", ["--task", "SynLung", "--batch_size", "0", "--out_dir", "{tmp}/o"],
     "--batch_size 0: must be in [1, inf]"),
    ("SAM.only_train_sam", ["--task", "SynLung", "--lr", "inf", "--out_dir", "{tmp}/o"], "--lr inf: must be in (0, inf]"),
    ("SAM.only_train_sam", ["--task", "SynLung", "--seed", "-2", "--out_dir", "{tmp}/o"],
     "--seed -2: must be in [0, 4294967295]"),
    ("SAM.train_auto_prompter", ["--task", "SynLung", "--sam_ckpt", "{tmp}/x.pt", "--out_dir", "{tmp}/o",
                                 "--num_tokens", "0"], "--num_tokens 0: must be in [1, inf]"),
    ("SAM.train_auto_prompter", ["--task", "SynLung", "--sam_ckpt", "{tmp}/x.pt", "--out_dir", "{tmp}/o",
                                 "--epochs", "0"], "--epochs 0: must be in [1, inf]"),
    ("SAM.infer_masks", ["--ckpt", "{tmp}/x.pt", "--data_dir", "{tmp}", "--batch_size", "0"],
     "--batch_size 0: must be in [1, inf]"),
    ("SAM.infer_masks", ["--ckpt", "{tmp}/x.pt", "--data_dir", "{tmp}", "--threshold", "1.5"],
     "--threshold 1.5: must be in [0, 1]"),
    ("SAM.auto_masks", ["--data_dir", "{tmp}", "--limit", "-1"], "--limit -1: must be in [0, inf]"),
    ("utils.superpixel_masks", ["--data_dir", "{tmp}", "--limit", "-1"], "--limit -1: must be in [0, inf]"),
    ("utils.pocus_folds", ["--src", "{tmp}", "--out", "{tmp}/o", "--size", "0"], "--size 0: must be in [1, inf]"),
    ("utils.pocus_folds", ["--src", "{tmp}", "--out", "{tmp}/o", "--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    ("utils.synthetic_us", ["--out", "{tmp}/o", "--size", "8"], "--size 8: must be in [16, inf]"),
    ("gradcam_aclus", ["--classifier", "{tmp}/x.pth", "--images", "{tmp}", "--out_dir", "{tmp}/o", "--batch_size", "0"],
     "--batch_size 0: must be in [1, inf]"),
    ("study.bn_control", ["--out", "{tmp}/o/e.pth", "--statistics", "start", "--batch_size", "1"], "--batch_size 1: must be in [2, inf]"),
    ("run_pipeline", ["--out", "{tmp}/o", "--threads", "0"], "--threads 0: must be in [1, inf]"),
    ("study_real_data", ["--covid_blues", "{tmp}", "--pocus", "{tmp}", "--log_step", "0"],
     "--log_step 0: must be in [1, inf]"),
])
def test_numeric_flags_out_of_range_are_one_line_before_any_work(script, argv, says, tmp_path, capsys,
                                                                   monkeypatch, repo_root):
    """Before: --batch_size 0 was a DataLoader traceback, --seed -1 numpy's, --threshold 1.5 and
    --limit -1 quietly did something else; and several scripts printed argparse's usage first."""
    monkeypatch.chdir(repo_root)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _main_of(script)(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(says), err
    assert not (tmp_path / "o").exists(), "nothing is created before the check"


@pytest.mark.parametrize("override,says", [
    ("seed=-1", "'seed' must be >= 0"), ("seed=99999999999", "'seed' must be <= 4294967295"),
    ("data.train_batch_size=0", "'data.train_batch_size' must be > 0"),
    ("data.resize_size=0", "'data.resize_size' must be > 0"),
    ("optimizer.total_epochs=0", "'optimizer.total_epochs' must be > 0"),
    ("optimizer.base_lr=nan", "'optimizer.base_lr' must be a finite number"),
    ("optimizer.base_lr=1e999", "'optimizer.base_lr' must be a finite number"),
    ("optimizer.weight_decay=-1", "'optimizer.weight_decay' must be >= 0"),
    ("loss.temperature=0", "'loss.temperature' must be > 0"),
])
def test_numeric_overrides_out_of_range_are_one_line(override, says, capsys, monkeypatch, repo_root):
    import pretrain_aclus

    monkeypatch.chdir(repo_root)
    assert pretrain_aclus.main(["--cfg", "configs/example.yaml", "-o", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
