"""Groups and folds of a plain ImageFolder (pure but for the split file's I/O): stratified by
class, grouped so that one patient never sits on both sides of a fold, written beside the
results and read back on a re-run."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from utils.io import DataError

GROUP_RULES = ("folder", "frame")  # or a regular expression whose first group is the group
SPLIT_NAME = "split.csv"           # beside the results: file, class, group, fold


def group_from_png_name(name: str) -> str:
    """Source video of a frame PNG named ``<stem>__f<frame>.png`` (utils.pocus_folds); else the stem."""
    stem = Path(name).stem
    m = re.match(r"^(.*)__f\d+$", stem)
    return m.group(1) if m else stem


def group_of(rel: str, rule: str) -> str:
    """The group (patient, video) of the file at ``rel`` (``<class>/.../<name>``, POSIX) by ``rule``:
    ``folder`` = the first folder below the class (``<class>/<patient>/...``), ``frame`` = the
    ``<video>__f<frame>`` name rule of ``utils.pocus_folds``, else a regular expression
    searched in the file name whose first group is the group (a name it misses is its own group)."""
    parts = rel.split("/")
    if rule == "folder":
        return parts[1] if len(parts) > 2 else parts[-1]
    if rule == "frame":
        return group_from_png_name(parts[-1])
    m = re.search(rule, parts[-1])
    return m.group(1) if m and m.groups() else parts[-1]


def make_split(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (1..k) of every item: stratified by class, one group never in two folds
    (sklearn's StratifiedGroupKFold, shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < k:
        raise DataError(f"{len(np.unique(groups))} groups cannot fill {k} folds; lower --folds")
    fold = np.zeros(len(labels), np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups), start=1):
        fold[test] = f
    return fold


def split_problems(rows: list[dict], classes: tuple[str, ...], k: int) -> tuple[str | None, list[str]]:
    """(error, notes) of a split table: a class missing from some fold's training part is an
    error (its classifier could never predict it); a class absent from a test fold, a note."""
    present = [{r["class"] for r in rows if int(r["fold"]) == f} for f in range(1, k + 1)]
    notes = []
    for f in range(1, k + 1):
        train = set().union(*(present[j] for j in range(k) if j != f - 1))
        lacking = [c for c in classes if c not in train]
        if lacking:
            return (f"fold {f}'s training part (the other folds) has no images of class '{lacking[0]}'; "
                    "every class needs images in at least two folds"), notes
        absent = [c for c in classes if c not in present[f - 1]]
        if absent:
            notes.append(f"fold {f}: no test images of class {absent}; this fold's macro-F1 averages the "
                         "classes present")
    return None, notes


def write_split_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=("file", "class", "group", "fold"), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def read_split(path: Path) -> list[dict]:
    """Rows of a split file, each checked (file, class, group, fold >= 1)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the split ({e})") from None
    if not rows or set(rows[0]) != {"file", "class", "group", "fold"}:
        raise DataError(f"{path}: a split file has the columns file,class,group,fold")
    for i, r in enumerate(rows, start=2):
        if not str(r["fold"]).isdigit() or int(r["fold"]) < 1:
            raise DataError(f"{path}: line {i}: fold {r['fold']!r} is not a number >= 1")
    return rows


def read_groups_csv(path: Path) -> dict[str, str]:
    """``file,group`` rows -> {file: group}; ``file`` relative to the data root or a bare name."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the groups ({e})") from None
    if not rows or not {"file", "group"} <= set(rows[0]):
        raise DataError(f"{path}: a groups file has the columns file,group")
    return {r["file"].replace("\\", "/"): r["group"] for r in rows}
