"""`bertflow sweep`: the BERT paper's fine-tuning search (or any space) on Ray Tune."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import SweepConfig

DESCRIPTION = ("fine-tune over a grid or search space on Ray Tune; every trial an MLflow "
               "child run, the best point registered")

EPILOG = """examples:
  bertflow sweep --task seq-cls --base models:/bert-mini@latest --train train.csv \\
      --eval dev.csv --grid paper --restarts 3 --register-as sst-mini
  bertflow sweep --task seq-cls --base path/to/hf_bert --train train.csv --eval dev.csv \\
      --grid space.yaml --search random --num-samples 12 --scheduler asha --max-concurrent 2
  bertflow submit sweep --address http://127.0.0.1:8265 --task qa --base ... --grid paper

--grid paper is the BERT paper's 18 points (batch_size 16,32 x lr 5e-5,3e-5,2e-5 x epochs
2,3,4). A YAML space maps fine-tune fields to values or distributions:
  lr: {loguniform: [1e-5, 1e-4]}
  batch_size: [16, 32]
  warmup_ratio: [0.0, 0.1]
Options not in the space (--max-seq-len, --weight-decay, ...) apply to every trial.
Rerunning the same --run-name resumes an unfinished sweep."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("sweep", DESCRIPTION, EPILOG)
    add_config_arguments(parser, SweepConfig, required=("base", "train", "eval"))
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.cli.table import format_table
    from workflows.training.sweep import run_sweep

    cfg = config_from_args(SweepConfig, args)
    result = run_sweep(cfg)
    rows = result.rows
    columns = list(rows[0]) if rows else []
    print(f"\nsweep {result.name}: {len(result.trials)} trials, ranked by the mean "
          f"{result.metric} ({cfg.mode}):\n{format_table(rows, columns)}\n")
    print(f"MLflow parent run: {result.run_id}")
    print(f"winner:            trial {result.winner.trial_id} (seed {result.winner.seed}, "
          f"run {result.winner.run_id})")
    print(f"model:             {result.model_uri}")
    if result.model_version:
        print(f"registered:        models:/{cfg.tracking.register_as}/{result.model_version}")
    if result.pending:
        from workflows.deferred_registration import PENDING_EXIT

        print(f"NOT registered: the MLflow server did not answer. Once it does, run:\n"
              f"  {result.pending}")
        return PENDING_EXIT
    return 0
