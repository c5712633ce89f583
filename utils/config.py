"""Pre-training configuration: a typed schema of frozen dataclasses, built and checked once at load.

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
  warning of the ``utils.config`` logger lists them all, on rank 0; see :func:`ignored_keys`):
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

import copy
import dataclasses
import difflib
import logging
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, get_type_hints

import yaml

from models.methods import METHODS

log = logging.getLogger(__name__)

#: channels of every FPN level (models.backbone.FPN_DIM; not imported: this module needs no torch)
FPN_WIDTH = 256


class ConfigError(ValueError):
    """A configuration that cannot be used; the one-line message says where and why.

    Shared by the A-SAM task settings (``SAM/config.py``)."""


def _key(default: Any, *, choices: tuple = (), gt: float | None = None, ge: float | None = None,
         lt: float | None = None, le: float | None = None, nonempty: bool = False,
         legacy: str = "") -> Any:
    """A config key: its default and the checks of its value alone.

    ``legacy``: "ignored" (read nowhere; noted when set) or "fixed" (read nowhere; only the
    default is accepted, through ``choices``)."""
    meta: dict[str, Any] = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    meta = {k: v for k, v in meta.items() if v is not None}
    meta |= {"choices": choices} if choices else {}
    meta |= {"nonempty": True} if nonempty else {}
    meta |= {"legacy": legacy} if legacy else {}
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- #
# the schema (field order = the order of config.yaml and of configs/example.yaml)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class BackboneConfig:
    type: str = _key("resnet18", choices=("resnet18",), legacy="fixed")
    pretrained: bool = False                  # torchvision's ImageNet weights for the ResNet-18


@dataclass(frozen=True)
class HeadConfig:
    """An MLP head: input_dim -> hidden_dim -> output_dim (Linear, BatchNorm, ReLU, Linear)."""
    type: str = _key("MLP", legacy="ignored")
    input_dim: int = _key(256, gt=0)          # projection: the FPN width (the C5 projector takes 512)
    hidden_dim: int = _key(1024, gt=0)
    output_dim: int = _key(256, gt=0)


@dataclass(frozen=True)
class ModelConfig:
    # aclus = DetCon-B + anatomy context prediction; detcon = no context term;
    # byol = classic BYOL (pooled C5); byol_fpn = BYOL's loss on whole-image regions
    # at the 4 scales (models/methods.py)
    method: str = _key("aclus", choices=tuple(METHODS))
    base_momentum: float = _key(0.99, ge=0, le=1)   # target EMA, cosine-increased to 1
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projection: HeadConfig = field(default_factory=HeadConfig)
    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(hidden_dim=4096))


@dataclass(frozen=True)
class AmpConfig:
    """How the step computes (mixed precision, memory format, compilation)."""
    sync_bn: bool = True                      # SyncBatchNorm under multi-GPU DDP (CUDA only)
    # O0 = fp32; O1, O2 and O3 all mean the same here: autocast in amp.dtype
    opt_level: str = _key("O0", choices=("O0", "O1", "O2", "O3"))
    # the autocast dtype when opt_level is not O0: auto = bf16 on a GPU with native bf16 (no
    # GradScaler), else fp16 + GradScaler; the CPU runs fp32 unless bf16 is asked for here
    dtype: str = _key("auto", choices=("auto", "bf16", "fp16"))
    channels_last: bool = True                # CUDA: encoders and views in channels-last memory format
    compile: bool = False                     # torch.compile the encoders (eager when it fails)


@dataclass(frozen=True)
class DataConfig:
    image_dir: str = _key("./dataset", nonempty=True)    # folder with <subset>_tf_img_to_gt.pkl and masks/
    subset: str = _key("train", nonempty=True)
    mask_type: str = _key("gt", choices=("gt", "whole"))  # gt = anatomy masks (e.g. A-SAM's); whole = one mask
    resize_size: int = _key(224, gt=0)                    # side of each view
    crop_scale: tuple[float, float] = (0.08, 1.0)         # RandomResizedCrop scale (paper text: 0.2-1)
    data_workers: int = _key(8, ge=0)
    train_batch_size: int = _key(32, gt=0)                # per process
    val_batch_size: int = _key(16, legacy="ignored")      # pre-training has no validation pass
    dual_views: bool = _key(True, legacy="fixed")         # the method needs two views
    num_examples: int = _key(0, ge=0)                     # >0: use only the first N pairs
    # memory = decode every frame and mask once, before the first epoch, and keep them in RAM
    # (shared with the loader workers); none = read the files for every sample
    cache: str = _key("memory", choices=("memory", "none"))
    # label ids per image, 0 included: the loader numbers each mask's ids 0..n-1 (in order, 0
    # kept) and refuses a mask with more; the step's fixed bound (masks travel as uint8)
    max_mask_ids: int = _key(64, gt=0, le=256)


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = _key("lars", choices=("lars",), legacy="fixed")
    base_lr: float = _key(0.3, gt=0)                      # lr = base_lr * global_batch / 256
    lr_type: str = _key("cosine", choices=("cosine",), legacy="fixed")
    momentum: float = _key(0.9, ge=0, lt=1)
    weight_decay: float = _key(1.0e-6, ge=0)
    total_epochs: int = _key(300, gt=0)
    warmup_epochs: float = _key(3, ge=0)                  # < total_epochs; may be a fraction
    exclude_bias_and_bn: bool = True


@dataclass(frozen=True)
class LossConfig:
    temperature: float = _key(0.1, gt=0)
    mask_rois: int = _key(16, gt=0)                       # K mask ids sampled per image and scale
    pool_size: int = _key(7, legacy="ignored")            # each scale's grid comes from its feature map
    sample_by: str = _key("uniform", choices=("uniform", "area"))   # uniform (upstream code) | area (paper)
    include_background: bool = True           # label 0 (no anatomy) is one more region, as upstream
    context_weight: float = _key(1.0, ge=0)               # lambda_ctx
    context_loss: str = _key("cosine", choices=("cosine", "mse"))   # cosine (2 - 2 cos) | mse (nn.MSELoss)
    # BatchNorm of the overlap pass: batch = each branch's own batch statistics, running statistics
    # left untouched; running = inference mode (measured trivial: docs/results/context_task.json)
    context_batchnorm: str = _key("batch", choices=("batch", "running"))


@dataclass(frozen=True)
class CheckpointConfig:
    time_stamp: str | None = _key(None, legacy="ignored")  # only with a legacy "ckpt/{}/..." ckpt_path
    resume_path: str = ""                     # a checkpoint file, or "auto" = latest in the run dir
    save_epoch: int = _key(20, gt=0)
    snapshot_fractions: tuple[float, ...] = ()  # also write the encoder after these shares of the run's steps
    ckpt_path: str = _key("ckpt/aclus", nonempty=True)    # the run directory (legacy "ckpt/{}/..." accepted)


@dataclass(frozen=True)
class LogConfig:
    log_step: int = _key(10, gt=0)
    log_dir: str | None = None                # TensorBoard; None = <run dir>/tb
    log_all: bool = _key(False, legacy="ignored")
    enable_wandb: bool = _key(False, legacy="ignored")


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
    stage: str = _key("train", choices=("train",), legacy="fixed")
    distributed: bool = _key(True, legacy="ignored")      # the launcher's environment decides
    seed: int = _key(0, ge=0, le=2 ** 32 - 1)           # numpy's seed range

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<config>") -> PretrainConfig:
        """A checked config from a (partial) nested dict such as :meth:`to_dict`'s output;
        absent keys take their defaults."""
        return _build(_merge(DEFAULTS, dict(data), source), source, {})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of dicts, lists, numbers, strings and None (YAML- and
        ``torch.load(weights_only=True)``-safe)."""
        return _plain(self)

    def with_values(self, changes: Mapping[str, Any], source: str = "<with_values>") -> PretrainConfig:
        """A checked copy with ``{"dotted.key": value}`` changes (converted like file values)."""
        raw, sources = self.to_dict(), {}
        for dotted, value in changes.items():
            _set(raw, dotted, value, source, sources)
        return _build(raw, source, sources)

    def with_method(self, method: str) -> PretrainConfig:
        """The same config for another pre-training method (see ``models/methods.py``)."""
        return self.with_values({"model.method": method})


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


def _schema(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every leaf key of ``cls``, in field order."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


#: dotted key -> (field, type) of every leaf
_LEAVES: dict[str, tuple[dataclasses.Field, Any]] = {k: (f, t) for k, f, t in _schema(PretrainConfig)}
#: the defaults as a plain nested dict (every valid key name)
DEFAULTS: dict[str, Any] = PretrainConfig().to_dict()
_OPTIONAL_STR = str | None


# --------------------------------------------------------------------------- #
# converting and checking values
# --------------------------------------------------------------------------- #
def _number(value: Any, key: str, source: str, kind: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{source}: '{key}' must be {kind}, got {value!r}")
    try:
        x = float(value)  # str: YAML 1.1 leaves "1e-6" a string
    except (ValueError, OverflowError):
        raise ConfigError(f"{source}: '{key}' must be {kind}, got {value!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return x


def _convert(kind: Any, value: Any, key: str, source: str) -> Any:
    """``value`` as the declared type of ``key``, or a ConfigError."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if kind is float:
        return _number(value, key, source)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        x = _number(value, key, source, "an integer")
        if not x.is_integer():
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return int(x)
    if kind is str or kind == _OPTIONAL_STR:
        if value is None:
            return None if kind == _OPTIONAL_STR else ""
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r} (quote it in YAML)")
        return value
    if kind == tuple[float, float]:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{source}: '{key}' must be a list of 2 numbers, got {value!r}")
        return tuple(_number(v, key, source, "a list of 2 numbers") for v in value)
    if kind == tuple[float, ...]:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list of numbers, got {value!r}")
        return tuple(_number(v, key, source, "a list of numbers") for v in value)
    raise TypeError(f"no conversion for {key}: {kind}")  # a schema field of a new type


_BOUNDS = (("gt", ">", operator.gt), ("ge", ">=", operator.ge), ("lt", "<", operator.lt), ("le", "<=", operator.le))


def _check(meta: Mapping[str, Any], value: Any, key: str, source: str) -> None:
    """The checks of one value alone (choices, bounds, non-empty)."""
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: '{key}' is {value!r}; expected one of {list(choices)}")
    for name, symbol, ok in _BOUNDS:
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"{source}: '{key}' must be {symbol} {meta[name]}, got {value!r}")
    if meta.get("nonempty") and not value:
        raise ConfigError(f"{source}: '{key}' must not be empty")


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
    """Convert and check the merged nested dict ``raw``; ``sources``: dotted key -> the
    override it came from (other keys came from ``source``)."""
    def where(*keys: str) -> str:
        return next((sources[k] for k in keys if k in sources), source)

    def section(cls: type, node: dict, prefix: str) -> Any:
        hints = get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                values[f.name] = section(hints[f.name], node[f.name], key + ".")
            else:
                values[f.name] = _convert(hints[f.name], node[f.name], key, where(key))
                _check(f.metadata, values[f.name], key, where(key))
        return cls(**values)

    cfg = section(PretrainConfig, raw, "")
    _check_relations(cfg, where)
    return cfg


# --------------------------------------------------------------------------- #
# reading files and overrides
# --------------------------------------------------------------------------- #
def _unknown(dotted: str, name: str, known: list[str], parents: str, source: str) -> ConfigError:
    """Unknown key ``name`` (full key ``dotted``) under ``parents`` ("" or "a.b."), with the
    closest of the ``known`` names as a hint."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{parents}{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown config key '{dotted}'{hint}")


def _merge(base: dict, user: dict, source: str, prefix: str = "") -> dict:
    """A copy of ``base`` (the defaults, or values of the same keys) updated by ``user``,
    recursively; every key of ``user`` must exist in ``base``."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise _unknown(dotted, str(key), list(base), prefix, source)
        if isinstance(base[key], dict):
            if value is None:  # an empty section in YAML
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, source, dotted + ".")
        else:
            out[key] = value
    return out


def _set(raw: dict, dotted: str, value: Any, source: str, sources: dict[str, str]) -> None:
    """Set key ``a.b.c`` of the merged nested dict ``raw`` in place (a section is merged
    into, key by key) and record ``source`` for every leaf it sets."""
    dotted = dotted.strip()
    keys = dotted.split(".")
    node = raw
    for i, k in enumerate(keys):
        parents = ".".join(keys[:i]) + "." if i else ""
        if not isinstance(node, dict) or k not in node:
            raise _unknown(dotted, k, list(node) if isinstance(node, dict) else [], parents, source)
        if i < len(keys) - 1:
            node = node[k]
    last = keys[-1]
    node[last] = _merge({last: node[last]}, {last: value}, source, parents)[last]
    for key in _LEAVES:
        if key == dotted or key.startswith(dotted + "."):
            sources[key] = source


def _override_value(dotted: str, text: str, source: str) -> Any:
    """The value of ``-o key=text``: YAML, except that a string key keeps the text as
    written when YAML reads something else (a number, a bool, a list)."""
    kind = _LEAVES.get(dotted.strip(), (None, None))[1]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if kind is str or kind == _OPTIONAL_STR:
            return text.strip()
        raise ConfigError(f"{source}: '{dotted.strip()}': not valid YAML ({' '.join(str(e).split())})") from None
    if (kind is str or kind == _OPTIONAL_STR) and value is not None and not isinstance(value, str):
        return text.strip()
    return value


def apply_override(raw: dict, item: str, source: str = "<override>", sources: dict[str, str] | None = None) -> None:
    """Apply one ``a.b.c=value`` override in place to the nested dict ``raw`` (not yet
    checked: :func:`load_config` checks the result)."""
    if "=" not in item:
        raise ConfigError(f"{source}: overrides look like 'optimizer.base_lr=0.1'")
    dotted, text = item.split("=", 1)
    _set(raw, dotted, _override_value(dotted, text, source), source, {} if sources is None else sources)


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


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one silently, so a repeated section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"line {key_node.start_mark.line + 1}: a key must be a name, not a {type(key).__name__}",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a YAML config, fill in defaults, apply ``key.sub=value`` overrides, convert and
    check every value. Legacy keys set to a non-default value are listed in one warning
    (on rank 0 only under a distributed launcher)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        user = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw, sources = _merge(DEFAULTS, user, str(path)), {}
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
