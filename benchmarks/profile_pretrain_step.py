#!/usr/bin/env python
"""Where a pre-training step's time goes: torch.profiler over one step of each method, by operator group.

    python benchmarks/profile_pretrain_step.py --size 64 --batch 64 --json docs/results/profile_pretrain_step.json

The step is ``benchmarks/bench_pretrain_step.make_step`` (the loop's own ``train_step`` on a
fixed batch of crops). Operators are grouped as convolution (forward + backward), matrix
products (the projection / prediction heads: ``mm``, ``addmm``, ``bmm``, the InfoNCE logits),
BatchNorm, pooling, and everything else (element-wise, copies, indexing: the part that does
not shrink with a smaller image). Self CPU time, one thread, so that the shares do not depend
on a second core's load (the load average at the start is recorded all the same).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pretrain_step import make_step  # noqa: E402
from study.provenance import machine  # noqa: E402

GROUPS = {"convolution": ("convolution", "mkldnn_convolution", "convolution_backward"),
          "matmul (heads, logits)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
          "batchnorm": ("batch_norm",),
          "pooling": ("max_pool", "avg_pool", "upsample")}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other (element-wise, copies, indexing)"


def profile_method(method: str, batch: int, size: int, warmup: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step = make_step(method, batch, size, torch.device("cpu"))
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    step()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"step_s": round(wall, 3),
            "shares": {g: round(v / total, 4) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count} for e in top],
            "aten_calls": int(sum(e.count for e in events))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--methods", default="byol,detcon,aclus")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.size < 32 or a.batch < 2:
        p.error("--size must be >= 32 and --batch >= 2")
    torch.set_num_threads(1)
    out = {"size": a.size, "batch": a.batch, "threads": 1, "where": machine("cpu"), "torch": torch.__version__,
           "load_avg_1min_at_start": round(os.getloadavg()[0], 2), "methods": {}}
    for m in a.methods.split(","):
        out["methods"][m] = profile_method(m, a.batch, a.size)
        print(m, json.dumps(out["methods"][m]["shares"]), f"{out['methods'][m]['step_s']} s", flush=True)
    if a.json:
        from utils.io import atomic_write

        atomic_write(Path(a.json), lambda f: f.write(json.dumps(out, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
