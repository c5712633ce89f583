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


def _pretrain(cfg, *extra) -> int:
    return pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu", *extra])


# --------------------------------------------------------------------------- #
# pre-training checkpoints
# --------------------------------------------------------------------------- #
def test_corrupt_latest_is_moved_aside_and_never_rotated_over_the_good_fallback(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, caplog):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 3})
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


def test_checkpoint_that_needs_code_execution_is_refused_by_name(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"kind": "aclus_pretrain", "payload": CodeInPickle()}, evil)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir)
    assert _pretrain(cfg, "--resume", str(evil)) == 2
    err = capsys.readouterr().err
    assert "refused: this checkpoint needs code execution to load" in err
    assert "weights_only=False" not in err and "truncated" not in err
    assert evaluation_aclus.main(["--data_path", str(tmp_path), "--ckpt_path", str(evil)]) != 0
    err = capsys.readouterr().err
    assert "refused: this checkpoint needs code execution to load" in err and "weights_only=False" not in err


def test_pickle_is_still_refused_for_the_mask_files(tmp_path):
    from utils.io import DataError, safe_pickle_load

    p = tmp_path / "mask.pkl"
    p.write_bytes(pickle.dumps(CodeInPickle()))
    with pytest.raises(DataError):
        safe_pickle_load(p)
