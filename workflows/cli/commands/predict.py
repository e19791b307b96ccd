"""`bertflow predict`: batch predictions of a fine-tuned model over a CSV/TSV/JSONL file."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import PredictConfig

DESCRIPTION = "batch predictions from a fine-tuned model over a file"
EPILOG = """examples:
  bertflow predict --model models:/sentiment@champion --input reviews.csv --output scored.csv
  bertflow predict --model runs/finetune-qa/checkpoint_00000100 --input questions.jsonl \\
      --output answers.jsonl --concurrency 2
  bertflow predict --model models:/sentiment@champion --input s3://bucket/in.csv \\
      --output s3://bucket/scored.csv

input columns: text (seq-cls), text_a + text_b (pair-cls), tokens (token-cls: a list in
JSONL, or words separated by spaces), question + context (qa); --text-column and
--text-pair-column name yours (`--text-column review`). The output keeps the input
columns and adds the predictions and an `error` column for rows that could not be used."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("predict", DESCRIPTION, EPILOG)
    add_config_arguments(parser, PredictConfig, required=("model", "input", "output"))
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.serving.batch import predict_file

    summary = predict_file(config_from_args(PredictConfig, args))
    print(f"{summary['task']}: wrote {summary['rows']} rows to {summary['output']}"
          + (f" ({summary['errors']} without a prediction: see the error column)"
             if summary["errors"] else ""))
    return 0
