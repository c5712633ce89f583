"""A-SAM benchmark with the LiteMedSAM backbone on the real HC18 + USGRA data.

1. box-prompted LiteMedSAM (ground-truth box of each anatomy, no training) on the test split;
2. stage 2 (auto-prompter + mask decoder) trained on the train splits, then prompt-free
   test Dice / IoU / HD95 per dataset and class;
3. ``SAM/infer_masks.py`` throughput next to the bare encoder forward at the same batch size,
   on the same images, in the same process.

    python benchmarks/bench_asam.py --seg_root ../shared/data/seg --work_dir runs/bench_asam
    # quick subset (what fits a 2-core CPU in under an hour):
    python benchmarks/bench_asam.py --seg_root ../shared/data/seg --max_train 120 \\
        --max_val 12 --max_test 40 --epochs 6 --infer_images 16

4. with ``--negative_rates 0,R``: one stage 2 per rate on the same lines, cache and seed, so
   "does a prompt stay silent where its anatomy is absent" is measured before (0: every
   training image shows its anatomy) and after (R negatives per line: an image of the other
   data set with this prompt and an empty target). Every test image also meets the other data
   set's prompts; ``fp_rate`` is the share of those on which the prompt still marks something.

    # what docs/results/asam_lite_cpu.json holds (2-core CPU, about 40 min)
    python benchmarks/bench_asam.py --seg_root ../shared/data/seg --work_dir runs/bench_asam \
        --max_train 120 --max_val 20 --max_test 60 --epochs 8 --prompter_grid 16 \
        --balance_prompts true --negative_rates 0,0.5 --out docs/results/asam_lite_cpu.json
    # the same negatives, the mask loss on present lines only (absence left to the presence head)
    python benchmarks/bench_asam.py ... --negative_rates 0.5 --mask_loss_on present \
        --infer_images 0 --out docs/results/asam_lite_presence_present_cpu.json

Encoder embeddings are computed once and cached under <work_dir>/cache (the box baseline and
every stage 2 read them), so a re-run with other training settings is cheap.
Results: ``--out`` (default <work_dir>/bench_asam.json) and Markdown tables on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from SAM import infer_masks, train_auto_prompter  # noqa: E402
from SAM.config import parse_bool  # noqa: E402
from SAM.embedding_cache import EmbeddingCache  # noqa: E402
from SAM.samus_data import SAMUSDataset, image_to_tensor, prompt_keys  # noqa: E402
from SAM.seg_metrics import format_summary  # noqa: E402
from SAM.seg_training import evaluate, make_loader  # noqa: E402
from SAM.segmenter import build_segmenter  # noqa: E402
from utils.io import atomic_write, atomic_write_png, read_image  # noqa: E402
from utils.stage_files import ASAM_BEST  # noqa: E402

DATASETS = ("FetalHead-HC18", "Nerve-USGRA")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seg_root", required=True, help="SAMUS-layout root with HC18 and USGRA")
    p.add_argument("--work_dir", default="runs/bench_asam", help="checkpoints, cache, results")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prompter_grid", type=int, default=32, help="stage 2 --prompter_grid (32)")
    p.add_argument("--balance_prompts", type=parse_bool, default=False,
                   help="stage 2 --balance_prompts (false)")
    p.add_argument("--encoder_lr", type=float, default=0.0,
                   help="stage 2 --encoder_lr (0: encoder frozen and cached; > 0 fine-tunes it, "
                        "an encoder pass per step: slow on a CPU)")
    p.add_argument("--max_train", type=int, default=0, help="split lines per dataset (0 = all)")
    p.add_argument("--max_val", type=int, default=0)
    p.add_argument("--max_test", type=int, default=0)
    p.add_argument("--infer_images", type=int, default=32,
                   help="images for the throughput test (32; at 16 start-up costs dominate; 0 skips "
                        "it, e.g. while another job loads the machine)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--negative_rates", default="0",
                   help="comma list: one stage 2 per stage-2 --negative_rate, each in "
                        "<work_dir>/stage2_neg<rate> (0 = no negatives, the paper's training)")
    p.add_argument("--mask_loss_on", default="all", choices=("all", "present"),
                   help="stage 2 --mask_loss_on of every run ('present': its folder is stage2_neg<rate>_present)")
    p.add_argument("--out", default=None, help="results JSON (default <work_dir>/bench_asam.json)")
    p.add_argument("--seed", type=int, default=0,
                   help="stage 2's seed: its initialisation and its draw of the --max_* lines (0)")
    p.add_argument("--skip_train", action="store_true", help="reuse <work_dir>/stage2_neg<rate>/best.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue each stage 2 from <work_dir>/stage2_neg<rate>/last.pt up to --epochs (an interrupted "
                        "run with --epochs = its finished epochs just evaluates best.pt)")
    args = p.parse_args(argv)
    try:
        args.negative_rates = [float(r) for r in args.negative_rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--negative_rates: expected comma-separated numbers, got {args.negative_rates!r}")
    if not args.negative_rates or min(args.negative_rates) < 0 or \
            len({f"{r:g}" for r in args.negative_rates}) < len(args.negative_rates):
        p.error(f"--negative_rates: expected distinct rates >= 0, got {args.negative_rates}")
    return args


def box_baseline(seg, cache: EmbeddingCache, ds: SAMUSDataset, keys: list[str], batch: int) -> dict:
    """LiteMedSAM with each anatomy's ground-truth box, from the cached embeddings."""
    cache.fill(ds)
    predict = lambda b: seg.decode(cache.batch(ds, b["index"]), seg.encode_prompts(boxes=b["box"]))  # noqa: E731
    return evaluate(predict, make_loader(ds, batch, False, 0), keys, torch.device("cpu"), desc="box")


def throughput(seg, ckpt: Path, ds: SAMUSDataset, n: int, batch: int, work: Path,
               repeats: int = 2) -> dict:
    """infer_masks.py on n test images vs the bare encoder on the same images and batch size
    (:func:`timed_runs`); medians."""
    src = work / "infer_in"
    shutil.rmtree(src, ignore_errors=True)  # infer_masks reads the whole folder: exactly n images
    paths = []
    for key in sorted({l.image_key for l in ds.lines})[:n]:
        dataset, name = key.split("/")
        link = src / dataset / "img" / f"{name}.png"
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((ds.root / dataset / "img" / f"{name}.png").resolve(), link)
        paths.append(link)
    enc, pipe = timed_runs(seg.eval(), ckpt, paths, src, work / "infer_out", batch, repeats, workers=1)
    e, m = statistics.median(enc), statistics.median(pipe)
    return {"images": len(paths), "batch_size": batch, "repeats": repeats, "infer_masks_s": pipe,
            "infer_masks_img_per_s": len(paths) / m, "encoder_only_s": enc,
            "encoder_img_per_s": len(paths) / e, "pipeline_overhead_pct": 100 * (m - e) / e}


def write_synthetic_images(folder: Path, n: int, size: int) -> list[Path]:
    """n synthetic scans under <folder>/Syn/img: square and 2:3 letterboxed ones alternate."""
    from utils.synthetic_scan import make_scan

    paths = []
    for i in range(n):
        shape = (size, size) if i % 2 == 0 else (size * 2 // 3, size)
        image, _ = make_scan(seed=i, size=shape, scan_class=i % 3)
        path = folder / "Syn" / "img" / f"syn_{i:03d}.png"
        atomic_write_png(image, path)
        paths.append(path)
    return paths


def random_stage2_checkpoint(path: Path, backbone: str, img_size: int, prompts: int) -> Path:
    """A stage-2 checkpoint with untrained prompter / decoder: speed does not depend on weights."""
    from SAM.auto_prompter import AutoPrompter, prompter_grid
    from SAM.checkpoint import save_checkpoint

    torch.manual_seed(0)
    seg = build_segmenter(backbone, img_size, random_init=backbone != "lite")
    prompter = AutoPrompter(prompts, grid=prompter_grid(seg.grid))
    save_checkpoint(path, "asam_stage2", seg, [f"Syn/{k + 1}" for k in range(prompts)], prompter)
    return path


def encoder_seconds(seg, paths: list[Path], batch: int) -> float:
    """Bare encoder forward over pre-loaded, letterboxed images at ``batch`` (no I/O)."""
    imgs = [image_to_tensor(read_image(p, "rgb"), seg.img_size)[0] for p in paths]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(imgs), batch):
            seg.embed(torch.stack(imgs[i:i + batch]))
    return time.perf_counter() - t0


def pipeline_seconds(ckpt: Path, src: Path, out: Path, batch: int, workers: int | None) -> float:
    """SAM/infer_masks.py end to end (read, encode, prompt, decode, resize, write PNGs)."""
    shutil.rmtree(out, ignore_errors=True)  # a timed run must not skip finished files
    argv = ["--ckpt", str(ckpt), "--data_dir", str(src), "--out_dir", str(out),
            "--batch_size", str(batch), "--device", "cpu", "--montage", "none"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = infer_masks.main(argv)
    return res["seconds"]


def timed_runs(seg, ckpt: Path, paths: list[Path], src: Path, out: Path, batch: int,
               repeats: int, workers: int | None) -> tuple[list[float], list[float]]:
    """One untimed warm-up of the bare encoder and of infer_masks.py, then ``repeats``
    alternating timed runs (encoder, pipeline, encoder, ...) -> (encoder s, pipeline s)."""
    encoder_seconds(seg, paths[:batch], batch)
    pipeline_seconds(ckpt, src, out, batch, workers)
    enc, pipe = [], []
    for _ in range(repeats):
        enc.append(encoder_seconds(seg, paths, batch))
        pipe.append(pipeline_seconds(ckpt, src, out, batch, workers))
    return enc, pipe


def synthetic_throughput(work: Path, backbone: str = "lite", img_size: int = 256, n_images: int = 8,
                         batch: int = 8, prompts: int = 3, repeats: int = 3,
                         workers: int | None = None) -> dict:
    """Mask inference against the bare encoder on the same synthetic images and batch size,
    in one process (:func:`timed_runs`); medians reported."""
    from SAM.checkpoint import load_checkpoint, segmenter_from_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = random_stage2_checkpoint(work / "stage2_random.pt", backbone, img_size, prompts)
    paths = write_synthetic_images(work / "images", n_images, img_size)
    seg = segmenter_from_checkpoint(load_checkpoint(ckpt, ("asam_stage2",))).eval()
    enc, pipe = timed_runs(seg, ckpt, paths, work / "images", work / "masks", batch, repeats, workers)
    e, m = statistics.median(enc), statistics.median(pipe)
    return {"backbone": backbone, "img_size": img_size, "images": n_images, "batch_size": batch,
            "prompts": prompts, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "workers": infer_masks.default_workers() if workers is None else workers,
            "encoder_s": enc, "pipeline_s": pipe, "encoder_img_per_s": n_images / e,
            "pipeline_img_per_s": n_images / m, "overhead_pct": 100 * (m - e) / e}


def stage2_dir(work: Path, rate: float, mask_loss_on: str, seed: int = 0) -> Path:
    """``stage2_neg<rate>``, with ``_present`` when the mask loss skips empty targets and
    ``_seed<n>`` for a seed other than 0 (another draw of lines: never resumed as seed 0's)."""
    return work / (f"stage2_neg{rate:g}" + ("_present" if mask_loss_on == "present" else "")
                   + (f"_seed{seed}" if seed else ""))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.machine import machine
    where = machine()  # the load average before any work
    work = Path(args.work_dir)
    root = Path(args.seg_root)
    keys = prompt_keys(root, DATASETS)
    seg = build_segmenter("lite").eval()
    cache = EmbeddingCache(seg, torch.device("cpu"), args.batch_size, work / "cache")
    test_ds = SAMUSDataset(root, "test", 256, seg.low_res, keys, DATASETS, return_orig=True,
                           max_items=args.max_test, subset_seed=args.seed)   # stage 2's test lines
    t0 = time.perf_counter()
    box = box_baseline(seg, cache, test_ds, keys, args.batch_size)
    print(f"LiteMedSAM + ground-truth box ({time.perf_counter() - t0:.0f} s incl. encoding):\n"
          f"{format_summary(box)}")

    runs = {}
    for rate in args.negative_rates:
        stage2 = stage2_dir(work, rate, args.mask_loss_on, args.seed)
        train_s = None
        if not args.skip_train:
            t0 = time.perf_counter()
            train_auto_prompter.main([
                "--task", "HC18_USGRA", "--data_root", str(root), "--backbone", "lite",
                "--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--lr", str(args.lr),
                "--max_train", str(args.max_train), "--max_val", str(args.max_val),
                "--max_test", str(args.max_test), "--workers", "1", "--device", "cpu",
                "--prompter_grid", str(args.prompter_grid), "--balance_prompts", str(args.balance_prompts),
                "--encoder_lr", str(args.encoder_lr), "--negative_rate", str(rate), "--mask_loss_on", args.mask_loss_on,
                "--cache_dir", str(work / "cache"), "--out_dir", str(stage2), "--seed", str(args.seed), "--eval_test"]
                + (["--resume"] if args.resume else []))
            train_s = time.perf_counter() - t0
        # log.jsonl is appended to: a retrained or resumed epoch counts once, with its last record
        epochs = list({(e := json.loads(l))["epoch"]: e for l in (stage2 / "log.jsonl").read_text().splitlines()
                       if l.strip()}.values())
        runs[f"{rate:g}"] = {"negative_rate": rate, "mask_loss_on": args.mask_loss_on, "checkpoint": repo_relative(stage2 / ASAM_BEST),
                             "stage2_seconds": train_s, "epochs": len(epochs),
                             "epoch_seconds": sum(e.get("seconds", 0.0) for e in epochs),
                             "test": json.loads((stage2 / "test_metrics.json").read_text())}
        if (stage2 / "test_presence.json").is_file():  # a presence head: its rule, rates, AUROCs
            runs[f"{rate:g}"]["presence"] = json.loads((stage2 / "test_presence.json").read_text())
    first = stage2_dir(work, args.negative_rates[0], args.mask_loss_on, args.seed) / ASAM_BEST
    speed = throughput(seg, first, test_ds, args.infer_images, args.batch_size, work) if args.infer_images else None

    result = {"what": "A-SAM (LiteMedSAM backbone, encoder frozen) on HC18 + USGRA: box-prompted "
                      "baseline, prompt-free stage 2 per negative rate, mask-inference throughput",
              "settings": {k: repo_relative(v) if k in ("seg_root", "work_dir", "out") and v else v
                           for k, v in vars(args).items()},
              "machine": where, "test_lines": len(test_ds),
              "box_prompt": box, "prompt_free": runs, "throughput": speed}
    result["machine"]["load_avg_1min_now"] = os.getloadavg()[0]
    out = Path(args.out) if args.out else work / "bench_asam.json"
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(results_table(box, runs, keys))
    if speed:
        print(f"throughput at batch {speed['batch_size']} on {speed['images']} images: infer_masks "
              f"{speed['infer_masks_img_per_s']:.3f} img/s, encoder alone {speed['encoder_img_per_s']:.3f} "
              f"img/s, pipeline overhead {speed['pipeline_overhead_pct']:.1f} %")
    print(f"wrote {out}")
    return result


def repo_relative(path) -> str:
    """A path as seen from the repository root: a committed JSON names no machine's folders."""
    return os.path.relpath(Path(path).resolve(), Path(__file__).resolve().parents[1])


def results_table(box: dict, runs: dict, keys: list[str]) -> str:
    """Markdown: per prompt, the box baseline's Dice, then Dice and false-positive rate of each
    stage 2 (one column pair per negative rate)."""
    head = "| prompt | n | box Dice |" + "".join(f" Dice (neg {r}) | FP rate (neg {r}) |" for r in runs)
    rows = [head, "|---" * (3 + 2 * len(runs)) + "|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for k in list(keys) + ["mean"]:
        if k not in box:
            continue
        row = f"| {k} | {box[k]['n']} | {box[k]['dice']:.3f} |"
        for run in runs.values():
            t = run["test"].get(k, {})
            row += f" {fmt(t.get('dice'))} | {fmt(t.get('fp_rate'))} |"
        rows.append(row)
    return "\n".join(rows)


if __name__ == "__main__":
    main()
