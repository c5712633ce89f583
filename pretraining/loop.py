"""The pre-training loop: claim the run folder, build data, model and optimizer, resume,
then epochs of :func:`pretraining.step.train_step` with logging, snapshots and checkpoints
(DINO's one distributed init and full resume). ``pretrain_aclus.py`` is its command line."""
from __future__ import annotations

import argparse
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.aclus import ACLUS, build_model
from models.encoder_io import PRETRAIN_KIND
from models.methods import get_method
from pretraining.config import PretrainConfig
from pretraining.config import run_dir as config_run_dir
from pretraining.data import AnatomyPairDataset, EpochSampler, load_pairs
from pretraining.optim import build_optimizer
from pretraining.precision import prepare_model, resolve_precision
from pretraining.run_files import JsonLog, save_weights, snapshot_steps, write_run_config
from pretraining.step import NonFiniteWatch, augment_seed, mask_generator, train_step
from utils import distributed as du
from utils.checkpoint import find_resume_checkpoint, save_checkpoint
from utils.distributed import to_device
from utils.io import DataError, ensure_writable_dir
from utils.run_lock import RunLock
from utils.stage_files import ENCODER_NAME, snapshot_name

CKPT_KIND = PRETRAIN_KIND  # the one tag, read by models/encoder_io.py too
log = logging.getLogger("pretrain")


def build_loader(cfg: PretrainConfig, info: du.DistInfo) -> tuple[DataLoader, EpochSampler]:
    """The pre-training pairs as the method needs them (context view, whole-image masks):
    uint8 crops for the step's on-device augmentation, from frames decoded once into RAM
    (``data.cache: memory``) before the workers start."""
    spec = get_method(cfg.model.method)
    data = cfg.data
    pairs = load_pairs(data.image_dir, data.subset)
    if data.num_examples > 0:
        pairs = pairs[: data.num_examples]
    dataset = AnatomyPairDataset(
        pairs, size=data.resize_size, crop_scale=data.crop_scale, with_context=spec.context,
        whole_image_mask=spec.whole_image or data.mask_type == "whole", seed=cfg.seed,
        device_augment=True, cache=data.cache, max_ids=data.max_mask_ids, threads=max(1, data.data_workers))
    sampler = EpochSampler(len(dataset), info.rank, info.world_size, seed=cfg.seed)
    batch_size, workers = data.train_batch_size, data.data_workers
    # persistent workers: started once, not every epoch (the epoch travels with each index)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=info.device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    if len(loader) == 0:
        raise DataError(f"{len(dataset)} training pairs give no full batch of {batch_size} per process "
                        f"on {info.world_size} process(es); lower data.train_batch_size")
    return loader, sampler


def train(cfg: PretrainConfig, args: argparse.Namespace) -> Path:
    """Claim the run folder (main process: writable, not owned by another live run), then :func:`fit`."""
    info = du.init_distributed_mode(args.device)
    run_dir = config_run_dir(cfg)
    with ExitStack() as owned:
        def claim() -> None:  # before any data or model is built
            ensure_writable_dir(run_dir, "checkpoint.ckpt_path")
            ensure_writable_dir(cfg.log.log_dir or run_dir / "tb",
                                "log.log_dir" if cfg.log.log_dir else "checkpoint.ckpt_path's tb/")
            owned.enter_context(RunLock(run_dir))
        du.main_decides(claim)
        return fit(cfg, args, info, run_dir)


def fit(cfg: PretrainConfig, args: argparse.Namespace, info: du.DistInfo, run_dir: Path) -> Path:
    seed = cfg.seed
    torch.manual_seed(seed + info.rank)
    method = cfg.model.method
    precision = resolve_precision(cfg.amp, info.device)  # a setting this device cannot run fails here

    # ---- data
    loader, sampler = build_loader(cfg, info)
    iters = len(loader)

    # ---- model
    model = build_model(cfg).to(info.device)
    if info.distributed and info.device.type == "cuda" and cfg.amp.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # gloo/CPU has no SyncBN
    core: ACLUS = model
    speed = prepare_model(core, cfg.amp, info.device)
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None)

    # ---- optimisation
    epochs = cfg.optimizer.total_epochs
    global_batch = cfg.data.train_batch_size * info.world_size
    optimizer, lr_sched, mom_sched = build_optimizer(cfg, core, global_batch, iters)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_scaler)

    # ---- resume
    start_epoch = 0
    resume = args.resume if args.resume is not None else cfg.checkpoint.resume_path
    state, path = find_resume_checkpoint(resume, run_dir, CKPT_KIND, move_aside=info.is_main)
    if state is not None:
        if state["config"]["model"]["method"] != method:
            raise DataError(f"{path}: checkpoint of method '{state['config']['model']['method']}', "
                            f"config says '{method}'")
        try:
            core.load_state_dict(state["model"])
        except RuntimeError as e:
            raise DataError(f"{path}: does not match the model of this config ({str(e).splitlines()[0]})") from None
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):  # a bf16 / fp32 run saved an empty one
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch = int(state["epoch"])
        if info.is_main:
            log.info("resumed from %s at epoch %d", path, start_epoch)
    finished = run_dir / ENCODER_NAME
    # the folder's encoder is a finished run's unless the checkpoint resumed is mid-run (run folders
    # of earlier versions hold an encoder written every epoch, beside latest.pth)
    mid_run = state is not None and start_epoch < int(state.get("config", {}).get("optimizer", {})
                                                        .get("total_epochs", epochs))
    if finished.is_file() and start_epoch < epochs and not mid_run and not args.overwrite:
        raise DataError(f"{finished}: this run folder holds a finished encoder, which training from epoch "
                        f"{start_epoch} would replace; pass --overwrite to do that, or use another "
                        "checkpoint.ckpt_path")

    # ---- logging
    writer = None
    # a run from scratch over a killed attempt's log keeps none of its records
    jlog = JsonLog(run_dir / "log.jsonl" if info.is_main else None,
                   resume_step=start_epoch * iters, resume_epoch=start_epoch)
    if info.is_main:
        write_run_config(run_dir, cfg)  # only now: a start that fails above leaves the run's files as they were
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.log.log_dir or str(run_dir / "tb"))
        log.info("%s: %d pairs, %d iters/epoch, global batch %d, %d process(es) on %s, amp=%s (%s), "
                 "channels_last=%s, compile=%s", method, len(loader.dataset), iters, global_batch,
                 info.world_size, info.device, precision.enabled, precision, speed["channels_last"],
                 speed["compile"])
    log_step = cfg.log.log_step
    watch = NonFiniteWatch(info.device)
    aug_generator = torch.Generator(device=info.device)

    total_steps = epochs * iters
    snapshots = snapshot_steps(cfg.checkpoint.snapshot_fractions, total_steps)
    steps_done, stopped = 0, False
    for epoch in range(start_epoch, epochs):
        if args.max_steps and steps_done >= args.max_steps:
            break
        sampler.set_epoch(epoch)
        generator = mask_generator(seed, info.rank, epoch, info.device)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not info.is_main,
                   leave=False, dynamic_ncols=True, mininterval=1.0)
        t_epoch, names, sums = time.time(), None, None
        for it, batch in enumerate(bar):
            step = epoch * iters + it
            aug_generator.manual_seed(augment_seed(seed, info.rank, epoch, step))
            loss, stats = train_step(model, core, optimizer, scaler, to_device(batch, info.device),
                                     float(lr_sched[step]), float(mom_sched[step]), generator, precision,
                                     aug_generator)
            watch.update(loss, step)
            steps_done += 1
            if step + 1 in snapshots and info.is_main:  # after step + 1 optimizer steps
                save_weights(core.encoder.resnet.state_dict(), run_dir / snapshot_name(step + 1), step + 1)

            # the per-term values stay on the device: summed there, read at log steps
            values = torch.stack([v.float() for v in stats.values()])
            names = names or list(stats)
            sums = values if sums is None else sums + values
            last = it == iters - 1
            stopping = bool(args.max_steps) and steps_done >= args.max_steps and not last
            if step % log_step == 0 or last or stopping:
                try:
                    watch.check(f" (found at epoch {epoch + 1}, step {it})")
                except FloatingPointError as e:
                    terms = dict(zip(names, values.tolist()))
                    raise FloatingPointError(f"{e}; terms at step {step}: {terms}") from None
                if info.is_main:
                    now = dict(zip(names, values.tolist()))  # one read from the device
                    bar.set_postfix(loss=f"{now['loss']:.3f}", lr=f"{lr_sched[step]:.3g}")
                    for k, v in now.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    writer.add_scalar("train/lr", lr_sched[step], step)
                    writer.add_scalar("train/momentum", mom_sched[step], step)
                    jlog.write(kind="step", epoch=epoch + 1, step=step, lr=float(lr_sched[step]),
                               momentum=float(mom_sched[step]), **now)
            if stopping:
                stopped = True
                break
        bar.close()
        if stopped:
            if info.is_main:
                log.info("stopped after --max_steps %d inside epoch %d (not checkpointed)",
                         args.max_steps, epoch + 1)
            break

        means = dict(zip(names, (sums / iters).tolist()))
        if info.is_main:
            done = epoch + 1
            state = {"kind": CKPT_KIND, "epoch": done, "global_step": done * iters, "arch": "resnet18",
                     "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "rng": {"torch": torch.get_rng_state()},
                     "config": cfg.to_dict()}
            numbered = done % cfg.checkpoint.save_epoch == 0 or done == epochs
            save_checkpoint(state, run_dir, keep_numbered=numbered)
            if done == epochs:
                save_weights(core.encoder.resnet.state_dict(), finished, done * iters)
            jlog.write(kind="epoch", epoch=done, seconds=round(time.time() - t_epoch, 2), **means)
            log.info("epoch %d/%d  loss %.4f  (%.1fs)", done, epochs, means.get("loss", float("nan")),
                     time.time() - t_epoch)
        du.barrier()

    if writer is not None:
        writer.close()
    jlog.close()
    if info.is_main:
        log.info("done: checkpoints and logs in %s", run_dir)
    return run_dir
