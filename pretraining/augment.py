"""The training step's augmentation: a batch of crops -> the model's views, on the training device.

The loader's workers only crop, flip and resize (:func:`pretraining.data.make_crops`,
uint8); :func:`augment_batch` then does, for the whole batch at once and on its device,
what :func:`pretraining.data.make_views` does per sample on the CPU:

* BYOL's photometric augmentation of each view (:func:`photometric_batch`): colour jitter
  (p = 0.8; brightness, contrast, saturation, hue in a random order per image), grayscale
  (p = 0.2), Gaussian blur (p = 1.0 / 0.1 for view 1 / 2, sigma in [0.1, 2], a kernel of
  ~10 % of the side), solarisation (p = 0 / 0.2);
* the Models-Genesis damage of the overlap view
  (:func:`pretraining.context_damage.context_damage_batch`);
* the normalisation of every view.

Every random draw comes from one ``torch.Generator`` on the device (the training loop seeds
it per (seed, rank, epoch, step), so a resumed run draws what an uninterrupted one does).
Parameter ranges and probabilities are those of the per-sample code; its stream of numbers
is not reproduced. One difference in the arithmetic: the per-sample ops work on uint8 and
round after each op, these on float in [0, 1] without rounding (a few 1/255 per pixel).

Nothing here reads a value back to the host: every op runs on every image and the result
is selected per image with ``torch.where``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretraining.context_damage import context_damage_batch
from pretraining.data import CROP_KEYS, NORM_MEAN, NORM_STD, VIEW_PROBS, blur_kernel_size

#: torchvision's (and PIL's) luma weights
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
#: BYOL's colour jitter strengths: brightness, contrast, saturation, hue
JITTER = (0.4, 0.4, 0.2, 0.1)
JITTER_P = 0.8
GRAY_P = 0.2
SIGMA = (0.1, 2.0)
#: uint8 solarisation threshold 128, on [0, 1]
SOLARIZE_THRESHOLD = 128 / 255


# --------------------------------------------------------------------------- #
# per-image colour ops on (B, 3, H, W) float in [0, 1]; factors (B,)
# --------------------------------------------------------------------------- #
def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f[:, None, None, None]


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = img.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = _per_image(ratio)
    return (r * a + (1 - r) * b).clamp_(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (img * _per_image(factor)).clamp_(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(img).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(img, mean, factor)


def adjust_saturation(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(img, grayscale(img), factor)


def adjust_hue(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` (B,) turns in [-0.5, 0.5] (torchvision's HSV round trip,
    with the closed-form HSV -> RGB, which needs no lookup table on the host)."""
    maxc, _ = img.max(dim=1)
    minc, _ = img.min(dim=1)
    r, g, b = img.unbind(dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = (h / 6.0 + 1.0).fmod(1.0)
    h = (h + factor[:, None, None]).remainder(1.0)
    v = maxc
    out = []
    for n in (5.0, 3.0, 1.0):                                            # R, G, B
        k = (n + h * 6.0).remainder(6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (reflect padding, its v2 kernel) with a sigma per image,
    as two depthwise 1-D convolutions (the 2-D kernel is their outer product)."""
    b, c, h, w = img.shape
    lim = (kernel_size - 1) / (2.0 * 2.0 ** 0.5)
    x = torch.linspace(-lim, lim, kernel_size, device=img.device, dtype=img.dtype)
    kernel = torch.softmax(-(x[None, :] / sigma[:, None]) ** 2, dim=1)   # B x k
    kernel = kernel.repeat_interleave(c, dim=0)                           # BC x k
    pad = kernel_size // 2
    out = F.pad(img.reshape(1, b * c, h, w), [pad, pad, pad, pad], mode="reflect")
    out = F.conv2d(out, kernel[:, None, None, :], groups=b * c)           # along x
    out = F.conv2d(out, kernel[:, None, :, None], groups=b * c)           # along y
    return out.reshape(b, c, h, w)


def solarize(img: torch.Tensor) -> torch.Tensor:
    return torch.where(img >= SOLARIZE_THRESHOLD, 1.0 - img, img)


#: the jitter ops in the order of the per-sample code (brightness, contrast, saturation, hue)
JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# --------------------------------------------------------------------------- #
# draws and their application
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PhotometricDraws:
    """One view's random draws for B images (all on the device).

    ``jitter``, ``gray``, ``blur``, ``solarize``: (B,) bool, whether each op applies;
    ``factors``: (B, 4) brightness, contrast, saturation, hue; ``order``: (B, 4) a random
    permutation of the 4 jitter ops (``order[:, i]`` runs i-th); ``sigma``: (B,).
    """
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


def draw_photometric(n: int, generator: torch.Generator | None, device: torch.device, blur_p: float,
                     solarize_p: float, jitter=JITTER, jitter_p: float = JITTER_P,
                     gray_p: float = GRAY_P) -> PhotometricDraws:
    """The draws of :func:`pretraining.data.photometric` for ``n`` images: the same
    probabilities, uniform factors in [1 - j, 1 + j] (hue: [-j, j]), a uniform order."""
    u = torch.rand(n, 4, generator=generator, device=device)              # the 4 gates
    lo = [1 - jitter[0], 1 - jitter[1], 1 - jitter[2], -jitter[3]]
    hi = [1 + jitter[0], 1 + jitter[1], 1 + jitter[2], jitter[3]]
    factors = _affine(torch.rand(n, 4, generator=generator, device=device), lo, hi)
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)
    sigma = SIGMA[0] + (SIGMA[1] - SIGMA[0]) * torch.rand(n, generator=generator, device=device)
    return PhotometricDraws(jitter=u[:, 0] < jitter_p, factors=factors, order=order, gray=u[:, 1] < gray_p,
                            blur=u[:, 2] < blur_p, sigma=sigma, solarize=u[:, 3] < solarize_p)


def _affine(u: torch.Tensor, lo: list[float], hi: list[float]) -> torch.Tensor:
    """(n, k) uniforms in [0, 1) -> uniforms in [lo_j, hi_j) per column (Python bounds: no copies)."""
    return torch.stack([lo[j] + (hi[j] - lo[j]) * u[:, j] for j in range(len(lo))], dim=1)


def apply_photometric(img: torch.Tensor, d: PhotometricDraws) -> torch.Tensor:
    """(B, 3, S, S) float in [0, 1] -> the same, after the ops that ``d`` draws, in the order of
    the per-sample code: jitter (its 4 ops in each image's order), grayscale, blur, solarise."""
    for position in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            sel = d.jitter & (d.order[:, position] == op_index)
            img = torch.where(_per_image(sel), op(img, d.factors[:, op_index]), img)
    img = torch.where(_per_image(d.gray), grayscale(img).expand_as(img), img)
    blurred = gaussian_blur(img, d.sigma, blur_kernel_size(img.shape[-1])).clamp_(0.0, 1.0)  # kernel sum 1 +- eps
    img = torch.where(_per_image(d.blur), blurred, img)
    return torch.where(_per_image(d.solarize), solarize(img), img)


def photometric_batch(img: torch.Tensor, generator: torch.Generator | None, blur_p: float,
                      solarize_p: float) -> torch.Tensor:
    """BYOL's photometric augmentation of a (B, 3, S, S) float batch in [0, 1]."""
    return apply_photometric(img, draw_photometric(img.shape[0], generator, img.device, blur_p, solarize_p))


def normalize(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> ``(x - NORM_MEAN) / NORM_STD`` per channel (Python scalars: no host-to-device copy)."""
    if len(set(NORM_MEAN)) == 1 and len(set(NORM_STD)) == 1:
        return (img - NORM_MEAN[0]) / NORM_STD[0]
    return torch.stack([(img[:, c] - m) / s for c, (m, s) in enumerate(zip(NORM_MEAN, NORM_STD))], dim=1)


def to_unit(crops: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float in [0, 1]."""
    return crops.float().div_(255.0)


# --------------------------------------------------------------------------- #
# the step's entry point
# --------------------------------------------------------------------------- #
def is_crop_batch(batch: dict) -> bool:
    """Whether ``batch`` holds the loader's crops (still to augment) rather than finished views."""
    return CROP_KEYS[0] in batch


def augment_batch(batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The loader's crops -> the model's batch (see :meth:`models.aclus.ACLUS.forward`).

    Args:
        batch: ``crop1``, ``crop2``: (B, 3, S, S) uint8; ``mask1``, ``mask2``: (B, S, S)
            integer; with the context view also ``ctx_crop`` (B, 3, S, S) uint8, ``ctx_mask``,
            ``ctx_valid`` (B,) bool. On the training device.
        generator: the step's generator, on that device.

    Returns:
        ``view1``, ``view2``: (B, 3, S, S) float, normalised; ``mask1``, ``mask2``: int64;
        with context ``ctx_clean``, ``ctx_damaged`` (normalised), ``ctx_mask`` (int64), ``ctx_valid``.
    """
    out: dict[str, torch.Tensor] = {}
    for v, (blur_p, solarize_p) in enumerate(VIEW_PROBS, start=1):
        out[f"view{v}"] = normalize(photometric_batch(to_unit(batch[f"crop{v}"]), generator, blur_p, solarize_p))
        out[f"mask{v}"] = batch[f"mask{v}"].long()
    if "ctx_crop" in batch:
        clean = to_unit(batch["ctx_crop"])
        out["ctx_clean"] = normalize(clean)
        out["ctx_damaged"] = normalize(context_damage_batch(clean, generator))
        out["ctx_mask"] = batch["ctx_mask"].long()
        out["ctx_valid"] = batch["ctx_valid"]
    return out
