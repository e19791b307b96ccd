"""`bertflow` command line: a thin dispatcher over one module per verb.

Each verb lives in `workflows/commands/<verb>.py` and exposes
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int
or, for verbs with their own sub-verbs, `main(argv: list[str]) -> int`.
Only the chosen verb's module is imported, and verb modules import torch / ray / mlflow
inside `run`, so `bertflow --help` and `bertflow VERB --help` answer instantly.

Options of config-driven verbs are generated from the stage's dataclass
(`add_config_arguments`), so the CLI, the YAML files under configs/ and the Python API
share one definition of every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import typing
from typing import Any, TypeVar

from bert_core.config_io import BertflowError, field_types, from_dict, read_mapping

T = TypeVar("T")

# verb -> one-line description; the module is workflows.commands.<verb>
VERBS: dict[str, str] = {
    "prep": "prepare a pretraining dataset from raw text (Ray Data); `prep rerun DIR` rebuilds one",
    "datasets": "list prepared datasets and whether each is up to date with its inputs",
    "pretrain": "pretrain BERT with masked-LM + NSP/SOP on Ray Train, tracked in MLflow",
    "finetune": "fine-tune a BERT for seq-cls, pair-cls, token-cls or qa, then evaluate/register",
    "predict": "batch predictions from a fine-tuned model over a file",
    "embed": "write embeddings (pooled vectors or a hidden layer) of texts to Parquet",
    "registry": "browse the MLflow model registry: list, show, promote, import-hf",
    "server": "start an MLflow tracking server (with UI) on the project's store (127.0.0.1)",
    "submit": "submit a bertflow job to a Ray cluster through the Jobs API",
    "jobs": "list, inspect, follow or stop jobs on a Ray cluster",
    "quickstart": "run the whole workflow end to end on embedded defaults (no network)",
}

EPILOG = """examples:
  bertflow quickstart
  bertflow prep --input corpus/ --output data/wiki128 --vocab vocab.txt
  bertflow pretrain --data data/wiki128 --run-name tiny-1 --model-size tiny --register-as bert-tiny
  bertflow finetune --task seq-cls --base models:/bert-tiny@latest --train train.csv --eval dev.csv
  bertflow registry list

Run `bertflow VERB --help` for the options of a verb."""


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


def add_config_arguments(parser: argparse.ArgumentParser, cls: type,
                         skip: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> None:
    """Add one option per field of dataclass `cls`, plus `--config FILE` (YAML).

    Absent options stay out of the namespace (default SUPPRESS), so a value comes from,
    in increasing priority: the dataclass default, the YAML file, the command line.
    `required` fields are marked in --help but checked when the config is built, because
    they may come from the YAML file instead.
    """
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file with any of the settings below (flags override it)")
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        arg_type, extra = _type_for(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if f.name in required:
            help_text += " (required)"
        elif default not in (None, "", [], ()):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": help_text, **extra}
        if arg_type is not None:
            kwargs["type"] = arg_type
            kwargs.setdefault("metavar", f.name.upper() if "choices" not in extra else None)
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
        parser.add_argument(flag, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace,
                     extra: dict[str, Any] | None = None) -> T:
    """Merge dataclass defaults <- `--config` YAML <- command-line flags into `cls`."""
    data: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "config", None):
        data.update(read_mapping(args.config))
        source = f"{args.config} + command line"
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    data.update(extra or {})
    return from_dict(cls, data, source)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _top_help() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: bertflow VERB [options]", "",
             "Pretrain and fine-tune BERT on Ray, with every model tracked in MLflow.", "",
             "verbs:"]
    lines += [f"  {v.ljust(width)}  {h}" for v, h in VERBS.items()]
    return "\n".join(lines + ["", EPILOG])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version
        print(f"bertflow {version('bertflow')}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"bertflow: unknown verb {verb!r}. Valid verbs: {', '.join(VERBS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"workflows.commands.{verb}")
    verbose = "-v" in rest or "--verbose" in rest
    setup_logging(verbose)
    try:
        if hasattr(module, "main"):
            return int(module.main(rest) or 0)
        parser = argparse.ArgumentParser(
            prog=f"bertflow {verb}", description=VERBS[verb],
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except BertflowError as exc:
        print(f"bertflow {verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bertflow {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
