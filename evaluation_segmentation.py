"""Stage 6b: evaluate a ResNet-18 encoder on label-efficient segmentation (any SAMUS-layout set).

    python evaluation_segmentation.py --data_root dataset/seg --dataset FetalHead-HC18 \\
        --ckpt_path runs/aclus/encoder_resnet18.pth --out_dir eval_seg/aclus
    python evaluation_segmentation.py --data_root dataset/seg --dataset Nerve-USGRA --out_dir eval_seg/random

The encoder (read by the classification evaluation's loader; none = random init) sits under
the pre-training FPN and a semantic-FPN head (``evaluation/segmentation.py``). For every
label fraction (``--fractions``, default 10 %, 25 %, 100 % of the training images: fixed,
nested, class-balanced subsets per ``--seed``) and variant (``frozen``: FPN + head trained;
``finetune``: everything), it trains, keeps the epoch of the best validation mean Dice, and
scores the test split: Dice, IoU and HD95 (pixels at ``--img_size``) per class and their
mean, and each test image's Dice per class it shows (``test_dice_per_image``: what a paired
comparison of encoders resamples, see ``study_segmentation.py``). Output: ``<out_dir>/seg_<variant>_f<fraction>.json`` each, and ``segmentation.json``
(all of them, with the subsets' image names). Bad input is one line before any training.

Leak: HC18 and USGRA also train the A-SAM whose masks feed the ``*_asam`` pre-training arms,
so on those sets an ``*_asam`` encoder has seen masks of a model taught on the same training
images (never the test split); the JSON says so when ``--dataset`` is one of them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from evaluation.segmentation import (ASAM_TRAINING_SETS, FRACTIONS, VARIANTS, SegNet, fit, image_dice, label_subsets,
                                     load_split, predict, score, strata)
from models.encoder_io import load_resnet18_state
from SAM.samus_data import read_class_json
from utils.distributed import seed_everything
from utils.flags import AT_LEAST_1, POSITIVE, SEED, Range, check_flag_ranges, exit_code
from utils.io import DataError, atomic_write, ensure_writable_dir

FLAG_RANGES = {"--img_size": Range(32), "--epochs": AT_LEAST_1, "--batch_size": Range(2), "--lr": POSITIVE,
               "--seed": SEED, "--fractions": Range(0, 1, low_open=True)}


def parse_list(text: str, kind, what: str) -> tuple:
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DataError(f"{what} {text!r}: expected a comma list") from None
    if not values:
        raise DataError(f"{what}: empty")
    return values


def run(args) -> dict:
    fractions = parse_list(args.fractions, float, "--fractions")
    variants = parse_list(args.variants, str, "--variants")
    args.fractions = fractions
    check_flag_ranges(args, FLAG_RANGES)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise DataError(f"--variants {bad[0]!r}: expected {' or '.join(VARIANTS)}")
    out_dir = ensure_writable_dir(args.out_dir, "--out_dir")
    state = load_resnet18_state(args.ckpt_path) if args.ckpt_path else None
    classes = read_class_json(args.data_root)
    if args.dataset not in classes:
        raise DataError(f"--dataset {args.dataset}: not in {args.data_root}/MainPatient/class.json "
                        f"({', '.join(sorted(classes))})")
    num_classes = classes[args.dataset]
    splits = {s: load_split(args.data_root, s, args.dataset, args.img_size) for s in ("train", "val", "test")}
    subsets = label_subsets(strata(splits["train"].Y), tuple(sorted(fractions)), args.seed)
    device = torch.device(args.device)
    results = []
    for variant in variants:
        for fraction in fractions:
            t0 = time.time()
            seed_everything(args.seed)
            idx = subsets[fraction]
            tr = splits["train"]
            train = type(tr)(tr.X[idx], tr.Y[idx], [tr.names[i] for i in idx])
            model = SegNet(num_classes, state).to(device)
            record = fit(model, variant, train, splits["val"], num_classes, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device)
            pred = predict(model, splits["test"].X, device)
            test = score(pred, splits["test"].Y, num_classes)
            per_image = dict(zip(splits["test"].names, image_dice(pred, splits["test"].Y, num_classes)))
            r = {"variant": variant, "fraction": fraction, "n_train": len(idx), "train_images": train.names,
                 "n_val": len(splits["val"].names), "n_test": len(splits["test"].names), **record,
                 "test": test, "test_dice_per_image": per_image, "seconds": round(time.time() - t0, 1)}
            results.append(r)
            path = out_dir / f"seg_{variant}_f{fraction:.2f}.json"
            atomic_write(path, lambda f, r=r: f.write(json.dumps(_meta(args, num_classes) | r, indent=1).encode()))
            m = test["mean"]
            print(f"{variant} {fraction:.2f} ({len(idx)} images): test Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  "
                  f"HD95 {m['hd95']:.2f} px  (epoch {record['selected_epoch']}, val Dice {record['val_dice']:.4f})")
    summary = _meta(args, num_classes) | {"results": results}
    atomic_write(out_dir / "segmentation.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    print(f"wrote {out_dir / 'segmentation.json'}")
    return summary


def _meta(args, num_classes: int) -> dict:
    meta = {"data_root": str(args.data_root), "dataset": args.dataset, "num_classes": num_classes,
            "ckpt_path": args.ckpt_path or None, "init": "checkpoint" if args.ckpt_path else "random",
            "img_size": args.img_size, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "selection": "best validation mean Dice", "decoder": "pre-training FPN + semantic-FPN head",
            "hd95_unit": f"pixels at {args.img_size} px (letterboxed)"}
    if args.dataset in ASAM_TRAINING_SETS:
        meta["leak"] = (f"{args.dataset} also trains A-SAM, whose masks feed the *_asam pre-training arms: "
                        "their encoders have seen masks of a model taught on these training images (not the test split)")
    return meta


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_root", required=True, help="SAMUS-layout root: <root>/<Dataset>/{img,label}, "
                                                      "MainPatient/{train,val,test}.txt and class.json")
    p.add_argument("--dataset", required=True, help="one data set of class.json, e.g. FetalHead-HC18")
    p.add_argument("--ckpt_path", default=None, help="encoder (as evaluation_aclus.py); omit for random init")
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS),
                   help="shares of the training images (nested, class-balanced per --seed)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="frozen (FPN + head trained) and/or finetune")
    p.add_argument("--img_size", type=int, default=128, help="input side (CPU: 128; the paper's size: 224)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets, the decoder's init and the batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out_dir", default="eval_seg", help="where the JSON files go")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return exit_code(lambda: run(args), "evaluation_segmentation.py")


if __name__ == "__main__":
    sys.exit(main())
