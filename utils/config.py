"""Typed configurations: frozen dataclasses whose fields carry their checks, read from YAML
with ``-o key=value`` overrides, converted and checked once at load.

The machinery only; a schema lives with its stage (``pretraining/config.py`` for
``pretrain_aclus.py``). A failure is a one-line :class:`ConfigError` that names the source
(file, and the override when the value came from one) and the dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import operator
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, get_type_hints

import yaml

OPTIONAL_STR = str | None


class ConfigError(ValueError):
    """A configuration that cannot be used; the one-line message says where and why.

    Shared by the A-SAM task settings (``SAM/config.py``)."""


def config_key(default: Any, *, choices: tuple = (), gt: float | None = None, ge: float | None = None,
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


def plain(obj: Any) -> Any:
    """A dataclass as plain nested dicts and lists (YAML- and ``weights_only``-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [plain(v) for v in obj]
    return obj


def schema(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every leaf key of ``cls``, in field order."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def number(value: Any, key: str, source: str, kind: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{source}: '{key}' must be {kind}, got {value!r}")
    try:
        x = float(value)  # str: YAML 1.1 leaves "1e-6" a string
    except (ValueError, OverflowError):
        raise ConfigError(f"{source}: '{key}' must be {kind}, got {value!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return x


def convert(kind: Any, value: Any, key: str, source: str) -> Any:
    """``value`` as the declared type of ``key``, or a ConfigError."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if kind is float:
        return number(value, key, source)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        x = number(value, key, source, "an integer")
        if not x.is_integer():
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return int(x)
    if kind is str or kind == OPTIONAL_STR:
        if value is None:
            return None if kind == OPTIONAL_STR else ""
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r} (quote it in YAML)")
        return value
    if kind == tuple[float, float]:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{source}: '{key}' must be a list of 2 numbers, got {value!r}")
        return tuple(number(v, key, source, "a list of 2 numbers") for v in value)
    if kind == tuple[float, ...]:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list of numbers, got {value!r}")
        return tuple(number(v, key, source, "a list of numbers") for v in value)
    raise TypeError(f"no conversion for {key}: {kind}")  # a schema field of a new type


BOUNDS = (("gt", ">", operator.gt), ("ge", ">=", operator.ge), ("lt", "<", operator.lt), ("le", "<=", operator.le))


def check(meta: Mapping[str, Any], value: Any, key: str, source: str) -> None:
    """The checks of one value alone (choices, bounds, non-empty)."""
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: '{key}' is {value!r}; expected one of {list(choices)}")
    for name, symbol, ok in BOUNDS:
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"{source}: '{key}' must be {symbol} {meta[name]}, got {value!r}")
    if meta.get("nonempty") and not value:
        raise ConfigError(f"{source}: '{key}' must not be empty")


def unknown(dotted: str, name: str, known: list[str], parents: str, source: str) -> ConfigError:
    """Unknown key ``name`` (full key ``dotted``) under ``parents`` ("" or "a.b."), with the
    closest of the ``known`` names as a hint."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{parents}{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown config key '{dotted}'{hint}")


def merge(base: dict, user: dict, source: str, prefix: str = "") -> dict:
    """A copy of ``base`` (the defaults, or values of the same keys) updated by ``user``,
    recursively; every key of ``user`` must exist in ``base``."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise unknown(dotted, str(key), list(base), prefix, source)
        if isinstance(base[key], dict):
            if value is None:  # an empty section in YAML
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            out[key] = merge(base[key], value, source, dotted + ".")
        else:
            out[key] = value
    return out


def set_key(raw: dict, dotted: str, value: Any, source: str, sources: dict[str, str], leaves: Iterable[str]) -> None:
    """Set key ``a.b.c`` of the merged nested dict ``raw`` in place (a section is merged
    into, key by key) and record ``source`` for every one of the ``leaves`` (dotted keys) it sets."""
    dotted = dotted.strip()
    keys = dotted.split(".")
    node = raw
    for i, k in enumerate(keys):
        parents = ".".join(keys[:i]) + "." if i else ""
        if not isinstance(node, dict) or k not in node:
            raise unknown(dotted, k, list(node) if isinstance(node, dict) else [], parents, source)
        if i < len(keys) - 1:
            node = node[k]
    last = keys[-1]
    node[last] = merge({last: node[last]}, {last: value}, source, parents)[last]
    for key in leaves:
        if key == dotted or key.startswith(dotted + "."):
            sources[key] = source


def override_value(dotted: str, text: str, source: str, kind: Any) -> Any:
    """The value of ``-o key=text`` for a key of type ``kind``: YAML, except that a string key
    keeps the text as written when YAML reads something else (a number, a bool, a list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if kind is str or kind == OPTIONAL_STR:
            return text.strip()
        raise ConfigError(f"{source}: '{dotted.strip()}': not valid YAML ({' '.join(str(e).split())})") from None
    if (kind is str or kind == OPTIONAL_STR) and value is not None and not isinstance(value, str):
        return text.strip()
    return value


def read_yaml(path: Path) -> dict:
    """The top-level mapping of a UTF-8 YAML file (no key twice), or a one-line ConfigError."""
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
    return user


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


def build(cls: type, raw: dict, source: str, sources: Mapping[str, str],
          relations: Callable[[Any, Callable[..., str]], None] | None = None) -> Any:
    """Convert and check the merged nested dict ``raw`` into a ``cls``, then the checks between
    keys: ``relations(cfg, where)``, where ``where(*keys)`` names the source to blame.
    ``sources``: dotted key -> the override it came from (other keys came from ``source``)."""
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
                values[f.name] = convert(hints[f.name], node[f.name], key, where(key))
                check(f.metadata, values[f.name], key, where(key))
        return cls(**values)

    cfg = section(cls, raw, "")
    if relations is not None:
        relations(cfg, where)
    return cfg


