"""Pre-training configuration: a typed schema of frozen dataclasses, built and checked once at load
(the machinery: :mod:`utils.config`).

    cfg = load_config("configs/example.yaml", ["optimizer.base_lr=0.1"])   # -> PretrainConfig
    cfg.optimizer.base_lr, cfg.data.crop_scale, cfg.model.projection.output_dim
    cfg.to_dict()                  # plain nested dict: config.yaml of a run, checkpoints' "config"

The key names are those of the original ACLUS ``configs/example.yaml``, so an existing
file still loads. Every key a file may hold is a field of :class:`PretrainConfig` (its
sections below); an unknown or misspelled key is a :class:`ConfigError` naming the file,
the key and the closest valid name. A file may leave out any key (its default is used);
an empty section (``log:``) is the same as an absent one.

Types and ranges are checked here, once; a failure is a one-line :class:`ConfigError`
that names the file, the ``-o`` override when the value came from one, and the dotted
key, e.g. ``configs/x.yaml (override 'optimizer.base_lr=abc'): 'optimizer.base_lr' must
be a number, got 'abc'``. Conversions:

* floats take ints, and strings that parse as a number: PyYAML follows YAML 1.1, which
  reads ``1e-6`` or ``1e30`` (an exponent without a dot) as a STRING; only ``1.0e-6`` is
  a float. Non-finite values (``.nan``, ``inf``) are refused.
* ints take whole numbers only (``2.5`` is refused, ``1e3`` gives 1000); booleans are
  never numbers.
* strings: an empty YAML value (``resume_path:``) is ``""``, or ``None`` for the keys that
  may be unset (``checkpoint.time_stamp``, ``log.log_dir``). In a ``-o`` override the raw
  text of a string key is used as written when YAML would read it as something else
  (``-o data.image_dir=2024`` is the folder ``2024``, not an int).
* ``data.crop_scale``: a list of 2 numbers, held as a tuple; ``checkpoint.snapshot_fractions``
  a list of numbers in (0, 1), held as a tuple.

Legacy keys of the upstream file that the code here does not read:

* ignored (accepted; when a file or override sets one to anything but its default, ONE
  warning of the ``pretraining.config`` logger lists them all, on rank 0; see :func:`ignored_keys`):
    - ``model.projection.type``, ``model.predictor.type``: the heads are always the MLP
      of ``models/backbone.py``;
    - ``data.val_batch_size``: pre-training has no validation pass;
    - ``loss.pool_size``: each scale's pooling grid is its own feature map;
    - ``checkpoint.time_stamp``: only read when ``checkpoint.ckpt_path`` holds the
      upstream pattern ``ckpt/{}/...`` (see :func:`run_dir`); ignored otherwise;
    - ``log.log_all``, ``log.enable_wandb``: logs go to ``log.jsonl`` and TensorBoard;
    - ``distributed``: the launcher's environment (torchrun / torch.distributed.launch)
      decides.
* fixed (read nowhere either, but only the one value that the code implements is
  accepted, so that a file asking for something else fails instead of running
  something it did not ask for): ``model.backbone.type`` (resnet18), ``optimizer.type``
  (lars), ``optimizer.lr_type`` (cosine), ``data.dual_views`` (true), ``stage`` (train).

The head sizes are checked here as well: ``model.projection.input_dim`` is the FPN width
(256), and ``model.predictor.input_dim`` and ``output_dim`` equal
``model.projection.output_dim`` (the prediction is compared with the target's projection).

Constructing the dataclasses directly checks nothing: :func:`load_config`,
:meth:`PretrainConfig.from_dict` and :meth:`PretrainConfig.with_values` (``with_method``)
are the checked ways in.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from models.methods import METHODS
from utils.config import (ConfigError, build, config_key, merge, override_value, plain,
                          read_yaml, schema, set_key)

__all__ = ["ConfigError", "DEFAULTS", "FPN_WIDTH", "PretrainConfig", "apply_override", "ignored_keys",
           "load_config", "run_dir"]

log = logging.getLogger(__name__)

#: channels of every FPN level (models.backbone.FPN_DIM; not imported: this module needs no torch)
FPN_WIDTH = 256


# --------------------------------------------------------------------------- #
# the schema (field order = the order of config.yaml and of configs/example.yaml)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class BackboneConfig:
    type: str = config_key("resnet18", choices=("resnet18",), legacy="fixed")
    pretrained: bool = False                  # torchvision's ImageNet weights for the ResNet-18


@dataclass(frozen=True)
class HeadConfig:
    """An MLP head: input_dim -> hidden_dim -> output_dim (Linear, BatchNorm, ReLU, Linear)."""
    type: str = config_key("MLP", legacy="ignored")
    input_dim: int = config_key(256, gt=0)          # projection: the FPN width (the C5 projector takes 512)
    hidden_dim: int = config_key(1024, gt=0)
    output_dim: int = config_key(256, gt=0)


@dataclass(frozen=True)
class ModelConfig:
    # aclus = DetCon-B + anatomy context prediction; detcon = no context term;
    # byol = classic BYOL (pooled C5); byol_fpn = BYOL's loss on whole-image regions
    # at the 4 scales (models/methods.py)
    method: str = config_key("aclus", choices=tuple(METHODS))
    base_momentum: float = config_key(0.99, ge=0, le=1)   # target EMA, cosine-increased to 1
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projection: HeadConfig = field(default_factory=HeadConfig)
    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(hidden_dim=4096))


@dataclass(frozen=True)
class AmpConfig:
    """How the step computes (mixed precision, memory format, compilation)."""
    sync_bn: bool = True                      # SyncBatchNorm under multi-GPU DDP (CUDA only)
    # O0 = fp32; O1, O2 and O3 all mean the same here: autocast in amp.dtype
    opt_level: str = config_key("O0", choices=("O0", "O1", "O2", "O3"))
    # the autocast dtype when opt_level is not O0: auto = bf16 on a GPU with native bf16 (no
    # GradScaler), else fp16 + GradScaler; the CPU runs fp32 unless bf16 is asked for here
    dtype: str = config_key("auto", choices=("auto", "bf16", "fp16"))
    channels_last: bool = True                # CUDA: encoders and views in channels-last memory format
    compile: bool = False                     # torch.compile the encoders (eager when it fails)


@dataclass(frozen=True)
class DataConfig:
    image_dir: str = config_key("./dataset", nonempty=True)    # folder with <subset>_tf_img_to_gt.pkl and masks/
    subset: str = config_key("train", nonempty=True)
    mask_type: str = config_key("gt", choices=("gt", "whole"))  # gt = anatomy masks (e.g. A-SAM's); whole = one mask
    resize_size: int = config_key(224, gt=0)                    # side of each view
    crop_scale: tuple[float, float] = (0.08, 1.0)         # RandomResizedCrop scale (paper text: 0.2-1)
    data_workers: int = config_key(8, ge=0)
    train_batch_size: int = config_key(32, gt=0)                # per process
    val_batch_size: int = config_key(16, legacy="ignored")      # pre-training has no validation pass
    dual_views: bool = config_key(True, legacy="fixed")         # the method needs two views
    num_examples: int = config_key(0, ge=0)                     # >0: use only the first N pairs
    # memory = decode every frame and mask once, before the first epoch, and keep them in RAM
    # (shared with the loader workers); none = read the files for every sample
    cache: str = config_key("memory", choices=("memory", "none"))
    # label ids per image, 0 included: the loader numbers each mask's ids 0..n-1 (in order, 0
    # kept) and refuses a mask with more; the step's fixed bound (masks travel as uint8)
    max_mask_ids: int = config_key(64, gt=0, le=256)


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = config_key("lars", choices=("lars",), legacy="fixed")
    base_lr: float = config_key(0.3, gt=0)                      # lr = base_lr * global_batch / 256
    lr_type: str = config_key("cosine", choices=("cosine",), legacy="fixed")
    momentum: float = config_key(0.9, ge=0, lt=1)
    weight_decay: float = config_key(1.0e-6, ge=0)
    total_epochs: int = config_key(300, gt=0)
    warmup_epochs: float = config_key(3, ge=0)                  # < total_epochs; may be a fraction
    exclude_bias_and_bn: bool = True


@dataclass(frozen=True)
class LossConfig:
    temperature: float = config_key(0.1, gt=0)
    mask_rois: int = config_key(16, gt=0)                       # K mask ids sampled per image and scale
    pool_size: int = config_key(7, legacy="ignored")            # each scale's grid comes from its feature map
    sample_by: str = config_key("uniform", choices=("uniform", "area"))   # uniform (upstream code) | area (paper)
    include_background: bool = True           # label 0 (no anatomy) is one more region, as upstream
    context_weight: float = config_key(1.0, ge=0)               # lambda_ctx
    context_loss: str = config_key("cosine", choices=("cosine", "mse"))   # cosine (2 - 2 cos) | mse (nn.MSELoss)
    # BatchNorm of the overlap pass: batch = each branch's own batch statistics, running statistics
    # left untouched; running = inference mode (measured trivial: docs/results/context_task.json)
    context_batchnorm: str = config_key("batch", choices=("batch", "running"))


@dataclass(frozen=True)
class CheckpointConfig:
    time_stamp: str | None = config_key(None, legacy="ignored")  # only with a legacy "ckpt/{}/..." ckpt_path
    resume_path: str = ""                     # a checkpoint file, or "auto" = latest in the run dir
    save_epoch: int = config_key(20, gt=0)
    snapshot_fractions: tuple[float, ...] = ()  # also write the encoder after these shares of the run's steps
    ckpt_path: str = config_key("ckpt/aclus", nonempty=True)    # the run directory (legacy "ckpt/{}/..." accepted)


@dataclass(frozen=True)
class LogConfig:
    log_step: int = config_key(10, gt=0)
    log_dir: str | None = None                # TensorBoard; None = <run dir>/tb
    log_all: bool = config_key(False, legacy="ignored")
    enable_wandb: bool = config_key(False, legacy="ignored")


@dataclass(frozen=True)
class PretrainConfig:
    """The whole pre-training configuration. Build it with :func:`load_config`,
    :meth:`from_dict` or :meth:`with_values`, which check it; the constructor checks nothing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    stage: str = config_key("train", choices=("train",), legacy="fixed")
    distributed: bool = config_key(True, legacy="ignored")      # the launcher's environment decides
    seed: int = config_key(0, ge=0, le=2 ** 32 - 1)           # numpy's seed range

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<config>") -> PretrainConfig:
        """A checked config from a (partial) nested dict such as :meth:`to_dict`'s output;
        absent keys take their defaults."""
        return _build(merge(DEFAULTS, dict(data), source), source, {})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of dicts, lists, numbers, strings and None (YAML- and
        ``torch.load(weights_only=True)``-safe)."""
        return plain(self)

    def with_values(self, changes: Mapping[str, Any], source: str = "<with_values>") -> PretrainConfig:
        """A checked copy with ``{"dotted.key": value}`` changes (converted like file values)."""
        raw, sources = self.to_dict(), {}
        for dotted, value in changes.items():
            set_key(raw, dotted, value, source, sources, _LEAVES)
        return _build(raw, source, sources)

    def with_method(self, method: str) -> PretrainConfig:
        """The same config for another pre-training method (see ``models/methods.py``)."""
        return self.with_values({"model.method": method})


#: dotted key -> (field, type) of every leaf
_LEAVES: dict[str, tuple[dataclasses.Field, Any]] = {k: (f, t) for k, f, t in schema(PretrainConfig)}
#: the defaults as a plain nested dict (every valid key name)
DEFAULTS: dict[str, Any] = PretrainConfig().to_dict()


def _check_relations(cfg: PretrainConfig, where: Callable[..., str]) -> None:
    """Checks between keys. ``where(*keys)``: the source to name (an override's when one of
    the keys came from one)."""
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{where('data.crop_scale')}: 'data.crop_scale' must be [lo, hi] with "
                          f"0 < lo <= hi <= 1, got {list(cfg.data.crop_scale)}")
    bad = [f for f in cfg.checkpoint.snapshot_fractions if not 0 < f < 1]
    if bad:
        raise ConfigError(f"{where('checkpoint.snapshot_fractions')}: 'checkpoint.snapshot_fractions' must lie "
                          f"in (0, 1) (shares of the run's steps; the end is always written), got {bad[0]!r}")
    opt = cfg.optimizer
    if opt.warmup_epochs >= opt.total_epochs:
        raise ConfigError(f"{where('optimizer.warmup_epochs', 'optimizer.total_epochs')}: "
                          f"'optimizer.warmup_epochs' must be < 'optimizer.total_epochs' "
                          f"(got {opt.warmup_epochs} and {opt.total_epochs})")
    if not cfg.data.dual_views:
        raise ConfigError(f"{where('data.dual_views')}: 'data.dual_views: false' is not supported "
                          f"(the method needs two views)")
    proj, pred = cfg.model.projection, cfg.model.predictor
    if proj.input_dim != FPN_WIDTH:
        raise ConfigError(f"{where('model.projection.input_dim')}: 'model.projection.input_dim' must be "
                          f"{FPN_WIDTH} (the FPN width), got {proj.input_dim}")
    for name in ("input_dim", "output_dim"):
        if getattr(pred, name) != proj.output_dim:
            key = f"model.predictor.{name}"
            raise ConfigError(f"{where(key, 'model.projection.output_dim')}: '{key}' must equal "
                              f"'model.projection.output_dim' ({getattr(pred, name)} != {proj.output_dim}; "
                              f"the prediction is compared with the target projection)")


def _build(raw: dict, source: str, sources: Mapping[str, str]) -> PretrainConfig:
    """Convert and check the merged nested dict ``raw`` (:func:`utils.config.build`), then the
    checks between keys; ``sources``: dotted key -> the override it came from."""
    return build(PretrainConfig, raw, source, sources, _check_relations)


# --------------------------------------------------------------------------- #
# reading files and overrides
# --------------------------------------------------------------------------- #
def apply_override(raw: dict, item: str, source: str = "<override>", sources: dict[str, str] | None = None) -> None:
    """Apply one ``a.b.c=value`` override in place to the nested dict ``raw`` (not yet
    checked: :func:`load_config` checks the result)."""
    if "=" not in item:
        raise ConfigError(f"{source}: overrides look like 'optimizer.base_lr=0.1'")
    dotted, text = item.split("=", 1)
    kind = _LEAVES.get(dotted.strip(), (None, None))[1]
    set_key(raw, dotted, override_value(dotted, text, source, kind), source, {} if sources is None else sources,
            _LEAVES)


def ignored_keys(cfg: PretrainConfig) -> list[str]:
    """The legacy keys that ``cfg`` sets to something other than their default: they are
    read nowhere, so the value has no effect (see the module docstring)."""
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    now, default = flat(cfg.to_dict()), flat(DEFAULTS)
    keys = [k for k, (f, _) in _LEAVES.items() if f.metadata.get("legacy") == "ignored" and now[k] != default[k]]
    if "{" in cfg.checkpoint.ckpt_path:  # the upstream pattern: the time stamp names the run folder
        keys = [k for k in keys if k != "checkpoint.time_stamp"]
    return keys


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a YAML config, fill in defaults, apply ``key.sub=value`` overrides, convert and
    check every value. Legacy keys set to a non-default value are listed in one warning
    (on rank 0 only under a distributed launcher)."""
    path = Path(path)
    user = read_yaml(path)
    raw, sources = merge(DEFAULTS, user, str(path)), {}
    for item in overrides or []:
        apply_override(raw, item, f"{path} (override '{item}')", sources)
    cfg = _build(raw, str(path), sources)
    ignored = ignored_keys(cfg)
    if ignored and os.environ.get("RANK", "0") == "0":  # every process loads the config
        log.warning("%s: legacy key(s) ignored here (no effect): %s", path, ", ".join(ignored))
    return cfg


def run_dir(cfg: PretrainConfig) -> Path:
    """The folder of checkpoints and logs of this run.

    ``checkpoint.ckpt_path`` is a directory; the upstream pattern
    ``ckpt/{}/{}_{}_{}.pth.tar`` is read as ``ckpt/<time_stamp or 'run'>``.
    """
    ck = cfg.checkpoint
    path = ck.ckpt_path
    if "{" in path:
        path = os.path.join(path.split("{", 1)[0], ck.time_stamp or "run")
    return Path(path)
