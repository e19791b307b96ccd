"""`bertflow jobs list|status ID|logs ID [--follow]|stop ID`: jobs on a Ray cluster."""

from __future__ import annotations

import argparse
import sys

from workflows.cli.args import add_config_arguments, config_from_args, new_parser
from workflows.config import JobsConfig

DESCRIPTION = "list, inspect, follow or stop jobs on a Ray cluster"
EPILOG = """examples:
  bertflow jobs list --dashboard-url http://127.0.0.1:8265
  bertflow jobs logs raysubmit_abc123 --follow
  bertflow jobs stop raysubmit_abc123

--dashboard-url defaults to $RAY_ADDRESS when it is an http URL."""

# action -> (help, its fields of JobsConfig besides --dashboard-url)
ACTIONS = {
    "list": ("jobs submitted to the cluster, newest first", ()),
    "status": ("a job's status (exit code 0 only if SUCCEEDED)", ("job_id",)),
    "logs": ("a job's logs", ("job_id", "follow")),
    "stop": ("stop a running job", ("job_id",)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("jobs", DESCRIPTION, EPILOG)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, (text, fields) in ACTIONS.items():
        sp = new_parser(action, text, parent=sub)
        add_config_arguments(sp, JobsConfig, only=("dashboard_url", *fields),
                             required=tuple(f for f in fields if f == "job_id"),
                             config_file=False)
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch the jobs sub-verb."""
    from workflows.cli.table import format_table
    from workflows.ops.jobs import (JobError, connect, default_address, exit_code_for,
                                    follow_logs, job_status, list_jobs, log_tail,
                                    stop_job)

    cfg = config_from_args(JobsConfig, args)
    address = cfg.dashboard_url or default_address()
    if not address:
        raise JobError("--dashboard-url is required (or set RAY_ADDRESS=http://HOST:8265)")
    client = connect(address, cfg.insecure)
    if cfg.action == "list":
        rows = list_jobs(client)
        if not rows:
            print(f"no jobs on {address}")
            return 0
        print(format_table(rows, ["id", "status", "verb", "start", "end", "message"]))
        return 0
    if cfg.action == "status":
        status = job_status(client, cfg.job_id)
        print(f"{cfg.job_id} {status}")
        if status == "FAILED":
            tail = log_tail(client, cfg.job_id)
            if tail:
                print(f"--- last lines of its log:\n{tail}\nwhole log: bertflow jobs logs "
                      f"{cfg.job_id} --dashboard-url {address}", file=sys.stderr)
        return exit_code_for(status) if status in ("SUCCEEDED", "FAILED", "STOPPED") else 0
    if cfg.action == "logs":
        job_status(client, cfg.job_id)  # a clear error for an unknown id
        if cfg.follow:
            follow_logs(client, cfg.job_id, sys.stdout)
        else:
            sys.stdout.write(client.get_job_logs(cfg.job_id))
        return 0
    stopped = stop_job(client, cfg.job_id)
    print(f"{cfg.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0
