"""Region sampling, mask pooling and the losses, against references nobody here wrote.

The independent references are the ``lightly`` library (``DetConBLoss``,
``pool_masked``, ``NegativeCosineSimilarity``), ``torch.nn.MSELoss`` and brute-force
loops written from the definitions in the docstrings of ``models/losses.py``.
"""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightly.loss import DetConBLoss, NegativeCosineSimilarity
from lightly.models.utils import pool_masked

from models.losses import (byol_loss, context_loss, detcon_infonce, id_areas, label_grids, mask_pool,
                           region_present, regression_loss, sample_region_ids)


def _grid_reference(label: np.ndarray, h: int, w: int, num_ids: int) -> np.ndarray:
    H, W = label.shape
    out = np.zeros((h, w), np.int64)
    for i in range(h):
        for j in range(w):
            cell = label[i * H // h:(i + 1) * H // h, j * W // w:(j + 1) * W // w]
            out[i, j] = np.bincount(cell.ravel(), minlength=num_ids).argmax()  # ties -> lowest id
    return out


def test_label_grids_match_majority_vote_per_cell():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 32, 32), generator=g)
    labels[:, 8:24, 4:20] = 3  # a large region so that grids are not pure noise
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    grids = label_grids(labels, sizes, num_ids=4)
    for grid, (h, w) in zip(grids, sizes):
        for n in range(3):
            ref = _grid_reference(labels[n].numpy(), h, w, 4)
            assert np.array_equal(grid[n].numpy(), ref), (h, w, n)


# --------------------------------------------------------------------------- #
# pooling
# --------------------------------------------------------------------------- #
def test_mask_pool_matches_lightly_pool_masked():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 6, 5, 7, generator=g)
    grid = torch.randint(0, 4, (3, 5, 7), generator=g)
    grid[2] = 1  # image 2 holds only id 1: the other ids pool to zeros in both
    ids = torch.arange(4).repeat(3, 1)                                   # 3 x 4
    ours = mask_pool(feats, grid, ids)                                   # 3 x 4 x 6
    ref = pool_masked(feats, grid, num_cls=4).permute(0, 2, 1)           # (B, C, N) -> (B, N, C)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_mask_pool_takes_the_sampled_ids_in_their_order():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 5, 4, 4, generator=g)
    grid = torch.randint(0, 3, (2, 4, 4), generator=g)
    ids = torch.tensor([[2, 0, 2], [1, 1, 0]])
    ref = pool_masked(feats, grid, num_cls=3).permute(0, 2, 1)
    assert torch.allclose(mask_pool(feats, grid, ids), torch.stack([ref[n, ids[n]] for n in range(2)]), atol=1e-6)


# --------------------------------------------------------------------------- #
# region sampling
# --------------------------------------------------------------------------- #
def test_region_ids_only_from_ids_present_in_both_views():
    area_a = torch.tensor([[5.0, 3.0, 0.0, 5.0],   # view 1 has ids 0, 1, 3
                           [4.0, 0.0, 2.0, 0.0],
                           [9.0, 0.0, 0.0, 0.0]])
    area_b = torch.tensor([[2.0, 0.0, 7.0, 1.0],   # view 2 has ids 0, 2, 3 -> common {0, 3}
                           [0.0, 6.0, 0.0, 1.0],   # nothing in common -> weight 0
                           [1.0, 0.0, 0.0, 0.0]])  # only id 0
    ids, w = sample_region_ids(area_a, area_b, 16, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 16) and w.shape == (3, 16)
    assert set(ids[0].tolist()) == {0, 3}
    assert torch.all(w[1] == 0)
    assert torch.all(ids[2] == 0) and torch.allclose(w[2], torch.full((16,), 1 / 16))
    for k in range(16):  # 1 / (times the id was drawn)
        assert math.isclose(float(w[0, k]), 1.0 / int((ids[0] == ids[0, k]).sum()), rel_tol=1e-6)
    assert math.isclose(float(w[0].sum()), 2.0, rel_tol=1e-6)  # every distinct id weighs 1

    ids_nb, w_nb = sample_region_ids(area_a, area_b, 16, include_background=False,
                                     generator=torch.Generator().manual_seed(0))
    assert set(ids_nb[0].tolist()) == {3}
    assert torch.all(w_nb[2] == 0)  # only background in common: no region


def test_region_ids_by_area_follow_the_summed_area():
    area_a = torch.tensor([[1.0, 0.0, 5.0]]).repeat(400, 1)
    area_b = torch.tensor([[1.0, 3.0, 13.0]]).repeat(400, 1)  # id 1 absent from view 1
    ids, _ = sample_region_ids(area_a, area_b, 16, by_area=True, generator=torch.Generator().manual_seed(0))
    share = float((ids == 2).float().mean())
    assert abs(share - 18 / 20) < 0.02 and not (ids == 1).any()
    ids_u, _ = sample_region_ids(area_a, area_b, 16, generator=torch.Generator().manual_seed(0))
    assert abs(float((ids_u == 2).float().mean()) - 0.5) < 0.03


def test_id_areas_and_region_present():
    grid = torch.tensor([[[0, 1], [1, 2]]])
    assert id_areas(grid, 4).tolist() == [[1.0, 2.0, 1.0, 0.0]]
    assert region_present(grid, torch.tensor([[3, 1, 0]]), 4).tolist() == [[False, True, True]]


# --------------------------------------------------------------------------- #
# DetCon-B InfoNCE
# --------------------------------------------------------------------------- #
def _case(seed=0, B=4, K=6, D=8, unique=True, L=3):
    g = torch.Generator().manual_seed(seed)
    p0, p1, t0, t1 = (torch.randn(B, K, D, generator=g) for _ in range(4))
    if unique:
        ids = torch.stack([torch.randperm(K, generator=g) for _ in range(B)])
    else:
        ids = torch.randint(0, L, (B, K), generator=g)
    counts = (ids[:, :, None] == ids[:, None, :]).sum(-1).float()
    return p0, p1, t0, t1, ids, 1.0 / counts


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("unique", [True, False], ids=["unique-ids", "repeated-ids"])
def test_detcon_infonce_equals_half_of_lightly_detconb(seed, unique):
    p0, p1, t0, t1, ids, w = _case(seed, unique=unique)
    ours = detcon_infonce(p0, p1, t0, t1, ids, w, temperature=0.1, gather=False)
    ref = DetConBLoss(temperature=0.1, gather_distributed=False)(p0, p1, t0, t1, ids, ids)
    assert math.isclose(2 * float(ours), float(ref), rel_tol=1e-5)


def _infonce_brute_force(q_view, t_views, ids, w, tau, other):
    """One direction, loops over queries and columns, from the docstring's definition.

    t_views: (t_view0, t_view1) over the whole batch; ``other`` = index of the view
    the query is NOT from. Columns of weight 0 are left out.
    """
    B, K, _ = q_view.shape
    total = 0.0
    for b in range(B):
        for k in range(K):
            if w[b, k] == 0:
                continue
            q = F.normalize(q_view[b, k].double(), dim=0)
            logits, pos = [], []
            for v in (other, 1 - other):
                for b2 in range(B):
                    for k2 in range(K):
                        if w[b2, k2] == 0:
                            continue
                        same_region = b2 == b and ids[b2, k2] == ids[b, k]
                        if same_region and v != other:
                            continue                              # itself in its own view
                        logit = float(q @ F.normalize(t_views[v][b2, k2].double(), dim=0)) / tau
                        if same_region:
                            pos.append(logit)
                        logits.append(logit)
            lse = float(torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0))
            total += float(w[b, k]) * (lse - sum(pos) / len(pos))
    return total / (B * K)


def test_detcon_infonce_leaves_out_zero_weight_regions():
    p0, p1, t0, t1, ids, w = _case(3, unique=False)
    w = w.clone()
    w[1] = 0.0                      # an image without common regions
    w[2, ids[2] == ids[2, 0]] = 0.0  # a region absent at this scale
    ours = detcon_infonce(p0, p1, t0, t1, ids, w, temperature=0.2, gather=False)
    ref = 0.5 * (_infonce_brute_force(p0, (t0, t1), ids, w, 0.2, other=1)
                 + _infonce_brute_force(p1, (t0, t1), ids, w, 0.2, other=0))
    assert math.isclose(float(ours), ref, rel_tol=1e-5)
    # a left-out region's vectors change nothing
    t0b, t1b = t0.clone(), t1.clone()
    t0b[1], t1b[1] = 100.0, -100.0
    assert torch.allclose(detcon_infonce(p0, p1, t0b, t1b, ids, w, 0.2, gather=False), ours)


def test_detcon_infonce_gradient_flows_to_predictions_only():
    p0, p1, t0, t1, ids, w = _case(4)
    for t in (p0, p1, t0, t1):
        t.requires_grad_(True)
    detcon_infonce(p0, p1, t0, t1, ids, w, gather=False).backward()
    assert p0.grad.abs().sum() > 0 and p1.grad.abs().sum() > 0
    assert t0.grad is None and t1.grad is None


# --------------------------------------------------------------------------- #
# BYOL and context losses
# --------------------------------------------------------------------------- #
def test_byol_loss_matches_lightly_negative_cosine():
    g = torch.Generator().manual_seed(0)
    p0, p1, z0, z1 = (torch.randn(6, 1, 16, generator=g) for _ in range(4))
    crit = NegativeCosineSimilarity()
    ref = 0.5 * (crit(p0[:, 0], z1[:, 0]) + crit(p1[:, 0], z0[:, 0]))
    ours = byol_loss(p0, p1, z0, z1, torch.ones(6, 1))
    assert math.isclose(float(ours), 2 + 2 * float(ref), rel_tol=1e-5)


def test_regression_loss_weights():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 2, 6, generator=g), torch.randn(3, 2, 6, generator=g)
    w = torch.tensor([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]])
    cos = F.cosine_similarity(p, t, dim=-1)
    ref = float(((2 - 2 * cos) * w).sum() / w.sum())
    assert math.isclose(float(regression_loss(p, t, w)), ref, rel_tol=1e-5)
    assert float(regression_loss(p, t, torch.zeros(3, 2))) == 0.0


def test_context_loss_mse_is_torch_mse_over_kept_regions():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    w = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    keep = w > 0
    ref = torch.nn.MSELoss()(p[keep], t[keep])
    assert math.isclose(float(context_loss(p, t, w, "mse")), float(ref), rel_tol=1e-5)
    assert math.isclose(float(context_loss(p, t, w, "cosine")), float(regression_loss(p, t, w)), rel_tol=1e-6)


# --------------------------------------------------------------------------- #
# distributed: negatives gathered across 2 gloo processes, against lightly
# --------------------------------------------------------------------------- #
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, unique, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    p0, p1, t0, t1, ids, w = _case(7, B=4, unique=unique)
    half = slice(2 * rank, 2 * rank + 2)
    args = (p0[half], p1[half], t0[half], t1[half])
    ours = detcon_infonce(*args, ids[half], w[half], 0.1, gather=True)
    ref = DetConBLoss(0.1, gather_distributed=True)(*args, ids[half], ids[half])
    results[rank] = (float(ours), float(ref))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("unique", [True, False], ids=["unique-ids", "repeated-ids"])
def test_detcon_infonce_gathers_negatives_across_processes(unique):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_gather_worker, args=(2, _free_port(), unique, results), nprocs=2, join=True)
    for rank in range(2):
        ours, ref = results[rank]
        assert math.isclose(2 * ours, ref, rel_tol=1e-5), rank
    # the two processes together compute the one-process loss of the whole batch
    p0, p1, t0, t1, ids, w = _case(7, B=4, unique=unique)
    whole = detcon_infonce(p0, p1, t0, t1, ids, w, 0.1, gather=False)
    assert math.isclose((results[0][0] + results[1][0]) / 2, float(whole), rel_tol=1e-5)
