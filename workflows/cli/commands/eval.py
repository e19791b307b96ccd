"""`bertflow eval MODEL... --suite FILE|glue`: a model's downstream scorecard."""

from __future__ import annotations

import argparse
import json

from workflows.cli.args import (add_config_arguments, add_finetune_overrides,
                                config_from_args, finetune_overrides, new_parser)
from workflows.config import EvalConfig

DESCRIPTION = ("fine-tune models on every task of a suite (grid points x restarts as Ray "
               "Tune trials) and print each one's scorecard")

EPILOG = """examples:
  bertflow eval models:/bert-mini@latest models:/minilm/1 --suite configs/suites/example.yaml
  bertflow eval models:/bert-base/3 --suite glue --data-dir glue_data --restarts 3
  bertflow eval models:/bert-mini/2 --suite my.yaml --grid '{lr: [5e-5, 3e-5]}' --epochs 2 --json
  bertflow submit eval models:/bert-base@champion --suite glue --data-dir s3://bucket/glue \\
      --dashboard-url http://127.0.0.1:8265

A suite is a YAML file of tasks (task, train, eval, metric and any fine-tune field), a
grid, restarts and defaults; `glue` reads the GLUE folder as distributed with each task's
official metric. Each task scores the best grid point's dev mean +- std over restarts;
each trial keeps its best epoch. The scorecard goes to an MLflow parent run per model and,
for a registered model, to its version (`bertflow registry show`, `registry compare A B`).
Rerunning the same command resumes: finished trials are not trained again."""

_OVERRIDES: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    global _OVERRIDES
    parser = new_parser("eval", DESCRIPTION, EPILOG)
    add_config_arguments(parser, EvalConfig, required=("models", "suite"))
    _OVERRIDES = add_finetune_overrides(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.cli.table import format_table
    from workflows.evaluation.run import run_eval
    from workflows.evaluation.scorecard import scorecard_rows

    cfg = config_from_args(EvalConfig, args,
                           extra={"overrides": finetune_overrides(args, _OVERRIDES)})
    result = run_eval(cfg)
    cards = result.scorecards
    if cfg.json:
        data = [c.to_json() for c in cards]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        return 0
    for card in cards:
        where = f"version {card.version}" if card.version else "not registered"
        print(f"\nscorecard of {card.model} on {card.suite} ({where}; MLflow run "
              f"{card.run_id}):")
        rows = scorecard_rows(card)
        print(format_table(rows, list(rows[0]), max_width=None))
    if len(cards) > 1:
        ranked = sorted(cards, key=lambda c: -(c.average if c.average is not None else -1e9))
        print("\nranked by the average:")
        print(format_table([{"rank": i, "model": c.model, "average": f"{c.average:.4f}"}
                            for i, c in enumerate(ranked, 1)], ["rank", "model", "average"]))
    print(f"\nevaluation {result.name}: {result.experiment_path}"
          + ("  (resumed)" if result.resumed else ""))
    return 0
