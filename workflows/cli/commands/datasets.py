"""`bertflow datasets list [ROOT]`: prepared datasets and whether each is up to date."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import DatasetsConfig

DESCRIPTION = "list prepared datasets and whether each is up to date; show one"
EPILOG = """examples:
  bertflow datasets list                 # every dataset under the current folder
  bertflow datasets list data/ --no-check
  bertflow datasets list s3://bucket/datasets/   # credentials from AWS_* variables
  bertflow datasets show data/wiki128    # how it was made, what it holds, how to use it

A STALE dataset is rebuilt from its manifest with `bertflow prep rerun DIR` (the paths
are printed whole, to be pasted)."""

# action -> (help, its fields of DatasetsConfig, the required ones)
ACTIONS = {
    "list": ("datasets (folders with manifest.json) under ROOT", ("root", "check", "json"),
             ()),
    "show": ("one dataset: settings, inputs, tokenizer, counts, splits, status",
             ("dataset", "check", "json"), ("dataset",)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("datasets", DESCRIPTION, EPILOG)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, (text, fields, required) in ACTIONS.items():
        sp = new_parser(action, text, parent=sub)
        add_config_arguments(sp, DatasetsConfig, only=fields, required=required,
                             config_file=False)
    return parser


def run(args: argparse.Namespace) -> int:
    """List or show datasets; exit code 0 even when some are stale (it is a report)."""
    from bert_core.config_io import BertflowError
    from data_prep.storage import check_location
    from workflows.cli.table import format_table
    from workflows.ops.datasets import list_datasets, render_dataset, show_dataset, to_json

    cfg = config_from_args(DatasetsConfig, args)
    if cfg.action == "show":
        info = show_dataset(cfg.dataset, check_inputs=cfg.check)
        print(to_json(info) if cfg.json else render_dataset(info))
        return 0
    if not check_location(cfg.root, "ROOT", must_exist=False).is_dir():
        raise BertflowError(f"{cfg.root}: no such folder (or prefix holding files)")
    rows = list_datasets(cfg.root, check_inputs=cfg.check)
    if cfg.json:
        print(to_json(rows))
    elif not rows:
        print(f"no prepared datasets (folders with manifest.json) under {cfg.root}")
    else:
        print(format_table(rows, ["path", "kind", "objective", "instances", "tokens",
                                  "created", "status"], max_width=None))
    return 0
