"""Models-Genesis-style image damage for ACLUS's context prediction.

The online network sees a damaged copy of the two crops' overlap and must
predict the target's embedding of the clean copy, mask by mask. Every function
takes a float image in [0, 1] of shape (C, H, W) and a ``numpy.random.Generator``,
returns a new array of the same shape and range, and does no I/O.
"""
from __future__ import annotations

import numpy as np
from scipy.special import comb


def bezier_intensity_remap(img: np.ndarray, rng: np.random.Generator, points: int = 1000) -> np.ndarray:
    """Monotone-ish non-linear intensity transform along a random cubic Bezier curve.

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


def inpaint_blocks(img: np.ndarray, rng: np.random.Generator, max_blocks: int = 5) -> np.ndarray:
    """Replace 1..max_blocks random rectangles (1/6 to 1/3 of each side) with uniform noise."""
    out = img.copy()
    c, h, w = img.shape
    for _ in range(rng.integers(1, max_blocks + 1)):
        bh = rng.integers(max(1, h // 6), max(2, h // 3) + 1)
        bw = rng.integers(max(1, w // 6), max(2, w // 3) + 1)
        y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        out[:, y:y + bh, x:x + bw] = rng.random((c, bh, bw), dtype=np.float32).astype(img.dtype)
    return out


def context_damage(img: np.ndarray, rng: np.random.Generator, p_nonlinear: float = 0.9,
                   p_shuffle: float = 0.8, p_inpaint: float = 0.9) -> np.ndarray:
    """Apply the three damages, each with its probability, in Models Genesis order.

    Args:
        img: (C, H, W) float32 in [0, 1].

    Returns:
        (C, H, W) float32 in [0, 1].
    """
    out = img
    if rng.random() < p_nonlinear:
        out = bezier_intensity_remap(out, rng)
    if rng.random() < p_shuffle:
        out = local_pixel_shuffle(out, rng)
    if rng.random() < p_inpaint:
        out = inpaint_blocks(out, rng)
    return np.clip(out, 0.0, 1.0)
