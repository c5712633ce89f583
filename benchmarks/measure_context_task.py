#!/usr/bin/env python
"""Is ACLUS's context prediction a task? Its loss under controls, on a pre-training run's batches.

    python benchmarks/measure_context_task.py --run_dir runs/aclus --json docs/results/context_task.json

For the run's encoder at initialisation (its seed) and at its latest checkpoint, on batches
of its own loader and augmentation, ``ACLUS.forward``'s context terms (``context/<scale>``,
``2 - 2 cos`` of prediction and target, 0 = identical directions) under five conditions, named
by the BatchNorm of the overlap pass (``running``: inference mode; ``batch``: the pass's own
batch statistics, running statistics untouched) and by what the networks see:

* ``<bn>``: as in training (online: the damaged overlap; target: the clean one);
* ``running_no_damage``: the online network sees the clean overlap too (the damage's share);
* ``<bn>_other_image``: the target sees another image's clean overlap (the batch rolled by
  one), pooled over the same ids: a prediction that does not depend on its image scores as
  well here as in ``<bn>``.

Each condition runs on a copy of the model (no running statistic changes) with the same
region draws. A value near 0 with ``_other_image`` as low says the embedding of the overlap
no longer depends on the image: the term is satisfied trivially. ``trained_with`` records
the run's own ``loss.context_batchnorm`` (``running`` for runs made before the key existed).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_sample import open_run_config, run_folder_parser, sample_run  # noqa: E402
from study.provenance import machine  # noqa: E402

CONDITIONS = ("running", "running_no_damage", "running_other_image", "batch", "batch_other_image")


def condition_batch(batch: dict[str, torch.Tensor], condition: str) -> dict[str, torch.Tensor]:
    """The batch a condition feeds to ``ACLUS.forward`` (pure)."""
    if condition.endswith("no_damage"):
        return dict(batch, ctx_damaged=batch["ctx_clean"])
    if condition.endswith("other_image"):
        return dict(batch, ctx_clean=batch["ctx_clean"].roll(1, dims=0))
    return batch


@torch.no_grad()
def context_terms(core: torch.nn.Module, batch: dict[str, torch.Tensor], condition: str, seed: int = 0
                  ) -> dict[str, float]:
    """``context/<scale>`` of one forward under ``condition``, on a copy of ``core``."""
    model = copy.deepcopy(core).train()
    model.context_batchnorm = condition.split("_")[0]
    _, stats = model(condition_batch(batch, condition), torch.Generator().manual_seed(seed))
    return {k: float(v) for k, v in stats.items() if k.startswith("context/")}


def measure(core: torch.nn.Module, batches: list[dict]) -> dict[str, dict[str, float]]:
    """Mean over batches of every condition's context terms."""
    out = {}
    for c in CONDITIONS:
        per = [context_terms(core, b, c, seed=i) for i, b in enumerate(batches)]
        out[c] = {k: round(float(np.mean([p[k] for p in per])), 4) for k in per[0]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = run_folder_parser(__doc__, batches=3, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    cfg = open_run_config(p, run_dir)
    trained_with = (yaml.safe_load((run_dir / "config.yaml").read_text()).get("loss") or {}).get(
        "context_batchnorm", "running")
    if cfg.model.method != "aclus":
        p.error(f"{run_dir}: method {cfg.model.method!r} has no context term")
    run = sample_run(cfg, run_dir, a.batches)
    out = {"run": run_dir.name, "where": machine("cpu"), "method": cfg.model.method,
           "base_lr": cfg.optimizer.base_lr, "pairs": cfg.data.num_examples,
           "trained_with": trained_with, "size": cfg.data.resize_size, "batch": cfg.data.train_batch_size,
           "batches": len(run.batches), "init": measure(run.init.train(), run.batches)}
    if run.trained is not None:
        out["checkpoint"] = run.checkpoint
        out["trained"] = measure(run.trained.train(), run.batches)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        from utils.io import atomic_write

        atomic_write(Path(a.json), lambda f: f.write(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
