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

Every function takes a float image in [0, 1] of shape (C, H, W) and a
``numpy.random.Generator``, returns a new array of the same shape, dtype and
range, and does no I/O.
"""
from __future__ import annotations

import numpy as np
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
