"""benchmarks/measure_byol_parity.py: the per-tensor figures, against a hand-computed case and
against timm's LARS itself (the premise the measurement rests on)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from timm.optim import Lars

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measure_byol_parity import summarise, tensor_rows  # noqa: E402


def _linear(w, g, b, gb):
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.copy_(torch.tensor([b]))
    m.weight.grad = torch.tensor([g])
    m.bias.grad = torch.tensor([gb])
    return m


def test_rows_match_a_hand_computed_case():
    # w = (1, 0), g = (0, 1), wd = 1: g + wd w = (1, 1), 2g + wd w = (1, 2), angle acos(3 / sqrt(10))
    rows = {r["name"]: r for r in tensor_rows(_linear([1.0, 0.0], [0.0, 1.0], 2.0, 0.5), 1.0, True, 0.1)}
    w = rows["weight"]
    assert w["decayed"] and w["g_over_wd_w"] == pytest.approx(1.0)
    assert w["angle_if_doubled_deg"] == pytest.approx(math.degrees(math.acos(3 / math.sqrt(10))))
    b = rows["bias"]
    assert not b["decayed"] and b["relative_step_at_peak_lr"] == pytest.approx(0.1 * 0.5 / 2.0)
    s = summarise(list(rows.values()))
    assert s["decayed_tensors"] == 1 and s["undecayed_tensors"] == 1


def _lars_step(scale: float, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = _linear([1.0, 0.0], [0.0, scale * 50.0], 2.0, scale * 0.5)
    before = [p.detach().clone() for p in (m.weight, m.bias)]
    opt = Lars([{"params": [m.weight], "weight_decay": wd}, {"params": [m.bias], "weight_decay": 0.0}],
               lr=0.1, momentum=0.0, trust_coeff=0.001)
    opt.step()
    return m.weight.detach() - before[0], m.bias.detach() - before[1]


def test_timm_lars_ignores_a_gradient_factor_only_where_weights_decay():
    """The measurement's premise: doubling g (our 2 + 2x loss against lightly's) leaves a decayed
    tensor's LARS update nearly unchanged when ||g|| >> wd ||w||, and doubles an undecayed one's."""
    w1, b1 = _lars_step(1.0, 1e-6)
    w2, b2 = _lars_step(2.0, 1e-6)
    assert torch.allclose(w1, w2, rtol=1e-4, atol=1e-9)
    assert torch.allclose(b2, 2 * b1)
    angle = tensor_rows(_linear([1.0, 0.0], [0.0, 50.0], 2.0, 0.5), 1e-6, True, 0.1)[0]["angle_if_doubled_deg"]
    assert angle < 1e-4


def test_both_run_measurements_read_a_real_run_folder(tmp_path, synthetic_pretrain_dir, make_pretrain_config):
    """measure_byol_parity and measure_context_task open a run through benchmarks/run_sample: the
    trained model is the checkpoint's (its figures differ from initialisation's), on the same batches."""
    import json

    import measure_context_task
    import pretrain_aclus

    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, optimizer={"total_epochs": 1, "warmup_epochs": 0})
    assert pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    import measure_byol_parity

    assert measure_byol_parity.main(["--run_dir", str(run), "--batches", "1", "--json", str(tmp_path / "p.json")]) == 0
    parity = json.loads((tmp_path / "p.json").read_text())
    assert parity["checkpoint"]["epoch"] is not None and parity["batches"] == 1
    w_init = {r["name"]: r["w_norm"] for r in parity["init"]["tensors"]}
    w_trained = {r["name"]: r["w_norm"] for r in parity["trained"]["tensors"]}
    assert w_init.keys() == w_trained.keys() and w_init != w_trained
    assert measure_context_task.main(["--run_dir", str(run), "--batches", "1", "--json", str(tmp_path / "c.json")]) == 0
    context = json.loads((tmp_path / "c.json").read_text())
    assert context["checkpoint"]["epoch"] is not None and context["init"] != context["trained"]
