"""`bertflow datasets list [ROOT]`: prepared datasets and whether each is up to date."""

from __future__ import annotations

import argparse

DESCRIPTION = "list prepared datasets and whether each is up to date with its inputs"
EPILOG = """examples:
  bertflow datasets list                 # every dataset under the current folder
  bertflow datasets list data/ --no-check

A STALE dataset is rebuilt from its manifest with `bertflow prep rerun DIR`."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertflow datasets", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = sub.add_parser("list", help="datasets (folders with manifest.json) under ROOT")
    sp.add_argument("root", nargs="?", default=".", metavar="ROOT",
                    help="folder to search (default: the current folder)")
    sp.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="rehash the inputs to tell up to date from STALE (default: on)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str]) -> int:
    """List datasets; exit code 0 even when some are stale (it is a report)."""
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from bert_core.config_io import BertflowError
    from workflows.datasets import list_datasets, to_json
    from workflows.registry import format_table

    if not Path(args.root).is_dir():
        raise BertflowError(f"{args.root}: no such folder")
    rows = list_datasets(args.root, check_inputs=args.check)
    if args.json:
        print(to_json(rows))
    elif not rows:
        print(f"no prepared datasets (folders with manifest.json) under {args.root}")
    else:
        print(format_table(rows, ["path", "kind", "objective", "instances", "tokens",
                                  "created", "status"], max_width=60))
    return 0
