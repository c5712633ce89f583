"""A-SAM mask inference with the image encoder in float32 and in bfloat16: speed and agreement.

``SAM/infer_masks.py --encoder_precision bf16`` runs the image encoder (where inference spends
its time on a CPU) under bfloat16 autocast. This script masks the same frames both ways, in one
process, one after the other (after an untimed batch of each), and writes how fast each was and how far the label maps agree:

    python benchmarks/bench_infer_precision.py --ckpt runs/lung_asam/stage2_neg0.5_present_lungneg60/best.pt \\
        --frames <study out>/frames --prompts SynLung-Lung/1,...,SynLung-Lung/6 --n 48 \\
        --out docs/results/infer_precision_cpu.json

Agreement, per prompt, over the frames: the share of frames on which both runs make the same
presence call (a region kept or not), and the IoU of the prompt's region where both keep one;
overall, the share of pixels with the same label. Time it with nothing else running: the
figures are images per second of each run and their ratio.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.machine import machine  # noqa: E402
from SAM import infer_masks  # noqa: E402
from utils.extract_frames import spread_evenly  # noqa: E402
from utils.flags import script_parser  # noqa: E402
from utils.io import atomic_write, read_label  # noqa: E402


def compare_maps(a: list[np.ndarray], b: list[np.ndarray], n_prompts: int) -> dict:
    """Agreement of two runs' label maps (index k = the k-th prompt, 0 background), frame by frame:
    per prompt k, ``same_call`` (share of frames where both or neither keep a region of k),
    ``iou`` (mean IoU of k's regions over the frames where both keep one; None if none) and the
    frames each run keeps it on; overall, ``pixel_agreement`` (share of all pixels labelled alike)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("two lists of label maps of the same frames and sizes")
    per = {}
    for k in range(1, n_prompts + 1):
        calls, ious = [], []
        for x, y in zip(a, b):
            mx, my = x == k, y == k
            calls.append(mx.any() == my.any())
            if mx.any() and my.any():
                ious.append((mx & my).sum() / (mx | my).sum())
        per[k] = {"same_call": float(np.mean(calls)), "iou": float(np.mean(ious)) if ious else None,
                  "frames_both": len(ious), "frames_a": int(sum((x == k).any() for x in a)),
                  "frames_b": int(sum((y == k).any() for y in b))}
    same = sum(int((x == y).sum()) for x, y in zip(a, b))
    return {"per_prompt": per, "pixel_agreement": same / sum(x.size for x in a)}


def frames_parser(doc: str, out: str):
    """The command line of a measurement that masks frames with an A-SAM checkpoint two ways."""
    p = script_parser(doc)
    p.add_argument("--ckpt", required=True, help="A-SAM stage-2 checkpoint")
    p.add_argument("--frames", required=True, help="<Sub>/img/*.png tree of frames")
    p.add_argument("--prompts", default=None, help="infer_masks --prompts (default: all of the checkpoint)")
    p.add_argument("--n", type=int, default=48, help="frames, spread evenly over the sorted list (48)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / out))
    return p


def checked_frames(a) -> list[Path]:
    """``--n`` frames of ``--frames``, spread evenly; a one-line exit for a missing checkpoint or no frames."""
    if not Path(a.ckpt).is_file():
        raise SystemExit(f"--ckpt {a.ckpt}: no such checkpoint")
    frames = spread_evenly(sorted(Path(a.frames).glob("*/img/*.png")), a.n)
    if not frames:
        raise SystemExit(f"--frames {a.frames}: no <Sub>/img/*.png there")
    return frames


def main(argv=None) -> dict:
    a = frames_parser(__doc__, "infer_precision_cpu.json").parse_args(argv)
    frames = checked_frames(a)
    where = machine()
    work = Path(tempfile.mkdtemp(prefix="infer_precision_"))
    try:
        data = work / "frames"
        for f in frames:
            link = data / f.parent.parent.name / "img" / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f.resolve())
        # untimed warm-up of both on one batch of other frames' copies: one-time costs (kernel
        # set-up, reading the checkpoint) do not fall on whichever runs first
        warm = work / "warm"
        for f in frames[:a.batch_size]:
            link = warm / "W" / "img" / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f.resolve())
        for precision in ("fp32", "bf16"):
            infer_masks.main(["--ckpt", a.ckpt, "--data_dir", str(warm), "--out_dir", str(work / f"warm_{precision}"),
                              "--workers", "0", "--batch_size", str(a.batch_size), "--encoder_precision", precision,
                              "--montage", "none"] + (["--prompts", a.prompts] if a.prompts else []))
        runs, maps = {}, {}
        for precision in ("fp32", "bf16"):
            out = work / precision
            res = infer_masks.main(["--ckpt", a.ckpt, "--data_dir", str(data), "--out_dir", str(out), "--workers", "0",
                                    "--batch_size", str(a.batch_size), "--encoder_precision", precision,
                                    "--montage", "none"] + (["--prompts", a.prompts] if a.prompts else []))
            runs[precision] = {"images_per_s": res["images_per_s"], "seconds": res["seconds"],
                               "share_with_region": res["share_with_region"]}
            maps[precision] = [read_label(out / f.parent.parent.name / "label" / f.name) for f in frames]
        prompts = list(runs["fp32"]["share_with_region"])
        agreement = compare_maps(maps["fp32"], maps["bf16"], len(prompts))
        agreement["per_prompt"] = {prompts[k - 1]: v for k, v in agreement["per_prompt"].items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"what": "A-SAM mask inference (SAM/infer_masks.py) with the image encoder in float32 and under "
                      "bfloat16 autocast, on the same frames, one after the other in one process",
              "settings": {"ckpt": Path(a.ckpt).name, "frames": len(frames), "batch_size": a.batch_size,
                           "prompts": prompts},
              "runs": runs, "speedup": runs["bf16"]["images_per_s"] / runs["fp32"]["images_per_s"],
              "agreement": agreement, "machine": where}
    write_report(result, Path(a.out), f"fp32 {runs['fp32']['images_per_s']:.3f} images/s, bf16 "
                 f"{runs['bf16']['images_per_s']:.3f} ({result['speedup']:.2f}x); pixel agreement "
                 f"{agreement['pixel_agreement']:.4f}")
    return result


def write_report(result: dict, out: Path, headline: str) -> None:
    """Write ``result`` (the load average now added to its machine) atomically to ``out``; print
    ``headline`` and each prompt's agreement."""
    result["machine"]["load_avg_1min_now"] = os.getloadavg()[0]
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(headline)
    for k, v in result["agreement"]["per_prompt"].items():
        print(f"  {k}: same call on {v['same_call']:.3f} of frames, IoU {v['iou']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
