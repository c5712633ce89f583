#!/usr/bin/env python
"""Pre-training study: COVID-BLUES pre-training -> POCUS 5-fold, arms x seeds x checkpoints x protocols.

    python study_real_data.py --covid_blues ../shared/data/covid_blues --pocus ../shared/data/pocus \\
        --arms random,bn_control,byol,aclus_superpixel,detcon_superpixel   # the committed CPU run
    python study_real_data.py ... --preset cpu_long --arms random,bn_control,byol,lightly_byol,...  # the campaign
    python study_real_data.py ... --preset cpu_long --arms byol --seeds 0 --epochs 10 --base_lr 2  # lr sweep point
    python study_real_data.py ... --preset gpu                      # one H100-class GPU, paper-like settings
    python study_real_data.py ... --asam_ckpt runs/asam_lite/best.pt   # with the A-SAM arms
    python study_real_data.py ... --asam_build ../shared/data/seg      # train that A-SAM first (CPU: hours)
    python study_real_data.py ... --arms aclus_asam_lung --asam_lung_ckpt runs/lung_asam/stage2/best.pt
    python study_real_data.py --render_only                         # tables + figures from docs/results/study
    python study_real_data.py ... --preset smoke --out /tmp/s --results /tmp/s/results   # minutes, measures nothing

Arms (``--arms``): ``random`` (the seed's random start), ``bn_control`` (that start with the
corpus's BatchNorm statistics, study/bn_control.py), ``byol`` (classic, whole image), ``lightly_byol`` (the same with lightly's heads and loss),
``<detcon|aclus>_<superpixel|asam|sam_auto|asam_lung>`` (sam_auto: SAM's everything mode,
SAM/auto_masks.py; asam_lung: an A-SAM taught the lung anatomies on synthetic scans,
benchmarks/measure_lung_asam.py, with its lung prompts only). Every arm runs for every seed of the preset, and every
pre-trained arm takes the same optimizer steps at the same batch; each is probed after
25 / 50 / 100 % of its steps (``checkpoint.snapshot_fractions``) by every protocol of the
preset (``evaluation_aclus.py``: linear, kNN, fine-tune), on the same 5 POCUS folds (split by
video). No POCUS frame enters pre-training.

Two folders:

* ``--out`` (local, never committed: frames, masks, checkpoints, evaluation JSONs, logs).
  Every stage is a real stage script run as a subprocess and skipped when its output exists.
* ``--results`` (committed; default ``docs/results/study`` for the CPU preset,
  ``docs/results/study_gpu`` for the GPU one, ``<out>/results`` for the smoke preset): ``per_fold.csv``, ``runs.csv``, ``loss.csv``,
  ``mask_stats.json``, ``settings.json``, ``results.md`` and figures. The files are rewritten
  after every evaluation; an (arm, seed) whose rows are all in ``per_fold.csv`` is not run again,
  so a study stopped on one machine continues on another from the committed files. Rows made
  with other preset settings are refused (use another ``--results``).

Order: seed by seed (every arm of seed 0 first), so that a stopped study has paired rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from study import StudyError  # noqa: E402
from study import results as res  # noqa: E402
from study.results import read_json, write_json  # noqa: E402
from study.plan import (BASELINES, DEFAULT_ARMS, PRESETS, SOURCE_FLAGS, SUB, Preset,  # noqa: E402
                        arm_fractions, equal_step_epochs, expected_keys, parse_run, pretrain_overrides,
                        variant_of)
from study.provenance import code_version, git_state, machine, package_versions  # noqa: E402
from utils import mask_layout as layout  # noqa: E402
from utils.stage_runner import ResumableStages, StageFailed  # noqa: E402

SELECTION = "last"  # fixed C / k / epochs: nothing is chosen on any test fold


# --------------------------------------------------------------------------- #
# helpers
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


def preset_of(a: argparse.Namespace) -> tuple[Preset, str]:
    """The preset with the command line's own changes (seeds, stride; epochs and base_lr make a
    variant, whose runs live apart), and the variant's name (``""``: none)."""
    p, variant = variant_of(PRESETS[a.preset], epochs=a.epochs, base_lr=a.base_lr)
    changes = {}
    if a.seeds:
        changes["seeds"] = tuple(int(s) for s in a.seeds.split(","))
    if a.frame_stride is not None:
        changes["frame_stride"] = a.frame_stride
    return dataclasses.replace(p, **changes), variant


class Results:
    """The committed result files of one study (``--results``), kept in memory and rewritten whole."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows = res.read_rows(folder / "per_fold.csv", res.FOLD_COLUMNS)
        self.runs = res.read_rows(folder / "runs.csv", res.RUN_COLUMNS)
        self.loss = res.read_rows(folder / "loss.csv", res.LOSS_COLUMNS)

    def done(self, arm: str, seed: int, preset: Preset) -> bool:
        return expected_keys(arm, preset) <= res.done_keys(self.rows, arm, seed)

    def add_rows(self, new: list[dict]) -> None:
        self.rows = res.replace_rows(self.rows, new, ("arm", "seed", "fraction", "protocol", "fold"))
        res.write_rows(self.folder / "per_fold.csv", self.rows, res.FOLD_COLUMNS)

    def add_run(self, run: dict, loss: list[dict]) -> None:
        self.runs = res.replace_rows(self.runs, [run], ("arm", "seed"))
        self.loss = [r for r in self.loss if (r["arm"], r["seed"]) != (run["arm"], run["seed"])] + loss
        res.write_rows(self.folder / "runs.csv", self.runs, res.RUN_COLUMNS)
        res.write_rows(self.folder / "loss.csv", self.loss, res.LOSS_COLUMNS)


def check_results_folder(folder: Path, preset: Preset) -> None:
    """Refuse to add rows to a results folder made with other preset settings."""
    path = folder / "settings.json"
    if not path.is_file() or not (folder / "per_fold.csv").is_file():
        return
    before = read_json(path).get("preset", {})
    now = preset.to_dict()
    for k, v in now.items():
        if k in ("seeds", "workers", "threads"):  # more seeds extend a study; workers change no number
            continue
        if k not in before:  # a preset key newer than the rows: nothing to compare
            continue
        old = before[k]      # None too: a base_lr left to the config is not the same as base_lr 2.0
        if (list(old) if isinstance(old, (list, tuple)) else old) != \
                (list(v) if isinstance(v, (list, tuple)) else v):
            raise StudyError(f"{path}: its rows were made with preset {k}={old!r}, now {v!r}; "
                             "use another --results to compare settings")


# --------------------------------------------------------------------------- #
# stages
# --------------------------------------------------------------------------- #
def build_masks(a, st: ResumableStages, out: Path, frames: Path, sources: set[str], py: str) -> dict[str, str]:
    """Label trees and pair lists for each needed source; returns {source: why missing} for those not built."""
    missing = {}
    asam_ckpt = a.asam_ckpt
    if "asam" in sources and not asam_ckpt and not a.asam_masks and a.asam_build:
        asam_dir = out / "asam_lite"
        st.run("asam_build", [py, "SAM/train_auto_prompter.py", "--task", "HC18_USGRA", "--data_root",
                              str(Path(a.asam_build).resolve()), "--backbone", "lite", "--out_dir", str(asam_dir),
                              "--eval_test"], [asam_dir / "best.pt"],
               note="A-SAM stage 2 (lite) on HC18 + USGRA: hours on a CPU")
        asam_ckpt = str(asam_dir / "best.pt")
    for source in sorted(sources):
        labels = out / "masks" / source
        if source == "superpixel":
            st.run("masks_superpixel", [py, "utils/superpixel_masks.py", "--data_dir", str(frames),
                                        "--out_dir", str(labels), "--scale", str(a.sp_scale),
                                        "--min_area", str(a.sp_min_area), "--max_segments", str(a.sp_max_segments)],
                   [labels / SUB / layout.LABEL_DIR])
        elif source == "sam_auto":
            st.run("masks_sam_auto", [py, "SAM/auto_masks.py", "--data_dir", str(frames), "--out_dir", str(labels),
                                      "--device", "cpu", "--montage", "none", "--min_pred_iou", "0.75",
                                      "--min_stability", "0.75", "--nms_iou", "0.7", "--min_area", "0.004",
                                      "--max_regions", "32", "--overlap", "small_on_top"],
                   [labels / SUB / layout.LABEL_DIR],
                   note="SAM everything mode (LiteMedSAM): ~15 s per frame on a 2-core CPU")
        elif source == "asam_lung":
            if not a.asam_lung_ckpt:
                missing[source] = "no lung A-SAM checkpoint (--asam_lung_ckpt; benchmarks/measure_lung_asam.py trains one)"
                continue
            from utils.synthetic_us import LUNG_PROMPTS
            st.run("masks_asam_lung", [py, "SAM/infer_masks.py", "--ckpt", str(Path(a.asam_lung_ckpt).resolve()),
                                       "--data_dir", str(frames), "--out_dir", str(labels), "--batch_size",
                                       str(a.asam_batch), "--workers", "0", "--device", "cpu",
                                       "--prompts", ",".join(LUNG_PROMPTS)],
                   [labels / SUB / layout.LABEL_DIR], note="lung A-SAM inference (its lung-anatomy prompts)")
        elif a.asam_masks:
            src = Path(a.asam_masks).resolve() / SUB / layout.LABEL_DIR
            if not src.is_dir():
                raise StudyError(f"{src}: --asam_masks must hold {SUB}/label/*.png")
            link(src, labels / SUB / layout.LABEL_DIR)
        elif asam_ckpt:
            cmd = [py, "SAM/infer_masks.py", "--ckpt", str(Path(asam_ckpt).resolve()), "--data_dir", str(frames),
                   "--out_dir", str(labels), "--batch_size", str(a.asam_batch), "--workers", "0",
                   "--device", "cpu"]
            if a.asam_prompts:
                cmd += ["--prompts", a.asam_prompts]
            st.run("masks_asam", cmd, [labels / SUB / layout.LABEL_DIR], note="A-SAM inference")
        else:
            missing[source] = "no A-SAM checkpoint (--asam_ckpt, --asam_masks or --asam_build)"
            continue
        data = out / "pretrain_data" / source
        link(frames / SUB / layout.IMG_DIR, layout.split_dir(data) / SUB / layout.IMG_DIR)
        link(labels / SUB / layout.LABEL_DIR, layout.split_dir(data) / SUB / layout.LABEL_DIR)
        st.run(f"pickles_{source}", [py, "utils/generate_masks_pkls.py", "--data_dir", str(data)],
               [layout.pairs_file(data)])
    return missing


def mask_statistics(out: Path, frames: Path, sources: list[str], view: int) -> dict:
    """utils.mask_stats.summarise of every built source's label maps (frames without a label count as empty)."""
    import numpy as np

    from utils.io import read_label
    from utils.mask_stats import frame_stats, summarise

    stats = {}
    for source in sources:
        jobs = layout.label_jobs(frames, out / "masks" / source)
        per = [frame_stats(read_label(lab) if lab.is_file() else np.zeros((8, 8), np.int64), view)
               for _, lab in jobs]
        stats[source] = summarise(per)
    return stats


def log_records(run_dir: Path) -> list[dict]:
    from utils.plots import read_log

    return read_log(run_dir / "log.jsonl") if (run_dir / "log.jsonl").is_file() else []


def snapshot_paths(run_dir: Path, fractions: tuple[float, ...], total_steps: int) -> list[tuple[float, int, Path]]:
    """(fraction, steps, encoder file) of each probe point of a finished run."""
    from pretrain_aclus import snapshot_steps

    out = []
    for f in fractions:
        if f >= 1.0:
            out.append((1.0, total_steps, run_dir / "encoder_resnet18.pth"))
        else:
            (steps,) = snapshot_steps((f,), total_steps)
            out.append((f, steps, run_dir / f"encoder_resnet18_step{steps}.pth"))
    return out


# --------------------------------------------------------------------------- #
# study
# --------------------------------------------------------------------------- #
def portable(arg: str | None) -> str | None:
    """An absolute path as seen from the repository root (settings.json is committed: no machine's
    own folders in it); any other argument (None too) as it is."""
    return os.path.relpath(arg, REPO) if arg is not None and os.path.isabs(arg) else arg


def recorded_command(argv: list[str]) -> list[str]:
    """The command line as settings.json keeps it: paths from the repository root, and the
    local ``--out`` folder (machine-specific, never committed) as a placeholder."""
    out, skip = [], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if skip:
            out.append("<local study folder>")
        elif flag == "--out" and eq:
            out.append("--out=<local study folder>")
        elif flag.startswith("--") and eq:
            out.append(f"{flag}={portable(value)}")
        else:
            out.append(portable(arg))
        skip = arg == "--out"
    return out


def arms_not_run(arms: list[str], missing: dict[str, str], a: argparse.Namespace) -> dict[str, str]:
    """Every default arm this study has no rows for, with the reason: its masks are missing, or it
    was left out of ``--arms`` (then: what it would need)."""
    given = {"asam": a.asam_ckpt or a.asam_masks or a.asam_build, "asam_lung": a.asam_lung_ckpt}
    out = dict(missing)
    for arm in DEFAULT_ARMS:
        if arm in arms or arm in out:
            continue
        source = parse_run(arm).pairs_source if arm not in BASELINES else None
        need = f"; it needs {SOURCE_FLAGS[source]}" if source in SOURCE_FLAGS and not given.get(source) else ""
        out[arm] = f"not in this run's --arms{need}"
    return out


def default_results(preset: str, out: Path, variant: str = "") -> Path:
    """docs/results/study (cpu), docs/results/study_<preset> (others), a variant's in its
    ``variants/<name>`` sub-folder; a smoke run's rows stay in <out>/results."""
    if preset == "smoke":
        return out / "results" / variant if variant else out / "results"
    folder = REPO / "docs" / "results" / ("study" if preset == "cpu" else f"study_{preset}")
    return folder / "variants" / variant if variant else folder


def study(a: argparse.Namespace) -> int:
    preset, variant = preset_of(a)
    out = Path(a.out or f"outputs/study/{preset.name}").resolve()
    results = Path(a.results or default_results(preset.name, out, variant)).resolve()
    # a variant (another schedule or lr) shares the frames, masks and folds, not the runs
    work = out / "variants" / variant if variant else out
    tag = f"{variant}_" if variant else ""
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    check_results_folder(results, preset)
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(preset.threads), MKL_NUM_THREADS=str(preset.threads),
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    st = ResumableStages(out, env)
    store = Results(results)
    arms = [x for x in a.arms.split(",") if x]
    earlier = read_json(results / "settings.json") if (results / "settings.json").is_file() else {}
    done_before = completed_pairs(store, arms, preset)
    runs = {arm: parse_run(arm) for arm in arms if arm not in BASELINES}
    t0 = time.time()
    all_arms = list(dict.fromkeys([*earlier.get("arms", []), *arms]))  # a run of fewer arms extends the study
    settings = {"preset": preset.to_dict(), "variant": variant, "arms": all_arms, "where": machine(preset.device),
                "selection": SELECTION, "command": [Path(sys.argv[0]).name, *recorded_command(sys.argv[1:])],
                "started": dt.datetime.now().isoformat(timespec="seconds"), "packages": package_versions(),
                "git": git_state(), "sources": {"covid_blues": portable(a.covid_blues), "pocus": portable(a.pocus),
                            "downstream": portable(a.downstream)},
                "made_by": earlier.get("made_by", {})}
    if earlier and earlier.get("sources", {}).get("downstream") != settings["sources"]["downstream"]:
        raise StudyError(f"{results}: its rows were evaluated on "
                         f"{earlier.get('sources', {}).get('downstream') or 'POCUS'}, this run asks for "
                         f"{settings['sources']['downstream'] or 'POCUS'}; give another --results")
    if "note" in earlier:  # a hand-written account of earlier sittings (a lost machine) is kept
        settings["note"] = earlier["note"]

    def save_settings() -> None:
        """settings.json as of now: written after every finished (arm, seed), so a run that is
        killed without its ``finally`` (a lost machine) still says which commit made which rows."""
        settings["stage_wall_s"] = {k: v.get("wall_s") for k, v in st.records.items()}
        settings["session_wall_s"] = round(time.time() - t0, 1)
        settings["pending"] = pending(store, all_arms, preset, settings.get("missing_arms", {}))
        settings["made_by"] = res.attribute_pairs(earlier.get("made_by", {}), code_version(settings["git"]),
                                                  done_before, completed_pairs(store, arms, preset))
        if settings.get("steps") is not None:
            write_json(results / "settings.json", settings)

    try:
        # frames of the corpus (never a POCUS frame)
        frames = out / "frames"
        videos = find_videos(Path(a.covid_blues))
        pick = ["--every", str(preset.frame_stride)] if preset.frame_stride else ["--num", str(preset.frames_per_video)]
        sources_arg = [str(videos[0].parent.resolve())]
        if preset.videos:
            sources_arg = [str(v.resolve()) for v in videos[: preset.videos]]
        st.run("extract_frames", [py, "utils/extract_frames.py", "--videos", *sources_arg, "--out_dir", str(frames),
                                  "--sub", SUB, *pick], [frames / SUB / layout.IMG_DIR])
        n_frames = len([e for e in layout.find_images(frames) if e.sub == SUB])
        # masks of the sources the arms need
        needed = {r.pairs_source for r in runs.values()}
        missing_sources = build_masks(a, st, out, frames, needed, py)
        missing_arms = {arm: missing_sources[r.pairs_source] for arm, r in runs.items()
                        if r.pairs_source in missing_sources}
        built = sorted(needed - set(missing_sources))
        stats_file = results / "mask_stats.json"  # merged: a run of fewer arms keeps the other sources' stats
        known = read_json(stats_file) if stats_file.is_file() else {}
        if not set(built) <= set(known):
            known.update(mask_statistics(out, frames, [s for s in built if s not in known], preset.img_size))
            write_json(stats_file, known)
        frames_of = {arm: len(layout.load_pairs(out / "pretrain_data" / r.pairs_source))
                     for arm, r in runs.items() if arm not in missing_arms}
        # the downstream folds, once: POCUS's by video, or another set's (an ImageFolder's split made here)
        folds, split_args, settings["downstream"] = downstream_folds(a, st, out, preset, py)
        reference = max(frames_of.values()) if frames_of else n_frames
        steps = preset.epochs * (reference // preset.batch_size)
        settings.update(corpus={"videos": len(videos) if not preset.videos else preset.videos, "frames": n_frames,
                                "pretrain_frames": frames_of}, steps=steps,
                        missing_arms=arms_not_run(all_arms, missing_arms, a))
        save_settings()

        def eval_cmd(protocols: str, encoder: Path, eval_dir: Path, seed: int) -> list[str]:
            return [py, "evaluation_aclus.py", "--data_path", str(folds), "--protocol", protocols,
                    "--selection", SELECTION, "--img_size", str(preset.img_size), "--seed", str(seed),
                    "--epochs", str(preset.ft_epochs), "--workers", str(preset.workers), "--device", preset.device,
                    "--out_dir", str(eval_dir), "--ckpt_path", str(encoder), *split_args]

        def evaluate(arm: str, seed: int, fraction: float, steps_done: int, encoder: Path) -> None:
            point = f"f{fraction:.2f}"
            eval_dir = work / "eval" / arm / f"seed{seed}" / point
            jsons = [eval_dir / f"eval_{p}_{SELECTION}.json" for p in preset.protocols]
            st.run(f"{tag}eval_{arm}_s{seed}_{point}", eval_cmd(",".join(preset.protocols), encoder, eval_dir, seed), jsons)
            run = runs.get(arm)
            new = []
            for j in jsons:
                new += res.fold_rows(read_json(j), arm=arm, method=run.method if run else arm,
                                     mask_source=run.mask_source if run else None, seed=seed,
                                     fraction=fraction, steps=steps_done)
            store.add_rows(new)
            if a.gradcam and fraction in (0.0, 1.0):  # maps stay in <out> (real pixels: never committed)
                cam_dir = eval_dir / "gradcam"
                st.run(f"{tag}gradcam_{arm}_s{seed}", [*eval_cmd("linear", encoder, cam_dir, seed), "--gradcam",
                                                  str(a.gradcam)], [cam_dir / f"eval_linear_{SELECTION}.json"])

        extra = preset.overrides + ((f"optimizer.base_lr={preset.base_lr}",) if preset.base_lr is not None else ())
        for seed in preset.seeds:
            for arm in arms:
                if arm in missing_arms:
                    continue
                if store.done(arm, seed, preset):
                    print(f"[skip] {arm} seed {seed}: its rows are in {results / 'per_fold.csv'}", flush=True)
                    continue
                if arm in BASELINES:
                    enc = work / "runs" / arm / f"seed{seed}" / "encoder_resnet18.pth"
                    cmd = [py, "-m", "study.bn_control", "--out", str(enc), "--seed", str(seed),
                           "--img_size", str(preset.img_size),
                           "--statistics", "start" if arm == "random" else "corpus"]
                    if arm == "bn_control":
                        cmd += ["--frames", str(frames)]
                    st.run(f"{tag}{arm}_s{seed}", cmd, [enc])
                    evaluate(arm, seed, 0.0, 0, enc)
                    save_settings()
                    continue
                run = runs[arm]
                run_dir = work / "runs" / arm / f"seed{seed}"
                epochs, warmup = equal_step_epochs(frames_of[arm], reference, preset.batch_size, preset.epochs,
                                                   preset.warmup_epochs)
                fractions = arm_fractions(arm, preset)
                cmd = [py, "pretrain_aclus.py", "--cfg", str(REPO / preset.base_config), "--device", preset.device,
                       *pretrain_overrides(run, out / "pretrain_data" / run.pairs_source, run_dir,
                                           img_size=preset.img_size, batch_size=preset.batch_size, epochs=epochs,
                                           warmup_epochs=warmup, seed=seed, workers=preset.workers,
                                           crop_scale=preset.crop_scale, log_step=a.log_step,
                                           fractions=fractions, extra=extra)]
                rec = st.run(f"{tag}pretrain_{arm}_s{seed}", cmd, [run_dir / "encoder_resnet18.pth"])
                records = log_records(run_dir)
                total = epochs * (frames_of[arm] // preset.batch_size)
                epoch_s = [r.get("seconds", 0.0) for r in records if r.get("kind") == "epoch"]
                store.add_run(res.run_row(arm=arm, method=run.method, mask_source=run.mask_source, seed=seed,
                                          frames=frames_of[arm], batch_size=preset.batch_size, epochs=epochs,
                                          steps=total, train_s=round(sum(epoch_s), 1) if epoch_s else None,
                                          wall_s=rec.get("wall_s")),
                              res.loss_rows(records, arm, seed))
                for fraction, steps_done, enc in snapshot_paths(run_dir, fractions, total):
                    evaluate(arm, seed, fraction, steps_done, enc)
                save_settings()
    except (StudyError, StageFailed) as e:
        print(f"study_real_data.py: {e}", file=sys.stderr)
        return 1
    finally:
        save_settings()
    render(results)
    return 0


def completed_pairs(store: Results, arms: list[str], preset: Preset) -> set[str]:
    """``"arm seed N"`` of every (arm, seed) of this study whose rows are all there."""
    return {f"{arm} seed {s}" for s in preset.seeds for arm in arms if store.done(arm, s, preset)}


def pending(store: Results, arms: list[str], preset: Preset, missing: dict) -> list[str]:
    return [f"{arm} seed {s}" for s in preset.seeds for arm in arms
            if arm not in missing and not store.done(arm, s, preset)]


def render(results: Path) -> Path:
    """results.md, figures and the README / RESULTS block from the files of ``results``."""
    from study.render import render_all

    path = results / "settings.json"
    if not path.is_file():
        raise StudyError(f"{path}: not found; --render_only needs a results folder of a study")
    settings = read_json(path)
    store = Results(results)
    if not store.rows:
        raise StudyError(f"{results / 'per_fold.csv'}: no rows yet")
    mask_stats = read_json(results / "mask_stats.json") if (results / "mask_stats.json").is_file() else {}
    docs = (REPO / "README.md", REPO / "docs" / "RESULTS.md") if results == (REPO / "docs/results/study").resolve() else ()
    md = render_all(results, store.rows, store.runs, store.loss, mask_stats, settings, docs)
    print(f"rendered {md} ({len(store.rows)} rows)" + (f"; updated {', '.join(d.name for d in docs)}" if docs else ""))
    return md


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu (2-core CPU: ~36 min per seed of the five arms without A-SAM), cpu_long (64 px, 40 epochs: "
                        "the many-sittings campaign), gpu (one H100-class GPU), smoke (minutes; checks the machinery)")
    p.add_argument("--covid_blues", help="COVID-BLUES folder (holding lus_videos/*.mp4); required unless --render_only")
    p.add_argument("--pocus", help="covid19_ultrasound checkout (utils.pocus_folds --src); the downstream set unless "
                                   "--downstream is given")
    p.add_argument("--downstream", default=None, metavar="DIR",
                   help="another labelled downstream set instead of POCUS: anything evaluation_aclus.py --data_path "
                        "reads (a plain <class>/ ImageFolder gets stratified, grouped folds made once, shared by "
                        "every arm and seed)")
    p.add_argument("--downstream_groups", default=None, metavar="CSV",
                   help="--downstream ImageFolder: file,group CSV (evaluation_aclus.py --groups)")
    p.add_argument("--downstream_group_rule", default=None,
                   help="--downstream ImageFolder: evaluation_aclus.py --group_rule (folder, frame or a regex)")
    p.add_argument("--out", default=None, help="local study folder (default outputs/study/<preset>; never committed)")
    p.add_argument("--results", default=None,
                   help="committed results folder (default docs/results/study, docs/results/study_gpu; "
                        "smoke: <out>/results)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help="comma list: random, bn_control, byol, <detcon|aclus>_<superpixel|asam|sam_auto|asam_lung>")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default: the preset's)")
    p.add_argument("--frame_stride", type=int, default=None, help="every k-th COVID-BLUES frame (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="another schedule length (a variant: its runs and rows live apart, the warm-up keeps its share)")
    p.add_argument("--base_lr", type=float, default=None,
                   help="another optimizer.base_lr (a variant, e.g. one point of a learning-rate sweep)")
    p.add_argument("--asam_ckpt", default=None, help="A-SAM stage-2 checkpoint for SAM/infer_masks.py")
    p.add_argument("--asam_masks", default=None, help="precomputed A-SAM label tree <DIR>/COVID-BLUES/label/*.png")
    p.add_argument("--asam_build", default=None, metavar="SEG_ROOT",
                   help="no A-SAM checkpoint: train one (lite backbone, HC18 + USGRA under SEG_ROOT) first")
    p.add_argument("--asam_lung_ckpt", default=None,
                   help="stage-2 checkpoint that knows the SynLung-Lung anatomies (source asam_lung; "
                        "benchmarks/measure_lung_asam.py trains one)")
    p.add_argument("--asam_prompts", default=None, help="infer_masks --prompts (default: all of the checkpoint)")
    p.add_argument("--asam_batch", type=int, default=4, help="infer_masks --batch_size")
    p.add_argument("--gradcam", type=int, default=0, metavar="N",
                   help="Grad-CAM of N test images per class and fold for each arm's final encoder (linear probe), "
                        "under <out>/eval/ (0 = off)")
    p.add_argument("--sp_scale", type=float, default=30.0, help="superpixel_masks --scale")
    p.add_argument("--sp_min_area", type=float, default=0.004, help="superpixel_masks --min_area")
    p.add_argument("--sp_max_segments", type=int, default=32, help="superpixel_masks --max_segments")
    p.add_argument("--log_step", type=int, default=5, help="pre-training log interval (steps)")
    p.add_argument("--render_only", action="store_true",
                   help="only render results.md, figures and the README / RESULTS block from --results")
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    if a.render_only:
        results = Path(a.results or REPO / "docs/results/study").resolve()
        return _one_line_errors(lambda: (render(results), 0)[1])
    if not a.covid_blues or bool(a.pocus) == bool(a.downstream):
        print("study_real_data.py: error: --covid_blues and one of --pocus or --downstream are required "
              "(unless --render_only)", file=sys.stderr)
        return 2
    for arm in (x for x in a.arms.split(",") if x):
        if arm not in BASELINES:
            try:
                parse_run(arm)
            except ValueError as e:
                print(f"study_real_data.py: error: --arms: {e}", file=sys.stderr)
                return 2
    from utils.flags import AT_LEAST_0, AT_LEAST_1, POSITIVE, PROBABILITY, check_flag_ranges
    from utils.io import DataError

    try:
        check_flag_ranges(a, {"--frame_stride": AT_LEAST_1, "--epochs": AT_LEAST_1, "--base_lr": POSITIVE,
                              "--asam_batch": AT_LEAST_1, "--gradcam": AT_LEAST_0, "--sp_scale": POSITIVE,
                              "--sp_min_area": PROBABILITY, "--sp_max_segments": AT_LEAST_1,
                              "--log_step": AT_LEAST_1})
    except DataError as e:
        print(f"study_real_data.py: error: {e}", file=sys.stderr)
        return 2
    if a.seeds is not None and not re.fullmatch(r"\d+(,\d+)*", a.seeds):
        print(f"study_real_data.py: error: --seeds {a.seeds!r}: expected a comma list of integers", file=sys.stderr)
        return 2
    if a.gradcam:  # the evaluation would refuse it, but only after frames, masks and pre-training
        from evaluation_aclus import check_gradcam_args

        try:
            check_gradcam_args(argparse.Namespace(gradcam=a.gradcam, img_size=PRESETS[a.preset].img_size))
        except DataError as e:
            print(f"study_real_data.py: error: {e} (preset {a.preset})", file=sys.stderr)
            return 2
    for flag, path in (("--covid_blues", a.covid_blues), ("--pocus", a.pocus), ("--downstream", a.downstream),
                       ("--downstream_groups", a.downstream_groups), ("--asam_ckpt", a.asam_ckpt),
                       ("--asam_masks", a.asam_masks), ("--asam_build", a.asam_build),
                       ("--asam_lung_ckpt", a.asam_lung_ckpt)):
        if path and not Path(path).exists():
            print(f"study_real_data.py: error: {flag} {path}: not found", file=sys.stderr)
            return 2
    return _one_line_errors(lambda: study(a))


def downstream_folds(a, st: ResumableStages, out: Path, preset, py: str) -> tuple[Path, list[str], dict]:
    """(the evaluation's --data_path, its extra flags, what settings.json records about the set)."""
    if not a.downstream:
        folds = out / "pocus_5fold"
        st.run("pocus_folds", [py, "-m", "utils.pocus_folds", "--src", str(Path(a.pocus).resolve()),
                               "--out", str(folds), "--frames_per_video", str(preset.pocus_frames_per_video),
                               "--size", str(preset.img_size), "--seed", "0"], [folds / "covid_data5.pkl"])
        return folds, [], {"name": "POCUS", "folds": 5, "split": "split by video"}
    from evaluation.data import SPLIT_NAME, DataOptions, open_data, write_split_csv
    from utils.io import atomic_write

    root = Path(a.downstream).resolve()
    keep = out / "downstream"  # the split of an ImageFolder, made once and reused by every run
    data = open_data(root, DataOptions(groups=a.downstream_groups, group_rule=a.downstream_group_rule), keep)
    for note in data.notes:
        print(f"note: {note}")
    split_args = []
    if data.rows is not None:
        atomic_write(keep / SPLIT_NAME, lambda f: f.write(write_split_csv(data.rows)))
        split_args = ["--split", str(keep / SPLIT_NAME)]
        how = ("grouped by " + (f"{Path(a.downstream_groups).name}" if a.downstream_groups else
                                f"the rule {a.downstream_group_rule}") if a.downstream_groups or a.downstream_group_rule
               else "split per image")
    else:
        how = "its own folds"
    return root, split_args, {"name": root.name, "layout": data.kind, "folds": data.num_folds,
                              "classes": list(data.classes), "split": how}


def _one_line_errors(fn) -> int:
    """``fn()``, with a bad file of the study folders (corrupt JSON or CSV, log, pickle, label PNG) reported
    in one line naming it instead of a traceback."""
    from utils.io import DataError
    from utils.plots import LogError

    try:
        return fn()
    except (StudyError, StageFailed, DataError, LogError) as e:
        print(f"study_real_data.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
