"""Benchmark of the POCUS evaluation on the real covid19_ultrasound data (not a test).

1. Builds the 5-fold set from ``--pocus`` (convex probe, ``--frames_per_video`` per video,
   ``--size`` px) with ``utils.pocus_folds``.
2. Runs the linear protocol with a random-init encoder on all 5 folds: accuracy mean ± std,
   pooled accuracy, wall time (the target is < 10 min on a 2-core CPU).
3. Times the finetune protocol: by default ``--finetune_epochs 1`` on every fold and the
   training part extrapolated to the paper's 30 epochs (a full run: ``--finetune_epochs 30``).

Usage::

    python -m benchmarks.bench_evaluation --pocus ../shared/data/pocus --out /tmp/bench_eval
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine  # noqa: E402
from evaluation.runner import evaluate, get_args_parser  # noqa: E402
from utils.pocus_folds import build  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Time and score the POCUS evaluation on the real data.")
    p.add_argument("--pocus", required=True, help="covid19_ultrasound checkout, e.g. ../shared/data/pocus")
    p.add_argument("--out", default="/tmp/bench_evaluation", help="scratch folder (folds, reports)")
    p.add_argument("--size", type=int, default=112, help="image side for folds and evaluation")
    p.add_argument("--frames_per_video", type=int, default=16, help="frames sampled per video")
    p.add_argument("--finetune_epochs", type=int, default=1,
                   help="epochs of the timed finetune run; < 30 -> training time extrapolated to 30")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = in the main process)")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = ["--img_size", str(args.size), "--device", args.device, "--workers", str(args.workers)]

    t = time.time()
    report = build(args.pocus, out / "folds", frames_per_video=args.frames_per_video, size=args.size,
                   probe="convex", seed=0, verbose=False)
    t_build = time.time() - t
    print(f"built {report['num_images']} images from {report['num_sources']} sources in {t_build:.1f} s "
          f"(skipped {report['skipped']}, unreadable {report['unreadable'] or 'none'})")

    t = time.time()
    evaluate(get_args_parser().parse_args(["--data_path", str(out / "folds"), "--protocol", "linear",
                                           "--out_dir", str(out / "linear"), *common]))
    t_linear = time.time() - t
    lin = json.loads((out / "linear" / "eval_linear_last.json").read_text())["summary"]

    t = time.time()
    evaluate(get_args_parser().parse_args(["--data_path", str(out / "folds"), "--protocol", "finetune", "--epochs",
                                           str(args.finetune_epochs), "--out_dir", str(out / "finetune"), *common]))
    t_ft = time.time() - t
    ft = json.loads((out / "finetune" / "eval_finetune_last.json").read_text())["summary"]
    t_ft_30 = t_ft * 30 / args.finetune_epochs  # training dominates; the one test pass per fold is tiny

    res = {
        "machine": machine(), "images": report["num_images"], "size": args.size,
        "build_s": round(t_build, 1),
        "linear_random_init": {"accuracy_mean": lin["accuracy_mean"], "accuracy_std": lin["accuracy_std"],
                               "macro_f1_mean": lin["macro_f1_mean"], "pooled_accuracy": lin["pooled_accuracy"],
                               "wall_s": round(t_linear, 1)},
        "finetune_random_init": {"epochs_run": args.finetune_epochs, "wall_s": round(t_ft, 1),
                                 "wall_s_30_epochs": round(t_ft_30, 1),
                                 "extrapolated": args.finetune_epochs < 30,
                                 "accuracy_mean_after_run": ft["accuracy_mean"]},
    }
    (out / "bench_evaluation.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"linear (random init, {args.size} px): accuracy {lin['accuracy_mean']:.4f} ± {lin['accuracy_std']:.4f}, "
          f"{t_linear:.0f} s for 5 folds")
    print(f"finetune: {t_ft:.0f} s for {args.finetune_epochs} epoch(s) x 5 folds -> "
          f"{'~' if args.finetune_epochs < 30 else ''}{t_ft_30 / 60:.1f} min for 30 epochs x 5 folds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
