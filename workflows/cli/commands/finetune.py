"""`bertflow finetune`: fine-tune a BERT for seq-cls, pair-cls, token-cls or qa."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import FinetuneConfig

DESCRIPTION = "fine-tune a BERT for seq-cls, pair-cls, token-cls or qa, then evaluate/register"

EPILOG = """examples:
  bertflow finetune --task seq-cls --base models:/bert-tiny@latest --train train.csv --eval dev.csv
  bertflow finetune --task token-cls --base path/to/hf_bert --train train.conll --eval dev.conll
  bertflow finetune --task qa --base models:/bert-mini/3 --train train-v2.0.json \\
      --eval dev-v2.0.json --max-seq-len 384 --doc-stride 128 --register-as bert-mini-squad
  bertflow finetune --config configs/finetune_seq_cls.yaml --freeze-encoder
  bertflow finetune --task seq-cls --base models:/bert-tiny@latest --train s3://bucket/train.jsonl \\
      --eval s3://bucket/dev.jsonl --storage-path s3://bucket/runs --address auto

data: seq-cls CSV/TSV/JSONL with text,label; pair-cls text_a,text_b,label (other column
names: --text-column, --text-pair-column, --label-column); token-cls CoNLL (tag in the
last column, BIO); qa SQuAD v1.1/v2.0 JSON. Bad rows are reported with file and line,
counted, and skipped."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("finetune", DESCRIPTION, EPILOG)
    add_config_arguments(parser, FinetuneConfig, required=("base", "train"))
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.training.finetune import run_finetune

    cfg = config_from_args(FinetuneConfig, args)
    result = run_finetune(cfg)
    print(f"model folder: {result.model_dir}")
    print(f"MLflow run:   {result.run_id}  ({result.model_uri or 'model not logged yet'})")
    if result.model_version:
        print(f"registered:   models:/{cfg.tracking.register_as}/{result.model_version}")
    for split, rep in result.skipped.items():
        if rep["skipped"]:
            print(f"skipped {split} records: {rep['by_reason']} (first: {rep['messages'][0]})")
    if result.pending:
        from workflows.deferred_registration import PENDING_EXIT

        print(f"NOT registered: the MLflow server did not answer. Once it does, run:\n"
              f"  {result.pending}")
        return PENDING_EXIT
    return 0
