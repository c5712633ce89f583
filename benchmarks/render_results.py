"""Markdown tables of the segmentation measurements, rendered from their JSON files only.

    python benchmarks/render_results.py          # splice into docs/RESULTS.md (and README.md, where marked)
    python benchmarks/render_results.py --print  # only print them

Each block lives between ``<!-- results:NAME -->`` and ``<!-- results:NAME:end -->`` of the
documents; a document without a block's markers is left alone for that block, and a block whose
JSON is missing is not rendered. Blocks: ``asam`` (docs/results/asam_lite_cpu.json,
benchmarks/bench_asam.py), ``presence`` (docs/results/asam_lite_presence_cpu.json, the same
script with ``--infer_images 0``), ``presence_present`` (docs/results/asam_lite_presence_present_cpu.json,
``--mask_loss_on present``), ``realism`` (docs/results/synthetic_realism.json,
benchmarks/measure_synthetic_realism.py), ``lung_asam`` (docs/results/lung_asam.json,
benchmarks/measure_lung_asam.py ``--negative_rate 0 --mask_loss_on all``), ``lung_asam_presence``
(docs/results/lung_asam_presence.json, the same script with its defaults: negatives, presence decision),
``byol_stepwise`` (docs/results/byol_stepwise_cpu.json, benchmarks/measure_byol_stepwise.py),
``cache_rounding`` (docs/results/cache_rounding_cpu.json, benchmarks/measure_cache_rounding.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DOCS = (REPO / "README.md", REPO / "docs" / "RESULTS.md")


#: the lung A-SAM with lung negatives, decided by the combined rule (measure_lung_asam.py, issue 27)
RESULTS_FILE_DECISION = "lung_asam_negatives_combined.json"
#: the same checkpoint decided by the head's logit alone with the halfway threshold
RESULTS_FILE_HEAD_HALFWAY = "lung_asam_negatives_head_halfway.json"


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def where(d: dict) -> str:
    m = d.get("machine", {})
    dev = m.get("gpu") or f"CPU, {m.get('cpu_count')} cores"
    return (f"{dev}, torch {m.get('torch')}, commit `{(m.get('commit') or '')[:7]}`; load average "
            f"{_f(m.get('load_avg_1min_at_start'), 1)} at the start, {_f(m.get('load_avg_1min_now'), 1)} at the end")


def asam_block(d: dict) -> str:
    """Box-prompted LiteMedSAM and prompt-free A-SAM per negative rate, per prompt."""
    s, runs, box = d["settings"], d["prompt_free"], d["box_prompt"]
    keys = [k for k in box if k != "mean"] + ["mean"]
    head = "| prompt | test images | box-prompted Dice |" + "".join(
        f" A-SAM Dice, negatives {r} | FP rate, negatives {r} | FP area, negatives {r} |" for r in runs)
    rows = [head, "|---" * (3 + 3 * len(runs)) + "|"]
    for k in keys:
        row = f"| {k} | {box[k]['n']} | {_f(box[k]['dice'])} |"
        for run in runs.values():
            t = run["test"].get(k, {})
            row += f" {_f(t.get('dice'))} | {_f(t.get('fp_rate'))} | {_f(t.get('fp_area'))} |"
        rows.append(row)
    tp = d["throughput"]
    secs = ", ".join(f"negatives {r}: {_f(v['epoch_seconds'] / 60, 1)} min for {v['epochs']} epochs"
                     for r, v in runs.items())
    return "\n".join([
        f"LiteMedSAM backbone, encoder frozen; stage 2 for {s['epochs']} epochs on {s['max_train'] or 'all'} "
        f"training lines per data set (prompter grid {s['prompter_grid']}, prompts balanced: "
        f"{s['balance_prompts']}); test: {s['max_test'] or 'all'} lines per data set. Dice over the test "
        "images that show the anatomy; FP rate = share of the other data set's test images on which the "
        "prompt marks something (its anatomy is absent there; one pixel counts), FP area = the mean share "
        "of such an image's pixels it marks. Negatives R = R images of another data set per training line, "
        "with an empty target.", "", *rows, "",
        f"Stage-2 training time (encoder embeddings cached beforehand): {secs}. `SAM/infer_masks.py` {_f(tp['infer_masks_img_per_s'], 2)} images/s against "
        f"{_f(tp['encoder_img_per_s'], 2)} for the bare encoder (batch {tp['batch_size']}, {tp['images']} images). "
        f"Ran on {where(d)}. File: `docs/results/asam_lite_cpu.json` (`benchmarks/bench_asam.py`)."])


def presence_block(d: dict, file: str = "asam_lite_presence_cpu.json") -> str:
    """Prompt-free A-SAM per negative rate: each prompt's presence score, threshold and what it costs."""
    s, runs = d["settings"], d["prompt_free"]
    on = s.get("mask_loss_on")                      # files before --mask_loss_on: not said
    rows = ["| negatives | prompt | threshold | AUROC: head / pred. IoU / max prob. / area | test Dice, no decision "
            "| test Dice, decision | FP rate, no decision | FP rate, decision |", "|---" * 8 + "|"]
    for r, run in runs.items():
        pres, before, after = run["presence"]["presence"], run["presence"]["without_decision"], run["test"]
        for k in [k for k in after if k != "mean"] + ["mean"]:
            p = pres.get(k, {})
            by = p.get("auroc_by_score", {})
            aur = " / ".join(_f(by.get(n)) for n in ("head", "pred_iou", "max_prob", "area")) if by else "-"
            rows.append(f"| {r} | {k} | {_f(p.get('threshold'), 2)} | {aur} | {_f(before[k]['dice'])} | "
                        f"{_f(after[k]['dice'])} | {_f(before[k]['fp_rate'])} | {_f(after[k]['fp_rate'])} |")
    rule = next(iter(runs.values()))["presence"]["rule"]
    return "\n".join([
        f"Prompt-free A-SAM (LiteMedSAM backbone, encoder frozen; {s['epochs']} epochs on {s['max_train']} "
        f"training lines per data set, {s['max_val']} validation and {s['max_test']} test lines per data set"
        + ({None: "", "all": "; mask loss on every line"}.get(on, "; mask loss on the lines whose anatomy is "
                                                                   "present only") + "). ") +
        f"Rule: {rule}. The threshold is chosen on the validation split and stored in `best.pt`; AUROC of "
        "each candidate score on the test split (images with the anatomy against those without: the other "
        "data set's images and empty labels). Dice over the images that show the anatomy (a mask the "
        "decision removes scores 0); FP rate over the images without it.", "", *rows, "",
        f"Ran on {where(d)}. File: `docs/results/{file}` (`benchmarks/bench_asam.py`)."])


#: what two bench_asam.py runs must share to be set side by side
SAME_RUN = ("seg_root", "epochs", "batch_size", "lr", "prompter_grid", "balance_prompts", "encoder_lr",
            "max_train", "max_val", "max_test")


def presence_present_block(d: dict, reference: Path | None = None,
                           file: str = "asam_lite_presence_present_cpu.json") -> str:
    """:func:`presence_block` of a run whose mask loss skips empty targets (``file``), and its mean
    Dice and per-prompt FP rate beside stage 2 without negatives (the same lines and seed)."""
    reference = reference or RESULTS / "asam_lite_presence_cpu.json"
    block = presence_block(d, file)
    box = d.get("box_prompt") or {}
    if box:
        block += ("\n\nBeside them, LiteMedSAM given each anatomy's ground-truth box (no training), test Dice: "
                  + ", ".join(f"{k} {_f(v['dice'])}" for k, v in box.items()) + ".")
    ref = json.loads(reference.read_text()) if reference.is_file() else {}
    if "0" not in ref.get("prompt_free", {}):
        return block
    differ = [k for k in SAME_RUN if ref["settings"].get(k) != d["settings"].get(k)]
    differ += ["seed (lines and initialisation)"] * (ref["settings"].get("seed", 0) != d["settings"].get("seed", 0))
    if differ:
        return block + f"\n\nNot comparable with `{reference.name}`: other {', '.join(differ)}."
    base = ref["prompt_free"]["0"]["presence"]["without_decision"]
    lines = []
    for r, run in d["prompt_free"].items():
        after, before = run["test"], run["presence"]["without_decision"]
        fp = max((v["fp_rate"] for k, v in after.items() if k != "mean" and v.get("fp_rate") is not None),
                 default=None)
        lines.append(f"negatives {r}: mean test Dice {_f(base['mean']['dice'])} without negatives (no decision, "
                     f"`{reference.name}`) -> {_f(before['mean']['dice'])} trained so, no decision -> "
                     f"{_f(after['mean']['dice'])} with the decision "
                     f"({after['mean']['dice'] - base['mean']['dice']:+.3f}); largest FP rate of a prompt {_f(fp)}.")
    return block + "\n\n" + "\n".join(lines)


def realism_block(d: dict) -> str:
    rows = ["| style | real set | score | intensity W1 (grey levels) | depth profile MAD | speckle contrast diff "
            "| logistic real-vs-synthetic | boosted trees real-vs-synthetic |", "|---|---|---|---|---|---|---|---|"]
    for style, v in d["styles"].items():
        for real, r in v["vs_real"].items():
            dist, sep = r["distances"], r["separability"]
            rows.append(f"| {style} | {real} | {_f(r['score'], 1)} | {_f(dist['histogram_w1'], 1)} | "
                        f"{_f(dist['depth_profile_mad'], 1)} | {_f(dist['speckle_contrast_diff'])} | "
                        f"{_f(sep['logistic']['accuracy'], 2)} ± {_f(sep['logistic']['std'], 2)} | "
                        f"{_f(sep['boosted_trees']['accuracy'], 2)} ± {_f(sep['boosted_trees']['std'], 2)} |")
    if "real_vs_real" in d:
        r = d["real_vs_real"]
        dist, sep = r["distances"], r["separability"]
        rows.append(f"| (real) {r['sets'][1]} | {r['sets'][0]} | {_f(r['score'], 1)} | {_f(dist['histogram_w1'], 1)} | "
                    f"{_f(dist['depth_profile_mad'], 1)} | {_f(dist['speckle_contrast_diff'])} | "
                    f"{_f(sep['logistic']['accuracy'], 2)} ± {_f(sep['logistic']['std'], 2)} | "
                    f"{_f(sep['boosted_trees']['accuracy'], 2)} ± {_f(sep['boosted_trees']['std'], 2)} |")
    n = {k: f"{v['frames_held_out']} frames of {v['videos_held_out']} videos" for k, v in d["real"].items()}
    return "\n".join([
        "Held-out real frames (" + "; ".join(f"{k}: {v}" for k, v in n.items()) + f"), "
        f"{d['settings']['n_synthetic']} synthetic convex scans per style, all at 128 px inside the field of view. "
        "Score: the fit's weighted sum of the differences (lower is closer); classifier accuracy: 0.5 = the "
        "features cannot tell real from synthetic, 1.0 = always can (5 folds; the frames of a real video "
        "never sit on both sides of a split). "
        "The last row compares the two real sets with each other: the scale of a real-to-real difference.",
        "", *rows, "", f"Ran on {where(d)}. File: `docs/results/synthetic_realism.json` "
        "(`benchmarks/measure_synthetic_realism.py`)."])


def lung_block(d: dict, file: str = "lung_asam.json") -> str:
    test = d["test"]
    rows = ["| prompt | test images | Dice | FP rate on images without it | FP area |", "|---|---|---|---|---|"]
    for k, v in test.items():
        if k != "mean":
            rows.append(f"| {k} | {v['n']} | {_f(v['dice'])} | {_f(v.get('fp_rate'))} | {_f(v.get('fp_area'))} |")
    real = ["| source | frames | fires | regions / frame | pixel share | regions with a C5 cell | pleura centroid spread |",
            "|---|---|---|---|---|---|---|"]
    for name, r in d["real"].items():
        o = r["overall"]
        pl = r.get("pleura_centroid_spread")
        spread = "-" if not pl or pl["mean_std"] is None else \
            f"{_f(pl['mean_std'])} (mean std over {pl['videos_with_2_or_more']} videos)"
        real.append(f"| {name} | {o['frames']} | {_f(o['fires'], 2)} | {_f(o['regions_per_frame']['mean'], 1)} | "
                    f"{_f(o['total_share']['mean'], 2)} | {_f(o['c5_survival']['share'], 2)} | {spread} |")
    fires = "; ".join(f"{name}: " + ", ".join(f"{k} {_f(v['fires'], 2)}" for k, v in r["per_prompt"].items())
                      for name, r in d["real"].items())
    s = d["settings"]
    return "\n".join([
        f"Stage 2 (LiteMedSAM, encoder frozen) on {', '.join(d['data']['datasets'])}: {s['max_train']} training "
        f"lines per data set, {s['epochs']} epochs, negatives {s['negative_rate']}"
        + ("; mask loss on the lines whose anatomy is present only" if s.get("mask_loss_on") == "present" else "")
        + (f"; presence decision of the checkpoint: {d['test_presence']['rule']}" if d.get("test_presence") else "")
        + "; synthetic scans in the "
        f"`{s['style']}` style. Held-out test lines:", "", *rows, "",
        f"Real lung frames ({d['real_frames']['frames']} frames of {d['real_frames']['videos']} COVID-BLUES "
        "videos; no labels exist, so these describe the masks, they do not score them):", "", *real, "",
        f"Share of frames where each prompt fires: {fires}.", "",
        f"Ran on {where(d)}. File: `docs/results/{file}` (`benchmarks/measure_lung_asam.py`)."])


def lung_presence_block(d: dict, reference: Path | None = None) -> str:
    """:func:`lung_block` of the lung A-SAM trained to know absence, then per lung prompt: the share of
    real frames where it keeps a region, for the lung A-SAM trained without negatives (``reference``),
    for this one without its decision and with it; and its synthetic test Dice / FP rate both ways."""
    reference = reference or RESULTS / "lung_asam.json"
    ref = json.loads(reference.read_text()) if reference.is_file() else {}
    # no presence record: no decision was applied, so "no decision" and "decision" are the same masks
    real, test = d["real"], d["test"]
    raw = (d.get("test_presence") or {}).get("without_decision", test)
    old = ref.get("real", {}).get("asam_lung", {}).get("per_prompt", {})
    off = real.get("asam_lung_no_decision", {}).get("per_prompt", {})
    on = real["asam_lung"]["per_prompt"]
    thr = {k: v.get("threshold") for k, v in (d.get("test_presence") or {}).get("presence", {}).items()}
    rows = ["| prompt | threshold | real frames kept: no negatives | trained with negatives, no decision | "
            "with the decision | synthetic test Dice, no decision / decision | FP rate, no decision / decision |",
            "|---" * 7 + "|"]
    for k in on:
        fires = lambda r: _f(r.get(k, {}).get("fires"), 2)  # noqa: E731
        t, u = raw.get(k, {}), test.get(k, {})
        rows.append(f"| {k} | {_f(thr.get(k), 2)} | {fires(old)} | {fires(off)} | {fires(on)} | "
                    f"{_f(t.get('dice'))} / {_f(u.get('dice'))} | {_f(t.get('fp_rate'))} / {_f(u.get('fp_rate'))} |")
    frames = (f"`{ref.get('settings', {}).get('lung_frames')}` and `{d['settings']['lung_frames']}`"
              if ref and ref.get("settings", {}).get("lung_frames") != d["settings"].get("lung_frames")
              else "the same frames")
    return "\n".join([
        lung_block(d, "lung_asam_presence.json"), "",
        f"Per lung prompt, the share of the {d['real_frames']['frames']} real frames on which it keeps a region: "
        f"the lung A-SAM trained without negatives (`{reference.name}`, no presence head), this one without its "
        f"decision (`--presence off`) and with it (what the study's `asam_lung` source writes); frames picked "
        f"by the same rule from {frames}. Synthetic test columns: held-out scans with exact labels.", "", *rows]
        + ([] if "asam_lung_absent_prompts" not in real else [
            "", "Its prompts of anatomies no lung frame shows, with the decision, keep a region on this share of "
            "the real frames: " + ", ".join(f"{k} {_f(v['fires'], 2)}" for k, v in
                                            real["asam_lung_absent_prompts"]["per_prompt"].items()) + "."]))


def lung_negatives_block(d: dict, reference: Path | None = None) -> str:
    """The lung A-SAM trained with real lung frames as a negative set of the HC18 / USGRA prompts
    (``measure_lung_asam.py --negative_videos``) beside the same run without them (``reference``):
    per prompt, the share of the held-out real frames that keep a region (with the decision), and the
    test Dice / FP rate with the decision."""
    reference = reference or RESULTS / "lung_asam_presence.json"
    ref = json.loads(reference.read_text()) if reference.is_file() else {}
    neg = d["data"].get("negative_set") or {}
    before, after = ref.get("real", {}), d["real"]
    kept = lambda real, k: ({**real.get("asam_lung_absent_prompts", {}).get("per_prompt", {}),  # noqa: E731
                             **real.get("asam_lung", {}).get("per_prompt", {})}.get(k) or {}).get("fires")
    head = lambda run, k: ((run.get("test_presence") or {}).get("presence", {}).get(k) or {})  # noqa: E731
    rows = ["| prompt | real frames kept: without / with the lung negatives | test Dice: without / with | "
            "test FP rate: without / with | presence head, test AUROC: without / with | "
            "its true-positive rate at the threshold: without / with |", "|---|---|---|---|---|---|"]
    for k in (x for x in d["test"] if x != "mean"):
        t0, t1 = ref.get("test", {}).get(k, {}), d["test"][k]
        h0, h1 = head(ref, k), head(d, k)
        rows.append(f"| {k}{' (absent from lung)' if k.split('/')[0] in neg.get('lacks', ()) else ''} | "
                    f"{_f(kept(before, k), 2)} / {_f(kept(after, k), 2)} | {_f(t0.get('dice'))} / {_f(t1.get('dice'))} | "
                    f"{_f(t0.get('fp_rate'))} / {_f(t1.get('fp_rate'))} | {_f(h0.get('auroc'))} / {_f(h1.get('auroc'))} | "
                    f"{_f(h0.get('tpr'), 2)} / {_f(h1.get('tpr'), 2)} |")
    frames, videos = neg.get("frames", {}), neg.get("videos", {})
    own = ("negative_videos", "negative_frames_per_video")
    differ = sorted(k for k, v in d["settings"].items() if k not in own and ref.get("settings", {}).get(k) != v)
    if differ:
        return f"Not comparable with `{reference.name}`: other {', '.join(differ)}."
    return "\n".join([
        f"Stage 2 as in `{reference.name}` (the same settings and anatomy lines), plus the negative set "
        f"`{neg.get('name')}`: {sum(frames.values())} real lung frames of {sum(videos.values())} COVID-BLUES "
        f"videos (train / val / test {frames.get('train')} / {frames.get('val')} / {frames.get('test')} frames, "
        f"split by video), shown only with the prompts of {', '.join(neg.get('lacks', []))}; none of the "
        f"{d['real_frames']['videos']} measured videos is among them. Real frames: the share of the "
        f"{d['real_frames']['frames']} measured frames on which the prompt keeps a region with the presence "
        "decision (every region of a prompt absent from lung is a false positive). Test columns with the "
        "decision; the HC18 / USGRA FP rates of the run with negatives also count the negative set's test "
        f"frames. Ran on {where(d)}; stage 2 took {d['stage2_seconds'] / 60:.0f} min. File: "
        "`docs/results/lung_asam_negatives.json` (`benchmarks/measure_lung_asam.py`).", "", *rows])


def decision_rules_block(d: dict, references: list[Path] | None = None) -> str:
    """One stage-2 checkpoint decided by several presence rules: each of ``references`` (the run as
    first measured: the head's logit, threshold at the lowest present score kept; then the head's
    logit with the halfway threshold) and ``d`` (the combined rule), all re-calibrated on the same
    validation lines. Per prompt, one cell per rule: the test AUROC of the value decided on, the
    decision's test FP rate and true-positive rate, test Dice with the decision, and the share of
    held-out real lung frames that keep a region."""
    if references is None:
        references = [RESULTS / "lung_asam_negatives.json", RESULTS / RESULTS_FILE_HEAD_HALFWAY]
    runs = []
    for path in references:
        if not path.is_file():
            return f"`{path.name}` is missing: nothing to compare with."
        runs.append(json.loads(path.read_text()))
    free = ("compare", "work_dir", "presence_score")        # the same checkpoint, decided otherwise
    for path, ref in zip(references, runs):
        differ = sorted(k for k in {*d["settings"], *ref["settings"]} - set(free)
                        if d["settings"].get(k) != ref["settings"].get(k))
        if differ:
            return f"Not comparable with `{path.name}`: other {', '.join(differ)}."
    runs.append(d)
    rate = lambda run, k: ((run.get("test_presence") or {}).get("presence", {}).get(k) or {})  # noqa: E731
    kept = lambda run, k: ({**run["real"].get("asam_lung_absent_prompts", {}).get("per_prompt", {}),  # noqa: E731
                            **run["real"].get("asam_lung", {}).get("per_prompt", {})}.get(k) or {}).get("fires")
    cell = lambda values: " → ".join(values)  # noqa: E731
    rows = ["| prompt | test AUROC of the value decided on | test FP rate | test true-positive rate | "
            "test Dice with the decision | real lung frames that keep a region |", "|---|---|---|---|---|---|"]
    for k in (x for x in d["test"] if x != "mean"):
        rows.append(f"| {k} | {cell(_f(rate(r, k).get('auroc')) for r in runs)} | "
                    f"{cell(_f(rate(r, k).get('fpr')) for r in runs)} | {cell(_f(rate(r, k).get('tpr'), 2) for r in runs)} | "
                    f"{cell(_f(r['test'][k]['dice']) for r in runs)} | {cell(_f(kept(r, k), 2) for r in runs)} |")
    raw = (d.get("test_presence") or {}).get("without_decision", {}).get("mean", {})
    rules = "; ".join(f"({i + 1}) {(r.get('test_presence') or {}).get('rule', 'no presence decision')} (commit `{r['machine']['commit'][:7]}`, "
                      f"`{p.name}`)" for i, (r, p) in enumerate(zip(runs, [*references, Path(RESULTS_FILE_DECISION)])))
    return "\n".join([
        f"The checkpoint of `{references[0].name}` (trained once, at commit `{runs[0]['machine']['commit'][:7]}`), "
        f"decided {len(runs)} ways on the same validation lines, test lines and real frames: {rules}. "
        f"Cells: rule " + " → ".join(f"({i + 1})" for i in range(len(runs))) + ". Mean test Dice {_f(raw.get('dice'))} without a "
        f"decision, {cell(_f(r['test']['mean']['dice']) for r in runs)} with it; mean FP rate "
        f"{cell(_f(r['test']['mean']['fp_rate']) for r in runs)}. The last re-measured on {where(d)}.", "", *rows])


def context_block(d: dict) -> str:
    """The context term of a pre-training run (benchmarks/measure_context_task.py) with the BatchNorm
    mode it trained with: against its own image's target and another image's, at initialisation and
    at the checkpoint; the gap is what the term knows of the image."""
    bn = d.get("trained_with", "batch")
    scales = [k.split("/")[1] for k in d["trained"][bn]]
    ck = d.get("checkpoint", {})
    lines = [f"Run `{d.get('run')}` ({d.get('method')}, {d.get('size')} px, batch {d.get('batch')}, base_lr "
             f"{d.get('base_lr')}, its `{ck.get('file')}` after epoch {ck.get('epoch')}), overlap pass with "
             f"`{bn}` BatchNorm as trained; {d.get('batches')} batches of its own loader; {d.get('where')}. "
             "Values are `2 - 2 cos` (0: the prediction points at the target).", "",
             "| | target | " + " | ".join(s.upper() for s in scales) + " |", "|---|---|" + "---|" * len(scales)]
    for when in ("init", "trained"):
        same, other = d[when][bn], d[when][f"{bn}_other_image"]
        label = "at initialisation" if when == "init" else "after training"
        lines.append(f"| {label} | its own image's | " + " | ".join(_f(same[f"context/{s}"]) for s in scales) + " |")
        lines.append(f"| | another image's | " + " | ".join(_f(other[f"context/{s}"]) for s in scales) + " |")
        lines.append(f"| | gap | " + " | ".join(f"{other[f'context/{s}'] - same[f'context/{s}']:+.3f}"
                                                for s in scales) + " |")
    return "\n".join(lines) + "\n"


def cache_rounding_block(d: dict) -> str:
    """A-SAM maps from float32 embeddings against float16-rounded ones (benchmarks/measure_cache_rounding.py)."""
    per = d["agreement"]["per_prompt"]
    ious = [v["iou"] for v in per.values() if v["iou"] is not None]
    flips = sum(d["presence_flips"].values())
    return (f"`{d['settings']['ckpt']}` on {d['settings']['frames']} frames, prompts {', '.join(per)}; "
            f"{where(d)}: presence decisions that flip {flips} of "
            f"{d['presence_decisions']}; same presence call on {min(v['same_call'] for v in per.values()):.3f} "
            f"of frames or more per prompt; IoU where both keep a region {min(ious):.4f} to {max(ious):.4f}; "
            f"pixels labelled alike {d['agreement']['pixel_agreement']:.5f}.\n")


def _short_commit(code: str | None) -> str:
    """A recorded code version, short: the commit's first 7 digits, ``+modified`` kept."""
    commit, plus, rest = (code or "").partition("+")
    return commit[:7] + plus + rest


def stepwise_block(d: dict, every: int = 20) -> str:
    """Our byol and its twins from equal weights (benchmarks/measure_byol_stepwise.py): each twin's
    encoder divergence from ours (distance apart / distance ours has trained) and the losses, at
    every ``every``-th logged step and the last."""
    # step 1 runs at lr 0 (warm-up): nothing has moved yet, so no divergence is defined; the first
    # row after it is kept (the twins' closest point), then every ``every``-th and the last
    moved = [r for r in d["rows"] if r["byol_moved"] > 0]
    rows = [r for i, r in enumerate(moved) if i == 0 or r["step"] % every == 0 or r["step"] == d["steps"]]
    twins = d["twins"]
    lines = [f"The config of the campaign's `{d['config_method']}` run `{d['run']}` (seed {d['seed']}, {d['size']} px, batch {d['batch']}, base_lr {d['base_lr']}, "
             f"warm-up {d['warmup_epochs']} of {d['total_epochs']} epochs), its first {d['steps']} steps; "
             f"{d['where']}, torch threads: {d['threads']}, commit `{_short_commit(d.get('code'))}`; load: {d['load']}. "
             "Divergence: `||twin - byol|| / ||byol - byol at step 0||` over the online encoder's weights. "
             "Losses in each model's own units (ours `2 - 2 cos`, lightly's `-cos` times its scale).", "",
             "| step | lr | " + " | ".join(f"divergence {t}" for t in twins) + " | loss byol | "
             + " | ".join(f"loss {t}" for t in twins) + " |",
             "|---|---|" + "---|" * (2 * len(twins) + 1)]
    for r in rows:
        div = " | ".join(f"{r['divergence'][t]:.4f}" for t in twins)
        lines.append(f"| {r['step']} | {r['lr']:.3f} | {div} | {r['loss']['byol']:.4f} | "
                     + " | ".join(f"{r['loss'][t]:.4f}" for t in twins) + " |")
    return "\n".join(lines) + "\n"


BLOCKS = {"asam": ("asam_lite_cpu.json", asam_block),
          "presence": ("asam_lite_presence_cpu.json", presence_block),
          "presence_present": ("asam_lite_presence_present_cpu.json", presence_present_block), "realism": ("synthetic_realism.json", realism_block),
          "lung_asam": ("lung_asam.json", lung_block),
          "lung_asam_presence": ("lung_asam_presence.json", lung_presence_block),
          "context_cpu_long": ("context_task_cpu_long.json", context_block),
          "byol_stepwise": ("byol_stepwise_cpu.json", stepwise_block),
          "cache_rounding": ("cache_rounding_cpu.json", cache_rounding_block),
          "lung_asam_negatives": ("lung_asam_negatives.json", lung_negatives_block),
          "lung_asam_decision": (RESULTS_FILE_DECISION, decision_rules_block),
          "presence_combined": ("asam_lite_presence_combined_cpu.json",
                                partial(presence_present_block, file="asam_lite_presence_combined_cpu.json")),
          "presence_combined_seed1": ("asam_lite_presence_combined_seed1_cpu.json",
                                      partial(presence_present_block, file="asam_lite_presence_combined_seed1_cpu.json"))}


def splice(text: str, name: str, block: str) -> str:
    """``text`` with the part between the markers of block ``name`` replaced; unchanged without them."""
    begin, end = f"<!-- results:{name} -->", f"<!-- results:{name}:end -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return text
    return text[: i + len(begin)] + "\n" + block.rstrip() + "\n" + text[j:]


def render(results: Path = RESULTS) -> dict[str, str]:
    out = {}
    for name, (file, fn) in BLOCKS.items():
        if (results / file).is_file():
            out[name] = fn(json.loads((results / file).read_text()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--print", action="store_true", help="print the blocks, write nothing")
    a = p.parse_args(argv)
    blocks = render()
    if a.print:
        for name, b in blocks.items():
            print(f"## {name}\n\n{b}\n")
        return 0
    for doc in DOCS:
        text = doc.read_text()
        new = text
        for name, b in blocks.items():
            new = splice(new, name, b)
        if new != text:
            doc.write_text(new)
            print(f"updated {doc.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
