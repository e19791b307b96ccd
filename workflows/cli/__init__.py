"""`bertflow` command line: a thin dispatcher over one module per verb.

Each verb lives in `workflows/cli/commands/<verb>.py` and exposes
    build_parser() -> argparse.ArgumentParser   (options from the verb's config dataclass)
    run(args: argparse.Namespace) -> int
and, when it passes unknown options on to another verb (`submit`), `PASS_THROUGH = True`
(they arrive as `args.verb_args`). Only the chosen verb's module is imported, and verb
modules import torch / ray / mlflow inside `run`, so `bertflow --help` and
`bertflow VERB --help` answer instantly. Verb modules import their helpers from
`workflows.cli.args`, never from this module.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from bert_core.config_io import BertflowError

# verb -> one-line description; the module is workflows.cli.commands.<verb>
VERBS: dict[str, str] = {
    "prep": "prepare a pretraining dataset from raw text (Ray Data); `prep rerun DIR` rebuilds one",
    "datasets": "list prepared datasets and whether each is up to date with its inputs",
    "pretrain": "pretrain BERT with masked-LM + NSP/SOP on Ray Train, tracked in MLflow",
    "finetune": "fine-tune a BERT for seq-cls, pair-cls, token-cls or qa, then evaluate/register",
    "sweep": "fine-tune over the BERT paper's grid or any space on Ray Tune; best one registered",
    "eval": "a model's downstream scorecard: every task of a suite (or GLUE) on Ray Tune",
    "adapt": "continue pretraining a model on your corpus and measure whether it helped",
    "predict": "batch predictions from a fine-tuned model over a file",
    "embed": "write embeddings (pooled vectors or a hidden layer) of texts to Parquet",
    "serve": "serve models over HTTP on Ray Serve (batched, autoscaled, following an alias)",
    "registry": "browse the MLflow model registry: list, show, compare, promote, verify, ...",
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


def verb_module(verb: str) -> ModuleType:
    """The module of `bertflow VERB` (build_parser + run)."""
    return importlib.import_module(f"workflows.cli.commands.{verb}")


# Verbs that start Ray or train: their full log goes to a file named at the end.
LOGGED_VERBS = {"prep", "pretrain", "finetune", "sweep", "eval", "adapt", "predict", "embed",
                "serve", "quickstart", "submit"}


def _top_help() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: bertflow VERB [options]", "",
             "Pretrain and fine-tune BERT on Ray, with every model tracked in MLflow.", "",
             "verbs:"]
    lines += [f"  {v.ljust(width)}  {h}" for v, h in VERBS.items()]
    return "\n".join(lines + ["", EPILOG])


def safe_mlflow_environment() -> None:
    """Before any verb runs: MLflow may not unpickle model files and sends no telemetry,
    in this process and every one it starts (unless the user set these variables)."""
    from workflows.tracking import MLFLOW_SAFE_ENV

    for key, value in MLFLOW_SAFE_ENV.items():
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    safe_mlflow_environment()
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
    module = verb_module(verb)
    from workflows.cli.logs import setup_logging

    verbose = "-v" in rest or "--verbose" in rest
    # Every verb keeps a log file with -v (the help of -v promises one); the long ones always.
    log_file = setup_logging(verb, verbose, to_file=(verb in LOGGED_VERBS or verbose)
                             and not any(h in rest for h in ("-h", "--help")))
    try:
        parser = module.build_parser()
        if getattr(module, "PASS_THROUGH", False):
            args, args.verb_args = parser.parse_known_args(rest)
        else:
            args = parser.parse_args(rest)
        code = int(module.run(args) or 0)
        if log_file is not None:
            print(f"bertflow {verb}: full log in {log_file}", file=sys.stderr)
        return code
    except BertflowError as exc:
        print(f"bertflow {verb}: error: {exc}", file=sys.stderr)
        if log_file is not None:
            print(f"bertflow {verb}: full log in {log_file}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bertflow {verb}: interrupted", file=sys.stderr)
        return 130
