"""Pre-training data: image + anatomy mask pairs -> two augmented views (+ overlap view).

Two paths to the same views:

* training (``device_augment=True``): the workers only crop, flip and resize
  (:func:`make_crops`, uint8); the photometric augmentation and the Models-Genesis damage
  run batched on the training device inside the step (:mod:`pretraining.augment`);
* per sample (:func:`make_views`): everything on the CPU, one sample at a time; kept as
  the reference the batched path is tested against.

With ``cache="memory"`` every frame and mask is decoded once, before the first epoch, and
kept in RAM (:class:`FrameCache`), instead of reading PNGs and pickles every epoch.

Each mask's ids are renumbered 0..n-1 on load, in order, 0 kept (:func:`relabel_mask`), and
a mask with more than ``max_ids`` ids is refused: the training step works with that fixed
bound instead of reading the largest id back from the device. The method is unchanged by
this: ids only ever meet ids of the same image, an order-keeping renumbering draws the
same regions, and 0 stays the background.

Crop and flip randomness comes from a generator seeded by ``(seed, epoch, index)``,
so a sample is the same whatever the number of loader workers or processes and
a resumed run sees exactly the batches of an uninterrupted one.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the original image, right/bottom
exclusive, everywhere in this module (upstream mixed this up with
``(top, left, h, w)``).
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset, Sampler

from models.encoder_io import NORM_MEAN, NORM_STD  # every view is normalised as the evaluation's input
from utils import mask_layout
from pretraining.context_damage import context_damage
from utils.io import DataError, read_image

log = logging.getLogger(__name__)

#: smallest overlap side (pixels of the original image) for the context term
MIN_OVERLAP = 8
#: (blur probability, solarise probability) of view 1 and view 2: BYOL's asymmetric pair
VIEW_PROBS = ((1.0, 0.0), (0.1, 0.2))
#: the keys of the loader's crops (make_crops) that the step still has to augment
CROP_KEYS = ("crop1", "crop2", "ctx_crop")
#: the most ids a mask may hold when none is given (masks travel as uint8)
MAX_IDS = 256

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------- #
# geometry (pure functions)
# --------------------------------------------------------------------------- #
def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Box of torchvision's RandomResizedCrop: area share in ``scale``, log-uniform aspect ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, x + w, y + h
    # fallback: central crop with the aspect clamped to the range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def overlap_box(a: Box, b: Box, min_size: int = MIN_OVERLAP) -> Box | None:
    """Intersection of two boxes, or None when either side is shorter than ``min_size``."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    if x2 - x1 < min_size or y2 - y1 < min_size:
        return None
    return x1, y1, x2, y2


def crop_resize(array: np.ndarray, box: Box, size: int, nearest: bool = False) -> np.ndarray:
    """Crop ``box`` out of an HxW(xC) array and resize it to size x size."""
    x1, y1, x2, y2 = box
    patch = array[y1:y2, x1:x2]
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def blur_kernel_size(side: int) -> int:
    """The Gaussian blur's kernel: ~10 % of the view side, odd, at least 3 (23 at 224 px)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


# --------------------------------------------------------------------------- #
# masks (pure)
# --------------------------------------------------------------------------- #
class TooManyIds(DataError):
    """A mask with more ids than the configured bound: a setting to change, not a bad file."""


def relabel_mask(mask: np.ndarray, max_ids: int = MAX_IDS, where: str | Path = "mask") -> np.ndarray:
    """Number a label map's ids 0..n-1 in increasing order, 0 kept as 0 (present or not).

    Args:
        mask: (H, W) non-negative integer label map.
        max_ids: the most ids (0 included) allowed; more is a :class:`TooManyIds` naming ``where``.

    Returns:
        (H, W) uint8 (``max_ids`` <= 256).
    """
    if mask.size and int(mask.max()) < 1 << 16:
        present = np.bincount(mask.ravel(), minlength=1) > 0
        present[0] = True
        n = int(present.sum())
        lut = np.cumsum(present) - 1
    else:
        ids, inverse = np.unique(mask, return_inverse=True)
        shift = int(ids.size == 0 or ids[0] != 0)
        n = ids.size + shift
        lut, mask = None, inverse.reshape(mask.shape) + shift
    if n > max_ids:
        raise TooManyIds(f"{where}: {n} label ids (0 included) in one mask; data.max_mask_ids is {max_ids} "
                         f"(raise it, up to {MAX_IDS})")
    return (lut.astype(np.uint8)[mask] if lut is not None else mask.astype(np.uint8))


# --------------------------------------------------------------------------- #
# photometric augmentation (pure, explicit randomness)
# --------------------------------------------------------------------------- #
def photometric(img: torch.Tensor, rng: np.random.Generator, blur_p: float, solarize_p: float,
                jitter=(0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8, gray_p: float = 0.2) -> torch.Tensor:
    """BYOL's image-only augmentation of a (3, S, S) uint8 tensor -> (3, S, S) uint8."""
    if rng.random() < jitter_p:
        b, c, s, h = jitter
        ops = [lambda x: TF.adjust_brightness(x, rng.uniform(1 - b, 1 + b)),
               lambda x: TF.adjust_contrast(x, rng.uniform(1 - c, 1 + c)),
               lambda x: TF.adjust_saturation(x, rng.uniform(1 - s, 1 + s)),
               lambda x: TF.adjust_hue(x, rng.uniform(-h, h))]
        for i in rng.permutation(4):
            img = ops[i](img)
    if rng.random() < gray_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < blur_p:
        k = blur_kernel_size(img.shape[-1])
        img = TF.gaussian_blur(img, [k, k], [float(rng.uniform(0.1, 2.0))] * 2)
    if rng.random() < solarize_p:
        img = TF.solarize(img, 128)
    return img


def to_normalized(img: torch.Tensor) -> torch.Tensor:
    """(3, S, S) uint8 -> float, normalised with NORM_MEAN / NORM_STD."""
    return TF.normalize(img.float().div_(255.0), NORM_MEAN, NORM_STD)


def crop_and_flip(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, size: int,
                  crop_scale: tuple[float, float]) -> tuple[Box, np.ndarray, np.ndarray]:
    """One view's geometry: a random resized crop of image and mask to ``size``, then the same
    horizontal flip of both with probability 0.5 (draws: the box, then the flip)."""
    box = random_resized_crop_box(rng, *mask.shape, crop_scale)
    img_v = crop_resize(image, box, size)
    mask_v = crop_resize(mask, box, size, nearest=True)
    if rng.random() < 0.5:
        img_v, mask_v = img_v[:, ::-1], mask_v[:, ::-1]
    return box, img_v, mask_v


def make_views(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, size: int,
               crop_scale: tuple[float, float], with_context: bool) -> dict[str, torch.Tensor]:
    """Two augmented views of ``image`` with their masks, and optionally the overlap view.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) integer label map.

    Returns:
        ``view1``, ``view2``: (3, S, S) float; ``mask1``, ``mask2``: (S, S) int64; with
        context also ``ctx_clean``, ``ctx_damaged``: (3, S, S) float, ``ctx_mask``: (S, S),
        ``ctx_valid``: bool tensor (False where the two crops do not overlap).
    """
    out: dict[str, torch.Tensor] = {}
    boxes = []
    for v, (blur_p, sol_p) in enumerate(VIEW_PROBS, start=1):
        box, img_v, mask_v = crop_and_flip(image, mask, rng, size, crop_scale)
        boxes.append(box)
        img_t = torch.from_numpy(np.ascontiguousarray(img_v)).permute(2, 0, 1)
        out[f"view{v}"] = to_normalized(photometric(img_t, rng, blur_p, sol_p))
        out[f"mask{v}"] = torch.from_numpy(np.ascontiguousarray(mask_v).astype(np.int64))
    if with_context:
        common = overlap_box(boxes[0], boxes[1])
        out["ctx_valid"] = torch.tensor(common is not None)
        common = common or boxes[0]  # placeholder keeps batch shapes; its loss weight is 0
        clean = crop_resize(image, common, size).astype(np.float32).transpose(2, 0, 1) / 255.0
        damaged = context_damage(clean, rng)
        out["ctx_clean"] = TF.normalize(torch.from_numpy(clean), NORM_MEAN, NORM_STD)
        out["ctx_damaged"] = TF.normalize(torch.from_numpy(np.ascontiguousarray(damaged)), NORM_MEAN, NORM_STD)
        out["ctx_mask"] = torch.from_numpy(crop_resize(mask, common, size, nearest=True).astype(np.int64))
    return out


def _chw(img: np.ndarray) -> torch.Tensor:
    """(S, S) gray or (S, S, 3) uint8 -> (3, S, S) uint8 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(img))
    return t.expand(3, *t.shape).contiguous() if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def make_crops(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, size: int,
               crop_scale: tuple[float, float], with_context: bool) -> dict[str, torch.Tensor]:
    """The loader workers' part of :func:`make_views`: the two crops (and their overlap),
    flipped and resized, not yet augmented (:func:`pretraining.augment.augment_batch` does that
    on the training device). The crop boxes and flips have :func:`make_views`'s distributions.

    Args:
        image: (H, W, 3) uint8, or (H, W) for a gray frame (expanded to 3 channels after resizing).
        mask: (H, W) integer label map with ids < 256.

    Returns:
        ``crop1``, ``crop2``: (3, S, S) uint8; ``mask1``, ``mask2``: (S, S) uint8; with context
        also ``ctx_crop``: (3, S, S) uint8, ``ctx_mask``: (S, S) uint8, ``ctx_valid``: bool tensor.
    """
    mask = mask.astype(np.uint8, copy=False)
    out: dict[str, torch.Tensor] = {}
    boxes = []
    for v in (1, 2):
        box, img_v, mask_v = crop_and_flip(image, mask, rng, size, crop_scale)
        boxes.append(box)
        out[f"crop{v}"] = _chw(img_v)
        out[f"mask{v}"] = torch.from_numpy(np.ascontiguousarray(mask_v))
    if with_context:
        common = overlap_box(boxes[0], boxes[1])
        out["ctx_valid"] = torch.tensor(common is not None)
        common = common or boxes[0]  # placeholder keeps batch shapes; its loss weight is 0
        out["ctx_crop"] = _chw(crop_resize(image, common, size))
        out["ctx_mask"] = torch.from_numpy(crop_resize(mask, common, size, nearest=True))
    return out


# --------------------------------------------------------------------------- #
# frame cache, dataset and sampler
# --------------------------------------------------------------------------- #
class FrameCache:
    """Every frame and mask of a data set, decoded once and held in RAM.

    ``frames[i]``: (H, W) uint8 when the frame's 3 channels are equal (ultrasound mostly is:
    a third of the memory), else (H, W, 3); ``masks[i]``: (H, W) uint8, already renumbered
    (:func:`relabel_mask`). A sample that could not be read holds None and its message.

    Built in the main process before the loader starts, so that forked workers share the
    arrays (copy-on-write; the pixel buffers are only read, so they are never copied).
    """

    def __init__(self, frames: list[np.ndarray | None], masks: list[np.ndarray | None], errors: dict[int, str]):
        self.frames, self.masks, self.errors = frames, masks, errors

    @classmethod
    def build(cls, load: Callable[[int], tuple[np.ndarray, np.ndarray]], n: int, threads: int = 1) -> FrameCache:
        """Decode samples ``0..n-1`` with ``load(i) -> (image (H, W, 3), mask)`` on ``threads``
        threads (OpenCV's decoders release the GIL). A :class:`DataError` marks the sample
        unreadable; :class:`TooManyIds` (a setting, not a file) is raised."""
        def one(i: int):
            try:
                image, mask = load(i)
            except TooManyIds:
                raise
            except DataError as e:
                return None, None, str(e)
            if image.ndim == 3 and (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all():
                image = np.ascontiguousarray(image[..., 0])
            return image, mask, None

        with ThreadPoolExecutor(max(1, threads)) as pool:
            done = list(pool.map(one, range(n)))
        errors = {i: e for i, (_, _, e) in enumerate(done) if e is not None}
        return cls([d[0] for d in done], [d[1] for d in done], errors)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.frames, *self.masks) if a is not None)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W) or (H, W, 3) uint8, mask (H, W) uint8), or the sample's DataError."""
        if self.frames[i] is None:
            raise DataError(self.errors[i])
        return self.frames[i], self.masks[i]


# --------------------------------------------------------------------------- #
#: the pair list of a corpus (utils/mask_layout.py owns it); pretrain_aclus.py reads it through this name
load_pairs = mask_layout.load_pairs


class AnatomyPairDataset(Dataset):
    """Items are indexed by ``(index, epoch)`` (see :class:`EpochSampler`).

    ``device_augment``: items are :func:`make_crops` (uint8 crops; the training step augments
    them on its device), else :func:`make_views` (finished views, per sample). ``cache``:
    "memory" decodes every pair once, here, into a :class:`FrameCache`; "none" reads the
    files for every item. ``max_ids``: the most label ids a mask may hold (:func:`relabel_mask`).

    A sample whose image or mask cannot be read is reported once by name and
    replaced by the next readable one, so one bad file does not end a long run.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], size: int, crop_scale=(0.08, 1.0),
                 with_context: bool = True, whole_image_mask: bool = False, seed: int = 0,
                 max_bad: int = 16, device_augment: bool = False, cache: str = "none",
                 max_ids: int = MAX_IDS, threads: int = 1):
        if cache not in ("none", "memory"):
            raise ValueError(f"cache must be 'none' or 'memory', got {cache!r}")
        self.pairs = pairs
        self.size = size
        self.crop_scale = tuple(crop_scale)
        self.with_context = with_context
        self.whole_image_mask = whole_image_mask
        self.seed = seed
        self.max_bad = max_bad
        self.device_augment = device_augment
        self.max_ids = max_ids
        self._reported: set[int] = set()
        self.cache: FrameCache | None = None
        if cache == "memory":
            t = time.perf_counter()
            self.cache = FrameCache.build(self._read, len(pairs), threads)
            for i, msg in sorted(self.cache.errors.items()):
                log.warning("skipping sample %d: %s", i, msg)
            self._reported = set(self.cache.errors)
            log.info("frame cache: %d pairs decoded (%d unreadable), %.2f GiB in memory, %.1f s",
                     len(pairs), len(self.cache.errors), self.cache.nbytes / 2**30, time.perf_counter() - t)

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode pair ``i`` from its files: (H, W, 3) uint8 image, (H, W) uint8 renumbered mask."""
        img_path, mask_path = self.pairs[i]
        image = read_image(img_path, "rgb")
        if self.whole_image_mask:
            return image, np.zeros(image.shape[:2], np.uint8)
        return image, relabel_mask(mask_layout.load_mask(mask_path, image.shape[:2]), self.max_ids, mask_path)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.cache.get(i) if self.cache is not None else self._read(i)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        for attempt in range(self.max_bad):
            i = (index + attempt) % len(self.pairs)
            try:
                image, mask = self._load(i)
                break
            except TooManyIds:
                raise
            except DataError as e:
                if i not in self._reported:
                    self._reported.add(i)
                    log.warning("skipping sample %d: %s", i, e)
        else:
            raise DataError(f"{self.max_bad} consecutive unreadable samples from index {index}; "
                            f"last: {self.pairs[i][0]}")
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.device_augment:
            return make_crops(image, mask, rng, self.size, self.crop_scale, self.with_context)
        if image.ndim == 2:  # a gray frame of the cache
            image = np.repeat(image[..., None], 3, axis=2)
        return make_views(image, mask, rng, self.size, self.crop_scale, self.with_context)


class EpochSampler(Sampler):
    """Shuffles with ``seed + epoch`` and shards over processes; yields ``(index, epoch)``.

    Like ``DistributedSampler`` (padding by repetition so every process gets the
    same count), but the epoch travels with each index so that augmentations are
    seeded per sample without any state in the worker processes.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.n))[:total]
        return iter([(i, self.epoch) for i in order[self.rank:total:self.world_size]])
