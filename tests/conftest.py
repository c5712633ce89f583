"""Shared test fixtures.

Real data lives in ``../shared/data`` beside the checkout (or wherever
``ACLUS_SHARED_DATA`` points); tests that need it skip cleanly when it is absent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED_DATA = Path(os.environ.get("ACLUS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_pretrain_dir(tmp_path_factory) -> Path:
    """A tiny pre-training folder: synthetic scans, label PNGs, mask pickles, pair list."""
    from utils.generate_masks_pkls import generate
    from utils.synthetic_us import write_pretrain_layout

    root = tmp_path_factory.mktemp("pretrain_data")
    write_pretrain_layout(root, n_images=12, size=48, seed=0)
    generate(root)
    return root


@pytest.fixture(scope="session")
def pocus_pickles_32px(tmp_path_factory) -> Path:
    """covid_data1..5.pkl: 1 video x 3 classes x 5 folds x 2 frames = 30 images, 32 px (fast protocol runs)."""
    from utils.synthetic_us import write_pocus_folds

    root = tmp_path_factory.mktemp("syn_pocus_small")
    write_pocus_folds(root, videos_per_class_per_fold=1, frames_per_video=2, size=32, seed=0)
    return root


@pytest.fixture
def tiny_asam_inputs():
    """A random-init ViT-tiny segmenter and 3-prompt auto-prompter (eval mode, seed 1) with two
    64 px images: the arguments of SAM.fast_decoder.predict_index_maps, prompts 0..2."""
    import torch

    from SAM.auto_prompter import AutoPrompter, prompter_grid
    from SAM.segmenter import build_segmenter

    torch.manual_seed(1)
    seg = build_segmenter("vit_tiny", 64, random_init=True).eval()
    prompter = AutoPrompter(3, grid=prompter_grid(seg.grid)).eval()
    images = torch.rand(2, 3, 64, 64)
    return seg, prompter, images, [0, 1, 2], [(64, 64)] * 2, [(64, 64)] * 2


def tiny_pretrain_config(tmp: Path, data_dir: Path, **sections) -> Path:
    """Write a CPU-sized config (32 px views, small heads) and return its path."""
    import yaml

    cfg = {
        "model": {"method": "aclus", "projection": {"hidden_dim": 32, "output_dim": 16},
                  "predictor": {"input_dim": 16, "hidden_dim": 32, "output_dim": 16}},
        "amp": {"opt_level": "O0"},
        "data": {"image_dir": str(data_dir), "resize_size": 32, "data_workers": 0,
                 "train_batch_size": 4, "crop_scale": [0.3, 1.0]},
        "optimizer": {"total_epochs": 2, "warmup_epochs": 1, "base_lr": 0.5},
        "loss": {"mask_rois": 4},
        "checkpoint": {"ckpt_path": str(tmp / "run"), "save_epoch": 1, "resume_path": ""},
        "log": {"log_step": 1},
        "seed": 0,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def make_pretrain_config():
    return tiny_pretrain_config


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine the SAM tests run several times faster."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
