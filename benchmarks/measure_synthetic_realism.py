"""How real do the synthetic lung scans look? Statistics of real frames against each scan style.

    # the study's local folders hold both real sets (frames never enter the repository)
    python benchmarks/measure_synthetic_realism.py \\
        --real COVID-BLUES=outputs/study/cpu/frames --real POCUS-convex=outputs/study/cpu/pocus_5fold/images
    # ... --fit: search the ScanStyle that matches the calibration half best (prints it; a
    #     later run without --fit keeps that record in the JSON beside its new measurements)

Real frames are split by video (the name before ``_f<index>``): even-numbered videos in sorted
order calibrate (``--fit``), odd-numbered ones are held out, and every figure written is on the
held-out half. Per real set and style (``classic``, ``realistic`` of
:mod:`utils.synthetic_us`, and with ``--fit`` the fitted one): the distances of
:func:`utils.realism.distances` and the real-vs-synthetic accuracy of
:func:`utils.realism.separability`; the two real sets against each other give the scale
(how different two real lung data sets already are).

Writes ``--out`` (default docs/results/synthetic_realism.json: statistics only, no image) and a
montage of synthetic scans per style (``--montage``, default figs/synthetic_styles.png).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from utils import realism  # noqa: E402
from utils.extract_frames import spread_evenly, video_of  # noqa: E402
from utils.io import atomic_write, atomic_write_png, read_image  # noqa: E402
from utils.synthetic_scan import STYLES, ScanStyle, derive_seed, make_scan  # noqa: E402

# how much each statistic may differ before it costs one unit in the fit's score
SCALES = {"histogram_w1": 5.0, "depth_profile_mad": 5.0, "speckle_contrast_diff": 0.03,
          "corr_axial_diff": 0.05, "corr_lateral_diff": 0.05, "fov_share_diff": 0.05,
          "width_top_diff": 0.05, "width_bottom_diff": 0.05, "std_diff": 5.0, "bright_ratio_diff": 0.5,
          "ridge_diff": 0.05}
# the search space of --fit: (low, high) per field; range fields get (lo, lo + width)
SPACE = {"half_angle": (0.45, 0.85, 0.12), "apex": (0.2, 1.2, 0.2), "tissue_echo": (0.12, 0.5),
         "pleura_echo": (0.25, 1.0), "a_line_gain": (0.15, 1.0), "rib_rim": (0.15, 1.0),
         "lung_haze": (0.0, 0.3), "speckle_size": (1.0, 2.5), "speckle_power": (0.3, 0.8),
         "psf": (0.6, 2.0), "attenuation": (0.3, 2.0, 0.7), "gain": (0.3, 1.5),
         "compression": (1.0, 10.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="append", default=[], metavar="NAME=FOLDER",
                   help="a real set: PNG frames under FOLDER (recursive), named <video>_f<index>.png")
    p.add_argument("--per_video", type=int, default=2, help="frames per real video (2)")
    p.add_argument("--n_synthetic", type=int, default=120, help="synthetic scans per style (120)")
    p.add_argument("--fit", action="store_true", help="search the best ScanStyle on the calibration half")
    p.add_argument("--candidates", type=int, default=300, help="random candidates of --fit (300)")
    p.add_argument("--refine", type=int, default=150, help="local perturbations of the best (150)")
    p.add_argument("--fit_synthetic", type=int, default=40, help="scans per candidate (40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs/results/synthetic_realism.json"))
    p.add_argument("--montage", default=str(REPO / "figs/synthetic_styles.png"))
    a = p.parse_args(argv)
    if not a.real:
        p.error("give at least one --real NAME=FOLDER")
    sets = {}
    for item in a.real:
        name, _, folder = item.partition("=")
        if not folder or not Path(folder).is_dir():
            p.error(f"--real {item}: expected NAME=FOLDER with an existing folder")
        sets[name] = Path(folder)
    a.real = sets
    return a


def real_frames(folder: Path, per_video: int) -> dict[str, list[list[Path]]]:
    """{"calibration"|"held_out": [frames of one video, ...]}: up to ``per_video`` evenly spaced
    frames per video; even-numbered videos (sorted) calibrate, odd-numbered ones are held out."""
    videos: dict[str, list[Path]] = {}
    for f in sorted(folder.rglob("*.png")):
        videos.setdefault(video_of(f.stem), []).append(f)
    out: dict[str, list[list[Path]]] = {"calibration": [], "held_out": []}
    for i, (_, frames) in enumerate(sorted(videos.items())):
        out["calibration" if i % 2 == 0 else "held_out"].append(spread_evenly(frames, per_video))
    return out


def features_of(videos: list[list[Path]]) -> tuple[np.ndarray, np.ndarray]:
    feats, groups = [], []
    for v, frames in enumerate(videos):
        for f in frames:
            feats.append(realism.image_features(read_image(f, "gray")))
            groups.append(v)
    return np.array(feats), np.array(groups)


def synthetic_features(style: ScanStyle, n: int, seed: int) -> np.ndarray:
    """Convex scans, classes cycling, at 128 px (the statistics' own size)."""
    return np.array([realism.image_features(make_scan(derive_seed(seed, 7, i), realism.SIDE, "convex",
                                                      i % 3, style=style)[0]) for i in range(n)])


def score(dist: dict) -> float:
    return float(sum(abs(dist[k]) / s for k, s in SCALES.items()))


def sample_style(rng: np.random.Generator, around: ScanStyle | None = None, step: float = 0.15) -> ScanStyle:
    """A random style from :data:`SPACE`, or (``around``) a perturbation of one by ``step`` of
    each field's range, clipped to the range."""
    kw = {}
    for name, spec in SPACE.items():
        lo, hi = spec[0], spec[1]
        if around is None:
            v = rng.uniform(lo, hi)
        else:
            cur = getattr(around, name)
            cur = cur[0] if isinstance(cur, tuple) else cur
            v = float(np.clip(cur + rng.normal(0, step * (hi - lo)), lo, hi))
        kw[name] = (round(v, 3), round(v + spec[2], 3)) if len(spec) == 3 else round(float(v), 3)
    return ScanStyle(**kw)


def fit_style(calib: dict[str, np.ndarray], a: argparse.Namespace) -> tuple[ScanStyle, list]:
    """Random search, then local refinement: the style whose mean score over the real sets'
    calibration halves is lowest."""
    rng = np.random.default_rng(a.seed)

    def mean_score(style):
        syn = synthetic_features(style, a.fit_synthetic, a.seed + 1)
        return float(np.mean([score(realism.distances(r, syn)) for r in calib.values()]))
    best, best_s, history = STYLES["classic"], mean_score(STYLES["classic"]), []
    for i in range(a.candidates + a.refine):
        cand = sample_style(rng, None if i < a.candidates else best,
                            step=0.15 if i < a.candidates + a.refine // 2 else 0.05)
        s = mean_score(cand)
        if s < best_s:
            best, best_s = cand, s
            history.append({"candidate": i, "score": s})
            print(f"  candidate {i}: score {s:.2f}", flush=True)
    return best, history


def compare(real: dict[str, tuple[np.ndarray, np.ndarray]], syn: np.ndarray, seed: int) -> dict:
    return {name: {"distances": realism.distances(f, syn),
                   "score": score(realism.distances(f, syn)),
                   "separability": realism.separability(f, syn, groups, seed=seed)}
            for name, (f, groups) in real.items()}


def montage(styles: dict[str, ScanStyle], path: Path, n: int = 6, side: int = 128) -> None:
    rows = [np.hstack([make_scan(derive_seed(3, i), side, "convex", i % 3, style=st)[0] for i in range(n)])
            for st in styles.values()]
    img = np.vstack(rows)
    for r, name in enumerate(styles):
        cv2.putText(img, name, (4, r * side + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    atomic_write_png(img, path)


def main(argv=None) -> dict:
    a = parse_args(argv)
    from benchmarks.machine import machine
    where = machine()  # the load average before any work
    t0 = time.perf_counter()
    split = {name: real_frames(folder, a.per_video) for name, folder in a.real.items()}
    for name, s in split.items():
        if min(len(s["calibration"]), len(s["held_out"])) < 5:
            raise SystemExit(f"--real {name}={a.real[name]}: {len(s['calibration']) + len(s['held_out'])} videos "
                             "(<video>_f<index>.png frames); at least 10 are needed (5 folds on each half)")
    held = {name: features_of(s["held_out"]) for name, s in split.items()}
    styles = dict(STYLES)
    result: dict = {"what": "real lung frames vs synthetic scans (utils/realism.py statistics, 128 px)",
                    "settings": {k: (v if k != "real" else {n: Path(f).name for n, f in v.items()})
                                 for k, v in vars(a).items() if k not in ("out", "montage")},
                    "score_scales": SCALES,
                    "real": {name: {"videos_calibration": len(s["calibration"]),
                                    "videos_held_out": len(s["held_out"]),
                                    "frames_held_out": int(len(held[name][0])),
                                    "statistics": realism.set_statistics(held[name][0])}
                             for name, s in split.items()}}
    if a.fit:
        calib = {name: features_of(s["calibration"])[0] for name, s in split.items()}
        fitted, history = fit_style(calib, a)
        styles["fitted"] = fitted
        result["fit"] = {"style": dataclasses.asdict(fitted), "history": history,
                         **{k: getattr(a, k) for k in ("candidates", "refine", "fit_synthetic", "seed")}}
        print(f"fitted (paste into utils/synthetic_scan.REALISTIC): {fitted!r}")
    elif Path(a.out).is_file() and "fit" in json.loads(Path(a.out).read_text()):
        # a re-measurement keeps the record of the fit that chose REALISTIC
        result["fit"] = json.loads(Path(a.out).read_text())["fit"]
    result["styles"] = {}
    for name, style in styles.items():
        syn = synthetic_features(style, a.n_synthetic, a.seed + 2)
        result["styles"][name] = {"style": dataclasses.asdict(style),
                                  "statistics": realism.set_statistics(syn),
                                  "vs_real": compare(held, syn, a.seed)}
    names = list(held)
    if len(names) >= 2:  # the scale: two real sets against each other
        (fa, ga), (fb, gb) = held[names[0]], held[names[1]]
        result["real_vs_real"] = {"sets": names[:2], "distances": realism.distances(fa, fb),
                                  "score": score(realism.distances(fa, fb)),
                                  "separability": realism.separability(fa, fb, ga, gb, seed=a.seed)}
    result["machine"] = where
    result["machine"]["load_avg_1min_now"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - t0
    atomic_write(Path(a.out), lambda f: f.write(json.dumps(result, indent=1).encode()))
    montage(styles, Path(a.montage))
    for name, r in result["styles"].items():
        for real_name, v in r["vs_real"].items():
            print(f"{name:>10} vs {real_name:<14} score {v['score']:6.2f}  hist W1 "
                  f"{v['distances']['histogram_w1']:5.1f}  depth {v['distances']['depth_profile_mad']:5.1f}  "
                  f"logistic {v['separability']['logistic']['accuracy']:.2f}  "
                  f"trees {v['separability']['boosted_trees']['accuracy']:.2f}")
    print(f"wrote {a.out} and {a.montage} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
