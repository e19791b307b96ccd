"""`bertflow server`: an MLflow tracking server with its UI on the project's store."""

from __future__ import annotations

import argparse
import logging

EPILOG = """examples:
  bertflow server                              # http://127.0.0.1:5000 on ./mlruns.db
  bertflow server --port 5001 --tracking-uri sqlite:////data/mlruns.db

The server binds to 127.0.0.1 unless --host says otherwise. Point clients at it with
--tracking-uri http://127.0.0.1:5000 (or MLFLOW_TRACKING_URI)."""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default: 127.0.0.1; anything else exposes "
                             "the store, unauthenticated, to that network)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="sqlite store to serve (default: $MLFLOW_TRACKING_URI, else "
                             "./mlruns.db)")
    parser.add_argument("--artifacts", metavar="DIR",
                        help="artifact folder the server stores and serves "
                             "(default: mlartifacts beside the store)")


def run(args: argparse.Namespace) -> int:
    """Run the server in the foreground until interrupted; returns its exit code."""
    import subprocess

    from workflows.registry import server_command

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: anyone who can reach it can read and change the store "
                    "(MLflow has no authentication here)", args.host)
    cmd = server_command(args.tracking_uri, args.host, args.port, args.artifacts)
    print(f"MLflow UI and tracking server: http://{args.host}:{args.port}  (Ctrl-C stops it)")
    print(f"  store:     {cmd[cmd.index('--backend-store-uri') + 1]}")
    print(f"  artifacts: {cmd[cmd.index('--artifacts-destination') + 1]}")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
