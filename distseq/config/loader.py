"""Strict loading of typed config dataclasses from YAML (or plain dicts) with dotted ``key=value`` overrides.

Every key is checked: an unknown or misspelt key is an error naming its dotted path, and every value is
checked against the field's annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``Literal``,
``tuple[...]``, ``list[...]``, ``dict[str, ...]`` and nested dataclasses). No torch import here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_yaml", "parse_overrides", "to_dict", "dump_yaml"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the dotted key."""


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is in every extra we ship
        raise ConfigError("reading YAML configs needs PyYAML: pip install pyyaml") from err
    return yaml


def _check_value(path: str, annotation: Any, value: Any) -> Any:
    """``value`` converted to ``annotation`` (ints become floats where a float is wanted), else ConfigError."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_value(path, option, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: {value!r} fits none of {annotation}: " + "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, path=path)
    if origin in (tuple, list):
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_check_value(f"{path}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_check_value(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {
            _check_value(f"{path}.<key>", key_type, k): _check_value(f"{path}.{k}", value_type, v)
            for k, v in value.items()
        }
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {annotation!r}")  # a schema bug, not user input


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values by dotted path.

    Missing keys take the field defaults; a ``ValueError`` from the dataclass' own validation
    (``__post_init__``) is re-raised as a ConfigError naming the section.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)} "
            f"(known in {path or 'the top level'}: {', '.join(sorted(fields))})"
        )
    kwargs = {
        name: _check_value(f"{path}.{name}" if path else name, hints[name], value) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain nested dicts/lists (tuples become lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "parallel.sp=4"]`` -> nested dict; values parsed as YAML scalars/lists."""
    yaml = _yaml()
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return nested


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``data`` (mappings merge, everything else replaces)."""
    merged = dict(data)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = apply_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` strictly from the YAML file at ``path`` with dotted ``key=value`` overrides applied."""
    yaml = _yaml()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file {str(path)!r} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return from_dict(cls, apply_overrides(data, parse_overrides(overrides)))


def dump_yaml(config: Any, path: str | Path | None = None) -> str:
    """The config as YAML text (keys in field order); also written to ``path`` when given."""
    text = _yaml().safe_dump(to_dict(config), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
