"""Tables, verdicts and figures of the study, rendered from its committed CSV / JSON files.

Nothing here is typed by hand: ``study_real_data.py --render_only`` reads
``per_fold.csv``, ``runs.csv``, ``loss.csv``, ``mask_stats.json`` and ``settings.json``
from the results folder and writes ``results.md``, the figures beside it, and the block
between the results folder's markers (``<!-- study:begin -->`` ... ``<!-- study:end -->`` for
``docs/results/study``, ``<!-- study_cpu_long:begin -->`` ... for ``docs/results/study_cpu_long``) of
README.md and docs/RESULTS.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from study import stats
from study.plan import BASELINES



def markers(name: str) -> tuple[str, str]:
    """The begin / end markers of the README / RESULTS block of the results folder ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


BEGIN, END = markers("study")
REFERENCES = ("random", "byol")
PROTOCOL_LABELS = {"linear": "linear probe (logistic regression on frozen features)",
                   "knn": "kNN probe (cosine, k = 20, frozen features)",
                   "finetune": "fine-tune (paper protocol: layer4.1 + head)",
                   "finetune_cached": "fine-tune, layer4.1 + head on cached frozen features (no augmentation)"}


def final_rows(rows: list[dict]) -> list[dict]:
    """The rows each arm is compared by: baselines at their start, pre-trained arms at the end."""
    return [r for r in rows if (r["arm"] in BASELINES and r["fraction"] == 0.0) or r["fraction"] == 1.0]


def at_fraction(rows: list[dict], fraction: float) -> list[dict]:
    """Pre-trained arms after ``fraction`` of their steps, with the baselines (their start)."""
    return [r for r in rows if r["arm"] in BASELINES or r["fraction"] == fraction]


def arm_order(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["arm"] for r in rows))
    return [a for a in BASELINES if a in seen] + [a for a in seen if a not in BASELINES]


def protocols_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["protocol"] for r in rows))


#: the one comparison the study is built to answer; every other verdict is secondary
PRIMARY_PROTOCOL = "linear"


def primary_arm(arms: list[str]) -> str | None:
    """The ACLUS arm of the primary comparison: with A-SAM masks where it ran, else the first ACLUS arm."""
    aclus = [a for a in arms if a.startswith("aclus_")]
    return "aclus_asam" if "aclus_asam" in aclus else (aclus[0] if aclus else None)


def verdicts(rows: list[dict], protocol: str) -> list[str]:
    """One line per arm (random init aside) and reference: higher / lower with the interval,
    or "not distinguishable"; the primary comparison (ACLUS vs random init and vs BYOL, linear
    probe, end of training) is marked, every other one is secondary."""
    fin = final_rows(rows)
    out = []
    primary = primary_arm(arm_order(fin)) if protocol == PRIMARY_PROTOCOL else None
    for arm in arm_order(fin):
        if arm == "random":
            continue
        parts = []
        for ref in REFERENCES:
            if ref == arm:
                continue
            d = stats.paired_difference(fin, arm, ref, protocol)
            if d.n_pairs:
                parts.append(f"vs {ref}: {stats.describe(d)} ({d.n_pairs} seed x fold pairs)")
        if parts:
            label = "primary" if arm == primary else "secondary"
            out.append(f"- **{arm}** ({label}) " + "; ".join(parts))
    return out


#: the BYOL implementations our byol is checked against, with their titles in results.md
PARITY_REFERENCES = {"lightly_byol": "lightly's",
                     "lightly_byol_x2": "lightly's with its loss doubled (lightly_byol_x2: our gradient scale)"}


def parity_table(rows: list[dict], protocol: str, ours: str = "byol", reference: str = "lightly_byol") -> str:
    """Our BYOL against lightly's at every probe point: each one's mean ± sd over seeds x folds,
    the paired difference, and whether it lies within the seeds' spread (|difference| <= the
    larger sd of the seed means)."""
    fractions = sorted({r["fraction"] for r in rows if r["arm"] in (ours, reference) and r["protocol"] == protocol})
    if not fractions or not {ours, reference} <= {r["arm"] for r in rows}:
        return ""
    lines = [f"| share of steps | {ours} | {reference} | {ours} - {reference} (95 % CI) | sd of seed means | "
             "within the seed spread |", "|---|---|---|---|---|---|"]
    for f in fractions:
        sub = [r for r in rows if r["fraction"] == f]
        a, b = stats.summarize(sub, ours, protocol), stats.summarize(sub, reference, protocol)
        if not a["n"] or not b["n"]:
            continue
        d = stats.paired_difference(sub, ours, reference, protocol)
        sd_a, sd_b = _seed_mean_sd(sub, ours, protocol), _seed_mean_sd(sub, reference, protocol)
        spread = max(sd_a, sd_b)
        within = "–" if math.isnan(spread) else ("yes" if stats.within_spread(d.mean, sd_a, sd_b) else "no")
        lines.append(f"| {f:.0%} | {a['mean']:.3f} ± {a['sd']:.3f} | {b['mean']:.3f} ± {b['sd']:.3f} | "
                     f"{stats.describe(d)} | {'–' if math.isnan(spread) else f'{spread:.3f}'} | {within} |")
    return "\n".join(lines) + "\n"


def parity_note(rows: list[dict], ours: str = "byol") -> str:
    """How to read the "within the seed spread" column: the share of probe points at which two arms
    of one algorithm, with this study's number of seeds, would be called outside it."""
    seeds = len({r["seed"] for r in rows if r["arm"] == ours})
    if seeds < 2:
        return "Within the seed spread: needs at least two seeds per arm."
    return (f"Within the seed spread: |difference| <= the larger sd of the two arms' seed means. With {seeds} seeds "
            f"per arm, two arms of one algorithm fail that at {stats.spread_false_alarm(seeds):.0%} of probe points "
            "if their seed means are independent normal draws (`study.stats.spread_false_alarm`; less where the "
            "arms' runs are correlated, as runs that share a seed's encoder initialisation and batches may be): a "
            "\"no\" is read against that rate, and the paired interval is the verdict.")


def _seed_mean_sd(rows: list[dict], arm: str, protocol: str) -> float:
    """Sample sd over seeds of each seed's mean over folds (nan with fewer than 2 seeds)."""
    means = [np.mean([r["accuracy"] for r in rows if r["arm"] == arm and r["protocol"] == protocol and r["seed"] == s])
             for s in sorted({r["seed"] for r in rows if r["arm"] == arm and r["protocol"] == protocol})]
    return float(np.std(means, ddof=1)) if len(means) > 1 else math.nan


def curve_table(rows: list[dict], protocol: str) -> str:
    """Accuracy after each share of the steps (mean ± sd over seeds x folds) and its paired
    difference from random init at that point."""
    fractions = sorted({r["fraction"] for r in rows if r["arm"] not in BASELINES and r["protocol"] == protocol})
    arms = [a for a in arm_order(rows) if a not in BASELINES]
    if not fractions or not arms:
        return ""
    head = "| arm | " + " | ".join(f"{f:.0%} of steps" for f in fractions) + " |"
    lines = [head, "|" + "---|" * (1 + len(fractions))]
    for arm in arms:
        cells = []
        for f in fractions:
            sub = at_fraction(rows, f)
            s = stats.summarize(sub, arm, protocol)
            if s["n"] == 0:
                cells.append("–")
                continue
            d = stats.paired_difference(sub, arm, "random", protocol)
            sd = "–" if math.isnan(s["sd"]) else f"{s['sd']:.3f}"
            cells.append(f"{s['mean']:.3f} ± {sd}; vs random {stats.describe(d)}" if d.n_pairs else
                         f"{s['mean']:.3f} ± {sd}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def schedule_table(rows: list[dict], protocol: str) -> str:
    """Per pre-trained arm and reference (random init, byol): the probe points at which the paired
    interval excludes zero, "higher" and "lower" apart; "not distinguishable at any point" when none
    does. Empty when the arms were probed at the end only."""
    fractions = sorted({r["fraction"] for r in rows if r["arm"] not in BASELINES and r["protocol"] == protocol})
    arms = [a for a in arm_order(rows) if a not in BASELINES]
    if len(fractions) < 2 or not arms:
        return ""
    refs = [r for r in REFERENCES if any(x["arm"] == r for x in rows)]
    lines = ["| arm | " + " | ".join(f"vs {r}" for r in refs) + " |", "|" + "---|" * (1 + len(refs))]
    for arm in arms:
        cells = []
        for ref in refs:
            if ref == arm:
                cells.append("–")
                continue
            found: dict[str, list[str]] = {"higher": [], "lower": []}
            probed = []
            for f in fractions:
                d = stats.paired_difference(at_fraction(rows, f), arm, ref, protocol)
                if d.n_pairs:
                    probed.append(f)
                if d.verdict in found:
                    found[d.verdict].append(f"{f:.0%}")
            said = [f"{v} at {', '.join(at)}" for v, at in found.items() if at]
            cells.append("; ".join(said) if said else
                         "no pairs" if not probed else "not distinguishable at any point")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_table(runs: list[dict]) -> str:
    if not runs:
        return ""
    lines = ["| arm | seed | frames | steps x batch | images | encoder passes (online / target) | "
             "training time |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        t = "–" if r.get("train_s") is None else f"{r['train_s'] / 60:.1f} min"
        lines.append(f"| {r['arm']} | {r['seed']} | {r['frames']} | {r['steps']} x {r['batch_size']} | "
                     f"{r['images']} | {r['online_passes']} / {r['target_passes']} | {t} |")
    return "\n".join(lines) + "\n"


def mask_table(mask_stats: dict, view: int | None = None) -> str:
    """Per mask source, the :func:`pretraining.mask_stats.summarise` of its label maps: how many
    regions own a cell of each scale's grid in a whole-image view of the preset's size."""
    def num(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"
    at = f" ({view} px view)" if view else ""
    lines = ["| mask source | frames | share of frames with a region | regions per frame (mean ± sd) | "
             f"pixel share per region (mean) | regions owning a cell{at}: P2 / P3 / P4 / C5 |", "|---|---|---|---|---|---|"]
    for source, s in mask_stats.items():
        if not s.get("frames"):
            continue
        rpf = s["regions_per_frame"]
        surv = s.get("survival") or {"c5": s["c5_survival"]["share"]}
        per_scale = " / ".join(num(surv.get(k)) for k in ("p2", "p3", "p4", "c5"))
        lines.append(f"| {source} | {s['frames']} | {num(s['fires'])} | {num(rpf['mean'], 2)} ± {num(rpf['std'], 2)} | "
                     f"{num(s['region_share']['mean'])} | {per_scale} |")
    return "\n".join(lines) + "\n"


def drawn_regions_table(loss: list[dict]) -> str:
    """Per pre-trained arm with region draws: the share of drawn regions present in both views at
    each scale (the logged ``regions/<scale>``), averaged over the logged steps and seeds. The rest
    add nothing to that scale's loss."""
    terms = ("regions/p2", "regions/p3", "regions/p4", "regions/c5")
    arms = list(dict.fromkeys(r["arm"] for r in loss if r["term"] in terms))
    if not arms:
        return ""
    lines = ["| arm | P2 | P3 | P4 | C5 |", "|---|---|---|---|---|"]
    for arm in arms:
        cells = [np.mean([r["value"] for r in loss if r["arm"] == arm and r["term"] == t] or [math.nan]) for t in terms]
        lines.append(f"| {arm} | " + " | ".join("–" if math.isnan(c) else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


#: what an older settings.json (before --downstream) evaluated on
POCUS_DOWNSTREAM = {"name": "POCUS", "folds": 5, "split": "split by video"}


def downstream_of(settings: dict) -> dict:
    return settings.get("downstream") or POCUS_DOWNSTREAM


def steps_phrase(rows: list[dict], settings: dict) -> str:
    """"2040 steps per pre-trained arm", naming each arm whose runs ended at another count: an
    A-SAM arm trains on the frames its masks find anatomy on, in the whole number of epochs
    nearest the others' steps (:func:`study.plan.equal_step_epochs`)."""
    planned = settings.get("steps", "?")
    other: dict[str, set] = {}
    for r in final_rows(rows):
        if r["arm"] not in BASELINES and r["steps"] != planned:
            other.setdefault(r["arm"], set()).add(r["steps"])
    text = f"{planned} steps per pre-trained arm"
    if other:
        text += (" (" + "; ".join(f"{arm} {', '.join(str(n) for n in sorted(s))}" for arm, s in other.items())
                 + ": whole epochs over the frames its masks keep)")
    return text


def summary_block(rows: list[dict], settings: dict) -> str:
    """The README / RESULTS block: per protocol, the table at the end of the steps and the verdicts."""
    where = settings.get("where", "?")
    down = downstream_of(settings)
    preset = settings.get("preset", {})
    seeds = sorted({int(r["seed"]) for r in rows})
    parts = [f"Preset `{preset.get('name', '?')}` on {where}: {preset.get('img_size')} px, batch "
             f"{preset.get('batch_size')}, {steps_phrase(rows, settings)}; seeds "
             f"{seeds}; the same {down['folds']} {down['name']} folds ({down['split']}) for every arm. Mean ± sample sd over seeds x folds; "
             "differences paired by (seed, fold); 95 % interval from a two-level bootstrap that resamples the folds, "
             f"then the seeds within each drawn fold ({stats.N_BOOT:,} resamples; a verdict that changes with the "
             "bootstrap's seed counts as not distinguishable). Primary comparison: ACLUS vs random init and vs BYOL, "
             "linear probe, end of pre-training; every other verdict is secondary. Rendered by "
             "`python study_real_data.py --render_only` from `per_fold.csv` of the results folder."]
    missing = settings.get("missing_arms") or {}
    if missing:
        parts.append("Not run: " + "; ".join(f"{a} ({why})" for a, why in missing.items()) + ".")
    pending = settings.get("pending") or []
    if pending:
        parts.append(f"Incomplete: {len(pending)} (arm, seed) pairs have no rows yet "
                     f"({', '.join(pending[:8])}{' ...' if len(pending) > 8 else ''}); re-running the study "
                     "command continues with them.")
    for protocol in protocols_of(rows):
        fin = final_rows(rows)
        arms = arm_order(fin)
        parts.append(f"**{PROTOCOL_LABELS.get(protocol, protocol)}**, end of pre-training:\n\n"
                     + stats.markdown_table(fin, protocol, arms, [r for r in REFERENCES if r in arms]).rstrip())
        v = verdicts(rows, protocol)
        if v:
            parts.append("\n".join(v))
        when = schedule_table(rows, protocol)
        if when:
            parts.append(f"Over the schedule, {PROTOCOL_LABELS.get(protocol, protocol)}: the probe points (share "
                         "of the steps) at which the paired interval excludes zero; a pre-trained arm at that point "
                         "against random init at its start, or against byol at the same point.\n\n" + when.rstrip())
    return "\n\n".join(parts) + "\n"


def results_markdown(rows: list[dict], runs: list[dict], mask_stats: dict, settings: dict,
                     figures: list[str], loss: list[dict] = ()) -> str:
    down = downstream_of(settings)
    md = [f"# Pre-training study: COVID-BLUES -> {down['name']} ({down['folds']} folds)", "",
          summary_block(rows, settings)]
    for protocol in protocols_of(rows):
        t = curve_table(rows, protocol)
        if t:
            md += [f"## Over the steps: {PROTOCOL_LABELS.get(protocol, protocol)}", "", t]
    first_parity = True
    for reference, title in PARITY_REFERENCES.items():
        for protocol in protocols_of(rows):
            t = parity_table(rows, protocol, reference=reference)
            if t:
                md += [f"## Our BYOL vs {title}: {PROTOCOL_LABELS.get(protocol, protocol)}", ""]
                if first_parity:
                    md += [parity_note(rows), ""]
                    first_parity = False
                md += [t]
    if runs:
        md += ["## Cost of each pre-trained arm", "", runs_table(runs)]
    if mask_stats:
        md += ["## Masks of the pre-training frames", "", mask_table(mask_stats, settings.get("preset", {}).get("img_size"))]
    drawn = drawn_regions_table(loss)
    if drawn:
        md += ["## Drawn regions present in both views, per scale (mean over the logged steps)", "", drawn]
    if figures:
        md += ["## Figures", "", *[f"![{Path(f).stem}]({Path(f).name})" for f in figures], ""]
    return "\n".join(md)


def splice(text: str, block: str, where: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the part between ``begin`` and ``end`` (the study's markers) replaced by ``block``."""
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{where}: no '{begin}' ... '{end}' block")
    return text[: i + len(begin)] + "\n" + block.rstrip() + "\n" + text[j:]


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def _ci(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of an arm's mean accuracy, resampling folds, then seeds within them."""
    by_fold = [np.array([r["accuracy"] for r in rows if r["fold"] == f]) for f in sorted({r["fold"] for r in rows})]
    if sum(v.size for v in by_fold) < 2:
        m = float(np.mean([r["accuracy"] for r in rows]))
        return m, m
    lo, hi = np.percentile(stats.hierarchical_bootstrap(by_fold, n_boot, seed), [2.5, 97.5])
    return float(lo), float(hi)


def accuracy_figure(rows: list[dict], protocol: str, path: Path, downstream: str = "POCUS") -> Path:
    """Per arm: each seed's mean over folds (points), the mean over seeds x folds and its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fin = [r for r in final_rows(rows) if r["protocol"] == protocol]
    arms = arm_order(fin)
    fig, ax = plt.subplots(figsize=(1.4 * len(arms) + 2, 3.6))
    for i, arm in enumerate(arms):
        mine = [r for r in fin if r["arm"] == arm]
        v = np.array([r["accuracy"] for r in mine])
        lo, hi = _ci(mine)
        ax.errorbar([i], [v.mean()], yerr=[[v.mean() - lo], [hi - v.mean()]], fmt="o", color="k", capsize=5, ms=7)
        for s in sorted({r["seed"] for r in mine}):
            sv = np.mean([r["accuracy"] for r in mine if r["seed"] == s])
            ax.plot([i + 0.15], [sv], "o", ms=4, alpha=0.7, color=f"C{s % 10}")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel(f"{downstream} accuracy")
    ax.set_title(f"{protocol}: mean and 95 % interval (black), per-seed means (colour)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_figure(rows: list[dict], protocol: str, path: Path, downstream: str = "POCUS") -> Path:
    """Accuracy against the share of pre-training steps (mean ± sd over seeds x folds); baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["protocol"] == protocol]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for k, arm in enumerate(arm_order(mine)):
        rs = [r for r in mine if r["arm"] == arm]
        if arm in BASELINES:
            ax.axhline(np.mean([r["accuracy"] for r in rs]), ls="--" if arm == "random" else ":", color="gray",
                       label=arm)
            continue
        fr = sorted({r["fraction"] for r in rs})
        m = [np.mean([r["accuracy"] for r in rs if r["fraction"] == f]) for f in fr]
        sd = [np.std([r["accuracy"] for r in rs if r["fraction"] == f], ddof=1) if
              sum(r["fraction"] == f for r in rs) > 1 else 0.0 for f in fr]
        ax.errorbar(fr, m, yerr=sd, marker="o", capsize=3, label=arm, color=f"C{k}")
    ax.set_xlabel("share of the pre-training steps")
    ax.set_ylabel(f"{downstream} accuracy")
    ax.set_title(f"{protocol}: accuracy over pre-training (mean ± sd)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_figure(loss: list[dict], path: Path) -> Path | None:
    """One panel per pre-trained arm: each loss term against the step, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [r for r in loss if not r["term"].startswith("regions/")]
    arms = list(dict.fromkeys(r["arm"] for r in loss))
    if not arms:
        return None
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.4), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        rs = [r for r in loss if r["arm"] == arm]
        for t, term in enumerate(dict.fromkeys(r["term"] for r in rs)):
            for s in sorted({r["seed"] for r in rs}):
                pts = sorted((r["step"], r["value"]) for r in rs if r["term"] == term and r["seed"] == s)
                ax.plot(*zip(*pts), color=f"C{t % 10}", lw=1, alpha=0.8, label=term if s == rs[0]["seed"] else None)
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=5, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_all(results: Path, rows: list[dict], runs: list[dict], loss: list[dict], mask_stats: dict,
               settings: dict, docs: tuple[Path, ...] = (), block_name: str = "study") -> Path:
    """Write figures and ``results.md`` into ``results``; splice the summary block into those of
    ``docs`` that hold the markers of ``block_name``."""
    figures = []
    for protocol in protocols_of(rows):
        name = downstream_of(settings)["name"]
        figures.append(str(accuracy_figure(rows, protocol, results / f"accuracy_{protocol}.png", name)))
        if any(r["arm"] not in BASELINES for r in rows):
            figures.append(str(curve_figure(rows, protocol, results / f"curve_{protocol}.png", name)))
    lf = loss_figure(loss, results / "loss_terms.png")
    if lf:
        figures.append(str(lf))
    md = results_markdown(rows, runs, mask_stats, settings, figures, loss)
    (results / "results.md").write_text(md)
    block = summary_block(rows, settings)
    begin, end = markers(block_name)
    for doc in docs:
        if doc.is_file() and begin in doc.read_text():
            doc.write_text(splice(doc.read_text(), block, str(doc), begin, end))
    return results / "results.md"
