"""LARS, the learning-rate and momentum schedules and the EMA, against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.aclus import ACLUS
from pretraining.config import PretrainConfig
from pretraining.optim import build_optimizer, lars_param_groups, scaled_lr
from pretraining.schedules import byol_momentum, warmup_cosine


def _tiny(method: str = "detcon") -> ACLUS:
    torch.manual_seed(0)
    return ACLUS(method, proj_hidden=8, proj_dim=8, pred_hidden=8, num_rois=2)


def _cfg(**optimizer) -> PretrainConfig:
    return PretrainConfig().with_values({f"optimizer.{k}": v for k, v in optimizer.items()})


def test_lars_groups_exclude_biases_and_norm_parameters():
    model = _tiny()
    decay, no_decay = lars_param_groups(model, 1e-6, exclude_bias_and_bn=True)
    assert decay["weight_decay"] == 1e-6 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    norm_params = {f"{mn}.{pn}" for mn, m in model.named_modules()
                   if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for pn, _ in m.named_parameters()}
    biases = {n for n in names.values() if n.endswith(".bias")}
    online = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay_names == (norm_params | biases) & online
    assert {names[id(p)] for p in decay["params"]} == online - no_decay_names
    assert all(not names[id(p)].startswith("target_") for g in (decay, no_decay) for p in g["params"])


def test_lars_step_adapts_weights_only():
    # one LARS step by hand: p -= lr * trust * (g + wd p), trust = eta |p| / (|g| + wd |p|),
    # and for a bias (no decay, no adaptation): p -= lr * g
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.arange(12.0).reshape(3, 4) / 10 - 0.5)
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model.weight.grad = torch.full((3, 4), 0.2)
    model.bias.grad = torch.tensor([1.0, 2.0, -1.0])
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    cfg = _cfg(weight_decay=1e-2, momentum=0.9)
    opt, _, _ = build_optimizer(cfg, model, global_batch=256, iters_per_epoch=10)
    lr = 0.25
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    g = torch.full((3, 4), 0.2)
    trust = 1e-3 * float(w0.norm()) / (float(g.norm()) + 1e-2 * float(w0.norm()))
    assert torch.allclose(model.weight, w0 - lr * trust * (g + 1e-2 * w0), atol=1e-7)
    assert torch.allclose(model.bias, b0 - lr * torch.tensor([1.0, 2.0, -1.0]), atol=1e-7)


def test_lr_is_scaled_by_global_batch_and_follows_warmup_then_cosine():
    assert scaled_lr(0.3, 512) == pytest.approx(0.6)
    cfg = _cfg(base_lr=0.4, total_epochs=10, warmup_epochs=2)
    _, lr, mom = build_optimizer(cfg, _tiny(), global_batch=64, iters_per_epoch=5)  # peak 0.1
    assert lr.shape == (50,)
    assert lr[0] == 0.0
    assert lr[5] == pytest.approx(0.05)          # half-way through the 10 warm-up steps
    assert lr[10] == pytest.approx(0.1)          # peak when the warm-up ends
    assert lr[30] == pytest.approx(0.05)         # half-way through the 40 cosine steps
    assert lr[49] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert np.all(np.diff(lr[10:]) <= 0)


def test_a_fractional_warm_up_is_that_share_of_an_epochs_steps():
    """warmup_epochs 0.4 of 5 iterations = 2 warm-up steps (an int-only schedule would give 0 or fail)."""
    cfg = _cfg(base_lr=0.4, total_epochs=2, warmup_epochs=0.4)
    _, lr, _ = build_optimizer(cfg, _tiny(), global_batch=64, iters_per_epoch=5)  # peak 0.1
    assert lr.shape == (10,)
    assert lr[:3].tolist() == pytest.approx([0.0, 0.05, 0.1])
    assert np.all(np.diff(lr[2:]) <= 0)


def test_byol_momentum_at_start_middle_and_end():
    m = byol_momentum(0.99, 100)
    assert m.shape == (101,)
    assert m[0] == pytest.approx(0.99)
    assert m[50] == pytest.approx(1 - 0.01 * 0.5)   # cos(pi/2) = 0
    assert m[100] == pytest.approx(1.0)
    assert np.all(np.diff(m) > 0)


def test_warmup_cosine_without_warmup_starts_at_base():
    s = warmup_cosine(1.0, 0.0, epochs=2, iters_per_epoch=2, warmup_epochs=0)
    assert s.tolist() == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_ema_update_moves_parameters_and_copies_batchnorm_buffers():
    model = _tiny()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.encoder.train()
    model.encoder(torch.randn(4, 3, 32, 32))  # running statistics now differ from the target's
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for o, t, t0 in zip(model.encoder.parameters(), model.target_encoder.parameters(), before):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o)
    bn_o, bn_t = model.encoder.resnet.bn1, model.target_encoder.resnet.bn1
    assert torch.equal(bn_o.running_mean, bn_t.running_mean) and torch.equal(bn_o.running_var, bn_t.running_var)
    assert bn_o.running_mean.abs().sum() > 0
    assert not any(p.requires_grad for p in model.target_parameters())
