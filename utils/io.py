"""Safe, atomic file I/O shared by every stage.

* Writes go to a temporary file in the destination folder and are renamed into
  place, so a killed process never leaves a half-written checkpoint or mask.
* Pickles from disk are read with a restricted unpickler that only rebuilds
  numpy arrays and plain Python containers; anything else (code, arbitrary
  classes) is refused with :class:`DataError` naming the file.
* Images are read with OpenCV; a missing or undecodable file is a
  :class:`DataError` naming the file, never an opaque ``NoneType`` crash later.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # what the data tools read


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the process's umask, read once (os.umask can only be read by setting it)
_UMASK = _current_umask()


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and check that files can be written there, before any work.

    Args:
        what: the flag or key that named it (``--out_dir``, ``checkpoint.ckpt_path``), for the message.

    Raises:
        DataError: one line naming ``what`` and ``path`` (a file, or not writable).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write_test.", delete=True)
        probe.close()
    except OSError as e:
        raise DataError(f"{what} {path}: cannot write there ({e.strerror or type(e).__name__})") from None
    return path


# --------------------------------------------------------------------------- #
# atomic writes
# --------------------------------------------------------------------------- #
def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None],
                 before_replace: Callable[[], None] | None = None) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it to ``path``.
    ``before_replace`` runs once the new file is complete on disk, just before the rename
    (a checkpoint rotation: the old file moves aside only when its successor exists).

    The rename is atomic on POSIX file systems: readers see either the old file or
    the complete new one.

    A failure of the file system (a full disk, a folder that cannot be written) is a
    :class:`DataError` naming ``path``; the old file, if any, is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DataError(f"{path}: cannot write there ({e.strerror or type(e).__name__})") from None
    rotated = False
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shared run folder needs the umask's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
            rotated = True
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            kept = ("the file there before was already moved aside by its rotation" if rotated
                    else "the file there before, if any, is unchanged")
            raise DataError(f"{path}: could not be written ({e.strerror or type(e).__name__}); {kept}") from None
        raise


def atomic_pickle_dump(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


def atomic_torch_save(obj: Any, path: str | os.PathLike, before_replace: Callable[[], None] | None = None) -> None:
    import torch

    buf = io.BytesIO()  # serialised first: torch's own writer would turn a full disk into a RuntimeError
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()), before_replace)


def atomic_write_png(image: np.ndarray, path: str | os.PathLike) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"{path}: could not encode image of shape {image.shape} as PNG")
    atomic_write(path, lambda f: f.write(buf.tobytes()))


# --------------------------------------------------------------------------- #
# restricted unpickling
# --------------------------------------------------------------------------- #
# (module, name) pairs a mask or POCUS pickle may reference: numpy array and
# scalar reconstruction under numpy 1.x and 2.x module names, and the codec
# helper protocol-2 pickles use for raw bytes.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy>=2 dtype classes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")


def safe_pickle_load(path: str | os.PathLike) -> Any:
    """Load a pickle that may hold only numpy arrays, numbers, strings and containers.

    Raises:
        DataError: the file is missing, truncated, or references anything else
            (which could run code when unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or corrupt pickle ({e}); only numpy arrays, "
                        "numbers, strings, lists, tuples and dicts are accepted") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- #
# images and label maps
# --------------------------------------------------------------------------- #
def bit_depth_to_uint8(img: np.ndarray) -> np.ndarray:
    """An image of more than 8 bits per sample -> uint8, by its bit depth, not by its own maximum
    (two scans of one probe keep their relative brightness).

    The depth is the smallest of 10, 12, 14 and 16 bits that holds the image's maximum (a
    12-bit scanner stores 0..4095 in a 16-bit PNG), and ``0 .. 2**depth - 1`` maps linearly to
    ``0 .. 255``. uint8 input is returned as it is; any other sample type is a ValueError.
    """
    if img.dtype == np.uint8:
        return img
    if img.dtype != np.uint16:
        raise ValueError(f"{img.dtype} samples (8- or 16-bit integers expected)")
    top = int(img.max(initial=0))
    depth = next(d for d in (10, 12, 14, 16) if top < 2 ** d)
    return np.round(img.astype(np.float64) * (255 / (2 ** depth - 1))).astype(np.uint8)


def read_image(path: str | os.PathLike, mode: str = "rgb") -> np.ndarray:
    """Read an image file as uint8: ``mode='gray'`` -> HxW, ``mode='rgb'`` -> HxWx3.
    A 16-bit file is read at its full depth and scaled by :func:`bit_depth_to_uint8`
    (OpenCV's default would keep only the upper 8 of the 16 bits: a 12-bit scan read as 0..15)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    flag = (cv2.IMREAD_GRAYSCALE if mode == "gray" else cv2.IMREAD_COLOR) | cv2.IMREAD_ANYDEPTH
    img = cv2.imread(str(path), flag)
    if img is None or img.size == 0:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    try:
        img = bit_depth_to_uint8(img)
    except ValueError as e:
        raise DataError(f"{path}: unsupported image: {e}") from None
    if mode == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as an HxW int64 index map (0 = background).

    Binary masks stored as 0/255 become 0/1; index maps are kept as they are.
    A colour label whose three channels differ is refused (it is not an index map).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label not found")
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None or lab.size == 0:
        raise DataError(f"{path}: not a readable label image (corrupt or unsupported format)")
    if lab.ndim == 3:
        if not (np.array_equal(lab[..., 0], lab[..., 1]) and np.array_equal(lab[..., 0], lab[..., 2])):
            raise DataError(f"{path}: colour label image; expected a single-channel index map")
        lab = lab[..., 0]
    return label_to_index_map(lab)


def label_to_index_map(lab: np.ndarray) -> np.ndarray:
    """0/255 binary masks -> 0/1; anything else is taken as an index map already."""
    lab = lab.astype(np.int64)
    values = np.unique(lab)
    if values.size <= 2 and values.max(initial=0) == 255:
        lab = (lab == 255).astype(np.int64)
    return lab
