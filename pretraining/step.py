"""One pre-training step and what seeds it: the on-device augmentation, forward, backward,
LARS update and target EMA, with per-(seed, rank, epoch, step) generators so that a resumed
run draws what an uninterrupted one does; a device-side watch for non-finite losses."""
from __future__ import annotations

import numpy as np
import torch

from models.aclus import ACLUS
from pretraining.augment import augment_batch, is_crop_batch
from pretraining.precision import Precision


def mask_generator(seed: int, rank: int, epoch: int, device: torch.device) -> torch.Generator:
    """The mask-id draws of one epoch: seeded by (seed, rank, epoch), so resuming needs no state."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + rank * 7_919 + epoch)
    return g


def augment_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The seed of one step's on-device augmentation: a function of (seed, rank, epoch, step),
    so a resumed run draws what an uninterrupted one does, with no generator state to save."""
    return int(np.random.SeedSequence([seed, rank, epoch, step, 0xA5C1]).generate_state(1, np.uint64)[0] >> 1)


def train_step(model: torch.nn.Module, core: ACLUS, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, batch: dict[str, torch.Tensor], lr: float, momentum: float,
               generator: torch.Generator | None, precision: Precision | None = None,
               aug_generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step: the on-device augmentation of a batch of crops (when ``batch`` holds
    crops, :func:`pretraining.augment.augment_batch` with ``aug_generator``), forward (``model``
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
