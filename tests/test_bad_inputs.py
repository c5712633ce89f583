"""A catalogue of bad inputs and faults, and what the user gets for each.

Every case is what a new user ran into; each gets a one-line answer that names the file or
key, before any expensive work, and no good file is ever lost. Grouped by stage.
"""
from __future__ import annotations

import pickle

import pytest
import torch

import evaluation_aclus
import pretrain_aclus


class CodeInPickle:
    """Loading a checkpoint that pickles this needs code execution."""


class CallOnLoad:
    """Unpickling this calls a function (torch words that refusal otherwise: "GLOBAL ... is blocked")."""

    def __reduce__(self):
        import os
        return (os.getcwd, ())


def _pretrain(cfg, *extra) -> int:
    return pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu", *extra])


# --------------------------------------------------------------------------- #
# pre-training checkpoints
# --------------------------------------------------------------------------- #
def test_corrupt_latest_is_moved_aside_and_never_rotated_over_the_good_fallback(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, caplog):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 3},
                               checkpoint={"save_epoch": 10})   # no numbered checkpoint before the end
    assert _pretrain(cfg, "--max_steps", "12") == 0                  # epochs 1 and 2 done
    run = tmp_path / "run"
    data = (run / "latest.pth").read_bytes()
    (run / "latest.pth").write_bytes(data[: len(data) // 2])        # truncated
    with caplog.at_level("WARNING"):
        assert _pretrain(cfg, "--resume", "auto", "--max_steps", "6") == 0   # epoch 2 again
    assert "latest.pth: unreadable checkpoint" in caplog.text and "moved aside" in caplog.text
    assert (run / "latest.pth.corrupt").is_file()
    # the fallback still holds the good epoch 1; latest is the new epoch 2
    assert torch.load(run / "previous.pth", weights_only=True)["epoch"] == 1
    assert torch.load(run / "latest.pth", weights_only=True)["epoch"] == 2


def test_all_checkpoints_unreadable_is_an_error_not_a_silent_restart(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 3})
    assert _pretrain(cfg, "--max_steps", "12") == 0
    run = tmp_path / "run"
    for p in run.glob("*.pth"):
        p.write_bytes(b"junk")
    assert _pretrain(cfg, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err and "latest.pth" in err and "previous.pth" in err
    assert "--resume none" in err and "Traceback" not in err
    # starting afresh is a deliberate choice
    assert _pretrain(cfg, "--resume", "none", "--max_steps", "6") == 0


@pytest.mark.parametrize("payload, named", [(CodeInPickle(), "CodeInPickle"), (CallOnLoad(), "getcwd")],
                         ids=["class", "function"])
def test_checkpoint_that_needs_code_execution_is_refused_by_name(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys, payload, named):
    evil = tmp_path / "evil.pth"
    torch.save({"kind": "aclus_pretrain", "payload": payload}, evil)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir)
    assert _pretrain(cfg, "--resume", str(evil)) == 2
    err = capsys.readouterr().err
    assert "refused: this checkpoint holds pickled code" in err and named in err
    assert "weights_only" not in err and "truncated" not in err and "corrupt" not in err
    assert evaluation_aclus.main(["--data_path", str(tmp_path), "--ckpt_path", str(evil)]) != 0
    err = capsys.readouterr().err
    assert "refused: this checkpoint holds pickled code" in err and "weights_only" not in err


def test_resume_takes_the_newest_readable_checkpoint_not_previous(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, caplog):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 3})
    assert _pretrain(cfg, "--max_steps", "12") == 0          # latest = checkpoint_0002 = epoch 2
    run = tmp_path / "run"
    (run / "latest.pth").write_bytes(b"cut")
    with caplog.at_level("INFO"):
        assert _pretrain(cfg, "--resume", "auto", "--max_steps", "6") == 0
    assert "checkpoint_0002.pth at epoch 2" in caplog.text       # previous.pth holds epoch 1
    assert torch.load(run / "latest.pth", weights_only=True)["epoch"] == 3


def test_a_checkpoint_that_cannot_be_read_is_not_called_corrupt_and_nothing_is_touched(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys, monkeypatch):
    import errno
    from pathlib import Path

    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 2})
    assert _pretrain(cfg) == 0                                    # finished: encoder on disk
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.glob("*.pth")}
    read = Path.read_bytes

    def failing_read(self):                                       # an I/O error on the newest one
        if self.name == "latest.pth":
            raise OSError(errno.EIO, "Input/output error")
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    assert _pretrain(cfg, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "latest.pth: cannot read this checkpoint (Input/output error)" in err
    assert "corrupt" not in err and "Traceback" not in err
    monkeypatch.setattr(Path, "read_bytes", read)
    assert not list(run.glob("*.corrupt"))
    assert {p.name: p.read_bytes() for p in run.glob("*.pth")} == before   # the finished encoder too


def test_a_finished_encoder_is_never_trained_over_without_overwrite(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 1, "warmup_epochs": 0})
    assert _pretrain(cfg) == 0
    encoder = tmp_path / "run" / "encoder_resnet18.pth"
    done = encoder.read_bytes()
    assert _pretrain(cfg, "--resume", "none") == 2               # from scratch over a finished run
    err = capsys.readouterr().err
    assert f"{encoder}: this run folder holds a finished encoder" in err and "--overwrite" in err
    assert encoder.read_bytes() == done
    assert _pretrain(cfg, "--resume", "auto") == 0               # a finished run resumed: nothing to do
    assert encoder.read_bytes() == done
    longer = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 2, "warmup_epochs": 0})
    assert _pretrain(longer, "--resume", "auto") == 2            # extending the finished run would replace it
    assert encoder.read_bytes() == done
    assert _pretrain(longer, "--resume", "none", "--overwrite", "--max_steps", "6") == 0   # epoch 1 of 2
    assert encoder.read_bytes() == done                          # only the end of a run writes it
    assert _pretrain(longer, "--resume", "auto") == 0            # mid-run beside an encoder: it goes on
    assert encoder.read_bytes() != done


def test_a_second_run_on_a_run_folder_is_refused(tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys):
    import json
    import os
    import socket

    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir)
    run = tmp_path / "run"
    run.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-02T10:00:00"}
    (run / "run.lock").write_text(json.dumps(owner))             # a live process owns it
    assert _pretrain(cfg) == 2
    err = capsys.readouterr().err
    assert f"{run}: another run owns this folder (pid {os.getpid()} on {socket.gethostname()}" in err
    assert not (run / "log.jsonl").exists() and not list(run.glob("*.pth"))
    other_host = dict(owner, host="some-other-node")
    (run / "run.lock").write_text(json.dumps(other_host))        # never judged from here
    assert _pretrain(cfg) == 2 and "some-other-node" in capsys.readouterr().err


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, caplog):
    import json
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 1, "warmup_epochs": 0})
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                              "started": "2026-12-02T10:00:00"}))
    with caplog.at_level("WARNING"):
        assert _pretrain(cfg) == 0
    assert "took over a stale lock" in caplog.text
    assert not (run / "run.lock").exists()                       # released at the end


def test_a_recycled_pid_does_not_keep_a_stale_lock(tmp_path):
    import json
    import os
    import socket

    from utils.run_lock import RunLock

    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "proc_start": "1", "started": "then"}))
    with RunLock(tmp_path):                                      # same pid, another process start
        assert json.loads((tmp_path / "run.lock").read_text())["proc_start"] != "1"
    assert not (tmp_path / "run.lock").exists()


def test_the_lock_works_without_hard_links(tmp_path, monkeypatch):
    """Some network and FUSE mounts refuse os.link: before, that was a PermissionError traceback."""
    import json
    import os

    from utils.io import DataError
    from utils.run_lock import RunLock

    def no_links(*a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(DataError, match="another run owns this folder"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / "run.lock").exists()
    (tmp_path / "run.lock").write_text("")                     # created, not yet filled by its run
    with pytest.raises(DataError, match="another run is starting"):
        RunLock(tmp_path).__enter__()
    os.utime(tmp_path / "run.lock", (1, 1))                    # ... or left empty long ago: stale
    with RunLock(tmp_path):
        pass


def test_no_snapshot_with_nonfinite_weights_is_written(tmp_path, synthetic_pretrain_dir, make_pretrain_config,
                                                       capsys):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir,
                               optimizer={"total_epochs": 2, "warmup_epochs": 0, "base_lr": 1e38},
                               checkpoint={"snapshot_fractions": [0.25, 0.5]}, log={"log_step": 100})
    assert _pretrain(cfg) == 3                                   # diverged: stopped
    err = capsys.readouterr().err
    assert "non-finite" in err and "Traceback" not in err
    run = tmp_path / "run"
    for path in run.glob("*.pth"):
        state = torch.load(path, weights_only=True)
        tensors = state["model"] if "model" in state else state
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), path.name


def test_an_encoder_file_with_nonfinite_weights_is_refused(tmp_path):
    import torchvision

    from models.encoder_io import load_resnet18_state
    from utils.io import DataError

    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "enc.pth")
    with pytest.raises(DataError, match=r"enc.pth: holds non-finite weights \(1 tensors, e.g. 'layer2.0.conv1.weight'"):
        load_resnet18_state(tmp_path / "enc.pth")


def test_a_resnet18_with_another_first_convolution_is_named(tmp_path):
    import torchvision

    from models.encoder_io import load_resnet18_state
    from utils.io import DataError

    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)    # grayscale stem
    torch.save(model.state_dict(), tmp_path / "gray.pth")
    with pytest.raises(DataError, match=r"gray.pth: entry 'conv1.weight' has shape \(64, 1, 7, 7\), a ResNet-18 "
                                        r"here has \(64, 3, 7, 7\) \(a first convolution for another number"):
        load_resnet18_state(tmp_path / "gray.pth")


def test_a_checkpoint_without_its_entries_is_one_line(tmp_path, synthetic_pretrain_dir, make_pretrain_config,
                                                      capsys):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir)
    torch.save({"kind": "aclus_pretrain", "epoch": 1}, tmp_path / "thin.pth")
    assert _pretrain(cfg, "--resume", str(tmp_path / "thin.pth")) == 2
    err = capsys.readouterr().err
    assert "thin.pth: a 'aclus_pretrain' checkpoint without its 'model', 'optimizer', 'rng', 'config' entries" in err
    from models.encoder_io import load_resnet18_state
    from utils.io import DataError
    with pytest.raises(DataError, match="thin.pth: a 'aclus_pretrain' checkpoint without its 'model' entry"):
        load_resnet18_state(tmp_path / "thin.pth")


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, repo_root):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes the kernel refuse the
    write of the checkpoint (EFBIG), as a full disk (ENOSPC) would."""
    import resource
    import signal
    import subprocess
    import sys

    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 2})
    assert _pretrain(cfg, "--max_steps", "6") == 0                # epoch 1 on disk
    run = tmp_path / "run"
    good = (run / "latest.pth").read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 4, len(good) // 4))

    done = subprocess.run([sys.executable, "pretrain_aclus.py", "--cfg", str(cfg), "--device", "cpu",
                           "--resume", "auto"], cwd=repo_root, capture_output=True, text=True,
                          preexec_fn=small_files, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain_aclus.py: error: ") and "could not be written (File too large)" in last
    assert "Traceback" not in done.stderr
    assert (run / "latest.pth").read_bytes() == good            # the failed write moved nothing aside


def test_pickle_is_still_refused_for_the_mask_files(tmp_path):
    from utils.io import DataError, safe_pickle_load

    p = tmp_path / "mask.pkl"
    p.write_bytes(pickle.dumps(CodeInPickle()))
    with pytest.raises(DataError):
        safe_pickle_load(p)


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
    import torch

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
# pre-training run folder
# --------------------------------------------------------------------------- #
def test_resumed_log_has_no_repeated_steps(tmp_path, synthetic_pretrain_dir, make_pretrain_config):
    import json

    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 2})
    assert _pretrain(cfg, "--max_steps", "9") == 0          # killed in epoch 2 after 3 of its 6 steps
    assert _pretrain(cfg, "--resume", "auto") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(12))                          # not 0..8 then 6..11
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def test_failing_start_keeps_the_runs_config_and_a_new_config_goes_beside(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config):
    one = {"total_epochs": 1, "warmup_epochs": 0}
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer=one)
    assert _pretrain(cfg) == 0
    run = tmp_path / "run"
    first = (run / "config.yaml").read_text()
    bad = make_pretrain_config(tmp_path, tmp_path / "no_data_here", optimizer=one)
    assert _pretrain(bad) == 2                               # fails before training starts
    assert (run / "config.yaml").read_text() == first and not list(run.glob("config.*.yaml"))
    other = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 2, "warmup_epochs": 0})
    assert _pretrain(other, "--resume", "auto", "--overwrite") == 0   # continues with a longer schedule
    assert (run / "config.yaml").read_text() == first
    assert "total_epochs: 2" in (run / "config.1.yaml").read_text()


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unwritable_run_folder_is_named_before_any_work(tmp_path, synthetic_pretrain_dir, make_pretrain_config,
                                                        capsys, kind):
    import os

    target = tmp_path / "target"
    if kind == "file":
        target.write_text("a file")
    else:
        target.mkdir()
        target.chmod(0o500)
        if os.access(target, os.W_OK):  # root ignores permissions
            pytest.skip("running as a user who can write anywhere")
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, checkpoint={"ckpt_path": str(target)})
    assert _pretrain(cfg) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.ckpt_path {target}" in err and "Traceback" not in err


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


def test_checkpoints_and_masks_follow_the_umask(tmp_path):
    import os

    from utils.io import atomic_pickle_dump

    old = os.umask(0o022)
    try:
        atomic_pickle_dump([1], tmp_path / "m.pkl")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "m.pkl").st_mode & 0o777) == oct(0o666 & ~0o022)


# --------------------------------------------------------------------------- #
# output locations are checked before any work, in every stage
# --------------------------------------------------------------------------- #
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
# config files
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("text, expect", [
    ("optimizer:\n  base_lr: 1.0\n  base_lr: 2.0\n", "key 'base_lr' given twice (lines 2 and 3)"),
    ("optimizer:\n  base_lr: 1.0\nloss:\n  temperature: 0.2\noptimizer:\n  total_epochs: 3\n",
     "key 'optimizer' given twice (lines 1 and 5)"),
    ("seed: 1\n[a, b]: 2\n", "line 2: a key must be a name, not a list"),
    ("seed: 1\n? {a: 1}\n: 2\n", "line 2: a key must be a name, not a dict"),
], ids=["key", "section", "list key", "mapping key"])
def test_a_key_or_section_given_twice_is_an_error_not_the_last_one(tmp_path, text, expect):
    from utils.config import ConfigError, load_config

    cfg = tmp_path / "twice.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        load_config(cfg)


def test_a_config_in_another_encoding_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("# réglages\noptimizer:\n  base_lr: 1.0\n".encode("latin-1"))
    assert _pretrain(cfg) == 2
    err = capsys.readouterr().err
    assert "latin1.yaml: not UTF-8 text" in err and "Traceback" not in err


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
