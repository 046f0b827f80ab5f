"""Nested typed dataclass configs: load from YAML/JSON, override with ``--a.b=value``, validate.

A config is a tree of dataclasses with annotated, defaulted fields. ``from_dict`` checks every key
and every value's type and reports mistakes as :class:`ConfigError` with the dotted path and, for
unknown keys, the closest valid names; ``to_dict`` gives the plain JSON stored as ``config.json``.
Nothing here executes code from a file: YAML is read with ``safe_load``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in a config file or override (printed as one line by the CLI)."""


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false and yes/on/true as booleans
            spellings = ("no", "off", "false") if not value else ("yes", "on", "true")
            value = next((c for c in typing.get_args(tp) if c in spellings), value)
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{path}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, validating keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {where!r}{hint}; valid keys here: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], where)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``--a.b=value`` or ``a.b=value`` -> (["a", "b"], parsed value); values are YAML scalars."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    key, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted key of ``overrides`` in the nested dict ``data`` (in place)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"cannot parse {path}: it is not UTF-8 text (a YAML or JSON config)") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def field_paths(cls, prefix: str = "") -> dict[str, bool]:
    """Every dotted field path of a dataclass tree (e.g. ``optim.lr``) -> whether it is a dict."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp = f"{prefix}{f.name}", hints[f.name]
        out[path] = tp is dict or typing.get_origin(tp) is dict
        if dataclasses.is_dataclass(tp):
            out.update(field_paths(tp, path + "."))
    return out


def _check_override_paths(cls, overrides: list[str]) -> None:
    paths = field_paths(cls)
    for text in overrides:
        keys, _ = parse_override(text)
        dotted = ".".join(keys)
        if dotted in paths or any(dotted.startswith(p + ".") for p, is_dict in paths.items() if is_dict):
            continue  # a field, or a key inside a dict-valued field
        same_leaf = [p for p in paths if p.split(".")[-1] == keys[-1]]
        close = same_leaf or difflib.get_close_matches(dotted, paths, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key {dotted!r}{hint}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML or JSON; optional), apply overrides, and validate into ``cls``."""
    data = read_config_file(path) if path is not None else {}
    _check_override_paths(cls, list(overrides or []))
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)
