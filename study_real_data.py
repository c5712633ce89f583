#!/usr/bin/env python
"""Real-data study: COVID-BLUES pre-training (BYOL / DetCon / ACLUS) -> POCUS linear probe.

    python study_real_data.py --covid_blues ../shared/data/covid_blues --pocus ../shared/data/pocus \\
        --out outputs/study/real --mask_sources superpixel                    # no A-SAM yet
    python study_real_data.py ... --asam_ckpt runs/asam_lite/best.pt          # add the A-SAM runs
    python study_real_data.py ... --smoke --out /tmp/study_smoke               # minutes: tiny everything

Stages (each the real stage script run as a subprocess, so nothing here is a separate code
path; each is skipped when its output exists, so an interrupted study is re-run as is):

  a frames       utils/extract_frames.py       N evenly spaced frames per COVID-BLUES video
  b masks        utils/superpixel_masks.py     Felzenszwalb superpixels (DetCon's mask source)
                 SAM/infer_masks.py            A-SAM masks (--asam_ckpt), or --asam_masks DIR
  c pickles      utils/generate_masks_pkls.py  one pair list per mask source
  d pre-train    pretrain_aclus.py             one compute budget for every run: same
                                               img_size, batch, number of steps, seed, config
                                               (a mask source that leaves frames out gets
                                               more epochs over its fewer frames)
  e evaluate     utils.pocus_folds (once) + evaluation_aclus.py --protocol linear,
                                               random init and every pre-trained encoder
  f report       results.md / results.json, figures/ (loss curves per term, confusion
                 matrices, mask overlays, accuracy bars), settings.json (every setting,
                 command line, wall time and package version)

Runs (``--runs``): ``byol`` (image level: one whole-image mask, so its mask source is
irrelevant; it reads the superpixel pair list for its images), ``<method>_<source>`` with
method detcon | aclus and source superpixel | asam. Runs whose mask source is unavailable
are listed as missing in the results, not silently dropped. A failing stage stops the study
with its name, exit status and log file.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from study import StudyError  # noqa: E402
from study.plan import (DEFAULT_RUNS, MASK_SOURCES, SUB, equal_step_epochs, parse_run,  # noqa: E402
                        plan_runs, pretrain_overrides)
from study.provenance import git_state, package_versions  # noqa: E402
from study.report import pretrain_frames, read_json, write_json, write_report  # noqa: E402
from utils import mask_layout as layout  # noqa: E402
from utils.stage_runner import ResumableStages, StageFailed  # noqa: E402


# --------------------------------------------------------------------------- #
# study
# --------------------------------------------------------------------------- #
def find_videos(covid_blues: Path) -> list[Path]:
    folder = covid_blues / "lus_videos" if (covid_blues / "lus_videos").is_dir() else covid_blues
    videos = sorted(p for p in folder.glob("*.mp4") if p.is_file())
    if not videos:
        raise StudyError(f"{folder}: no .mp4 videos (expected <covid_blues>/lus_videos/*.mp4)")
    return videos


def link(target: Path, at: Path) -> None:
    """Relative symlink ``at -> target`` (replaced if it points elsewhere)."""
    at.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, at.parent)
    if at.is_symlink():
        if os.readlink(at) == rel:
            return
        at.unlink()
    elif at.exists():
        raise StudyError(f"{at}: exists and is not a link; remove it or use another --out")
    os.symlink(rel, at)


def smoke_settings(a: argparse.Namespace) -> None:
    """Tiny everything: a few frames of a few videos, a few steps, 32 px."""
    a.smoke_videos = a.smoke_videos or 4
    a.frames_per_video, a.img_size, a.batch_size, a.epochs, a.warmup_epochs = 2, 32, 4, 2, 1
    a.pocus_frames_per_video, a.workers, a.log_step, a.overlay_n = 1, 0, 1, 4


def build_masks(a, st: ResumableStages, out: Path, frames: Path, py: str) -> set[str]:
    """Stage b + c: label trees and pair lists for each requested source; returns those available."""
    available = set()
    for source in a.mask_sources:
        labels = out / "masks" / source
        if source == "superpixel":
            st.run("masks_superpixel", [py, "utils/superpixel_masks.py", "--data_dir", str(frames),
                                        "--out_dir", str(labels), "--scale", str(a.sp_scale),
                                        "--min_area", str(a.sp_min_area), "--max_segments", str(a.sp_max_segments)],
                   [labels / SUB / layout.LABEL_DIR])
        elif a.asam_masks:
            src = Path(a.asam_masks).resolve() / SUB / layout.LABEL_DIR
            if not src.is_dir():
                raise StudyError(f"{src}: --asam_masks must hold {SUB}/label/*.png")
            link(src, labels / SUB / layout.LABEL_DIR)
        elif a.asam_ckpt:
            cmd = [py, "SAM/infer_masks.py", "--ckpt", str(Path(a.asam_ckpt).resolve()), "--data_dir", str(frames),
                   "--out_dir", str(labels), "--batch_size", str(a.asam_batch), "--workers", str(a.workers),
                   "--montage", str(out / "figures" / "asam_montage.png"), "--device", "cpu"]
            if a.asam_prompts:
                cmd += ["--prompts", a.asam_prompts]
            st.run("masks_asam", cmd, [labels / SUB / layout.LABEL_DIR], note="A-SAM inference, slow on a CPU")
        else:
            print("[note] A-SAM source requested but neither --asam_ckpt nor --asam_masks given: skipped", flush=True)
            continue
        data = out / "pretrain_data" / source
        link(frames / SUB / layout.IMG_DIR, layout.split_dir(data) / SUB / layout.IMG_DIR)
        link(labels / SUB / layout.LABEL_DIR, layout.split_dir(data) / SUB / layout.LABEL_DIR)
        st.run(f"pickles_{source}", [py, "utils/generate_masks_pkls.py", "--data_dir", str(data)],
               [layout.pairs_file(data)])
        available.add(source)
    return available


def report_only(a: argparse.Namespace) -> int:
    """Rebuild the report of a study folder (finished or still running) without running any stage."""
    out = Path(a.out).resolve()
    path = out / "settings.json"
    if not path.is_file():
        print(f"study_real_data.py: error: {path}: not found; --report_only needs a study folder", file=sys.stderr)
        return 2
    settings = read_json(path)
    if not isinstance(settings.get("args"), dict):
        raise StudyError(f"{path}: no 'args' section; not the settings.json of a study")
    b = argparse.Namespace(**{**settings["args"], "overlay_n": a.overlay_n})
    st = ResumableStages(out, dict(os.environ))
    names = [r for r in b.runs.split(",") if r]
    sources = {s for s in MASK_SOURCES if layout.pairs_file(out / "pretrain_data" / s).is_file()}
    _, missing = plan_runs(names, sources)
    write_report(b, out, st.records, names, sources, missing, settings, out / "frames")
    return 0


def budget_clash(path: Path, settings: dict) -> str | None:
    """Why ``settings`` cannot continue the study of ``path`` (another budget), or None."""
    if not path.is_file():
        return None
    before = read_json(path)
    for section in ("fixed_budget", "eval"):
        for k, v in settings[section].items():
            old = before.get(section, {}).get(k)
            if old is not None and old != v:
                return (f"{path}: this study was run with {section}.{k}={old!r}, now {v!r}; "
                        "use another --out to compare settings")
    return None


def study(a: argparse.Namespace) -> int:
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    st = ResumableStages(out, env)
    t_start = time.time()
    names = [r for r in a.runs.split(",") if r]  # main() has parsed each
    settings = {"args": vars(a), "argv": sys.argv, "started": dt.datetime.now().isoformat(timespec="seconds"),
                "packages": package_versions(), "git": git_state(), "cpu_count": os.cpu_count(),
                "platform": platform.platform(), "threads": a.threads,
                "fixed_budget": {"img_size": a.img_size, "batch_size": a.batch_size, "epochs": a.epochs,
                                 "warmup_epochs": a.warmup_epochs, "seed": a.seed, "base_config": a.base_config,
                                 "crop_scale": a.crop_scale, "data_workers": a.workers,
                                 "num_examples": a.num_examples},
                "eval": {"protocol": "linear", "selection": a.eval_selection, "img_size": a.img_size,
                         "seed": a.eval_seed, "pocus_frames_per_video": a.pocus_frames_per_video,
                         "fold_seed": a.fold_seed}}
    clash = budget_clash(out / "settings.json", settings)
    if clash:
        print(f"study_real_data.py: error: {clash}", file=sys.stderr)
        return 1
    write_json(out / "settings.json", settings)
    try:
        # a: frames
        frames = out / "frames"
        videos = find_videos(Path(a.covid_blues))
        sources_arg = [str(videos[0].parent.resolve())]  # the folder: a short, stable command line
        if a.smoke_videos:
            videos = videos[: a.smoke_videos]
            sources_arg = [str(v.resolve()) for v in videos]
        st.run("extract_frames", [py, "utils/extract_frames.py", "--videos", *sources_arg,
                                  "--out_dir", str(frames), "--sub", SUB, "--num", str(a.frames_per_video)],
               [frames / SUB / layout.IMG_DIR], note=f"{len(videos)} videos x {a.frames_per_video} frames")
        # b, c: masks and pair lists
        sources = build_masks(a, st, out, frames, py)
        runs, missing = plan_runs(names, sources)
        # e (once): POCUS folds, then the random-init baseline
        folds = out / "pocus_5fold"
        st.run("pocus_folds", [py, "-m", "utils.pocus_folds", "--src", str(Path(a.pocus).resolve()),
                               "--out", str(folds), "--frames_per_video", str(a.pocus_frames_per_video),
                               "--size", str(a.img_size), "--seed", str(a.fold_seed)],
               [folds / "covid_data5.pkl"])
        tag = f"linear_{a.eval_selection}"

        def evaluate(name: str, ckpt: Path | None) -> None:
            cmd = [py, "evaluation_aclus.py", "--data_path", str(folds), "--protocol", "linear",
                   "--selection", a.eval_selection, "--img_size", str(a.img_size), "--seed", str(a.eval_seed),
                   "--workers", str(a.workers), "--device", "cpu", "--out_dir", str(out / "eval" / name)]
            if ckpt is not None:
                cmd += ["--ckpt_path", str(ckpt)]
            if a.gradcam:  # maps stay in <out>/eval/<name>/gradcam/ (real pixels: never committed)
                cmd += ["--gradcam", str(a.gradcam)]
            st.run(f"eval_{name}", cmd, [out / "eval" / name / f"eval_{tag}.json"])

        evaluate("random", None)
        # d + e: pre-train each run under the same budget (same number of steps), then probe it
        frames_of = {run.name: pretrain_frames(out, run, a.num_examples) for run in runs}
        for run in runs:
            run_dir = out / "runs" / run.name
            epochs, warmup = equal_step_epochs(frames_of[run.name], max(frames_of.values()), a.batch_size,
                                               a.epochs, a.warmup_epochs)
            cmd = [py, "pretrain_aclus.py", "--cfg", str(REPO / a.base_config), "--device", "cpu",
                   *pretrain_overrides(run, out / "pretrain_data" / run.pairs_source, run_dir,
                                       img_size=a.img_size, batch_size=a.batch_size, epochs=epochs,
                                       warmup_epochs=warmup, seed=a.seed, workers=a.workers,
                                       crop_scale=tuple(a.crop_scale), log_step=a.log_step,
                                       num_examples=a.num_examples)]
            resumed = (run_dir / "latest.pth").is_file() and f"pretrain_{run.name}" not in st.records
            st.run(f"pretrain_{run.name}", cmd, [run_dir / "encoder_resnet18.pth"],
                   note="resumed from latest.pth" if resumed else "")
            evaluate(run.name, run_dir / "encoder_resnet18.pth")
    except (StudyError, StageFailed) as e:
        print(f"study_real_data.py: {e}", file=sys.stderr)
        return 1
    finally:
        settings["stages"] = st.records
        write_json(out / "settings.json", settings)

    # f: report
    write_report(a, out, st.records, names, sources, missing, settings, frames)
    settings.update(finished=dt.datetime.now().isoformat(timespec="seconds"),
                    study_wall_s=round(time.time() - t_start, 1))
    write_json(out / "settings.json", settings)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--covid_blues", help="COVID-BLUES folder (holding lus_videos/*.mp4); required unless --report_only")
    p.add_argument("--pocus", help="covid19_ultrasound checkout (utils.pocus_folds --src); required unless --report_only")
    p.add_argument("--out", required=True, help="study folder (re-running resumes it)")
    p.add_argument("--asam_ckpt", default=None, help="A-SAM stage-2 checkpoint for SAM/infer_masks.py")
    p.add_argument("--asam_masks", default=None, help="precomputed A-SAM label tree <DIR>/COVID-BLUES/label/*.png "
                                                       "(instead of running inference)")
    p.add_argument("--asam_prompts", default=None, help="infer_masks --prompts (default: all of the checkpoint)")
    p.add_argument("--asam_batch", type=int, default=4, help="infer_masks --batch_size")
    p.add_argument("--mask_sources", default="superpixel,asam",
                   type=lambda s: [x for x in s.split(",") if x], help="comma list of superpixel, asam")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                   help="comma list: byol, detcon_superpixel, detcon_asam, aclus_asam, aclus_superpixel")
    p.add_argument("--frames_per_video", type=int, default=2, help="evenly spaced frames per COVID-BLUES video")
    p.add_argument("--img_size", type=int, default=112, help="pre-training view side and evaluation input side")
    p.add_argument("--batch_size", type=int, default=8, help="pre-training batch (one process)")
    p.add_argument("--epochs", type=int, default=4, help="pre-training epochs (the same for every run)")
    p.add_argument("--warmup_epochs", type=int, default=1)
    p.add_argument("--num_examples", type=int, default=0, help="pre-train on the first N pairs only (0 = all)")
    p.add_argument("--crop_scale", type=float, nargs=2, default=[0.2, 1.0], help="RandomResizedCrop scale")
    p.add_argument("--seed", type=int, default=0, help="pre-training seed")
    p.add_argument("--base_config", default="configs/study_cpu.yaml", help="pre-training config, relative to the repo")
    p.add_argument("--log_step", type=int, default=5, help="pre-training log interval (steps)")
    p.add_argument("--pocus_frames_per_video", type=int, default=16, help="utils.pocus_folds --frames_per_video")
    p.add_argument("--fold_seed", type=int, default=0, help="utils.pocus_folds --seed")
    p.add_argument("--eval_selection", default="last", choices=("last", "val", "paper"),
                   help="evaluation_aclus.py --selection (linear: last = fixed C)")
    p.add_argument("--eval_seed", type=int, default=1, help="evaluation seed (paper: 1)")
    p.add_argument("--gradcam", type=int, default=0, metavar="N",
                   help="evaluation_aclus.py --gradcam N: Grad-CAM of N test images per class and fold, "
                        "under <out>/eval/<run>/gradcam/ (0 = off)")
    p.add_argument("--sp_scale", type=float, default=30.0, help="superpixel_masks --scale")
    p.add_argument("--sp_min_area", type=float, default=0.004, help="superpixel_masks --min_area")
    p.add_argument("--sp_max_segments", type=int, default=32, help="superpixel_masks --max_segments")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of every stage")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of every stage")
    p.add_argument("--overlay_n", type=int, default=8, help="frames in the mask-overlay figures")
    p.add_argument("--report_only", action="store_true",
                   help="rebuild results.md/json and figures of --out from what exists (no stage runs; "
                        "the settings come from <out>/settings.json), e.g. while a study is running")
    p.add_argument("--smoke", action="store_true", help="tiny run: 4 videos, 32 px, 4 steps, 1 POCUS frame per video")
    p.add_argument("--smoke_videos", type=int, default=0, help="only the first N videos (smoke sets 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    if a.report_only:
        return _one_line_errors(report_only, a)
    if not a.covid_blues or not a.pocus:
        print("study_real_data.py: error: --covid_blues and --pocus are required (unless --report_only)",
              file=sys.stderr)
        return 2
    if a.smoke:
        smoke_settings(a)
    bad = [s for s in a.mask_sources if s not in MASK_SOURCES]
    if bad:
        print(f"study_real_data.py: error: unknown mask source {bad[0]!r}; expected {list(MASK_SOURCES)}",
              file=sys.stderr)
        return 2
    try:
        [parse_run(r) for r in a.runs.split(",") if r]
    except ValueError as e:
        print(f"study_real_data.py: error: {e}", file=sys.stderr)
        return 2
    if a.warmup_epochs >= a.epochs:
        print("study_real_data.py: error: --warmup_epochs must be < --epochs", file=sys.stderr)
        return 2
    if a.gradcam:  # the evaluation would refuse it, but only after frames, masks and pre-training
        from evaluation_aclus import check_gradcam_args
        from utils.io import DataError

        try:
            check_gradcam_args(argparse.Namespace(gradcam=a.gradcam, img_size=a.img_size))
        except DataError as e:
            print(f"study_real_data.py: error: {e}", file=sys.stderr)
            return 2
    for flag, path in (("--covid_blues", a.covid_blues), ("--pocus", a.pocus), ("--asam_ckpt", a.asam_ckpt)):
        if path and not Path(path).exists():
            print(f"study_real_data.py: error: {flag} {path}: not found", file=sys.stderr)
            return 2
    return _one_line_errors(study, a)


def _one_line_errors(fn, a: argparse.Namespace) -> int:
    """``fn(a)``, with a bad file of the study folder (corrupt JSON, log, pickle, label PNG) reported in one
    line naming it instead of a traceback."""
    from utils.io import DataError
    from utils.plots import LogError

    try:
        return fn(a)
    except (StudyError, StageFailed, DataError, LogError) as e:
        print(f"study_real_data.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
