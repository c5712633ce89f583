#!/usr/bin/env python
"""The whole ACLUS pipeline on built-in synthetic scans, on a CPU, in minutes.

    python run_pipeline.py                 # everything under outputs/demo
    python run_pipeline.py --out /tmp/x    # elsewhere

Each stage is the real stage script called with small settings (no separate code
path); its command line is printed before it runs, so any stage can be re-run by
hand. A stage that fails stops the pipeline with the stage's name and exit status.

Stages (METHOD.md §0):
  0 synthetic data    python -m utils.synthetic_us        scans + exact anatomy labels
  4 mask pickles      utils/generate_masks_pkls.py        label PNGs -> masks/*.pkl
  5 pre-training      pretrain_aclus.py                   ResNet-18 encoder
  6 evaluation        evaluation_aclus.py                 5-fold linear probe, random init vs ACLUS
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent


class StageFailed(RuntimeError):
    pass


def run_stage(name: str, cmd: list[str]) -> float:
    print(f"\n=== {name}\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise StageFailed(f"stage '{name}' failed with exit status {proc.returncode} (command above)")
    return time.time() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--n", type=int, default=64, help="synthetic scans per pre-training subset")
    p.add_argument("--epochs", type=int, default=4, help="pre-training epochs")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    data, py = out / "data", sys.executable
    times: dict[str, float] = {}
    try:
        times["synthetic data"] = run_stage("0 synthetic data", [
            py, "-m", "utils.synthetic_us", "--out", str(data), "--layouts", "pretrain,pocus",
            "--n", str(a.n), "--size", "96", "--pocus-videos", "2", "--pocus-frames", "4"])
        times["mask pickles"] = run_stage("4 mask pickles", [
            py, "utils/generate_masks_pkls.py", "--data_dir", str(data)])
        times["pre-training"] = run_stage("5 ACLUS pre-training", [
            py, "pretrain_aclus.py", "--cfg", "configs/synthetic_cpu.yaml",
            "-o", f"data.image_dir={data}", "-o", f"checkpoint.ckpt_path={out / 'pretrain'}",
            "-o", f"optimizer.total_epochs={a.epochs}"])
        results = {}
        for label, extra in [("random init", []),
                             ("ACLUS", ["--ckpt_path", str(out / "pretrain" / "encoder_resnet18.pth")])]:
            key = "eval_random" if not extra else "eval_aclus"
            times[f"evaluation ({label})"] = run_stage(f"6 evaluation, {label}", [
                py, "evaluation_aclus.py", "--data_path", str(data / "pocus"), "--protocol", "linear",
                "--img_size", "64", "--out_dir", str(out / key), *extra])
            results[label] = json.loads(next((out / key).glob("eval_*.json")).read_text())
    except StageFailed as e:
        print(f"\nrun_pipeline.py: {e}", file=sys.stderr)
        return 1

    print("\n=== results (synthetic 5-fold, linear probe)")
    print(f"{'encoder':<12} {'accuracy (mean ± std)':>24} {'macro-F1 (mean ± std)':>24}")
    for label, r in results.items():
        s = r["summary"]
        print(f"{label:<12} {s['accuracy_mean']:>13.3f} ± {s['accuracy_std']:.3f} "
              f"{s['macro_f1_mean']:>14.3f} ± {s['macro_f1_std']:.3f}")
    print("\nstage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
