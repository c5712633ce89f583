"""A pre-training run folder opened for measurement: its model at initialisation and at its
latest checkpoint, and a few augmented batches of its own loader (epoch 0, the step's seeds).

Used by the measurements that look inside a run rather than time it
(``measure_byol_parity.py``, ``measure_context_task.py``).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from models.aclus import build_model
from pretraining.augment import augment_batch
from pretraining.config import PretrainConfig, load_config
from pretraining.loop import CKPT_KIND, build_loader
from pretraining.step import augment_seed
from utils.checkpoint import find_resume_checkpoint
from utils.distributed import DistInfo


@dataclass
class RunSample:
    init: torch.nn.Module                 # the model as seeded by cfg.seed, before any step
    trained: torch.nn.Module | None       # the latest checkpoint's model; None without one
    checkpoint: dict | None               # {"file", "epoch", "step"} of that checkpoint
    batches: list[dict]                   # augmented batches, as the training step saw them


def run_folder_parser(description: str, batches: int, **kwargs) -> argparse.ArgumentParser:
    """The command line every run-folder measurement shares: --run_dir, --batches, --json."""
    p = argparse.ArgumentParser(description=description, **kwargs)
    p.add_argument("--run_dir", required=True, help="a pre-training run folder (config.yaml + checkpoints)")
    p.add_argument("--batches", type=int, default=batches, help="augmented batches to measure on")
    p.add_argument("--json", default=None, help="write the measurement here (atomically)")
    return p


def open_run_config(p: argparse.ArgumentParser, run_dir: Path) -> PretrainConfig:
    """The run's own config.yaml (loader in the main process); a one-line error if it is not a run."""
    if not (run_dir / "config.yaml").is_file():
        p.error(f"{run_dir / 'config.yaml'}: not found (not a pre-training run folder)")
    return load_config(run_dir / "config.yaml", ["data.data_workers=0"])


def sample_run(cfg: PretrainConfig, run_dir: Path, n_batches: int) -> RunSample:
    torch.manual_seed(cfg.seed)
    init = build_model(cfg)
    state, path = find_resume_checkpoint("auto", run_dir, CKPT_KIND, move_aside=False)
    trained, checkpoint = None, None
    if state is not None:
        trained = copy.deepcopy(init)
        trained.load_state_dict(state["model"])
        checkpoint = {"file": path.name, "epoch": state.get("epoch"), "step": state.get("step")}
    loader, sampler = build_loader(cfg, DistInfo())
    sampler.set_epoch(0)
    batches = []
    for i, raw in enumerate(loader):
        if i == n_batches:
            break
        batches.append(augment_batch(raw, torch.Generator().manual_seed(augment_seed(cfg.seed, 0, 0, i))))
    return RunSample(init, trained, checkpoint, batches)
