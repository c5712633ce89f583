"""Median pre-training step time of every method, beside lightly's classic BYOL, in one run.

    python benchmarks/bench_pretrain_step.py --batch 32 --size 112 --steps 5 --json docs/results/bench_pretrain_step.json
    python benchmarks/bench_pretrain_step.py --batches 8,32,192 --size 224 --methods aclus --amp auto --loader

A step is the training loop's own ``pretraining.step.train_step`` (the on-device augmentation
of a batch of crops, forward of the online and target networks, losses, backward, LARS
update, target EMA) on a fixed batch of crops, with the precision, memory format and
compilation the loop would use (``--amp``, ``--compile``; channels-last on CUDA); data
loading is excluded (``--loader`` times it separately: the real Dataset with its in-memory
frame cache and workers that only crop, flip and resize, reported beside the training
images/s). ``lightly_byol`` is the same recipe written with lightly's modules (torchvision
ResNet-18, ``BYOLProjectionHead``, ``BYOLPredictionHead``, ``NegativeCosineSimilarity``,
``update_momentum``) and the same LARS, as an outside reference; it gets finished views
(its step does no augmentation, ours do).

``--batches 8,32,192`` times every batch size in one run (images/s per batch); ``--json``
writes the results after each batch size, so a run cut short keeps what it measured.

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
from pretraining.augment import augment_batch  # noqa: E402
from pretraining.config import PretrainConfig  # noqa: E402
from pretraining.data import make_crops, relabel_mask  # noqa: E402
from pretraining.optim import build_optimizer  # noqa: E402
from pretraining.precision import prepare_model, resolve_precision  # noqa: E402
from pretraining.step import augment_seed, train_step  # noqa: E402
from utils.synthetic_scan import make_scan  # noqa: E402

REFERENCE = "lightly_byol"
#: the reference here is lightly's whole recipe (its ResNet, heads, loss and update_momentum) in a
#: loop of its own; models.methods' ``lightly_byol`` (lightly's heads inside our step) is timed as it
CHOICES = (REFERENCE, *(m for m in METHODS if m != REFERENCE))
#: (GMACs of 224 px views through the encoder of each method) / plain ResNet-18's
#: (a global method: plain ResNet-18 on two views; a region method: ResNet-18 + FPN on two views, three
#: with the context pass)
FLOOR = {name: 1.0 if m.pooling == "global" else (3 if m.context else 2) * (1.8 + 2.4) / (2 * 1.8)
         for name, m in METHODS.items()}


#: distinct synthetic scans behind a benchmark batch (each item gets its own crops)
SCAN_POOL = 16


def make_batch(batch: int, size: int, method: str) -> dict[str, torch.Tensor]:
    """A batch of the loader's crops (uint8, :func:`pretraining.data.make_crops`) of synthetic
    scans at twice the view side, as the training step receives it."""
    spec = get_method(method)
    scans = [make_scan(seed=i, size=2 * size, scan_class=i % 3) for i in range(min(batch, SCAN_POOL))]
    items = []
    for i in range(batch):
        image, label = scans[i % len(scans)]
        label = np.zeros_like(label, np.uint8) if spec.whole_image else relabel_mask(label)
        items.append(make_crops(image, label, np.random.default_rng(i), size, (0.2, 1.0), spec.context))
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _config(method: str, cfg: PretrainConfig | None) -> PretrainConfig:
    return (cfg if cfg is not None else PretrainConfig()).with_method(method)


def make_step(method: str, batch: int, size: int, device: torch.device, cfg: PretrainConfig | None = None
              ) -> Callable[[], None]:
    """One training step of ``method`` on a fixed batch, as the training loop runs it.

    ``cfg``: a loaded config (``pretraining.config.load_config``) for the head sizes, optimizer, AMP,
    memory format and compilation (``amp.*``); default: the paper-size defaults (fp32).
    ``lightly_byol`` builds lightly's BYOL instead.
    """
    cfg = _config("byol" if method == REFERENCE else method, cfg)
    if method == REFERENCE:
        return _lightly_byol_step(batch, size, device, cfg)
    model = build_model(cfg).to(device).train()
    prepare_model(model, cfg.amp, device)
    optimizer, _, _ = build_optimizer(cfg, model, batch, iters_per_epoch=1)
    precision = resolve_precision(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_scaler)
    data = {k: v.to(device) for k, v in make_batch(batch, size, method).items()}
    gen = torch.Generator(device=device).manual_seed(0)
    aug = torch.Generator(device=device)
    count = [0]

    def step() -> None:
        aug.manual_seed(augment_seed(0, 0, 0, count[0]))  # per step, as the training loop
        count[0] += 1
        train_step(model, model, optimizer, scaler, data, 0.1, 0.99, gen, precision, aug)
    return step


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
    data = augment_batch(make_batch(batch, size, "byol"), torch.Generator().manual_seed(0))  # finished views
    x0, x1 = data["view1"].to(device), data["view2"].to(device)
    criterion = NegativeCosineSimilarity()

    def step() -> None:
        x = torch.cat([x0, x1])
        p0, p1 = online["prediction"](online["projection"](online["backbone"](x))).chunk(2)
        with torch.no_grad():
            z0, z1 = target["projection"](target["backbone"](x)).chunk(2)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_momentum(online["backbone"], target["backbone"], 0.99)
        update_momentum(online["projection"], target["projection"], 0.99)
    return step


def time_method(method: str, batch: int, size: int, steps: int, warmup: int, device: torch.device,
                cfg: PretrainConfig | None = None, first: list | None = None) -> list[float]:
    """Seconds of each timed step (after ``warmup`` untimed ones) on one fixed batch.
    ``first``: a list that receives the first step's seconds (compilation included)."""
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
        if i == 0 and first is not None:
            first.append(time.perf_counter() - t)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def time_augment(batch: int, size: int, steps: int, device: torch.device) -> float:
    """Median seconds of the on-device augmentation alone (:func:`augment_batch` of aclus crops:
    2 photometric views and the damaged overlap), the part of every step that precedes the model."""
    data = {k: v.to(device) for k, v in make_batch(batch, size, "aclus").items()}
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        augment_batch(data, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def loader_throughput(batch: int, size: int, workers: int, batches: int, crop_scale=(0.2, 1.0),
                      cache: str = "memory", device_augment: bool = True, n_images: int = 0) -> dict:
    """Images/s of the training DataLoader (aclus crops) on synthetic files, after the first
    batch (the workers are persistent, as in training): ``batches`` batches, over as many
    epochs of the ``n_images`` frames as that takes. ``cache="none", device_augment=False`` is
    the per-sample path (files read and views augmented by the workers) for comparison."""
    from torch.utils.data import DataLoader

    from pretraining.data import AnatomyPairDataset, EpochSampler
    from utils.generate_masks_pkls import generate
    from utils.mask_layout import load_pairs
    from utils.synthetic_us import write_pretrain_layout

    n_images = n_images or max(batch, 2 * SCAN_POOL)
    with tempfile.TemporaryDirectory() as tmp:
        write_pretrain_layout(tmp, n_images=(n_images + 1) // 2, size=2 * size, seed=0)
        generate(Path(tmp))
        t = time.perf_counter()
        ds = AnatomyPairDataset(load_pairs(tmp), size=size, crop_scale=tuple(crop_scale), with_context=True,
                                device_augment=device_augment, cache=cache, threads=max(1, workers))
        build_s = time.perf_counter() - t
        sampler = EpochSampler(len(ds))
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0)
        if len(loader) == 0:
            raise ValueError(f"{len(ds)} frames give no batch of {batch}")
        seen, epoch, t, first_s = 0, 0, None, None
        t0 = time.perf_counter()
        while seen < batches + 1:
            sampler.set_epoch(epoch)
            for b in loader:
                if t is None:                                  # the first batch starts the workers
                    first_s, t = time.perf_counter() - t0, time.perf_counter()
                seen += 1
                if seen >= batches + 1:
                    break
            epoch += 1
        seconds = time.perf_counter() - t
        return {"batch": batch, "size": size, "workers": workers, "frames": len(ds), "batches": batches,
                "cache": cache, "device_augment": device_augment, "cache_build_s": round(build_s, 3),
                "first_batch_s": round(first_s, 3), "img_per_s": batches * batch / seconds}


def time_loader(batch: int, size: int, workers: int, batches: int, crop_scale=(0.2, 1.0)) -> float:
    """Images/s of the training DataLoader (see :func:`loader_throughput`)."""
    return loader_throughput(batch, size, workers, batches, crop_scale)["img_per_s"]


def _table(res: dict, methods: dict) -> list[str]:
    med = {k: v["median_s"] for k, v in methods.items()}
    ref = med.get(REFERENCE)
    lines = ["| method | median step (s) | images/s | × lightly's BYOL | arithmetic floor |",
             "|---|---|---|---|---|"]
    for m, v in methods.items():
        ratio = f"{v['median_s'] / ref:.2f}" if ref else "–"
        floor = f"{FLOOR[m]:.2f}" if m in FLOOR else "1 (reference)"
        lines.append(f"| {m} | {v['median_s']:.3f} | {v['img_per_s']:.1f} | {ratio} | {floor} |")
    return lines


def render(res: dict) -> str:
    """Markdown table(s) of a results JSON written by ``--json``."""
    settings = ""
    if "amp" in res:
        settings = f", {res['amp']}, channels_last={res['channels_last']}, compile={res['compile']}"
    head = (f"{res['size']} px, {res['device']} ({res['cpu']}, {res['torch_threads']} torch threads, "
            f"load {res['load_avg_1min_at_start']}), torch {res['torch']}{settings}; "
            f"median of {res['steps']} steps after {res['warmup']} warm-up.")
    by_batch = res.get("by_batch") or {str(res["batch"]): {"methods": res["methods"]}}
    lines = []
    for b, r in by_batch.items():
        lines += [f"Step time, batch {b}, {head}", "", *_table(res, r["methods"]), ""]
        if "augment_s" in r:
            lines += [f"On-device augmentation alone (in each step but lightly_byol's): {r['augment_s']:.3f} s", ""]
    if "loader" in res:
        ld = res["loader"]
        lines.append(f"Loader: {ld['img_per_s']:.0f} images/s (batch {ld['batch']}, {ld['workers']} workers, "
                     f"in-memory cache of {ld['frames']} frames built in {ld['cache_build_s']} s); training: "
                     + ", ".join(f"{m} {v:.0f}" for m, v in ld.get("train_img_per_s", {}).items()) + " images/s")
        lines.append("")
    return "\n".join(lines)


def _bench_config(amp: str, compile_: bool) -> PretrainConfig:
    """The defaults with ``--amp`` (O0 = fp32, or an amp.dtype with O1) and ``--compile``."""
    values = {"amp.opt_level": "O0"} if amp == "O0" else {"amp.opt_level": "O1", "amp.dtype": amp}
    return PretrainConfig().with_values({**values, "amp.compile": compile_})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 8,32,192 (overrides --batch)")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default=",".join(CHOICES), help=f"comma-separated, from {list(CHOICES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="O0", choices=["O0", "auto", "bf16", "fp16"],
                   help="O0 = fp32; else autocast with this amp.dtype (as amp.opt_level O1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders (amp.compile)")
    p.add_argument("--loader", action="store_true", help="also time the data loader (in-memory cache)")
    p.add_argument("--loader_per_sample", action="store_true",
                   help="with --loader, also time the per-sample path (files + CPU augmentation)")
    p.add_argument("--workers", type=int, default=2, help="loader workers for --loader")
    p.add_argument("--loader_batches", type=int, default=6, help="batches timed by --loader")
    p.add_argument("--loader_images", type=int, default=0, help="frames of the --loader data set (0: auto)")
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
    unknown = sorted(set(methods) - set(CHOICES))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(CHOICES)}")
    try:
        batches = [int(b) for b in a.batches.split(",")] if a.batches else [a.batch]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
    cfg = _bench_config(a.amp, a.compile)
    precision = resolve_precision(cfg.amp, device)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, torch {torch.__version__}, load {load}; batches {batches}, {a.size} px, "
          f"{precision}, compile={a.compile}; median of {a.steps} steps after {a.warmup} warm-up")
    res = {"batch": batches[0], "batches": batches, "size": a.size, "steps": a.steps, "warmup": a.warmup,
           "device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_avg_1min_at_start": load, "amp": str(precision),
           "channels_last": cfg.amp.channels_last and device.type == "cuda", "compile": a.compile,
           "methods": {}, "by_batch": {}}

    def save() -> None:
        if a.json:
            from utils.io import atomic_write
            atomic_write(a.json, lambda f: f.write((json.dumps(res, indent=1) + "\n").encode()))

    for batch in batches:
        entry: dict = {"methods": {}}
        for method in methods:
            first: list = []
            times = time_method(method, batch, a.size, a.steps, a.warmup, device, cfg, first)
            med = statistics.median(times)
            entry["methods"][method] = {"median_s": med, "min_s": min(times), "max_s": max(times),
                                        "img_per_s": batch / med, "first_step_s": first[0]}
            print(f"batch {batch:4d} {method:13s} median step {med:.3f} s  ({batch / med:.1f} img/s)  "
                  f"min {min(times):.3f} max {max(times):.3f}  first {first[0]:.2f} s")
        if set(methods) - {REFERENCE}:
            entry["augment_s"] = time_augment(batch, a.size, a.steps, device)
            print(f"batch {batch:4d} on-device augmentation alone: {entry['augment_s']:.3f} s "
                  f"(part of every step above but lightly_byol's)")
        med = {k: v["median_s"] for k, v in entry["methods"].items()}
        if REFERENCE in med:
            entry["ratios_to_lightly_byol"] = {m: med[m] / med[REFERENCE] for m in med if m != REFERENCE}
            print("ratios to lightly's BYOL (arithmetic floor in brackets): " + ", ".join(
                f"{m} {r:.2f}x ({FLOOR[m]:.2f}x)" for m, r in entry["ratios_to_lightly_byol"].items()))
        if {"aclus", "detcon", "byol"} <= set(med):
            entry["ratios"] = {"aclus/detcon": med["aclus"] / med["detcon"],
                               "aclus/byol": med["aclus"] / med["byol"], "detcon/byol": med["detcon"] / med["byol"]}
            print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in entry["ratios"].items()))
        if a.compile:  # what dynamo made of it (a failure to compile falls back to eager, with a warning)
            from torch._dynamo.utils import counters
            entry["dynamo"] = {"unique_graphs": int(counters["stats"]["unique_graphs"]),
                               "graph_breaks": int(sum(counters["graph_break"].values()))}
            print(f"dynamo so far: {entry['dynamo']}")
        res["by_batch"][str(batch)] = entry
        if batch == batches[0]:  # the single-batch layout of earlier results files
            res["methods"] = entry["methods"]
            for key in ("ratios_to_lightly_byol", "ratios"):
                if key in entry:
                    res[key] = entry[key]
        save()
    if a.loader:
        batch = batches[-1]
        ld = loader_throughput(batch, a.size, a.workers, a.loader_batches, n_images=a.loader_images)
        ld["train_img_per_s"] = {m: v["img_per_s"] for m, v in res["by_batch"][str(batch)]["methods"].items()}
        ld["loader_over_train"] = {m: ld["img_per_s"] / v for m, v in ld["train_img_per_s"].items()}
        res["loader"] = ld
        res["loader_img_per_s"] = ld["img_per_s"]
        print(f"loader: {ld['img_per_s']:.1f} img/s (batch {batch}, {a.workers} workers, cache of {ld['frames']} "
              f"frames built in {ld['cache_build_s']} s) vs training "
              + ", ".join(f"{m} {v:.1f}" for m, v in ld["train_img_per_s"].items()) + " img/s")
        if a.loader_per_sample:
            old = loader_throughput(batch, a.size, a.workers, max(1, a.loader_batches // 3), cache="none",
                                    device_augment=False, n_images=a.loader_images)
            res["loader_per_sample"] = old
            print(f"loader, per-sample path (files + CPU augmentation): {old['img_per_s']:.1f} img/s")
        save()
    if a.json:
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
