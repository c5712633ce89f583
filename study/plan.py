"""Which pre-training runs the study makes, and the budget that makes them comparable (pure)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from models.methods import METHODS
from study import StudyError

#: the sub-folder name of the COVID-BLUES frames in every layout of the study
SUB = "COVID-BLUES"
MASK_SOURCES = ("superpixel", "asam")
DEFAULT_RUNS = ("byol", "detcon_superpixel", "detcon_asam", "aclus_asam")
SOURCE_LABELS = {"superpixel": "Felzenszwalb superpixels", "asam": "A-SAM", None: "- (whole image)"}


@dataclass(frozen=True)
class Run:
    name: str                 # e.g. detcon_superpixel
    method: str               # byol | detcon | aclus
    mask_source: str | None   # superpixel | asam | None (byol: whole image)
    pairs_source: str         # which pair list gives the images


def parse_run(name: str) -> Run:
    """``byol`` or ``<detcon|aclus>_<superpixel|asam>`` -> :class:`Run`; ValueError otherwise."""
    if name in METHODS and METHODS[name].whole_image:   # byol, byol_fpn: the mask source is irrelevant
        return Run(name, name, None, "superpixel")
    method, _, source = name.partition("_")
    if method not in METHODS or METHODS[method].whole_image or source not in MASK_SOURCES:
        raise ValueError(f"unknown run '{name}': expected byol or <detcon|aclus>_<{'|'.join(MASK_SOURCES)}>")
    return Run(name, method, source, source)


def plan_runs(names: list[str], available_sources: set[str]) -> tuple[list[Run], dict[str, str]]:
    """Runs that can go now, and ``{run: why not}`` for those whose mask source is missing."""
    runs, missing = [], {}
    for name in names:
        run = parse_run(name)
        if run.pairs_source in available_sources:
            runs.append(run)
        else:
            missing[name] = (f"no {SOURCE_LABELS[run.pairs_source]} masks "
                             f"({'--asam_ckpt / --asam_masks not given' if run.pairs_source == 'asam' else 'source not selected'})")
    return runs, missing


def pretrain_overrides(run: Run, data_dir: Path, run_dir: Path, *, img_size: int, batch_size: int,
                       epochs: int, warmup_epochs: int, seed: int, workers: int,
                       crop_scale: tuple[float, float], log_step: int, num_examples: int = 0) -> list[str]:
    """The ``-o key=value`` overrides of configs/example.yaml for one run (same budget for all)."""
    items = {
        "model.method": run.method,
        "amp.opt_level": "O0",
        "data.image_dir": str(data_dir),
        "data.subset": "train",
        "data.mask_type": "gt",
        "data.resize_size": img_size,
        "data.crop_scale": f"[{crop_scale[0]}, {crop_scale[1]}]",
        "data.data_workers": workers,
        "data.train_batch_size": batch_size,
        "data.num_examples": num_examples,
        "optimizer.total_epochs": epochs,
        "optimizer.warmup_epochs": warmup_epochs,
        "checkpoint.ckpt_path": str(run_dir),
        "checkpoint.resume_path": "auto",
        "checkpoint.save_epoch": max(1, epochs),
        "log.log_step": log_step,
        "seed": seed,
    }
    out = []
    for k, v in items.items():
        out += ["-o", f"{k}={v}"]
    return out


def equal_step_epochs(n_images: int, n_reference: int, batch_size: int, epochs: int,
                      warmup_epochs: int) -> tuple[int, int]:
    """(epochs, warm-up epochs) that give a run over ``n_images`` frames about as many steps
    as ``epochs`` over ``n_reference`` frames; steps per epoch = frames // batch (the
    pre-training loader drops the last partial batch).

    A-SAM finds no anatomy on some frames, and ``generate_masks_pkls.py`` leaves those out;
    without this, the A-SAM runs would take fewer steps than the others. The warm-up is
    scaled by the same factor.
    """
    own, ref = n_images // batch_size, n_reference // batch_size
    if own <= 0:
        raise StudyError(f"{n_images} pre-training frames do not fill one batch of {batch_size}")
    if ref <= own:
        return epochs, warmup_epochs
    factor = ref / own
    return math.floor(epochs * factor + 0.5), math.floor(warmup_epochs * factor + 0.5)


