"""pretraining/config.py (on utils/config.py): the typed pre-training config, converted and checked once at load.

Each test names in its docstring the bug that makes it fail.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

import pretrain_aclus
from pretraining import loop
from pretraining.config import DEFAULTS, FPN_WIDTH, ConfigError, PretrainConfig, ignored_keys, load_config, run_dir
from pretraining.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


def _error(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def _legacy_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pretraining.config" and "legacy" in r.getMessage()]


def test_scientific_notation_in_a_file_and_in_an_override_is_a_float(tmp_path):
    """Breaks if strings are not converted for numeric keys (YAML 1.1 reads 1e-6 as a string)."""
    assert yaml.safe_load("a: 1e-6")["a"] == "1e-6"          # the PyYAML behaviour this works around
    path = _write(tmp_path, "optimizer: {weight_decay: 1e-6, base_lr: 1e30}\nloss: {temperature: 5E-2}\n")
    cfg = load_config(path)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.base_lr, cfg.loss.temperature) == (1e-6, 1e30, 0.05)
    assert all(type(v) is float for v in (cfg.optimizer.weight_decay, cfg.optimizer.base_lr, cfg.loss.temperature))
    cfg = load_config(path, ["optimizer.base_lr=2e-1", "optimizer.total_epochs=1e3", "data.crop_scale=[2e-1, 1]"])
    assert cfg.optimizer.base_lr == 0.2 and type(cfg.optimizer.base_lr) is float
    assert cfg.optimizer.total_epochs == 1000 and type(cfg.optimizer.total_epochs) is int
    assert cfg.data.crop_scale == (0.2, 1.0)


def test_a_bad_number_is_one_line_naming_the_file_the_override_and_the_key(tmp_path):
    """Breaks if values are not type-checked at load (a string lr would fail later, in the
    schedule), or if the message loses the override or the dotted key."""
    path = _write(tmp_path, "seed: 1\n")
    msg = _error(path, "optimizer.base_lr=abc")
    assert msg == f"{path} (override 'optimizer.base_lr=abc'): 'optimizer.base_lr' must be a number, got 'abc'"
    # the same value from the file names the file alone
    assert _error(_write(tmp_path, "optimizer: {base_lr: abc}\n")) == \
        f"{path}: 'optimizer.base_lr' must be a number, got 'abc'"


def test_pretrain_exits_with_the_config_error_before_data_or_model(tmp_path, make_pretrain_config, monkeypatch,
                                                                  capsys):
    """Breaks if the config is checked lazily (in train, after the data folder is read) or
    if the error escapes as a traceback."""
    def never(*a, **k):
        raise AssertionError("built data or model from an invalid config")

    monkeypatch.setattr(pretrain_aclus, "train", never)
    for name in ("build_loader", "build_model"):
        monkeypatch.setattr(loop, name, never)
    cfg = make_pretrain_config(tmp_path, tmp_path / "no_such_data")
    rc = pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu", "-o", "optimizer.base_lr=abc"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        f"pretrain_aclus.py: error: {cfg} (override 'optimizer.base_lr=abc'): "
        "'optimizer.base_lr' must be a number, got 'abc'"]


@pytest.mark.parametrize("override, message", [
    ("optimizer.total_epochs=2.5", "'optimizer.total_epochs' must be an integer, got 2.5"),
    ("data.train_batch_size=16.5", "'data.train_batch_size' must be an integer, got 16.5"),
    ("optimizer.base_lr=true", "'optimizer.base_lr' must be a number, got True"),
    ("loss.mask_rois=false", "'loss.mask_rois' must be an integer, got False"),
    ("amp.sync_bn=1", "'amp.sync_bn' must be true or false, got 1"),
    ("data.crop_scale=0.5", "'data.crop_scale' must be a list of 2 numbers, got 0.5"),
    ("data.crop_scale=[0.2, 0.5, 1]", "'data.crop_scale' must be a list of 2 numbers"),
    ("optimizer.base_lr=.inf", "'optimizer.base_lr' must be a finite number"),
])
def test_wrong_types_are_refused(tmp_path, override, message):
    """Breaks if ints take fractions (2.5 epochs), numbers take bools (True == 1 in Python),
    or a value of the wrong type is kept."""
    assert message in _error(_write(tmp_path, "seed: 0\n"), override)


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "'seed' must be >= 0, got -1"),
    ("optimizer.base_lr=0", "'optimizer.base_lr' must be > 0, got 0.0"),
    ("optimizer.weight_decay=-1e-6", "'optimizer.weight_decay' must be >= 0"),
    ("optimizer.momentum=1", "'optimizer.momentum' must be < 1"),
    ("optimizer.warmup_epochs=-1", "'optimizer.warmup_epochs' must be >= 0"),
    ("optimizer.warmup_epochs=300", "'optimizer.warmup_epochs' must be < 'optimizer.total_epochs'"),
    ("model.base_momentum=1.5", "'model.base_momentum' must be <= 1"),
    ("data.crop_scale=[0.9, 0.2]", "'data.crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1"),
    ("data.crop_scale=[0, 1]", "'data.crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1"),
    ("data.dual_views=false", "'data.dual_views: false' is not supported"),
    ("model.method=simclr", "'model.method' is 'simclr'; expected one of"),
    ("optimizer.type=sgd", "'optimizer.type' is 'sgd'; expected one of ['lars']"),
    ("checkpoint.ckpt_path=", "'checkpoint.ckpt_path' must not be empty"),
    ("amp.dtype=fp8", "'amp.dtype' is 'fp8'; expected one of ['auto', 'bf16', 'fp16']"),
    ("amp.compile=2", "'amp.compile' must be true or false, got 2"),
    ("data.cache=disk", "'data.cache' is 'disk'; expected one of ['memory', 'none']"),
    ("data.max_mask_ids=0", "'data.max_mask_ids' must be > 0"),
    ("data.max_mask_ids=257", "'data.max_mask_ids' must be <= 256"),
    ("checkpoint.snapshot_fractions=[0.5, 1]", "'checkpoint.snapshot_fractions' must lie in (0, 1)"),
    ("checkpoint.snapshot_fractions=0.5", "'checkpoint.snapshot_fractions' must be a list of numbers"),
])
def test_ranges_and_choices_are_checked(tmp_path, override, message):
    """Breaks if a range or choice check is dropped (each row is one check)."""
    path = _write(tmp_path, "seed: 0\n")
    msg = _error(path, override)
    assert msg.startswith(f"{path} (override '{override}'): ") and message in msg


def test_unknown_keys_get_the_closest_name(tmp_path):
    """Breaks if the "did you mean" hint or the unknown-key check of files, overrides or
    section overrides is lost."""
    assert "unknown config key 'optimizer.base_lrr' (did you mean 'optimizer.base_lr'?)" in \
        _error(_write(tmp_path, "optimizer: {base_lrr: 0.1}\n"))
    path = _write(tmp_path, "seed: 0\n")
    assert "unknown config key 'optimzer.base_lr' (did you mean 'optimizer'?)" in _error(path, "optimzer.base_lr=1")
    assert "unknown config key 'model.projection.hiden_dim' (did you mean 'model.projection.hidden_dim'?)" in \
        _error(path, "model.projection={hiden_dim: 8}")
    assert "overrides look like" in _error(path, "seed")


def test_overrides_of_strings_sections_and_empty_values(tmp_path):
    """Breaks if a string key's override is read as YAML (2024 -> int), if a section
    override replaces the section instead of merging, or if 'resume_path=' is not ''."""
    cfg = load_config(_write(tmp_path, "seed: 0\n"), [
        "data.image_dir=2024", "checkpoint.resume_path=", "log.log_dir=", "model.projection={hidden_dim: 64}"])
    assert cfg.data.image_dir == "2024" and cfg.checkpoint.resume_path == "" and cfg.log.log_dir is None
    assert (cfg.model.projection.hidden_dim, cfg.model.projection.output_dim) == (64, 256)


def test_legacy_keys_are_noted_once_and_only_when_set(tmp_path, make_pretrain_config, caplog):
    """Breaks if legacy keys are refused, noted once per key (several lines), noted at
    their default value (every run would print it), or not listed."""
    cfg = make_pretrain_config(tmp_path, tmp_path / "no_such_data", loss={"pool_size": 5},
                               log={"enable_wandb": True, "log_step": 1})
    with caplog.at_level(logging.WARNING):
        rc = pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu", "-o", "distributed=false"])
    assert rc == 2                                   # the missing data folder, after the config loaded
    records = _legacy_records(caplog)
    assert len(records) == 1
    for key in ("loss.pool_size", "log.enable_wandb", "distributed"):
        assert key in records[0].getMessage()
    # the upstream file sets every legacy key, all to their defaults: no note
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_config(REPO / "configs/example.yaml")
    assert not _legacy_records(caplog)


def test_time_stamp_is_only_ignored_without_the_upstream_pattern():
    """Breaks if time_stamp is reported as ignored while run_dir reads it (or the reverse)."""
    cfg = PretrainConfig().with_values({"checkpoint.time_stamp": "0412"})
    assert ignored_keys(cfg) == ["checkpoint.time_stamp"] and run_dir(cfg) == Path("ckpt/aclus")
    cfg = cfg.with_values({"checkpoint.ckpt_path": "ckpt/{}/{}_{}_{}.pth.tar"})
    assert ignored_keys(cfg) == [] and run_dir(cfg) == Path("ckpt/0412")
    assert ignored_keys(PretrainConfig()) == []


@pytest.mark.parametrize("model, key", [
    ({"predictor": {"output_dim": 128}}, "model.predictor.output_dim"),
    ({"predictor": {"input_dim": 128}}, "model.predictor.input_dim"),
    ({"projection": {"input_dim": 512}}, "model.projection.input_dim"),
])
def test_head_size_mismatches_are_config_errors(tmp_path, model, key):
    """Breaks if the head sizes are checked only in build_model (a ValueError traceback)."""
    path = _write(tmp_path, yaml.safe_dump({"model": model}))
    assert f"{path}: '{key}' must" in _error(path)


def test_the_fpn_width_is_the_models():
    """Breaks if models.backbone changes its FPN width and the config's check does not follow."""
    from models.backbone import FPN_DIM

    assert FPN_WIDTH == FPN_DIM == PretrainConfig().model.projection.input_dim


def _plain(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or type(obj) in (bool, int, float, str)


def test_to_dict_is_plain_and_round_trips(tmp_path):
    """Breaks if to_dict keeps tuples or dataclasses (not plain for checkpoints), drops a
    key, or if load_config does not read back what it wrote."""
    cfg = load_config(REPO / "configs/synthetic_cpu.yaml", ["optimizer.weight_decay=1e-5", "log.log_dir=tb"])
    d = cfg.to_dict()
    assert _plain(d)
    assert d["data"]["crop_scale"] == [0.2, 1.0]
    assert set(d) == set(DEFAULTS) and all(set(d[k]) == set(DEFAULTS[k]) for k in d if isinstance(d[k], dict))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    assert load_config(path) == cfg
    assert PretrainConfig.from_dict(d) == cfg
    torch.save({"config": d}, tmp_path / "c.pth")
    assert torch.load(tmp_path / "c.pth", weights_only=True)["config"] == d


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_without_a_note(path, caplog):
    """Breaks if a shipped config no longer loads, or sets a legacy key away from its default."""
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert isinstance(cfg, PretrainConfig) and not _legacy_records(caplog)


def test_with_method_is_checked_and_leaves_the_original():
    """Breaks if with_method mutates the (frozen) original or skips the choice check."""
    base = PretrainConfig()
    assert base.with_method("byol").model.method == "byol" and base.model.method == "aclus"
    with pytest.raises(ConfigError, match="'model.method' is 'nope'"):
        base.with_method("nope")


def test_sam_task_settings_share_the_error_type():
    """Breaks if SAM/config.py defines its own ConfigError again."""
    import SAM.config

    assert SAM.config.ConfigError is ConfigError


def test_a_run_stores_its_config_and_refuses_to_resume_another_method(tmp_path, synthetic_pretrain_dir,
                                                                      make_pretrain_config, capsys):
    """Breaks if config.yaml or the checkpoint's "config" is not the plain dict of the typed
    config, or if resuming no longer compares the checkpoint's method."""
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": "byol"},
                               data={"num_examples": 8}, optimizer={"total_epochs": 1, "warmup_epochs": 0})
    assert pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    loaded = load_config(cfg)
    assert load_config(run / "config.yaml") == loaded
    assert torch.load(run / "latest.pth", weights_only=True)["config"] == loaded.to_dict()
    capsys.readouterr()
    rc = pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu", "--resume", "auto", "-o", "model.method=detcon"])
    assert rc == 2
    assert "checkpoint of method 'byol', config says 'detcon'" in capsys.readouterr().err


def test_speed_keys_default_to_the_safe_choices_and_reach_the_model():
    """Breaks if the new speed keys change what an existing config does (compile on, fp16 on
    the CPU, no cache), or if data.max_mask_ids does not become the model's id bound."""
    from models.aclus import build_model

    cfg = PretrainConfig()
    assert (cfg.amp.dtype, cfg.amp.channels_last, cfg.amp.compile) == ("auto", True, False)
    assert (cfg.data.cache, cfg.data.max_mask_ids) == ("memory", 64)
    small = cfg.with_values({"data.max_mask_ids": 9, "model.projection.hidden_dim": 8,
                             "model.predictor.hidden_dim": 8})
    assert build_model(small).num_ids == 9
    assert build_model(small.with_method("byol")).num_ids == 1   # whole-image methods: the one id 0


@pytest.mark.parametrize("opt_level, dtype, expected", [
    ("O0", "bf16", "fp32"), ("O1", "auto", "fp32"), ("O1", "bf16", "bf16"), ("O2", "fp16", "fp32")])
def test_precision_on_the_cpu(opt_level, dtype, expected):
    """Breaks if O0 autocasts, if the CPU autocasts without being asked (the old O1 runs were
    fp32 there), or if amp.dtype: bf16 is ignored on the CPU."""
    cfg = PretrainConfig().with_values({"amp.opt_level": opt_level, "amp.dtype": dtype})
    precision = resolve_precision(cfg.amp, torch.device("cpu"))
    assert str(precision) == expected and not precision.needs_scaler
