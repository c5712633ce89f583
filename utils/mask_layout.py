"""The mask hand-off between the stages: the one owner of the pre-training corpus layout.

    <root>/<split>/<Sub>/img/<rel>            images at any depth below img/ (IMAGE_EXTS)
    <root>/<split>/<Sub>/label/<rel>.png      their label PNGs (``<rel>`` with its extension
                                              replaced): stage 3 writes them
                                              (SAM/infer_masks.py, utils/superpixel_masks.py)
    <root>/masks/<mask name>                  one mask pickle per labelled image: stage 4
                                              (utils/generate_masks_pkls.py) writes them
    <root>/<split>_tf_img_to_gt.pkl           the [image_path, mask_pkl_path] pair list that
                                              stage 5 (pretraining/data.py) reads

* ``<Sub>`` is any folder of ``<root>/<split>`` that holds an ``img/`` folder; images are
  found recursively and in sorted order (:func:`find_images`), by every stage alike.
* The mask name is ``<Sub>_<stem>_gt.pkl`` for an image directly in ``img/`` (upstream's name,
  so existing corpora stay valid) and ``<Sub>/<folders>/<stem>_gt.pkl`` for one in a
  sub-folder (:func:`mask_rel`): two images with the same stem in different folders get
  different masks.
* A mask pickle holds the label's H x W integer index map (0 = background, 1..K anatomies,
  ids kept; :func:`utils.io.read_label` turns a 0/255 binary label into 0/1): uint8 when the
  ids fit, int32 otherwise (:func:`mask_from_label`).
* The pair list holds paths relative to ``<root>`` (absolute ones stay as they are) and is
  read with the restricted unpickler of :func:`utils.io.safe_pickle_load`.
* An image's extension is in neither its label's nor its mask's name: ``a.png`` and ``a.jpg``
  in one folder would share both (as they always have).

The functions of the first two sections only compute; :func:`find_images`,
:func:`label_jobs`, :func:`write_mask`, :func:`load_mask`, :func:`write_pairs` and
:func:`load_pairs` touch the disk.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath, PurePosixPath
from typing import NamedTuple, Sequence

import numpy as np

from utils.io import IMAGE_EXTS, DataError, atomic_pickle_dump, ensure_writable_dir, safe_pickle_load

IMG_DIR = "img"
LABEL_DIR = "label"
LABEL_EXT = ".png"
MASKS_DIR = "masks"
MASK_SUFFIX = "_gt.pkl"
PAIRS_SUFFIX = "_tf_img_to_gt.pkl"
DEFAULT_SPLIT = "train"


class ImageEntry(NamedTuple):
    """One image of the corpus: its subset, its path below ``<Sub>/img`` and its full path."""
    sub: str
    rel: PurePath
    path: Path


# --------------------------------------------------------------------------- #
# paths (pure)
# --------------------------------------------------------------------------- #
def split_dir(root: str | os.PathLike, split: str = DEFAULT_SPLIT) -> Path:
    """``<root>/<split>``: the folder of ``<Sub>/img`` folders (stage 3's ``--data_dir``)."""
    return Path(root) / (split or DEFAULT_SPLIT)


def is_image(path: str | os.PathLike) -> bool:
    """Whether the file name has an extension the data tools read (:data:`IMAGE_EXTS`)."""
    return PurePath(path).suffix.lower() in IMAGE_EXTS


def label_rel(rel: str | os.PathLike) -> PurePath:
    """An image's path below ``img/`` -> its label's path below ``label/`` (extension .png)."""
    return PurePath(rel).with_suffix(LABEL_EXT)


def label_path(data_dir: str | os.PathLike, sub: str, rel: str | os.PathLike, folder: str = LABEL_DIR) -> Path:
    """``<data_dir>/<sub>/<folder>/<rel>.png``: the label of ``<data_dir>/<sub>/img/<rel>``
    (``data_dir`` a ``<root>/<split>`` folder or stage 3's ``--out_dir``)."""
    return Path(data_dir) / sub / folder / label_rel(rel)


def mask_rel(sub: str, rel: str | os.PathLike) -> PurePosixPath:
    """The mask pickle of ``<Sub>/img/<rel>``, relative to the masks folder.

    ``a.png`` -> ``<sub>_a_gt.pkl`` (today's name); ``x/y/a.png`` -> ``<sub>/x/y/a_gt.pkl``: the
    folders are kept, so the name is unique per image (an image's extension is not part of it,
    as its label's is not).
    """
    rel = PurePath(rel)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{rel}: expected a path below <Sub>/{IMG_DIR}/")
    name = rel.stem + MASK_SUFFIX
    if len(rel.parts) == 1:
        return PurePosixPath(f"{sub}_{name}")
    return PurePosixPath(sub, *rel.parts[:-1], name)


def masks_dir(root: str | os.PathLike) -> Path:
    """``<root>/masks``: the default folder of the mask pickles."""
    return Path(root) / MASKS_DIR


def mask_path(masks: str | os.PathLike, sub: str, rel: str | os.PathLike) -> Path:
    """The mask pickle of ``<Sub>/img/<rel>`` in the folder ``masks``."""
    return Path(masks) / mask_rel(sub, rel)


def pairs_file(root: str | os.PathLike, split: str = DEFAULT_SPLIT) -> Path:
    """``<root>/<split>_tf_img_to_gt.pkl``: the pair list of one split."""
    return Path(root) / f"{split or DEFAULT_SPLIT}{PAIRS_SUFFIX}"


# --------------------------------------------------------------------------- #
# contents (pure)
# --------------------------------------------------------------------------- #
def mask_from_label(label: np.ndarray) -> np.ndarray:
    """H x W index map -> what a mask pickle holds: uint8 when the ids fit, int32 otherwise."""
    return label.astype(np.uint8 if label.max(initial=0) < 256 else np.int32)


def check_mask(mask, image_shape: tuple[int, int], where: str | os.PathLike) -> np.ndarray:
    """``mask`` if it is a 2-D, non-negative integer map of ``image_shape`` (H, W); else a
    :class:`DataError` naming ``where``."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{where}: expected a 2-D integer label map, found "
                        f"{type(mask).__name__} {getattr(mask, 'shape', '')} {getattr(mask, 'dtype', '')}")
    if mask.shape != tuple(image_shape):
        raise DataError(f"{where}: mask size {mask.shape} differs from its image's size {tuple(image_shape)}")
    if mask.min(initial=0) < 0:
        raise DataError(f"{where}: negative label ids")
    return mask


def pair_entries(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
                 root: str | os.PathLike) -> list[list[str]]:
    """(image, mask pickle) paths -> the pair list's ``[image_path, mask_pkl_path]`` entries,
    relative to ``root``."""
    return [[os.path.relpath(img, root), os.path.relpath(mask, root)] for img, mask in pairs]


def check_pair_list(entries, where: str | os.PathLike) -> list[tuple[str, str]]:
    """A loaded pair list -> its ``(image_path, mask_pkl_path)`` strings; anything but a
    non-empty list of string pairs is a :class:`DataError` naming ``where``."""
    if not isinstance(entries, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in entries):
        raise DataError(f"{where}: expected a list of [image_path, mask_pkl_path] string pairs")
    if not entries:
        raise DataError(f"{where}: the pair list is empty")
    return [(a, b) for a, b in entries]


def resolve_pairs(entries: Sequence[tuple[str, str]], root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair-list entries -> paths: relative ones are relative to ``root``, absolute ones stay."""
    root = Path(root)
    return [(root / a, root / b) for a, b in entries]


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def find_images(data_dir: str | os.PathLike) -> list[ImageEntry]:
    """Every image under ``<data_dir>/<Sub>/img/`` (``data_dir`` a ``<root>/<split>`` folder),
    at any depth, sorted by subset, then by path."""
    found = []
    for img_dir in sorted(p for p in Path(data_dir).glob(f"*/{IMG_DIR}") if p.is_dir()):
        sub = img_dir.parent.name
        for f in sorted(img_dir.rglob("*")):
            if is_image(f) and f.is_file():
                found.append(ImageEntry(sub, f.relative_to(img_dir), f))
    return found


def label_jobs(data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label) paths of stage 3: every image of :func:`find_images` under ``data_dir``
    (a ``<root>/<split>`` folder) with its label in ``out_dir`` (``out_dir/<Sub>/label/<rel>.png``)."""
    return [(e.path, label_path(out_dir, e.sub, e.rel)) for e in find_images(data_dir)]


def ensure_label_dirs(jobs: Sequence[tuple[Path, Path]]) -> None:
    """Create and check every folder the labels of ``jobs`` go to, before any masking: a
    ``<Sub>/label`` that is a file, or cannot be written, is one line now, not after hours."""
    for folder in sorted({label.parent for _, label in jobs}):
        ensure_writable_dir(folder, "label folder")


def write_mask(label: np.ndarray, path: str | os.PathLike) -> None:
    """Write an H x W index map as a mask pickle (atomically, in :func:`mask_from_label`'s dtype)."""
    atomic_pickle_dump(mask_from_label(label), path)


def load_mask(path: str | os.PathLike, image_shape: tuple[int, int]) -> np.ndarray:
    """Read a mask pickle and check it against its image's (H, W)."""
    return check_mask(safe_pickle_load(path), image_shape, path)


def write_pairs(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], root: str | os.PathLike,
                path: str | os.PathLike | None = None) -> Path:
    """Write the pair list (paths relative to ``root``) to ``path`` (default
    :func:`pairs_file` of the train split); returns where it went."""
    path = Path(path) if path is not None else pairs_file(root)
    atomic_pickle_dump(pair_entries(pairs, root), path)
    return path


def load_pairs(image_dir: str | os.PathLike, subset: str = DEFAULT_SPLIT) -> list[tuple[Path, Path]]:
    """Read ``<image_dir>/<subset>_tf_img_to_gt.pkl`` -> (image, mask pickle) paths."""
    path = pairs_file(image_dir, subset)
    if not path.is_file():
        raise DataError(f"{path}: pair list not found; run utils/generate_masks_pkls.py first "
                        "(or check data.image_dir / data.subset in the config)")
    return resolve_pairs(check_pair_list(safe_pickle_load(path), path), image_dir)
