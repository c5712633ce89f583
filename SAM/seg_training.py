"""Training loop shared by stage 1 and stage 2: epochs, validation Dice, best/last
checkpoints, resume, tqdm and TensorBoard. The stage scripts only supply two functions:

* ``loss_fn(batch) -> scalar loss`` (training step, grads flow into the trainable params);
* ``predict_fn(batch) -> (B, 1, L, L) low-res logits`` (validation / test).

``amp``: fp16 autocast with a gradient scaler on CUDA (``--amp true``); ignored on a CPU.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from SAM.presence import mask_scores
from SAM.samus_data import SAMUSDataset, collate, restore_logits
from SAM.seg_metrics import MetricTable, format_summary
from utils.distributed import seed_everything, to_device
from utils.io import DataError, ensure_writable_dir
from utils.stage_files import ASAM_BEST, ASAM_LAST


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def start_run(args, kind: str):
    """Common start of a training stage: task config, seed, device, output folder, the
    prompt vocabulary, and the ``<out_dir>/last.pt`` checkpoint of ``kind`` when
    ``--resume`` is given and one exists (else None).

    Returns:
        ``(cfg, device, out_dir, keys, resume)``.
    """
    from SAM.checkpoint import load_checkpoint
    from SAM.config import task_config_from_args
    from SAM.samus_data import prompt_keys

    cfg = task_config_from_args(args)
    seed_everything(cfg.seed)
    out_dir = ensure_writable_dir(args.out_dir, "--out_dir")
    last = out_dir / ASAM_LAST
    resume = load_checkpoint(last, (kind,)) if args.resume and last.is_file() else None
    return cfg, pick_device(args.device), out_dir, prompt_keys(cfg.data_root, cfg.datasets), resume


def run_as_script(main: Callable[[], object], script: str) -> int:
    """``main()`` of a stage script: bad input (a DataError or ConfigError) is one line on
    stderr and exit status 2, never a traceback."""
    from SAM.config import ConfigError

    try:
        main()
    except (DataError, ConfigError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    return 0


def prompt_balance_weights(prompt_keys: list[str]) -> torch.Tensor:
    """Sampling weight of each sample so that every prompt key ("<Dataset>/<class ID>") is
    drawn equally often: 1 / (number of samples of its key)."""
    counts: dict[str, int] = {}
    for k in prompt_keys:
        counts[k] = counts.get(k, 0) + 1
    return torch.tensor([1.0 / counts[k] for k in prompt_keys], dtype=torch.float64)


def make_loader(ds: SAMUSDataset, batch_size: int, shuffle: bool, workers: int,
                seed: int = 0, balance: bool = False) -> DataLoader:
    """``balance``: draw len(ds) samples per epoch, with replacement, every prompt key equally
    often (HC18 has twice as many lines as nerve + vessel together, say)."""
    gen = torch.Generator().manual_seed(seed)
    sampler = None
    if balance:
        weights = prompt_balance_weights([line.prompt_key for line in ds.lines])
        sampler = WeightedRandomSampler(weights, len(ds), replacement=True, generator=gen)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, collate_fn=collate, drop_last=False,
                      persistent_workers=False, generator=gen)


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """Mixed precision runs on CUDA only; on a CPU ``--amp true`` is a no-op."""
    return amp and device.type == "cuda"


def autocast(amp: bool):
    """fp16 autocast when ``amp`` (already checked by :func:`amp_enabled`), else nothing."""
    return torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext()


@torch.no_grad()
def evaluate(predict_fn: Callable[[dict], torch.Tensor], loader: DataLoader, keys: list[str],
             device: torch.device, desc: str = "val", amp: bool = False) -> dict:
    """Dice / IoU / HD95 per prompt key, each mask compared at its image's own size."""
    table = MetricTable()
    ds: SAMUSDataset = loader.dataset
    amp = amp_enabled(amp, device)
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = to_device(batch, device)
        with autocast(amp):
            logits = predict_fn(batch)
        for b in range(logits.shape[0]):
            gt = batch["orig_mask"][b]
            up = restore_logits(logits[b], batch["valid"][b].tolist(), ds.img_size, gt.shape)
            pred = (up[0] > 0).cpu().numpy()
            table.add(ds.lines[int(batch["index"][b])].prompt_key, pred, gt)
    return table.summary()


@torch.no_grad()
def presence_rows(score_fn: Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                  loader: DataLoader, device: torch.device, desc: str = "presence",
                  amp: bool = False) -> list[dict]:
    """One row per split line: {key, present, <score>: value for each score}. ``score_fn``
    maps a batch to (low-res logits (B, 1, L, L), {name: (B,)} model scores); the mask's own
    scores (:func:`SAM.presence.mask_scores`) are read at the image's size. "present" is
    "the line's mask at the image's size is not empty"."""
    ds: SAMUSDataset = loader.dataset
    amp = amp_enabled(amp, device)
    rows = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = to_device(batch, device)
        with autocast(amp):
            logits, scores = score_fn(batch)
        for b in range(logits.shape[0]):
            gt = batch["orig_mask"][b]
            up = restore_logits(logits[b], batch["valid"][b].tolist(), ds.img_size, gt.shape)  # 1 x H x W
            row = {"key": ds.lines[int(batch["index"][b])].prompt_key, "present": bool(gt.any())}
            row |= {k: float(v[b]) for k, v in scores.items()}
            row |= {k: float(v[0]) for k, v in mask_scores(up).items()}
            rows.append(row)
    return rows


def train(*, out_dir: Path, loss_fn: Callable[[dict], torch.Tensor],
          predict_fn: Callable[[dict], torch.Tensor], params: list,
          train_loader: DataLoader, val_loader: DataLoader, keys: list[str], epochs: int,
          lr: float, device: torch.device, save: Callable[..., None],
          set_train_mode: Callable[[bool], None], resume_state: dict | None = None,
          amp: bool = False) -> dict:
    """Run the epochs; returns the best validation summary.

    ``params``: the trainable parameters, or Adam parameter groups (dicts with their own
    ``lr``); ``save(path, **extra)`` writes a checkpoint (the stage knows its kind and
    modules); ``resume_state`` is a loaded 'last.pt' (optimizer, epoch, best_dice, and the
    gradient scaler of an ``amp`` run).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard import is slow

    optimizer = torch.optim.Adam(params, lr=lr)
    amp = amp_enabled(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start, best, best_summary = 0, -1.0, {}
    if resume_state is not None:
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except ValueError as e:  # e.g. resumed with another --encoder_lr on/off choice
            raise DataError(f"{out_dir / 'last.pt'}: its optimizer does not match this run's "
                            f"trainable parameters ({e}); resume with the same settings") from None
        if amp and "scaler" in resume_state:
            scaler.load_state_dict(resume_state["scaler"])
        start, best = int(resume_state["epoch"]) + 1, float(resume_state["best_dice"])
        print(f"resumed after epoch {start - 1} (best val Dice {best:.4f})")
    writer = SummaryWriter(str(out_dir / "tb"))
    log = open(out_dir / "log.jsonl", "a")
    step = start * len(train_loader)
    for epoch in range(start, epochs):
        set_train_mode(True)
        t0, losses = time.time(), []
        bar = tqdm(train_loader, desc=f"epoch {epoch}", dynamic_ncols=True)
        for batch in bar:
            with autocast(amp):
                loss = loss_fn(to_device(batch, device))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            writer.add_scalar("train/loss", loss.item(), step)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            step += 1
        set_train_mode(False)
        summary = evaluate(predict_fn, val_loader, keys, device, amp=amp)
        dice = summary["mean"]["dice"]
        for key, v in summary.items():
            writer.add_scalar(f"val_dice/{key}", v["dice"], epoch)
        is_best = dice > best
        if is_best:
            best, best_summary = dice, summary
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val": summary,
                  "best_dice": best, "seconds": round(time.time() - t0, 1)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(f"epoch {epoch}: loss {np.mean(losses):.4f}, val Dice {dice:.4f}"
              f"{' (best)' if is_best else ''}\n{format_summary(summary)}")
        if is_best:
            save(out_dir / ASAM_BEST, epoch=epoch, best_dice=best, val=summary)
        # last.pt carries the optimizer so that --resume continues exactly here
        save(out_dir / ASAM_LAST, epoch=epoch, best_dice=best, optimizer=optimizer.state_dict(),
             **({"scaler": scaler.state_dict()} if amp else {}))
    writer.close()
    log.close()
    return best_summary
