"""`bertflow submit VERB ARGS... --dashboard-url http://HOST:8265 [--wait]`: run a verb as a Ray job.

Options of `submit` itself may appear anywhere; everything else is passed to the verb
unchanged (put it after `--` if a verb option clashes with one below).
"""

from __future__ import annotations

import argparse
import sys

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import SubmitConfig

DESCRIPTION = "submit a bertflow job to a Ray cluster through the Jobs API"
PASS_THROUGH = True  # everything that is not an option of submit goes to the verb
EPILOG = """examples:
  bertflow submit prep --dashboard-url http://127.0.0.1:8265 --wait \\
      --input /data/corpus --output /data/wiki128 --vocab /data/vocab.txt
  bertflow submit pretrain --dashboard-url http://127.0.0.1:8265 \\
      --tracking-uri http://10.0.0.5:5000 --data /data/wiki128 --run-name base-1 \
      --use-gpu --num-workers 4
  bertflow jobs logs bertflow-pretrain-1 --follow

--dashboard-url is the Jobs API (http://HOST:8265); the job itself joins the cluster
(the verb gets --address auto unless it is given one after `--`).

Only bert_core/, data_prep/, workflows/, configs/, pyproject.toml and constraints.txt are
shipped as the job's working_dir (symbolic links are not followed); the tracking URI
reaches the job as MLFLOW_TRACKING_URI, and the credential variables set here (AWS_*,
MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN) through its runtime environment (names
printed, never values). A cleartext http:// address off this machine is
refused (the Ray auth token would cross the network): tunnel it, or --insecure."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("submit", DESCRIPTION, EPILOG)
    add_config_arguments(parser, SubmitConfig, required=("verb",), config_file=False)
    return parser


def run(args: argparse.Namespace) -> int:
    """Submit, and with --wait follow the job to its end."""
    from workflows.ops.jobs import (JobError, connect, default_address, exit_code_for,
                                    log_tail, submit_verb, wait_for_job)
    from workflows.tracking import resolve_tracking_uri

    cfg = config_from_args(SubmitConfig, args)
    verb_args = list(getattr(args, "verb_args", []))
    if verb_args and verb_args[0] == "--":
        verb_args = verb_args[1:]
    address = cfg.dashboard_url or default_address()
    if not address:
        raise JobError("--dashboard-url is required (or set RAY_ADDRESS=http://HOST:8265)")
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    client = connect(address, cfg.insecure)
    job = submit_verb(address, cfg.verb, verb_args, tracking_uri,
                      submission_id=cfg.submission_id, client=client, probe=cfg.probe)
    print(f"submitted job {job.submission_id}: {job.entrypoint}")
    print(f"  shipped: {job.shipped}")
    print(f"  tracking URI: {job.tracking_uri}")
    if job.credentials:
        print(f"  passed to the job (values not shown): {', '.join(job.credentials)}")
    if not cfg.wait:
        print(f"  follow it with: bertflow jobs logs {job.submission_id} --follow "
              f"--dashboard-url {address}")
        return 0
    try:
        status = wait_for_job(client, job.submission_id, stream=True, timeout_s=cfg.timeout,
                              out=sys.stdout)
    except KeyboardInterrupt:
        print(f"\nstopped watching; job {job.submission_id} keeps running "
              f"(`bertflow jobs stop {job.submission_id}` stops it)", file=sys.stderr)
        return 130
    print(f"job {job.submission_id} {status}")
    if status != "SUCCEEDED":
        tail = log_tail(client, job.submission_id)
        if tail:
            print(f"--- last lines of its log:\n{tail}", file=sys.stderr)
        print(f"whole log: bertflow jobs logs {job.submission_id} --dashboard-url {address}",
              file=sys.stderr)
    return exit_code_for(status)
