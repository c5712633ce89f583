#!/usr/bin/env python
"""Does our BYOL's loss scale matter under LARS? Gradient against weight-decay norms, per tensor.

    python benchmarks/measure_byol_parity.py --run_dir <study>/runs/lightly_byol/seed0 \
        --json docs/results/byol_parity.json

Our BYOL loss is ``2 + 2 x`` lightly's (models/losses.byol_loss), so with the same heads its
gradient is twice lightly's. timm's LARS (``trust_coeff`` eta) scales each decayed tensor's
update to ``lr * eta * ||w|| * (g + wd w) / ||g + wd w||``: a factor on ``g`` changes that update
only through the share of ``wd w`` in ``g + wd w``, i.e. not at all when ``||g|| >> wd ||w||``.
Tensors without weight decay (biases, BatchNorm: ``optimizer.exclude_bias_and_bn``) get no
trust ratio in timm's LARS: their update is ``lr * g``, so there the factor 2 is a factor 2 in
the step.

For the run's encoder at initialisation and at its latest checkpoint, on batches of its own
loader and augmentation: per online tensor, ``||w||``, ``||g||``, ``wd ||w||`` and, for the
decayed ones, the direction change a doubled gradient would make
(``angle(g + wd w, 2 g + wd w)``); for the others the relative step ``lr ||g|| / ||w||`` at the
run's peak learning rate. Runs on the CPU in seconds.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_sample import open_run_config, run_folder_parser, sample_run  # noqa: E402
from pretraining.optim import lars_param_groups, scaled_lr  # noqa: E402
from study.provenance import machine  # noqa: E402


def tensor_rows(model: torch.nn.Module, wd: float, exclude_bias_and_bn: bool, peak_lr: float) -> list[dict]:
    """One row per online tensor with a gradient (after a backward pass on ``model``)."""
    decayed = {id(p) for p in lars_param_groups(model, wd, exclude_bias_and_bn)[0]["params"]}
    rows = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        w, g = p.detach().double(), p.grad.detach().double()
        nw, ng = float(w.norm()), float(g.norm())
        row = {"name": name, "decayed": id(p) in decayed, "w_norm": nw, "g_norm": ng, "wd_w_norm": wd * nw}
        if row["decayed"]:
            one, two = g + wd * w, 2 * g + wd * w
            cos = float((one * two).sum() / (one.norm() * two.norm()).clamp_min(1e-300))
            row["g_over_wd_w"] = ng / (wd * nw) if wd * nw > 0 else math.inf
            row["angle_if_doubled_deg"] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
        else:
            row["relative_step_at_peak_lr"] = peak_lr * ng / nw if nw > 0 else None
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    dec = [r for r in rows if r["decayed"]]
    rest = [r for r in rows if not r["decayed"]]
    ratio = np.array([r["g_over_wd_w"] for r in dec])
    angle = np.array([r["angle_if_doubled_deg"] for r in dec])
    step = np.array([r["relative_step_at_peak_lr"] for r in rest if r["relative_step_at_peak_lr"] is not None])
    return {"decayed_tensors": len(dec), "g_over_wd_w": {"min": float(ratio.min()), "median": float(np.median(ratio)),
                                                          "max": float(ratio.max())},
            "angle_if_doubled_deg": {"median": float(np.median(angle)), "max": float(angle.max())},
            "undecayed_tensors": len(rest),
            "undecayed_relative_step_at_peak_lr": {"median": float(np.median(step)), "max": float(step.max())}
            if step.size else None}


def measure(model: torch.nn.Module, batches: list[dict], cfg) -> dict:
    """Gradients summed over ``batches`` (the loss as trained), then :func:`tensor_rows`."""
    model = copy.deepcopy(model).train()
    model.zero_grad(set_to_none=True)
    losses = []
    for b in batches:
        loss, _ = model(b, torch.Generator().manual_seed(0))
        (loss / len(batches)).backward()
        losses.append(float(loss))
    peak = scaled_lr(cfg.optimizer.base_lr, cfg.data.train_batch_size)
    rows = tensor_rows(model, cfg.optimizer.weight_decay, cfg.optimizer.exclude_bias_and_bn, peak)
    return {"loss": float(np.mean(losses)), "summary": summarise(rows), "tensors": rows}


def main(argv=None) -> int:
    p = run_folder_parser(__doc__.split("\n\n")[0], batches=2)
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    cfg = open_run_config(p, run_dir)
    run = sample_run(cfg, run_dir, a.batches)
    out = {"run": run_dir.name, "method": cfg.model.method, "where": machine("cpu"),
           "weight_decay": cfg.optimizer.weight_decay, "base_lr": cfg.optimizer.base_lr,
           "peak_lr": scaled_lr(cfg.optimizer.base_lr, cfg.data.train_batch_size),
           "batch": cfg.data.train_batch_size, "size": cfg.data.resize_size, "batches": len(run.batches),
           "init": measure(run.init, run.batches, cfg)}
    if run.trained is not None:
        out["checkpoint"] = {k: v for k, v in run.checkpoint.items() if k != "step"}
        out["trained"] = measure(run.trained, run.batches, cfg)
    print(json.dumps({k: v["summary"] if isinstance(v, dict) and "summary" in v else v for k, v in out.items()},
                     indent=1))
    if a.json:
        from utils.io import atomic_write

        atomic_write(Path(a.json), lambda f: f.write(json.dumps(out, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
