"""Pre-training data: image + anatomy mask pairs -> two augmented views (+ overlap view).

Augmentation randomness comes from a generator seeded by ``(seed, epoch, index)``,
so a sample is the same whatever the number of loader workers or processes and
a resumed run sees exactly the batches of an uninterrupted one.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the original image, right/bottom
exclusive, everywhere in this module (upstream mixed this up with
``(top, left, h, w)``).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset, Sampler

from utils import mask_layout
from utils.context_damage import context_damage
from utils.io import DataError, read_image

log = logging.getLogger(__name__)

#: normalisation of every view (the same as the evaluation protocol's)
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.25, 0.25, 0.25)
#: smallest overlap side (pixels of the original image) for the context term
MIN_OVERLAP = 8

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
        side = img.shape[-1]
        k = max(3, int(0.1 * side) // 2 * 2 + 1)  # ~10 % of the view, odd (23 at 224 px)
        img = TF.gaussian_blur(img, [k, k], [float(rng.uniform(0.1, 2.0))] * 2)
    if rng.random() < solarize_p:
        img = TF.solarize(img, 128)
    return img


def to_normalized(img: torch.Tensor) -> torch.Tensor:
    """(3, S, S) uint8 -> float, normalised with NORM_MEAN / NORM_STD."""
    return TF.normalize(img.float().div_(255.0), NORM_MEAN, NORM_STD)


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
    h, w = mask.shape
    out: dict[str, torch.Tensor] = {}
    boxes = []
    for v, (blur_p, sol_p) in enumerate([(1.0, 0.0), (0.1, 0.2)], start=1):
        box = random_resized_crop_box(rng, h, w, crop_scale)
        boxes.append(box)
        img_v = crop_resize(image, box, size)
        mask_v = crop_resize(mask, box, size, nearest=True)
        if rng.random() < 0.5:  # the same flip for image and mask
            img_v, mask_v = img_v[:, ::-1], mask_v[:, ::-1]
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


# --------------------------------------------------------------------------- #
# dataset and sampler
# --------------------------------------------------------------------------- #
#: the pair list of a corpus (utils/mask_layout.py owns it); pretrain_aclus.py reads it through this name
load_pairs = mask_layout.load_pairs


class AnatomyPairDataset(Dataset):
    """Items are indexed by ``(index, epoch)`` (see :class:`EpochSampler`).

    A sample whose image or mask cannot be read is reported once by name and
    replaced by the next readable one, so one bad file does not end a long run.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], size: int, crop_scale=(0.08, 1.0),
                 with_context: bool = True, whole_image_mask: bool = False, seed: int = 0,
                 max_bad: int = 16):
        self.pairs = pairs
        self.size = size
        self.crop_scale = tuple(crop_scale)
        self.with_context = with_context
        self.whole_image_mask = whole_image_mask
        self.seed = seed
        self.max_bad = max_bad
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, mask_path = self.pairs[i]
        image = read_image(img_path, "rgb")
        if self.whole_image_mask:
            return image, np.zeros(image.shape[:2], np.int64)
        return image, mask_layout.load_mask(mask_path, image.shape[:2])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        for attempt in range(self.max_bad):
            i = (index + attempt) % len(self.pairs)
            try:
                image, mask = self._load(i)
                break
            except DataError as e:
                if i not in self._reported:
                    self._reported.add(i)
                    log.warning("skipping sample %d: %s", i, e)
        else:
            raise DataError(f"{self.max_bad} consecutive unreadable samples from index {index}; "
                            f"last: {self.pairs[i][0]}")
        rng = np.random.default_rng([self.seed, epoch, index])
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
