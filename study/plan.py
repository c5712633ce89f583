"""Which arms the study runs, under which preset, and the budget that makes them comparable (pure)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from models.methods import METHODS
from study import StudyError
from study.mask_sources import MASK_SOURCES as REGISTRY

MASK_SOURCES = tuple(REGISTRY)
DEFAULT_RUNS = ("byol", "detcon_superpixel", "detcon_asam", "aclus_asam")
SOURCE_LABELS = {**{k: v.label for k, v in REGISTRY.items()}, None: "- (whole image)"}
#: the flag that provides each model-made source, for "not run" messages
SOURCE_FLAGS = {k: v.needs for k, v in REGISTRY.items() if v.needs}
#: arms without pre-training: the random start of a seed, and that start with the corpus's
#: BatchNorm statistics (study/bn_control.py); both are probed once, at step 0
BASELINES = ("random", "bn_control")
DEFAULT_ARMS = BASELINES + DEFAULT_RUNS


@dataclass(frozen=True)
class Preset:
    """Every setting that fixes what a study measures (its rows are comparable only within one)."""
    name: str
    frame_stride: int             # every k-th COVID-BLUES frame (0: frames_per_video evenly spaced)
    frames_per_video: int
    img_size: int                 # pre-training views and evaluation input
    batch_size: int
    epochs: int                   # over the largest frame set; every arm takes the same steps
    warmup_epochs: float
    seeds: tuple[int, ...]
    fractions: tuple[float, ...]  # shares of the steps at which each pre-trained arm is probed
    protocols: tuple[str, ...]
    ft_epochs: int                # fine-tune protocol epochs
    pocus_frames_per_video: int
    base_config: str
    device: str
    overrides: tuple[str, ...]    # further pretrain_aclus.py -o overrides
    crop_scale: tuple[float, float] = (0.2, 1.0)
    videos: int = 0               # only the first N videos (0 = all)
    workers: int = 1
    threads: int = 2
    base_lr: float | None = None  # optimizer.base_lr (None: the base config's)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # 2-core CPU, ~2.5 h: 3,323 frames at 112 px, 2 epochs of batch 32 (206 steps) per arm and seed,
    # probed after 25 / 50 / 100 % of the steps; fine-tune on cached frozen features, 10 epochs;
    # 8 frames per POCUS video (the folds split by video; more frames of one video add little)
    Preset("cpu", frame_stride=10, frames_per_video=0, img_size=112, batch_size=32, epochs=2,
           warmup_epochs=0.2, seeds=(0, 1, 2), fractions=(0.25, 0.5, 1.0),
           protocols=("linear", "knn", "finetune_cached"), ft_epochs=10, pocus_frames_per_video=8,
           base_config="configs/study_cpu.yaml", device="cpu", overrides=("amp.opt_level=O0",)),
    # 2-core CPU, many sittings: 64 px, batch 64, 40 epochs of the 3,323 stride-10 frames (2,040 steps
    # per arm and seed), 5 % warm-up, probed after 10 / 25 / 50 / 100 % of the steps; base_lr 2 from
    # the 10-epoch sweep of classic BYOL over 0.5 / 2 / 8 / 16 (docs/results/study_cpu_long/variants/sweep.md)
    Preset("cpu_long", frame_stride=10, frames_per_video=0, img_size=64, batch_size=64, epochs=40,
           warmup_epochs=2, seeds=(0, 1, 2), fractions=(0.1, 0.25, 0.5, 1.0),
           protocols=("linear", "knn", "finetune_cached"), ft_epochs=10, pocus_frames_per_video=8,
           base_config="configs/study_cpu.yaml", device="cpu", overrides=("amp.opt_level=O0",), base_lr=2.0),
    # one H100-class GPU: paper-like views and batch, 100 epochs (3 warm-up), the paper's fine-tune
    Preset("gpu", frame_stride=10, frames_per_video=0, img_size=224, batch_size=192, epochs=100,
           warmup_epochs=3, seeds=(0, 1, 2), fractions=(0.25, 0.5, 1.0),
           protocols=("linear", "knn", "finetune"), ft_epochs=30, pocus_frames_per_video=16,
           base_config="configs/paper.yaml", device="cuda",
           overrides=("amp.opt_level=O1", "amp.dtype=auto", "amp.channels_last=true", "data.cache=memory"),
           workers=8, threads=8),
    # minutes: 4 videos x 2 frames, 32 px, a few steps; checks the machinery, measures nothing
    Preset("smoke", frame_stride=0, frames_per_video=2, img_size=32, batch_size=4, epochs=2,
           warmup_epochs=0.5, seeds=(0, 1), fractions=(0.5, 1.0), protocols=("linear", "knn", "finetune_cached"),
           ft_epochs=1, pocus_frames_per_video=1, base_config="configs/study_cpu.yaml", device="cpu",
           overrides=("amp.opt_level=O0",), videos=4, workers=0),
)}


def variant_of(preset: Preset, *, epochs: int | None = None, base_lr: float | None = None) -> tuple[Preset, str]:
    """The preset with another schedule length or learning rate (a sweep), and the variant's name:
    ``""`` when nothing changes, else both values (``epochs10_base_lr2``), so that one name never
    stands for two settings when the preset's own values change. The warm-up keeps its share."""
    changes = {}
    if epochs is not None and epochs != preset.epochs:
        changes.update(epochs=epochs, warmup_epochs=round(preset.warmup_epochs * epochs / preset.epochs, 3))
    if base_lr is not None and base_lr != preset.base_lr:
        changes["base_lr"] = base_lr
    if not changes:
        return preset, ""
    v = replace(preset, **changes)
    lr = "default" if v.base_lr is None else f"{v.base_lr:g}"
    return v, f"epochs{v.epochs}_base_lr{lr}"


def arm_fractions(arm: str, preset: Preset) -> tuple[float, ...]:
    """The probe points of an arm: 0 (its start) for a baseline, the preset's shares otherwise."""
    return (0.0,) if arm in BASELINES else tuple(sorted(set(preset.fractions) | {1.0}))


def expected_keys(arm: str, preset: Preset, folds: int = 5) -> set[tuple[float, str, int]]:
    """(fraction, protocol, fold) of every per-fold row one (arm, seed) contributes."""
    return {(f, p, k) for f in arm_fractions(arm, preset) for p in preset.protocols for k in range(1, folds + 1)}


@dataclass(frozen=True)
class Run:
    name: str                 # e.g. detcon_superpixel
    method: str               # byol | detcon | aclus
    mask_source: str | None   # one of MASK_SOURCES, or None (byol: whole image)
    pairs_source: str         # which pair list gives the images


def parse_run(name: str) -> Run:
    """``byol`` or ``<detcon|aclus>_<source>`` (a source of :data:`MASK_SOURCES`) -> :class:`Run`;
    ValueError otherwise."""
    if name in METHODS and METHODS[name].whole_image:   # byol, byol_fpn: the mask source is irrelevant
        return Run(name, name, None, "superpixel")
    # <method>_<source>, split at the source's name: method and source names may hold "_" themselves
    source = max((s for s in MASK_SOURCES if name.endswith(f"_{s}")), key=len, default="")
    method = name[: -len(source) - 1] if source else name
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
                             f"({SOURCE_FLAGS[run.pairs_source] + ' not given' if run.pairs_source in SOURCE_FLAGS else 'source not selected'})")
    return runs, missing


def pretrain_overrides(run: Run, data_dir: Path, run_dir: Path, *, img_size: int, batch_size: int,
                       epochs: int, warmup_epochs: float, seed: int, workers: int,
                       crop_scale: tuple[float, float], log_step: int, num_examples: int = 0,
                       fractions: tuple[float, ...] = (), extra: tuple[str, ...] = ("amp.opt_level=O0",)) -> list[str]:
    """The ``-o key=value`` overrides of the base config for one run (same budget for all);
    ``extra``: the preset's own ``key=value`` items (precision, cache), applied first."""
    items = {
        **dict(x.split("=", 1) for x in extra),
        "model.method": run.method,
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
        "checkpoint.snapshot_fractions": "[" + ", ".join(str(f) for f in fractions if 0 < f < 1) + "]",
        "log.log_step": log_step,
        "seed": seed,
    }
    out = []
    for k, v in items.items():
        out += ["-o", f"{k}={v}"]
    return out


def equal_step_epochs(n_images: int, n_reference: int, batch_size: int, epochs: int,
                      warmup_epochs: float) -> tuple[int, float]:
    """(epochs, warm-up epochs) that give a run over ``n_images`` frames about as many steps
    as ``epochs`` over ``n_reference`` frames; steps per epoch = frames // batch (the
    pre-training loader drops the last partial batch).

    A-SAM finds no anatomy on some frames, and ``generate_masks_pkls.py`` leaves those out;
    without this, the A-SAM runs would take fewer steps than the others. The warm-up is
    scaled by the same factor. ``n_reference`` is the corpus's frame count (what the arms
    without model masks train on), whichever arms a run holds.
    """
    own, ref = n_images // batch_size, n_reference // batch_size
    if own <= 0:
        raise StudyError(f"{n_images} pre-training frames do not fill one batch of {batch_size}")
    if ref <= own:
        return epochs, warmup_epochs
    factor = ref / own
    return math.floor(epochs * factor + 0.5), round(warmup_epochs * factor, 3)


