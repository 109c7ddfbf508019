"""Build typed configs from YAML files and ``dotted.key=value`` command-line overrides.

Conversion is strict: unknown keys, wrong types and values outside a ``Literal`` are rejected with
a ``ConfigError`` that names the field path and the allowed values (with a close-match hint for
misspelt keys). Overrides are parsed as YAML scalars/flow collections, so ``a.b=3``, ``a.b=null``,
``a.c=[x, y]`` and ``reward.terms=[{name: iou, weight: 2}]`` all work.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from megatron_vrft.config.errors import ConfigError
from megatron_vrft.config.schema import RETIRED_KEYS, VisualRFTConfig

T = TypeVar("T")
RUN_CONFIG_FILE = "config.json"
"""A run's config as the trainer writes it into ``trainer.output_dir`` (JSON, which loads as YAML)."""
_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping for {tp.__name__}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        raise ConfigError(path, value, "one of " + ", ".join(repr(a) for a in allowed))
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, value, _type_name(tp))
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(err.allowed)
        raise ConfigError(path, value, " or ".join(errors + ["null"] if type(None) in args else errors))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, value, f"a mapping for {tp.__name__}")
        return build_dataclass(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, f"a list of {_type_name(get_args(tp)[0])}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(path, value, f"a list of {len(args)} values")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "a string")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build_dataclass(cls: type[T], values: dict, path: str = "") -> T:
    """Build ``cls`` from a nested dict, converting and validating every field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields and (retired := RETIRED_KEYS.get(_join(path, str(key)))) is not None:
            raise ConfigError(_join(path, str(key)), values[key], f"no value here: {retired}")
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                _join(path, str(key)),
                values[key],
                f"a known key of {cls.__name__}: {', '.join(fields)}{suggestion}",
            )
    kwargs = {}
    for name, f in fields.items():
        field_path = _join(path, name)
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], field_path)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(field_path, None, f"a value (required): {f.metadata.get('help', '')}")
    obj = cls(**kwargs)
    obj.validate(path or cls.__name__)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Merge ``dotted.key=value`` strings into a nested dict (returns a new dict)."""
    merged = _deep_copy(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "an override of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = merged
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, raw, f"a path into mappings ('{part}' is not a section)")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return merged


def _deep_copy(values: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VisualRFTConfig:
    """Load a run config from a YAML file (optional) plus overrides."""
    values: dict = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(str(path), type(loaded).__name__, "a YAML mapping at the top level")
        values = loaded
    values = apply_overrides(values, overrides or [])
    return build_dataclass(VisualRFTConfig, values)


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form (tuples become lists), e.g. for YAML dumps and run records."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def describe_config(cls: type = VisualRFTConfig, prefix: str = "") -> list[str]:
    """One line per leaf field: ``path (type, default): help``. Used by ``--help-config``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}: {f.metadata.get('help', '')}")
            lines.extend(describe_config(tp, name))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(config_to_dict(f.default_factory()))
        else:
            default = "required"
        lines.append(f"  {name} ({_type_name(tp)}; default {default}): {f.metadata.get('help', '')}")
    return lines
