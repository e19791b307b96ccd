"""`bertflow adapt BASE --corpus PATH... --suite FILE`: did domain pretraining help?"""

from __future__ import annotations

import argparse
import json

from workflows.cli.args import (add_config_arguments, add_finetune_overrides,
                                config_from_args, finetune_overrides, new_parser)
from workflows.config import AdaptConfig

DESCRIPTION = ("continue pretraining a model on your corpus (its own tokenizer, masked-LM), "
               "register it, and compare it with the original on a suite")

EPILOG = """examples:
  bertflow adapt models:/minilm@latest --corpus papers/ --suite configs/suites/example.yaml \\
      --max-steps 2000 --lr 5e-5 --restarts 3
  bertflow adapt models:/bert-base/1 --corpus 'notes/*.txt' --suite glue --data-dir glue_data

Four ordinary runs: prep (BASE's vocabulary), pretrain --init BASE (registered as
BASE-adapted with lineage to BASE and the dataset), and one evaluation of both models on
the suite with the same seeds; printed: per task the difference (adapted - base) with its
restart noise, and a one-line verdict. The same command again resumes where it stopped.
--lr, --max-steps and --max-seq-len are continued pretraining's (--max-seq-len also every
task's); the fine-tuning options below override the suite's."""

# Options adapt has for itself (pretraining's) or sets for the suite from its own.
_OWN = ("lr", "max_steps", "max_seq_len", "epochs", "seed", "address", "storage_path",
        "tracking_uri", "experiment")
_OVERRIDES: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    global _OVERRIDES
    parser = new_parser("adapt", DESCRIPTION, EPILOG)
    add_config_arguments(parser, AdaptConfig, required=("base", "corpus", "suite"))
    _OVERRIDES = add_finetune_overrides(parser, exclude=_OWN)
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.cli.table import format_table
    from workflows.evaluation.adapt import run_adapt
    from workflows.evaluation.scorecard import compare_rows

    cfg = config_from_args(AdaptConfig, args,
                           extra={"overrides": finetune_overrides(args, _OVERRIDES)})
    result = run_adapt(cfg)
    if cfg.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    rows = compare_rows(result.base, result.adapted, result.differences)
    for row in rows:
        row["base"], row["adapted"], row["adapted - base"] = row.pop("a"), row.pop("b"), \
            row.pop("b - a")
    columns = ["task", "metric", "base", "adapted", "adapted - base", "noise", "beyond noise"]
    print(f"\n{result.base.model} vs {result.adapted_model} on {result.base.suite}:")
    print(format_table(rows, columns, max_width=None))
    print(f"verdict: {result.verdict}")
    print(f"adapted model: {result.adapted_model}  (dataset {result.dataset})")
    return 0
