"""Dataclass configs from dicts, YAML files and JSON, with errors a user can act on.

Every stage of bertflow (prep, pretrain, finetune, ...) is configured by one dataclass.
This module is the single place that turns untrusted mappings (a YAML file, a manifest,
a CLI namespace) into those dataclasses. It is stdlib-only (PyYAML is imported lazily)
so that `bertflow --help` and the config modules stay instant to import.

Field conventions, read by `workflows.cli` to build command-line options:
    field(default=..., metadata={"help": "one line", "cli": False})
- "help": shown by `--help` (required for every field that reaches the CLI).
- "cli": False keeps a field out of the command line (YAML/Python only).
- "flag": overrides the option name (default: --field-name).
- "renamed_from": earlier names of the field; a mapping key or a `--old-name` flag under
  one still works for one release, with a deprecation line (`deprecated`).
- "value_aliases": {old value: new value} of a field whose choices were renamed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class BertflowError(Exception):
    """An error caused by user input (a file, a flag, a config); the CLI prints it without
    a traceback. Messages name the file, line or field at fault and say what to do."""


class ConfigError(BertflowError, ValueError):
    """A configuration value or key is wrong; the message says where and what to do."""


def field(default: Any = dataclasses.MISSING, *, help: str, cli: bool = True,
          flag: str | None = None, default_factory: Any = dataclasses.MISSING,
          renamed_from: tuple[str, ...] = (),
          value_aliases: dict[str, str] | None = None) -> Any:
    """A dataclass field with the metadata the CLI and docs use (see the module doc)."""
    meta: dict[str, Any] = {"help": help, "cli": cli}
    if flag:
        meta["flag"] = flag
    if renamed_from:
        meta["renamed_from"] = tuple(renamed_from)
    if value_aliases:
        meta["value_aliases"] = dict(value_aliases)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_warned: set[str] = set()


def deprecated(message: str) -> None:
    """One deprecation line per process and message (logger `bertflow.config`, which the
    CLI shows on the terminal): an old spelling that still works for one release."""
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("bertflow.config").warning("deprecated: %s", message)


def renamed_keys(cls: type) -> dict[str, str]:
    """{old key: field name} for every field of dataclass `cls` that was renamed."""
    return {old: f.name for f in dataclasses.fields(cls)
            for old in f.metadata.get("renamed_from", ())}


def apply_renames(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with old keys and old values of `cls`'s fields under their new names, each
    use announced by `deprecated` (both spellings of one field: the new one wins)."""
    renames = renamed_keys(cls)
    out = dict(data)
    for old, new in renames.items():
        if old in out:
            value = out.pop(old)
            deprecated(f"{source}: {old!r} is now {new!r} (--{old.replace('_', '-')} is "
                       f"--{new.replace('_', '-')}); the old name goes in the next release")
            out.setdefault(new, value)
    for f in dataclasses.fields(cls):
        aliases = f.metadata.get("value_aliases")
        if aliases and isinstance(out.get(f.name), str) and out[f.name] in aliases:
            old, new = out[f.name], aliases[out[f.name]]
            deprecated(f"{source}: {f.name} {old!r} is now {new!r}; the old value goes in "
                       "the next release")
            out[f.name] = new
    return out


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (works with `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/JSON scalar or list to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build dataclass `cls` from `data`; unknown keys and bad values raise ConfigError.

    `source` names where the data came from (a file path, "command line") and prefixes
    every message, so the user knows which file and which key to fix.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} fields, "
                          f"got {type(data).__name__}")
    data = apply_renames(cls, data, source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}. "
            f"Valid keys: {', '.join(sorted(fields))}")
    hints = field_types(cls)
    kwargs = {k: _coerce(v, hints[k], f"{source}: {k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists, Paths strings)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return clean(dataclasses.asdict(obj))


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with the file named in any error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    else:
        import yaml  # lazy: keeps config modules cheap to import

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    return data


def load(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load `cls` from a YAML/JSON file, then apply `overrides` (e.g. command-line flags)."""
    data = read_mapping(path)
    data.update(overrides or {})
    return from_dict(cls, data, str(path))


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError naming `field_name` unless `condition` holds (for __post_init__)."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")
