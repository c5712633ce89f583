"""ACLUS.forward as the method specifies it, on tiny tensors (CPU).

Each test names the defect that would break it.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from lightly.loss import NegativeCosineSimilarity

from models.aclus import ACLUS
from models.methods import METHODS

S = 32  # view side: C5 is 1 x 1, P2 is 8 x 8


def _model(method: str, **kw) -> ACLUS:
    torch.manual_seed(0)
    return ACLUS(method, proj_hidden=16, proj_dim=8, pred_hidden=16, num_rois=4, **kw)


def _batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Views with 3 large regions (ids 0, 1, 2) in both views; id 3 only in view 1."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, S, S, dtype=torch.int64)
    mask[:, :, S // 2:] = 1
    mask[:, S // 2:, :S // 2] = 2
    mask1 = mask.clone()
    mask1[:, :4, :4] = 3
    return {"view1": torch.randn(b, 3, S, S, generator=g), "view2": torch.randn(b, 3, S, S, generator=g),
            "mask1": mask1, "mask2": mask.clone(),
            "ctx_damaged": torch.randn(b, 3, S, S, generator=g), "ctx_clean": torch.randn(b, 3, S, S, generator=g),
            "ctx_mask": mask.clone(), "ctx_valid": torch.ones(b, dtype=torch.bool)}


def _loss_and_grads(model: ACLUS, batch: dict, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """On a copy of ``model``: a forward updates the BatchNorm running statistics,
    which the context branch reads, so each comparison starts from the same state."""
    model = copy.deepcopy(model)
    loss, _ = model(batch, torch.Generator().manual_seed(seed))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _ids_drawn_by_forward(model: ACLUS, batch: dict, monkeypatch) -> torch.Tensor:
    """The region ids ``model.forward`` draws (captured at models.aclus.sample_region_ids)."""
    import models.aclus as aclus_module

    drawn = []
    real = aclus_module.sample_region_ids

    def spy(*args, **kwargs):
        ids, w = real(*args, **kwargs)
        drawn.append((ids, w))
        return ids, w

    monkeypatch.setattr(aclus_module, "sample_region_ids", spy)
    model(batch, torch.Generator().manual_seed(0))
    assert len(drawn) == 1                        # once per batch, not per scale
    return drawn[0]


def test_ids_are_drawn_only_from_those_present_in_both_views(monkeypatch):
    # bug caught: drawing from view 1's ids alone (id 3), or per scale
    batch = _batch(b=64)
    ids, w = _ids_drawn_by_forward(_model("detcon"), batch, monkeypatch)
    assert set(ids.unique().tolist()) == {0, 1, 2}
    assert torch.all(w > 0)
    ids, _ = _ids_drawn_by_forward(_model("detcon", include_background=False), batch, monkeypatch)
    assert set(ids.unique().tolist()) == {1, 2}


def test_image_without_overlap_adds_exactly_zero_to_loss_and_gradients():
    # bugs caught: the context term computed on the placeholder overlap, or the
    # placeholder entering the BatchNorm statistics of the other images
    model = _model("aclus")
    batch = _batch()
    batch["ctx_valid"][1] = False
    loss, grads = _loss_and_grads(model, batch)
    other = {k: v.clone() for k, v in batch.items()}
    other["ctx_damaged"][1] = 50.0 * torch.randn(3, S, S)
    other["ctx_clean"][1] = -3.0
    other["ctx_mask"][1] = 2
    loss2, grads2 = _loss_and_grads(model, other)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for n in grads:
        assert torch.equal(grads[n], grads2[n]), n


def test_context_term_is_skipped_not_zero_filled():
    model = _model("aclus")
    batch = _batch()
    batch["ctx_valid"][:] = False
    _, stats = model(batch, torch.Generator().manual_seed(0))
    assert all(float(stats[f"context/{s}"]) == 0.0 for s in ("c5", "p4", "p3", "p2"))


@pytest.mark.parametrize("method", ["aclus", "detcon", "byol", "byol_fpn"])
def test_swapping_the_views_leaves_the_loss_unchanged(method):
    # bug caught: negatives or positives taken from one direction only (not symmetrised)
    model = _model(method)
    batch = _batch()
    swapped = dict(batch, view1=batch["view2"], view2=batch["view1"], mask1=batch["mask2"], mask2=batch["mask1"])
    a, _ = _loss_and_grads(model, batch)
    b, _ = _loss_and_grads(model, swapped)
    assert math.isclose(float(a), float(b), rel_tol=1e-5)


@pytest.mark.parametrize("relabel", [False, True], ids=["same-ids", "ids-exchanged-in-view-2"])
def test_detcon_loss_equals_a_loop_that_pools_each_view_by_its_own_ids(monkeypatch, relabel):
    """Reference written from the definition: for every drawn id, pool each view's features over
    *that view's* cells of that id (a Python loop), apply the heads, and score with lightly's
    DetConBLoss (ours is half of it), summed over the four scales. View 2's quadrants carry
    other ids than view 1's when ``relabel``, so a forward that pools view 2 with view 1's
    labels, or pairs regions by position rather than id, differs from the loop (an earlier test,
    "the loss changes when view 2's ids are exchanged", passed with positives rolled by one
    region: any change of the masks changes the loss)."""
    from lightly.loss import DetConBLoss

    import models.aclus as aclus_module

    size, b = 64, 2                                   # quadrants align with every grid (16, 8, 4, 2)
    quad = torch.zeros(size, size, dtype=torch.int64)
    quad[:, size // 2:] = 1
    quad[size // 2:, :size // 2] = 2
    quad[size // 2:, size // 2:] = 3
    mask1 = quad.expand(b, -1, -1).clone()
    mask2 = (torch.tensor([2, 3, 0, 1])[quad] if relabel else quad).expand(b, -1, -1).clone()
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randn(b, 3, size, size, generator=g), "view2": torch.randn(b, 3, size, size, generator=g),
             "mask1": mask1, "mask2": mask2}
    model = _model("detcon")
    reference_model = copy.deepcopy(model)
    drawn = []
    real = aclus_module.sample_region_ids
    monkeypatch.setattr(aclus_module, "sample_region_ids",
                        lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    loss, _ = model(batch, torch.Generator().manual_seed(0))
    ids, _ = drawn[0]                                                       # B x K, shared by both views

    m = reference_model
    views = torch.cat([batch["view1"], batch["view2"]])
    masks = torch.cat([mask1, mask2])
    online = m.encoder(views)
    with torch.no_grad():
        target = m.target_encoder(views)
    expected = 0.0
    for scale in ("c5", "p4", "p3", "p2"):
        side = online[scale].shape[-1]
        step = size // side
        grid = masks[:, step // 2::step, step // 2::step]                   # 2B x side x side (exact here)

        def pool(feats):
            out = torch.zeros(2 * b, ids.shape[1], feats.shape[1])
            for i in range(2 * b):
                for k in range(ids.shape[1]):
                    cells = grid[i] == ids[i % b, k]
                    out[i, k] = feats[i][:, cells].mean(dim=1)
            return out

        head = m.projector_c5 if scale == "c5" else m.projector_fpn
        tgt_head = m.target_projector_c5 if scale == "c5" else m.target_projector_fpn
        pred = m.predictor(head(pool(online[scale])))
        with torch.no_grad():
            proj = tgt_head(pool(target[scale]))
        p0, p1 = pred.chunk(2)
        t0, t1 = proj.chunk(2)
        expected = expected + 0.5 * DetConBLoss(temperature=m.temperature, gather_distributed=False)(
            p0, p1, t0, t1, ids, ids)
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-5), (float(loss), float(expected))


def test_damaged_overlap_stays_out_of_batchnorm_statistics():
    # bug caught: the damaged view batched with the clean ones into the online encoder
    model = _model("aclus")
    reference = copy.deepcopy(model.encoder)
    batch = _batch()
    model.train()
    model(batch, torch.Generator().manual_seed(0))
    reference.train()
    reference(torch.cat([batch["view1"], batch["view2"]]))
    for (n, a), b in zip(model.encoder.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), n
    assert all(m.training for m in model.modules())  # training mode restored


def test_context_pass_normalises_by_its_own_batch_and_leaves_running_statistics():
    """``context_batchnorm="batch"``: the overlap pass computes what a train-mode copy computes on
    that batch alone (its own batch statistics), yet no running statistic (nor its counter) moves.
    Breaks if the pass runs in inference mode (the trivial task of docs/results/context_task.json),
    or if damaged images update the exported encoder's statistics."""
    from models.aclus import batchnorm_batch_statistics

    model = _model("aclus")
    x = _batch()["ctx_damaged"]
    before = {n: b.clone() for n, b in model.encoder.named_buffers()}
    plain = copy.deepcopy(model.encoder).train()
    with torch.no_grad(), batchnorm_batch_statistics(model):
        ours = model.encoder(x)
    with torch.no_grad():
        ref = plain(x)
    for k in ours:
        assert torch.allclose(ours[k], ref[k], atol=1e-6), k
    for n, b in model.encoder.named_buffers():
        assert torch.equal(b, before[n]), n
    first = next(n for n in before if n.endswith("running_mean"))
    assert not torch.equal(dict(plain.named_buffers())[first], before[first])
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("mode, depends", [("batch", True), ("running", False)])
def test_context_term_of_an_image_depends_on_its_batch_only_with_batch_statistics(mode, depends):
    """Changing image 2's overlap changes image 0's context prediction through the batch statistics
    (batch mode) and not in inference mode; read from the per-image pooled heads via a hook."""
    model = _model("aclus", context_batchnorm=mode)
    seen = []
    model.predictor.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    batch = _batch()
    other = dict(batch, ctx_damaged=batch["ctx_damaged"].clone())
    other["ctx_damaged"][2] += 3.0
    copy.deepcopy(model)(batch, torch.Generator().manual_seed(0))
    first = seen[-1][0]                                           # last predictor call: context p2, image 0
    copy.deepcopy(model)(other, torch.Generator().manual_seed(0))
    assert (not torch.allclose(first, seen[-1][0], atol=1e-5)) == depends


def test_classic_byol_is_global_pooled_c5_without_fpn():
    model = _model("byol")
    assert model.encoder.fpn is None and model.projector_fpn is None
    batch = _batch()
    loss, stats = model(batch)
    assert set(stats) == {"regression/global", "loss"}
    # the same loss written with lightly's criterion on the model's own modules
    views = torch.cat([batch["view1"], batch["view2"]])
    p = model.predictor(model.projector_c5(model.encoder.resnet(views)))
    with torch.no_grad():
        z = model.target_projector_c5(model.target_encoder.resnet(views))
    p0, p1, z0, z1 = (*p.chunk(2), *z.chunk(2))
    ref = 0.5 * (NegativeCosineSimilarity()(p0, z1) + NegativeCosineSimilarity()(p1, z0))
    assert math.isclose(float(loss), 2 + 2 * float(ref), rel_tol=1e-4)


def test_every_online_parameter_gets_a_gradient():
    # DDP stalls on a parameter that never gets a gradient
    for method in METHODS:
        model = _model(method)
        _, grads = _loss_and_grads(model, _batch())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(grads), (method, trainable ^ set(grads))
