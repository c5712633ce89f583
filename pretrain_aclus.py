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
(:mod:`pretraining.augment`); autocast in bf16 where the GPU has it (``amp.dtype``);
channels-last encoders (``amp.channels_last``), optionally compiled (``amp.compile``);
LARS's multi-tensor (foreach) update on CUDA. No step reads a value back from the device:
the loss and the per-term values are read at log steps only (:class:`NonFiniteWatch`).
"""
from __future__ import annotations

import argparse
import logging
import sys

from pretraining.config import ConfigError, load_config
from pretraining.loop import train
from utils import distributed as du
from utils.flags import AT_LEAST_0, check_flag_ranges
from utils.io import DataError
from utils.stage_files import ENCODER_NAME


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
