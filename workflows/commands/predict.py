"""`bertflow predict`: batch predictions of a fine-tuned model over a CSV/TSV/JSONL file."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  bertflow predict --model models:/sentiment@champion --input reviews.csv --output scored.csv
  bertflow predict --model runs/finetune-qa/checkpoint_00000100 --input questions.jsonl \\
      --output answers.jsonl --concurrency 2

input columns: text (seq-cls), text_a + text_b (pair-cls), tokens (token-cls: a list in
JSONL, or words separated by spaces), question + context (qa). The output keeps the input
columns and adds the predictions and an `error` column for rows that could not be used."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint or a model folder")
    parser.add_argument("--input", required=True, help="CSV, TSV or JSONL file (or folder of them)")
    parser.add_argument("--output", required=True, help="CSV, TSV or JSONL file to write")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch (default: 64)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="model replicas (Ray actors) working in parallel (default: 1)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default: 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per replica")
    parser.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ references")


def run(args: argparse.Namespace) -> int:
    from workflows.predict import predict_file

    summary = predict_file(args.model, args.input, args.output, batch_size=args.batch_size,
                           concurrency=args.concurrency, num_cpus=args.num_cpus,
                           use_gpu=args.use_gpu, address=args.address,
                           tracking_uri=args.tracking_uri)
    print(f"{summary['task']}: wrote {summary['rows']} rows to {summary['output']}"
          + (f" ({summary['errors']} without a prediction: see the error column)"
             if summary["errors"] else ""))
    return 0
