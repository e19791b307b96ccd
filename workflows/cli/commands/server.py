"""`bertflow server`: an MLflow tracking server with its UI on the project's store."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import ServerConfig

DESCRIPTION = "start an MLflow tracking server (with UI) on the project's store (127.0.0.1)"
EPILOG = """examples:
  bertflow server                              # http://127.0.0.1:5000 on ./mlruns.db
  bertflow server --port 5001 --tracking-uri sqlite:////data/mlruns.db

The server binds to 127.0.0.1 unless --host says otherwise. Point clients at it with
--tracking-uri http://127.0.0.1:5000 (or MLFLOW_TRACKING_URI)."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("server", DESCRIPTION, EPILOG)
    add_config_arguments(parser, ServerConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the server in the foreground until interrupted; returns its exit code."""
    from workflows.ops.server import serve

    return serve(config_from_args(ServerConfig, args))
