"""Rows, tables, statistics and figures of the study, from the files a study folder holds."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

from study import StudyError
from study.plan import SOURCE_LABELS, SUB, Run, parse_run
from utils import mask_layout as layout


def fmt_pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def result_row(name: str, method: str, mask_source: str | None, pretrain: dict | None,
               evaluation: dict | None, missing: str | None = None) -> dict:
    """One row of the results table from a pre-training record and an evaluation JSON."""
    s = (evaluation or {}).get("summary", {})
    return {
        "run": name, "method": method, "mask_source": SOURCE_LABELS.get(mask_source, mask_source),
        "pretrain_images": (pretrain or {}).get("images"),
        "pretrain_steps": (pretrain or {}).get("steps"),
        "pretrain_wall_s": (pretrain or {}).get("wall_s"),
        "pretrain_train_s": (pretrain or {}).get("train_s"),
        "accuracy_mean": s.get("accuracy_mean"), "accuracy_std": s.get("accuracy_std"),
        "macro_f1_mean": s.get("macro_f1_mean"), "macro_f1_std": s.get("macro_f1_std"),
        "pooled_accuracy": s.get("pooled_accuracy"),
        "eval_wall_s": (evaluation or {}).get("wall_time_s"),
        "missing": missing,
    }


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | method | mask source | pre-train images | steps | pre-training time | "
            "accuracy (mean ± std, 5 folds) | macro-F1 (mean ± std) | pooled accuracy |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['run']} | {r['method']} | {r['mask_source']} | - | - | - | "
                         f"missing: {r['missing']} | - | - |")
            continue
        pooled = "-" if r["pooled_accuracy"] is None else f"{r['pooled_accuracy']:.3f}"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['mask_source']} | {r['pretrain_images'] or '-'} | "
            f"{r['pretrain_steps'] or '-'} | {fmt_seconds(r['pretrain_train_s'] or r['pretrain_wall_s'])} | "
            f"{fmt_pm(r['accuracy_mean'], r['accuracy_std'])} | {fmt_pm(r['macro_f1_mean'], r['macro_f1_std'])} | "
            f"{pooled} |")
    return "\n".join(lines) + "\n"


def log_summary(records: list[dict]) -> dict:
    """Steps and summed epoch seconds of a pretrain ``log.jsonl`` (parsed records)."""
    steps = [int(r["step"]) for r in records if r.get("kind") == "step" and "step" in r]
    epochs = {int(r["epoch"]): float(r.get("seconds", 0.0)) for r in records if r.get("kind") == "epoch"}
    return {"logged_steps_max": max(steps) + 1 if steps else 0, "epochs_done": len(epochs),
            "train_s": round(sum(epochs.values()), 1) if epochs else None}


def label_stats(labels: list) -> dict:
    """Mask statistics of one source: regions (non-zero ids) per image, background share."""
    import numpy as np

    if not labels:
        return {"images": 0}
    regions = [int(np.count_nonzero(np.bincount(lab.ravel())[1:])) for lab in labels]
    background = [float((lab == 0).mean()) for lab in labels]
    return {"images": len(labels), "regions_mean": round(float(np.mean(regions)), 2),
            "regions_min": min(regions), "regions_max": max(regions),
            "background_fraction_mean": round(float(np.mean(background)), 3)}


def mask_stats_markdown(stats: dict[str, dict]) -> str:
    lines = ["| mask source | images | regions per image (mean, min-max) | background share (mean) |",
             "|---|---|---|---|"]
    for source, s in stats.items():
        if s.get("images"):
            lines.append(f"| {SOURCE_LABELS.get(source, source)} | {s['images']} | {s['regions_mean']:.1f} "
                         f"({s['regions_min']}-{s['regions_max']}) | {s['background_fraction_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def pick_evenly(items: list, n: int) -> list:
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def pretrain_frames(out: Path, run: Run, num_examples: int = 0) -> int:
    """How many frames ``run`` pre-trains on: its pair list, cut to ``num_examples``."""
    n = len(layout.load_pairs(out / "pretrain_data" / run.pairs_source))
    return min(n, num_examples) if num_examples > 0 else n


def pretrain_record(run: Run, out: Path, records: dict[str, dict], num_examples: int = 0) -> dict | None:
    from utils.plots import read_log

    rec = records.get(f"pretrain_{run.name}")
    if rec is None:
        return None
    run_dir = out / "runs" / run.name
    summary = log_summary(read_log(run_dir / "log.jsonl")) if (run_dir / "log.jsonl").is_file() else {}
    return {"wall_s": rec["wall_s"], "train_s": summary.get("train_s"), "steps": summary.get("logged_steps_max"),
            "epochs": summary.get("epochs_done"), "images": pretrain_frames(out, run, num_examples)}


def read_json(path: Path) -> dict:
    """A JSON object file of the study folder; a corrupt one is a :class:`StudyError` naming it."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise StudyError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_json(path: Path, obj) -> None:
    from utils.io import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def make_figures(out: Path, runs: list[Run], rows: list[dict], frames: Path, sources: set[str], n: int) -> list[str]:
    """Loss curves, confusion matrices, accuracy bars and mask overlays under ``<out>/figures``."""
    from utils.io import read_image, read_label
    from utils.plots import LogError, plot_loss_curves, plot_mask_overlays, plot_results_bar

    fig_dir, made = out / "figures", []
    fig_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        log = out / "runs" / run.name / "log.jsonl"
        try:
            made.append(str(plot_loss_curves(log, fig_dir / f"loss_{run.name}.png",
                                             title=f"{run.name}: loss terms per scale (COVID-BLUES)",
                                             smooth_window=5)))
        except LogError as e:
            print(f"[note] no loss figure for {run.name}: {e}", flush=True)
    for name in ["random"] + [r.name for r in runs]:
        for png in sorted((out / "eval" / name).glob("confusion_*.png")):
            shutil.copyfile(png, fig_dir / f"{png.stem}_{name}.png")
            made.append(str(fig_dir / f"{png.stem}_{name}.png"))
    done = [r for r in rows if r.get("accuracy_mean") is not None]
    if done:
        made.append(str(plot_results_bar([r["run"] for r in done], [r["accuracy_mean"] for r in done],
                                          [r["accuracy_std"] for r in done], fig_dir / "accuracy.png",
                                          ylabel="POCUS accuracy (5-fold linear probe)")))
    picked = pick_evenly([e for e in layout.find_images(frames) if e.sub == SUB], n)
    for source in sorted(sources):
        keep = [(e.path, layout.label_path(out / "masks" / source, e.sub, e.rel)) for e in picked]
        keep = [(p, q) for p, q in keep if q.is_file()]
        if keep:
            made.append(str(plot_mask_overlays(
                [read_image(p) for p, _ in keep], [read_label(q) for _, q in keep],
                fig_dir / f"masks_{source}.png", titles=[p.stem for p, _ in keep],
                suptitle=f"{SOURCE_LABELS[source]} on COVID-BLUES frames")))
    return made


def write_report(a: argparse.Namespace, out: Path, records: dict[str, dict], names: list[str], sources: set[str],
                 missing: dict[str, str], settings: dict, frames: Path) -> None:
    """results.md, results.json and figures/ from whatever evaluations exist in ``out``."""
    from utils.io import read_label

    tag = f"linear_{a.eval_selection}"

    def load_eval(name: str) -> dict | None:
        p = out / "eval" / name / f"eval_{tag}.json"
        return read_json(p) if p.is_file() else None

    rows = [result_row("random init", "-", "- (no pre-training)", None, load_eval("random"))]
    runs = []
    for name in names:
        run = parse_run(name)
        if name in missing:
            rows.append(result_row(name, run.method, run.mask_source, None, None, missing[name]))
            continue
        runs.append(run)
        evaluation = load_eval(name)
        rows.append(result_row(name, run.method, run.mask_source, pretrain_record(run, out, records, a.num_examples),
                               evaluation, None if evaluation else "not finished yet"))
    figures = make_figures(out, runs, rows, frames, sources, a.overlay_n)
    table = markdown_table(rows)
    mask_stats = {s: label_stats([read_label(lab) for _, lab in layout.label_jobs(frames, out / "masks" / s)
                                  if lab.is_file()]) for s in sorted(sources)}
    budget = (f"Pre-training budget (every run): {a.img_size} px views, batch {a.batch_size}, "
              f"{a.epochs} epochs ({a.warmup_epochs} warm-up) over the largest frame set; a run with fewer "
              f"frames (A-SAM leaves out frames without anatomy) gets more epochs, so that every run takes "
              f"about the same number of steps; seed {a.seed}, config {a.base_config} + overrides, "
              f"{a.threads} CPU threads. Evaluation: POCUS 5-fold (convex, {a.pocus_frames_per_video} frames per "
              f"video, folds split by video), linear probe on frozen features, selection '{a.eval_selection}', "
              f"{a.img_size} px. Pre-training time = sum of the epoch times in log.jsonl (a resumed run counts "
              f"every epoch once; the stage wall times incl. start-up are in settings.json), measured on this "
              f"contended {os.cpu_count()}-core CPU shared with other jobs.")
    md = (f"# Real-data study: COVID-BLUES pre-training -> POCUS linear probe\n\n{budget}\n\n{table}\n"
          f"Masks of the pre-training frames (id 0 = background, itself a region the loss may draw):\n\n"
          f"{mask_stats_markdown(mask_stats)}\n"
          f"Figures: {', '.join(Path(f).name for f in figures)} (in figures/).\n")
    (out / "results.md").write_text(md)
    write_json(out / "results.json", {"rows": rows, "budget": settings.get("fixed_budget"),
                                       "eval": settings.get("eval"), "missing": missing, "figures": figures,
                                       "mask_stats": mask_stats})
    print("\n" + table + f"\nresults: {out / 'results.md'}, {out / 'results.json'}; settings: {out / 'settings.json'}")


