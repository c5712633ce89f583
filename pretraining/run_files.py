"""What a pre-training run writes into its folder besides checkpoints: encoder weights
(never a non-finite one), the snapshot schedule, ``config.yaml`` and ``log.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from pretraining.config import PretrainConfig
from utils.checkpoint import nonfinite_entries
from utils.io import atomic_torch_save, atomic_write


def snapshot_steps(fractions: tuple[float, ...], total_steps: int) -> set[int]:
    """The step counts after which an encoder snapshot is written: each fraction of
    ``total_steps``, rounded to the nearest step (at least 1, before the end)."""
    return {min(max(1, round(f * total_steps)), total_steps - 1) for f in fractions if total_steps > 1}


def save_weights(state: dict[str, torch.Tensor], path: Path, step: int) -> None:
    """Write an encoder state dict atomically, never one with a NaN or an infinity in it:
    that is a FloatingPointError naming the step, and the file is not written."""
    bad = nonfinite_entries(state)
    if bad:
        raise FloatingPointError(f"non-finite weights after step {step} ({len(bad)} tensors, e.g. {bad[0]!r}); "
                                 f"{path.name} not written")
    atomic_torch_save(state, path)


def records_before(lines: list[str], step: int, epoch: int) -> list[str]:
    """The lines of a ``log.jsonl`` that a run resumed at ``step`` (epoch ``epoch``) keeps:
    step records before ``step`` and epoch records up to ``epoch``; the killed attempt's
    later records are dropped so that curves get no duplicate points."""
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if (rec.get("kind") == "step" and rec.get("step", step) < step) or \
                (rec.get("kind") == "epoch" and rec.get("epoch", epoch + 1) <= epoch):
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


def write_run_config(run_dir: Path, cfg: PretrainConfig) -> Path:
    """Write the resolved config as ``config.yaml``, or beside an existing different one
    (``config.1.yaml``, ...): the config a finished run was made with is never replaced."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    path, n = run_dir / "config.yaml", 0
    while path.is_file() and path.read_text() != text:
        n += 1
        path = run_dir / f"config.{n}.yaml"
    if not path.is_file():
        atomic_write(path, lambda f: f.write(text.encode()))
    return path


class JsonLog:
    """Append-only JSON-lines log next to the checkpoints (rank 0 only).

    ``resume_step``/``resume_epoch``: the run continues from a checkpoint; records the
    killed attempt wrote after it are dropped first (:func:`records_before`).
    """

    def __init__(self, path: Path | None, resume_step: int | None = None, resume_epoch: int = 0):
        if path and resume_step is not None and path.is_file():
            kept = records_before(path.read_text().splitlines(keepends=True), resume_step, resume_epoch)
            atomic_write(path, lambda f: f.write("".join(kept).encode()))
        self.f = open(path, "a") if path else None

    def write(self, **record) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()
