"""The mask sources of the study, as data: a new source is one :class:`MaskSource` entry here.

Each entry names the source, says how the study's tables call it, adds the flags it reads to
``study_real_data.py``'s parser, and makes ``<labels>/COVID-BLUES/label/*.png`` for the study's
frames (a stage of :class:`utils.stage_runner.ResumableStages`, skipped when its output exists),
or says why it cannot. The arms ``<detcon|aclus>_<source>`` exist for every entry
(:func:`study.plan.parse_run`); the pair lists, pickles and pre-training that follow are the
same for every source.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from SAM.config import absence_flags
from study import StudyError
from utils import mask_layout as layout
from utils.flags import AT_LEAST_1, POSITIVE, PROBABILITY, Range
from utils.stage_files import ASAM_BEST

#: the sub-folder name of the COVID-BLUES frames in every layout of the study
SUB = "COVID-BLUES"


class MaskJob(NamedTuple):
    """What a source's ``make`` gets: the study's flags, its stage runner, the study folder, the
    frames (``<frames>/COVID-BLUES/img``), where the label tree goes and the Python to run."""
    args: argparse.Namespace
    stages: object      # utils.stage_runner.ResumableStages
    out: Path
    frames: Path
    labels: Path
    py: str


@dataclass(frozen=True)
class MaskSource:
    name: str
    #: how tables and messages call it
    label: str
    #: makes ``<job.labels>/COVID-BLUES/label``; returns None, or why it cannot (a flag not given)
    make: Callable[[MaskJob], str | None]
    #: adds the flags ``make`` reads to the study's parser
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    #: the flags that provide what it needs, for "not run" messages ("" = needs nothing)
    needs: str = ""
    #: whether those flags were given
    given: Callable[[argparse.Namespace], bool] = lambda a: True
    #: flags naming a file or folder that must exist, checked before any work
    path_flags: tuple[str, ...] = ()
    #: utils.flags ranges of its numeric flags, checked before any work
    flag_ranges: dict[str, Range] = field(default_factory=dict)


def link(target: Path, at: Path) -> None:
    """Relative symlink ``at -> target`` (replaced if it points elsewhere)."""
    at.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, at.parent)
    if at.is_symlink():
        if os.readlink(at) == rel:
            return
        at.unlink()
    elif at.exists():
        raise StudyError(f"{at}: exists and is not a link; remove it or use another --out")
    os.symlink(rel, at)


def label_tree(job: MaskJob) -> Path:
    return job.labels / SUB / layout.LABEL_DIR


# --------------------------------------------------------------------------- #
# the sources
# --------------------------------------------------------------------------- #
def _superpixel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sp_scale", type=float, default=30.0, help="superpixel_masks --scale")
    p.add_argument("--sp_min_area", type=float, default=0.004, help="superpixel_masks --min_area")
    p.add_argument("--sp_max_segments", type=int, default=32, help="superpixel_masks --max_segments")


def _superpixel(job: MaskJob) -> None:
    a = job.args
    job.stages.run("masks_superpixel", [job.py, "utils/superpixel_masks.py", "--data_dir", str(job.frames),
                                        "--out_dir", str(job.labels), "--scale", str(a.sp_scale),
                                        "--min_area", str(a.sp_min_area), "--max_segments", str(a.sp_max_segments)],
                   [label_tree(job)])


def _sam_auto(job: MaskJob) -> None:
    job.stages.run("masks_sam_auto", [job.py, "SAM/auto_masks.py", "--data_dir", str(job.frames),
                                      "--out_dir", str(job.labels), "--device", "cpu", "--montage", "none",
                                      "--min_pred_iou", "0.75", "--min_stability", "0.75", "--nms_iou", "0.7",
                                      "--min_area", "0.004", "--max_regions", "32", "--overlap", "small_on_top"],
                   [label_tree(job)], note="SAM everything mode (LiteMedSAM): ~15 s per frame on a 2-core CPU")


def _asam_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asam_ckpt", default=None, help="A-SAM stage-2 checkpoint for SAM/infer_masks.py")
    p.add_argument("--asam_masks", default=None, help="precomputed A-SAM label tree <DIR>/COVID-BLUES/label/*.png")
    p.add_argument("--asam_build", default=None, metavar="SEG_ROOT",
                   help="no A-SAM checkpoint: train one (lite backbone, HC18 + USGRA under SEG_ROOT) first")
    p.add_argument("--asam_prompts", default=None, help="infer_masks --prompts (default: all of the checkpoint)")
    p.add_argument("--asam_batch", type=int, default=4, help="infer_masks --batch_size")


def _asam(job: MaskJob) -> str | None:
    a, st, py = job.args, job.stages, job.py
    if a.asam_masks:
        src = Path(a.asam_masks).resolve() / SUB / layout.LABEL_DIR
        if not src.is_dir():
            raise StudyError(f"{src}: --asam_masks must hold {SUB}/label/*.png")
        link(src, label_tree(job))
        return None
    ckpt = a.asam_ckpt
    if not ckpt and a.asam_build:
        asam_dir = job.out / "asam_lite"
        st.run("asam_build", [py, "SAM/train_auto_prompter.py", "--task", "HC18_USGRA", "--data_root",
                              str(Path(a.asam_build).resolve()), "--backbone", "lite", "--out_dir", str(asam_dir),
                              "--eval_test", *absence_flags()], [asam_dir / ASAM_BEST],
               note="A-SAM stage 2 (lite) on HC18 + USGRA, with negatives (it learns absence): hours on a CPU")
        ckpt = str(asam_dir / ASAM_BEST)
    if not ckpt:
        return "no A-SAM checkpoint (--asam_ckpt, --asam_masks or --asam_build)"
    cmd = [py, "SAM/infer_masks.py", "--ckpt", str(Path(ckpt).resolve()), "--data_dir", str(job.frames),
           "--out_dir", str(job.labels), "--batch_size", str(a.asam_batch), "--workers", "0", "--device", "cpu"]
    if a.asam_prompts:
        cmd += ["--prompts", a.asam_prompts]
    st.run("masks_asam", cmd, [label_tree(job)], note="A-SAM inference")
    return None


def _asam_lung_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asam_lung_ckpt", default=None,
                   help="stage-2 checkpoint that knows the SynLung-Lung anatomies (source asam_lung; "
                        "benchmarks/measure_lung_asam.py trains one)")


def _asam_lung(job: MaskJob) -> str | None:
    a = job.args
    if not a.asam_lung_ckpt:
        return "no lung A-SAM checkpoint (--asam_lung_ckpt; benchmarks/measure_lung_asam.py trains one)"
    from utils.synthetic_us import LUNG_PROMPTS

    job.stages.run("masks_asam_lung", [job.py, "SAM/infer_masks.py", "--ckpt", str(Path(a.asam_lung_ckpt).resolve()),
                                       "--data_dir", str(job.frames), "--out_dir", str(job.labels), "--batch_size",
                                       str(a.asam_batch), "--workers", "0", "--device", "cpu",
                                       "--prompts", ",".join(LUNG_PROMPTS)],
                   [label_tree(job)], note="lung A-SAM inference (its lung-anatomy prompts)")
    return None


#: name -> source, in the order of the study's help and tables
MASK_SOURCES: dict[str, MaskSource] = {s.name: s for s in (
    MaskSource("superpixel", "Felzenszwalb superpixels", _superpixel, _superpixel_flags,
               flag_ranges={"--sp_scale": POSITIVE, "--sp_min_area": PROBABILITY, "--sp_max_segments": AT_LEAST_1}),
    MaskSource("asam", "A-SAM", _asam, _asam_flags, needs="--asam_ckpt / --asam_masks",
               given=lambda a: bool(a.asam_ckpt or a.asam_masks or a.asam_build),
               path_flags=("--asam_ckpt", "--asam_masks", "--asam_build"), flag_ranges={"--asam_batch": AT_LEAST_1}),
    MaskSource("sam_auto", "SAM everything mode (LiteMedSAM, box grid)", _sam_auto),
    MaskSource("asam_lung", "A-SAM taught lung anatomy on synthetic scans", _asam_lung, _asam_lung_flags,
               needs="--asam_lung_ckpt", given=lambda a: bool(a.asam_lung_ckpt), path_flags=("--asam_lung_ckpt",)),
)}
