"""Reading configs: YAML files and ``--a.b value`` overrides into typed dataclasses.

Values from the command line stay text until :func:`from_dict` parses each against its
option's type (so a template such as ``"Summary: {x}"`` stays a string); names and values
that were renamed get an error naming the new one; :func:`help_table` lists every option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .choices import RENAMED_OPTIONS
from .presets import find_config
from .schema import TrainConfig
from .validation import check_ranges, read_yaml_mapping, truncated, truncated_message


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = TrainConfig) -> Any:
    """Build a config from an optional YAML file and ``--a.b value`` / ``a.b=value`` overrides."""
    raw: dict = {}
    text = ""
    if path is not None:
        path = find_config(path)  # configs/... also names a preset shipped in the package
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist. Pass a YAML file, "
                              "e.g. --config configs/tiny.yaml.")
        raw, text = read_yaml_mapping(path)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        cfg = from_dict(cls, raw)
    except ConfigError:
        if path is not None and truncated(text):
            raise ConfigError(truncated_message(path)) from None
        raise
    check_ranges(cfg)
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``['--ppo.lr', '1e-5', 'steps=3']`` -> ``[('ppo.lr', 1e-5), ('steps', 3)]``."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif arg.startswith("--"):
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"Option {arg} needs a value, e.g. {arg} 3.")
            key, text = arg[2:], args[i + 1]
            i += 1
        elif "=" in arg:
            key, text = arg.split("=", 1)
        else:
            raise ConfigError(f"Cannot read option {arg!r}; write --section.name value.")
        # Kept as text: _coerce parses it against the option's type, so a template such as
        # "Summary: {x}" stays a string instead of becoming a YAML mapping.
        pairs.append((key.replace("-", "_"), _Text(text)))
        i += 1
    return pairs


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Option {key!r}: {name!r} is not a section.")
    node[leaf] = value


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking names and coercing types."""
    # Derived fields (per-process batch sizes) are recomputed by finalize(); a saved
    # config.yaml holds them, so they are accepted and dropped rather than refused.
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    raw = {k: v for k, v in raw.items() if k in fields or not _is_derived(cls, k)}
    hints = typing.get_type_hints(cls)
    unknown = set(raw) - set(fields)
    if unknown:
        name = sorted(unknown)[0]
        if prefix + name in RENAMED_OPTIONS:
            raise ConfigError(f"Option {prefix + name!r} was renamed "
                              f"{RENAMED_OPTIONS[prefix + name]!r}; use the new name.")
        raise ConfigError(f"Unknown option {prefix + name!r}. Options here: "
                          + ", ".join(prefix + n for n in fields) + ".")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"Option {prefix + name!r} is a section; give a mapping.")
            kwargs[name] = from_dict(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


class _Text(str):
    """A command-line value, still unparsed."""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (str, int, float, bool, list[...], optional), or ConfigError."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if type(None) in args and _is_null(value):
            return None
        *firsts, hint = [a for a in args if a is not type(None)]
        for first in firsts:  # int | str: a number if it reads as one
            with contextlib.suppress(ConfigError):
                return _coerce(value, first, key)
        args = typing.get_args(hint)
    if isinstance(value, _Text) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"Option {key!r}: cannot read {str(value)!r}.") from None
    if typing.get_origin(hint) is list:
        items = value if isinstance(value, list) else str(value).split(",")
        return [_coerce(v, args[0], key) for v in items]
    if typing.get_origin(hint) is dict:
        return _mapping(value, args, key)
    converted = _scalar(value, hint)
    if converted is None:
        raise ConfigError(f"Option {key!r} must be {getattr(hint, '__name__', hint)}, "
                          f"got {value!r}.")
    return converted


def _mapping(value: Any, args: tuple, key: str) -> dict:
    """A YAML mapping, or ``a=b,c=d`` text from the command line, as ``dict[K, V]``."""
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"Option {key!r}: write a mapping as key=value,key=value; got "
                              f"{value!r}.")
        value = dict(pairs)
    if not isinstance(value, dict):
        raise ConfigError(f"Option {key!r} must be a mapping, got {value!r}.")
    return {_coerce(k, args[0], key): _coerce(v, args[1], key) for k, v in value.items()}


def _is_derived(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("derived") for f in dataclasses.fields(cls))


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, _Text) and value.lower() in ("null", "none", "~"))


def _scalar(value: Any, hint: type) -> Any:
    """``value`` converted to ``hint`` where that is lossless, else None."""
    if isinstance(value, bool):
        return value if hint is bool else None
    if hint is str and isinstance(value, (str, int, float)):
        return str(value)
    if hint is int and isinstance(value, int):
        return value
    if hint is float and isinstance(value, (int, float)):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "3e-3" (no dot) as a string.
        with contextlib.suppress(ValueError):
            return float(value)
    return None


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data, for YAML/JSON output."""
    return dataclasses.asdict(cfg)


def help_table(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every option, for ``detoxrl train --help-config``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += help_table(hints[f.name], prefix + f.name + ".")
        elif not f.metadata.get("derived"):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
