"""`bertflow registry list|show|compare|promote|verify|export|import-hf|register`: the
MLflow model registry."""

from __future__ import annotations

import argparse
import json

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import RegistryConfig

DESCRIPTION = ("browse the MLflow model registry: list, show, compare, promote, verify, "
               "export, import-hf")
EPILOG = """examples:
  bertflow registry list                         # every model, its newest versions, scores
  bertflow registry show bert-tiny@champion      # or bert-tiny/3, or bert-tiny (latest)
  bertflow registry show bert-tiny/3 --all       # lineage, run, files, every param
  bertflow registry compare minilm/1 minilm-adapted/1   # scorecards side by side
  bertflow registry promote bert-tiny 3 --alias champion
  bertflow registry verify bert-tiny@champion    # files vs. checksums taken at registration
  bertflow registry export bert-tiny@champion out/bert-tiny   # the verified copy, to serve
  bertflow registry import-hf path/to/MiniLM --name minilm
  bertflow registry register runs/pretrain-1 --name bert-tiny   # a job's model, the
                                                 # MLflow server having been down at its end

--tracking-uri defaults to $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlruns.db."""

# action -> (help, its fields of RegistryConfig, the required ones)
ACTIONS = {
    "list": ("registered models, one line per version with its key metric",
             ("json", "all"), ()),
    "show": ("one version: labels, how it was trained, eval scores against the baseline, "
             "size and how to use it (--all: everything)", ("ref", "json", "all"), ("ref",)),
    "compare": ("two versions' scorecards (bertflow eval) side by side: per task the "
                "difference and whether it exceeds the restart noise",
                ("ref", "other", "suite", "json"), ("ref", "other")),
    "promote": ("point an alias at a version", ("model", "version", "alias"),
                ("model", "version", "alias")),
    "verify": ("check a version's files against the sha256 manifest recorded when it was "
               "registered (exit 2 on a mismatch)", ("ref",), ("ref",)),
    "export": ("write a version to a new folder, exactly the files verified against its "
               "manifest (serve or load that copy)", ("ref", "dest"), ("ref", "dest")),
    "import-hf": ("register a Hugging Face-format BERT folder (e.g. MiniLM) as a base",
                  ("model_dir", "name", "experiment"), ("model_dir", "name")),
    "register": ("register the model a training job left in its run folder when the MLflow "
                 "server was unreachable at its end: its kept metrics, the model and the "
                 "version, with the run's lineage", ("run_folder", "name"), ("run_folder",)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("registry", DESCRIPTION, EPILOG)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, (text, fields, required) in ACTIONS.items():
        sp = new_parser(action, text, parent=sub)
        add_config_arguments(sp, RegistryConfig, required=required,
                             only=("tracking_uri", *fields), config_file=False)
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch the registry sub-verb."""
    from workflows import tracking
    from workflows.ops import registry as r

    cfg = config_from_args(RegistryConfig, args)
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    if cfg.action == "list":
        rows = r.list_models(uri)
        if cfg.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            from data_prep.storage import redact

            print(f"no registered models in {redact(uri)}")
        else:
            from workflows.cli.table import format_table

            print(format_table(r.version_rows(rows, None if cfg.all else 5),
                               ["model", "aliases", "task", "key_metric", "base_model",
                                "created"], max_width=None))
        return 0
    if cfg.action == "show":
        info = r.show_model(cfg.ref, uri)
        if cfg.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            print(r.render_summary(info) + ("\n\n" + r.render_model(info) if cfg.all else ""))
        return 0
    if cfg.action == "compare":
        from workflows.cli.table import format_table
        from workflows.evaluation.scorecard import compare_rows, verdict

        a, b, diffs = r.compare_models(cfg.ref, cfg.other, cfg.suite, uri)
        if cfg.json:
            print(json.dumps({"a": a.to_json(), "b": b.to_json(), "differences": {
                d.task: {"diff": d.diff, "noise": d.noise, "beyond_noise": d.beyond_noise}
                for d in diffs}}, indent=2))
            return 0
        print(f"suite {a.suite}: A = {a.model}, B = {b.model}")
        rows = compare_rows(a, b, diffs)
        print(format_table(rows, list(rows[0]), max_width=None))
        print(verdict(diffs, "A", "B"))
        return 0
    if cfg.action == "promote":
        mv = r.promote(cfg.model, cfg.version, cfg.alias, uri)
        print(f"{cfg.model}@{cfg.alias} -> version {mv.version}")
        return 0
    if cfg.action == "verify":
        mv, checks = r.verify(cfg.ref, uri)
        for check in checks:
            print(f"{check.status:<10} {check.path}")
        bad = sum(not c.ok for c in checks)
        print(f"{mv.name} version {mv.version}: " + (
            f"{bad} of {len(checks)} files do not match what was registered; do not load it"
            if bad else f"all {len(checks)} files match what was registered"))
        return 2 if bad else 0
    if cfg.action == "export":
        out = r.export(cfg.ref, cfg.dest, uri)
        print(f"exported {out.version.name} version {out.version.version} to {out.folder} "
              f"({out.files} files, each checked against the manifest recorded at "
              f"registration)")
        print(f"  serve it:      mlflow models serve -m {out.folder}")
        print(f"  in Python:     mlflow.pyfunc.load_model({str(out.folder)!r})")
        print(f"  model folder:  {out.model_folder}")
        print("  transformers:  " + (f"loads {out.model_folder} and predicts what bertflow "
                                     "predicts" if out.transformers is None
                                     else f"NOT USABLE: {out.transformers}"))
        print(f"  check again:   cd {out.folder} && sha256sum -c bertflow.sha256")
        return 0
    if cfg.action == "register":
        pending, model_uri, version = r.register_run(cfg.run_folder, cfg.name or None,
                                                     cfg.tracking_uri)
        name = cfg.name or pending.register_as
        print(f"run {pending.run_id}: kept metrics sent, model logged ({model_uri})"
              + (f", registered as models:/{name}/{version}" if version else ""))
        return 0
    from workflows.ops.hf_import import import_hf

    mv = import_hf(cfg.model_dir, cfg.name, uri, experiment=cfg.experiment)
    print(f"registered {cfg.model_dir} as {mv.name} version {mv.version} "
          f"(use it as models:/{mv.name}/{mv.version} or models:/{mv.name}@latest)")
    return 0
