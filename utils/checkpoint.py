"""Training checkpoints: atomic writes, rotation and a resume that survives a bad file.

Layout of a run directory::

    latest.pth            written at the end of every epoch
    previous.pth          the ``latest.pth`` before it
    checkpoint_0020.pth   every ``save_epoch`` epochs and at the end
"""
from __future__ import annotations

import logging
import os
import pickle
import re
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


def refused_code(text: str) -> bool:
    """Whether torch's weights-only unpickler refused a global (a class or function), as opposed
    to failing on broken bytes; torch words it "Unsupported global" or "unsupported GLOBAL ...
    is blocked" depending on the global."""
    return bool(re.search(r"unsupported global", text, re.IGNORECASE))


def refused_global(text: str) -> str:
    m = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    return m.group(1) if m else "a global"


def unpickler_detail(text: str) -> str:
    """The line of torch's message that says what went wrong, never its advice to retry with
    ``weights_only=False`` (which would run whatever the file holds)."""
    lines = [ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and not ln.startswith(("Weights only load failed",
                                                                                    "Check the documentation"))]
    return lines[0] if lines else "UnpicklingError"


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure a one-line DataError.

    A file that needs code execution to load (pickled objects beyond tensors and plain
    containers) is refused on purpose and said so; torch's own message would advise
    ``weights_only=False``, which runs whatever the file holds.

    Args:
        what: what the file should be, for the messages ("checkpoint", "SAM weights file").
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if refused_code(text):  # the file names a class or function to run
            raise DataError(f"{path}: refused: this {what} holds pickled code (it names "
                            f"{refused_global(text)} to run on loading); only weights-only files are "
                            "read") from None
        raise DataError(f"{path}: unreadable {what}, truncated or corrupt "
                        f"(not a weights file: {unpickler_detail(text)})") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{path}: unreadable {what}, truncated or corrupt ({type(e).__name__}: {first})") from None


def read_checkpoint(path: Path, kind: str) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check that it is of ``kind``."""
    return check_kind(safe_torch_load(path, "checkpoint"), path, kind)


def check_kind(state: Any, path: Path, kind: str) -> dict[str, Any]:
    """``state`` if it is a checkpoint dict of ``kind``, else a DataError naming ``path``."""
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind", "a dict without 'kind'") if isinstance(state, dict) else type(state).__name__
        raise DataError(f"{path}: expected a '{kind}' checkpoint, found {found!r}")
    return state


def resume_candidates(run_dir: Path) -> list[Path]:
    numbered = sorted(run_dir.glob("checkpoint_*.pth"), reverse=True)
    return [p for p in [run_dir / "latest.pth", run_dir / "previous.pth", *numbered] if p.is_file()]


def find_resume_checkpoint(resume: str, run_dir: Path, kind: str, move_aside: bool = True
                           ) -> tuple[dict[str, Any] | None, Path | None]:
    """Resolve ``checkpoint.resume_path``.

    * ``""`` or ``"none"``: start from scratch (``none`` says so on purpose, e.g. over a run
      folder whose checkpoints are all unreadable).
    * ``"auto"``: the newest readable checkpoint of ``run_dir``, or scratch when it has none.
      An unreadable one (truncated, corrupt, or refused as unsafe) is reported and, with
      ``move_aside`` (the main process), renamed ``<name>.corrupt`` so that the next
      rotation cannot turn it into ``previous.pth`` over the good fallback; the next older
      one is used. If checkpoints exist but none is readable, that is an error naming them.
    * a file: that checkpoint (an unreadable file is an error).
    """
    if not resume or resume.lower() == "none":
        return None, None
    if resume != "auto":
        path = Path(resume)
        return read_checkpoint(path, kind), path
    candidates = resume_candidates(run_dir)
    problems = []
    for path in candidates:
        try:
            state = safe_torch_load(path, "checkpoint")
        except DataError as e:
            problems.append(str(e))
            if move_aside and path.is_file():
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                log.warning("%s; moved aside to %s, trying an older checkpoint", e, aside.name)
            else:
                log.warning("%s; trying an older checkpoint", e)
            continue
        try:
            return check_kind(state, path, kind), path
        except DataError as e:
            problems.append(str(e))
            log.warning("cannot resume from %s; trying an older checkpoint", e)
    if candidates:
        raise DataError(f"{run_dir}: no checkpoint to resume from, all {len(candidates)} are unusable: "
                        + "; ".join(problems)
                        + ". Pass --resume none (checkpoint.resume_path: none) to start from epoch 0 "
                          "on purpose, or use another checkpoint.ckpt_path")
    return None, None
