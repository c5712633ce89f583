"""Models-Genesis image damage for ACLUS's context prediction.

The online network sees a damaged copy of the two crops' overlap and must
predict the target's embedding of the clean copy, region by region. The damage
follows Models Genesis (Zhou et al., 2019/2021) in its order:

1. local pixel shuffling (p = 0.8, METHOD.md): pixels are permuted inside many
   small random blocks, so that local texture is lost but shapes stay;
2. a non-linear intensity remap along a random cubic Bezier curve (p = 0.9,
   METHOD.md), increasing or, half of the time, decreasing;
3. painting (p = 0.9, Models Genesis's rate): in-painting (up to 5 blocks of 1/6-1/3
   of each side replaced by uniform noise) or, with probability ``p_outpaint``,
   out-painting (everything replaced by noise except up to 5 windows of 3/7-4/7 of
   each side). METHOD.md names in-painting only, so ``p_outpaint`` is 0 by default;
   Models Genesis uses 0.8.

Every per-sample function takes a float image in [0, 1] of shape (C, H, W) and a
``numpy.random.Generator``, returns a new array of the same shape, dtype and
range, and does no I/O. The ``*_batch`` functions at the end do the same to a
(B, C, H, W) torch batch on its device (the training step's path; see there).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import comb

P_SHUFFLE = 0.8
P_NONLINEAR = 0.9
P_PAINT = 0.9
P_OUTPAINT = 0.0
#: after the first block, each further painting block is added with this probability
P_NEXT_BLOCK = 0.95


def bezier_intensity_remap(img: np.ndarray, rng: np.random.Generator, points: int = 1000) -> np.ndarray:
    """Non-linear intensity transform along a random cubic Bezier curve.

    The curve runs from (0, 0) to (1, 1) through two random control points; half
    of the time it is reversed (intensities inverted), as in Models Genesis.
    """
    ctrl = np.array([[0.0, 0.0], rng.random(2), rng.random(2), [1.0, 1.0]])
    t = np.linspace(0.0, 1.0, points)
    basis = np.stack([comb(3, i) * t ** i * (1 - t) ** (3 - i) for i in range(4)])  # 4 x P
    xs, ys = basis.T @ ctrl[:, 0], basis.T @ ctrl[:, 1]
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    if rng.random() < 0.5:
        ys = ys[::-1].copy()
    return np.interp(img, xs, ys).astype(img.dtype)


def local_pixel_shuffle(img: np.ndarray, rng: np.random.Generator, num_blocks: int | None = None,
                        max_frac: float = 0.1) -> np.ndarray:
    """Shuffle the pixels inside many small random blocks (texture damage, shapes kept).

    Args:
        num_blocks: blocks to shuffle; default ``H * W // 100``.
        max_frac: largest block side as a fraction of the image side.
    """
    out = img.copy()
    c, h, w = img.shape
    num_blocks = num_blocks if num_blocks is not None else max(1, h * w // 100)
    bh_max, bw_max = max(2, int(h * max_frac)), max(2, int(w * max_frac))
    for _ in range(num_blocks):
        bh, bw = rng.integers(1, bh_max + 1), rng.integers(1, bw_max + 1)
        y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        block = img[:, y:y + bh, x:x + bw].reshape(c, -1)
        out[:, y:y + bh, x:x + bw] = block[:, rng.permutation(bh * bw)].reshape(c, bh, bw)
    return out


def _random_window(rng: np.random.Generator, h: int, w: int, lo: float, hi: float) -> tuple[slice, slice]:
    bh = int(rng.integers(max(1, int(h * lo)), max(2, int(h * hi)) + 1))
    bw = int(rng.integers(max(1, int(w * lo)), max(2, int(w * hi)) + 1))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    return slice(y, y + bh), slice(x, x + bw)


def _block_count(rng: np.random.Generator, max_blocks: int) -> int:
    """1, then each further block with probability P_NEXT_BLOCK, at most ``max_blocks``."""
    n = 1
    while n < max_blocks and rng.random() < P_NEXT_BLOCK:
        n += 1
    return n


def inpaint_blocks(img: np.ndarray, rng: np.random.Generator, max_blocks: int = 5) -> np.ndarray:
    """Replace up to ``max_blocks`` random rectangles (1/6 to 1/3 of each side) with uniform noise."""
    out = img.copy()
    c, h, w = img.shape
    for _ in range(_block_count(rng, max_blocks)):
        ys, xs = _random_window(rng, h, w, 1 / 6, 1 / 3)
        out[:, ys, xs] = rng.random((c, ys.stop - ys.start, xs.stop - xs.start)).astype(img.dtype)
    return out


def outpaint_blocks(img: np.ndarray, rng: np.random.Generator, max_blocks: int = 5) -> np.ndarray:
    """Uniform noise everywhere except up to ``max_blocks`` windows (3/7 to 4/7 of each side)."""
    out = rng.random(img.shape).astype(img.dtype)
    _, h, w = img.shape
    for _ in range(_block_count(rng, max_blocks)):
        ys, xs = _random_window(rng, h, w, 3 / 7, 4 / 7)
        out[:, ys, xs] = img[:, ys, xs]
    return out


def context_damage(img: np.ndarray, rng: np.random.Generator, p_shuffle: float = P_SHUFFLE,
                   p_nonlinear: float = P_NONLINEAR, p_paint: float = P_PAINT,
                   p_outpaint: float = P_OUTPAINT) -> np.ndarray:
    """Shuffle -> Bezier remap -> in-/out-painting, each with its probability (module docstring).

    Args:
        img: (C, H, W) float32 in [0, 1].

    Returns:
        (C, H, W) float32 in [0, 1].
    """
    out = img
    if rng.random() < p_shuffle:
        out = local_pixel_shuffle(out, rng)
    if rng.random() < p_nonlinear:
        out = bezier_intensity_remap(out, rng)
    if rng.random() < p_paint:
        out = outpaint_blocks(out, rng) if rng.random() < p_outpaint else inpaint_blocks(out, rng)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- #
# batched, on the training device (torch)
# --------------------------------------------------------------------------- #
# The same damage for a whole batch of (B, C, H, W) float images in [0, 1] at once, on
# their device, every random draw from one ``torch.Generator`` (on that device). The
# draws follow the distributions of the per-sample functions above (sizes, positions,
# probabilities), not their stream of numbers: the two paths give different images for
# the same seed. Work is done for every image and the result selected per image, so
# that no draw is read back to the host (a device synchronisation).

def _rand(generator: torch.Generator | None, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _randint(generator: torch.Generator | None, low: torch.Tensor | int, high: torch.Tensor | int,
             shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive; int or per-element tensor bounds that
    broadcast to ``shape``). Python bounds stay scalars: no host-to-device copy."""
    span = high - low + 1
    draw = (_rand(generator, *shape, device=device) * span).floor().long()
    return torch.clamp(draw, max=span - 1) + low  # u * span may round up to span


def local_pixel_shuffle_batch(img: torch.Tensor, generator: torch.Generator | None = None,
                              num_blocks: int | None = None, max_frac: float = 0.1) -> torch.Tensor:
    """:func:`local_pixel_shuffle` of every image of a (B, C, H, W) batch.

    Each image gets ``num_blocks`` blocks (default ``H * W // 100``), sides uniform in
    [1, ``max(2, int(side * max_frac))``], positions uniform inside the image. A block's
    pixels are a uniform random permutation of the *original* pixels under it (one per
    block, the same for all channels), and a later block overwrites an earlier one where
    they overlap, as in the sequential loop.

    How: every block's permutation is an ``argsort`` of random keys over its (at most
    ``bh_max x bw_max``) positions; each pixel keeps the value written by the last block
    that covers it (a ``scatter_reduce`` of block numbers), so all blocks are written in
    one scatter without conflicts.
    """
    b, c, h, w = img.shape
    dev = img.device
    nb = num_blocks if num_blocks is not None else max(1, h * w // 100)
    bh_max, bw_max = max(2, int(h * max_frac)), max(2, int(w * max_frac))
    n_max = bh_max * bw_max
    bh = _randint(generator, 1, bh_max, (b, nb), dev)                     # B x nb
    bw = _randint(generator, 1, bw_max, (b, nb), dev)
    y = _randint(generator, 0, h - bh, (b, nb), dev)
    x = _randint(generator, 0, w - bw, (b, nb), dev)

    local = torch.arange(n_max, device=dev)                                 # position in a block, row-major
    valid = local < (bh * bw)[..., None]                                    # B x nb x n_max
    keys = torch.where(valid, _rand(generator, b, nb, n_max, device=dev), 2.0)
    perm = keys.argsort(dim=-1)                                             # first bh*bw: a permutation of them
    bw_ = bw[..., None]
    dest = (y[..., None] + local // bw_) * w + x[..., None] + local % bw_    # pixel written
    src = (y[..., None] + perm // bw_) * w + x[..., None] + perm % bw_     # pixel read
    dummy = h * w                                                           # a slot past the image
    dest = torch.where(valid, dest, dummy).reshape(b, -1)
    src = torch.where(valid, src, 0).reshape(b, -1)

    block = torch.arange(nb, device=dev)[:, None].expand(nb, n_max).reshape(1, -1).expand(b, -1)
    last = torch.full((b, h * w + 1), -1, dtype=torch.long, device=dev)
    last.scatter_reduce_(1, dest, block, reduce="amax")                     # the last block on each pixel
    keep = last.gather(1, dest) == block                                    # this block's value survives
    dest = torch.where(keep, dest, dummy)

    flat = img.reshape(b, c, h * w)
    values = flat.gather(2, src[:, None].expand(b, c, -1))
    out = torch.cat([flat, flat.new_zeros(b, c, 1)], dim=2)
    out.scatter_(2, dest[:, None].expand(b, c, -1), values)  # unique targets, except the dropped dummy
    return out[..., :h * w].reshape(b, c, h, w)


def bezier_curves(generator: torch.Generator | None, n: int, device: torch.device, points: int = 1000
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The random curves of :func:`bezier_intensity_remap` for ``n`` images: (n, P) xs sorted
    ascending and their ys (reversed, i.e. intensities inverted, for half of the images)."""
    ctrl = _rand(generator, n, 2, 2, device=device)                          # 2 control points
    t = torch.linspace(0.0, 1.0, points, device=device, dtype=torch.float64)
    basis = torch.stack([math.comb(3, i) * t ** i * (1 - t) ** (3 - i) for i in range(4)])  # 4 x P
    pts = torch.cat([torch.zeros(n, 1, 2, device=device), ctrl, torch.ones(n, 1, 2, device=device)], dim=1)
    xs = torch.einsum("ip,ni->np", basis, pts[..., 0].double())        # n x P
    ys = torch.einsum("ip,ni->np", basis, pts[..., 1].double())
    xs, order = xs.sort(dim=1)
    ys = ys.gather(1, order)
    flip = _rand(generator, n, device=device) < 0.5
    ys = torch.where(flip[:, None], ys.flip(1), ys)
    return xs.float(), ys.float()


def interp_batch(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``np.interp`` row by row: (B, N) values, (B, P) ascending xs and their ys -> (B, N)."""
    p = xs.shape[1]
    idx = torch.searchsorted(xs, values.contiguous(), right=True).clamp_(1, p - 1)
    x0, x1 = xs.gather(1, idx - 1), xs.gather(1, idx)
    y0, y1 = ys.gather(1, idx - 1), ys.gather(1, idx)
    t = ((values - x0) / (x1 - x0).clamp_min(1e-12)).clamp_(0.0, 1.0)
    return y0 + t * (y1 - y0)


def bezier_intensity_remap_batch(img: torch.Tensor, generator: torch.Generator | None = None,
                                 points: int = 1000) -> torch.Tensor:
    """:func:`bezier_intensity_remap` of every image of a (B, C, H, W) batch (one curve per image)."""
    xs, ys = bezier_curves(generator, img.shape[0], img.device, points)
    return interp_batch(img.reshape(img.shape[0], -1), xs, ys).reshape(img.shape)


def paint_windows(generator: torch.Generator | None, b: int, h: int, w: int, outpaint: torch.Tensor,
                  max_blocks: int = 5) -> torch.Tensor:
    """(B, H, W) bool: the union of each image's painting windows.

    Per image 1 window, then each further one with probability P_NEXT_BLOCK, at most
    ``max_blocks`` (:func:`_block_count`); sides as :func:`_random_window`: 1/6-1/3 of each
    side for in-painting, 3/7-4/7 where ``outpaint`` (B,) is True.
    """
    dev = outpaint.device
    more = _rand(generator, b, max_blocks - 1, device=dev) < P_NEXT_BLOCK
    count = 1 + more.long().cumprod(dim=1).sum(dim=1)                       # B
    active = torch.arange(max_blocks, device=dev) < count[:, None]         # B x M

    def sides(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo_in, hi_in = max(1, int(n * (1 / 6))), max(2, int(n * (1 / 3)))
        lo_out, hi_out = max(1, int(n * (3 / 7))), max(2, int(n * (4 / 7)))
        lo = torch.where(outpaint, lo_out, lo_in)[:, None]
        hi = torch.where(outpaint, hi_out, hi_in)[:, None]
        return lo, hi

    (lo_h, hi_h), (lo_w, hi_w) = sides(h), sides(w)
    bh = _randint(generator, lo_h, hi_h, (b, max_blocks), dev)
    bw = _randint(generator, lo_w, hi_w, (b, max_blocks), dev)
    y = _randint(generator, 0, h - bh, (b, max_blocks), dev)
    x = _randint(generator, 0, w - bw, (b, max_blocks), dev)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_y = (rows >= y[..., None]) & (rows < (y + bh)[..., None])            # B x M x H
    in_x = (cols >= x[..., None]) & (cols < (x + bw)[..., None])            # B x M x W
    return (in_y[..., :, None] & in_x[..., None, :] & active[..., None, None]).any(dim=1)


def context_damage_batch(img: torch.Tensor, generator: torch.Generator | None = None,
                         p_shuffle: float = P_SHUFFLE, p_nonlinear: float = P_NONLINEAR,
                         p_paint: float = P_PAINT, p_outpaint: float = P_OUTPAINT,
                         return_applied: bool = False):
    """:func:`context_damage` of every image of a batch, on its device.

    Args:
        img: (B, C, H, W) float in [0, 1].
        return_applied: also return which steps each image got.

    Returns:
        (B, C, H, W) float in [0, 1]; with ``return_applied`` also ``{"shuffle", "nonlinear",
        "paint", "outpaint"}``: (B,) bool each (``outpaint`` only where painted).
    """
    b, c, h, w = img.shape
    dev = img.device
    gates = _rand(generator, b, 4, device=dev)
    applied = {"shuffle": gates[:, 0] < p_shuffle, "nonlinear": gates[:, 1] < p_nonlinear,
               "paint": gates[:, 2] < p_paint}
    applied["outpaint"] = applied["paint"] & (gates[:, 3] < p_outpaint)
    sel = {k: v[:, None, None, None] for k, v in applied.items()}

    out = torch.where(sel["shuffle"], local_pixel_shuffle_batch(img, generator), img)
    out = torch.where(sel["nonlinear"], bezier_intensity_remap_batch(out, generator), out)
    windows = paint_windows(generator, b, h, w, applied["outpaint"])[:, None]   # B x 1 x H x W
    noise = _rand(generator, b, c, h, w, device=dev)
    painted = torch.where(windows ^ sel["outpaint"], noise, out)  # in: noise in the windows; out: outside
    out = torch.where(sel["paint"], painted, out).clamp_(0.0, 1.0)
    return (out, applied) if return_applied else out
