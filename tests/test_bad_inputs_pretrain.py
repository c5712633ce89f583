"""The catalogue of bad inputs and faults (see tests/test_bad_inputs.py), pre-training's part:
checkpoints, the run folder and config files.
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
    from pretraining.config import ConfigError, load_config

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
