"""Per-iteration schedules, precomputed as arrays indexed by the global step."""
from __future__ import annotations

import numpy as np


def warmup_cosine(base: float, final: float, epochs: int, iters_per_epoch: int,
                  warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then cosine from ``base`` to ``final``.

    ``warmup_epochs`` may be a fraction (0.25 = a quarter of an epoch's iterations, rounded).

    Returns:
        (epochs * iters_per_epoch,) float64 array.
    """
    warmup_iters = int(round(warmup_epochs * iters_per_epoch))
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False)
    rest = epochs * iters_per_epoch - warmup_iters
    t = np.arange(rest) / max(rest, 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine])


def byol_momentum(base_momentum: float, total_steps: int) -> np.ndarray:
    """BYOL's target momentum m_k = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2, k = 0..K.

    The update after optimizer step k (0-based) uses m_k; m_K = 1 closes the curve.

    Returns:
        (K + 1,) float64 array.
    """
    k = np.arange(total_steps + 1)
    return 1.0 - (1.0 - base_momentum) * (np.cos(np.pi * k / max(total_steps, 1)) + 1.0) / 2.0
