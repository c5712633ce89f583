#!/usr/bin/env python
"""Segmentation downstream of a pre-training study: every arm's encoder on SAMUS-layout sets, paired by seed.

    python study_segmentation.py --study runs/study_cpu_long --data_root ../shared/data/seg \\
        --datasets FetalHead-HC18,Nerve-USGRA --results docs/results/segmentation_cpu_long
    python study_segmentation.py --render_only --results docs/results/segmentation_cpu_long

``--study`` is the ``--out`` folder of ``study_real_data.py``: its encoders are
``runs/<arm>/seed<s>/encoder_resnet18.pth``. For every data set, seed and arm whose pre-training
the study has finished (its stage record ``stages/pretrain_<arm>_s<s>.json``; ``random`` and
``bn_control`` are the study's files, or, where it has none, written as it writes them with
``study.bn_control`` under ``--work``), ``evaluation_segmentation.py`` trains a decoder at every
label fraction and variant (frozen, fine-tune) with that seed's label subsets, and its test
Dice per image goes to ``<results>/per_image.csv`` (and one row per run to ``runs.csv``):
:mod:`study.segmentation`. A (data set, arm, seed) whose rows are all there is not run again, so a
stopped run continues; an arm whose encoder does not exist yet is listed as waiting. Then
``results.md`` is rendered, and the block between ``<!-- segmentation:begin -->`` and
``<!-- segmentation:end -->`` of README.md and docs/RESULTS.md.

Evaluation outputs (JSON, logs) stay in ``--work`` (default ``<study>/eval_seg``; local, never committed).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from evaluation.segmentation import ASAM_TRAINING_SETS, FRACTIONS, VARIANTS  # noqa: E402
from study import StudyError  # noqa: E402
from study import segmentation as seg  # noqa: E402
from SAM.samus_data import read_class_json  # noqa: E402
from study.plan import BASELINES  # noqa: E402
from study.provenance import code_version, git_state, machine, recorded_command  # noqa: E402
from study.render import splice  # noqa: E402
from study.results import read_json, read_rows, write_json, write_rows  # noqa: E402
from utils.flags import AT_LEAST_1, POSITIVE, check_flag_ranges  # noqa: E402
from utils.io import DataError, atomic_write  # noqa: E402
from utils.run_lock import RunLock  # noqa: E402
from utils.stage_files import ENCODER_NAME  # noqa: E402
from utils.stage_runner import ResumableStages, StageFailed  # noqa: E402

BEGIN, END = "<!-- segmentation:begin -->", "<!-- segmentation:end -->"
#: what a re-run must share with the rows already in --results
SETTINGS_KEYS = ("study", "data_root", "img_size", "epochs", "batch_size", "lr", "fractions", "variants")


def encoder_of(study: Path, arm: str, seed: int) -> Path:
    return study / "runs" / arm / f"seed{seed}" / ENCODER_NAME


def finished(study: Path, arm: str, seed: int) -> bool:
    """Whether the study finished pre-training this (arm, seed): its stage record is there (run folders
    of older code write the encoder every epoch, so the file alone does not say the run is over)."""
    return encoder_of(study, arm, seed).is_file() and (study / "stages" / f"pretrain_{arm}_s{seed}.json").is_file()


def baseline_cmd(py: str, study: Path, out: Path, arm: str, seed: int, img_size: int) -> list[str]:
    """The command ``study_real_data.py`` writes a baseline's encoder with (here to ``out``)."""
    cmd = [py, "-m", "study.bn_control", "--out", str(out), "--seed", str(seed),
           "--img_size", str(img_size), "--statistics", "start" if arm == "random" else "corpus"]
    return cmd + (["--frames", str(study / "frames")] if arm == "bn_control" else [])


def check_settings(results: Path, now: dict) -> None:
    """Refuse to add rows to a results folder made with other evaluation settings."""
    path = results / "settings.json"
    if not path.is_file():
        return
    before = read_json(path)
    for k in SETTINGS_KEYS:
        if k in before and before[k] != now[k]:
            raise StudyError(f"{path}: its rows were made with {k}={before[k]!r}, now {now[k]!r}; "
                             "use another --results")


def render(results: Path) -> str:
    rows = read_rows(results / "per_image.csv", seg.IMAGE_COLUMNS, seg.INTS, seg.FLOATS)
    runs = read_rows(results / "runs.csv", seg.RUN_COLUMNS, seg.INTS, seg.FLOATS)
    if not rows:
        raise StudyError(f"{results / 'per_image.csv'}: no rows to render")
    if not (results / "settings.json").is_file():
        raise StudyError(f"{results / 'settings.json'}: missing (written by a run of study_segmentation.py)")
    md = seg.results_markdown(rows, runs, read_json(results / "settings.json"))
    atomic_write(results / "results.md", lambda f: f.write(md.encode()))
    # the documents show this repository's committed results only, never a scratch folder's
    docs = (REPO / "README.md", REPO / "docs" / "RESULTS.md") if results.is_relative_to(REPO / "docs" / "results") else ()
    for doc in docs:
        if doc.is_file() and BEGIN in doc.read_text():
            text = splice(doc.read_text(), f"(rendered from `{os.path.relpath(results, REPO)}` by "
                          f"`study_segmentation.py --render_only`)\n\n{md}", str(doc), BEGIN, END)
            atomic_write(doc, lambda f, t=text: f.write(t.encode()))
    print(f"wrote {results / 'results.md'}")
    return md


def merge_waiting(earlier: list[str], now: list[str], answered: set[str]) -> list[str]:
    """The "waiting" list: this call's own answer for the "<arm> seed <N>" pairs it has looked at
    (``answered``), the earlier entries of every other pair kept (a call over fewer arms or seeds,
    or one stopped midway, says nothing about the rest)."""
    return sorted({w for w in earlier if w not in answered} | set(now))


def run(a) -> int:
    study, results = Path(a.study).resolve(), Path(a.results).resolve()
    if not (study / "runs").is_dir():
        raise DataError(f"--study {a.study}: no runs/ folder (expected the --out folder of study_real_data.py)")
    datasets = [d for d in a.datasets.split(",") if d]
    try:
        fractions = [float(f) for f in a.fractions.split(",")]
    except ValueError:
        raise DataError(f"--fractions {a.fractions!r}: expected a comma list of numbers in (0, 1]") from None
    variants = a.variants.split(",")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise DataError(f"--fractions {a.fractions!r}: expected a comma list of numbers in (0, 1]")
    if any(v not in VARIANTS for v in variants):
        raise DataError(f"--variants {a.variants!r}: expected a comma list of {', '.join(VARIANTS)}")
    settings = {"study": os.path.basename(str(study)), "data_root": a.data_root, "datasets": datasets,
                "img_size": a.img_size, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
                "fractions": sorted(fractions), "variants": [v for v in VARIANTS if v in variants]}
    results.mkdir(parents=True, exist_ok=True)
    check_settings(results, settings)
    arms = [x for x in a.arms.split(",") if x] if a.arms else \
        sorted({p.name for p in (study / "runs").iterdir() if p.is_dir()} | set(BASELINES))
    seeds = [int(s) for s in a.seeds.split(",")]
    work = Path(a.work).resolve() if a.work else study / "eval_seg"
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    st = ResumableStages(work, env)
    images = read_rows(results / "per_image.csv", seg.IMAGE_COLUMNS, seg.INTS, seg.FLOATS)
    runs = read_rows(results / "runs.csv", seg.RUN_COLUMNS, seg.INTS, seg.FLOATS)
    git = git_state()
    settings |= {"where": machine(a.device), "commit": code_version(git), "command": recorded_command(a.argv),
                 "leaks": {d: "also trains A-SAM: the *_asam arms' masks come from a model taught on its "
                              "training images" for d in datasets if d in ASAM_TRAINING_SETS}}
    earlier = read_json(results / "settings.json") if (results / "settings.json").is_file() else {}
    made_by = earlier.get("made_by", {})
    settings["datasets"] = sorted(set(earlier.get("datasets", [])) | set(datasets))   # one call per set adds up
    settings["leaks"] = earlier.get("leaks", {}) | settings["leaks"]
    waiting, answered = [], set()
    listed = lambda: merge_waiting(earlier.get("waiting", []), waiting, answered)  # noqa: E731
    for seed in seeds:
        for dataset in datasets:
            for arm in arms:
                answered.add(f"{arm} seed {seed}")
                if seg.done(runs, dataset, arm, seed, settings["variants"], settings["fractions"]):
                    print(f"[skip] {dataset} {arm} seed {seed}: its rows are in {results / 'runs.csv'}", flush=True)
                    continue
                enc = encoder_of(study, arm, seed)
                if arm in BASELINES and not enc.is_file():   # the study's own file where it wrote one, else ours
                    enc = work / "encoders" / arm / f"seed{seed}" / ENCODER_NAME
                    st.run(f"{arm}_s{seed}", baseline_cmd(py, study, enc, arm, seed, a.pretrain_img_size), [enc])
                elif arm not in BASELINES and not finished(study, arm, seed):
                    waiting.append(f"{arm} seed {seed}")
                    continue
                out_dir = work / dataset / arm / f"seed{seed}"
                t0 = time.time()
                st.run(f"seg_{dataset}_{arm}_s{seed}",
                       [py, "evaluation_segmentation.py", "--data_root", a.data_root, "--dataset", dataset,
                        "--ckpt_path", str(enc), "--img_size", str(a.img_size), "--epochs", str(a.epochs),
                        "--batch_size", str(a.batch_size), "--lr", str(a.lr), "--seed", str(seed),
                        "--fractions", a.fractions, "--variants", a.variants, "--device", a.device,
                        "--out_dir", str(out_dir)], [out_dir / "segmentation.json"])
                new_images, new_runs = seg.rows_of(read_json(out_dir / "segmentation.json"),
                                                   dataset=dataset, arm=arm, seed=seed)
                key = (dataset, arm, seed)
                images = [r for r in images if (r["dataset"], r["arm"], r["seed"]) != key] + new_images
                runs = [r for r in runs if (r["dataset"], r["arm"], r["seed"]) != key] + new_runs
                write_rows(results / "per_image.csv", images, seg.IMAGE_COLUMNS)
                write_rows(results / "runs.csv", runs, seg.RUN_COLUMNS)
                made_by.setdefault(settings["commit"] or "unknown", []).append(f"{dataset} {arm} seed {seed}")
                write_json(results / "settings.json", settings | {"made_by": made_by, "waiting": listed()})
                print(f"[rows] {dataset} {arm} seed {seed}: {len(new_images)} image rows "
                      f"({time.time() - t0:.0f} s)", flush=True)
    write_json(results / "settings.json", settings | {"made_by": made_by, "waiting": listed()})
    if waiting:
        print("waiting for encoders: " + ", ".join(sorted(set(waiting))))
    if images:
        render(results)
    return 0


#: flag -> allowed range, checked before any work
NUMERIC_FLAGS = {"--img_size": AT_LEAST_1, "--pretrain_img_size": AT_LEAST_1, "--epochs": AT_LEAST_1,
                 "--batch_size": AT_LEAST_1, "--lr": POSITIVE, "--threads": AT_LEAST_1}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", help="the --out folder of study_real_data.py (its runs/<arm>/seed<s>/ encoders)")
    p.add_argument("--data_root", help="SAMUS-layout root (class.json, MainPatient/, <Dataset>/{img,label})")
    p.add_argument("--datasets", default="FetalHead-HC18,Nerve-USGRA", help="comma list of class.json's sets")
    p.add_argument("--arms", default=None, help="comma list (default: every arm folder of --study, plus baselines)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--img_size", type=int, default=64, help="input side (64: the cpu_long preset's size)")
    p.add_argument("--pretrain_img_size", type=int, default=64,
                   help="the study's frame size (bn_control's corpus statistics are taken at it)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", default=None, help="local folder of the evaluations' JSON and logs (default <study>/eval_seg)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each evaluation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", required=True, help="committed folder: per_image.csv, runs.csv, settings.json, "
                                                    "results.md")
    p.add_argument("--render_only", action="store_true", help="only render results.md and the docs' block")
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    a.argv = ["study_segmentation.py", *(sys.argv[1:] if argv is None else argv)]
    try:
        if a.render_only:
            render(Path(a.results).resolve())
            return 0
        if not a.study or not a.data_root:
            raise DataError("--study and --data_root are required (unless --render_only)")
        if not re.fullmatch(r"\d+(,\d+)*", a.seeds):
            raise DataError(f"--seeds {a.seeds!r}: expected a comma list of integers")
        check_flag_ranges(a, NUMERIC_FLAGS)
        classes = read_class_json(a.data_root)
        bad = [d for d in a.datasets.split(",") if d and d not in classes]
        if bad:
            raise DataError(f"--datasets {bad[0]!r}: not in {a.data_root}/MainPatient/class.json "
                            f"({', '.join(sorted(classes))})")
        results = Path(a.results)
        results.mkdir(parents=True, exist_ok=True)
        with RunLock(results):   # two calls into one --results would each write back only their own rows
            return run(a)
    except (StudyError, StageFailed, DataError) as e:
        print(f"study_segmentation.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
