"""`bertflow server`: an MLflow tracking server with its UI (workflows/ops/server.py)."""

from __future__ import annotations

import argparse

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import ServerConfig

DESCRIPTION = "start an MLflow tracking server (with UI): the project's store, or a database"
EPILOG = """examples:
  bertflow server                              # http://127.0.0.1:5000 on ./mlruns.db
  bertflow server --port 5001 --tracking-uri sqlite:////data/mlruns.db

  # the way a team runs it (the cluster head): PostgreSQL, artifacts on S3, basic auth
  export PGPASSWORD=...  MLFLOW_AUTH_ADMIN_PASSWORD=...   # plus the AWS_* variables
  bertflow server --host 0.0.0.0 --auth \\
      --backend-store-uri postgresql://mlflow@db.internal:5432/mlflow \\
      --artifacts-destination s3://my-bucket/mlartifacts

Artifacts are served through the server: clients need its URL (and, with --auth,
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), never the bucket's credentials.
Without --auth the server binds only to loopback unless --insecure. Passwords never go
on the command line of mlflow and are printed as ***."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("server", DESCRIPTION, EPILOG)
    add_config_arguments(parser, ServerConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the server in the foreground until interrupted; returns its exit code."""
    from workflows.ops.server import serve

    return serve(config_from_args(ServerConfig, args))
