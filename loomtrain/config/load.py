"""YAML file + dotted `key=value` overrides -> a validated `Config`: unknown sections and keys
are named with the closest known one, values are coerced to the field's type, then `check` runs."""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Mapping

from loomtrain.config.checks import check
from loomtrain.config.schema import Config, merge
from loomtrain.errors import ConfigError
from loomtrain.yamlio import parse_yaml, read_yaml_file

_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_class(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _unknown(kind: str, key: str, known: list[str]) -> ConfigError:
    key = str(key)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"unknown {kind} '{key}'{hint}")


# Decimal floats as people write them, with or without a dot or an exponent (`3e-4`, `1.5E3`).
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's annotation; accept ints for floats and YAML-ish strings."""
    ann = annotation
    origin = typing.get_origin(ann)
    options = typing.get_args(ann) if origin in (typing.Union, types.UnionType) else (ann,)
    if value is None and type(None) in options:
        return None
    for opt in options:
        if opt is type(None):
            continue
        base = typing.get_origin(opt) or opt
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # `3e-4`: YAML 1.1 reads a float without a dot as a string
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base in (Mapping, dict, collections.abc.Mapping) and isinstance(value, Mapping):
            return dict(value)
    wanted = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    if isinstance(value, bool) and str in options:  # e.g. resilience.straggler=off
        raise ConfigError(f"{key}: expected {wanted}, got {value!r} (YAML reads a bare off/on/no/yes as a "
                          f"boolean: quote the word, {key}='off')")
    raise ConfigError(f"{key}: expected {wanted}, got {value!r}")


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys and wrong types."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise _unknown("config section", name, list(_SECTIONS))
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        cls = _section_class(name)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise _unknown("config key", f"{name}.{key}", list(hints))
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    check(cfg)
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.max_steps=5", "model.config.hidden_size=64"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override '{item}': the key must be section.key (e.g. train.max_steps=5)")
        value = parse_yaml(text, f"override '{item}'") if text.strip() else None
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (may be empty or absent) and apply dotted overrides on top."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        raw = read_yaml_file(path)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_dict(merge(raw, parse_overrides(overrides or [])))


def replace(cfg: Config, **sections: Any) -> Config:
    """`replace(cfg, train={"max_steps": 5})`: a new, checked Config with some keys of some sections
    changed."""
    return from_dict(merge(cfg.to_dict(), sections))
