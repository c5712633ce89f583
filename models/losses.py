"""Mask pooling and the losses of ACLUS / DetCon-B / BYOL.

Shapes: ``N`` images (or views) in a batch, ``K`` mask ids sampled per image,
``C`` feature channels, ``D`` embedding size, ``L`` label ids in the batch
(0..L-1), ``h x w`` the grid of one feature scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.distributed import all_gather_cat, is_dist


# --------------------------------------------------------------------------- #
# masks -> per-scale label grids -> sampled ids -> pooled features
# --------------------------------------------------------------------------- #
def label_grids(labels: torch.Tensor, sizes: list[tuple[int, int]], num_ids: int) -> list[torch.Tensor]:
    """Downsample integer label maps to each feature grid by majority area.

    Each label is one-hot encoded, adaptive-average-pooled to the grid (the share
    of every cell each id covers) and the largest share wins the cell.

    Args:
        labels: (N, H, W) int64 label maps with values in [0, num_ids).
        sizes: grid sizes ``(h, w)``, finest first; coarser grids are pooled from the
            finest one's area shares (exact when the sizes divide each other).
        num_ids: L, the number of label ids.

    Returns:
        one (N, h, w) int64 grid per size.
    """
    one_hot = F.one_hot(labels, num_ids).permute(0, 3, 1, 2).float()  # N x L x H x W
    share = F.adaptive_avg_pool2d(one_hot, sizes[0])                   # N x L x h0 x w0
    grids = []
    for size in sizes:
        s = share if tuple(share.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(share, size)
        grids.append(s.argmax(dim=1))
    return grids


def id_areas(grid: torch.Tensor, num_ids: int) -> torch.Tensor:
    """(N, h, w) int64 grid -> (N, L) number of cells holding each id."""
    n = grid.shape[0]
    return torch.zeros(n, num_ids, device=grid.device).scatter_add_(
        1, grid.reshape(n, -1), torch.ones(grid.reshape(n, -1).shape, device=grid.device))


def sample_mask_ids(areas: torch.Tensor, k: int, by_area: bool = False,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k`` ids per image, with replacement, among the ids of non-zero area.

    Args:
        areas: (N, L) area of each id; 0 = absent. For a pair of views pass the
            element-wise product of the two views' areas so that only ids present in
            both are drawn.
        k: ids drawn per image.
        by_area: draw proportionally to area (paper text) instead of uniformly (code).

    Returns:
        ids: (N, K) int64 drawn ids.
        roi_weight: (N, K) float, 1 / (times the id was drawn for that image), so that
            every distinct id weighs the same; 0 for images without any present id.
    """
    present = areas > 0
    probs = areas.float() if by_area else present.float()
    valid = present.any(dim=1)                                          # N
    probs = torch.where(valid[:, None], probs, torch.ones_like(probs))  # placeholder rows
    ids = torch.multinomial(probs, k, replacement=True, generator=generator)      # N x K
    counts = (ids[:, :, None] == ids[:, None, :]).sum(dim=-1).float()  # N x K
    roi_weight = valid[:, None].float() / counts
    return ids, roi_weight


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
def detcon_infonce(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor,
                   roi_weight: torch.Tensor, temperature: float = 0.1,
                   gather: bool = True) -> torch.Tensor:
    """DetCon-B InfoNCE between the masks of two views, negatives from the global batch.

    For query ``q = pred[b, k]`` (online prediction of mask ``ids[b, k]`` in view A)
    the positive is ``target[b, k]`` (target projection of the same mask in view B);
    the negatives are every other target vector of every image in the global batch,
    except the other draws of the same id of the same image (they are the same mask,
    not a negative) and draws of zero weight::

        loss = sum_{b,k} w_bk * -log( exp(q.t+ / tau) / sum_j exp(q.t_j / tau) ) / sum w_bk

    with q, t L2-normalised.

    Args:
        pred: (B, K, D) online predictions of view A, local to this process.
        target: (B, K, D) target projections of view B (no gradient needed).
        ids: (B, K) int64 mask ids (identical for both views).
        roi_weight: (B, K) weights (1 / draws of the id; 0 = ignore).
        temperature: tau.
        gather: take negatives from all processes (a no-op in a single process).

    Returns:
        scalar loss.
    """
    b, k, d = pred.shape
    q = F.normalize(pred.float(), dim=-1).reshape(b * k, d)              # BK x D
    t = F.normalize(target.float().detach(), dim=-1)                    # B x K x D
    rank = torch.distributed.get_rank() if (gather and is_dist()) else 0
    if gather:
        t, ids_all, w_all = all_gather_cat(t), all_gather_cat(ids), all_gather_cat(roi_weight)
    else:
        ids_all, w_all = ids, roi_weight
    n_all = t.shape[0]
    logits = q @ t.reshape(n_all * k, d).T / temperature                # BK x (B_g K)

    # column of each query's positive: same image, same draw, in the gathered batch
    img = torch.arange(b, device=pred.device) + rank * b                # B
    pos_col = (img[:, None] * k + torch.arange(k, device=pred.device)).reshape(-1)  # BK
    # same image & same id but another draw -> excluded; ignored columns -> excluded
    col_img = torch.arange(n_all, device=pred.device).repeat_interleave(k)          # (B_g K)
    same_img = img.repeat_interleave(k)[:, None] == col_img[None, :]                # BK x (B_g K)
    same_id = ids.reshape(-1)[:, None] == ids_all.reshape(-1)[None, :]
    exclude = (same_img & same_id) | (w_all.reshape(-1) == 0)[None, :]
    exclude[torch.arange(b * k, device=pred.device), pos_col] = False
    logits = logits.masked_fill(exclude, float("-inf"))

    ce = F.cross_entropy(logits, pos_col, reduction="none")            # BK
    w = roi_weight.reshape(-1).float()
    ce = torch.where(w > 0, ce, torch.zeros_like(ce))  # ignored rows may be all -inf
    return (w * ce).sum() / w.sum().clamp(min=1e-8)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BYOL regression: squared error of L2-normalised vectors, ``2 - 2 cos(p, t)``.

    Used for BYOL (one whole-image mask) and for ACLUS's context prediction.

    Args:
        pred: (B, K, D) online predictions.
        target: (B, K, D) target projections (no gradient).
        weight: (B, K) weights, 0 = ignore.

    Returns:
        scalar, the weighted mean over masks of ``|p/|p| - t/|t||^2``.
    """
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float().detach(), dim=-1)
    err = (p - t).pow(2).sum(dim=-1)                                     # B x K
    w = weight.float()
    return (w * err).sum() / w.sum().clamp(min=1e-8)
