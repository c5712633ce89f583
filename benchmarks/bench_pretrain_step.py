#!/usr/bin/env python
"""Median pre-training step time of every method, beside lightly's classic BYOL, in one run.

    python benchmarks/bench_pretrain_step.py --batch 32 --size 112 --steps 5 --json docs/results/bench_pretrain_step.json

A step is the training loop's own ``pretrain_aclus.train_step`` (forward of the online
and target networks, losses, backward, LARS update, target EMA) on a fixed batch of
real augmented views; data loading is excluded (``--loader`` times it separately).
``lightly_byol`` is the same recipe written with lightly's modules (torchvision
ResNet-18, ``BYOLProjectionHead``, ``BYOLPredictionHead``, ``NegativeCosineSimilarity``,
``update_momentum``) and the same LARS, as an outside reference.

Arithmetic floor: a ``byol`` step runs 2 views through a plain ResNet-18 (online forward
+ backward, target forward); ``detcon`` and ``byol_fpn`` run the same 2 views through
ResNet-18 + FPN (the FPN costs about as much as the ResNet at 224 px, ~2.4 vs 1.8
GMACs), and ``aclus`` adds a third view (the damaged / clean overlap), so
aclus / byol ~ 3 x (1.8 + 2.4) / (2 x 1.8) ~ 3.5 and detcon / byol ~ 2.3.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.aclus import build_model  # noqa: E402
from models.methods import METHODS, get_method  # noqa: E402
from pretrain_aclus import build_optimizer, train_step  # noqa: E402
from utils.config import PretrainConfig  # noqa: E402
from utils.pretrain_data import make_views  # noqa: E402
from utils.synthetic_us import make_scan  # noqa: E402

REFERENCE = "lightly_byol"
#: (GMACs of 224 px views through the encoder of each method) / plain ResNet-18's
FLOOR = {"byol": 1.0, "byol_fpn": 2 * (1.8 + 2.4) / (2 * 1.8), "detcon": 2 * (1.8 + 2.4) / (2 * 1.8),
         "aclus": 3 * (1.8 + 2.4) / (2 * 1.8)}


def make_batch(batch: int, size: int, method: str) -> dict[str, torch.Tensor]:
    spec = get_method(method)
    items = []
    for i in range(batch):
        image, label = make_scan(seed=i, size=2 * size, scan_class=i % 3)
        rgb = np.repeat(image[..., None], 3, axis=2)
        if spec.whole_image:
            label = np.zeros_like(label)
        items.append(make_views(rgb, label, np.random.default_rng(i), size, (0.2, 1.0), spec.context))
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _config(method: str, cfg: PretrainConfig | None) -> PretrainConfig:
    return (cfg if cfg is not None else PretrainConfig()).with_method(method)


def make_step(method: str, batch: int, size: int, device: torch.device, cfg: PretrainConfig | None = None
              ) -> Callable[[], None]:
    """One training step of ``method`` on a fixed batch, as the training loop runs it.

    ``cfg``: a loaded config (``utils.config.load_config``) for the head sizes, optimizer and AMP;
    default: the paper-size defaults. ``lightly_byol`` builds lightly's BYOL instead.
    """
    cfg = _config("byol" if method == REFERENCE else method, cfg)
    if method == REFERENCE:
        return _lightly_byol_step(batch, size, device, cfg)
    model = build_model(cfg).to(device).train()
    optimizer, _, _ = build_optimizer(cfg, model, batch, iters_per_epoch=1)
    amp = cfg.amp.opt_level != "O0" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    data = {k: v.to(device) for k, v in make_batch(batch, size, method).items()}
    gen = torch.Generator(device=device).manual_seed(0)
    return lambda: train_step(model, model, optimizer, scaler, data, 0.1, 0.99, gen, amp)


def _lightly_byol_step(batch: int, size: int, device: torch.device, cfg: PretrainConfig) -> Callable[[], None]:
    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    m = cfg.model
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    online = torch.nn.ModuleDict({
        "backbone": backbone,
        "projection": BYOLProjectionHead(512, m.projection.hidden_dim, m.projection.output_dim),
        "prediction": BYOLPredictionHead(m.projection.output_dim, m.predictor.hidden_dim,
                                         m.predictor.output_dim)}).to(device).train()
    target = torch.nn.ModuleDict({k: copy.deepcopy(online[k]) for k in ("backbone", "projection")})
    deactivate_requires_grad(target)
    optimizer, _, _ = build_optimizer(cfg, online, batch, iters_per_epoch=1)
    data = make_batch(batch, size, "byol")
    x0, x1 = data["view1"].to(device), data["view2"].to(device)
    criterion = NegativeCosineSimilarity()

    def step() -> None:
        x = torch.cat([x0, x1])
        p0, p1 = online["prediction"](online["projection"](online["backbone"](x))).chunk(2)
        with torch.no_grad():
            z0, z1 = target["projection"](target["backbone"](x)).chunk(2)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.item()  # the training loop reads the loss each step too
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_momentum(online["backbone"], target["backbone"], 0.99)
        update_momentum(online["projection"], target["projection"], 0.99)
    return step


def time_method(method: str, batch: int, size: int, steps: int, warmup: int, device: torch.device,
                cfg: PretrainConfig | None = None) -> list[float]:
    """Seconds of each timed step (after ``warmup`` untimed ones) on one fixed batch."""
    torch.manual_seed(0)
    step = make_step(method, batch, size, device, cfg)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
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
    from utils.mask_layout import load_pairs
    from utils.pretrain_data import AnatomyPairDataset, EpochSampler
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


def render(res: dict) -> str:
    """Markdown table of a results JSON written by ``--json``."""
    med = {k: v["median_s"] for k, v in res["methods"].items()}
    ref = med.get(REFERENCE)
    lines = [f"Step time, batch {res['batch']}, {res['size']} px, {res['device']} "
             f"({res['cpu']}, {res['torch_threads']} torch threads, load {res['load_avg_1min_at_start']}), "
             f"torch {res['torch']}; median of {res['steps']} steps after {res['warmup']} warm-up.", "",
             "| method | median step (s) | images/s | × lightly's BYOL | arithmetic floor |",
             "|---|---|---|---|---|"]
    for m, v in res["methods"].items():
        ratio = f"{v['median_s'] / ref:.2f}" if ref else "–"
        floor = f"{FLOOR[m]:.2f}" if m in FLOOR else "1 (reference)"
        lines.append(f"| {m} | {v['median_s']:.3f} | {v['img_per_s']:.1f} | {ratio} | {floor} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default=",".join([REFERENCE, *METHODS]),
                   help=f"comma-separated, from {[REFERENCE, *METHODS]}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loader", action="store_true", help="also time the data loader")
    p.add_argument("--workers", type=int, default=2, help="loader workers for --loader")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--render", default=None, metavar="JSON", help="print the markdown table of a results file")
    a = p.parse_args(argv)
    if a.render:
        try:
            print(render(json.loads(Path(a.render).read_text())), end="")
        except (OSError, ValueError, KeyError) as e:
            p.error(f"{a.render}: cannot render ({type(e).__name__}: {e})")
        return 0
    device = torch.device(a.device)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {REFERENCE, *METHODS})
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {[REFERENCE, *METHODS]}")
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, torch {torch.__version__}, load {load}; batch {a.batch}, {a.size} px, "
          f"median of {a.steps} steps after {a.warmup} warm-up")
    res = {"batch": a.batch, "size": a.size, "steps": a.steps, "warmup": a.warmup, "device": str(device),
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_avg_1min_at_start": load, "methods": {}}
    for method in methods:
        times = time_method(method, a.batch, a.size, a.steps, a.warmup, device)
        med = statistics.median(times)
        res["methods"][method] = {"median_s": med, "min_s": min(times), "max_s": max(times),
                                  "img_per_s": a.batch / med}
        print(f"{method:13s} median step {med:.3f} s  ({a.batch / med:.1f} img/s)  "
              f"min {min(times):.3f} max {max(times):.3f}")
    med = {k: v["median_s"] for k, v in res["methods"].items()}
    if REFERENCE in med:
        res["ratios_to_lightly_byol"] = {m: med[m] / med[REFERENCE] for m in med if m != REFERENCE}
        print("ratios to lightly's BYOL (arithmetic floor in brackets): " + ", ".join(
            f"{m} {r:.2f}x ({FLOOR[m]:.2f}x)" for m, r in res["ratios_to_lightly_byol"].items()))
    if {"aclus", "detcon", "byol"} <= set(med):
        res["ratios"] = {"aclus/detcon": med["aclus"] / med["detcon"], "aclus/byol": med["aclus"] / med["byol"],
                         "detcon/byol": med["detcon"] / med["byol"]}
        print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items()))
    if a.loader:
        ips = time_loader(a.batch, a.size, a.workers, batches=6)
        res["loader_img_per_s"] = ips
        print(f"loader: {ips:.1f} img/s with {a.workers} workers")
    if a.json:
        from utils.io import atomic_write
        atomic_write(a.json, lambda f: f.write((json.dumps(res, indent=1) + "\n").encode()))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
