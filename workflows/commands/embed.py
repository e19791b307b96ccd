"""`bertflow embed`: write embeddings of texts (pooled vectors or a hidden layer) to Parquet."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  bertflow embed --model models:/bert-mini@latest --input texts.csv --output vectors.parquet
  bertflow embed --model path/to/hf_bert --input docs.jsonl --output cls_l4.parquet \\
      --pooling cls --layer 4

--pooling mean averages the real tokens' vectors (the better sentence feature for a
BERT that was not fine-tuned for it), cls takes the [CLS] vector, pooler the pooler output.
--layer N reads hidden_states[N] (0 = embeddings, -1 = last) instead of the last layer."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint or a model folder")
    parser.add_argument("--input", required=True, help="CSV, TSV or JSONL file with a text column")
    parser.add_argument("--output", required=True, help="Parquet file to write (FILE.parquet)")
    parser.add_argument("--pooling", choices=["cls", "mean", "pooler"], default="mean",
                        help="how a text's token vectors become one vector (default: mean)")
    parser.add_argument("--layer", type=int, default=None,
                        help="hidden layer to read (0 = embeddings; default: the last)")
    parser.add_argument("--text-column", default="text", help="column holding the texts")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch (default: 64)")
    parser.add_argument("--concurrency", type=int, default=1, help="model replicas (default: 1)")
    parser.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ references")


def run(args: argparse.Namespace) -> int:
    from workflows.embed import embed_file

    s = embed_file(args.model, args.input, args.output, pooling=args.pooling, layer=args.layer,
                   text_column=args.text_column, batch_size=args.batch_size,
                   concurrency=args.concurrency, address=args.address,
                   tracking_uri=args.tracking_uri)
    print(f"wrote {s['rows']} embeddings of dimension {s['dim']} to {s['output']}")
    return 0
