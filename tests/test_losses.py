"""Mask pooling, id sampling and the losses against direct brute-force references."""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.losses import (detcon_infonce, id_areas, label_grids, mask_pool, regression_loss,
                           sample_mask_ids)


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


def test_mask_pool_is_area_normalised_mean():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 5, 4, 4, generator=g)
    grid = torch.randint(0, 3, (2, 4, 4), generator=g)
    grid[1] = 0  # image 1 has only id 0: id 2 pools to zeros
    ids = torch.tensor([[0, 1, 2], [0, 2, 0]])
    pooled = mask_pool(feats, grid, ids)
    assert pooled.shape == (2, 3, 5)
    for n in range(2):
        for k in range(3):
            sel = grid[n] == ids[n, k]
            ref = feats[n][:, sel].mean(dim=1) if sel.any() else torch.zeros(5)
            assert torch.allclose(pooled[n, k], ref, atol=1e-6)


def test_sample_mask_ids_only_present_ids_and_duplicate_weights():
    areas = torch.tensor([[0.0, 3.0, 0.0, 5.0],   # ids 1 and 3 present
                          [0.0, 0.0, 0.0, 0.0],   # nothing in common -> weight 0
                          [9.0, 0.0, 0.0, 0.0]])  # only id 0
    ids, w = sample_mask_ids(areas, 16, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 16) and w.shape == (3, 16)
    assert set(ids[0].tolist()) <= {1, 3}
    assert torch.all(w[1] == 0)
    assert torch.all(ids[2] == 0) and torch.allclose(w[2], torch.full((16,), 1 / 16))
    for k in range(16):  # 1 / (times the id was drawn)
        assert math.isclose(float(w[0, k]), 1.0 / int((ids[0] == ids[0, k]).sum()), rel_tol=1e-6)
    # every distinct id then weighs exactly 1
    assert math.isclose(float(w[0].sum()), len(set(ids[0].tolist())), rel_tol=1e-6)


def test_sample_mask_ids_by_area_follows_area():
    areas = torch.tensor([[1.0, 0.0, 9.0]]).repeat(200, 1)
    ids, _ = sample_mask_ids(areas, 16, by_area=True, generator=torch.Generator().manual_seed(0))
    share = float((ids == 2).float().mean())
    assert 0.85 < share < 0.95
    ids_u, _ = sample_mask_ids(areas, 16, by_area=False, generator=torch.Generator().manual_seed(0))
    assert 0.45 < float((ids_u == 2).float().mean()) < 0.55


def test_id_areas_counts_cells():
    grid = torch.tensor([[[0, 1], [1, 2]]])
    assert id_areas(grid, 4).tolist() == [[1.0, 2.0, 1.0, 0.0]]


def _infonce_reference(pred, target, ids, w, tau, row_offset=0):
    """Plain-loop InfoNCE: query (b,k) vs every target vector, skipping the other draws
    of the same id of the same image and zero-weight columns."""
    B, K, _ = pred.shape
    Bg = target.shape[0]
    num, den = 0.0, 0.0
    for b in range(B):
        gb = b + row_offset  # this query's image in the global batch
        for k in range(K):
            if w[gb, k] == 0:
                continue
            q = F.normalize(pred[b, k], dim=0)
            logits, pos = [], None
            for b2 in range(Bg):
                for k2 in range(K):
                    if b2 == gb and k2 == k:
                        pos = len(logits)
                    elif (b2 == gb and ids[gb, k2] == ids[gb, k]) or w[b2, k2] == 0:
                        continue
                    logits.append(float(q @ F.normalize(target[b2, k2], dim=0)) / tau)
            logits = torch.tensor(logits, dtype=torch.float64)
            ce = -(logits[pos] - torch.logsumexp(logits, 0))
            num += float(w[gb, k]) * float(ce)
            den += float(w[gb, k])
    return num / den


def _random_case(seed=0, B=4, K=5, D=8, L=3):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(B, K, D, generator=g), torch.randn(B, K, D, generator=g)
    areas = torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) > 0.3)
    areas[0] = 0.0  # one image without common ids
    areas[1, 0] = 1.0
    ids, w = sample_mask_ids(areas, K, generator=g)
    # make duplicates draw the same target vector, as in the model
    for b in range(B):
        for k in range(K):
            first = int((ids[b] == ids[b, k]).nonzero()[0])
            target[b, k] = target[b, first]
    return pred, target, ids, w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detcon_infonce_matches_reference(seed):
    pred, target, ids, w = _random_case(seed)
    loss = detcon_infonce(pred, target, ids, w, temperature=0.1, gather=False)
    ref = _infonce_reference(pred, target, ids, w, 0.1)
    assert math.isclose(float(loss), ref, rel_tol=1e-5)


def test_detcon_infonce_gradient_flows_to_queries_only():
    pred, target, ids, w = _random_case(3)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    detcon_infonce(pred, target, ids, w, gather=False).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None


def test_regression_loss_is_two_minus_two_cos():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 2, 6, generator=g), torch.randn(3, 2, 6, generator=g)
    w = torch.tensor([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]])
    cos = F.cosine_similarity(p, t, dim=-1)
    ref = float(((2 - 2 * cos) * w).sum() / w.sum())
    assert math.isclose(float(regression_loss(p, t, w)), ref, rel_tol=1e-5)


# --------------------------------------------------------------------------- #
# distributed: negatives gathered across 2 gloo processes
# --------------------------------------------------------------------------- #
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    pred, target, ids, w = _random_case(7, B=4)
    half = slice(2 * rank, 2 * rank + 2)
    loss = detcon_infonce(pred[half], target[half], ids[half], w[half], 0.1, gather=True)
    results[rank] = float(loss)
    torch.distributed.destroy_process_group()


def test_detcon_infonce_gathers_negatives_across_processes():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_gather_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    pred, target, ids, w = _random_case(7, B=4)
    for rank in range(2):
        half = slice(2 * rank, 2 * rank + 2)
        # queries of this rank against ALL targets of the global batch
        ref = _infonce_reference(pred[half], target, ids, w, 0.1, row_offset=2 * rank)
        assert math.isclose(results[rank], ref, rel_tol=1e-5), rank
