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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

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


def group_from_png_name(name: str) -> str:
    """Source video of a frame PNG named ``<stem>__f<frame>.png`` (utils.pocus_folds); else the stem."""
    stem = Path(name).stem
    m = re.match(r"^(.*)__f\d+$", stem)
    return m.group(1) if m else stem


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


def discover(data_path: Path) -> tuple[str, Path]:
    """``('pickle' | 'folders', root)`` for a data folder, or a DataError saying what is there.

    Use :func:`check_data` to validate every fold before any work."""
    if not data_path.exists():
        raise DataError(f"{data_path}: data path not found")
    if data_path.is_file():
        raise DataError(f"{data_path}: expected a folder holding covid_data1..5.pkl or fold1..5/")
    if (data_path / "covid_data1.pkl").exists():
        missing = [k for k in range(1, NUM_FOLDS + 1) if not (data_path / f"covid_data{k}.pkl").is_file()]
        if missing:
            raise DataError(f"{data_path}: covid_data{missing[0]}.pkl missing (need covid_data1..{NUM_FOLDS}.pkl)")
        return "pickle", data_path
    for root in (data_path / "images", data_path):
        if (root / "fold1").is_dir():
            missing = [k for k in range(1, NUM_FOLDS + 1) if not (root / f"fold{k}").is_dir()]
            if missing:
                raise DataError(f"{root}: fold{missing[0]}/ missing (need fold1..{NUM_FOLDS}/)")
            return "folders", root
    raise DataError(f"{data_path}: neither USCL pickles (covid_data1..5.pkl) nor an image-folder layout "
                    "(fold1..5/<class>/*.png) found")


def folder_classes(root: Path) -> tuple[str, ...]:
    """Class names of an image-folder layout: ``classes.txt`` (one per line, in label order)
    or else the sorted names of the class folders found in ``fold1..5``."""
    listed = root / "classes.txt"
    if listed.is_file():
        names = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
        if len(set(names)) != len(names):
            raise DataError(f"{listed}: a class is listed twice")
    else:
        names = tuple(sorted({d.name for k in range(1, NUM_FOLDS + 1) for d in (root / f"fold{k}").iterdir()
                              if d.is_dir()}))
    if len(names) < 2:
        raise DataError(f"{root}: found {len(names)} class(es) {list(names)}; need at least 2 "
                        "(fold<k>/<class>/*.png, or classes.txt)")
    return names


def _read_fold_folder(folder: Path, classes: tuple[str, ...], img_size: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (resized to ``img_size`` x ``img_size``), labels and source ids of one ``fold<k>/<class>/*``."""
    import cv2

    unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise DataError(f"{folder / unknown[0]}: class folder not in the class list {list(classes)}")
    imgs, labels, groups = [], [], []
    for ci, cls in enumerate(classes):
        for p in sorted((folder / cls).glob("*")) if (folder / cls).is_dir() else []:
            if p.suffix.lower() not in IMAGE_EXTS:
                continue  # named by data_notes() before any work
            img = read_image(p, "rgb")
            if img.shape[:2] != (img_size, img_size):
                img = cv2.resize(img, (img_size, img_size), interpolation=cv2.INTER_AREA)
            imgs.append(img)
            labels.append(ci)
            groups.append(f"{cls}/{group_from_png_name(p.name)}")
    if not imgs:
        raise DataError(f"{folder}: no images in {'/, '.join(classes)}/")
    return np.stack(imgs).transpose(0, 3, 1, 2).copy(), np.array(labels, dtype=np.int64), np.array(groups)


def _class_images(folder: Path) -> list[Path]:
    """The files of one ``fold<k>/<class>/`` folder that the evaluation reads."""
    return [p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]


def check_data(data_path: str | Path) -> tuple[tuple[str, ...], list[str]]:
    """Validate every fold of ``data_path`` before any training.

    -> (class names, notes): a bad ``covid_data4.pkl`` is found here, not after folds 1-3
    have trained; in the folder layout a class without training images in some fold is an
    error, and what the evaluation will pass over or score differently is a note (one line
    each, printed before any work): files it does not read, folders beyond ``fold1..5``, a
    class absent from a test fold (its macro-F1 then averages the classes present).
    """
    kind, root = discover(Path(data_path))
    notes: list[str] = []
    if kind == "pickle":
        for k in range(1, NUM_FOLDS + 1):
            path = root / f"covid_data{k}.pkl"
            y_test = check_uscl_tuple(safe_pickle_load(path), str(path))[3]
            absent = [c for i, c in enumerate(POCUS_CLASSES) if not (y_test == i).any()]
            if absent:
                notes.append(f"{path}: no test images of class {absent}; this fold's macro-F1 averages "
                             "the classes present")
        return POCUS_CLASSES, notes
    classes = folder_classes(root)
    present = [{c for c in classes if (root / f"fold{k}" / c).is_dir() and _class_images(root / f"fold{k}" / c)}
               for k in range(1, NUM_FOLDS + 1)]
    for k in range(1, NUM_FOLDS + 1):
        train = set().union(*(present[j - 1] for j in range(1, NUM_FOLDS + 1) if j != k))
        lacking = [c for c in classes if c not in train]
        if lacking:
            raise DataError(f"{root}: fold {k}'s training part (the other folds) has no images of class "
                            f"'{lacking[0]}'; every class needs images in at least two folds")
        absent = [c for c in classes if c not in present[k - 1]]
        if absent:
            notes.append(f"{root / f'fold{k}'}: no test images of class {absent}; this fold's macro-F1 "
                         "averages the classes present")
    extra = sorted(d.name for d in root.glob("fold*")
                   if d.is_dir() and d.name not in {f"fold{k}" for k in range(1, NUM_FOLDS + 1)})
    if extra:
        notes.append(f"{root}: {', '.join(extra)} not used (the evaluation reads fold1..{NUM_FOLDS})")
    skipped = [p for k in range(1, NUM_FOLDS + 1) for c in classes if (root / f"fold{k}" / c).is_dir()
               for p in (root / f"fold{k}" / c).glob("*")
               if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTS]
    if skipped:
        kinds = sorted({p.suffix.lower() or "(no extension)" for p in skipped})
        notes.append(f"{root}: {len(skipped)} file(s) not read, e.g. {skipped[0]} (extensions {kinds}; "
                     f"read: {', '.join(IMAGE_EXTS)})")
    return classes, notes


def iter_folds(data_path: str | Path, img_size: int = 224):
    """Yield the 5 :class:`Fold` objects one at a time (each USCL pickle holds the full set)."""
    kind, root = discover(Path(data_path))
    if kind == "pickle":
        for k in range(1, NUM_FOLDS + 1):
            path = root / f"covid_data{k}.pkl"
            Xtr, ytr, Xte, yte = check_uscl_tuple(safe_pickle_load(path), str(path))
            yield Fold(k, Xtr, ytr, Xte, yte, _manifest_groups(root, k, ytr), str(path))
        return
    classes = folder_classes(root)
    per_fold = [_read_fold_folder(root / f"fold{k}", classes, img_size) for k in range(1, NUM_FOLDS + 1)]
    for k in range(1, NUM_FOLDS + 1):
        train = [f for j, f in enumerate(per_fold, start=1) if j != k]
        yield Fold(k, np.concatenate([f[0] for f in train]), np.concatenate([f[1] for f in train]),
                   per_fold[k - 1][0], per_fold[k - 1][1], np.concatenate([f[2] for f in train]),
                   str(root / f"fold{k}"), classes)


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
