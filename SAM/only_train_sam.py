"""Stage 1 of the pipeline: fine-tune A-SAM's new parts with click prompts (METHOD.md §1).

(The script keeps the name it has in the method's design; it trains the adapted SAM only,
no auto-prompter: that is stage 2, ``SAM/train_auto_prompter.py``.)

Trains the CNN branch, position embedding, adapters and global-block relative positions;
SAM's ViT weights, prompt encoder and mask decoder stay frozen. Prompts: one random
foreground click per training sample, the central foreground point in validation. The
auto-prompter is not part of this graph (upstream's stage 1 let it replace the clicks).

    python SAM/only_train_sam.py --task HC18_USGRA --data_root ../shared/data/seg \\
        --backbone vit_b --sam_ckpt checkpoints/sam_vit_b_01ec64.pth --out_dir runs/asam_stage1

Writes <out_dir>/best.pt (best validation Dice) and last.pt (resume with --resume), both of
kind 'asam_stage1'; log.jsonl and TensorBoard logs in <out_dir>/tb.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run as a script: the repo root must be importable
    sys.path.insert(0, str(_HERE.parent))
# and SAM/ itself must not shadow top-level packages (python puts the script's folder first)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from SAM.checkpoint import save_checkpoint, segmenter_from_checkpoint  # noqa: E402
from SAM.config import add_task_args, parse_bool  # noqa: E402
from SAM.seg_training import make_loader, run_as_script, start_run, train  # noqa: E402
from SAM.samus_data import SAMUSDataset  # noqa: E402
from SAM.seg_metrics import asam_loss  # noqa: E402
from SAM.segmenter import build_segmenter  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_tiny"],
                   help="vit_b: A-SAM ViT-B from --sam_ckpt; vit_tiny: random tiny ViT (tests). "
                        "The lite backbone has no adapters: go straight to train_auto_prompter.py")
    p.add_argument("--sam_ckpt", default=None, help="segment-anything sam_vit_b_01ec64.pth")
    p.add_argument("--out_dir", default="runs/asam_stage1", help="checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt if present")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", type=parse_bool, default=False,
                   help="fp16 mixed precision on CUDA (false; ignored on a CPU)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg, device, out_dir, keys, resume = start_run(args, "asam_stage1")
    if resume is not None:
        seg = segmenter_from_checkpoint(resume)
    else:
        seg = build_segmenter(args.backbone, cfg.img_size, weights=args.sam_ckpt,
                              random_init=args.backbone == "vit_tiny")
    seg.to(device)
    enc = seg.image_encoder
    for name, p in seg.named_parameters():
        p.requires_grad = name.startswith("image_encoder.") and enc.stage1_trainable(name[len("image_encoder."):])
    params = [p for p in seg.parameters() if p.requires_grad]
    print(f"stage 1: {sum(p.numel() for p in params):,} trainable of "
          f"{sum(p.numel() for p in seg.parameters()):,} parameters")

    subset = {"subset_seed": cfg.seed, "skip_missing": cfg.skip_missing}
    train_ds = SAMUSDataset(cfg.data_root, cfg.train_split, cfg.img_size, seg.low_res, keys,
                            cfg.datasets, augment=cfg.augment, max_items=cfg.max_train, **subset)
    val_ds = SAMUSDataset(cfg.data_root, cfg.val_split, cfg.img_size, seg.low_res, keys,
                          cfg.datasets, augment=False, return_orig=True, max_items=cfg.max_val, **subset)
    train_loader = make_loader(train_ds, cfg.batch_size, True, cfg.workers, cfg.seed)
    val_loader = make_loader(val_ds, cfg.batch_size, False, cfg.workers)

    def loss_fn(b):
        return asam_loss(seg(b["image"], b["point"], b["point_label"]), b["low_mask"])

    def predict_fn(b):
        return seg(b["image"], b["point"], b["point_label"])

    def save(path, **extra):
        save_checkpoint(path, "asam_stage1", seg, keys, config=vars(cfg) | {"datasets": list(cfg.datasets)},
                        **extra)

    return train(out_dir=out_dir, loss_fn=loss_fn, predict_fn=predict_fn, params=params,
                 train_loader=train_loader, val_loader=val_loader, keys=keys, epochs=cfg.epochs,
                 lr=cfg.lr, device=device, save=save, set_train_mode=seg.train, resume_state=resume,
                 amp=args.amp)


if __name__ == "__main__":
    sys.exit(run_as_script(main, "only_train_sam.py"))
