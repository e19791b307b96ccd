"""`bertflow embed`: write embeddings of texts (pooled vectors or a hidden layer) to Parquet."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import EmbedConfig

DESCRIPTION = "write embeddings (pooled vectors or a hidden layer) of texts to Parquet"
EPILOG = """examples:
  bertflow embed --model models:/bert-mini@latest --input texts.csv --output vectors.parquet
  bertflow embed --model path/to/hf_bert --input docs.jsonl --output cls_l4.parquet \\
      --pooling cls --layer 4

--pooling mean averages the real tokens' vectors (the better sentence feature for a
BERT that was not fine-tuned for it), cls takes the raw [CLS] vector, pooler BERT's tanh
pooler over it (what `finetune --pooling pooler` classifies from).
--text-column names the input's text column (default text); --use-gpu and --num-cpus
size each replica as in `bertflow predict`.
--layer N reads hidden_states[N] (0 = embeddings, -1 = last) instead of the last layer.
A sentence-transformers folder (modules.json, 1_Pooling, sentence_bert_config.json) is
embedded as it says (its pooling, max_seq_length and normalisation), so the vectors equal
SentenceTransformer(folder).encode(...); --pooling, --max-seq-len and --[no-]normalize
override it."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("embed", DESCRIPTION, EPILOG)
    add_config_arguments(parser, EmbedConfig, required=("model", "input", "output"))
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.serving.batch import embed_file

    s = embed_file(config_from_args(EmbedConfig, args))
    print(f"wrote {s['rows']} embeddings of dimension {s['dim']} to {s['output']}")
    return 0
