"""Per-dataset (task) settings of the A-SAM stages, each overridable from the command line.

This module lives at ``SAM/config.py`` rather than ``SAM/utils/config.py``: a ``SAM/utils``
package would shadow the top-level ``utils`` package whenever a script runs as
``python SAM/<script>.py`` (Python puts ``SAM/`` first on ``sys.path``).

Usage in a script::

    parser = argparse.ArgumentParser()
    add_task_args(parser)              # --task plus one --<field> per TaskConfig field
    cfg = task_config_from_args(parser.parse_args())

An unknown ``--task`` is an argparse error (upstream's ``assert("...")`` was always true).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

# one error type for every configuration (an invalid task name or field value here);
# utils.config imports neither SAM nor torch, so this makes no import cycle
from utils.config import ConfigError
from utils.flags import AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, check_flag_ranges

#: stage-2 flags of the A-SAMs whose masks feed pre-training (the study's --asam_build, the lung
#: A-SAM of benchmarks/measure_lung_asam.py): half as many negatives as lines, so the presence
#: head sees absent targets, and the mask loss on present lines only, so the decoder does not
#: learn to mark nothing (docs/results/asam_lite_presence_present_cpu.json: FP rate <= 0.017 per
#: prompt, mean Dice 0.470 against 0.477 without negatives). Stage 2's own defaults stay
#: METHOD.md's training (no negatives, mask loss on every line).
ABSENCE_TRAINING = {"negative_rate": 0.5, "mask_loss_on": "present"}


def absence_flags() -> list[str]:
    """:data:`ABSENCE_TRAINING` as ``SAM/train_auto_prompter.py`` flags."""
    return [x for k, v in ABSENCE_TRAINING.items() for x in (f"--{k}", str(v))]


@dataclass
class TaskConfig:
    """Everything about *what data* a stage trains on and *how long*; model choices are
    script arguments. Paths are relative to the working directory. Each field is also a
    command-line flag; its help text is :data:`FIELD_HELP`."""

    task: str
    data_root: str = "dataset/seg"
    datasets: tuple[str, ...] = ()
    img_size: int = 256
    batch_size: int = 8
    epochs: int = 100
    lr: float = 5e-4                    # Adam, METHOD.md §1
    workers: int = 2
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    augment: bool = True
    max_train: int = 0
    max_val: int = 0
    max_test: int = 0
    skip_missing: bool = False
    negative_rate: float = 0.0
    seed: int = 0


FIELD_HELP: dict[str, str] = {
    "data_root": "SAMUS-layout root: <root>/<Dataset>/{img,label}/<name>.png, "
                 "<root>/MainPatient/{train,val,test}.txt and class.json",
    "datasets": "comma-separated sub-datasets of class.json to use (empty: all of them)",
    "img_size": "network input side in pixels, a multiple of 8 (images are letterboxed to it)",
    "batch_size": "images per optimizer step",
    "epochs": "training epochs",
    "lr": "Adam learning rate (METHOD.md: 5e-4)",
    "workers": "DataLoader worker processes",
    "train_split": "split file name in MainPatient/ used for training",
    "val_split": "split file name used to choose the best checkpoint (validation Dice)",
    "test_split": "split file name used by --eval_test",
    "augment": "rotation ±30°, scale 1-1.3, contrast, gamma (p=0.5 each) on training images",
    "max_train": "> 0: at most N training lines per dataset, drawn evenly at random (seeded by --seed) "
                 "across the split, kept in file order (quick runs)",
    "max_val": "as --max_train, for the validation split",
    "max_test": "as --max_train, for the test split",
    "skip_missing": "true: leave out split lines whose image or label file is missing (with a count) "
                    "instead of stopping with their names",
    "negative_rate": "stage 2: add this many negatives per training line (an image shown with another "
                     "data set's anatomy prompt, target empty), so that a prompt learns to stay silent "
                     "where its anatomy is absent (0 = none)",
    "seed": "seed of weights, sampling and the --max_* subsets",
}


TASKS: dict[str, TaskConfig] = {
    "SAMUS": TaskConfig("SAMUS", data_root="dataset/SAMUS"),
    "HC18": TaskConfig("HC18", data_root="dataset/seg", datasets=("FetalHead-HC18",)),
    "USGRA": TaskConfig("USGRA", data_root="dataset/seg", datasets=("Nerve-USGRA",)),
    "HC18_USGRA": TaskConfig("HC18_USGRA", data_root="dataset/seg",
                             datasets=("FetalHead-HC18", "Nerve-USGRA")),
    # synthetic lung-like data of utils/synthetic_us.py (tests, smoke runs)
    "SynLung": TaskConfig("SynLung", data_root="dataset/synthetic", img_size=128, batch_size=4,
                          epochs=2, datasets=("SynLung-Pleura", "SynLung-Anatomy")),
}


#: the numeric task settings, checked wherever they come from (preset or flag)
TASK_RANGES = {"--img_size": AT_LEAST_1, "--batch_size": AT_LEAST_1, "--epochs": AT_LEAST_1,
               "--lr": POSITIVE, "--workers": AT_LEAST_0, "--max_train": AT_LEAST_0,
               "--max_val": AT_LEAST_0, "--max_test": AT_LEAST_0, "--negative_rate": AT_LEAST_0,
               "--seed": SEED}


def get_task(name: str) -> TaskConfig:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}")
    return dataclasses.replace(TASKS[name])


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--task`` and one optional ``--<field>`` per :class:`TaskConfig` field."""
    g = parser.add_argument_group("task settings (defaults come from the task; any flag overrides)")
    g.add_argument("--task", required=True, choices=sorted(TASKS),
                   help="per-dataset preset from SAM/config.py; SAMUS = any SAMUS-layout folder: "
                        "give --data_root (and --datasets) of your own data")
    for f in dataclasses.fields(TaskConfig):
        if f.name == "task":
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        help_text = FIELD_HELP[f.name]
        if "tuple" in kind:
            g.add_argument(f"--{f.name}", type=lambda s: tuple(x for x in s.split(",") if x),
                           default=None, help=help_text)
        elif kind == "bool":
            g.add_argument(f"--{f.name}", type=parse_bool, default=None, help=f"{help_text} (true/false)")
        else:
            typ = {"int": int, "float": float, "str": str}[kind]
            g.add_argument(f"--{f.name}", type=typ, default=None, help=help_text)


def task_config_from_args(args: argparse.Namespace) -> TaskConfig:
    """The task preset with every flag the user gave applied on top."""
    cfg = get_task(args.task)
    for f in dataclasses.fields(TaskConfig):
        value = getattr(args, f.name, None)
        if f.name != "task" and value is not None:
            setattr(cfg, f.name, value)
    check_flag_ranges(argparse.Namespace(**dataclasses.asdict(cfg)), TASK_RANGES)
    if cfg.img_size % 8:
        raise ConfigError(f"img_size must be a multiple of 8, got {cfg.img_size}")
    return cfg
