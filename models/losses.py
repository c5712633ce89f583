"""Region sampling, mask pooling and the losses of ACLUS / DetCon-B / BYOL.

Shapes: ``B`` images per view on this process, ``K`` region ids sampled per image,
``C`` feature channels, ``D`` embedding size, ``L`` the bound on label ids (ids are
0..L-1; a fixed number, so that no step reads the largest id back from the device),
``h x w`` the grid of one feature scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.distributed import all_gather_cat, is_dist


# --------------------------------------------------------------------------- #
# masks -> per-scale label grids -> sampled ids -> pooled features
# --------------------------------------------------------------------------- #
def label_grids(labels: torch.Tensor, sizes: list[tuple[int, int]], num_ids: int,
                return_areas: bool = False):
    """Downsample integer label maps to each feature grid by majority area.

    The share of every cell of the finest grid that each id covers is counted, the
    largest share wins the cell, and coarser grids are pooled from those shares
    (``adaptive_avg_pool2d``; exact when the sizes divide each other). When the finest
    grid divides the maps (``H % h0 == 0``, the case of ResNet's P2 at any side divisible
    by 4) the counts are one ``scatter_add`` per pixel into (N, h0 * w0 * L), never an
    (N, L, H, W) one-hot image: ``num_ids`` is a fixed bound (64 by default), and at 224 px
    and batch 192 the one-hot of 576 maps would take 7 GB per 16 ids. Other sizes use the
    one-hot. Ties go to the smaller id either way (``argmax`` takes the first maximum).

    Args:
        labels: (N, H, W) int64 label maps with values in [0, num_ids).
        sizes: grid sizes ``(h, w)``, finest first.
        num_ids: L, the number of label ids.
        return_areas: also return each id's pixel area in each map.

    Returns:
        one (N, h, w) int64 grid per size; with ``return_areas`` also the (N, L) float
        pixel areas (as :func:`id_areas` of ``labels``).
    """
    n, height, width = labels.shape
    h0, w0 = sizes[0]
    if height % h0 == 0 and width % w0 == 0:
        fy, fx = height // h0, width // w0
        rows = torch.arange(height, device=labels.device) // fy
        cols = torch.arange(width, device=labels.device) // fx
        cell = (rows[:, None] * w0 + cols[None, :]) * num_ids                 # H x W
        index = (cell[None] + labels).reshape(n, -1)                            # N x HW
        counts = torch.zeros(n, h0 * w0 * num_ids, device=labels.device)
        counts.scatter_add_(1, index, torch.ones((), device=labels.device).expand(index.shape))
        counts = counts.view(n, h0, w0, num_ids).permute(0, 3, 1, 2)            # N x L x h0 x w0
        share = counts / (fy * fx)
        areas = counts.sum(dim=(2, 3)) if return_areas else None
    else:
        one_hot = F.one_hot(labels, num_ids).permute(0, 3, 1, 2).float()       # N x L x H x W
        share = F.adaptive_avg_pool2d(one_hot, sizes[0])                        # N x L x h0 x w0
        areas = one_hot.sum(dim=(2, 3)) if return_areas else None
    grids = []
    for size in sizes:
        s = share if tuple(share.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(share, size)
        grids.append(s.argmax(dim=1))
    return (grids, areas) if return_areas else grids


def id_areas(grid: torch.Tensor, num_ids: int) -> torch.Tensor:
    """(N, h, w) int64 grid -> (N, L) number of cells (pixels) holding each id."""
    n = grid.shape[0]
    flat = grid.reshape(n, -1)
    return torch.zeros(n, num_ids, device=grid.device).scatter_add_(
        1, flat, torch.ones(flat.shape, device=grid.device))


def sample_region_ids(area_a: torch.Tensor, area_b: torch.Tensor, k: int, by_area: bool = False,
                      include_background: bool = True, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k`` region ids per image, with replacement, once for both views and all scales.

    An id is eligible when it covers at least one pixel of *both* views (and, with
    ``include_background=False``, when it is not 0). Draws are uniform over the
    eligible ids (the upstream code) or proportional to their area summed over the
    two views (the paper's text).

    Args:
        area_a, area_b: (B, L) pixel area of each id in view 1 / view 2.
        k: ids drawn per image.

    Returns:
        ids: (B, K) int64 drawn ids.
        roi_weight: (B, K) float, 1 / (times the id was drawn for that image), as
            DetCon weights a region by ``1 / obj_area``: every distinct id then weighs
            the same; 0 for images without any eligible id.
    """
    eligible = (area_a > 0) & (area_b > 0)
    if not include_background:
        eligible[:, 0] = False
    probs = (area_a + area_b).float() * eligible if by_area else eligible.float()
    valid = eligible.any(dim=1)                                         # B
    probs = torch.where(valid[:, None], probs, torch.ones_like(probs))  # placeholder rows
    ids = draw_categorical(probs, k, generator)                         # B x K
    counts = (ids[:, :, None] == ids[:, None, :]).sum(dim=-1).float()  # B x K
    return ids, valid[:, None].float() / counts


def draw_categorical(weights: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` draws with replacement per row, in proportion to ``weights`` (B, L) >= 0 with a
    positive sum per row -> (B, K) int64: ``torch.multinomial(weights, k, replacement=True)``'s
    distribution, by the inverse of each row's cumulative sum.

    Written out because ``torch.multinomial`` reads its input back to the host (a device
    synchronisation) when it draws one sample, as for the whole-image methods; this never does.
    """
    cdf = weights.double().cumsum(dim=1)                                # B x L
    total = cdf[:, -1:]
    u = torch.rand(weights.shape[0], k, generator=generator, device=weights.device, dtype=torch.float64)
    ids = torch.searchsorted(cdf, u * total, right=True)               # first id with cdf > u * total
    # u * total can round up to the total: the last id of positive weight, never one of weight 0
    last = weights.shape[1] - 1 - (weights > 0).flip(1).int().argmax(dim=1, keepdim=True)
    return torch.minimum(ids, last)


def region_present(grid: torch.Tensor, ids: torch.Tensor, num_ids: int) -> torch.Tensor:
    """(N, h, w) grid, (N, K) ids -> (N, K) bool: the id holds at least one cell of the grid.

    A small region can vanish on a coarse grid (C5 is 7 x 7 at 224 px); it then has
    nothing to pool at that scale and is left out there.
    """
    return id_areas(grid, num_ids).gather(1, ids) > 0


def mask_pool(features: torch.Tensor, grid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Area-normalised mean of the features over each sampled mask.

    Args:
        features: (N, C, h, w).
        grid: (N, h, w) int64 label grid at the features' resolution.
        ids: (N, K) int64 mask ids.

    Returns:
        (N, K, C) pooled features; a mask of zero area pools to zeros.
    """
    masks = (grid[:, None] == ids[:, :, None, None]).to(features.dtype)  # N x K x h x w
    area = masks.sum(dim=(2, 3)).clamp(min=1.0)                          # N x K
    pooled = torch.einsum("nkhw,nchw->nkc", masks, features)             # N x K x C
    return pooled / area[..., None]


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def _infonce_one_direction(q: torch.Tensor, t_other: torch.Tensor, t_same: torch.Tensor, ids: torch.Tensor,
                           ids_all: torch.Tensor, w: torch.Tensor, col_valid: torch.Tensor, rank: int,
                           temperature: float) -> torch.Tensor:
    """Sum over this process's queries of ``w * cross-entropy``; see :func:`detcon_infonce`."""
    b, k, d = q.shape
    n_all = t_other.shape[0]
    q = q.reshape(b * k, d)                                                       # BK x D
    cols = torch.cat([t_other.reshape(n_all * k, d), t_same.reshape(n_all * k, d)])  # 2 B_g K x D
    logits = q @ cols.T / temperature                                             # BK x 2 B_g K

    img = torch.arange(b, device=q.device) + rank * b                             # B (global index)
    col_img = torch.arange(n_all, device=q.device).repeat_interleave(k)           # B_g K
    same = (img.repeat_interleave(k)[:, None] == col_img[None, :]) \
        & (ids.reshape(-1)[:, None] == ids_all.reshape(-1)[None, :])              # BK x B_g K
    valid = col_valid.reshape(-1)[None, :]
    positive = torch.cat([same & valid, torch.zeros_like(same)], dim=1)           # other view only
    keep = torch.cat([valid.expand_as(same), valid & ~same], dim=1)               # same view: not itself
    logits = logits.masked_fill(~keep, float("-inf"))

    # labels spread evenly over the positives: ce = logsumexp(all) - mean(positive logits)
    num_pos = positive.sum(dim=1)                                                 # BK
    pos_mean = torch.where(positive, logits, torch.zeros_like(logits)).sum(dim=1) / num_pos.clamp(min=1)
    ce = torch.logsumexp(logits, dim=1) - pos_mean
    w = w.reshape(-1) * (num_pos > 0)
    return torch.where(w > 0, w * ce, torch.zeros_like(ce)).sum()  # rows of weight 0 may be all -inf


def detcon_infonce(pred_a: torch.Tensor, pred_b: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor,
                   ids: torch.Tensor, roi_weight: torch.Tensor, temperature: float = 0.1,
                   gather: bool = True) -> torch.Tensor:
    """DetCon-B's symmetric InfoNCE over the regions of two views, negatives from the global batch.

    A query ``q = pred_a[b, k]`` (online prediction of region ``ids[b, k]`` in view A)
    is scored against every target vector of *both* views of every image of the
    global batch, all L2-normalised, at temperature ``tau``:

    * positives: the target vectors of the same region of the same image in the
      *other* view (every draw of that id; the cross-entropy label is spread evenly
      over them);
    * left out: the same region of the same image in the *same* view (it is neither
      a positive nor a negative), and columns of weight 0 (regions absent at this scale);
    * negatives: everything else, including the other regions of the same image.

    ::

        loss_A = sum_{b,k} w_bk * ( logsumexp_j(q.t_j / tau) - mean_{j in pos}(q.t_j / tau) ) / (B K)
        loss   = (loss_A + loss_B) / 2

    and ``loss_B`` with the views' roles swapped. This equals half of
    ``lightly.loss.DetConBLoss`` (which returns ``loss_A + loss_B``) when ``roi_weight`` is
    ``1 / draws of the id``, DetCon's ``1 / obj_area``, as returned by
    :func:`sample_region_ids`; the mean over ``B K`` rows (not over the weights) is
    DetCon's too.

    Args:
        pred_a, pred_b: (B, K, D) online predictions of view A / B, local to this process.
        target_a, target_b: (B, K, D) target projections of view A / B (no gradient taken).
        ids: (B, K) int64 region ids, the same for both views.
        roi_weight: (B, K) weights; 0 = the region is left out as query and as negative.
        temperature: tau.
        gather: take negatives from all processes (a no-op in a single process).

    Returns:
        scalar loss.
    """
    b, k, _ = pred_a.shape
    qa, qb = F.normalize(pred_a.float(), dim=-1), F.normalize(pred_b.float(), dim=-1)
    ta = F.normalize(target_a.float().detach(), dim=-1)
    tb = F.normalize(target_b.float().detach(), dim=-1)
    col_valid = roi_weight > 0
    rank = 0
    if gather and is_dist():
        rank = torch.distributed.get_rank()
        ta, tb = all_gather_cat(ta), all_gather_cat(tb)                  # B_g x K x D
        ids_all, col_valid = all_gather_cat(ids), all_gather_cat(col_valid)
    else:
        ids_all = ids
    w = roi_weight.float()
    loss_a = _infonce_one_direction(qa, tb, ta, ids, ids_all, w, col_valid, rank, temperature)
    loss_b = _infonce_one_direction(qb, ta, tb, ids, ids_all, w, col_valid, rank, temperature)
    return (loss_a + loss_b) / (2 * b * k)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BYOL regression: squared error of L2-normalised vectors, ``2 - 2 cos(p, t)``.

    Args:
        pred: (B, K, D) online predictions.
        target: (B, K, D) target projections (no gradient).
        weight: (B, K) weights, 0 = ignore.

    Returns:
        scalar, the weighted mean over regions of ``|p/|p| - t/|t||^2``; 0 if every
        weight is 0.
    """
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float().detach(), dim=-1)
    err = (p - t).pow(2).sum(dim=-1)                                     # B x K
    w = weight.float()
    return (w * err).sum() / w.sum().clamp(min=1e-8)


def byol_loss(pred_a: torch.Tensor, pred_b: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetrised loss: ``(reg(pred_a, target_b) + reg(pred_b, target_a)) / 2``.

    With one region per image and weight 1 this is ``2 + 2 x`` lightly's
    ``0.5 * (NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0))``.
    Shapes as :func:`regression_loss`.
    """
    return 0.5 * (regression_loss(pred_a, target_b, weight) + regression_loss(pred_b, target_a, weight))


def context_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str = "cosine"
                 ) -> torch.Tensor:
    """ACLUS's context term between the region vectors of the damaged and the clean overlap.

    Args:
        pred: (B, K, D) online predictions from the damaged overlap.
        target: (B, K, D) target projections of the clean overlap (no gradient).
        weight: (B, K) weights, 0 = ignore (region absent from the overlap at this
            scale, or the crops do not overlap).
        kind: ``"cosine"``: the mean squared error of the L2-normalised vectors
            (``2 - 2 cos``, BYOL's regression, bounded in [0, 4]); ``"mse"``: the plain
            mean squared error of the unnormalised vectors, per element, as the upstream
            code's ``nn.MSELoss``.

    Returns:
        scalar, the weighted mean over regions; 0 if every weight is 0.
    """
    if kind == "cosine":
        return regression_loss(pred, target, weight)
    if kind != "mse":
        raise ValueError(f"unknown context loss {kind!r}")
    err = (pred.float() - target.float().detach()).pow(2).mean(dim=-1)   # B x K
    w = weight.float()
    return (w * err).sum() / w.sum().clamp(min=1e-8)
