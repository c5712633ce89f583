"""The pre-training optimizer: LARS without decay on biases and norms, BYOL / DetCon's linear
lr scaling, and the per-step lr and target-momentum schedules (:mod:`pretraining.schedules`)."""
from __future__ import annotations

import numpy as np
import torch
from timm.optim import Lars

from pretraining.config import PretrainConfig
from pretraining.schedules import byol_momentum, warmup_cosine


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
