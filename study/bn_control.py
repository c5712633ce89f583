#!/usr/bin/env python
"""The BatchNorm-statistics control arm of the study: random-init weights, corpus statistics.

    python -m study.bn_control --frames <study>/frames --out <study>/runs/bn_control/encoder_resnet18.pth \\
        --seed 0 --img_size 112

A pre-trained encoder differs from its random start in two ways: its weights, and the
running statistics of its BatchNorm layers, which now describe the pre-training frames.
The second alone moves a linear probe (a random ResNet-18 normalised with ultrasound
statistics is another feature extractor). This arm keeps the start's weights (the same
``torch.manual_seed(seed)`` initialisation as ``pretrain_aclus.py``'s model) and replaces
only the BatchNorm statistics by the corpus's, so that a pre-training arm can be compared
with what its statistics alone would give.

``--statistics start`` writes the start itself (the random-init arm of the same seed, so
that every arm of a seed is paired with the random encoder its pre-training began from).

Writes a torchvision ``resnet18`` state dict without ``fc`` (as ``encoder_resnet18.pth``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.backbone import MultiScaleEncoder  # noqa: E402
from models.encoder_io import NORM_MEAN, NORM_STD  # noqa: E402
from utils import mask_layout as layout  # noqa: E402
from utils.flags import AT_LEAST_1, SEED, Range, check_flag_ranges  # noqa: E402
from utils.io import DataError, atomic_torch_save, ensure_writable_dir, read_image  # noqa: E402


def start_encoder(seed: int) -> nn.Module:
    """The ResNet-18 of a pre-training run's model at step 0 (its first module built)."""
    torch.manual_seed(seed)
    return MultiScaleEncoder(fpn=False).resnet


@torch.no_grad()
def corpus_statistics(model: nn.Module, batches) -> nn.Module:
    """Set every BatchNorm layer's running mean / variance to the cumulative average over
    ``batches`` ((B, 3, S, S) normalised float tensors); the weights do not change."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for x in batches:
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def frame_batches(frames: Path, img_size: int, batch_size: int):
    """The corpus frames, resized to ``img_size`` and normalised as every encoder input."""
    import cv2

    paths = [e.path for e in layout.find_images(frames)]
    if not paths:
        raise DataError(f"{frames}: no frames under <Sub>/img/")
    mean = torch.tensor(NORM_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(NORM_STD).view(1, 3, 1, 1)
    # nearly equal chunks: no trailing batch of one image (BatchNorm needs two in train mode)
    for chunk in np.array_split(np.arange(len(paths)), max(1, len(paths) // batch_size)):
        imgs = [cv2.resize(read_image(paths[i], "rgb"), (img_size, img_size), interpolation=cv2.INTER_AREA)
                for i in chunk]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255.0)
        yield (x - mean) / std


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", help="folder with <Sub>/img/ (the pre-training frames; --statistics corpus)")
    p.add_argument("--out", required=True, help="encoder state dict to write (encoder_resnet18.pth)")
    p.add_argument("--seed", type=int, default=0, help="the pre-training seed whose start is kept")
    p.add_argument("--img_size", type=int, default=112, help="frame side, as in pre-training")
    p.add_argument("--batch_size", type=int, default=32, help="frames per forward pass (>= 2)")
    p.add_argument("--statistics", choices=("corpus", "start"), default="corpus",
                   help="corpus: BatchNorm statistics of --frames (the control arm); start: the random "
                        "start unchanged (the random-init arm)")
    a = p.parse_args(argv)
    if a.statistics == "corpus" and not a.frames:
        p.error("--frames is required with --statistics corpus")
    try:
        # BatchNorm statistics need two frames
        check_flag_ranges(a, {"--seed": SEED, "--img_size": AT_LEAST_1, "--batch_size": Range(2)})
        ensure_writable_dir(Path(a.out).parent, "--out (its folder)")
        model = start_encoder(a.seed)
        if a.statistics == "corpus":
            model = corpus_statistics(model, frame_batches(Path(a.frames), a.img_size, a.batch_size))
    except DataError as e:
        print(f"bn_control: error: {e}", file=sys.stderr)
        return 2
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    atomic_torch_save(state, a.out)
    what = f"the BatchNorm statistics of {a.frames}" if a.statistics == "corpus" else "its initial statistics"
    print(f"wrote {a.out}: random-init (seed {a.seed}) weights with {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
