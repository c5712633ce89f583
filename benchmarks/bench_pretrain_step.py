#!/usr/bin/env python
"""Median pre-training step time of aclus, detcon and byol at the same batch and resolution.

    python benchmarks/bench_pretrain_step.py --batch 8 --size 112 --steps 5

A step = forward of online and target networks, losses, backward, LARS update and
EMA update, on a fixed batch of real augmented views (data loading excluded; the
loader is timed separately with --loader). ACLUS runs one extra online and one
extra target pass for the context view, so ~1.5x a BYOL step is its arithmetic floor.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.aclus import ACLUS, build_model  # noqa: E402
from pretrain_aclus import lars_param_groups  # noqa: E402
from timm.optim import Lars  # noqa: E402
from utils.pretrain_data import make_views  # noqa: E402
from utils.synthetic_us import make_scan  # noqa: E402


def make_batch(batch: int, size: int, method: str) -> dict[str, torch.Tensor]:
    items = []
    for i in range(batch):
        image, label = make_scan(seed=i, size=2 * size, scan_class=i % 3)
        rgb = np.repeat(image[..., None], 3, axis=2)
        if method == "byol":
            label = np.zeros_like(label)
        items.append(make_views(rgb, label, np.random.default_rng(i), size, (0.2, 1.0), method == "aclus"))
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def make_model(method: str, cfg: dict | None = None) -> ACLUS:
    """The model of ``method``: paper-size heads, or those of a loaded config (utils.config)."""
    if cfg is None:
        return ACLUS(method)
    cfg = copy.deepcopy(cfg)
    cfg["model"]["method"] = method
    return build_model(cfg)


def train_step(model: ACLUS, opt: torch.optim.Optimizer, data: dict[str, torch.Tensor],
               gen: torch.Generator) -> None:
    """One pre-training step: forward, backward, LARS update, target EMA update."""
    loss, _ = model(data, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    model.update_target(0.99)


def step_inputs(method: str, batch: int, size: int, device: torch.device, cfg: dict | None = None
                ) -> tuple[ACLUS, torch.optim.Optimizer, dict[str, torch.Tensor], torch.Generator]:
    """Model, LARS optimizer, one fixed batch and generator: the arguments of :func:`train_step`."""
    model = make_model(method, cfg).to(device)
    opt = Lars(lars_param_groups(model, 1e-6, True), lr=0.1, momentum=0.9, trust_coeff=1e-3)
    data = {k: v.to(device) for k, v in make_batch(batch, size, method).items()}
    return model, opt, data, torch.Generator(device=device).manual_seed(0)


def time_method(method: str, batch: int, size: int, steps: int, warmup: int, device: torch.device,
                cfg: dict | None = None) -> list[float]:
    """Seconds of each timed step (after ``warmup`` untimed ones) on one fixed batch."""
    torch.manual_seed(0)
    model, opt, data, gen = step_inputs(method, batch, size, device, cfg)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(model, opt, data, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def time_loader(batch: int, size: int, workers: int, batches: int, crop_scale=(0.2, 1.0)) -> float:
    """Images/s of the real training DataLoader (aclus views) on synthetic files, worker
    start-up included (as at the start of every epoch: persistent_workers is off)."""
    from torch.utils.data import DataLoader

    from utils.generate_masks_pkls import generate
    from utils.pretrain_data import AnatomyPairDataset, EpochSampler, load_pairs
    from utils.synthetic_us import write_pretrain_layout

    with tempfile.TemporaryDirectory() as tmp:
        write_pretrain_layout(tmp, n_images=batch * batches // 2 + 1, size=2 * size, seed=0)
        generate(Path(tmp))
        ds = AnatomyPairDataset(load_pairs(tmp), size=size, crop_scale=tuple(crop_scale), with_context=True)
        loader = DataLoader(ds, batch_size=batch, sampler=EpochSampler(len(ds)), num_workers=workers,
                            drop_last=True)
        t = time.perf_counter()
        n = sum(b["view1"].shape[0] for b in loader)
        return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loader", action="store_true", help="also time the data loader")
    p.add_argument("--workers", type=int, default=2, help="loader workers for --loader")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, torch {torch.__version__}; batch {a.batch}, {a.size} px, "
          f"median of {a.steps} steps after {a.warmup} warm-up")
    med = {}
    for method in ("byol", "detcon", "aclus"):
        times = time_method(method, a.batch, a.size, a.steps, a.warmup, device)
        med[method] = statistics.median(times)
        print(f"{method:7s} median step {med[method]:.3f} s  ({a.batch / med[method]:.1f} img/s)  "
              f"min {min(times):.3f} max {max(times):.3f}")
    print(f"ratios: detcon/byol {med['detcon'] / med['byol']:.2f}x, aclus/byol {med['aclus'] / med['byol']:.2f}x, "
          f"aclus/detcon {med['aclus'] / med['detcon']:.2f}x  (arithmetic floor aclus/byol = 1.5x)")
    if a.loader:
        ips = time_loader(a.batch, a.size, a.workers, batches=6)
        print(f"loader: {ips:.1f} img/s with {a.workers} workers vs training {a.batch / med['aclus']:.1f} img/s (aclus)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
