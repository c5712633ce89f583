"""The batched Models-Genesis damage of the step (pretraining/context_damage.py) against the
per-sample reference: step probabilities, shares, shuffles, remaps and painting windows.

Each test names in its docstring the defect that breaks it. The statistical tests draw
thousands of small images; their tolerances are about 4 standard errors of the shares tested.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretraining.context_damage import (P_NEXT_BLOCK, bezier_curves, context_damage, context_damage_batch,
                                        inpaint_blocks, interp_batch, local_pixel_shuffle, local_pixel_shuffle_batch,
                                        paint_windows)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _share(x: torch.Tensor) -> float:
    return x.float().mean().item()


# --------------------------------------------------------------------------- #
# Models-Genesis damage
# --------------------------------------------------------------------------- #
def test_damage_steps_have_the_per_sample_probabilities():
    """Breaks if a step's probability (shuffle 0.8, remap 0.9, painting 0.9, out-painting
    p_outpaint of the painted) differs from context_damage's, or if the outputs leave [0, 1]."""
    n = 4000
    img = torch.rand(n, 3, 12, 12, generator=_gen(4))
    out, applied = context_damage_batch(img, _gen(5), return_applied=True)
    tol = 4 * math.sqrt(0.25 / n)
    assert abs(_share(applied["shuffle"]) - 0.8) < tol
    assert abs(_share(applied["nonlinear"]) - 0.9) < tol and abs(_share(applied["paint"]) - 0.9) < tol
    assert not applied["outpaint"].any()
    assert out.min() >= 0 and out.max() <= 1 and out.shape == img.shape
    _, applied = context_damage_batch(img[:2000], _gen(6), p_outpaint=0.8, return_applied=True)
    share = _share(applied["outpaint"][applied["paint"]])
    assert abs(share - 0.8) < 4 * math.sqrt(0.16 / 1800)


def test_damage_of_a_constant_image_matches_the_per_sample_shares():
    """Breaks if the remap or the painting is applied at another rate than per sample, seen on
    the outputs (as tests/test_pretrain_data.py sees context_damage's)."""
    n = 1200
    img = np.full((1, 12, 12), 0.3, np.float32)
    rng = np.random.default_rng(1)
    ref = np.stack([context_damage(img, rng) for _ in range(n)])
    out = context_damage_batch(torch.from_numpy(img).expand(n, 1, 12, 12).contiguous(), _gen(7)).numpy()
    tol = 4 * math.sqrt(0.09 / n)
    for x in (ref, out):
        remapped = ~np.isclose(np.median(x.reshape(n, -1), axis=1), 0.3)
        painted = np.array([len(np.unique(v)) > 2 for v in x])
        assert abs(remapped.mean() - 0.9) < tol + 0.02 and abs(painted.mean() - 0.9) < tol


def test_batched_shuffle_permutes_within_the_blocks_like_the_per_sample_one():
    """Breaks if a block is not a permutation of its own pixels, if pixels outside the blocks
    move, or if the amount of shuffling differs from local_pixel_shuffle's."""
    img = torch.rand(64, 1, 30, 30, generator=_gen(8))
    one = local_pixel_shuffle_batch(img, _gen(9), num_blocks=1)
    assert torch.equal(one.flatten(1).sort(dim=1).values, img.flatten(1).sort(dim=1).values)
    moved = (one != img)[:, 0]
    for m in moved:                                    # what moved lies in one 1..3 x 1..3 block
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys):
            assert ys.max() - ys.min() < 3 and xs.max() - xs.min() < 3
    n = 300
    full = local_pixel_shuffle_batch(img[:1].expand(n, 1, 30, 30), _gen(10))
    rng = np.random.default_rng(2)
    ref = np.stack([local_pixel_shuffle(img[0].numpy(), rng) for _ in range(n)])
    changed_ref = (ref != img[0].numpy()).reshape(n, -1).mean(axis=1)
    changed = (full != img[:1]).reshape(n, -1).float().mean(dim=1).numpy()
    assert abs(changed.mean() - changed_ref.mean()) < 4 * math.sqrt((changed.var() + changed_ref.var()) / n)


def test_bezier_remap_is_np_interp_on_its_curves():
    """Breaks if the batched interpolation differs from np.interp, or the curves are not the
    per-sample ones in distribution (monotone x from 0 to 1, half of them inverted)."""
    xs, ys = bezier_curves(_gen(11), 400, torch.device("cpu"))
    assert torch.all(xs[:, 1:] >= xs[:, :-1]) and torch.all(xs[:, 0] == 0) and torch.allclose(xs[:, -1], torch.ones(400))
    inverted = ys[:, 0] > ys[:, -1]
    assert abs(_share(inverted) - 0.5) < 4 * math.sqrt(0.25 / 400)
    values = torch.rand(400, 50, generator=_gen(12))
    out = interp_batch(values, xs, ys)
    for i in range(0, 400, 37):
        ref = np.interp(values[i].numpy(), xs[i].numpy(), ys[i].numpy())
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-5)


def test_painting_windows_have_the_per_sample_sizes_and_counts():
    """Breaks if the in-painting windows' sizes (1/6-1/3 of each side) or their count
    (1, then each further one with p 0.95, at most 5) differ from inpaint_blocks'."""
    n, side = 2000, 24
    win = paint_windows(_gen(13), n, side, side, torch.zeros(n, dtype=torch.bool))
    rng = np.random.default_rng(3)
    img = np.zeros((1, side, side), np.float32)
    ref = np.stack([inpaint_blocks(img, rng)[0] != 0 for _ in range(n)])      # noise is never exactly 0
    a, b = win.float().mean(dim=(1, 2)).numpy(), ref.mean(axis=(1, 2))
    assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / n)
    expected_count = sum(P_NEXT_BLOCK ** i for i in range(5))                 # 1 + p + ... + p^4
    assert 4.5 < expected_count < 4.8
    out = paint_windows(_gen(14), 500, 28, 28, torch.ones(500, dtype=torch.bool))
    kept = out.float().mean(dim=(1, 2))
    assert kept.min() >= (12 / 28) ** 2 - 1e-6 and kept.max() < 0.9       # at least one 3/7-4/7 window
