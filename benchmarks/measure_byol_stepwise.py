#!/usr/bin/env python
"""From equal weights, does lightly's BYOL train like ours? Twins stepped side by side on one run's batches.

    python benchmarks/measure_byol_stepwise.py --run_dir <study>/runs/lightly_byol_x2/seed0 --steps 200 \
        --json docs/results/byol_stepwise_cpu.json

The campaign's ``byol`` and ``lightly_byol`` arms of one seed see the same batches, augmentations and
encoder initialisation (all seeded apart from the global generator); what differs is the heads'
random initialisation (our first projector Linear draws a bias, lightly's has none, so every later
draw moves) and the loss (lightly's ``-cos`` against our ``2 - 2 cos``: half our gradient). This
measurement removes the first difference. From the run's config (data, views, LARS, schedules, EMA,
precision) it builds four models and steps them on the same batches:

* ``byol``: ours, seeded by the config's seed (the reference);
* ``byol_nudged``: the same weights moved by one float32 ulp each (``torch.nextafter``): how far a
  rounding-sized difference grows by itself, the floor any twin is judged against;
* ``lightly_byol_x2``: lightly's heads and loss times 2, loaded with ``byol``'s weights (the first
  Linear's bias left out: BatchNorm in training mode cancels it);
* ``lightly_byol``: the same with lightly's own loss scale.

At log steps it records each model's loss and each twin's divergence from ``byol``: the norm of the
difference of their online encoders relative to the distance ``byol``'s encoder has moved from its
initialisation. A twin that implements the same algorithm stays at the floor's divergence; one that
takes other steps leaves it. CPU, minutes (four models; ``--steps`` of the run's batch size).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_sample import open_run_config  # noqa: E402
from models.aclus import ACLUS, build_model  # noqa: E402
from pretraining.config import PretrainConfig  # noqa: E402
from pretraining.loop import build_loader  # noqa: E402
from pretraining.optim import build_optimizer  # noqa: E402
from pretraining.precision import prepare_model, resolve_precision  # noqa: E402
from pretraining.step import augment_seed, mask_generator, train_step  # noqa: E402
from study.provenance import code_version, git_state, machine  # noqa: E402
from utils.distributed import DistInfo  # noqa: E402

TWINS = ("byol_nudged", "lightly_byol_x2", "lightly_byol")


def _head_layers(head: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in head.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]


def load_byol_into_lightly(ours: ACLUS, theirs: ACLUS) -> None:
    """Give ``theirs`` (lightly's heads) every weight and buffer of ``ours`` (our byol), in place.

    Encoders (online and target) share their state-dict keys. The heads map layer by layer
    (Linear, BatchNorm1d, Linear): our first Linear's bias has no counterpart and is left out,
    which changes nothing in training mode, where the BatchNorm after it subtracts the batch mean
    (a bias lightly lacks anywhere else is an error).
    BatchNorm running statistics are copied as they are; afterwards that BatchNorm's running mean
    tracks our bias too, which nothing reads (BYOL runs its heads in training mode only).
    """
    if ours.spec.heads != "aclus" or theirs.spec.heads != "lightly":
        raise ValueError(f"expected our heads into lightly's, got {ours.method!r} into {theirs.method!r}")
    with torch.no_grad():
        for a, b in ((ours.encoder, theirs.encoder), (ours.target_encoder, theirs.target_encoder)):
            b.load_state_dict(a.state_dict())
        for a, b in ((ours.projector_c5, theirs.projector_c5), (ours.target_projector_c5, theirs.target_projector_c5),
                     (ours.predictor, theirs.predictor)):
            la, lb = _head_layers(a), _head_layers(b)
            if [type(m) for m in la] != [type(m) for m in lb]:
                raise ValueError(f"head layers differ: {[type(m).__name__ for m in la]} vs "
                                 f"{[type(m).__name__ for m in lb]}")
            for i, (x, y) in enumerate(zip(la, lb)):
                if x.weight.shape != y.weight.shape:
                    raise ValueError(f"head shapes differ: {tuple(x.weight.shape)} vs {tuple(y.weight.shape)}")
                y.weight.copy_(x.weight)
                if y.bias is not None:
                    y.bias.copy_(x.bias)
                elif x.bias is not None and not (i + 1 < len(la) and isinstance(la[i + 1], torch.nn.BatchNorm1d)):
                    raise ValueError(f"layer {i} of lightly's head has no bias and no BatchNorm after it to "
                                     "cancel ours")
                if isinstance(x, torch.nn.BatchNorm1d):
                    y.running_mean.copy_(x.running_mean)
                    y.running_var.copy_(x.running_var)
                    y.num_batches_tracked.copy_(x.num_batches_tracked)


def nudge(model: torch.nn.Module) -> None:
    """Move every floating-point parameter one float32 ulp up (``torch.nextafter``), in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))


def encoder_vector(model: ACLUS) -> torch.Tensor:
    """The online encoder's parameters as one float64 vector."""
    return torch.cat([p.detach().reshape(-1).double() for p in model.encoder.parameters()])


def divergence(twin: torch.Tensor, ref: torch.Tensor, ref_init: torch.Tensor) -> float:
    """``||twin - ref|| / ||ref - ref_init||``: how far apart, relative to how far ``ref`` has trained."""
    moved = float((ref - ref_init).norm())
    return float((twin - ref).norm()) / moved if moved > 0 else float("nan")


def twin_models(cfg: PretrainConfig) -> dict[str, ACLUS]:
    """``byol`` seeded by ``cfg.seed`` and its three twins (module docstring), on the CPU."""
    torch.manual_seed(cfg.seed)
    models = {"byol": build_model(_with_method(cfg, "byol"))}
    models["byol_nudged"] = copy.deepcopy(models["byol"])
    nudge(models["byol_nudged"])
    for name in ("lightly_byol_x2", "lightly_byol"):
        models[name] = build_model(_with_method(cfg, name))
        load_byol_into_lightly(models["byol"], models[name])
    return models


def _with_method(cfg: PretrainConfig, method: str) -> PretrainConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, method=method))


def step_twins(cfg: PretrainConfig, steps: int, log_every: int) -> tuple[list[dict], dict[str, ACLUS]]:
    """Step ``byol`` and its twins ``steps`` times on the run's batches as ``pretraining.loop.fit``
    does (its loader epoch by epoch, its step seeds, one mask generator per epoch); one row per
    logged step, and the stepped models."""
    info = DistInfo()
    loader, sampler = build_loader(cfg, info)
    iters = len(loader)
    if steps > cfg.optimizer.total_epochs * iters:
        raise ValueError(f"--steps {steps}: the run's schedule has {cfg.optimizer.total_epochs * iters} steps")
    precision = resolve_precision(cfg.amp, info.device)
    models = twin_models(cfg)
    opts = {}
    for name, m in models.items():
        prepare_model(m, cfg.amp, info.device)
        opts[name] = build_optimizer(cfg, m, cfg.data.train_batch_size, iters)
    scalers = {name: torch.amp.GradScaler("cuda", enabled=precision.needs_scaler) for name in models}
    init = encoder_vector(models["byol"])
    rows, step, t0 = [], 0, time.time()
    epoch = 0
    while step < steps:
        sampler.set_epoch(epoch)
        generators = {name: mask_generator(cfg.seed, 0, epoch, info.device) for name in models}
        for batch in loader:
            if step == steps:
                break
            losses = {}
            for name, m in models.items():
                opt, lr, mom = opts[name]
                aug = torch.Generator().manual_seed(augment_seed(cfg.seed, 0, epoch, step))
                m.train()
                loss, _ = train_step(m, m, opt, scalers[name], batch, float(lr[step]), float(mom[step]),
                                     generators[name], precision, aug)
                losses[name] = float(loss)
            step += 1
            if step % log_every == 0 or step == steps or step == 1:
                ref = encoder_vector(models["byol"])
                rows.append({"step": step, "lr": float(opts["byol"][1][step - 1]), "loss": losses,
                             "divergence": {n: divergence(encoder_vector(models[n]), ref, init) for n in TWINS},
                             "byol_moved": float((ref - init).norm()), "elapsed_s": round(time.time() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
        epoch += 1
    return rows, models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", required=True, help="a pre-training run folder (its config.yaml is read)")
    p.add_argument("--json", default=None, help="write the measurement here (atomically)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each model")
    p.add_argument("--log_every", type=int, default=10, help="record the divergence every this many steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--load", default="nothing else", help="what ran beside it, in words (recorded)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.log_every < 1:
        p.error("--steps and --log_every must be at least 1")
    torch.set_num_threads(a.threads)
    run_dir = Path(a.run_dir)
    cfg = open_run_config(p, run_dir)
    code = code_version(git_state())  # the tree that runs, before any later edit
    t0 = time.time()
    try:
        rows, _ = step_twins(cfg, a.steps, a.log_every)
    except ValueError as e:
        p.error(str(e))
    out = {"run": str(run_dir.name), "config_method": cfg.model.method, "seed": cfg.seed,
           "code": code, "where": machine("cpu"), "threads": a.threads, "load": a.load, "steps": a.steps,
           "batch": cfg.data.train_batch_size, "size": cfg.data.resize_size, "base_lr": cfg.optimizer.base_lr,
           "warmup_epochs": cfg.optimizer.warmup_epochs, "total_epochs": cfg.optimizer.total_epochs,
           "twins": list(TWINS), "wall_s": round(time.time() - t0, 1), "rows": rows}
    if a.json:
        from utils.io import atomic_write

        atomic_write(Path(a.json), lambda f: f.write(json.dumps(out, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
