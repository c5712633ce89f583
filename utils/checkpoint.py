"""Training checkpoints: atomic writes, rotation and a resume that survives a bad file.

Layout of a run directory::

    latest.pth            written at the end of every epoch
    previous.pth          the ``latest.pth`` before it
    checkpoint_0020.pth   every ``save_epoch`` epochs and at the end

Two kinds of bad file are told apart: one that could not be *read* (permissions, an I/O
error: :class:`UnreadableFile`, which nothing ever renames or replaces) and one that was read
and failed to parse (:class:`CorruptFile`: truncated, not a torch file, or pickled code).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from utils.io import DataError, atomic_torch_save

log = logging.getLogger(__name__)


class UnreadableFile(DataError):
    """The file could not be read (permissions, an I/O error); it may well be good."""


class CorruptFile(DataError):
    """The file was read and is not what it should be (truncated, corrupt, or pickled code)."""


def nonfinite_entries(state: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state`` holding a NaN or an infinity
    (nested dicts are searched, their names joined by '.')."""
    bad = []
    for k, v in state.items():
        if isinstance(v, dict):
            bad += [f"{k}.{n}" for n in nonfinite_entries(v)]
        elif isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(str(k))
    return bad


def save_checkpoint(state: dict[str, Any], run_dir: Path, keep_numbered: bool) -> Path:
    """Write ``latest.pth`` atomically (the old one becomes ``previous.pth`` once the new one is
    complete on disk, so a failed write leaves both as they were); a state whose model holds a
    NaN or an infinity is a FloatingPointError and nothing is written."""
    bad = nonfinite_entries(state.get("model", {}))
    if bad:
        raise FloatingPointError(f"non-finite weights at epoch {state.get('epoch')} ({len(bad)} tensors, "
                                 f"e.g. {bad[0]!r}); no checkpoint written")
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = run_dir / "latest.pth"

    def rotate():
        if latest.exists():
            os.replace(latest, run_dir / "previous.pth")
    atomic_torch_save(state, latest, before_replace=rotate)
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

    Raises:
        UnreadableFile: the bytes could not be read (the file is left alone).
        CorruptFile: the bytes were read and do not load.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        data = path.read_bytes()  # an I/O failure here says nothing about the file's contents
    except OSError as e:
        raise UnreadableFile(f"{path}: cannot read this {what} ({e.strerror or type(e).__name__}); "
                             "nothing was changed") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if refused_code(text):  # the file names a class or function to run
            raise CorruptFile(f"{path}: refused: this {what} holds pickled code (it names "
                              f"{refused_global(text)} to run on loading); only weights-only files are "
                              "read") from None
        raise CorruptFile(f"{path}: unreadable {what}, truncated or corrupt "
                          f"(not a weights file: {unpickler_detail(text)})") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise CorruptFile(f"{path}: unreadable {what}, truncated or corrupt ({type(e).__name__}: {first})") from None


def check_kind(state: Any, path: Path, kind: str, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """``state`` if it is a checkpoint dict of ``kind`` holding the entries ``needs``, with
    finite weights, else a CorruptFile naming ``path``."""
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind", "a dict without 'kind'") if isinstance(state, dict) else type(state).__name__
        raise CorruptFile(f"{path}: expected a '{kind}' checkpoint, found {found!r}")
    missing = [k for k in needs if k not in state]
    if missing:
        raise CorruptFile(f"{path}: a '{kind}' checkpoint without its {', '.join(repr(k) for k in missing)} "
                          f"entr{'y' if len(missing) == 1 else 'ies'}")
    bad = nonfinite_entries(state.get("model", {})) if isinstance(state.get("model"), dict) else []
    if bad:
        raise CorruptFile(f"{path}: holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]!r})")
    return state


#: what resuming a pre-training run reads from its checkpoint
RESUME_ENTRIES = ("epoch", "model", "optimizer", "rng", "config")


def numbered_epoch(path: Path) -> int:
    """The epoch in a ``checkpoint_NNNN.pth`` name."""
    return int(path.stem.rsplit("_", 1)[1])


def find_resume_checkpoint(resume: str, run_dir: Path, kind: str, move_aside: bool = True,
                           needs: tuple[str, ...] = RESUME_ENTRIES
                           ) -> tuple[dict[str, Any] | None, Path | None]:
    """Resolve ``checkpoint.resume_path``.

    * ``""`` or ``"none"``: start from scratch (``none`` says so on purpose, e.g. over a run
      folder whose checkpoints are all unusable).
    * ``"auto"``: the newest usable checkpoint of ``run_dir`` (the one of the highest epoch
      among ``latest.pth``, ``previous.pth`` and ``checkpoint_NNNN.pth``), or scratch when it
      has none. A corrupt one (truncated, pickled code, entries missing, non-finite weights)
      is reported and, with ``move_aside`` (the main process), renamed ``<name>.corrupt`` so
      that the next rotation cannot turn it into ``previous.pth`` over the good fallback; the
      next older one is used. One that cannot be *read* stops the search with an error that
      touches nothing (it may be the newest and good). If checkpoints exist but none is
      usable, that is an error naming them.
    * a file: that checkpoint (a bad file is an error).
    """
    if not resume or resume.lower() == "none":
        return None, None
    if resume != "auto":
        path = Path(resume)
        return check_kind(safe_torch_load(path, "checkpoint"), path, kind, needs), path
    problems: list[str] = []

    def usable(path: Path) -> dict[str, Any] | None:
        try:
            return check_kind(safe_torch_load(path, "checkpoint"), path, kind, needs)
        except CorruptFile as e:  # an UnreadableFile propagates: it is nobody's to judge
            problems.append(str(e))
            if move_aside:
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                log.warning("%s; moved aside to %s, trying an older checkpoint", e, aside.name)
            else:
                log.warning("%s; trying an older checkpoint", e)
            return None

    latest, previous = run_dir / "latest.pth", run_dir / "previous.pth"
    numbered = sorted((p for p in run_dir.glob("checkpoint_*.pth") if re.fullmatch(r"checkpoint_\d+\.pth", p.name)),
                      key=numbered_epoch, reverse=True)
    n_files = sum(p.is_file() for p in (latest, previous, *numbered))
    # latest.pth is the newest when it loads (a numbered file is written after it, of the same epoch)
    if latest.is_file() and (state := usable(latest)) is not None:
        return state, latest
    prev = usable(previous) if previous.is_file() else None
    prev_epoch = int(prev["epoch"]) if prev is not None else -1
    for path in numbered:  # newer than previous.pth first, then previous.pth, then older ones
        if prev is not None and numbered_epoch(path) <= prev_epoch:
            return prev, previous
        if (state := usable(path)) is not None:
            return state, path
    if prev is not None:
        return prev, previous
    if n_files:
        raise DataError(f"{run_dir}: no checkpoint to resume from, all {n_files} are unusable: "
                        + "; ".join(problems)
                        + ". Pass --resume none (checkpoint.resume_path: none) to start from epoch 0 "
                          "on purpose, or use another checkpoint.ckpt_path")
    return None, None
