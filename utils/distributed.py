"""One distributed initialisation for every launcher.

* ``torchrun`` (single or multi node) and ``python -m torch.distributed.launch``
  set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (the old launcher also passes
  ``--local-rank=N``, which scripts accept and ignore in favour of the env).
* SLURM ``srun`` sets ``SLURM_PROCID``/``SLURM_NTASKS`` (``MASTER_ADDR``/``MASTER_PORT``
  must be exported by the job script).
* Anything else is a plain single-process run on one GPU or the CPU.

The backend is NCCL when CUDA is available, gloo otherwise. Collectives in this
module degrade to no-ops in a single process, so callers never branch on it.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed_mode(device: str | None = None) -> DistInfo:
    """Initialise the process group if a launcher asked for one; pick the device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("RANK", str(rank))
        env.setdefault("WORLD_SIZE", str(world))
    else:
        rank, world, local = 0, 1, 0

    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every process along dim 0 (no gradient); identity in one process.

    All processes must pass tensors of the same shape.
    """
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def main_decides(check) -> None:
    """Run ``check()`` on the main process only and make every process agree on the outcome:
    a DataError it raises is raised on every rank (so no rank waits at a collective for a
    main process that has stopped); in one process it is just ``check()``."""
    from utils.io import DataError

    if not is_dist():
        check()
        return
    message = [""]
    if dist.get_rank() == 0:
        try:
            check()
        except DataError as e:
            message = [str(e)]
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise DataError(message[0])


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- #
# devices and seeds (the one copy every stage uses)
# --------------------------------------------------------------------------- #
def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch dict to ``device`` (other values pass through)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
