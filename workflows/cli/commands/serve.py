"""`bertflow serve MODEL...`: models behind HTTP JSON on Ray Serve, following aliases."""

from __future__ import annotations

import argparse
import signal

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import ServeConfig

DESCRIPTION = "serve models over HTTP on Ray Serve (batched, autoscaled, following an alias)"
EPILOG = """examples:
  bertflow serve models:/sentiment@champion
  curl -s localhost:8000/sentiment/predict -H 'content-type: application/json' \\
      -d '{"inputs": [{"text": "a fine film"}]}'
  BERTFLOW_SERVE_TOKEN=... bertflow serve models:/sentiment@champion models:/minilm/1 \\
      --host 0.0.0.0 --max-replicas 4
  bertflow submit serve models:/sentiment@champion --address http://HEAD:8265 --host 0.0.0.0

routes per model NAME: POST /NAME/predict {"inputs": [ROW, ...]}, POST /NAME/embed
{"inputs": [{"text": ...}, ...]}, GET /NAME; GET /-/healthz. Moving the alias
(`bertflow registry promote NAME VERSION --alias champion`) switches the served version
within --poll-interval seconds, without failing a request. See docs/serving.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("serve", DESCRIPTION, EPILOG)
    add_config_arguments(parser, ServeConfig, required=("models",))
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from workflows.serving.serve import Serving

    serving = Serving(config_from_args(ServeConfig, args))
    # `bertflow jobs stop` sends SIGTERM: delete the applications as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        models = serving.start()
        cfg = serving.cfg
        for name, model in models.items():
            follows = f", following {model.followed}" if model.followed else ""
            print(f"serving {name} version {model.version} at "
                  f"http://{cfg.host}:{cfg.port}/{name}{follows}", flush=True)
        print("Ctrl-C stops serving", flush=True)
        serving.follow()
    finally:
        serving.stop()
    return 0
