"""`bertflow pretrain`: masked-LM + NSP/SOP pretraining on Ray Train, tracked in MLflow."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import PretrainConfig

DESCRIPTION = "pretrain BERT with masked-LM + NSP/SOP on Ray Train, tracked in MLflow"

EPILOG = """examples:
  bertflow pretrain --data data/wiki128 --run-name tiny-1 --model-size tiny --register-as bert-tiny
  bertflow pretrain --config configs/pretrain_tiny.yaml --data data/wiki128 --run-name tiny-2
  bertflow pretrain --data data/wiki128 --run-name base-p1 --model-size base --use-gpu \\
      --num-workers 8 --precision bf16 --optimizer lamb --batch-size 64 --max-failures 3
  # BERT's phase 2 (length 512) continues from phase 1's registered model:
  bertflow pretrain --data data/wiki512 --run-name base-p2 --init models:/bert-base@latest ...
  # On a cluster: checkpoints on object storage (required with several nodes), MLflow server:
  MLFLOW_TRACKING_URI=http://head:5000 bertflow pretrain --address auto \\
      --data s3://bucket/data/wiki128 --storage-path s3://bucket/runs --run-name tiny-c ...

Rerunning a command with the same --run-name (and --storage-path) resumes it from its
latest checkpoint in the same MLflow run; a finished run is not trained again."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("pretrain", DESCRIPTION, EPILOG)
    add_config_arguments(parser, PretrainConfig, required=("data", "run_name"))
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.training.pretrain import run_pretrain

    cfg = config_from_args(PretrainConfig, args)
    result = run_pretrain(cfg)
    print(f"trained {result.step} steps (last start at step {result.start_step})")
    print(f"model folder: {result.model_dir}")
    print(f"MLflow run:   {result.run_id}  ({result.model_uri or 'model not logged yet'})")
    if result.model_version:
        print(f"registered:   models:/{cfg.tracking.register_as}/{result.model_version}")
    val = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
    if val:
        print("validation:   " + ", ".join(f"{k[4:]}={v:.4g}" for k, v in sorted(val.items())))
    if result.pending:
        from workflows.deferred_registration import PENDING_EXIT

        print(f"NOT registered: the MLflow server did not answer. Once it does, run:\n"
              f"  {result.pending}")
        return PENDING_EXIT
    return 0
