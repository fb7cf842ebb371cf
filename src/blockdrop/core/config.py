"""Typed configuration: frozen dataclasses <-> YAML, validated once at load time.

A config file is a YAML mapping whose sections mirror nested dataclasses. Unknown
keys, wrong types and bad values are errors naming the file, the section and the
key. Command-line overrides (``--set train.lr=3e-4``) go through the same checks.
Runtime state is never written back into a config.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from blockdrop.core.errors import ConfigError
from blockdrop.core.fileio import atomic_write_text

T = TypeVar("T")


def _describe(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{source}: {where} must not be empty")
    tp = inner
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            raise ConfigError(f"{source}: {where} must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{source}: {where} must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, got {value!r}")
        if get_args(tp)[1:] == (float,):  # the section's own check names wrong types; numbers must be finite
            for key, item in value.items():
                _finite(item, f"{where}.{key}", source)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return _finite(float(value), where, source, value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where} must be a number, got {value!r}")
        return _finite(float(value), where, source)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")  # a bug in a schema, not user input


def _finite(value: Any, where: str, source: str, given: Any = None) -> Any:
    """``value`` unless it is a non-finite number (nan and inf pass every comparison a check makes
    and would surface epochs later as NaN weights)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {where} must be a finite number, got {given if given is not None else value!r}")
    return value


def _build(cls: type[T], data: Any, where: str, source: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'the file'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f"section '{where}'" if where else "the top level"
        moved = getattr(cls, "MOVED", {}).get(unknown[0])
        if moved:  # a key of an earlier schema: say where it lives now
            raise ConfigError(f"{source}: key '{unknown[0]}' in {section} has moved to '{moved}'")
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' in {section} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = _describe(where, name)
        if name in data:
            value = data[name]
            if isinstance(value, dict) and field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
                if dataclasses.is_dataclass(default):  # a partial section overrides the section's own defaults
                    value = _merge(to_dict(default), value)
            kwargs[name] = _convert(value, hints[name], key, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ checks raise ValueError naming the key
        raise ConfigError(f"{source}: {where or 'config'}: {err}") from None


def _merge(base: dict, given: dict) -> dict:
    """``given`` over ``base``, section by section (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in given.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def from_dict(cls: type[T], data: dict, *, source: str = "<config>") -> T:
    """Build the dataclass ``cls`` from a plain mapping, rejecting unknown keys."""
    return _build(cls, data, "", source)


def to_dict(config: Any) -> dict:
    """Plain YAML-able mapping of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


class DuplicateKey(Exception):
    def __init__(self, key: str, where: str, first: yaml.Mark, second: yaml.Mark):
        super().__init__(key)
        self.key, self.where, self.first, self.second = key, where, first, second

    def describe(self) -> str:
        section = f"section '{self.where}'" if self.where else "the top level"
        a, b = self.first, self.second
        at = (f"line {a.line + 1} (columns {a.column + 1} and {b.column + 1})" if a.line == b.line
              else f"lines {a.line + 1} and {b.line + 1}")
        return f"key '{self.key}' appears twice in {section}, at {at} (YAML would keep only the last); remove one"


def _check_unique_keys(node: yaml.Node | None, where: str = "") -> None:
    """Raise DuplicateKey for a mapping that repeats a key (PyYAML silently keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple, yaml.Mark] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, name) in seen:
                    raise DuplicateKey(name, where, seen[(key.tag, name)], key.start_mark)
                seen[(key.tag, name)] = key.start_mark
            _check_unique_keys(value, _describe(where, str(name)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{where}[{i}]")


def _load_yaml(text: str, where: str = ""):
    """``yaml.safe_load`` that refuses repeated keys (DuplicateKey); ``where``: the section it is."""
    _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), where)
    return yaml.safe_load(text)


def parse_override(text: str, *, flag: str = "--set") -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} {text!r}: expected SECTION.KEY=VALUE")
    try:
        value = _load_yaml(raw, key.strip())
    except yaml.YAMLError:
        raise ConfigError(f"{flag} {text!r}: the value is not valid YAML") from None
    except DuplicateKey as dup:
        raise ConfigError(f"{flag} {text!r}: {dup.describe()}") from None
    return [p for p in key.strip().split(".")], value


def apply_overrides(data: dict, overrides: typing.Sequence[str], *, flag: str = "--set") -> dict:
    """Return a copy of ``data`` with dotted overrides applied (validation happens in from_dict)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text, flag=flag)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{flag} {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    try:
        data = _load_yaml(text)
    except DuplicateKey as dup:
        raise ConfigError(f"{path}: {dup.describe()}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path, overrides: typing.Sequence[str] = ()) -> T:
    """Read a YAML file into ``cls`` after applying ``--set`` overrides; every error names the file."""
    data = apply_overrides(read_yaml(path), overrides)
    return from_dict(cls, data, source=str(path))


def save_config(config: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
