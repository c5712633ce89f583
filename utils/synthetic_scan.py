"""Deterministic synthetic lung ultrasound scans with exact integer anatomy label maps.

The scan model; the data sets written from it (pre-training folders, SAMUS segmentation
pairs, USCL POCUS 5-fold pickles) and their command line: :mod:`utils.synthetic_us`.

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

from dataclasses import dataclass

import cv2
import numpy as np

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
