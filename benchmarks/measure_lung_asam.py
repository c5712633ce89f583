"""A-SAM that knows lung anatomy: stage 2 on synthetic lung scans with exact labels, together
with HC18 and USGRA, measured on held-out synthetic scans and on real lung frames.

    python benchmarks/measure_lung_asam.py --seg_root ../shared/data/seg \\
        --lung_frames outputs/study/cpu/frames --compare runs/bench_asam/stage2_neg0/best.pt

1. ``<work_dir>/data``: ``SynLung-Lung`` (:func:`utils.synthetic_us.write_lung_layout`, one
   class per anatomy: soft tissue, rib, pleura, lung, consolidation, rib shadow; ``--style``)
   beside links to the data sets of ``--seg_root``;
2. ``SAM/train_auto_prompter.py`` (LiteMedSAM backbone, encoder frozen) on all of them,
   ``--max_train`` lines per data set, ``--negative_rate`` negatives and ``--mask_loss_on``
   (default :data:`SAM.config.ABSENCE_TRAINING`: the presence head learns absence), ``--eval_test``:
   Dice per anatomy on held-out synthetic scans, Dice on HC18 / USGRA, false-positive rates, with
   the presence decision and without it (``<work_dir>/stage2_neg<rate>[_present]``);
3. real lung frames (no labels exist): ``--frames_per_video`` evenly spaced frames of
   ``--n_videos`` videos of ``--lung_frames`` (a ``<Sub>/img/<video>_f<index>.png`` tree, e.g. the
   study's frames); ``SAM/infer_masks.py`` with this checkpoint's lung prompts, and with every
   prompt of ``--compare`` (an A-SAM that never saw a lung); per source and prompt: the share
   of frames where it fires, regions per frame, pixel share, C5 survival
   (:mod:`pretraining.mask_stats`), and the spread of the pleura's vertical centroid within a video.
   A checkpoint with presence thresholds is measured twice: with its decision (``asam_lung``,
   what the study's ``asam_lung`` source writes) and with ``--presence off``
   (``asam_lung_no_decision``): the share of frames per prompt that keep a region, before and after;
   and its HC18 / USGRA prompts with the decision (``asam_lung_absent_prompts``: anatomies no lung
   frame shows).

``--negative_videos N`` adds real lung frames to stage 2 as a negative set
(:func:`SAM.samus_data.add_negative_set`): ``--negative_frames_per_video`` frames of N other videos
of ``--lung_frames`` (never one of the measured videos), split 70/10/20 by video, shown only with
the HC18 / USGRA prompts (anatomies a lung frame lacks; the lung prompts never meet them). Its data
root and stage-2 folder are apart (``data_lungneg<N>``, ``stage2_..._lungneg<N>``), so the run
without them is left as it was. The test split's false-positive rates of the HC18 / USGRA prompts
then count the negative set's test frames too; the measured real frames stay out of every split.

Writes ``--out`` (default docs/results/lung_asam_presence.json; ``docs/results/lung_asam.json``
is the run with ``--negative_rate 0 --mask_loss_on all``, before the presence head existed) and
``--montage`` (the lung A-SAM on held-out synthetic scans); real-frame overlays stay in
``<work_dir>`` (COVID-BLUES licence).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.bench_asam import repo_relative, stage2_dir  # noqa: E402
from pretraining.mask_stats import centroid_spread, frame_stats, summarise  # noqa: E402
from SAM import infer_masks, train_auto_prompter  # noqa: E402
from SAM.checkpoint import load_checkpoint  # noqa: E402
from SAM.config import ABSENCE_TRAINING  # noqa: E402
from SAM.presence import MASK_LOSS_ON, PRESENCE_SCORES  # noqa: E402
from utils.extract_frames import spread_evenly, video_of  # noqa: E402
from utils.flags import script_parser  # noqa: E402
from utils.io import atomic_write, read_label  # noqa: E402
from utils.stage_files import ASAM_BEST, ASAM_LAST  # noqa: E402
from utils.synthetic_scan import ANATOMY_IDS, STYLES  # noqa: E402
from utils.synthetic_us import LUNG_DATASET, LUNG_PROMPTS, write_lung_layout  # noqa: E402

PLEURA = f"{LUNG_DATASET}/{ANATOMY_IDS['pleura']}"


def parse_args(argv=None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--seg_root", required=True, help="SAMUS root with HC18 and USGRA")
    p.add_argument("--lung_frames", required=True, help="<Sub>/img/<video>_f<index>.png tree of real frames")
    p.add_argument("--compare", default=None, help="another stage-2 checkpoint to measure on the same frames")
    p.add_argument("--work_dir", default="runs/lung_asam")
    p.add_argument("--style", default="realistic", choices=sorted(STYLES))
    p.add_argument("--n_synthetic", type=int, default=200, help="synthetic lung scans (200; 70/10/20 split)")
    p.add_argument("--max_train", type=int, default=120, help="training lines per data set (120)")
    p.add_argument("--max_val", type=int, default=20)
    p.add_argument("--max_test", type=int, default=60)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--negative_rate", type=float, default=ABSENCE_TRAINING["negative_rate"],
                   help="stage-2 negatives per line (%(default)s; 0: METHOD.md's training, no absent targets)")
    p.add_argument("--mask_loss_on", choices=MASK_LOSS_ON, default=ABSENCE_TRAINING["mask_loss_on"],
                   help="stage-2 --mask_loss_on (%(default)s)")
    p.add_argument("--prompter_grid", type=int, default=16)
    p.add_argument("--presence_score", choices=PRESENCE_SCORES, default="combined",
                   help="what stage 2's presence decision thresholds (SAM/train_auto_prompter.py)")
    p.add_argument("--n_videos", type=int, default=12, help="real videos (12)")
    p.add_argument("--frames_per_video", type=int, default=3, help="frames per real video (3)")
    p.add_argument("--negative_videos", type=int, default=0,
                   help="real lung videos whose frames join stage 2 as negatives of the HC18 / USGRA prompts "
                        "(0: none; never the measured videos)")
    p.add_argument("--negative_frames_per_video", type=int, default=3)
    p.add_argument("--view", type=int, default=112, help="pre-training view side for C5 survival (112)")
    p.add_argument("--out", default=str(REPO / "docs/results/lung_asam_presence.json"))
    p.add_argument("--montage", default=str(REPO / "figs/lung_asam_synthetic.png"))
    a = p.parse_args(argv)
    for flag in ("seg_root", "lung_frames"):
        if not Path(getattr(a, flag)).is_dir():
            p.error(f"--{flag} {getattr(a, flag)}: not a folder")
    for flag in ("n_videos", "frames_per_video", "negative_videos", "negative_frames_per_video"):
        if getattr(a, flag) < (0 if flag == "negative_videos" else 1):
            p.error(f"--{flag} {getattr(a, flag)}: out of range")
    if a.negative_videos and not a.negative_rate > 0:
        p.error("--negative_videos needs --negative_rate > 0 (stage 2 reads negative sets only for negatives)")
    if a.compare and not Path(a.compare).is_file():
        p.error(f"--compare {a.compare}: no such checkpoint")
    return a


def pick_real_frames(root: Path, n_videos: int, per_video: int, dest: Path) -> dict[str, list[str]]:
    """Link ``per_video`` evenly spaced frames of ``n_videos`` evenly spread videos into
    ``dest/<Sub>/img``; returns {video: [frame names]}."""
    videos: dict[tuple[str, str], list[Path]] = {}
    for f in sorted(root.glob("*/img/*.png")):
        videos.setdefault((f.parent.parent.name, video_of(f.stem)), []).append(f)
    keys = sorted(videos)
    chosen = spread_evenly(keys, n_videos)
    out: dict[str, list[str]] = {}
    for sub, video in chosen:
        frames = videos[(sub, video)]
        pick = spread_evenly(frames, per_video)
        for f in pick:
            link = dest / sub / "img" / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(f.resolve())
        out[f"{sub}/{video}"] = [f"{sub}/{f.stem}" for f in pick]
    return out


NEGATIVE_SET = "Negatives-LungFrames"


def pick_negative_videos(root: Path, exclude: set[str], n_videos: int, per_video: int) -> dict[str, list[Path]]:
    """``per_video`` evenly spaced frames of ``n_videos`` videos of ``root`` (a ``<Sub>/img/*.png``
    tree) spread evenly over those not in ``exclude`` ("<Sub>/<video>"), split 70/10/20 by video
    (at least one video for training): {split: [frame paths]}."""
    videos: dict[str, list[Path]] = {}
    for f in sorted(root.glob("*/img/*.png")):
        videos.setdefault(f"{f.parent.parent.name}/{video_of(f.stem)}", []).append(f)
    chosen = spread_evenly(sorted(set(videos) - exclude), n_videos)
    n_val, n_test = round(0.1 * len(chosen)), round(0.2 * len(chosen))
    n_train = max(1, len(chosen) - n_val - n_test)
    order = [chosen[i] for i in np.random.default_rng(0).permutation(len(chosen))]
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {split: [f for v in sorted(vs) for f in spread_evenly(videos[v], per_video)] for split, vs in parts.items()}


def measure_source(label_root: Path, videos: dict[str, list[str]], prompts: list[str], view: int) -> dict:
    """Mask statistics of one source's label maps on the chosen real frames."""
    maps = {name: read_label(label_root / name.split("/")[0] / "label" / f"{name.split('/')[1]}.png")
            for names in videos.values() for name in names}
    per_prompt = {}
    for k, key in enumerate(prompts, start=1):
        present = [m == k for m in maps.values()]
        fired = [p for p in present if p.any()]
        per_prompt[key] = {"fires": float(np.mean([p.any() for p in present])),
                           "pixel_share_when_fired": float(np.mean([p.mean() for p in fired])) if fired else None}
    out = {"frames": len(maps), "overall": summarise(frame_stats(m, view) for m in maps.values()),
           "per_prompt": per_prompt}
    if PLEURA in prompts:
        k = prompts.index(PLEURA) + 1
        spreads = [centroid_spread([maps[n] for n in names], k) for names in videos.values()]
        stds = [s["std"] for s in spreads if s["std"] is not None]
        out["pleura_centroid_spread"] = {
            "videos": len(spreads), "videos_with_2_or_more": len(stds),
            "mean_std": float(np.mean(stds)) if stds else None,
            "max_std": float(np.max(stds)) if stds else None, "per_video": spreads}
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    from benchmarks.machine import machine
    where = machine()  # the load average before any work
    work = Path(a.work_dir)
    t0 = time.perf_counter()
    data = work / "data"
    if not (data / "MainPatient" / "class.json").is_file():
        write_lung_layout(data, a.n_synthetic, 256, seed=0, style=a.style, seg_root=a.seg_root)
    datasets = ",".join(json.loads((data / "MainPatient" / "class.json").read_text()))
    stage2 = stage2_dir(work, a.negative_rate, a.mask_loss_on)
    real = work / "real"
    videos = pick_real_frames(Path(a.lung_frames), a.n_videos, a.frames_per_video, real)
    if not videos:
        raise SystemExit(f"--lung_frames {a.lung_frames}: no <Sub>/img/*.png frames there")
    negative_set = None
    if a.negative_videos:
        from SAM.samus_data import add_negative_set

        suffix = f"_lungneg{a.negative_videos}"
        if not (work / f"data{suffix}" / "MainPatient" / "class.json").is_file():
            shutil.copytree(data, work / f"data{suffix}", symlinks=True, dirs_exist_ok=True)
        data, stage2 = work / f"data{suffix}", stage2.with_name(stage2.name + suffix)
        splits = pick_negative_videos(Path(a.lung_frames), set(videos), a.negative_videos, a.negative_frames_per_video)
        if not splits["train"]:
            raise SystemExit(f"--lung_frames {a.lung_frames}: no video left for negatives beside the "
                             f"{len(videos)} measured ones")
        lacks = sorted(d for d in datasets.split(",") if d != LUNG_DATASET)
        picked = {k: [f"{f.parent.parent.name}/{f.name}" for f in v] for k, v in splits.items()}
        record = stage2 / "negative_set.json"   # a stage-2 folder trained on other negatives is not reused
        if record.is_file() and json.loads(record.read_text()) != picked:
            raise SystemExit(f"{record}: {stage2} was trained with other negative frames (other --n_videos, "
                             "--frames_per_video or --negative_* flags); remove it or use another --work_dir")
        add_negative_set(data, NEGATIVE_SET, splits, lacks=lacks)
        stage2.mkdir(parents=True, exist_ok=True)
        atomic_write(record, lambda f: f.write(json.dumps(picked, indent=1).encode()))
        negative_set = {"name": NEGATIVE_SET, "lacks": lacks, "frames": {k: len(v) for k, v in splits.items()},
                        "videos": {k: len({video_of(f.stem) for f in v}) for k, v in splits.items()},
                        "measured_videos_excluded": True}
    t1 = time.perf_counter()
    # a stage-2 folder trained before (last.pt at the last epoch) is only calibrated and tested again
    resumed_epochs = load_checkpoint(stage2 / ASAM_LAST, ("asam_stage2",))["epoch"] + 1 \
        if (stage2 / ASAM_LAST).is_file() else 0
    if not (stage2 / "test_metrics.json").is_file():
        train_auto_prompter.main([
            "--task", "SAMUS", "--data_root", str(data), "--datasets", datasets, "--backbone", "lite",
            "--epochs", str(a.epochs), "--max_train", str(a.max_train), "--max_val", str(a.max_val),
            "--max_test", str(a.max_test), "--negative_rate", str(a.negative_rate),
            "--mask_loss_on", a.mask_loss_on, "--presence_score", a.presence_score, "--workers", "1",
            "--device", "cpu", "--prompter_grid", str(a.prompter_grid), "--balance_prompts", "true",
            "--cache_dir", str(work / "cache"), "--out_dir", str(stage2), "--eval_test"]
            + (["--resume"] if (stage2 / ASAM_LAST).is_file() else []))
    train_s = time.perf_counter() - t1
    test = json.loads((stage2 / "test_metrics.json").read_text())
    # with presence thresholds: test_metrics has the decision applied; this the masks without it, rule, AUROCs
    test_presence = json.loads((stage2 / "test_presence.json").read_text()) \
        if (stage2 / "test_presence.json").is_file() else None

    # the lung A-SAM on held-out synthetic scans: a montage for figs/
    syn = work / "synthetic_test"
    names = sorted({l.split("/")[-1] for l in (data / "MainPatient" / "test.txt").read_text().split()
                    if f"/{LUNG_DATASET}/" in l})
    for n in names[:8]:
        link = syn / LUNG_DATASET / "img" / f"{n}.png"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((data / LUNG_DATASET / "img" / f"{n}.png").resolve())
    shutil.rmtree(work / "synthetic_masks", ignore_errors=True)   # infer_masks skips finished maps
    infer_masks.main(["--ckpt", str(stage2 / ASAM_BEST), "--data_dir", str(syn), "--out_dir", str(work / "synthetic_masks"),
                      "--prompts", ",".join(LUNG_PROMPTS), "--device", "cpu", "--workers", "0",
                      "--montage", a.montage])

    # name -> (checkpoint, prompts, --presence): a checkpoint with thresholds also without its decision
    sources = {"asam_lung": (stage2 / ASAM_BEST, list(LUNG_PROMPTS), "checkpoint")}
    ck = load_checkpoint(stage2 / ASAM_BEST, ("asam_stage2",))
    if "presence" in ck:
        sources["asam_lung_no_decision"] = (stage2 / ASAM_BEST, list(LUNG_PROMPTS), "off")
        # its HC18 / USGRA prompts: anatomies no lung frame shows, so every region kept is a false positive
        sources["asam_lung_absent_prompts"] = (stage2 / ASAM_BEST,
                                               [k for k in ck["prompt_keys"] if k not in LUNG_PROMPTS], "checkpoint")
    if a.compare:
        sources["asam_hc18_usgra"] = (Path(a.compare), load_checkpoint(a.compare, ("asam_stage2",))["prompt_keys"],
                                      "checkpoint")
    real_stats = {}
    for name, (ckpt, prompts, presence) in sources.items():
        shutil.rmtree(work / f"real_{name}", ignore_errors=True)  # timed afresh on every run
        res = infer_masks.main(["--ckpt", str(ckpt), "--data_dir", str(real), "--out_dir", str(work / f"real_{name}"),
                                "--prompts", ",".join(prompts), "--device", "cpu", "--workers", "0",
                                "--presence", presence, "--montage", str(work / f"real_{name}_montage.png")])
        real_stats[name] = measure_source(work / f"real_{name}", videos, prompts, a.view)
        real_stats[name]["checkpoint"] = repo_relative(ckpt)
        real_stats[name]["images_per_s"] = res["images_per_s"] or None
        real_stats[name]["presence"] = res["presence"]   # the decision applied, as infer_masks says it
        real_stats[name]["removed"] = res["removed"]

    result = {"what": "lung A-SAM (LiteMedSAM, encoder frozen): stage 2 on synthetic lung scans + HC18 + USGRA; "
                      "Dice on held-out scans, statistics on real lung frames",
              "settings": {k: repo_relative(v) if k in ("seg_root", "lung_frames", "compare", "work_dir") and v else v
                           for k, v in vars(a).items() if k not in ("out", "montage")},
              "data": {"datasets": datasets.split(","), "negative_set": negative_set,
                       "lines": {s: len((data / "MainPatient" / f"{s}.txt").read_text().split())
                                 for s in ("train", "val", "test")}},
              "test": test, "test_presence": test_presence, "stage2_seconds": train_s,
              "stage2_epochs_before_this_run": resumed_epochs, "real_frames": {"videos": len(videos),
                                                                       "frames": sum(map(len, videos.values()))},
              "real": real_stats, "machine": where, "seconds": time.perf_counter() - t0}
    result["machine"]["load_avg_1min_now"] = os.getloadavg()[0]
    atomic_write(Path(a.out), lambda f: f.write(json.dumps(result, indent=1).encode()))
    for key, v in test.items():
        fp = "-" if v.get("fp_rate") is None else f"{v['fp_rate']:.2f}"
        print(f"  {key:<24} Dice {v['dice']:.3f} (n {v['n']})  FP rate {fp}")
    for name, r in real_stats.items():
        print(f"  real frames, {name}: fires {r['overall']['fires']:.2f}, per prompt "
              + ", ".join(f"{k.split('/')[-1]} {v['fires']:.2f}" for k, v in r["per_prompt"].items()))
    print(f"wrote {a.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
