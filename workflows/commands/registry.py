"""`bertflow registry list|show|promote|import-hf`: the MLflow model registry."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = "browse the MLflow model registry: list, show, promote, import-hf"
EPILOG = """examples:
  bertflow registry list
  bertflow registry show bert-tiny@champion      # or bert-tiny/3, or bert-tiny (latest)
  bertflow registry promote bert-tiny 3 --alias champion
  bertflow registry import-hf path/to/MiniLM --name minilm

--tracking-uri defaults to $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlruns.db."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertflow registry", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns.db)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = sub.add_parser("list", parents=[common], help="registered models, one line each")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp = sub.add_parser("show", parents=[common],
                        help="one version with its lineage, metrics, params and artifacts")
    sp.add_argument("ref", metavar="NAME[@ALIAS|/VERSION]", help="the model version")
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp = sub.add_parser("promote", parents=[common], help="point an alias at a version")
    sp.add_argument("name", help="registered model name")
    sp.add_argument("version", help="version number")
    sp.add_argument("--alias", required=True, help="alias to set, e.g. champion")
    sp = sub.add_parser("import-hf", parents=[common],
                        help="register a Hugging Face-format BERT folder (e.g. MiniLM) as a base")
    sp.add_argument("model_dir", metavar="DIR", help="folder with config.json, "
                    "model.safetensors and vocab.txt")
    sp.add_argument("--name", required=True, help="registered model name")
    sp.add_argument("--experiment", default="bertflow", help="MLflow experiment of the import run")
    return p


def main(argv: list[str]) -> int:
    """Dispatch the registry sub-verb."""
    args = build_parser().parse_args(argv)
    from workflows import registry as r

    uri = r.default_tracking_uri(args.tracking_uri)
    if args.action == "list":
        rows = r.list_models(uri)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no registered models in {uri}")
        else:
            print(r.format_table(rows, ["name", "latest", "aliases", "task", "base_model",
                                        "key_metric", "created"]))
        return 0
    if args.action == "show":
        info = r.show_model(args.ref, uri)
        print(json.dumps(info, indent=2, default=str) if args.json else r.render_model(info))
        return 0
    if args.action == "promote":
        mv = r.promote(args.name, args.version, args.alias, uri)
        print(f"{args.name}@{args.alias} -> version {mv.version}")
        return 0
    mv = r.import_hf(args.model_dir, args.name, uri, experiment=args.experiment)
    print(f"registered {args.model_dir} as {mv.name} version {mv.version} "
          f"(use it as models:/{mv.name}/{mv.version} or models:/{mv.name}@latest)")
    return 0
