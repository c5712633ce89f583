"""One evaluation run: check everything, encode once, then each protocol on the folds with
its report (``eval_<protocol>_<selection>.json`` + confusion PNG). ``evaluation_aclus.py``
is its command line (the flags: :func:`get_args_parser`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from evaluation import gradcam as gcam
from evaluation.data import NUM_FOLDS, DataOptions, DownstreamData, open_data
from evaluation.explain import CAM_MASKS_NAME, arm_name, cam_summary, check_gradcam_args, explain_fold, load_cam_masks
from evaluation.features import FeatureCache
from evaluation.protocols import LINEAR_C_GRID, PROTOCOLS, FoldInputs, parse_protocols
from evaluation.splits import GROUP_RULES, SPLIT_NAME, write_split_csv
from models.encoder_io import NORM_MEAN, NORM_STD, load_resnet18_state
from evaluation.metrics import (SELECTION_NOTES, SELECTIONS, aggregate_folds, confusion_matrix,
                                          metrics_from_confusion)
from utils.flags import AT_LEAST_0, AT_LEAST_1, OPEN_FRACTION, POSITIVE, SEED, Range, check_flag_ranges
from utils.io import DataError, atomic_write, ensure_writable_dir
from utils.plots import plot_confusion
from utils.stage_files import confusion_name, eval_result_name, eval_tag


def check_protocol_args(args) -> tuple[str, ...]:
    """The protocol flags, before any work; returns the protocols."""
    protocols = parse_protocols(args.protocol)
    silent = [p for p in protocols if not PROTOCOLS[p].explainable]
    if args.gradcam and silent:
        raise DataError(f"--gradcam with --protocol {silent[0]}: it trains no network, so there is no gradient to "
                        f"explain; drop {silent[0]} from --protocol or run it without --gradcam")
    check_flag_ranges(args, FLAG_RANGES)
    return protocols


#: checked before any work (utils/flags.py)
FLAG_RANGES = {
    "--knn_k": AT_LEAST_1, "--epochs": AT_LEAST_1, "--img_size": AT_LEAST_1, "--batch_size": AT_LEAST_1,
    "--workers": AT_LEAST_0, "--gradcam": AT_LEAST_0, "--seed": SEED,
    "--lr": POSITIVE, "--lin_C": POSITIVE, "--weight_decay": AT_LEAST_0, "--val_fraction": OPEN_FRACTION,
    "--folds": Range(2), "--split_seed": SEED, "--pad_value": Range(0, 255),
}


def evaluate(args) -> dict:
    """Run every protocol of ``args.protocol`` on the 5 folds; returns the result of a single
    protocol, or ``{protocol: result}`` for a comma list. The checkpoint is read and the data
    checked once; each image is encoded once for all frozen-feature protocols."""
    t0 = time.time()
    protocols = check_protocol_args(args)
    device = torch.device(args.device)
    check_gradcam_args(args)
    ensure_writable_dir(args.out_dir, "--out_dir")  # not after five folds of work
    for wanted, sub in ((args.gradcam, "gradcam"), (args.save_classifiers, "classifiers")):
        if wanted:
            ensure_writable_dir(Path(args.out_dir) / sub, f"--out_dir's {sub}/")
    # read the weights first: a wrong checkpoint fails before any data is loaded
    state = load_resnet18_state(args.ckpt_path) if args.ckpt_path else None
    data = open_data(args.data_path, data_options(args), args.out_dir)  # every fold checked before any work
    for note in data.notes:
        print(f"note: {note}")
    if data.rows is not None:  # the split goes beside the results, so that a re-run uses the same one
        split_path = Path(args.out_dir) / SPLIT_NAME
        atomic_write(split_path, lambda f: f.write(write_split_csv(data.rows)))
        data.split_path = split_path if data.split_path is None else data.split_path
    if args.gradcam:
        for k in range(1, data.num_folds + 1):  # a bad mask file fails now, not after fold k-1
            path = data.root / CAM_MASKS_NAME.format(k=k)
            if path.is_file():
                load_cam_masks(path)
    frozen = [p for p in protocols if PROTOCOLS[p].frozen]
    features = None
    if frozen:  # one forward pass per distinct image, shared by all frozen-feature protocols
        features = FeatureCache(state, args, device, keep_maps=any(PROTOCOLS[p].keeps_maps for p in frozen))
        for fold in data.iter_folds(args.img_size):
            features.add(fold.X_train, f"encode fold {fold.index}")
            features.add(fold.X_test, f"encode fold {fold.index}")
        print(f"encoded {features.encoded} images once for {', '.join(frozen)} ({features.seconds:.1f} s)")
    timing = {"setup_s": round(time.time() - t0, 2),
              "shared_features": None if features is None else {
                  "seconds": round(features.seconds, 2), "images_encoded": features.encoded,
                  "outputs": ["avgpool_512"] + (["layer4.0_maps"] if features.keep_maps else []),
                  "shared_by": frozen}}
    results = {}
    for protocol in protocols:
        pargs = argparse.Namespace(**{**vars(args), "protocol": protocol})
        results[protocol] = run_protocol(pargs, state, data, features, device, timing, protocols)
    if len(protocols) > 1:
        print(f"all protocols: {time.time() - t0:.1f} s")
    return results[protocols[0]] if len(protocols) == 1 else results


def run_protocol(args, state: dict | None, data: DownstreamData, features: FeatureCache | None,
                 device: torch.device, timing: dict, protocols: tuple[str, ...]) -> dict:
    """One protocol (``args.protocol``) on the folds: ``eval_<protocol>_<selection>.json`` + PNG.
    ``wall_time_s`` is this protocol's own time; the shared encoding is in ``timing``."""
    t0 = time.time()
    classes = data.classes
    protocol = args.protocol
    spec = PROTOCOLS[protocol]
    tag, arm = eval_tag(protocol, args.selection), arm_name(args.ckpt_path)
    if args.save_classifiers and not spec.explainable:
        print(f"note: --save_classifiers: {protocol} has no network classifier; none saved for it", file=sys.stderr)
    inputs = FoldInputs(state, features, args, device)

    folds, confusions, cam_records = [], [], []
    for fold in tqdm(data.iter_folds(args.img_size), total=data.num_folds, desc=f"{protocol} {data.num_folds}-fold"):
        if fold.groups_train is None and args.selection == "val" and spec.selects:
            print(f"note: {fold.source}: source videos unknown, validation split is by frame "
                  "(frames of one video may sit in train and val)", file=sys.stderr)
        out = spec.run_fold(fold, inputs)
        cm = confusion_matrix(fold.y_test, out.pop("pred"), len(classes))
        confusions.append(cm)
        m = metrics_from_confusion(cm, classes)
        model, probe = out.pop("model", None), out.pop("probe", None)
        if (args.gradcam or args.save_classifiers) and spec.explainable:
            if model is None:  # linear: encoder + scaler + logistic regression as one module
                model = gcam.linear_probe_classifier(features.model, probe, len(classes))
            if args.save_classifiers:
                out["classifier"] = str(gcam.save_classifier(
                    model, Path(args.out_dir) / "classifiers" / f"{tag}_{arm}_fold{fold.index}.pth", classes,
                    protocol=protocol, selection=args.selection, arm=arm, fold=fold.index,
                    img_size=args.img_size, resize=args.resize, pad_value=args.pad_value,
                    norm_mean=list(NORM_MEAN), norm_std=list(NORM_STD),
                    data_path=str(args.data_path), ckpt_path=args.ckpt_path or None))
            if args.gradcam:
                png = Path(args.out_dir) / "gradcam" / f"{args.cam}_{tag}_{arm}_fold{fold.index}.png"
                out["gradcam"], rec = explain_fold(fold, model, args, device, png)
                cam_records.append(rec)
        del model
        folds.append({"fold": fold.index, "source": fold.source, "n_train": int(len(fold.y_train)),
                      "n_test": int(len(fold.y_test)), **m, "confusion_matrix": cm.tolist(), **out})
        tqdm.write(f"fold {fold.index}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                   f"selected {out['selected']}")
    if len(folds) != data.num_folds:
        raise DataError(f"{args.data_path}: found {len(folds)} folds, expected {data.num_folds}")

    optimistic = args.selection == "paper" and spec.selects  # a protocol that selects nothing is not optimistic
    summary = aggregate_folds(confusions, classes)
    result = {
        "protocol": protocol, "selection": args.selection, "optimistic": optimistic,
        "selection_note": (SELECTION_NOTES[args.selection] if spec.selects
                           else spec.no_selection_note.format(**vars(args))),
        "ckpt_path": args.ckpt_path or None, "init": "checkpoint" if args.ckpt_path else "random",
        "data_path": str(args.data_path), "classes": list(classes), "data": data.info(),
        "config": {k: v for k, v in vars(args).items() if k not in ("data_path", "ckpt_path", "out_dir")},
        "protocols_in_run": list(protocols),
        "summary": summary, "folds": folds,
    }
    if spec.note:
        result["protocol_note"] = spec.note
    if args.gradcam:  # over the maps of all folds
        result["gradcam"] = {"method": args.cam, "target": args.cam_target, "layer": "layer4[-1]",
                             "images_per_class": args.gradcam, "arm": arm,
                             **cam_summary(np.concatenate(cam_records), classes)}
    out_dir = Path(args.out_dir)
    json_path = out_dir / eval_result_name(protocol, args.selection)
    png_path = out_dir / confusion_name(protocol, args.selection)
    result["confusion_png"] = str(png_path)
    title = (f"{protocol}, selection={args.selection}, init={result['init']}\n"
             f"pooled acc {summary['pooled_accuracy']:.4f} ({summary['pooled_correct']}/{summary['pooled_total']})")
    if optimistic:
        title = "OPTIMISTIC (paper protocol: epoch chosen on test fold)\n" + title
    plot_confusion(np.array(summary["confusion_matrix_sum"]), classes, png_path, title)
    # this protocol's own time (folds + report); the shared encoding and the setup are in "timing"
    result["wall_time_s"] = round(time.time() - t0, 2)
    result["timing"] = timing
    atomic_write(json_path, lambda f: f.write(json.dumps(result, indent=2).encode()))

    label = " [OPTIMISTIC: paper protocol, selected on the test fold]" if optimistic else ""
    print(f"{protocol} / selection={args.selection}{label}")
    print(f"accuracy {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}  "
          f"macro-F1 {summary['macro_f1_mean']:.4f} ± {summary['macro_f1_std']:.4f}  "
          f"pooled accuracy {summary['pooled_accuracy']:.4f} ({summary['pooled_correct']}/{summary['pooled_total']})")
    for c, v in summary["pooled_per_class"].items():
        print(f"  {c:10s} precision {v['precision']:.4f}  recall {v['recall']:.4f}  f1 {v['f1']:.4f}  n={v['support']}")
    if args.gradcam:
        g = result["gradcam"]
        shares = f"sector {g['sector_share']['all']:.3f}" if g["sector_share"]["all"] is not None else "no energy"
        if g["region_share"]:
            shares += f", class region {g['region_share']['all']:.3f} (area {g['region_area']['all']:.3f})"
        print(f"Grad-CAM energy share ({args.cam}, {args.cam_target} class): {shares}; maps in {out_dir / 'gradcam'}")
    print(f"wrote {json_path} and {png_path} ({result['wall_time_s']:.1f} s)")
    return result


def data_options(args) -> DataOptions:
    return DataOptions(folds=args.folds, resize=args.resize, pad_value=args.pad_value, groups=args.groups,
                       group_rule=args.group_rule, split_seed=args.split_seed, split=args.split)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a ResNet-18 encoder on POCUS (5-fold, covid19/"
                                "pneumonia/regular) or any labelled image set: pre-split folds or a plain "
                                "<class>/ image folder (folds made here).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", "--data_dir", dest="data_path", required=True,
                   help="folder with covid_data1..K.pkl (USCL format), [images/]fold1..K/<class>/* (python -m "
                        "utils.pocus_folds writes both), or a plain ImageFolder <class>/**/* whose folds are made "
                        "here; classes = the class folders, sorted, or classes.txt")
    d = p.add_argument_group("data: folds, groups, image fitting")
    d.add_argument("--folds", type=int, default=NUM_FOLDS, help="K: the number of folds")
    d.add_argument("--groups", default=None,
                   help="ImageFolder: CSV with columns file,group (file relative to --data_path, or a unique bare "
                        "name), so that one patient never sits on both sides of a fold")
    d.add_argument("--group_rule", default=None,
                   help=f"ImageFolder, without --groups: {' or '.join(GROUP_RULES)} (folder = the first folder "
                        "below the class; frame = the <video>__f<frame> names of utils.pocus_folds) or a regular "
                        "expression whose first group, searched in the file name, is the group")
    d.add_argument("--split_seed", type=int, default=0,
                   help="ImageFolder: seed of the fold assignment (not --seed: every seed shares the folds)")
    d.add_argument("--split", default=None,
                   help=f"ImageFolder: a {SPLIT_NAME} to use (default: OUT_DIR/{SPLIT_NAME} if a run there made "
                        "one, else a new split written there)")
    d.add_argument("--resize", choices=("letterbox", "squash"), default="letterbox",
                   help="fitting images of another shape to the square input: letterbox keeps the aspect ratio "
                        "(centred on --pad_value); squash stretches (the aspect ratio lost)")
    d.add_argument("--pad_value", type=int, default=0, help="grey level of the letterbox padding (0..255)")
    p.add_argument("--ckpt_path", default=None,
                   help="pretrain_aclus.py checkpoint, exported encoder, or torchvision resnet18 state dict; "
                        "omit for the random-init baseline")
    p.add_argument("--protocol", default="finetune", metavar="P[,P...]",
                   help="one or a comma list of: finetune = paper protocol (layer4.1 + head, augmented); "
                        "linear = frozen features + logistic regression; knn = frozen features, cosine "
                        "k-NN vote; finetune_cached = finetune on cached layer4.0 outputs (no augmentation, "
                        "frozen BatchNorm statistics; affordable on a CPU). E.g. linear,knn,finetune_cached: "
                        "each image encoded once, one JSON per protocol")
    p.add_argument("--selection", choices=SELECTIONS, default="last",
                   help="last: honest, fixed; val: chosen on training-fold data; "
                        "paper: chosen on the test fold (OPTIMISTIC, as upstream)")
    p.add_argument("--out_dir", default="eval_out", help="where the JSON and confusion-matrix PNG go")
    p.add_argument("--img_size", type=int, default=224, help="input side (paper: 224; 112 is ~4x cheaper)")
    p.add_argument("--epochs", type=int, default=30, help="finetune / finetune_cached epochs (paper: 30)")
    p.add_argument("--knn_k", type=int, default=20, help="neighbours of the knn protocol (cosine similarity)")
    p.add_argument("--batch_size", type=int, default=32, help="batch size (paper: 32)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (paper: 0.01)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="Adam weight decay (paper: 1e-4)")
    p.add_argument("--val_fraction", type=float, default=0.2,
                   help="share of the training folds held out for --selection val (finetune)")
    p.add_argument("--lin_C", type=float, default=0.1,
                   help=f"inverse L2 strength of the linear probe for --selection last "
                        f"(val/paper search {list(LINEAR_C_GRID)})")
    p.add_argument("--seed", type=int, default=1, help="seed (paper: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--gradcam", type=int, default=0, metavar="N",
                   help="after each fold, Grad-CAM at layer4[-1] of N test images per class: montage PNG + maps "
                        ".npy under OUT_DIR/gradcam/, energy shares in the JSON (0 = off; needs --img_size >= 33)")
    p.add_argument("--cam", choices=tuple(gcam.CAM_METHODS), default="gradcam",
                   help="map method of pytorch_grad_cam: gradcam (Grad-CAM) or gradcampp (Grad-CAM++)")
    p.add_argument("--cam_target", choices=gcam.CAM_TARGETS, default="true",
                   help="class each map explains: the image's true class or the predicted one")
    p.add_argument("--save_classifiers", action="store_true",
                   help="save each fold's classifier (ResNet-18 state dict + class names, weights only) to "
                        "OUT_DIR/classifiers/ for gradcam_aclus.py")
    return p
