"""`bertflow quickstart`: corpus -> prep -> pretrain -> register -> import MiniLM ->
fine-tune -> evaluate -> register -> predict, offline, on local Ray."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import QuickstartConfig

DESCRIPTION = "run the whole workflow end to end on embedded defaults (no network)"
EPILOG = """examples:
  bertflow quickstart                         # what `make quickstart` runs (< 10 min, 2 cores)
  bertflow quickstart --pretrain-steps 50 --finetune-epochs 1 --output /tmp/qs

Outputs go to --output (default ./quickstart_out) and the MLflow store (default
./mlruns.db + ./mlartifacts); the summary at the end says how to look at them."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("quickstart", DESCRIPTION, EPILOG)
    add_config_arguments(parser, QuickstartConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the quickstart and print its summary."""
    import os

    from workflows.quickstart.run import run_quickstart
    from workflows.quickstart.summary import render_summary

    # Offline by design (also when not started through `make`): never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result = run_quickstart(config_from_args(QuickstartConfig, args))
    print(render_summary(result))
    return 0
