"""Downstream classification data: the layouts the evaluation reads and the folds it scores.

Three layouts (:func:`discover`):

* ``pickle``: the USCL pickles ``covid_data1..K.pkl``, each ``(X_train, y_train, X_test, y_test)``;
* ``folds``: pre-split image folders ``fold1..K/<class>/*`` (``utils.pocus_folds`` writes them);
* ``imagefolder``: torchvision's ``root/<class>/**/*`` with no split: the folds are made here
  (:func:`make_split`: stratified by class, grouped so that one patient never sits on both
  sides), written to a split file and read back on a re-run (:func:`read_split`).

Images are fitted to the square input by :func:`fit_square` (letterbox by default, the
aspect ratio kept; ``squash`` as before). Nothing here trains or evaluates a model.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from evaluation.splits import (GROUP_RULES, SPLIT_NAME, group_from_png_name, group_of, make_split, read_groups_csv,
                               read_split, split_problems)
from models.encoder_io import NORM_MEAN, NORM_STD
from utils.io import IMAGE_EXTS, DataError, read_image, safe_pickle_load
from utils.pocus_folds import CLASSES as POCUS_CLASSES

NUM_FOLDS = 5  # the USCL convention; --folds changes it


@dataclass
class Fold:
    """One train/test split. ``X_*``: N x 3 x H x W uint8; ``y_*``: N int64 in 0..len(classes)-1."""
    index: int
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    groups_train: np.ndarray | None  # source video of each training image, if known
    source: str
    classes: tuple[str, ...] = POCUS_CLASSES


def check_images(X, source: str, what: str) -> np.ndarray:
    """Validate an image array and return it as N x 3 x H x W uint8 (grey is repeated to 3 channels)."""
    if not isinstance(X, np.ndarray) or X.ndim != 4:
        shape = getattr(X, "shape", None)
        raise DataError(f"{source}: {what} must be a 4-D N x C x H x W array, found "
                        f"{type(X).__name__}{'' if shape is None else ' of shape ' + str(tuple(shape))}")
    if X.shape[1] not in (1, 3):
        hint = " (looks like N x H x W x C; expected channels first)" if X.shape[-1] in (1, 3) else ""
        raise DataError(f"{source}: {what} has shape {X.shape}, expected N x 3 x H x W{hint}")
    if X.dtype != np.uint8:
        raise DataError(f"{source}: {what} has dtype {X.dtype}, expected uint8")
    return np.repeat(X, 3, axis=1) if X.shape[1] == 1 else X


def check_labels(y, n: int, source: str, what: str, classes: tuple[str, ...] = POCUS_CLASSES) -> np.ndarray:
    y = np.asarray(y) if isinstance(y, (np.ndarray, list, tuple)) else None
    if y is None or y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{source}: {what} must be a 1-D numeric array of length {n}")
    if not np.all(np.isin(y, np.arange(len(classes)))):
        raise DataError(f"{source}: {what} holds labels {sorted(set(np.unique(y).tolist()))[:6]}, "
                        f"expected 0..{len(classes) - 1} ({', '.join(classes)})")
    return y.astype(np.int64)


def check_uscl_tuple(obj, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate a loaded USCL pickle ``(X_train, y_train, X_test, y_test)``."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 4:
        raise DataError(f"{source}: expected a tuple (X_train, y_train, X_test, y_test), "
                        f"found {type(obj).__name__}{' of length ' + str(len(obj)) if isinstance(obj, (tuple, list)) else ''}")
    Xtr, Xte = check_images(obj[0], source, "X_train"), check_images(obj[2], source, "X_test")
    if Xtr.shape[1:] != Xte.shape[1:]:
        raise DataError(f"{source}: X_train images {Xtr.shape[1:]} and X_test images {Xte.shape[1:]} differ")
    return (Xtr, check_labels(obj[1], len(Xtr), source, "y_train"),
            Xte, check_labels(obj[3], len(Xte), source, "y_test"))


def _manifest_groups(root: Path, k: int, y_train: np.ndarray) -> np.ndarray | None:
    """Training-set source ids of fold ``k`` from ``manifest.csv`` beside the pickles, if it matches."""
    path = root / "manifest.csv"
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as f:
            rows = [(r["source"], int(r["fold"]), int(r["label"])) for r in csv.DictReader(f)]
    except (KeyError, ValueError):
        return None
    rows = [r for r in rows if r[1] != k]
    if len(rows) != len(y_train) or any(r[2] != y for r, y in zip(rows, y_train)):
        return None  # not the manifest of these pickles: fall back to a frame-level split
    return np.array([r[0] for r in rows])


def discover(data_path: Path, folds: int = NUM_FOLDS) -> tuple[str, Path]:
    """``('pickle' | 'folders' | 'imagefolder', root)`` for a data folder, or a DataError
    saying what is there. Use :func:`open_data` to validate everything before any work."""
    if not data_path.exists():
        raise DataError(f"{data_path}: data path not found")
    if data_path.is_file():
        raise DataError(f"{data_path}: expected a folder holding covid_data1..{folds}.pkl, fold1..{folds}/ "
                        "or <class>/ folders of images")
    if (data_path / "covid_data1.pkl").exists():
        missing = [k for k in range(1, folds + 1) if not (data_path / f"covid_data{k}.pkl").is_file()]
        if missing:
            raise DataError(f"{data_path}: covid_data{missing[0]}.pkl missing (need covid_data1..{folds}.pkl)")
        return "pickle", data_path
    for root in (data_path / "images", data_path):
        if (root / "fold1").is_dir():
            missing = [k for k in range(1, folds + 1) if not (root / f"fold{k}").is_dir()]
            if missing:
                raise DataError(f"{root}: fold{missing[0]}/ missing (need fold1..{folds}/)")
            return "folders", root
    if any(d.is_dir() and _image_files(d) for d in data_path.iterdir() if not d.name.startswith(".")):
        return "imagefolder", data_path
    raise DataError(f"{data_path}: neither USCL pickles (covid_data1..{folds}.pkl), nor fold1..{folds}/<class>/, "
                    "nor <class>/ folders of images found")


def _image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted), hidden files left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _unread_files(folders: list[Path]) -> list[Path]:
    return [p for d in folders if d.is_dir() for p in sorted(d.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)
            and p.suffix.lower() not in IMAGE_EXTS]


def _unread_note(root: Path, skipped: list[Path]) -> list[str]:
    if not skipped:
        return []
    kinds = sorted({p.suffix.lower() or "(no extension)" for p in skipped})
    return [f"{root}: {len(skipped)} file(s) not read, e.g. {skipped[0]} (extensions {kinds}; "
            f"read: {', '.join(IMAGE_EXTS)})"]


def folder_classes(root: Path, fold_dirs: list[Path] | None = None) -> tuple[str, ...]:
    """Class names: ``root/classes.txt`` (one per line, in label order) or else the sorted
    names of the class folders (of ``fold_dirs`` in the pre-split layout, of ``root`` in an
    ImageFolder)."""
    listed = root / "classes.txt"
    if listed.is_file():
        names = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
        if len(set(names)) != len(names):
            raise DataError(f"{listed}: a class is listed twice")
    else:
        names = tuple(sorted({d.name for f in (fold_dirs or [root]) for d in f.iterdir()
                              if d.is_dir() and not d.name.startswith(".") and _image_files(d)}))
    if len(names) < 2:
        raise DataError(f"{root}: found {len(names)} class(es) {list(names)}; need at least 2 "
                        "(<class>/ folders of images, or classes.txt)")
    return names


def fit_square(img: np.ndarray, size: int, resize: str = "letterbox", pad_value: int = 0) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3. ``letterbox``: the longer side to ``size``, the aspect
    ratio kept, centred on ``pad_value``; ``squash``: both sides to ``size`` (the aspect lost)."""
    import cv2

    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
    if resize == "squash":
        return cv2.resize(img, (size, size), interpolation=interp)
    s = size / max(h, w)
    nh, nw = min(size, max(1, round(h * s))), min(size, max(1, round(w * s)))
    out = np.full((size, size) + img.shape[2:], pad_value, img.dtype)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y:y + nh, x:x + nw] = cv2.resize(img, (nw, nh), interpolation=interp).reshape((nh, nw) + img.shape[2:])
    return out


def _read_images(paths: list[Path], size: int, resize: str, pad_value: int) -> np.ndarray:
    return np.stack([fit_square(read_image(p, "rgb"), size, resize, pad_value) for p in paths]
                    ).transpose(0, 3, 1, 2).copy()


def _read_fold_folder(folder: Path, classes: tuple[str, ...], img_size: int, resize: str = "letterbox",
                      pad_value: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (fitted to ``img_size`` x ``img_size``), labels and source ids of one ``fold<k>/<class>/*``."""
    unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise DataError(f"{folder / unknown[0]}: class folder not in the class list {list(classes)}")
    paths, labels, groups = [], [], []
    for ci, cls in enumerate(classes):
        for p in _image_files(folder / cls) if (folder / cls).is_dir() else []:
            paths.append(p)
            labels.append(ci)
            groups.append(f"{cls}/{group_from_png_name(p.name)}")
    if not paths:
        raise DataError(f"{folder}: no images in {'/, '.join(classes)}/")
    return _read_images(paths, img_size, resize, pad_value), np.array(labels, dtype=np.int64), np.array(groups)


# --------------------------------------------------------------------------- #
# one entry point: validate everything before any work, then yield the folds
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class DataOptions:
    """How the evaluation reads a data set (all of it from the command line)."""
    folds: int = NUM_FOLDS
    resize: str = "letterbox"          # letterbox | squash
    pad_value: int = 0
    groups: str | None = None          # ImageFolder: a CSV file,group
    group_rule: str | None = None      # ImageFolder: folder | frame | a regular expression
    split_seed: int = 0                # ImageFolder: the fold assignment (shared by every encoder and seed)
    split: str | None = None           # ImageFolder: a split file to use (default <out_dir>/split.csv)


@dataclass
class DownstreamData:
    """A validated data set: its classes, the notes to print before any work, and its folds."""
    kind: str
    root: Path
    classes: tuple[str, ...]
    options: DataOptions
    notes: list[str] = field(default_factory=list)
    rows: list[dict] | None = None     # ImageFolder: the split
    split_path: Path | None = None
    _decoded: dict = field(default_factory=dict, repr=False)  # img_size -> the decoded images, read once

    @property
    def num_folds(self) -> int:
        return self.options.folds

    def info(self) -> dict:
        """What the results JSON records about the data."""
        out = {"layout": self.kind, "folds": self.num_folds, "resize": self.options.resize,
               "pad_value": self.options.pad_value if self.options.resize == "letterbox" else None,
               "class_counts": self.class_counts()}
        if self.rows is not None:
            out |= {"split_file": str(self.split_path), "split_seed": self.options.split_seed,
                    "groups": len({r["group"] for r in self.rows})}
        return out

    def class_counts(self) -> dict[str, int] | None:
        if self.rows is None:
            return None
        return {c: sum(r["class"] == c for r in self.rows) for c in self.classes}

    def iter_folds(self, img_size: int = 224):
        """Yield the :class:`Fold` objects one at a time."""
        k, o = self.num_folds, self.options
        if self.kind == "pickle":
            for f in range(1, k + 1):
                path = self.root / f"covid_data{f}.pkl"
                Xtr, ytr, Xte, yte = check_uscl_tuple(safe_pickle_load(path), str(path))
                yield Fold(f, Xtr, ytr, Xte, yte, _manifest_groups(self.root, f, ytr), str(path))
            return
        if self.kind == "folders":
            if img_size not in self._decoded:  # the features pass and every protocol share one read
                self._decoded[img_size] = [_read_fold_folder(self.root / f"fold{f}", self.classes, img_size,
                                                             o.resize, o.pad_value) for f in range(1, k + 1)]
            per_fold = self._decoded[img_size]
            for f in range(1, k + 1):
                train = [x for j, x in enumerate(per_fold, start=1) if j != f]
                yield Fold(f, np.concatenate([x[0] for x in train]), np.concatenate([x[1] for x in train]),
                           per_fold[f - 1][0], per_fold[f - 1][1], np.concatenate([x[2] for x in train]),
                           str(self.root / f"fold{f}"), self.classes)
            return
        if img_size not in self._decoded:
            self._decoded[img_size] = _read_images([self.root / r["file"] for r in self.rows], img_size,
                                                   o.resize, o.pad_value)
        X = self._decoded[img_size]
        y = np.array([self.classes.index(r["class"]) for r in self.rows], np.int64)
        groups = np.array([r["group"] for r in self.rows])
        fold = np.array([int(r["fold"]) for r in self.rows])
        for f in range(1, k + 1):
            tr, te = fold != f, fold == f
            yield Fold(f, X[tr], y[tr], X[te], y[te], groups[tr], f"{self.split_path} fold {f}", self.classes)


def open_data(data_path: str | Path, options: DataOptions = DataOptions(),
              out_dir: str | Path | None = None) -> DownstreamData:
    """Validate a data set before any training and return it.

    A bad ``covid_data4.pkl`` is found here, not after folds 1-3 have trained; a class
    without training images in some fold is an error; what the evaluation will pass over
    or score differently is a note (files it does not read, folders beyond the folds, a
    class absent from a test fold, a split made per image). An ImageFolder gets its split
    here: read from ``options.split``, or from ``<out_dir>/split.csv`` when a run there made
    one, or made and written there (the caller writes :attr:`DownstreamData.rows`).
    """
    k = options.folds
    kind, root = discover(Path(data_path), k)
    data = DownstreamData(kind, root, POCUS_CLASSES, options)
    if kind == "pickle":
        for f in range(1, k + 1):
            path = root / f"covid_data{f}.pkl"
            y_test = check_uscl_tuple(safe_pickle_load(path), str(path))[3]
            absent = [c for i, c in enumerate(POCUS_CLASSES) if not (y_test == i).any()]
            if absent:
                data.notes.append(f"{path}: no test images of class {absent}; this fold's macro-F1 averages "
                                  "the classes present")
        return data
    if kind == "folders":
        fold_dirs = [root / f"fold{f}" for f in range(1, k + 1)]
        data.classes = folder_classes(root, fold_dirs)
        unknown = sorted(d.name for fd in fold_dirs for d in fd.iterdir()
                         if d.is_dir() and not d.name.startswith(".") and d.name not in data.classes)
        if unknown:
            raise DataError(f"{root}: class folder '{unknown[0]}' not in the class list {list(data.classes)}")
        rows = [{"class": c, "fold": f} for f, fd in enumerate(fold_dirs, start=1) for c in data.classes
                if (fd / c).is_dir() and _image_files(fd / c)]
        error, notes = split_problems(rows, data.classes, k)
        if error:
            raise DataError(f"{root}: {error}")
        data.notes += [f"{root}: {n}" for n in notes]
        extra = sorted(d.name for d in root.glob("fold*")
                       if d.is_dir() and d.name not in {f"fold{f}" for f in range(1, k + 1)})
        if extra:
            data.notes.append(f"{root}: {', '.join(extra)} not used (the evaluation reads fold1..{k}; see --folds)")
        data.notes += _unread_note(root, _unread_files([fd / c for fd in fold_dirs for c in data.classes]))
        return data
    return _open_image_folder(data, out_dir)


def _open_image_folder(data: DownstreamData, out_dir: str | Path | None) -> DownstreamData:
    root, o = data.root, data.options
    data.classes = folder_classes(root)
    files = [(p.relative_to(root).as_posix(), c) for c in data.classes for p in _image_files(root / c)]
    data.notes += _unread_note(root, _unread_files([root / c for c in data.classes]))
    given = Path(o.split) if o.split else None
    beside = Path(out_dir) / SPLIT_NAME if out_dir is not None else None
    source = given if given is not None else (beside if beside is not None and beside.is_file() else None)
    if source is not None:
        rows = read_split(source)
        listed, found = {r["file"] for r in rows}, {f for f, _ in files}
        if listed != found:
            gone, new = sorted(listed - found), sorted(found - listed)
            raise DataError(f"{source}: the split does not match {root}: {len(gone)} of its files are gone"
                            f"{' (e.g. ' + gone[0] + ')' if gone else ''}, {len(new)} files are not in it"
                            f"{' (e.g. ' + new[0] + ')' if new else ''}; delete it to split again")
        wrong = next((r for r in rows if r["class"] != r["file"].split("/")[0]), None)
        if wrong is not None:
            raise DataError(f"{source}: {wrong['file']} is listed under class {wrong['class']!r}")
        folds = {int(r["fold"]) for r in rows}
        if folds != set(range(1, o.folds + 1)):
            raise DataError(f"{source}: the split has folds {sorted(folds)}, this run asks for --folds {o.folds}")
        asked, how = _groups([r["file"] for r in rows], o)
        if asked is not None and _partition(asked) != _partition([r["group"] for r in rows]):
            flag = "--groups" if o.groups else "--group_rule"
            fix = ("pass another --split" if given is not None else "delete it to split again")
            raise DataError(f"{source}: the split was made with other groups than {flag} gives ({how}); "
                            f"{fix}, or leave out {flag} to use the split as it is")
        data.notes.append(f"{root}: the split of {source} ({o.folds} folds)")
    else:
        rel = [f for f, _ in files]
        groups, how = _groups(rel, o)
        if groups is None:
            groups = rel
            data.notes.append(f"{root}: the split is per image (no --groups CSV or --group_rule): images of one "
                              "patient or video may sit on both sides of a fold")
        labels = np.array([data.classes.index(c) for _, c in files])
        try:  # a patient of two classes stays whole: groups are not split by class
            fold = make_split(labels, np.array(groups), o.folds, o.split_seed)
        except DataError as e:
            raise DataError(f"{root}: {e}") from None
        rows = [{"file": f, "class": c, "group": g, "fold": int(k)} for (f, c), g, k in zip(files, groups, fold)]
        data.notes.append(f"{root}: {len(rows)} images, {len(set(groups))} groups ({how}) split into "
                          f"{o.folds} stratified folds (seed {o.split_seed})")
    error, notes = split_problems(rows, data.classes, o.folds)
    if error:
        raise DataError(f"{source or root}: {error}")
    data.notes += [f"{root}: {n}" for n in notes]
    data.rows, data.split_path = rows, (source or beside)
    return data


def _groups(files: list[str], o: DataOptions) -> tuple[list[str] | None, str]:
    """The group of each file (relative path) by ``--groups`` or ``--group_rule``, and how it was
    made; (None, "per image") without either."""
    if o.groups:
        table = read_groups_csv(Path(o.groups))
        by_name: dict[str, str | None] = {}
        for f, g in table.items():
            name = f.rsplit("/", 1)[-1]
            by_name[name] = g if name not in by_name else None  # a bare name that is not unique: no
        missing = [f for f in files if f not in table and by_name.get(f.rsplit("/", 1)[-1]) is None]
        if missing:
            raise DataError(f"{o.groups}: no group for {len(missing)} image(s), e.g. {missing[0]}")
        return [table.get(f) or by_name[f.rsplit("/", 1)[-1]] for f in files], f"groups from {o.groups}"
    if o.group_rule:
        if o.group_rule not in GROUP_RULES:
            try:
                if re.compile(o.group_rule).groups < 1:
                    raise DataError(f"--group_rule {o.group_rule!r}: the expression needs a (group)")
            except re.error as e:
                raise DataError(f"--group_rule {o.group_rule!r}: not a regular expression ({e})") from None
        return [group_of(f, o.group_rule) for f in files], f"groups by the rule {o.group_rule!r}"
    return None, "per image"


def _partition(groups: list[str]) -> set[frozenset[int]]:
    """Which positions share a group, whatever the groups are called."""
    members: dict[str, set[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, set()).add(i)
    return {frozenset(m) for m in members.values()}


def iter_folds(data_path: str | Path, img_size: int = 224, options: DataOptions = DataOptions()):
    """Yield the :class:`Fold` objects of ``data_path`` one at a time."""
    yield from open_data(data_path, options).iter_folds(img_size)


class ArrayDataset(Dataset):
    """``X``: N x 3 x H x W uint8 -> (transformed 3 x S x S float tensor, label)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, transform):
        self.X, self.y, self.transform = X, y, transform

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.transform(torch.from_numpy(self.X[i])), int(self.y[i])


def make_transforms(img_size: int, train: bool):
    """The paper's transforms (train: Resize -> RandomResizedCrop + flip; test: Resize)."""
    ops = [v2.Resize(img_size, antialias=True)]
    if train:
        ops += [v2.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.8, 1.25), antialias=True),
                v2.RandomHorizontalFlip()]
    else:
        ops += [v2.CenterCrop(img_size)]  # no-op for square inputs; makes non-square ones square
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(NORM_MEAN, NORM_STD)]
    return v2.Compose(ops)


def carve_validation(y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int):
    """Split training indices into (train, val), stratified by class and grouped by video if known."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1.0 / fraction)))
    g = groups if groups is not None else np.arange(len(y))
    tr, va = next(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, g))
    return tr, va
