#!/usr/bin/env python
"""Pre-training study: COVID-BLUES pre-training -> POCUS 5-fold, arms x seeds x checkpoints x protocols.

    python study_real_data.py --covid_blues ../shared/data/covid_blues --pocus ../shared/data/pocus \\
        --arms random,bn_control,byol,aclus_superpixel,detcon_superpixel   # the committed CPU run
    python study_real_data.py ... --preset cpu_long --arms random,bn_control,byol,lightly_byol,...  # the campaign
    python study_real_data.py ... --preset cpu_long --arms byol --seeds 0 --epochs 10 --base_lr 2  # lr sweep point
    python study_real_data.py ... --preset gpu                      # one H100-class GPU, paper-like settings
    python study_real_data.py ... --asam_ckpt runs/asam_lite/best.pt   # with the A-SAM arms
    python study_real_data.py ... --asam_build ../shared/data/seg      # train that A-SAM first (CPU: hours)
    python study_real_data.py ... --arms aclus_asam_lung --asam_lung_ckpt runs/lung_asam/stage2_neg0.5_present/best.pt
    python study_real_data.py --render_only                         # tables + figures from docs/results/study
    python study_real_data.py ... --preset smoke --out /tmp/s --results /tmp/s/results   # minutes, measures nothing

Arms (``--arms``): ``random`` (the seed's random start), ``bn_control`` (that start with the
corpus's BatchNorm statistics, study/bn_control.py), ``byol`` (classic, whole image), ``lightly_byol`` (the same with lightly's heads and loss),
``lightly_byol_x2`` (those with the loss doubled: our byol's gradient scale, the BYOL parity check),
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
from study.downstream import downstream_folds  # noqa: E402
from study.mask_sources import MASK_SOURCES, SUB, MaskJob, link  # noqa: E402
from study.plan import (BASELINES, DEFAULT_ARMS, PRESETS, SOURCE_FLAGS, Preset, arm_fractions,  # noqa: E402
                        equal_step_epochs, parse_run, pretrain_overrides, variant_of)
from study.provenance import (code_version, git_state, machine, package_versions, portable,  # noqa: E402
                              recorded_command)
from study.results import (Results, check_results_folder, completed_pairs, pending, read_json,  # noqa: E402
                           study_seeds, write_json)
from utils import mask_layout as layout  # noqa: E402
from utils.stage_files import ENCODER_NAME, eval_result_name, snapshot_name  # noqa: E402
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


# --------------------------------------------------------------------------- #
# stages
# --------------------------------------------------------------------------- #
def build_masks(a, st: ResumableStages, out: Path, frames: Path, sources: set[str], py: str) -> dict[str, str]:
    """Label trees (:mod:`study.mask_sources`) and pair lists for each needed source; returns
    {source: why missing} for those not built."""
    missing = {}
    for source in sorted(sources):
        labels = out / "masks" / source
        why = MASK_SOURCES[source].make(MaskJob(a, st, out, frames, labels, py))
        if why:
            missing[source] = why
            continue
        data = out / "pretrain_data" / source
        link(frames / SUB / layout.IMG_DIR, layout.split_dir(data) / SUB / layout.IMG_DIR)
        link(labels / SUB / layout.LABEL_DIR, layout.split_dir(data) / SUB / layout.LABEL_DIR)
        st.run(f"pickles_{source}", [py, "utils/generate_masks_pkls.py", "--data_dir", str(data)],
               [layout.pairs_file(data)])
    return missing


def mask_statistics(out: Path, frames: Path, sources: list[str], view: int) -> dict:
    """pretraining.mask_stats.summarise of every built source's label maps (frames without a label count as empty)."""
    import numpy as np

    from pretraining.mask_stats import frame_stats, summarise
    from utils.io import read_label

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
    from pretraining.run_files import snapshot_steps

    out = []
    for f in fractions:
        if f >= 1.0:
            out.append((1.0, total_steps, run_dir / ENCODER_NAME))
        else:
            (steps,) = snapshot_steps((f,), total_steps)
            out.append((f, steps, run_dir / snapshot_name(steps)))
    return out


# --------------------------------------------------------------------------- #
# study
# --------------------------------------------------------------------------- #
def arms_not_run(arms: list[str], missing: dict[str, str], a: argparse.Namespace) -> dict[str, str]:
    """Every default arm this study has no rows for, with the reason: its masks are missing, or it
    was left out of ``--arms`` (then: what it would need)."""
    given = {name: source.given(a) for name, source in MASK_SOURCES.items()}
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
    # the study's seeds, not this run's alone: a run of fewer seeds extends the study (and its pending list)
    design = dataclasses.replace(preset, seeds=study_seeds(earlier, store.rows, preset))
    settings = {"preset": design.to_dict(), "variant": variant, "arms": all_arms, "where": machine(preset.device),
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
        settings["pending"] = pending(store, all_arms, design, settings.get("missing_arms", {}))
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
        # the step budget comes from the corpus, never from this run's arms: an A-SAM arm run alone
        # (fewer frames: its masks find no anatomy on some) takes the steps it takes beside the others
        reference = n_frames
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
            jsons = [eval_dir / eval_result_name(p, SELECTION) for p in preset.protocols]
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
                                                  str(a.gradcam)], [cam_dir / eval_result_name("linear", SELECTION)])

        extra = preset.overrides + ((f"optimizer.base_lr={preset.base_lr}",) if preset.base_lr is not None else ())
        for seed in preset.seeds:
            for arm in arms:
                if arm in missing_arms:
                    continue
                if store.done(arm, seed, preset):
                    print(f"[skip] {arm} seed {seed}: its rows are in {results / 'per_fold.csv'}", flush=True)
                    continue
                if arm in BASELINES:
                    enc = work / "runs" / arm / f"seed{seed}" / ENCODER_NAME
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
                rec = st.run(f"{tag}pretrain_{arm}_s{seed}", cmd, [run_dir / ENCODER_NAME])
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
    # a study folder of docs/results/ (not a variant, not a scratch folder) owns the README / RESULTS
    # block named after it, where those files have one
    committed = results.parent == (REPO / "docs" / "results").resolve()
    docs = (REPO / "README.md", REPO / "docs" / "RESULTS.md") if committed else ()
    md = render_all(results, store.rows, store.runs, store.loss, mask_stats, settings, docs, block_name=results.name)
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
                   help=f"comma list: random, bn_control, byol, lightly_byol, lightly_byol_x2, <detcon|aclus>_<{'|'.join(MASK_SOURCES)}>")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default: the preset's)")
    p.add_argument("--frame_stride", type=int, default=None, help="every k-th COVID-BLUES frame (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="another schedule length (a variant: its runs and rows live apart, the warm-up keeps its share)")
    p.add_argument("--base_lr", type=float, default=None,
                   help="another optimizer.base_lr (a variant, e.g. one point of a learning-rate sweep)")
    p.add_argument("--gradcam", type=int, default=0, metavar="N",
                   help="Grad-CAM of N test images per class and fold for each arm's final encoder (linear probe), "
                        "under <out>/eval/ (0 = off)")
    p.add_argument("--log_step", type=int, default=5, help="pre-training log interval (steps)")
    for source in MASK_SOURCES.values():  # each source's own flags
        source.add_arguments(p.add_argument_group(f"mask source {source.name}: {source.label}"))
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
    from utils.flags import AT_LEAST_0, AT_LEAST_1, POSITIVE, check_flag_ranges
    from utils.io import DataError

    try:
        check_flag_ranges(a, {"--frame_stride": AT_LEAST_1, "--epochs": AT_LEAST_1, "--base_lr": POSITIVE,
                              "--gradcam": AT_LEAST_0, "--log_step": AT_LEAST_1,
                              **{k: v for s in MASK_SOURCES.values() for k, v in s.flag_ranges.items()}})
    except DataError as e:
        print(f"study_real_data.py: error: {e}", file=sys.stderr)
        return 2
    if a.seeds is not None and not re.fullmatch(r"\d+(,\d+)*", a.seeds):
        print(f"study_real_data.py: error: --seeds {a.seeds!r}: expected a comma list of integers", file=sys.stderr)
        return 2
    if a.gradcam:  # the evaluation would refuse it, but only after frames, masks and pre-training
        from evaluation.explain import check_gradcam_args

        try:
            check_gradcam_args(argparse.Namespace(gradcam=a.gradcam, img_size=PRESETS[a.preset].img_size))
        except DataError as e:
            print(f"study_real_data.py: error: {e} (preset {a.preset})", file=sys.stderr)
            return 2
    path_flags = ["--covid_blues", "--pocus", "--downstream", "--downstream_groups",
                  *(f for source in MASK_SOURCES.values() for f in source.path_flags)]
    for flag, path in ((f, getattr(a, f[2:])) for f in path_flags):
        if path and not Path(path).exists():
            print(f"study_real_data.py: error: {flag} {path}: not found", file=sys.stderr)
            return 2
    return _one_line_errors(lambda: study(a))


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
