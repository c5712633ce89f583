"""The study's reference BYOL (``lightly_byol``): lightly's heads and loss inside our step.

Our ``byol`` and ``lightly_byol`` differ only in who wrote the heads and the loss, so with the
same weights their losses must relate as ``ours = 2 + 2 x lightly's`` (BYOL's ``2 - 2 cos`` vs
lightly's negative cosine similarity). Breaks if our MLP differs from lightly's BYOL heads
(layer order, BN, activation), if our loss pairs a prediction with its own view's target, or if
the lightly arm is silently built with our heads.
"""
from __future__ import annotations

import pytest
import torch
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

from models.aclus import ACLUS
from models.methods import METHODS, Method


def _copy_mlp_into_lightly(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Our MLP (Linear+bias, BN, ReLU, Linear) -> lightly's head (Linear without bias before BN,
    BN, ReLU, Linear): the first bias is cancelled by BatchNorm in training mode."""
    o = [m for m in ours.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
    t = [m for m in theirs.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
    assert [type(m) for m in o] == [type(m) for m in t]
    with torch.no_grad():
        for a, b in zip(o, t):
            b.weight.copy_(a.weight)
            if b.bias is not None:
                b.bias.copy_(a.bias)


def test_lightly_byol_is_built_from_lightly_heads():
    m = ACLUS("lightly_byol", proj_hidden=64, proj_dim=16, pred_hidden=32)
    assert isinstance(m.projector_c5, BYOLProjectionHead)
    assert isinstance(m.predictor, BYOLPredictionHead)
    assert isinstance(m.target_projector_c5, BYOLProjectionHead)


def test_lightly_byol_loss_is_ours_up_to_two_plus_two_x():
    torch.manual_seed(0)
    ours = ACLUS("byol", proj_hidden=64, proj_dim=16, pred_hidden=32)
    theirs = ACLUS("lightly_byol", proj_hidden=64, proj_dim=16, pred_hidden=32)
    # the target differs from the online net, so a loss that pairs a view with itself is caught
    with torch.no_grad():
        for p in [*ours.target_encoder.parameters(), *ours.target_projector_c5.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    theirs.encoder.load_state_dict(ours.encoder.state_dict())
    theirs.target_encoder.load_state_dict(ours.target_encoder.state_dict())
    _copy_mlp_into_lightly(ours.projector_c5, theirs.projector_c5)
    _copy_mlp_into_lightly(ours.target_projector_c5, theirs.target_projector_c5)
    _copy_mlp_into_lightly(ours.predictor, theirs.predictor)
    g = torch.Generator().manual_seed(1)
    batch = {"view1": torch.randn(6, 3, 32, 32, generator=g), "view2": torch.randn(6, 3, 32, 32, generator=g),
             "mask1": torch.zeros(6, 32, 32, dtype=torch.long), "mask2": torch.zeros(6, 32, 32, dtype=torch.long)}
    loss_ours, _ = ours(batch)
    loss_theirs, _ = theirs(batch)
    assert torch.allclose(loss_ours, 2 + 2 * loss_theirs, atol=1e-5), (loss_ours, loss_theirs)
    # swapping the views' targets (a prediction against its own view) changes the value
    assert not torch.allclose(loss_ours, 2 + 2 * theirs.lightly_criterion(
        *[theirs.predictor(theirs.projector_c5(theirs.encoder(batch["view1"])["c5"].mean((2, 3)))),
          theirs.target_projector_c5(theirs.target_encoder(batch["view1"])["c5"].mean((2, 3)))]), atol=1e-3)


def _twins(theirs_name: str) -> tuple[ACLUS, ACLUS, dict]:
    """Our byol and a lightly-headed method with the same weights, and one batch."""
    torch.manual_seed(0)
    ours = ACLUS("byol", proj_hidden=64, proj_dim=16, pred_hidden=32)
    theirs = ACLUS(theirs_name, proj_hidden=64, proj_dim=16, pred_hidden=32)
    with torch.no_grad():
        for p in [*ours.target_encoder.parameters(), *ours.target_projector_c5.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    theirs.encoder.load_state_dict(ours.encoder.state_dict())
    theirs.target_encoder.load_state_dict(ours.target_encoder.state_dict())
    for a, b in ((ours.projector_c5, theirs.projector_c5), (ours.target_projector_c5, theirs.target_projector_c5),
                 (ours.predictor, theirs.predictor)):
        _copy_mlp_into_lightly(a, b)
    g = torch.Generator().manual_seed(1)
    batch = {"view1": torch.randn(6, 3, 32, 32, generator=g), "view2": torch.randn(6, 3, 32, 32, generator=g),
             "mask1": torch.zeros(6, 32, 32, dtype=torch.long), "mask2": torch.zeros(6, 32, 32, dtype=torch.long)}
    return ours, theirs, batch


def test_lightly_byol_x2_steps_with_our_byols_gradient():
    """The parity arm: lightly's heads and loss times 2 give, on every online tensor, the gradient of our
    own byol (an independent loss: 2 - 2 cos from models.losses); a scale left out halves every gradient."""
    ours, theirs, batch = _twins("lightly_byol_x2")
    loss_ours, _ = ours(batch)
    loss_theirs, _ = theirs(batch)
    assert torch.allclose(loss_ours, 2 + loss_theirs, atol=1e-5), (loss_ours, loss_theirs)
    loss_ours.backward()
    loss_theirs.backward()

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        # float32 sums in another order: a relative norm, with a floor for the gradients that BatchNorm
        # cancels (the projector's last bias feeds the predictor's BN: ~1e-8, rounding noise)
        return float((a - b).norm()) <= 1e-4 * float(a.norm()) + 1e-6

    for (name, a), b in zip(ours.encoder.named_parameters(), theirs.encoder.parameters()):
        assert same(a.grad, b.grad), name
    for a, b in ((ours.projector_c5, theirs.projector_c5), (ours.predictor, theirs.predictor)):
        la = [m for m in a.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
        lb = [m for m in b.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
        for x, y in zip(la, lb):
            assert same(x.weight.grad, y.weight.grad)
            if y.bias is not None:
                assert same(x.bias.grad, y.bias.grad)


def test_a_loss_scale_that_is_not_positive_or_not_on_lightlys_loss_is_refused():
    with pytest.raises(ValueError, match="loss_scale"):
        Method("x", "global", True, "regression", False, "", heads="lightly", loss_scale=0.0)
    with pytest.raises(ValueError, match="lightly's BYOL loss only"):   # our heads would ignore it
        Method("x", "global", True, "regression", False, "", loss_scale=2.0)


@pytest.mark.parametrize("field, value", [("pair_loss", "regresion"), ("pooling", "local"), ("heads", "timm")])
def test_a_misspelt_method_field_is_refused_when_the_table_is_built(field, value):
    kwargs = dict(name="x", pooling="global", whole_image=True, pair_loss="regression", context=False, summary="")
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        Method(**kwargs)


def test_every_method_of_the_table_builds():
    for name in METHODS:
        ACLUS(name, proj_hidden=32, proj_dim=16, pred_hidden=32)
