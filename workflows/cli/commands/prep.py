"""`bertflow prep`: build a pretraining dataset; `bertflow prep rerun DIR`: rebuild one."""

from __future__ import annotations

import argparse

from workflows.cli.args import (add_config_arguments, add_renamed_option, config_from_args,
                                new_parser)

DESCRIPTION = ("prepare a pretraining dataset from raw text (Google's create_pretraining_data "
               "recipe on Ray Data); `bertflow prep rerun DIR` rebuilds one from its manifest")
EPILOG = """examples:
  bertflow prep --input corpus/ --output data/wiki128 --vocab vocab.txt
  bertflow prep --input 'shards/*.jsonl.gz' --output data/zh --train-vocab 21128 --objective sop
  bertflow prep --input my_corpus/ --output data/mine --vocab models:/minilm@latest
  bertflow prep rerun data/wiki128            # "up to date", or rebuilds if inputs changed
  bertflow prep rerun data/wiki128 --force    # rebuild anyway
  bertflow prep --input s3://corpora/wiki/ --output s3://datasets/wiki128 --vocab vocab.txt

--input, --output, --vocab and DIR may be URIs (s3://, gs://, ... anything pyarrow.fs
resolves); credentials and endpoints come from the store's standard variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...). On an
object store the dataset is published by writing its manifest.json last."""


def build_parser() -> argparse.ArgumentParser:
    from data_prep.config import PrepConfig

    parser = new_parser("prep", DESCRIPTION, EPILOG)
    add_config_arguments(parser, PrepConfig, required=("input", "output"))
    sub = parser.add_subparsers(dest="action", metavar="rerun DIR")
    rerun = new_parser("rerun", "rebuild a dataset from the config stored in DIR/manifest.json",
                       parent=sub)
    rerun.add_argument("dir", metavar="DIR", help="a dataset folder (or URI) written by "
                       "bertflow prep")
    rerun.add_argument("--force", action="store_true", help="rebuild even if up to date")
    rerun.add_argument("--address", help="Ray cluster address (default: none: this machine's "
                       "processes run every pass, with no Ray)")
    rerun.add_argument("--tokenize-workers", type=int,
                       help="items of a pass at once: processes, or Ray tasks (output "
                       "unchanged)")
    add_renamed_option(rerun, "--num-workers", "--tokenize-workers", "tokenize_workers",
                       type=int)
    return parser


def _report(manifest, out: str) -> None:
    c = manifest.counts
    skipped = ", ".join(f"{k} {v}" for k, v in c.get("documents_skipped", {}).items()) or "none"
    print(f"{out}: {c['train']['instances']} train / {c['val']['instances']} val instances, "
          f"{c['tokens']} tokens; documents read {c['documents_read']}, used "
          f"{c['documents_used']}, skipped: {skipped}")


def run(args: argparse.Namespace) -> int:
    """Build (or with `rerun`, rebuild) the dataset and report its counts."""
    from bert_core.config_io import from_dict, renamed_keys
    from data_prep.config import PrepConfig

    if getattr(args, "action", None) == "rerun":
        from data_prep.manifest import open_dataset

        # a manifest written before a rename: its keys, silently under today's names
        renames = renamed_keys(PrepConfig)
        stored = {renames.get(k, k): v
                  for k, v in open_dataset(args.dir, "DIR")[1].config.items()}
        stored.update(output=args.dir, force=args.force)
        if args.address is not None:
            stored["address"] = args.address
        if args.tokenize_workers is not None:
            stored["tokenize_workers"] = args.tokenize_workers
        config = from_dict(PrepConfig, stored, f"{args.dir}/manifest.json")
    else:
        config = config_from_args(PrepConfig, args)

    from workflows.ops.datasets import prepare_dataset

    manifest = prepare_dataset(config)
    _report(manifest, config.output)
    return 0
