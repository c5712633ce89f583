"""Deterministic synthetic lung ultrasound scans with exact integer anatomy label maps.

Used to test every ACLUS stage end to end without the real (licence-restricted) data:
the writers below produce the three on-disk layouts the pipeline reads
(pre-training folders, SAMUS segmentation pairs, USCL POCUS 5-fold pickles).

How a scan is built (:func:`make_scan`)
    Every pixel gets beam coordinates ``(u, d)``: ``u`` in [-1, 1] is the lateral position
    (the scan-line angle for a convex probe, the x position for a linear one) and ``d`` in
    [0, 1] the depth along the beam. The anatomy is defined analytically in ``(u, d)``, so a
    convex scan is the same scene bent into a fan. The label map is evaluated exactly on
    the pixel grid; the image is ``echogenicity x speckle x attenuation``, log-like
    compressed to uint8. Speckle is a smoothed complex Gaussian field whose magnitude is
    Rayleigh distributed, drawn on the beam grid and resampled into the fan.

Anatomy ids (:data:`ANATOMY_IDS`)
    0 background (outside the fan of a convex probe), 1 soft tissue / chest wall,
    2 rib (the bony cross-section: bright cortex on top, dark inside), 3 pleural line,
    4 aerated lung below the pleura (A-lines and B-lines are artefacts inside it and keep
    id 4), 5 consolidation (pneumonia only), 6 rib acoustic shadow (everything under a rib,
    whatever tissue it hides: nothing there is visible, so it gets its own id rather than
    the id of the hidden tissue).

Scan classes (:data:`CLASS_NAMES`, ids as in USCL/POCUS)
    0 covid19: irregular, thickened, fragmented pleura, 2-5 vertical bright B-lines from
    the pleura to the bottom, A-lines almost gone. 1 pneumonia: a tissue-like (hepatized)
    consolidation under the pleura with a ragged lower border and bright air bronchograms.
    2 regular: thin smooth pleura and A-lines (horizontal repetitions of the pleural line
    at multiples of its depth).

``frame`` animates one scan (same seed) like a video: breathing moves the pleura and the
lung by a few pixels and part of the speckle decorrelates.
"""
from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from utils.flags import AT_LEAST_1, SEED, Range, check_flag_ranges
from utils.io import DataError, atomic_write, atomic_write_png, ensure_writable_dir

ANATOMY_IDS: dict[str, int] = {
    "background": 0,
    "soft_tissue": 1,
    "rib": 2,
    "pleura": 3,
    "lung": 4,
    "consolidation": 5,
    "rib_shadow": 6,
}
CLASS_NAMES: tuple[str, ...] = ("covid19", "pneumonia", "regular")
PROBES: tuple[str, ...] = ("convex", "linear")

# SAMUS layout: binary pleural-line dataset and a 3-class anatomy dataset
SAMUS_DATASETS: dict[str, int] = {"SynLung-Pleura": 2, "SynLung-Anatomy": 4}  # classes incl. background
SAMUS_ANATOMY_CLASSES: dict[int, int] = {  # anatomy id -> class id in SynLung-Anatomy
    ANATOMY_IDS["rib"]: 1,
    ANATOMY_IDS["pleura"]: 2,
    ANATOMY_IDS["consolidation"]: 3,
}

_BG, _TISSUE, _RIB, _PLEURA, _LUNG, _CONSOL, _SHADOW = (ANATOMY_IDS[k] for k in (
    "background", "soft_tissue", "rib", "pleura", "lung", "consolidation", "rib_shadow"))


@dataclass(frozen=True)
class ScanStyle:
    """How a scan looks, apart from its anatomy: fan geometry, echo levels, speckle, display.

    The default is the original look (high contrast, fine speckle: anatomy easy to see, every
    test written against it); :data:`REALISTIC` is fitted to real convex lung frames by
    ``benchmarks/measure_synthetic_realism.py --fit`` (its JSON holds the distances before and
    after). Ranges are (low, high) of a uniform draw per scene; the geometry draws happen in
    the same order under every style, so a seed keeps its anatomy (in beam coordinates) when
    the style changes.
    """

    half_angle: tuple[float, float] = (0.50, 0.62)   # convex fan half-opening, radians
    apex: tuple[float, float] = (0.25, 0.45)         # convex apex height above row 0, x image height
    tissue_echo: float = 0.30                        # chest-wall echogenicity
    pleura_echo: float = 0.95                        # pleural line brightness
    a_line_gain: float = 1.0                         # scales every A-line
    rib_rim: float = 1.0                             # rib cortex brightness
    lung_haze: float = 0.0                           # diffuse echo added below the pleura
    speckle_size: float = 1.0                        # scales the (axial, lateral) speckle grain
    speckle_power: float = 0.8                       # display exponent of the Rayleigh magnitude
    psf: float = 0.6                                 # point-spread blur, px at 128 px
    attenuation: tuple[float, float] = (0.9, 1.6)    # exp(-alpha * depth) after partial TGC
    gain: float = 1.0                                # overall amplitude before compression
    compression: float = 6.0                         # log1p(k * amplitude) display map


CLASSIC = ScanStyle()
# fitted by `python benchmarks/measure_synthetic_realism.py --fit` (docs/results/synthetic_realism.json)
REALISTIC = ScanStyle(half_angle=(0.571, 0.691), apex=(0.2, 0.4), tissue_echo=0.479, pleura_echo=0.677,
                      a_line_gain=0.38, rib_rim=0.267, lung_haze=0.213, speckle_size=2.383, speckle_power=0.739,
                      psf=1.885, attenuation=(1.909, 2.609), gain=0.751, compression=2.206)
STYLES: dict[str, ScanStyle] = {"classic": CLASSIC, "realistic": REALISTIC}


def scan_style(style: ScanStyle | str) -> ScanStyle:
    """A :class:`ScanStyle` or its name in :data:`STYLES` -> the style."""
    if isinstance(style, ScanStyle):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown scan style {style!r}; known: {', '.join(STYLES)}")
    return STYLES[style]


# --------------------------------------------------------------------------- #
# helpers (pure)
# --------------------------------------------------------------------------- #
def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``size`` -> (height, width); an int means a square image."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(s) for s in size)
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16 pixels, got {h}x{w}")
    return h, w


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (e.g. base seed, subset, index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _beam_coords(h: int, w: int, probe: str, rng: np.random.Generator, style: ScanStyle = CLASSIC):
    """Beam coordinates of every pixel.

    Returns:
        u: HxW float32, lateral position in [-1, 1] inside the field of view.
        d: HxW float32, depth in [0, 1] inside the field of view.
        inside: HxW bool, the field of view (the fan for convex, everything for linear).
    """
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ys += 0.5
    xs += 0.5
    if probe == "linear":
        u = xs / w * 2.0 - 1.0
        d = ys / h
        return u, d, np.ones((h, w), bool)
    # convex: apex above the image centre; the fan is clipped by the image sides, its top
    # arc and its bottom arc leave all four corners black
    half_angle = rng.uniform(*style.half_angle)             # radians
    apex = rng.uniform(*style.apex) * h                     # apex height above row 0
    r0 = apex + 0.02 * h                                    # skin line (top arc)
    r1 = apex + 0.97 * h                                    # deepest sample (bottom arc)
    dx, dy = xs - w / 2.0, ys + apex
    radius = np.sqrt(dx * dx + dy * dy)
    angle = np.arctan2(dx, dy)
    u = angle / half_angle
    d = (radius - r0) / (r1 - r0)
    inside = (np.abs(u) <= 1.0) & (d >= 0.0) & (d <= 1.0)
    return u.astype(np.float32), d.astype(np.float32), inside


def _smooth_noise(rng: np.random.Generator, n: int, scale: float, amp: float):
    """A random smooth 1-D function of u: sum of ``n`` sines with wavelengths ~ ``scale``."""
    freqs = rng.uniform(0.7, 1.5, n) * 2 * np.pi / scale
    phases = rng.uniform(0, 2 * np.pi, n)
    amps = amp * rng.uniform(0.5, 1.0, n) / np.sqrt(n)

    def f(u):
        return sum(a * np.sin(fr * u + p) for a, fr, p in zip(amps, freqs, phases))
    return f


def _speckle_field(rng: np.random.Generator, h: int, w: int, sigma: tuple[float, float]) -> np.ndarray:
    """HxW complex64 Gaussian field, smoothed with (axial, lateral) sigmas in pixels."""
    re = rng.standard_normal((h, w)).astype(np.float32)
    im = rng.standard_normal((h, w)).astype(np.float32)
    sy, sx = sigma
    re = cv2.GaussianBlur(re, (0, 0), sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT)
    im = cv2.GaussianBlur(im, (0, 0), sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT)
    z = re + 1j * im
    return (z / np.sqrt(np.mean(np.abs(z) ** 2))).astype(np.complex64)


def _to_beam_grid(field: np.ndarray, u: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Resample an HxW[xC] float32 field drawn on the (d rows, u columns) beam grid at the
    pixel coordinates (u, d); returns the same shape."""
    h, w = field.shape[:2]
    map_x = ((u + 1.0) * 0.5 * (w - 1)).astype(np.float32)
    map_y = (d * (h - 1)).astype(np.float32)
    return cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _band(dist: np.ndarray, half: float) -> np.ndarray:
    """Smooth 0..1 profile of a line: 1 on it, Gaussian fall-off with half-width ``half``."""
    return np.exp(-0.5 * (dist / half) ** 2)


# --------------------------------------------------------------------------- #
# the scan
# --------------------------------------------------------------------------- #
def make_scan(seed: int, size: int | tuple[int, int] = 128, probe: str = "convex",
              scan_class: int = 2, frame: int = 0, finding_strength: float = 1.0,
              return_findings: bool = False, local_findings: bool = False,
              style: ScanStyle | str = CLASSIC) -> tuple[np.ndarray, ...]:
    """One synthetic lung ultrasound frame and its anatomy label map.

    Args:
        seed: scene seed (>= 0); the geometry (pleura depth, ribs, layers, B-line and
            consolidation placement) depends only on ``seed`` and ``probe``, so the same
            seed under another class shows the same chest wall.
        size: ``H`` (square) or ``(H, W)`` in pixels, at least 16.
        probe: ``"convex"`` (fan; outside it black and label 0) or ``"linear"`` (rectangle).
        scan_class: 0 covid19, 1 pneumonia, 2 regular (see :data:`CLASS_NAMES`).
        frame: time index (>= 0); frames of one seed form a breathing video.
        finding_strength: 1 = the class findings as described above; towards 0 they
            fade into a regular lung (pleura irregularity, A-line loss, B-line and
            consolidation contrast scale with it), which makes the classes harder to
            tell apart. The labels do not change.
        return_findings: also return where the artefacts lie (below); the image and the
            label map are the same with or without it.

    Returns:
        image: HxW uint8 grayscale.
        label: HxW int64 map with values in :data:`ANATOMY_IDS` (at least 2 distinct ids).
        findings (only with ``return_findings``): ``{"b_lines": HxW bool, "a_lines": HxW bool}``,
            the aerated-lung pixels (label 4) within the half-maximum width of a B-line
            (covid19 only; all False otherwise) or of an A-line (every class). Geometric:
            they do not fade with ``finding_strength``.
        local_findings: the class shows ONLY where its findings are (off by default, which
            keeps every scan as it was): the A-lines keep a regular lung's amplitude, depth
            and width in every class and fade only under the B-lines and the consolidation,
            so neither the overall A-line brightness nor the A-lines' shape tells the class;
            a classifier has to find the B-lines, the irregular pleura or the consolidation
            (the Grad-CAM test of ``tests/test_gradcam.py`` relies on this).
        style: a :class:`ScanStyle` or a name in :data:`STYLES` ("classic", "realistic"):
            the look, and for a convex probe the fan's opening; where the anatomy lies in beam
            coordinates does not change (a linear scan keeps its label map exactly).
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if scan_class not in (0, 1, 2):
        raise ValueError(f"scan_class must be 0 (covid19), 1 (pneumonia) or 2 (regular), got {scan_class!r}")
    if int(seed) < 0 or int(frame) < 0:
        raise ValueError(f"seed and frame must be >= 0, got seed={seed}, frame={frame}")
    if not 0.0 <= finding_strength <= 1.0:
        raise ValueError(f"finding_strength must be in [0, 1], got {finding_strength!r}")
    fs = float(finding_strength)
    st = scan_style(style)
    h, w = _hw(size)
    geo = np.random.default_rng([int(seed), PROBES.index(probe), 0x5CA9])   # scene geometry
    cls_rng = np.random.default_rng([int(seed), PROBES.index(probe), int(scan_class), 0xC1A5])
    frame_rng = np.random.default_rng([int(seed), PROBES.index(probe), int(scan_class), int(frame), 0xF4A3])

    u, d, inside = _beam_coords(h, w, probe, geo, st)
    px = 1.0 / h                                            # one pixel in depth units
    linear = probe == "linear"

    # ---- breathing: pleura and lung move by a few pixels, in phase ---------------------
    period = geo.uniform(6.0, 10.0)
    phase = geo.uniform(0, 2 * np.pi)
    breath = np.sin(2 * np.pi * frame / period + phase)
    d_shift = 0.010 * breath                                # pleura depth offset
    u_slide = 0.03 * breath                                 # lung sliding (lateral)

    # ---- pleura depth d = p(u) ----------------------------------------------------------
    p0 = geo.uniform(0.28, 0.42) if linear else geo.uniform(0.18, 0.32)
    p_wave = _smooth_noise(geo, 3, 2.5, 0.02)
    pleura_d = p0 + p_wave(u) + d_shift                     # HxW
    irregular = scan_class == 0
    smooth_pleura_d = pleura_d                              # before the covid irregularity
    if irregular:                                           # covid: wavy, thickened pleura
        pleura_d = pleura_d + fs * _smooth_noise(cls_rng, 6, 0.25, 0.018)(u)
    p_half = max(0.007, 1.3 * px) * (1.0 + 0.8 * fs if irregular else 1.0)  # half thickness
    dist_pl = d - pleura_d
    pleura_mask = np.abs(dist_pl) <= p_half
    below = dist_pl > p_half                                # lung side

    # ---- ribs: ellipse cross-sections just above the pleura, shadow below ------------
    n_ribs = int(geo.integers(0, 2) if linear else geo.integers(1, 3)) + 1
    spacing = geo.uniform(0.9, 1.3) if not linear else geo.uniform(1.3, 1.8)
    first = geo.uniform(-1.1, -1.1 + spacing)
    rib_centres = first + spacing * np.arange(n_ribs)
    rib_mask = np.zeros((h, w), bool)
    rib_rim = np.zeros((h, w), np.float32)
    shadow = np.zeros((h, w), np.float32)                   # soft 0..1 shadow strength
    rib_half_w = []
    for c in rib_centres:
        half_w = geo.uniform(0.14, 0.22) * (1.6 if linear else 1.0)
        rib_half_w.append(half_w)
        hr = geo.uniform(0.035, 0.05) * (1.3 if linear else 1.0)
        dc = p0 + p_wave(np.float32(c)) - 0.9 * hr + d_shift   # centre depth
        x = (u - c) / half_w
        xc = np.clip(x, -1.0, 1.0)
        arc = hr * np.sqrt(1.0 - xc * xc)                   # half-height of the ellipse at u
        top, bottom = dc - arc, dc + arc
        in_col = np.abs(x) < 1.0
        rib_mask |= in_col & (d >= top) & (d <= bottom)
        rib_rim = np.maximum(rib_rim, in_col * _band(d - top, max(0.006, 1.2 * px)))
        # shadow under the rib, with edges softened over a few percent of u
        edge = np.clip((1.0 - np.abs(x)) / 0.15, 0.0, 1.0)
        shadow = np.maximum(shadow, edge * (d > bottom))
    shadow_mask = (shadow > 0.5) & ~rib_mask
    # lateral positions between the ribs, where lung findings are visible
    cand = np.linspace(-0.85, 0.85, 171)
    gap = np.ones_like(cand, bool)
    for c, hw_ in zip(rib_centres, rib_half_w):
        gap &= np.abs(cand - c) > hw_ + 0.06
    free_u = cand[gap] if gap.any() else cand

    # ---- chest wall layers ----------------------------------------------------------
    n_layers = int(geo.integers(2, 5))
    layer_d = np.sort(geo.uniform(0.05, 0.85, n_layers)) * p0
    echo = np.full((h, w), st.tissue_echo, np.float32)
    echo += 0.08 * np.sin(2 * np.pi * d / geo.uniform(0.03, 0.06) + geo.uniform(0, 6.3))  # muscle striation
    echo += 0.35 * _band(d - 0.012, 0.006)                  # skin
    fat_end = layer_d[0]
    echo = np.where(d < fat_end, echo * 0.55, echo)         # subcutaneous fat is darker
    for ld in layer_d:
        wave = _smooth_noise(geo, 2, 1.5, 0.01)
        echo += 0.30 * _band(d - ld - wave(u), max(0.005, 0.9 * px))   # fascia lines

    # ---- lung (below the pleura) ----------------------------------------------------
    lung_echo = 0.06 + st.lung_haze + 0.05 * np.exp(-(dist_pl) / 0.15)  # faint haze, strongest near pleura
    a_lines = np.zeros((h, w), np.float32)
    a_amp = (fs * {2: 0.75, 1: 0.35, 0: 0.06}[scan_class] + (1.0 - fs) * 0.75) * st.a_line_gain
    a_base, a_half = pleura_d, p_half * 1.1
    if local_findings:                                      # a regular lung's A-lines in every class
        a_amp, a_base, a_half = 0.75 * st.a_line_gain, smooth_pleura_d, max(0.007, 1.3 * px) * 1.1
    a_where = np.zeros((h, w), np.float32)                  # A-line profiles, amplitude 1 (findings)
    for k in range(2, 8):                                   # A-lines at multiples of the pleura depth
        dk = k * a_base
        a_band = _band(d - dk, a_half)
        a_lines += a_amp * 0.72 ** (k - 2) * a_band
        a_where = np.maximum(a_where, a_band)
    b_where = np.zeros((h, w), np.float32)                  # B-line profiles, amplitude 1 (findings)
    if scan_class == 0:                                     # B-lines: laser-like, no fading
        n_b = int(cls_rng.integers(2, 6))
        b_u = cls_rng.choice(free_u, n_b) + u_slide
        b_w = cls_rng.uniform(0.035, 0.08, n_b)
        b_a = fs * cls_rng.uniform(0.6, 0.9, n_b)
        bl = np.zeros((h, w), np.float32)
        for bu, bw, ba in zip(b_u, b_w, b_a):
            b_band = _band(u - bu, bw)
            bl = np.maximum(bl, ba * b_band)
            b_where = np.maximum(b_where, b_band)
        if local_findings:                                  # a B-line erases the A-lines it crosses
            a_lines *= 1.0 - fs * b_where
        lung_echo = lung_echo + bl * (1.0 + 0.8 * np.clip(d - pleura_d, 0, 1))  # offsets attenuation

    # ---- consolidation (pneumonia) -----------------------------------------------
    consol_mask = np.zeros((h, w), bool)
    consol_echo = None
    if scan_class == 1:
        cu = cls_rng.choice(free_u)
        cw = cls_rng.uniform(0.3, 0.55)                     # half width in u
        cdepth = cls_rng.uniform(0.2, 0.38)
        ragged = _smooth_noise(cls_rng, 6, 0.2, 0.06)      # shred sign
        xcu = np.clip((u - cu) / cw, -1, 1)
        lower = pleura_d + p_half + cdepth * np.sqrt(1 - xcu ** 4) + ragged(u)
        consol_mask = below & (np.abs(u - cu) < cw) & (d < lower)
        blotch = cv2.GaussianBlur(cls_rng.standard_normal((h, w)).astype(np.float32), (0, 0), 2.0 * h / 128)
        blotch /= blotch.std() + 1e-6
        consol_echo = 0.48 + 0.10 * blotch
        # air bronchograms: short bright branches along the beam direction
        n_air = int(cls_rng.integers(6, 14))
        for _ in range(n_air):
            au = cu + cls_rng.uniform(-0.8, 0.8) * cw
            ad = pleura_d.mean() + cls_rng.uniform(0.2, 0.85) * cdepth
            alen = cls_rng.uniform(0.02, 0.06)
            tilt = cls_rng.uniform(-0.6, 0.6)
            du = u - au - tilt * (d - ad)
            seg = _band(du, max(0.012, 1.5 / w * 2)) * _band(np.maximum(np.abs(d - ad) - alen, 0), 0.008)
            consol_echo = consol_echo + 0.75 * seg
        consol_echo += 0.35 * _band(d - lower, 0.012)      # bright ragged lower border
        consol_echo = fs * consol_echo + (1.0 - fs) * lung_echo
        # no reverberation (A-lines) below the airless region
        a_lines *= 1.0 - fs * np.clip((cw + 0.05 - np.abs(u - cu)) / 0.1, 0.0, 1.0)
    lung_echo = lung_echo + a_lines

    # ---- assemble echogenicity and labels (later assignments win) ------------------
    label = np.full((h, w), _TISSUE, np.int64)
    label[below] = _LUNG
    label[pleura_mask] = _PLEURA
    echo = np.where(below, lung_echo, echo)
    pl_bright = st.pleura_echo
    if irregular:                                           # fragmented pleura: gaps and dim pieces
        frag = _smooth_noise(cls_rng, 8, 0.12, 1.0)(u)
        pl_bright = np.where(frag > -0.25, 0.9, 0.25) * (0.8 + 0.2 * np.cos(9 * u))
        pl_bright = (fs * pl_bright + (1.0 - fs) * 0.95) * st.pleura_echo / 0.95
    echo = echo + pl_bright * _band(dist_pl, p_half) * (~below | pleura_mask)
    if scan_class == 1:
        label[consol_mask] = _CONSOL
        echo = np.where(consol_mask, consol_echo, echo)
    echo = echo * (1.0 - 0.92 * shadow)
    label[shadow_mask] = _SHADOW
    echo = np.where(rib_mask, 0.08, echo) + st.rib_rim * rib_rim
    label[rib_mask] = _RIB
    label[~inside] = _BG

    # ---- speckle, attenuation, compression ------------------------------------
    s = h / 128.0
    sig = (0.6 * s * st.speckle_size, 1.3 * s * st.speckle_size)  # axial, lateral speckle size
    z = _speckle_field(geo, h, w, sig)
    z_t = _speckle_field(frame_rng, h, w, sig)
    mix = np.where(below, 0.45, 0.08).astype(np.float32)    # the lung decorrelates faster
    z_beam = np.ascontiguousarray(np.stack([z.real, z.imag, z_t.real, z_t.imag], -1), np.float32)
    z_pix = _to_beam_grid(z_beam, u, d)
    zr = np.sqrt(1 - mix) * z_pix[..., 0] + np.sqrt(mix) * z_pix[..., 2]
    zi = np.sqrt(1 - mix) * z_pix[..., 1] + np.sqrt(mix) * z_pix[..., 3]
    speckle = np.sqrt(zr * zr + zi * zi) ** st.speckle_power  # Rayleigh, softened (log display)
    alpha = geo.uniform(*st.attenuation)
    gain = geo.uniform(0.9, 1.1) * st.gain
    atten = np.exp(-alpha * d) * (1.0 + 0.6 * d)            # attenuation, partly compensated by TGC
    amp = np.clip(echo, 0, None) * speckle * atten * gain
    k = st.compression
    img = np.log1p(k * amp) / np.log1p(k * 1.2)             # log-like compression
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), st.psf * s)  # point-spread blur
    img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    img[~inside] = 0
    if return_findings:
        lung = label == _LUNG
        return img, label, {"b_lines": lung & (b_where > 0.5), "a_lines": lung & (a_where > 0.5)}
    return img, label


# --------------------------------------------------------------------------- #
# dataset plans (pure)
# --------------------------------------------------------------------------- #
def pocus_video_plan(videos_per_class_per_fold: int = 2, seed: int = 0, n_folds: int = 5) -> list[dict]:
    """The synthetic POCUS videos, in writing order.

    Returns:
        One dict per video: ``video_id`` (0..), ``fold`` (0..n_folds-1), ``scan_class``,
        ``probe`` (every 5th video is linear, the rest convex, as in POCUS) and ``seed``.
    """
    plan = []
    for fold in range(n_folds):
        for cls in range(len(CLASS_NAMES)):
            for v in range(videos_per_class_per_fold):
                vid = len(plan)
                plan.append({"video_id": vid, "fold": fold, "scan_class": cls,
                             "probe": "linear" if vid % 5 == 4 else "convex",
                             "seed": derive_seed(seed, 3, fold, cls, v)})
    return plan


def pocus_fold_video_ids(videos_per_class_per_fold: int = 2, frames_per_video: int = 4,
                         n_folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold ``(train_video_ids, test_video_ids)``: int64 arrays aligned with the rows of
    ``X_train`` / ``X_test`` in the pickles of :func:`write_pocus_folds` (any seed)."""
    plan = pocus_video_plan(videos_per_class_per_fold, 0, n_folds)
    per_fold = [np.repeat([v["video_id"] for v in plan if v["fold"] == k], frames_per_video).astype(np.int64)
                for k in range(n_folds)]
    return [(np.concatenate([per_fold[j] for j in range(n_folds) if j != k]), per_fold[k])
            for k in range(n_folds)]


def make_pocus_folds(videos_per_class_per_fold: int = 2, frames_per_video: int = 4, size: int = 64,
                     seed: int = 0, n_folds: int = 5, finding_strength: float = 1.0,
                     return_findings: bool = False, local_findings: bool = False) -> list[tuple]:
    """The USCL 5-fold tuples in memory (``finding_strength``, ``local_findings``: see :func:`make_scan`).

    Returns:
        Per fold ``(X_train, y_train, X_test, y_test)``: X is Nx3xHxW uint8 (gray replicated),
        y is N int64 with {covid19: 0, pneumonia: 1, regular: 2}. Fold k's test set is its
        own videos, its train set the videos of all other folds. With ``return_findings``
        a fifth item describes the TEST images, row-aligned with ``X_test``:
        ``{"label": NxHxW uint8 anatomy ids, "b_lines": NxHxW bool, "a_lines": NxHxW bool}``
        (see :func:`make_scan`); the four arrays are the same with or without it.
    """
    plan = pocus_video_plan(videos_per_class_per_fold, seed, n_folds)
    xs: list[list[np.ndarray]] = [[] for _ in range(n_folds)]
    ys: list[list[int]] = [[] for _ in range(n_folds)]
    found: list[list[tuple]] = [[] for _ in range(n_folds)]
    for v in plan:
        for f in range(frames_per_video):
            img, lab, *extra = make_scan(v["seed"], size, v["probe"], v["scan_class"], frame=f,
                                         finding_strength=finding_strength, return_findings=return_findings,
                                         local_findings=local_findings)
            xs[v["fold"]].append(np.repeat(img[None], 3, axis=0))   # 3xHxW
            ys[v["fold"]].append(v["scan_class"])
            if return_findings:
                found[v["fold"]].append((lab.astype(np.uint8), extra[0]["b_lines"], extra[0]["a_lines"]))
    X = [np.stack(x).astype(np.uint8) for x in xs]
    Y = [np.asarray(y, np.int64) for y in ys]
    folds = []
    for k in range(n_folds):
        others = [j for j in range(n_folds) if j != k]
        fold = (np.concatenate([X[j] for j in others]), np.concatenate([Y[j] for j in others]), X[k], Y[k])
        if return_findings:
            fold += ({name: np.stack([t[i] for t in found[k]]) for i, name in
                      enumerate(("label", "b_lines", "a_lines"))},)
        folds.append(fold)
    return folds


def split_names(names: Sequence[str], seed: int = 0, fractions=(0.7, 0.1)) -> dict[str, list[str]]:
    """Sorted names shuffled with ``random.Random(seed)`` and cut train/val/test (70/10/20)."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}


def samus_labels(label: np.ndarray) -> dict[str, np.ndarray]:
    """Anatomy label map (HxW int64) -> the uint8 label images of the two SAMUS datasets.

    ``SynLung-Pleura``: pleural line = 255, rest 0. ``SynLung-Anatomy``: 1 rib, 2 pleura,
    3 consolidation, 0 everything else.
    """
    anat = np.zeros(label.shape, np.uint8)
    for aid, cid in SAMUS_ANATOMY_CLASSES.items():
        anat[label == aid] = cid
    return {"SynLung-Pleura": np.where(label == _PLEURA, 255, 0).astype(np.uint8),
            "SynLung-Anatomy": anat}


# --------------------------------------------------------------------------- #
# writers (I/O)
# --------------------------------------------------------------------------- #
def write_pretrain_layout(root, n_images: int = 64, size: int | tuple[int, int] = 128, seed: int = 0,
                          subsets: Sequence[str] = ("SynConvex", "SynLinear")) -> list[Path]:
    """Write ``root/train/<Sub>/{img,label}/syn_NNNNN.png`` (``n_images`` per subset).

    A subset whose name contains "linear" (any case) uses the linear probe, others the
    convex one. Classes cycle covid19, pneumonia, regular. Labels are uint8 anatomy maps.

    Returns:
        The image paths written, subset by subset.
    """
    root = Path(root)
    written = []
    for si, sub in enumerate(subsets):
        probe = "linear" if "linear" in sub.lower() else "convex"
        for i in range(n_images):
            img, lab = make_scan(derive_seed(seed, 1, si, i), size, probe, i % 3)
            name = f"syn_{i:05d}"
            ip = root / "train" / sub / "img" / f"{name}.png"
            atomic_write_png(img, ip)
            atomic_write_png(lab.astype(np.uint8), root / "train" / sub / "label" / f"{name}.png")
            written.append(ip)
    return written


def write_samus_layout(root, n_images: int = 40, size: int | tuple[int, int] = 128, seed: int = 0) -> Path:
    """Write the SAMUS segmentation layout (METHOD.md §1) with two datasets.

    ``root/<Dataset>/{img,label}/syn_NNNNN.png`` for ``SynLung-Pleura`` (binary 0/255 pleural
    line) and ``SynLung-Anatomy`` (index map 1 rib, 2 pleura, 3 consolidation), each with
    ``n_images`` different scans (probes alternate, classes cycle);
    ``root/MainPatient/{train,val,test}.txt`` with one ``<class ID>/<Dataset>/<name>`` line
    per foreground class present, split 70/10/20 by image; ``root/MainPatient/class.json``.

    Returns:
        ``root``.
    """
    root = Path(root)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for di, ds in enumerate(SAMUS_DATASETS):
        present: dict[str, list[int]] = {}
        for i in range(n_images):
            img, lab = make_scan(derive_seed(seed, 2, di, i), size, PROBES[i % 2], i % 3)
            out = samus_labels(lab)[ds]
            name = f"syn_{i:05d}"
            atomic_write_png(img, root / ds / "img" / f"{name}.png")
            atomic_write_png(out, root / ds / "label" / f"{name}.png")
            # class IDs present: the binary 255 foreground is class 1
            present[name] = [1 if c == 255 else int(c) for c in np.unique(out) if c != 0]
        for split, names in split_names(list(present), seed).items():
            for name in names:
                lines[split] += [f"{c}/{ds}/{name}" for c in present[name]]
    _write_main_patient(root, lines, SAMUS_DATASETS)
    return root


def _write_main_patient(root: Path, lines: dict[str, list[str]], classes: dict[str, int]) -> None:
    """``root/MainPatient/{split}.txt`` (one line each) and ``class.json``, atomically."""
    for split, ls in lines.items():
        text = "".join(l + "\n" for l in ls).encode()
        atomic_write(root / "MainPatient" / f"{split}.txt", lambda f, t=text: f.write(t))
    cls_json = (json.dumps(classes, indent=4) + "\n").encode()
    atomic_write(root / "MainPatient" / "class.json", lambda f: f.write(cls_json))


LUNG_DATASET = "SynLung-Lung"  # every anatomy id of ANATOMY_IDS but background is a class
#: the A-SAM prompt keys of the lung anatomies, in anatomy-id order (soft tissue .. rib shadow)
LUNG_PROMPTS: tuple[str, ...] = tuple(f"{LUNG_DATASET}/{i}" for i in range(1, len(ANATOMY_IDS)))


def write_lung_layout(root, n_images: int = 200, size: int = 256, seed: int = 0,
                      style: ScanStyle | str = "realistic", seg_root=None) -> Path:
    """SAMUS layout of one data set, ``SynLung-Lung``, whose label maps are the anatomy ids
    themselves (1 soft tissue, 2 rib, 3 pleura, 4 lung, 5 consolidation, 6 rib shadow; 0 outside
    the fan): one A-SAM prompt per lung anatomy. Three scans in four are convex (as the
    COVID-BLUES and most POCUS videos), classes cycle; split 70/10/20 by image.

    ``seg_root``: another SAMUS root (e.g. HC18 + USGRA) whose data sets are linked into
    ``root`` (symbolic links, nothing copied) and whose split lines and class.json entries are
    merged in, so one stage 2 trains on both.
    Returns ``root``.
    """
    root = Path(root)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    classes: dict[str, int] = {}
    if seg_root is not None:
        seg_root = Path(seg_root).resolve()
        classes.update(json.loads((seg_root / "MainPatient" / "class.json").read_text()))
        for ds in classes:
            link = root / ds
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(seg_root / ds, target_is_directory=True)
        for split in lines:
            f = seg_root / "MainPatient" / f"{split}.txt"
            if f.is_file():
                lines[split] += [l.strip() for l in f.read_text().splitlines() if l.strip()]
    present: dict[str, list[int]] = {}
    for i in range(n_images):
        probe = "linear" if i % 4 == 3 else "convex"
        img, lab = make_scan(derive_seed(seed, 4, i), size, probe, i % 3, style=style)
        name = f"lung_{i:05d}"
        atomic_write_png(img, root / LUNG_DATASET / "img" / f"{name}.png")
        atomic_write_png(lab.astype(np.uint8), root / LUNG_DATASET / "label" / f"{name}.png")
        present[name] = [int(c) for c in np.unique(lab) if c != _BG]
    for split, names in split_names(list(present), seed).items():
        lines[split] += [f"{c}/{LUNG_DATASET}/{n}" for n in names for c in present[n]]
    classes[LUNG_DATASET] = len(ANATOMY_IDS)
    _write_main_patient(root, lines, classes)
    return root


def write_pocus_folds(root, videos_per_class_per_fold: int = 2, frames_per_video: int = 4,
                      size: int = 64, seed: int = 0, finding_strength: float = 1.0,
                      local_findings: bool = False) -> list[Path]:
    """Write ``root/covid_data{1..5}.pkl`` in the USCL format (see :func:`make_pocus_folds`).

    Pickled with protocol 4 (as the USCL files) through the atomic writer of utils.io;
    readable with :func:`utils.io.safe_pickle_load`. Row-aligned video ids:
    :func:`pocus_fold_video_ids`.
    """
    root = Path(root)
    paths = []
    folds = make_pocus_folds(videos_per_class_per_fold, frames_per_video, size, seed,
                             finding_strength=finding_strength, local_findings=local_findings)
    for k, fold in enumerate(folds):
        p = root / f"covid_data{k + 1}.pkl"
        atomic_write(p, lambda f, o=fold: pickle.dump(o, f, protocol=4))
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m utils.synthetic_us",
        description="Write synthetic lung ultrasound data sets in the layouts the ACLUS stages read.")
    ap.add_argument("--out", default="dataset",
                    help="output folder: pretrain -> OUT/train/<Sub>/{img,label}, samus -> OUT/samus, "
                         "pocus -> OUT/pocus, lung -> OUT/lung_seg (default: dataset)")
    ap.add_argument("--layouts", default="pretrain,samus,pocus",
                    help="comma-separated subset of pretrain,samus,pocus,lung (default: the first three; "
                         "lung: one SAMUS class per lung anatomy, write_lung_layout)")
    ap.add_argument("--style", default="realistic", choices=sorted(STYLES),
                    help="look of the lung layout's scans (default: realistic)")
    ap.add_argument("--seg_root", default=None,
                    help="lung layout: link this SAMUS root's data sets in beside it (e.g. HC18 + USGRA)")
    ap.add_argument("--n", type=int, default=64,
                    help="images per pretrain subset, per SAMUS dataset and of the lung layout (default: 64)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; same seed -> same files (default: 0)")
    ap.add_argument("--pocus-videos", type=int, default=2,
                    help="POCUS videos per class per fold (default: 2 -> 30 videos)")
    ap.add_argument("--pocus-frames", type=int, default=4, help="frames per POCUS video (default: 4)")
    args = ap.parse_args(argv)

    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    unknown = set(layouts) - {"pretrain", "samus", "pocus", "lung"}
    if unknown:
        ap.error(f"unknown layout(s) {sorted(unknown)}; choose from pretrain, samus, pocus, lung")
    if args.seg_root and not (Path(args.seg_root) / "MainPatient" / "class.json").is_file():
        ap.error(f"--seg_root {args.seg_root}: no MainPatient/class.json there")
    out = Path(args.out)
    try:
        check_flag_ranges(args, {"--n": AT_LEAST_1, "--size": Range(16), "--seed": SEED,
                                 "--pocus-videos": AT_LEAST_1, "--pocus-frames": AT_LEAST_1})
        ensure_writable_dir(out, "--out")
    except DataError as e:
        print(f"synthetic_us: error: {e}", file=sys.stderr)
        return 2
    if "pretrain" in layouts:
        paths = write_pretrain_layout(out, args.n, args.size, args.seed)
        print(f"pretrain: {len(paths)} image/label pairs under {out / 'train'}")
    if "samus" in layouts:
        root = write_samus_layout(out / "samus", args.n, args.size, args.seed)
        print(f"samus: {len(SAMUS_DATASETS)} datasets x {args.n} pairs, splits in {root / 'MainPatient'}")
    if "pocus" in layouts:
        paths = write_pocus_folds(out / "pocus", args.pocus_videos, args.pocus_frames, args.size, args.seed)
        n_img = 5 * 3 * args.pocus_videos * args.pocus_frames
        print(f"pocus: {len(paths)} fold pickles ({n_img} images) in {out / 'pocus'}")
    if "lung" in layouts:
        root = write_lung_layout(out / "lung_seg", args.n, args.size, args.seed, args.style, args.seg_root)
        print(f"lung: {args.n} {args.style} scans with one class per anatomy in {root / LUNG_DATASET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
