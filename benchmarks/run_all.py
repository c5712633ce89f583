#!/usr/bin/env python
"""All benchmarks in one run: JSON, a Markdown section for docs/RESULTS.md, figures.

    python3 benchmarks/run_all.py --out docs/results      # full run (~20-40 min on 2 CPU cores)
    python3 benchmarks/run_all.py --quick --out /tmp/b    # smoke run (< 1 min)

1. pre-training step time of byol, detcon, aclus at the demo config's batch and size, ratios;
2. pre-training DataLoader images/s with the config's worker count, against the aclus
   step's images/s (the loader must keep up);
3. SAM/infer_masks.py images/s against the bare A-SAM encoder at the same batch size
   (LiteMedSAM backbone, synthetic 256 px scans), overhead in %;
4. peak memory of one step of each stage (A-SAM stage 1, stage 2, mask inference,
   pre-training, evaluation) at demo and paper settings, each in a fresh process; paper
   settings too big for the machine are measured at small batches and extrapolated
   linearly to the configured batch (marked so). On CUDA, torch.cuda.max_memory_allocated.

Writes <out>/benchmarks.json, <out>/benchmarks.md and <out>/*.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import peak_memory  # noqa: E402
from benchmarks.machine import machine  # noqa: E402
from pretraining.config import load_config  # noqa: E402

METHODS = ("byol", "detcon", "aclus")
#: paper-setting stages too slow for a full-batch step on a small CPU (the evaluation step,
#: a ResNet-18 at 224 px, is measured at its real batch: its 1 -> 2 slope is lost in noise)
EXTRAPOLATED = ("asam_stage1", "asam_stage2", "mask_inference", "pretrain")


# --------------------------------------------------------------------------- #
# 1 + 2: pre-training step and data loader
# --------------------------------------------------------------------------- #
def bench_pretrain(cfg_path: Path, steps: int, warmup: int, device: torch.device,
                   overrides: list[str] | None = None) -> dict:
    from benchmarks.bench_pretrain_step import time_method

    cfg = load_config(cfg_path, overrides)
    batch, size = cfg.data.train_batch_size, cfg.data.resize_size
    res = {"config": str(cfg_path.relative_to(REPO)), "overrides": overrides or [], "batch": batch,
           "size": size, "steps": steps, "warmup": warmup, "device": str(device), "methods": {}}
    for method in METHODS:
        times = time_method(method, batch, size, steps, warmup, device, cfg)
        med = statistics.median(times)
        res["methods"][method] = {"median_s": med, "min_s": min(times), "max_s": max(times),
                                  "img_per_s": batch / med}
    m = {k: v["median_s"] for k, v in res["methods"].items()}
    res["ratios"] = {"detcon/byol": m["detcon"] / m["byol"], "aclus/byol": m["aclus"] / m["byol"],
                     "aclus/detcon": m["aclus"] / m["detcon"]}
    return res


def bench_loader(cfg_path: Path, batches: int, train_img_per_s: float,
                 overrides: list[str] | None = None) -> dict:
    from benchmarks.bench_pretrain_step import time_loader

    cfg = load_config(cfg_path, overrides)
    d = cfg.data
    batch, size, workers = d.train_batch_size, d.resize_size, d.data_workers
    ips = time_loader(batch, size, workers, batches, crop_scale=d.crop_scale)
    return {"batch": batch, "size": size, "workers": workers, "batches": batches,
            "loader_img_per_s": ips, "train_img_per_s": train_img_per_s,
            "loader_over_train": ips / train_img_per_s, "loader_is_bottleneck": ips < train_img_per_s}


# --------------------------------------------------------------------------- #
# 3: mask inference against the bare encoder
# --------------------------------------------------------------------------- #
def bench_masks(work: Path, quick: bool) -> dict:
    from benchmarks.bench_asam import synthetic_throughput

    if quick:
        return synthetic_throughput(work, backbone="vit_tiny", img_size=64, n_images=4, batch=2,
                                    prompts=3, repeats=1)
    return synthetic_throughput(work, backbone="lite", img_size=256, n_images=16, batch=8,
                                prompts=3, repeats=3)


# --------------------------------------------------------------------------- #
# 4: peak memory
# --------------------------------------------------------------------------- #
def run_child(stage: str, setting: str, batch: int, device: str, threads: int) -> dict:
    """One peak_memory measurement in a fresh Python process."""
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", stage, setting, str(batch),
           "--device", device, "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(a: dict, b: dict, batch: int) -> dict:
    """Linear in the batch size through two measurements (peak RSS and CUDA peak)."""
    out = {"batch": batch, "extrapolated_from": [a["batch"], b["batch"]]}
    for key in ("peak_rss_mb", "step_increase_mb", "cuda_peak_allocated_mb"):
        if key in a and key in b:
            slope = (b[key] - a[key]) / (b["batch"] - a["batch"])
            out[key] = round(b[key] + slope * (batch - b["batch"]), 1)
    out["rss_before_step_mb"] = b["rss_before_step_mb"]
    return out


def bench_memory(settings: list[str], stages: list[str], device: str, threads: int,
                 small_batches: tuple[int, int], quick: bool) -> list[dict]:
    """Demo settings at their configured batch; paper settings on a CPU at ``small_batches``
    and extrapolated (on CUDA: measured at the configured batch)."""
    rows = []
    for setting in settings:
        for stage in stages:
            batch = 2 if quick else peak_memory.configured_batch(stage, setting)
            t = time.perf_counter()
            if (setting == "paper" and device == "cpu" and batch > small_batches[1]
                    and stage in EXTRAPOLATED):
                a, b = (run_child(stage, setting, n, device, threads) for n in small_batches)
                row = extrapolate(a, b, batch) | {"measured": [a, b]}
            else:
                row = run_child(stage, setting, batch, device, threads)
            row.update(stage=stage, setting=setting, device=device,
                       seconds=round(time.perf_counter() - t, 1))
            print(f"  memory {setting:5s} {stage:15s} batch {batch:3d}: peak RSS {row['peak_rss_mb']:.0f} MiB"
                  f"{' (extrapolated)' if 'extrapolated_from' in row else ''}", flush=True)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["## Benchmarks", "",
             f"Generated by `python3 benchmarks/run_all.py{' --quick' if res['quick'] else ''}` on "
             f"{m['cpu']}, {m['cpu_count']} CPU cores (shared with other jobs: 1-min load average "
             f"{m['load_avg_1min_at_start']:.1f} at the start, so times are noisy; medians), torch "
             f"{m['torch']} with {res['threads']} thread(s), {m['gpu'] or 'no GPU'}, "
             f"{res['seconds'] / 60:.0f} min in all.", ""]
    p = res["pretrain"]
    lines += [f"### Pre-training step ({p['config']}: batch {p['batch']}, {p['size']} px, "
              f"median of {p['steps']} steps after {p['warmup']} warm-up, {p['device']})", "",
              "| method | median step s | img/s | step / byol |", "|---|---|---|---|"]
    for k in METHODS:
        v = p["methods"][k]
        lines.append(f"| {k} | {v['median_s']:.3f} | {v['img_per_s']:.1f} | "
                     f"{v['median_s'] / p['methods']['byol']['median_s']:.2f} |")
    lines += ["", f"aclus / detcon = {p['ratios']['aclus/detcon']:.2f}x (aclus adds one online and one "
              "target pass for the context view: 1.5x a BYOL step is its arithmetic floor).", ""]
    ld = res["loader"]
    lines += ["### Data loader against the training step", "",
              "| loader workers (config) | loader img/s | aclus step img/s | loader / step |",
              "|---|---|---|---|",
              f"| {ld['workers']} | {ld['loader_img_per_s']:.1f} | {ld['train_img_per_s']:.1f} | "
              f"{ld['loader_over_train']:.1f}x |", "",
              "The loader " + ("is **the bottleneck**" if ld["loader_is_bottleneck"] else "is not the bottleneck")
              + " (measured alone, worker start-up included; in training it shares the cores).", ""]
    mk = res["masks"]
    lines += [f"### Mask inference against the bare encoder ({mk['backbone']} backbone, "
              f"{mk['img_size']} px, {mk['images']} synthetic scans, batch {mk['batch_size']}, "
              f"{mk['prompts']} anatomies per image, {mk['torch_threads']} torch thread(s), "
              f"{mk['workers']} reader process(es), median of {mk['repeats']})", "",
              "| | seconds | img/s |", "|---|---|---|",
              f"| bare encoder forward | {statistics.median(mk['encoder_s']):.1f} | {mk['encoder_img_per_s']:.3f} |",
              f"| SAM/infer_masks.py end to end | {statistics.median(mk['pipeline_s']):.1f} | "
              f"{mk['pipeline_img_per_s']:.3f} |", "",
              f"Overhead of the pipeline over the encoder: **{mk['overhead_pct']:.1f} %** (target < 10 %).", ""]
    lines += ["### Peak memory of one step (fresh process per row)", "",
              "| setting | stage | batch | peak RSS MiB | RSS before step MiB | step increase MiB | "
              "CUDA peak MiB | note |", "|---|---|---|---|---|---|---|---|"]
    for r in res["memory"]:
        note = (f"extrapolated from batches {r['extrapolated_from'][0]} and {r['extrapolated_from'][1]}"
                if "extrapolated_from" in r else "measured")
        cuda = f"{r['cuda_peak_allocated_mb']:.0f}" if "cuda_peak_allocated_mb" in r else "-"
        lines.append(f"| {r['setting']} | {r['stage']} | {r['batch']} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_before_step_mb']:.0f} | {r['step_increase_mb']:.0f} | {cuda} | {note} |")
    if res.get("memory_note"):
        lines += ["", f"Note: {res['memory_note']}."]
    lines += ["", "Settings: demo = `configs/synthetic_cpu.yaml` for pre-training, tiny ViT at 64 px "
              "(batch 8 for stages 1-2, 16 for masks, 4 prompts) for A-SAM, evaluation at 64 px batch 32; "
              "paper = `configs/example.yaml` (224 px, batch 32 per GPU, paper heads), A-SAM ViT-B at "
              "256 px (batch 8, 3 prompts for masks), evaluation at 224 px batch 32. Peak RSS includes "
              "Python + torch (the 'before step' column: models, optimizer and inputs built).", ""]
    return "\n".join(lines)


def figures(res: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    p = res["pretrain"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    meds = [p["methods"][k]["median_s"] for k in METHODS]
    ax.bar(METHODS, meds, color=["#999999", "#6a8fd0", "#d0603a"])
    for i, v in enumerate(meds):
        ax.text(i, v, f"{v / meds[0]:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("median step (s)")
    ax.set_title(f"pre-training step, batch {p['batch']}, {p['size']} px")
    save(fig, "bench_pretrain_step.png")

    ld, mk = res["loader"], res["masks"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(["loader", "aclus step"], [ld["loader_img_per_s"], ld["train_img_per_s"]],
                color=["#6a8fd0", "#d0603a"])
    axes[0].set_ylabel("images / s")
    axes[0].set_title(f"data loader ({ld['workers']} workers) vs training")
    axes[1].bar(["encoder", "infer_masks"], [mk["encoder_img_per_s"], mk["pipeline_img_per_s"]],
                color=["#999999", "#d0603a"])
    axes[1].set_ylabel("images / s")
    axes[1].set_title(f"mask inference: +{mk['overhead_pct']:.1f} % over encoder")
    save(fig, "bench_throughput.png")

    if not res["memory"]:
        return written
    fig, ax = plt.subplots(figsize=(8, 3.4))
    settings = sorted({r["setting"] for r in res["memory"]}, key=["demo", "paper"].index)
    stages = [s for s in peak_memory.STAGES if any(r["stage"] == s for r in res["memory"])]
    width = 0.8 / len(settings)
    for j, setting in enumerate(settings):
        vals = [next((r["peak_rss_mb"] for r in res["memory"] if r["stage"] == s and r["setting"] == setting), 0)
                for s in stages]
        ax.bar([i + j * width for i in range(len(stages))], vals, width, label=setting)
    ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(stages))], stages)
    ax.set_ylabel("peak RSS of one step (MiB)")
    ax.set_title("peak memory per stage (paper on CPU: extrapolated in batch)")
    ax.legend()
    save(fig, "bench_memory.png")
    return written


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results", help="folder for benchmarks.json/.md and figures")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, one repeat (< 1 min)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads everywhere (default 1: steadier on a shared machine)")
    p.add_argument("--device", default="cpu", help="device for steps and memory (cpu | cuda)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: memory")
    p.add_argument("--render_only", action="store_true",
                   help="re-write benchmarks.md and the figures from <out>/benchmarks.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        saved = out / "benchmarks.json"
        try:
            res = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"run_all.py: {saved}: cannot read the results to render ({e})") from None
        res["figures"] = figures(res, out)
        (out / "benchmarks.md").write_text(markdown(res))
        return res
    t0 = time.perf_counter()
    res = {"quick": args.quick, "threads": args.threads, "machine": machine()}
    demo = REPO / "configs" / "synthetic_cpu.yaml"
    small = ["data.train_batch_size=4", "data.resize_size=32"] if args.quick else None
    device = torch.device(args.device)

    print("1/4 pre-training step per method", flush=True)
    res["pretrain"] = bench_pretrain(demo, 1 if args.quick else 5, 0 if args.quick else 2, device, small)
    print("2/4 data loader", flush=True)
    res["loader"] = bench_loader(demo, 2 if args.quick else 8,
                                 res["pretrain"]["methods"]["aclus"]["img_per_s"], small)
    print("3/4 mask inference vs encoder", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["masks"] = bench_masks(Path(tmp), args.quick)
    print(f"    overhead {res['masks']['overhead_pct']:.1f} %", flush=True)
    print("4/4 peak memory", flush=True)
    if "memory" in args.skip.split(","):
        res["memory"] = []
    elif args.quick:
        res["memory"] = bench_memory(["demo"], ["pretrain"], args.device, args.threads, (1, 2), True)
    else:
        res["memory"] = bench_memory(["demo", "paper"], list(peak_memory.STAGES), args.device,
                                     args.threads, (1, 2), False)
    res["seconds"] = time.perf_counter() - t0
    res["figures"] = figures(res, out)
    (out / "benchmarks.json").write_text(json.dumps(res, indent=1))
    (out / "benchmarks.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
