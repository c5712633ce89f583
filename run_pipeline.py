#!/usr/bin/env python
"""The whole ACLUS pipeline on built-in synthetic scans, on a CPU, in minutes.

    python run_pipeline.py                 # everything under outputs/demo
    python run_pipeline.py --out /tmp/x    # elsewhere
    python run_pipeline.py --tiny          # seconds-sized smoke run (tests)

Each stage is the real stage script called with small settings (no separate code
path); its command line is printed before it runs, so any stage can be re-run by
hand. A stage that fails stops the pipeline with the stage's name and the reason.

Stages (METHOD.md §0):
  0 synthetic data     python -m utils.synthetic_us        scans, SAMUS pairs, POCUS folds
  1 A-SAM stage 1      SAM/only_train_sam.py               adapters (tiny random ViT)
  2 A-SAM stage 2      SAM/train_auto_prompter.py          prompt-free segmenter
  3 A-SAM masks        SAM/infer_masks.py                  label PNGs of the pre-training scans
  4 mask pickles       utils/generate_masks_pkls.py        label PNGs -> masks/*.pkl
  5 pre-training       pretrain_aclus.py                   ResNet-18 encoder
  6 evaluation         evaluation_aclus.py                 5-fold linear probe, random init vs ACLUS

The pre-training corpus is treated as unlabeled: the generator's exact anatomy maps are
moved to ``train/<Sub>/label_exact`` before stage 3 (they only score the A-SAM masks), so
pre-training sees A-SAM's masks. Every figure goes to ``<out>/figures``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import mask_layout as layout
from utils.flags import AT_LEAST_1, check_flag_ranges
from utils.io import DataError
from utils.plots import plot_loss_curves
from utils.stage_files import ASAM_BEST, ENCODER_NAME, confusion_name, eval_result_name
from utils.stage_runner import StageFailed, need, run_command

REPO = Path(__file__).resolve().parent
MARKER = ".run_pipeline"  # marks an output folder this script may wipe on a re-run
SEG_DATASET = "SynLung-Anatomy"  # A-SAM learns rib, pleura, consolidation (SAMUS layout)
EXACT_LABEL_DIR = "label_exact"  # the generator's labels, beside <Sub>/label, hidden from stages 3-5


@dataclass
class Settings:
    """Sizes of one run; the defaults are the demo, :func:`tiny` the smoke test."""
    n_pretrain: int = 160      # synthetic scans per pre-training subset (2 subsets)
    n_seg: int = 64            # SAMUS pairs per dataset (split 70/10/20)
    size: int = 96             # side of every generated scan
    pocus_videos: int = 6      # POCUS videos per class per fold (x 3 classes x 5 folds)
    pocus_frames: int = 4      # frames per POCUS video
    asam_size: int = 64        # A-SAM input side
    asam1_epochs: int = 1
    asam2_epochs: int = 8
    epochs: int | None = None  # pre-training epochs (None: the config's)
    eval_size: int = 64
    random_seeds: tuple[int, ...] = (1, 2, 3)  # random-init baselines (evaluation --seed)
    mask_threshold: float = 0.5  # A-SAM foreground probability
    pretrain_overrides: tuple[str, ...] = ()

    @staticmethod
    def tiny() -> "Settings":
        return Settings(n_pretrain=8, n_seg=10, size=48, pocus_videos=1, pocus_frames=1, asam_size=32,
                        asam1_epochs=1, asam2_epochs=1, epochs=1, eval_size=32, random_seeds=(1,),
                        # an untrained A-SAM finds nothing at 0.5; 0 gives every scan a mask
                        mask_threshold=0.0,
                        pretrain_overrides=("data.train_batch_size=4", "data.resize_size=32",
                                            "data.data_workers=0", "optimizer.warmup_epochs=0"))


# --------------------------------------------------------------------------- #
# running stages
# --------------------------------------------------------------------------- #
def run_stage(name: str, cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Print the stage's name and command line, then run it (utils.stage_runner.run_command)."""
    print(f"\n=== {name}\n$ {shlex.join(cmd)}", flush=True)
    return run_command(name, cmd, env)


def prepare_out(out: Path) -> None:
    """Start from an empty output folder; wipe only a folder an earlier run of this script made."""
    if out.exists() and not out.is_dir():
        raise StageFailed(f"{out} is a file, not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise StageFailed(f"{out} exists, is not empty and was not made by run_pipeline.py; "
                              "delete it or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("output folder of run_pipeline.py; wiped by the next run\n")


def hide_exact_labels(train_dir: Path) -> int:
    """``<Sub>/label`` -> ``<Sub>/label_exact``: the corpus becomes unlabeled for stages 3-5."""
    moved = 0
    for lab in sorted(train_dir.glob(f"*/{layout.LABEL_DIR}")):
        lab.rename(lab.with_name(EXACT_LABEL_DIR))
        moved += 1
    return moved


# --------------------------------------------------------------------------- #
# reporting
# --------------------------------------------------------------------------- #
def asam_dice(train_dir: Path, classes_json: Path) -> dict[str, float]:
    """Dice of each A-SAM anatomy against the generator's exact map, pooled over all scans."""
    from utils.io import read_label
    from utils.synthetic_scan import ANATOMY_IDS
    from utils.synthetic_us import SAMUS_ANATOMY_CLASSES

    class_to_anatomy = {f"{SEG_DATASET}/{c}": a for a, c in SAMUS_ANATOMY_CLASSES.items()}
    class_to_anatomy["SynLung-Pleura/1"] = ANATOMY_IDS["pleura"]
    names = {v: k for k, v in ANATOMY_IDS.items()}
    classes = json.loads(classes_json.read_text())  # {"1": "SynLung-Anatomy/1", ...}
    inter = {k: 0 for k in classes}
    total = {k: 0 for k in classes}
    for sub, rel, _ in layout.find_images(train_dir):
        pred_path = layout.label_path(train_dir, sub, rel)
        if not pred_path.is_file():
            continue
        exact = read_label(layout.label_path(train_dir, sub, rel, EXACT_LABEL_DIR))
        pred = read_label(pred_path)
        for k, key in classes.items():
            p, g = pred == int(k), exact == class_to_anatomy.get(key, -1)
            inter[k] += int((p & g).sum())
            total[k] += int(p.sum() + g.sum())
    return {f"{k} {names.get(class_to_anatomy.get(key, -1), key)}": 2 * inter[k] / max(total[k], 1)
            for k, key in classes.items()}


def print_table(results: dict[str, dict]) -> None:
    print("\n=== results (synthetic POCUS-like 5-fold, linear probe on frozen features, "
          "fixed C, no selection)")
    print(f"{'encoder':<22} {'accuracy (mean ± std)':>22} {'macro-F1 (mean ± std)':>22} {'pooled acc':>11}")
    for label, r in results.items():
        s = r["summary"]
        print(f"{label:<22} {s['accuracy_mean']:>13.3f} ± {s['accuracy_std']:.3f} "
              f"{s['macro_f1_mean']:>13.3f} ± {s['macro_f1_std']:.3f} {s['pooled_accuracy']:>11.3f}")
    randoms = [r["summary"]["accuracy_mean"] for k, r in results.items() if k.startswith("random")]
    if len(randoms) > 1:
        print(f"{'random init, mean':<22} {np.mean(randoms):>13.3f} ± {np.std(randoms):.3f} "
              "(over init seeds)")


# --------------------------------------------------------------------------- #
# the pipeline
# --------------------------------------------------------------------------- #
def pipeline(out: Path, s: Settings, threads: int) -> int:
    data, runs, figs, py = out / "data", out / "runs", out / "figures", sys.executable
    train = layout.split_dir(data, "train")  # the pre-training corpus: <Sub>/img (and label)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    times: dict[str, tuple[float, float]] = {}
    prepare_out(out)
    figs.mkdir()
    t0 = time.time()

    def timed(key: str, name: str, cmd: list[str]) -> None:
        w, c = times.get(key, (0.0, 0.0))
        dw, dc = run_stage(name, cmd, env)
        times[key] = (w + dw, c + dc)

    timed("0 synthetic data", "0 synthetic data (pre-training scans + POCUS folds)", [
        py, "-m", "utils.synthetic_us", "--out", str(data), "--layouts", "pretrain,pocus",
        "--n", str(s.n_pretrain), "--size", str(s.size),
        "--pocus-videos", str(s.pocus_videos), "--pocus-frames", str(s.pocus_frames)])
    timed("0 synthetic data", "0 synthetic data (SAMUS segmentation pairs)", [
        py, "-m", "utils.synthetic_us", "--out", str(data), "--layouts", "samus",
        "--n", str(s.n_seg), "--size", str(s.size)])
    print(f"moved the exact labels of {hide_exact_labels(train)} pre-training subsets to "
          f"{EXACT_LABEL_DIR}/ (the corpus is unlabeled from here on)")

    seg = ["--task", "SynLung", "--data_root", str(data / "samus"), "--datasets", SEG_DATASET,
           "--img_size", str(s.asam_size), "--batch_size", "8", "--workers", "0"]
    timed("1 A-SAM stage 1", "1 A-SAM stage 1 (adapters, click prompts)", [
        py, "SAM/only_train_sam.py", *seg, "--backbone", "vit_tiny", "--epochs", str(s.asam1_epochs),
        "--out_dir", str(runs / "asam_stage1")])
    stage1 = need(runs / "asam_stage1" / ASAM_BEST, "1 A-SAM stage 1")
    timed("2 A-SAM stage 2", "2 A-SAM stage 2 (auto-prompter)", [
        py, "SAM/train_auto_prompter.py", *seg, "--sam_ckpt", str(stage1),
        "--epochs", str(s.asam2_epochs), "--out_dir", str(runs / "asam_stage2")])
    stage2 = need(runs / "asam_stage2" / ASAM_BEST, "2 A-SAM stage 2")
    timed("3 A-SAM masks", "3 A-SAM masks of the pre-training scans", [
        py, "SAM/infer_masks.py", "--ckpt", str(stage2), "--data_dir", str(train),
        "--workers", "0", "--batch_size", "16", "--threshold", str(s.mask_threshold),
        "--montage", str(figs / "asam_montage.png"), "--montage_n", "8"])
    dice = asam_dice(train, need(train / "asam_classes.json", "3 A-SAM masks"))
    print("A-SAM masks vs the exact anatomy maps, Dice: "
          + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))

    timed("4 mask pickles", "4 mask pickles", [
        py, "utils/generate_masks_pkls.py", "--data_dir", str(data)])
    epochs = [] if s.epochs is None else ["-o", f"optimizer.total_epochs={s.epochs}"]
    extra = [a for o in s.pretrain_overrides for a in ("-o", o)]
    timed("5 pre-training", "5 ACLUS pre-training", [
        py, "pretrain_aclus.py", "--cfg", "configs/synthetic_cpu.yaml", "--device", "cpu",
        "-o", f"data.image_dir={data}", "-o", f"checkpoint.ckpt_path={runs / 'pretrain'}",
        "-o", "checkpoint.resume_path=", *epochs, *extra])
    encoder = need(runs / "pretrain" / ENCODER_NAME, "5 ACLUS pre-training")
    plot_loss_curves(need(runs / "pretrain" / "log.jsonl", "5 ACLUS pre-training"),
                     figs / "pretrain_loss_curves.png", "ACLUS pre-training on synthetic scans")

    results: dict[str, dict] = {}
    evals = [(f"random init (seed {k})", f"random_seed{k}", ["--seed", str(k)]) for k in s.random_seeds]
    evals.append(("ACLUS pre-trained", "aclus", ["--ckpt_path", str(encoder)]))
    for label, key, args in evals:
        timed("6 evaluation", f"6 evaluation, {label}", [
            py, "evaluation_aclus.py", "--data_path", str(data / "pocus"), "--protocol", "linear",
            "--img_size", str(s.eval_size), "--out_dir", str(runs / f"eval_{key}"), *args])
        result_json = need(runs / f"eval_{key}" / eval_result_name("linear", "last"), f"6 evaluation, {label}")
        results[label] = json.loads(result_json.read_text())
        shutil.copy(need(runs / f"eval_{key}" / confusion_name("linear", "last"), f"6 evaluation, {label}"),
                    figs / f"confusion_{key}.png")

    print_table(results)
    total = time.time() - t0
    print("\nstage times, wall (CPU) seconds: "
          + ", ".join(f"{k} {w:.0f} ({c:.0f})" for k, (w, c) in times.items()))
    print(f"total {total:.0f} s wall ({sum(c for _, c in times.values()):.0f} s CPU) with "
          f"{threads} thread(s) per stage")
    print(f"outputs in {out}; figures: {', '.join(sorted(p.name for p in figs.iterdir()))}")
    summary = {"results": {k: v["summary"] for k, v in results.items()}, "asam_dice": dice,
               "stage_seconds": {k: {"wall": round(w, 1), "cpu": round(c, 1)} for k, (w, c) in times.items()},
               "total_wall_s": round(total, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo); "
                   "a folder of an earlier run is wiped first")
    p.add_argument("--epochs", type=int, default=None,
                   help="pre-training epochs (default: configs/synthetic_cpu.yaml)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per stage (default: 2)")
    p.add_argument("--tiny", action="store_true", help="shrink everything to a seconds-long smoke run")
    a = p.parse_args(argv)
    try:
        check_flag_ranges(a, {"--epochs": AT_LEAST_1, "--threads": AT_LEAST_1})
    except DataError as e:
        print(f"run_pipeline.py: error: {e}", file=sys.stderr)
        return 2
    s = Settings.tiny() if a.tiny else Settings()
    if a.epochs is not None:
        s.epochs = a.epochs
    try:
        return pipeline(Path(a.out).resolve(), s, a.threads)
    except StageFailed as e:
        print(f"\nrun_pipeline.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
