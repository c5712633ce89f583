"""The learning-rate sweep of a preset: one study variant per base_lr -> a table and the choice.

    python -m study.sweep docs/results/study_cpu_long/variants      # writes sweep.md and sweep.json there

Every variant folder (``study_real_data.py --epochs E --base_lr X --results <folder>/<name>``)
holds the rows of one arm (classic BYOL) and seed on the same POCUS folds. The rule, fixed
before the rows were read: the base_lr whose encoder has the highest mean linear-probe
accuracy (the study's primary protocol) after all of its steps; the paired difference of
every other base_lr from it is given with the study's fold-level interval, so a choice
that no interval separates reads as such.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from study import StudyError, stats
from study import results as res
from study.render import PRIMARY_PROTOCOL, protocols_of


def sweep_rows(folder: Path) -> list[dict]:
    """The rows of every variant under ``folder``, each tagged with its base_lr as ``arm``
    (``lr=<x>``), so that :mod:`study.stats` pairs them by (seed, fold)."""
    rows = []
    for sub in sorted(p for p in folder.iterdir() if (p / "per_fold.csv").is_file()):
        settings = res.read_json(sub / "settings.json")
        lr = settings.get("preset", {}).get("base_lr")
        if lr is None:
            raise StudyError(f"{sub / 'settings.json'}: no preset.base_lr")
        rows += [dict(r, arm=f"lr={lr:g}") for r in res.read_rows(sub / "per_fold.csv", res.FOLD_COLUMNS)]
    if not rows:
        raise StudyError(f"{folder}: no variant folders with per_fold.csv")
    return rows


def choose(rows: list[dict], protocol: str = PRIMARY_PROTOCOL) -> str:
    """The arm (``lr=<x>``) with the highest mean ``protocol`` accuracy at the end of its steps."""
    final = [r for r in rows if r["fraction"] == 1.0]
    arms = sorted({r["arm"] for r in final})
    return max(arms, key=lambda a: stats.summarize(final, a, protocol)["mean"])


def sweep_markdown(rows: list[dict]) -> tuple[str, dict]:
    best = choose(rows)
    arms = sorted({r["arm"] for r in rows}, key=lambda a: float(a.split("=")[1]))
    fractions = sorted({r["fraction"] for r in rows})
    unfinished = [a for a in arms if not any(r["arm"] == a and r["fraction"] == 1.0 for r in rows)]
    lines = [f"Chosen: **{best}** (highest mean {PRIMARY_PROTOCOL}-probe accuracy after all steps)"
             + (f"; PROVISIONAL: {', '.join(unfinished)} not finished" if unfinished else "")
             + ". Mean ± sd over folds; the difference from the chosen base_lr is paired by fold, with the "
             "study's fold-level 95 % interval.", ""]
    choice = {"chosen_base_lr": float(best.split("=")[1]), "rule": f"highest mean {PRIMARY_PROTOCOL} accuracy at 100 %",
              "unfinished": unfinished, "final": {}}
    for protocol in protocols_of(rows):
        lines += [f"**{protocol}**", "", "| base_lr | " + " | ".join(f"{f:.0%} of steps" for f in fractions)
                  + f" | 100 %: difference from {best} |", "|---|" + "---|" * (len(fractions) + 1)]
        for arm in arms:
            cells = []
            for f in fractions:
                s = stats.summarize([r for r in rows if r["fraction"] == f], arm, protocol)
                cells.append("–" if not s["n"] else f"{s['mean']:.3f} ± {s['sd']:.3f}")
            final = [r for r in rows if r["fraction"] == 1.0]
            d = "–" if arm == best else stats.describe(stats.paired_difference(final, arm, best, protocol))
            lines.append(f"| {arm.split('=')[1]} | " + " | ".join(cells) + f" | {d} |")
            summary = stats.summarize(final, arm, protocol)
            if summary["n"]:   # an unfinished variant has no final mean (never a NaN in the JSON)
                choice["final"].setdefault(protocol, {})[arm] = summary["mean"]
        lines.append("")
    return "\n".join(lines), choice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the variants folder of a study (one sub-folder per base_lr)")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    try:
        md, choice = sweep_markdown(sweep_rows(folder))
    except StudyError as e:
        print(f"study.sweep: error: {e}", file=sys.stderr)
        return 1
    (folder / "sweep.md").write_text("# Learning-rate sweep\n\n" + md)
    res.write_json(folder / "sweep.json", choice)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
