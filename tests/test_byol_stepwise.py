"""benchmarks/measure_byol_stepwise.py: lightly's BYOL loaded with our byol's weights steps with it.

The reference for "steps with it" is our own byol (models.losses' 2 - 2 cos, our MLP heads); the
twin is lightly's heads and NegativeCosineSimilarity, code nobody here wrote."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import measure_byol_stepwise as mbs  # noqa: E402
from models.aclus import ACLUS  # noqa: E402


def test_nudge_moves_every_weight_one_ulp_up():
    m = torch.nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))
    mbs.nudge(m)
    # float32: the spacing above 1 is 2^-23, above -1 (towards 0) 2^-24, above 0 the smallest subnormal 2^-149
    expected = torch.tensor([[1.0 + 2.0 ** -23], [-1.0 + 2.0 ** -24], [2.0 ** -149]])
    assert torch.equal(m.weight.detach(), expected)


def test_divergence_is_the_distance_apart_over_the_distance_trained():
    twin, ref, init = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 2.0])
    assert mbs.divergence(twin, ref, init) == pytest.approx(5.0 / 2.0)


def _pair(method: str) -> tuple[ACLUS, ACLUS]:
    torch.manual_seed(0)
    ours = ACLUS("byol", proj_hidden=32, proj_dim=16, pred_hidden=32)
    theirs = ACLUS(method, proj_hidden=32, proj_dim=16, pred_hidden=32)
    # BatchNorm buffers unlike the fresh ones of lightly's heads, so that a copy which forgets any shows
    for head in (ours.projector_c5, ours.target_projector_c5, ours.predictor):
        head.net[1].running_mean.uniform_()
        head.net[1].running_var.uniform_(0.5, 2.0)
    mbs.load_byol_into_lightly(ours, theirs)
    return ours, theirs


def test_loaded_twin_computes_our_loss_and_keeps_our_buffers():
    """2 - 2 cos (ours) = 2 + lightly_x2's loss on the same batch: fails if a head (online, target,
    predictor) or an encoder is left at lightly's own initialisation."""
    ours, theirs = _pair("lightly_byol_x2")
    for name in ("projector_c5", "target_projector_c5", "predictor"):
        ours_bn = [m for m in getattr(ours, name).modules() if isinstance(m, torch.nn.BatchNorm1d)]
        theirs_bn = [m for m in getattr(theirs, name).modules() if isinstance(m, torch.nn.BatchNorm1d)]
        assert ours_bn and len(ours_bn) == len(theirs_bn)
        for a, b in zip(ours_bn, theirs_bn):
            assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var), name
    g = torch.Generator().manual_seed(1)
    batch = {"view1": torch.randn(6, 3, 32, 32, generator=g), "view2": torch.randn(6, 3, 32, 32, generator=g)}
    assert torch.allclose(ours(batch)[0], 2 + theirs(batch)[0], atol=1e-5)


def test_only_our_heads_into_lightlys_are_loaded():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="expected our heads into lightly's"):
        mbs.load_byol_into_lightly(ACLUS("lightly_byol"), ACLUS("byol"))


@pytest.fixture
def run_dir(tmp_path, synthetic_pretrain_dir, make_pretrain_config):
    """A run folder with only its config.yaml (byol, the synthetic frames, batch 4, two epochs)."""
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": "byol"})
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(cfg, run / "config.yaml")
    return run


def test_twins_step_alike_from_equal_weights_and_the_loss_scale_shows(run_dir, tmp_path, one_torch_thread):
    """Six LARS steps across two epochs of the run's loader: the x2 twin stays with our byol far
    closer than the loss-scale twin does (LARS gives the undecayed tensors, BatchNorm and biases,
    steps proportional to the gradient). Fails if the twins see other batches, views or step
    sizes than ours, or if the twin is not loaded with our weights."""
    out = tmp_path / "s.json"
    assert mbs.main(["--run_dir", str(run_dir), "--steps", "6", "--log_every", "3", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["step"] for r in rec["rows"]] == [1, 3, 6] and rec["steps"] == 6
    last = rec["rows"][-1]
    assert last["byol_moved"] > 0
    d = last["divergence"]
    assert d["lightly_byol_x2"] < 1e-3, d
    assert d["lightly_byol"] > 1e-2, d
    assert 0 < d["byol_nudged"] < 1e-2, d
    loss = last["loss"]
    assert loss["byol"] == pytest.approx(2 + loss["lightly_byol_x2"], abs=1e-3)


def test_more_steps_than_the_schedule_is_a_one_line_error(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        mbs.main(["--run_dir", str(run_dir), "--steps", "100000"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r".*error: --steps 100000: the run's schedule has \d+ steps", err[-1]), err


def test_byol_steps_as_the_training_loop_does(tmp_path, synthetic_pretrain_dir, make_pretrain_config, one_torch_thread):
    """The reference the twins are judged against is the run itself: after N steps, step_twins' byol
    encoder equals the encoder snapshot pretrain_aclus.py writes after N steps of the same config.
    Fails if the script indexes the schedules, seeds the views or orders the batches otherwise."""
    from pretraining.config import load_config
    from utils.stage_files import snapshot_name
    import pretrain_aclus

    cfg_path = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": "byol"},
                                    checkpoint={"ckpt_path": str(tmp_path / "run"), "save_epoch": 2,
                                                "resume_path": "", "snapshot_fractions": [0.5]})
    assert pretrain_aclus.main(["--cfg", str(cfg_path), "--device", "cpu"]) == 0
    snapshots = sorted((tmp_path / "run").glob("encoder_resnet18_step*.pth"))
    assert len(snapshots) == 1
    n = int(snapshots[0].stem.rsplit("step", 1)[1])
    assert n >= 2 and snapshots[0].name == snapshot_name(n)
    _, models = mbs.step_twins(load_config(cfg_path), n, n)
    saved = torch.load(snapshots[0], weights_only=True)
    mine = models["byol"].encoder.resnet.state_dict()
    assert saved.keys() == mine.keys()
    for k in saved:
        assert torch.equal(saved[k], mine[k]), k
