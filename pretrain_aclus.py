#!/usr/bin/env python
"""Stage 5: ACLUS pre-training of a ResNet-18 on images + anatomy masks.

    python pretrain_aclus.py --cfg configs/example.yaml                        # one GPU or CPU
    torchrun --nproc_per_node 2 pretrain_aclus.py --cfg configs/example.yaml   # DDP
    python -m torch.distributed.launch --nproc_per_node 2 --master_port 12345 \\
        pretrain_aclus.py --cfg configs/example.yaml                            # old launcher

Writes to the run directory (``checkpoint.ckpt_path``): ``latest.pth`` every epoch,
``checkpoint_NNNN.pth`` every ``save_epoch`` epochs, ``encoder_resnet18.pth`` at the end
(loads into ``torchvision.models.resnet18`` with every key but ``fc``; a folder that holds
one is never trained over again without ``--overwrite``), the encoder after given
shares of the steps (``checkpoint.snapshot_fractions`` -> ``encoder_resnet18_step<N>.pth``),
``log.jsonl``,
``config.yaml`` and TensorBoard files under ``tb/``. ``--resume auto`` (or
``checkpoint.resume_path: auto``) continues a killed run from its newest good checkpoint.
A run owns its folder while it runs (``run.lock``, :mod:`utils.run_lock`): a second run on
it is refused. No weights file is written with a NaN or an infinity in it.

Throughput (one GPU at paper scale): the frames are decoded once into RAM
(``data.cache``); the loader workers only crop, flip and resize; the photometric
augmentation and the Models-Genesis damage run batched on the device inside the step
(:mod:`utils.gpu_augment`); autocast in bf16 where the GPU has it (``amp.dtype``);
channels-last encoders (``amp.channels_last``), optionally compiled (``amp.compile``);
LARS's multi-tensor (foreach) update on CUDA. No step reads a value back from the device:
the loss and the per-term values are read at log steps only (:class:`NonFiniteWatch`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from timm.optim import Lars
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.aclus import ACLUS, build_model
from models.encoder_io import PRETRAIN_KIND
from models.methods import get_method
from utils import distributed as du
from utils.checkpoint import find_resume_checkpoint, nonfinite_entries, save_checkpoint
from utils.config import AmpConfig, ConfigError, PretrainConfig, load_config, run_dir as config_run_dir
from utils.distributed import to_device
from utils.gpu_augment import augment_batch, is_crop_batch
from utils.flags import AT_LEAST_0, check_flag_ranges
from utils.io import DataError, atomic_torch_save, atomic_write, ensure_writable_dir
from utils.pretrain_data import AnatomyPairDataset, EpochSampler, load_pairs
from utils.run_lock import RunLock
from utils.schedules import byol_momentum, warmup_cosine

CKPT_KIND = PRETRAIN_KIND  # the one tag, read by models/encoder_io.py too
ENCODER_NAME = "encoder_resnet18.pth"  # the finished run's encoder
log = logging.getLogger("pretrain")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="YAML config (see configs/example.yaml)")
    p.add_argument("--resume", default=None,
                   help="'auto' = newest good checkpoint of the run dir, or a checkpoint file "
                        "(overrides checkpoint.resume_path)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -o optimizer.total_epochs=10 (repeatable)")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by torch.distributed.launch; LOCAL_RANK env is used
    p.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many optimizer steps in this run (smoke tests, benchmarks)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"train again in a run folder that holds a finished {ENCODER_NAME} (replaced at the end)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- #
# building blocks
# --------------------------------------------------------------------------- #
def lars_param_groups(model: torch.nn.Module, weight_decay: float, exclude_bias_and_bn: bool) -> list[dict]:
    """Biases and normalisation parameters (1-D) get no weight decay and, with timm's
    LARS, no trust-ratio adaptation either (it adapts only where weight_decay != 0)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_bn and p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of BYOL / DetCon: lr = base_lr x global batch / 256."""
    return base_lr * global_batch / 256


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module, global_batch: int, iters_per_epoch: int
                    ) -> tuple[torch.optim.Optimizer, np.ndarray, np.ndarray]:
    """LARS over the online parameters, with the per-step lr and target-momentum schedules.

    Returns:
        optimizer, lr (epochs * iters,) warm-up + cosine to 0, momentum (epochs * iters + 1,)
        BYOL's cosine increase from ``base_momentum`` to 1.
    """
    opt = cfg.optimizer
    epochs = opt.total_epochs
    lr = warmup_cosine(scaled_lr(opt.base_lr, global_batch), 0.0, epochs, iters_per_epoch, opt.warmup_epochs)
    momentum = byol_momentum(cfg.model.base_momentum, epochs * iters_per_epoch)
    groups = lars_param_groups(model, opt.weight_decay, opt.exclude_bias_and_bn)
    # timm's LARS has a multi-tensor (foreach) update and no fused one; its default picks
    # foreach on CUDA already, said here so that it stays so. The CPU keeps the per-tensor loop.
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    optimizer = Lars(groups, lr=float(lr[0]), momentum=opt.momentum, trust_coeff=1e-3,
                     foreach=True if on_cuda else None)
    return optimizer, lr, momentum


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


def mask_generator(seed: int, rank: int, epoch: int, device: torch.device) -> torch.Generator:
    """The mask-id draws of one epoch: seeded by (seed, rank, epoch), so resuming needs no state."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + rank * 7_919 + epoch)
    return g


def augment_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The seed of one step's on-device augmentation: a function of (seed, rank, epoch, step),
    so a resumed run draws what an uninterrupted one does, with no generator state to save."""
    return int(np.random.SeedSequence([seed, rank, epoch, step, 0xA5C1]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- #
# precision, memory format, compilation
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Precision:
    """The step's autocast: ``dtype`` None = fp32. fp16 needs a GradScaler, bf16 does not
    (fp32's exponent range)."""
    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()

    def __str__(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + GradScaler"}[self.dtype]


def resolve_precision(amp: AmpConfig, device: torch.device) -> Precision:
    """``amp.opt_level`` / ``amp.dtype`` on ``device``: O0 is fp32. Otherwise, on CUDA, bf16
    where the GPU computes it natively (``auto``) or when asked, fp16 + GradScaler on older
    GPUs or when asked; on the CPU bf16 only when asked (``amp.dtype: bf16``), else fp32."""
    if amp.opt_level == "O0":
        return Precision(device.type)
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if amp.dtype == "bf16" and not native_bf16:
            raise ConfigError(f"'amp.dtype' is bf16 but {torch.cuda.get_device_name(device)} has no native "
                              "bf16; use auto or fp16")
        use_bf16 = amp.dtype == "bf16" or (amp.dtype == "auto" and native_bf16)
        return Precision("cuda", torch.bfloat16 if use_bf16 else torch.float16)
    if amp.dtype == "bf16":
        return Precision(device.type, torch.bfloat16)
    if amp.dtype == "fp16":
        log.warning("amp.dtype fp16 is for CUDA (with a GradScaler); the %s runs fp32", device.type)
    return Precision(device.type)


def compile_encoders(core: ACLUS) -> bool:
    """``torch.compile`` the online and target encoders in place (``nn.Module.compile``: the
    state dict keeps its keys). A failure to compile, now or at the first step, leaves
    them eager (``suppress_errors``) with a warning; returns whether compiling was set up."""
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
        for enc in (core.encoder, core.target_encoder):
            enc.compile()
    except Exception as e:  # any failure here means: run eagerly
        for enc in (core.encoder, core.target_encoder):
            enc._compiled_call_impl = None
        log.warning("amp.compile: torch.compile is not available here (%s: %s); the encoders run eagerly",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return True


def prepare_model(core: ACLUS, amp: AmpConfig, device: torch.device) -> dict[str, bool]:
    """Channels-last (CUDA) and compilation of the encoders, as the config asks; returns what is on."""
    channels_last = amp.channels_last and device.type == "cuda"
    core.set_channels_last(channels_last)
    compiled = compile_encoders(core) if amp.compile else False
    return {"channels_last": channels_last, "compile": compiled}


# --------------------------------------------------------------------------- #
# the step
# --------------------------------------------------------------------------- #
def train_step(model: torch.nn.Module, core: ACLUS, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, batch: dict[str, torch.Tensor], lr: float, momentum: float,
               generator: torch.Generator | None, precision: Precision | None = None,
               aug_generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step: the on-device augmentation of a batch of crops (when ``batch`` holds
    crops, :func:`utils.gpu_augment.augment_batch` with ``aug_generator``), forward (``model``
    may be the DDP wrapper of ``core``) under ``precision``'s autocast, backward, LARS update
    at ``lr``, then the target EMA at ``momentum``, once.

    Nothing is read back to the host (with fp16, GradScaler.step reads its inf check, once).

    Returns:
        the loss (a detached 0-dim tensor on the device, possibly non-finite: see
        :class:`NonFiniteWatch`) and the detached per-term values.
    """
    precision = precision or Precision()
    for group in optimizer.param_groups:
        group["lr"] = lr
    if is_crop_batch(batch):
        batch = augment_batch(batch, aug_generator)  # fp32, outside autocast
    with precision.autocast():
        loss, stats = model(batch, generator)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    core.update_target(momentum)  # once per optimizer step
    return loss.detach(), stats


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was not finite; read only when asked.

    The trade-off against a check every step: the loss stays on the device (no
    synchronisation per step), and a non-finite loss is found at the next log step, up to
    ``log.log_step - 1`` steps late, by which time the weights are non-finite too. It is
    never saved: the last step of every epoch is a log step and is checked before the
    checkpoint, so the run stops with the last good checkpoint on disk, and the error
    names the step where the loss first went bad.
    """

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Record ``step`` if its ``loss`` is the first non-finite one (device-side)."""
        first_bad = ~torch.isfinite(loss) & (self.first < 0)
        self.first = torch.where(first_bad, step, self.first)

    def check(self, where: str = "") -> None:
        """Raise FloatingPointError if a recorded loss was not finite (one read from the device)."""
        first = int(self.first)
        if first >= 0:
            raise FloatingPointError(f"non-finite loss at step {first}{where}")


def snapshot_steps(fractions: tuple[float, ...], total_steps: int) -> set[int]:
    """The step counts after which an encoder snapshot is written: each fraction of
    ``total_steps``, rounded to the nearest step (at least 1, before the end)."""
    return {min(max(1, round(f * total_steps)), total_steps - 1) for f in fractions if total_steps > 1}


def save_weights(state: dict[str, torch.Tensor], path: Path, step: int) -> None:
    """Write an encoder state dict atomically, never one with a NaN or an infinity in it:
    that is a FloatingPointError naming the step, and the file is not written."""
    bad = nonfinite_entries(state)
    if bad:
        raise FloatingPointError(f"non-finite weights after step {step} ({len(bad)} tensors, e.g. {bad[0]!r}); "
                                 f"{path.name} not written")
    atomic_torch_save(state, path)


def snapshot_name(steps: int) -> str:
    """``encoder_resnet18_step<steps>.pth``: the encoder after ``steps`` optimizer steps
    (evaluation reads it like ``encoder_resnet18.pth``; a snapshot cannot resume a run)."""
    return f"encoder_resnet18_step{steps}.pth"


def records_before(lines: list[str], step: int, epoch: int) -> list[str]:
    """The lines of a ``log.jsonl`` that a run resumed at ``step`` (epoch ``epoch``) keeps:
    step records before ``step`` and epoch records up to ``epoch``; the killed attempt's
    later records are dropped so that curves get no duplicate points."""
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if (rec.get("kind") == "step" and rec.get("step", step) < step) or \
                (rec.get("kind") == "epoch" and rec.get("epoch", epoch + 1) <= epoch):
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


def write_run_config(run_dir: Path, cfg: PretrainConfig) -> Path:
    """Write the resolved config as ``config.yaml``, or beside an existing different one
    (``config.1.yaml``, ...): the config a finished run was made with is never replaced."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    path, n = run_dir / "config.yaml", 0
    while path.is_file() and path.read_text() != text:
        n += 1
        path = run_dir / f"config.{n}.yaml"
    if not path.is_file():
        atomic_write(path, lambda f: f.write(text.encode()))
    return path


class JsonLog:
    """Append-only JSON-lines log next to the checkpoints (rank 0 only).

    ``resume_step``/``resume_epoch``: the run continues from a checkpoint; records the
    killed attempt wrote after it are dropped first (:func:`records_before`).
    """

    def __init__(self, path: Path | None, resume_step: int | None = None, resume_epoch: int = 0):
        if path and resume_step is not None and path.is_file():
            kept = records_before(path.read_text().splitlines(keepends=True), resume_step, resume_epoch)
            atomic_write(path, lambda f: f.write("".join(kept).encode()))
        self.f = open(path, "a") if path else None

    def write(self, **record) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
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


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        check_flag_ranges(args, {"--local-rank": AT_LEAST_0, "--max_steps": AT_LEAST_0})
        cfg = load_config(args.cfg, args.override)
        train(cfg, args)
    except (ConfigError, DataError) as e:
        print(f"pretrain_aclus.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"pretrain_aclus.py: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
