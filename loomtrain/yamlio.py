"""Reading YAML from users: safe, strict, bounded, and every failure one line naming the source.

A config is typed by people and copied between jobs, so the reader refuses what PyYAML would
silently accept or turn into a traceback: a duplicated key (the later one would win unseen),
bytes that are not UTF-8, nesting deep enough to exhaust the interpreter's stack, and anchors
that expand into millions of values (a few lines of aliases can make the dataclass conversion
run for hours). Only the safe tags are constructed, so no YAML can create Python objects.
"""
from __future__ import annotations

import os

import yaml

from loomtrain.errors import ConfigError

# Values (scalars and containers, counted after alias expansion) one document may hold. Real
# configs hold a few hundred; the bound only stops documents built to expand without end.
MAX_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: yaml.Mark, again: yaml.Mark):
        super().__init__(f"duplicate key '{key}' (line {again.line + 1}; first set on line {first.line + 1})")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (merge keys `<<` may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # unhashable: SafeLoader's own error names it
                if first is not key_node.start_mark:
                    raise _DuplicateKey(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _count_values(obj) -> None:
    """Raise when `obj` holds more than MAX_VALUES values, counting shared (aliased) ones each time."""
    budget, stack = MAX_VALUES, [obj]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"more than {MAX_VALUES} values (after expanding YAML aliases)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, _DuplicateKey):
        return str(exc)
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return " ".join(f"{problem}{where}{f' ({context})' if context else ''}".split())


def parse_yaml(text: str, source: str):
    """The value of one YAML document, or a ConfigError that starts with `source`."""
    try:
        value = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # a scalar the constructor cannot take (4,300-digit int)
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    try:
        _count_values(value)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return value


def read_yaml_file(path: str | os.PathLike):
    """The value of a YAML file, which must be UTF-8 text."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "save the config as UTF-8") from None
    return parse_yaml(text, str(path))
