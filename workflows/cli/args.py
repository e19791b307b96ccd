"""The command line's one way to build a verb's options from its config dataclass.

`add_config_arguments(parser, Cls)` adds one option per field (bool -> `--x/--no-x`,
list -> nargs +, Literal -> choices; a field whose `flag` has no leading dash is a
positional argument shown as that name, e.g. `flag="ID"`) plus `--config FILE`; fields of a settings group (`loop`,
`tracking`) appear flat, with the stage's defaults. `config_from_args(Cls, args)` merges
defaults <- YAML <- flags. Verb modules build their parser with `new_parser` and these two.

Renames keep the old spelling for one release: a field declared with
`renamed_from=("old_name",)` also answers to a hidden `--old-name` (and a YAML key
`old_name`), and `value_aliases={"old": "new"}` maps an old choice; each use prints one
`deprecated:` line (`bert_core.config_io.deprecated`). `add_renamed_option` does the same
for the few options a verb adds by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from bert_core.config_io import deprecated, field_types, read_mapping
from workflows.config import config_from_mapping

T = TypeVar("T")


def new_parser(verb: str, description: str, epilog: str | None = None,
               parent: Any = None) -> argparse.ArgumentParser:
    """The parser of `bertflow VERB` (or of a sub-verb, from `parent.add_parser`), with -v."""
    kwargs = {"description": description, "epilog": epilog,
              "formatter_class": argparse.RawDescriptionHelpFormatter}
    if parent is None:
        parser = argparse.ArgumentParser(prog=f"bertflow {verb}", **kwargs)
    else:
        parser = parent.add_parser(verb, help=description, **kwargs)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every library's log lines (Ray, Ray Data, MLflow) on the "
                             "terminal as well as in the log file named at the end")
    return parser


def _renamed(base: type[argparse.Action], new_flag: str) -> type[argparse.Action]:
    """Action class `base` that first announces that its option is now `new_flag`."""

    class Renamed(base):  # type: ignore[valid-type, misc]
        def __call__(self, parser: Any, namespace: Any, values: Any,
                     option_string: str | None = None) -> None:
            new = new_flag
            if option_string and option_string.startswith("--no-") and not new.startswith("--no-"):
                new = "--no-" + new[2:]
            deprecated(f"{option_string} is now {new}; the old spelling goes in the next "
                       "release")
            super().__call__(parser, namespace, values, option_string)

    return Renamed


class _Store(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)


class _StoreTrue(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)


def add_renamed_option(parser: argparse.ArgumentParser, old_flag: str, new_flag: str,
                       dest: str, action: Any = None, **kwargs: Any) -> None:
    """A hidden `old_flag` that sets `dest` as `new_flag` does, with a deprecation line.

    `action`: None (takes a value), "store_true" or argparse.BooleanOptionalAction."""
    base = {None: _Store, "store_true": _StoreTrue}.get(action, action)
    if base is argparse.BooleanOptionalAction:
        kwargs.pop("metavar", None)
    parser.add_argument(old_flag, dest=dest, action=_renamed(base, new_flag),
                        help=argparse.SUPPRESS, **kwargs)


def _aliased(convert: Any, aliases: dict[str, str], flag: str) -> Any:
    """argparse `type` that maps an old choice to its new name (with a deprecation line)."""

    def parse(text: str) -> Any:
        if text in aliases:
            deprecated(f"{flag} {text} is now {flag} {aliases[text]}; the old value goes "
                       "in the next release")
            text = aliases[text]
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _type_for(tp: Any) -> tuple[Any, dict[str, Any]]:
    """(argparse type, extra add_argument kwargs) for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        inner = [a for a in args if a is not type(None)]
        return _type_for(inner[0]) if len(inner) == 1 else (str, {})
    if origin is typing.Literal:
        return type(args[0]), {"choices": list(args)}
    if origin in (list, tuple):
        inner_type, extra = _type_for(args[0] if args else str)
        return inner_type, {"nargs": "+", **extra}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return tp, {}
    return str, {}


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any, Any, str]]:
    """(field, type, default, help) of every option of `cls`, groups flattened."""
    out = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            group_default = f.default_factory()  # type: ignore[misc]
            notes = f.metadata.get("notes", {})
            for g, tp, _, help_text in _fields(type(group_default)):
                out.append((g, tp, getattr(group_default, g.name), notes.get(g.name, help_text)))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        out.append((f, hints[f.name], default, f.metadata.get("help", "")))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls: type,
                         required: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                         config_file: bool = True) -> None:
    """Add one option per field of dataclass `cls` (or the fields in `only`), plus
    `--config FILE` (YAML).

    Absent options stay out of the namespace (default SUPPRESS), so a value comes from,
    in increasing priority: the dataclass default, the YAML file, the command line.
    `required` fields are marked in --help and, with a `--config` file, checked when the
    config is built (they may come from the file); without one, argparse requires them.
    """
    if config_file:
        parser.add_argument("--config", metavar="FILE",
                            help="YAML file with any of the settings below (flags override it)")
    for f, tp, default, help_text in _fields(cls):
        if (only is not None and f.name not in only) or not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        positional = not flag.startswith("-")
        arg_type, extra = _type_for(tp)
        if f.name in required:
            help_text += " (required)"
        elif isinstance(default, bool):
            help_text += f" (default: {'on' if default else 'off'})"
        elif default not in (None, "", [], ()):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, **extra}
        if arg_type is not None:
            aliases = f.metadata.get("value_aliases")
            kwargs["type"] = _aliased(arg_type, aliases, flag) if aliases else arg_type
            if "choices" not in extra:
                kwargs["metavar"] = flag if positional else f.name.upper()
        if not positional:
            parser.add_argument(flag, dest=f.name, required=f.name in required and
                                not config_file, **kwargs)
            for old in f.metadata.get("renamed_from", ()):
                old_kwargs = {k: v for k, v in kwargs.items() if k not in ("help", "action")}
                add_renamed_option(parser, "--" + old.replace("_", "-"), flag, f.name,
                                   action=kwargs.get("action"), **old_kwargs)
        else:
            parser.add_argument(f.name, **kwargs, **({} if f.name in required
                                                     else {"nargs": "?"}))


def config_from_args(cls: type[T], args: argparse.Namespace,
                     extra: dict[str, Any] | None = None) -> T:
    """Merge dataclass defaults <- `--config` YAML <- command-line flags into `cls`."""
    data: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "config", None):
        data.update(read_mapping(args.config))
        source = f"{args.config} + command line"
    names = {f.name for f, *_ in _fields(cls)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    data.update(extra or {})
    return config_from_mapping(cls, data, source)


# Fine-tune fields that a suite's command line (eval, adapt) cannot override: each task's
# data and columns are the suite's, and the models, run names and registration the verb's.
SUITE_FIXED = ("task", "base", "train", "eval", "labels", "text_column", "text_pair_column",
               "label_column", "data_dir", "run_name", "register_as")


def add_finetune_overrides(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()
                           ) -> tuple[str, ...]:
    """Add the fine-tune options that override a suite's setting for every task (`eval`,
    `adapt`), under their own heading; returns their field names (`finetune_overrides`)."""
    from workflows.config import FinetuneConfig

    names = tuple(f.name for f, *_ in _fields(FinetuneConfig)
                  if f.name not in SUITE_FIXED and f.name not in exclude)
    group = parser.add_argument_group(
        "fine-tuning (each overrides the suite's setting for every task)")
    add_config_arguments(group, FinetuneConfig, only=names, config_file=False)  # type: ignore[arg-type]
    return names


def finetune_overrides(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The fine-tune options given on the command line (absent ones are not in `args`)."""
    return {k: v for k, v in vars(args).items() if k in names}
