"""Pre-training configuration: YAML with declared keys, defaults and checks.

The key names of the original ``configs/example.yaml`` are kept so that an
existing file still loads. Every key a file may hold is declared in
:data:`DEFAULTS`; an unknown or misspelled key is a :class:`ConfigError` naming
the file, the key and the closest valid name.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from models.methods import METHODS


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


DEFAULTS: dict[str, Any] = {
    "model": {
        # aclus = DetCon-B + anatomy context prediction; detcon = no context term;
        # byol = classic BYOL (pooled C5); byol_fpn = BYOL's loss on whole-image regions
        # at the 4 scales (models/methods.py)
        "method": "aclus",
        "base_momentum": 0.99,
        "backbone": {"type": "resnet18", "pretrained": False},
        # projector of the FPN scales (256-d); the C5 projector takes 512-d input
        "projection": {"type": "MLP", "input_dim": 256, "hidden_dim": 1024, "output_dim": 256},
        "predictor": {"type": "MLP", "input_dim": 256, "hidden_dim": 4096, "output_dim": 256},
    },
    "amp": {"sync_bn": True, "opt_level": "O0"},  # O0 = fp32; O1/O2 = fp16 autocast on CUDA
    "data": {
        "image_dir": "./dataset",        # folder with <subset>_tf_img_to_gt.pkl and masks/
        "subset": "train",
        "mask_type": "gt",               # gt = anatomy masks; whole = one whole-image mask
        "resize_size": 224,              # side of each view
        "crop_scale": [0.08, 1.0],       # RandomResizedCrop scale (paper text: 0.2-1)
        "data_workers": 8,
        "train_batch_size": 32,          # per process
        "val_batch_size": 16,            # unused by pre-training; kept for old files
        "dual_views": True,
        "num_examples": 0,               # >0: use only the first N pairs
    },
    "optimizer": {
        "type": "lars",
        "base_lr": 0.3,                  # lr = base_lr * global_batch / 256
        "lr_type": "cosine",
        "momentum": 0.9,
        "weight_decay": 1.0e-6,
        "total_epochs": 300,
        "warmup_epochs": 3,
        "exclude_bias_and_bn": True,
    },
    "loss": {
        "temperature": 0.1,
        "mask_rois": 16,                 # K mask ids sampled per image and scale
        "pool_size": 7,                  # legacy: each scale's grid comes from its feature map
        "sample_by": "uniform",          # uniform (upstream code) | area (paper text)
        "include_background": True,      # label 0 (no anatomy) is one more region, as upstream
        "context_weight": 1.0,           # lambda_ctx
        "context_loss": "cosine",        # cosine (2 - 2 cos) | mse (upstream nn.MSELoss)
    },
    "checkpoint": {
        "time_stamp": None,
        "resume_path": "",               # a checkpoint file, or "auto" = latest in the run dir
        "save_epoch": 20,
        "ckpt_path": "ckpt/aclus",       # run directory (legacy "ckpt/{}/..." patterns accepted)
    },
    "log": {"log_step": 10, "log_dir": None, "log_all": False, "enable_wandb": False},
    "stage": "train",
    "distributed": True,                 # legacy; torchrun/launch environment decides
    "seed": 0,
}

_CHOICES = {
    ("model", "method"): tuple(METHODS),
    ("model", "backbone", "type"): ("resnet18",),
    ("data", "mask_type"): ("gt", "whole"),
    ("optimizer", "type"): ("lars",),
    ("optimizer", "lr_type"): ("cosine",),
    ("loss", "sample_by"): ("uniform", "area"),
    ("loss", "context_loss"): ("cosine", "mse"),
    ("loss", "include_background"): (True, False),
    ("amp", "opt_level"): ("O0", "O1", "O2", "O3"),
    ("stage",): ("train",),
}


def _merge(defaults: dict, user: dict, source: str, prefix: str = "") -> dict:
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{dotted}'{hint}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            out[key] = _merge(defaults[key], value, source, dotted + ".")
        else:
            out[key] = value
    return out


def _get(cfg: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        cfg = cfg[p]
    return cfg


def validate(cfg: dict, source: str = "<config>") -> dict:
    """Check choices and value ranges; returns ``cfg`` unchanged."""
    for path, choices in _CHOICES.items():
        value = _get(cfg, path)
        if value not in choices:
            raise ConfigError(f"{source}: '{'.'.join(path)}' is {value!r}; expected one of {list(choices)}")
    positive = [("data", "resize_size"), ("data", "train_batch_size"), ("optimizer", "total_epochs"),
                ("loss", "temperature"), ("loss", "mask_rois")]
    for path in positive:
        if not (isinstance(_get(cfg, path), (int, float)) and _get(cfg, path) > 0):
            raise ConfigError(f"{source}: '{'.'.join(path)}' must be > 0, got {_get(cfg, path)!r}")
    lo, hi = cfg["data"]["crop_scale"]
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{source}: 'data.crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1")
    if cfg["optimizer"]["warmup_epochs"] >= cfg["optimizer"]["total_epochs"]:  # total > 0 checked above
        raise ConfigError(f"{source}: 'optimizer.warmup_epochs' must be < 'optimizer.total_epochs'")
    if not cfg["data"]["dual_views"]:
        raise ConfigError(f"{source}: 'data.dual_views: false' is not supported (the method needs two views)")
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Read a YAML config, fill in defaults, apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    cfg = _merge(DEFAULTS, user, str(path))
    for item in overrides or []:
        apply_override(cfg, item, source=f"{path} (override '{item}')")
    return validate(cfg, str(path))


def apply_override(cfg: dict, item: str, source: str = "<override>") -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"{source}: overrides look like 'optimizer.base_lr=0.1'")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node, defaults = cfg, DEFAULTS
    for i, k in enumerate(keys):
        if not isinstance(defaults, dict) or k not in defaults:
            options = list(defaults) if isinstance(defaults, dict) else []
            close = difflib.get_close_matches(k, options, n=1)
            hint = f" (did you mean '{'.'.join(keys[:i] + [close[0]])}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{dotted}'{hint}")
        if i == len(keys) - 1:
            node[k] = yaml.safe_load(raw)
        else:
            node, defaults = node[k], defaults[k]


def run_dir(cfg: dict) -> Path:
    """The folder of checkpoints and logs of this run.

    ``checkpoint.ckpt_path`` is a directory; the upstream pattern
    ``ckpt/{}/{}_{}_{}.pth.tar`` is read as ``ckpt/<time_stamp or 'run'>``.
    """
    ck = cfg["checkpoint"]
    path = str(ck["ckpt_path"])
    if "{" in path:
        path = os.path.join(path.split("{", 1)[0], str(ck["time_stamp"] or "run"))
    return Path(path)
