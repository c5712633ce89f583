"""Training checkpoints: atomic writes, rotation and a resume that survives a bad file.

Layout of a run directory::

    latest.pth            written at the end of every epoch
    previous.pth          the ``latest.pth`` before it
    checkpoint_0020.pth   every ``save_epoch`` epochs and at the end
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from utils.io import DataError, atomic_torch_save

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], run_dir: Path, keep_numbered: bool) -> Path:
    """Write ``latest.pth`` atomically (the old one becomes ``previous.pth``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = run_dir / "latest.pth"
    if latest.exists():
        os.replace(latest, run_dir / "previous.pth")
    atomic_torch_save(state, latest)
    if keep_numbered:
        atomic_torch_save(state, run_dir / f"checkpoint_{state['epoch']:04d}.pth")
    return latest


def read_checkpoint(path: Path, kind: str) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check that it is of ``kind``."""
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path}: unreadable checkpoint, truncated or corrupt ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind", "a dict without 'kind'") if isinstance(state, dict) else type(state).__name__
        raise DataError(f"{path}: expected a '{kind}' checkpoint, found {found!r}")
    return state


def resume_candidates(run_dir: Path) -> list[Path]:
    numbered = sorted(run_dir.glob("checkpoint_*.pth"), reverse=True)
    return [p for p in [run_dir / "latest.pth", run_dir / "previous.pth", *numbered] if p.is_file()]


def find_resume_checkpoint(resume: str, run_dir: Path, kind: str) -> tuple[dict[str, Any] | None, Path | None]:
    """Resolve ``checkpoint.resume_path``.

    * ``""``: start from scratch.
    * ``"auto"``: the newest readable checkpoint of ``run_dir``; a corrupt one is
      reported and the previous good one is used; none at all = start from scratch.
    * a file: that checkpoint (an unreadable file is an error).
    """
    if not resume:
        return None, None
    if resume != "auto":
        path = Path(resume)
        return read_checkpoint(path, kind), path
    for path in resume_candidates(run_dir):
        try:
            return read_checkpoint(path, kind), path
        except DataError as e:
            log.warning("cannot resume from %s; trying an older checkpoint", e)
    return None, None
