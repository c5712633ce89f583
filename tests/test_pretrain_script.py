"""pretrain_aclus.py end to end on tiny synthetic data, on the CPU."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import pretrain_aclus
from models.aclus import ACLUS
from models.encoder_io import load_resnet18_state
from pretraining.run_files import snapshot_steps
from utils.stage_files import snapshot_name

REPO = Path(__file__).resolve().parents[1]


def _run(cfg: Path, *extra: str) -> int:
    return pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu", *extra])


def _steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_typo_in_config_key_is_a_clear_error(tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"base_lrr": 0.1})
    assert _run(cfg) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optimizer.base_lrr'" in err and "did you mean 'optimizer.base_lr'" in err
    assert "Traceback" not in err


def test_missing_pair_list_is_a_clear_error(tmp_path, make_pretrain_config, capsys):
    cfg = make_pretrain_config(tmp_path, tmp_path / "nowhere")
    assert _run(cfg) == 2
    assert "train_tf_img_to_gt.pkl: pair list not found" in capsys.readouterr().err


TERMS = {"aclus": ["contrast/" + s for s in ("c5", "p4", "p3", "p2")] + ["context/" + s for s in ("c5", "p2")],
         "detcon": ["contrast/" + s for s in ("c5", "p4", "p3", "p2")],
         "byol": ["regression/global"],
         "byol_fpn": ["regression/" + s for s in ("c5", "p4", "p3", "p2")]}


@pytest.mark.parametrize("method", list(TERMS))
def test_methods_train_and_export_a_torchvision_encoder(tmp_path, synthetic_pretrain_dir, make_pretrain_config,
                                                        method):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": method},
                               optimizer={"total_epochs": 1, "warmup_epochs": 0})
    assert _run(cfg) == 0
    run = tmp_path / "run"
    steps = _steps(run)
    assert len(steps) == 6  # 24 images / batch 4
    assert {k.split("/")[0] for k in steps[0] if "/" in k} <= {"contrast", "regression", "context", "regions"}
    assert set(TERMS[method]) <= set(steps[0])
    assert ("context/p2" in steps[0]) == (method == "aclus")
    assert ("contrast/c5" in steps[0]) == (method in ("aclus", "detcon"))
    # the exported encoder loads into torchvision with every key but fc
    sd = torch.load(run / "encoder_resnet18.pth", weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    # and the full checkpoint is understood by the evaluation's loader
    assert torch.equal(load_resnet18_state(run / "latest.pth")["conv1.weight"], sd["conv1.weight"])


def test_target_moves_once_per_optimizer_step(tmp_path, synthetic_pretrain_dir, make_pretrain_config, monkeypatch):
    calls = []
    original = ACLUS.update_target

    def counting(self, momentum):
        calls.append(momentum)
        return original(self, momentum)

    monkeypatch.setattr(ACLUS, "update_target", counting)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": "detcon"})
    assert _run(cfg, "--max_steps", "5") == 0
    assert len(calls) == 5
    assert all(0.99 <= m < 1.0 for m in calls) and calls == sorted(calls)  # cosine towards 1


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, synthetic_pretrain_dir,
                                                                 make_pretrain_config):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = make_pretrain_config(tmp_path / "a", synthetic_pretrain_dir)
    assert _run(full) == 0

    cut = make_pretrain_config(tmp_path / "b", synthetic_pretrain_dir)
    assert _run(cut, "--max_steps", "8") == 0      # killed inside epoch 2 (6 steps per epoch)
    assert (tmp_path / "b/run/latest.pth").is_file()
    assert torch.load(tmp_path / "b/run/latest.pth", weights_only=True)["epoch"] == 1
    assert _run(cut, "--resume", "auto") == 0

    a = torch.load(tmp_path / "a/run/latest.pth", weights_only=True)
    b = torch.load(tmp_path / "b/run/latest.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, synthetic_pretrain_dir, make_pretrain_config,
                                                          caplog):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 3},
                               checkpoint={"save_epoch": 10})  # no checkpoint_0002.pth (resume would take it)
    assert _run(cfg, "--max_steps", "12") == 0      # epochs 1 and 2 done
    run = tmp_path / "run"
    assert torch.load(run / "previous.pth", weights_only=True)["epoch"] == 1
    data = (run / "latest.pth").read_bytes()
    (run / "latest.pth").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level("INFO"):
        assert _run(cfg, "--resume", "auto") == 0
    assert "latest.pth: unreadable checkpoint" in caplog.text
    assert "resumed from" in caplog.text and "previous.pth at epoch 1" in caplog.text
    epochs = [r["epoch"] for r in _steps(run)]
    # epoch 2 redone, then 3; the killed attempt's epoch-2 records were dropped, not repeated
    assert epochs.count(1) == 6 and epochs.count(2) == 6 and epochs.count(3) == 6


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path, synthetic_pretrain_dir, make_pretrain_config, capsys):
    bad = tmp_path / "other.pth"
    torch.save({"kind": "asam_stage1", "model": {}}, bad)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir)
    assert _run(cfg, "--resume", str(bad)) == 2
    assert "expected a 'aclus_pretrain' checkpoint, found 'asam_stage1'" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_message(tmp_path, synthetic_pretrain_dir, make_pretrain_config,
                                              monkeypatch, capsys):
    original = ACLUS.forward

    def nan_forward(self, batch, generator=None):
        loss, stats = original(self, batch, generator)
        return loss * float("nan"), stats

    monkeypatch.setattr(ACLUS, "forward", nan_forward)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir)
    assert _run(cfg) == 3
    assert "non-finite loss" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# multi-process gloo runs through the real launchers
# --------------------------------------------------------------------------- #
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: list[str], cfg: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", *launcher, "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "pretrain_aclus.py"), "--cfg", str(cfg), "--device", "cpu"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("launcher", [["torch.distributed.run"], ["torch.distributed.launch"]],
                         ids=["torchrun", "distributed.launch"])
def test_two_process_gloo_run(tmp_path, synthetic_pretrain_dir, make_pretrain_config, launcher):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 1, "warmup_epochs": 0})
    proc = _launch(launcher, cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    steps = _steps(run)
    assert len(steps) == 3  # 24 images / (2 processes x 4)
    assert "global batch 8, 2 process(es)" in proc.stderr
    state = torch.load(run / "latest.pth", weights_only=True)
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["model"])


def test_paper_config_differs_from_the_upstream_example_only_in_the_papers_values():
    from pretraining.config import load_config

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    example = flat(load_config(REPO / "configs/example.yaml").to_dict())
    paper = flat(load_config(REPO / "configs/paper.yaml").to_dict())
    differ = {k for k in example if example[k] != paper[k]}
    assert differ == {"data.crop_scale", "data.train_batch_size", "loss.sample_by", "checkpoint.ckpt_path"}
    assert (example["data.crop_scale"], paper["data.crop_scale"]) == ([0.08, 1.0], [0.2, 1.0])
    assert (example["loss.sample_by"], paper["loss.sample_by"]) == ("uniform", "area")
    assert 2 * paper["data.train_batch_size"] == 192 and 2 * example["data.train_batch_size"] == 64


def test_encoder_snapshots_are_the_weights_after_their_share_of_the_steps(tmp_path, synthetic_pretrain_dir,
                                                                         make_pretrain_config):
    """checkpoint.snapshot_fractions: [0.5] over 2 epochs is the end of epoch 1, so the snapshot must
    equal the encoder inside the epoch-1 checkpoint (written by another path); a snapshot written one
    step early or late, or of the target network, differs from it."""
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, checkpoint={"snapshot_fractions": [0.5]})
    assert _run(cfg) == 0
    run = tmp_path / "run"
    iters = len(_steps(run)) // 2
    snap = torch.load(run / snapshot_name(iters), weights_only=True)
    epoch1 = torch.load(run / "checkpoint_0001.pth", weights_only=True)["model"]
    online = {k.removeprefix("encoder.resnet."): v for k, v in epoch1.items() if k.startswith("encoder.resnet.")}
    assert snap.keys() == online.keys()
    for k in snap:
        assert torch.equal(snap[k], online[k]), k
    final = load_resnet18_state(run / "encoder_resnet18.pth")
    assert any(not torch.equal(final[k], snap[k]) for k in snap if k in final)
    assert sorted(p.name for p in run.glob("encoder_resnet18_step*.pth")) == [snapshot_name(iters)]


def test_snapshot_steps_round_and_stay_inside_the_run():
    assert snapshot_steps((0.25, 0.5), 192) == {48, 96}
    assert snapshot_steps((0.001, 0.999), 10) == {1, 9}
    assert snapshot_steps((0.5,), 1) == set()
