"""The study's committed results: per-fold rows, per-run costs and loss curves as CSV files.

``docs/results/study/`` (``--results``) holds, besides ``settings.json``:

* ``per_fold.csv``  one row per (arm, seed, fraction, protocol, fold): accuracy, macro-F1
* ``runs.csv``      one row per pre-trained (arm, seed): frames, steps, images, forward passes, time
* ``loss.csv``      the logged loss terms of every pre-trained (arm, seed), per step

Each file is rewritten whole and atomically after every evaluation, so a killed study
leaves complete files, and the rows already there tell a re-run (on this or another
machine) which (arm, seed) pairs are done. The functions that build rows are pure; only
``read_*`` / ``write_*`` touch files.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from models.methods import METHODS
from study import StudyError
from study.plan import Preset, expected_keys

FOLD_COLUMNS = ("arm", "method", "mask_source", "seed", "fraction", "steps", "protocol", "fold",
                "n_test", "accuracy", "macro_f1")
RUN_COLUMNS = ("arm", "method", "mask_source", "seed", "frames", "batch_size", "epochs", "steps", "images",
               "online_passes", "target_passes", "train_s", "wall_s")
LOSS_COLUMNS = ("arm", "seed", "step", "term", "value")
_INT = {"seed", "steps", "fold", "n_test", "frames", "batch_size", "epochs", "images", "online_passes",
        "target_passes", "step"}
_FLOAT = {"fraction", "accuracy", "macro_f1", "train_s", "wall_s", "value"}

#: encoder forward passes per pre-training image: (online, with backward; target, no backward)
PASSES = {name: (3, 3) if m.context else (2, 2) for name, m in METHODS.items()}  # the context term: a third pass


def read_json(path: Path) -> dict:
    """A JSON object file of a study folder; a corrupt one is a :class:`StudyError` naming it."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise StudyError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_json(path: Path, obj) -> None:
    from utils.io import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def from_csv(text: str, columns: tuple[str, ...], source: str, ints: frozenset | set = _INT,
             floats: frozenset | set = _FLOAT) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return []
    missing = [c for c in columns if c not in reader.fieldnames]
    if missing:
        raise StudyError(f"{source}: missing column(s) {missing}; expected {list(columns)}")
    out = []
    for i, r in enumerate(reader, start=2):
        try:
            out.append({k: (None if v == "" else int(v) if k in ints else float(v) if k in floats else v)
                        for k, v in r.items() if k in columns})
        except ValueError as e:
            raise StudyError(f"{source}: line {i}: {e}") from None
    return out


def read_rows(path: Path, columns: tuple[str, ...], ints: frozenset | set = _INT,
              floats: frozenset | set = _FLOAT) -> list[dict]:
    return from_csv(path.read_text(), columns, str(path), ints, floats) if path.is_file() else []


def write_rows(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    from utils.io import atomic_write

    text = to_csv(rows, columns)
    atomic_write(path, lambda f: f.write(text.encode()))


def fold_rows(evaluation: dict, *, arm: str, method: str, mask_source: str | None, seed: int,
              fraction: float, steps: int) -> list[dict]:
    """The per-fold rows of one ``eval_<protocol>_<selection>.json``."""
    return [{"arm": arm, "method": method, "mask_source": mask_source or "", "seed": seed, "fraction": fraction,
             "steps": steps, "protocol": evaluation["protocol"], "fold": int(f["fold"]),
             "n_test": int(f["n_test"]), "accuracy": round(float(f["accuracy"]), 6),
             "macro_f1": round(float(f["macro_f1"]), 6)} for f in evaluation["folds"]]


def replace_rows(rows: list[dict], new: list[dict], key: tuple[str, ...]) -> list[dict]:
    """``rows`` with every row whose ``key`` values match one of ``new``'s replaced by ``new``."""
    drop = {tuple(r[k] for k in key) for r in new}
    return [r for r in rows if tuple(r[k] for k in key) not in drop] + list(new)


def done_keys(rows: list[dict], arm: str, seed: int) -> set[tuple[float, str, int]]:
    """(fraction, protocol, fold) of the rows one (arm, seed) already has."""
    return {(float(r["fraction"]), r["protocol"], int(r["fold"])) for r in rows
            if r["arm"] == arm and int(r["seed"]) == seed}


def run_row(*, arm: str, method: str, mask_source: str | None, seed: int, frames: int, batch_size: int,
            epochs: int, steps: int, train_s: float | None, wall_s: float | None) -> dict:
    """Cost of one pre-training run: images seen and encoder forward passes (online / target)."""
    online, target = PASSES[method]
    images = steps * batch_size
    return {"arm": arm, "method": method, "mask_source": mask_source or "", "seed": seed, "frames": frames,
            "batch_size": batch_size, "epochs": epochs, "steps": steps, "images": images,
            "online_passes": online * images, "target_passes": target * images,
            "train_s": train_s, "wall_s": wall_s}


def loss_rows(records: list[dict], arm: str, seed: int) -> list[dict]:
    """The numeric loss terms of a ``log.jsonl``'s step records (lr, momentum and counters left out)."""
    skip = {"kind", "epoch", "step", "lr", "momentum"}
    out = []
    for r in records:
        if r.get("kind") != "step":
            continue
        for term, v in r.items():
            if term not in skip and isinstance(v, (int, float)):
                out.append({"arm": arm, "seed": seed, "step": int(r["step"]), "term": term,
                            "value": round(float(v), 6)})
    return out


def attribute_pairs(made_by: dict[str, list[str]], commit: str | None, done_before: set[str],
                    done_now: set[str]) -> dict[str, list[str]]:
    """``settings.json``'s ``made_by`` ({commit: ["arm seed N", ...]}) with the (arm, seed) pairs
    finished in this invocation (``done_now - done_before``) added under ``commit``: rows of
    different code are told apart even when one study spans sittings at several commits."""
    out = {k: list(v) for k, v in made_by.items()}
    new = sorted(done_now - done_before - {p for v in out.values() for p in v})
    if new:
        out.setdefault(commit or "unknown", []).extend(new)
    return out


class Results:
    """The committed result files of one study (``--results``), kept in memory and rewritten whole."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows = read_rows(folder / "per_fold.csv", FOLD_COLUMNS)
        self.runs = read_rows(folder / "runs.csv", RUN_COLUMNS)
        self.loss = read_rows(folder / "loss.csv", LOSS_COLUMNS)

    def done(self, arm: str, seed: int, preset: Preset) -> bool:
        return expected_keys(arm, preset) <= done_keys(self.rows, arm, seed)

    def add_rows(self, new: list[dict]) -> None:
        self.rows = replace_rows(self.rows, new, ("arm", "seed", "fraction", "protocol", "fold"))
        write_rows(self.folder / "per_fold.csv", self.rows, FOLD_COLUMNS)

    def add_run(self, run: dict, loss: list[dict]) -> None:
        self.runs = replace_rows(self.runs, [run], ("arm", "seed"))
        self.loss = [r for r in self.loss if (r["arm"], r["seed"]) != (run["arm"], run["seed"])] + loss
        write_rows(self.folder / "runs.csv", self.runs, RUN_COLUMNS)
        write_rows(self.folder / "loss.csv", self.loss, LOSS_COLUMNS)


def check_results_folder(folder: Path, preset: Preset) -> None:
    """Refuse to add rows to a results folder made with other preset settings."""
    path = folder / "settings.json"
    if not path.is_file() or not (folder / "per_fold.csv").is_file():
        return
    before = read_json(path).get("preset", {})
    now = preset.to_dict()
    for k, v in now.items():
        if k in ("seeds", "workers", "threads"):  # more seeds extend a study; workers change no number
            continue
        if k not in before:  # a preset key newer than the rows: nothing to compare
            continue
        old = before[k]      # None too: a base_lr left to the config is not the same as base_lr 2.0
        if (list(old) if isinstance(old, (list, tuple)) else old) != \
                (list(v) if isinstance(v, (list, tuple)) else v):
            raise StudyError(f"{path}: its rows were made with preset {k}={old!r}, now {v!r}; "
                             "use another --results to compare settings")


def completed_pairs(store: Results, arms: list[str], preset: Preset) -> set[str]:
    """``"arm seed N"`` of every (arm, seed) of this study whose rows are all there."""
    return {f"{arm} seed {s}" for s in preset.seeds for arm in arms if store.done(arm, s, preset)}


def study_seeds(earlier: dict, rows: list[dict], preset: Preset) -> tuple[int, ...]:
    """The seeds of a study: those of the runs before (``earlier``: the settings.json they left, and
    the seeds of its ``rows``) and this run's ``--seeds``; a run of fewer seeds extends the study,
    never narrows it."""
    return tuple(sorted({*earlier.get("preset", {}).get("seeds", []), *(int(r["seed"]) for r in rows),
                         *preset.seeds}))


def pending(store: Results, arms: list[str], preset: Preset, missing: dict) -> list[str]:
    return [f"{arm} seed {s}" for s in preset.seeds for arm in arms
            if arm not in missing and not store.done(arm, s, preset)]
