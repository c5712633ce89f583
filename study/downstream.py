"""The study's downstream set: POCUS's 5 folds made once, or another labelled set with its
split made once and shared by every arm and seed."""
from __future__ import annotations

from pathlib import Path

from utils.stage_runner import ResumableStages


def downstream_folds(a, st: ResumableStages, out: Path, preset, py: str) -> tuple[Path, list[str], dict]:
    """(the evaluation's --data_path, its extra flags, what settings.json records about the set)."""
    if not a.downstream:
        folds = out / "pocus_5fold"
        st.run("pocus_folds", [py, "-m", "utils.pocus_folds", "--src", str(Path(a.pocus).resolve()),
                               "--out", str(folds), "--frames_per_video", str(preset.pocus_frames_per_video),
                               "--size", str(preset.img_size), "--seed", "0"], [folds / "covid_data5.pkl"])
        return folds, [], {"name": "POCUS", "folds": 5, "split": "split by video"}
    from evaluation.data import DataOptions, open_data
    from evaluation.splits import SPLIT_NAME, write_split_csv
    from utils.io import atomic_write

    root = Path(a.downstream).resolve()
    keep = out / "downstream"  # the split of an ImageFolder, made once and reused by every run
    data = open_data(root, DataOptions(groups=a.downstream_groups, group_rule=a.downstream_group_rule), keep)
    for note in data.notes:
        print(f"note: {note}")
    split_args = []
    if data.rows is not None:
        atomic_write(keep / SPLIT_NAME, lambda f: f.write(write_split_csv(data.rows)))
        split_args = ["--split", str(keep / SPLIT_NAME)]
        how = ("grouped by " + (f"{Path(a.downstream_groups).name}" if a.downstream_groups else
                                f"the rule {a.downstream_group_rule}") if a.downstream_groups or a.downstream_group_rule
               else "split per image")
    else:
        how = "its own folds"
    return root, split_args, {"name": root.name, "layout": data.kind, "folds": data.num_folds,
                              "classes": list(data.classes), "split": how}
