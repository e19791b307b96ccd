"""`bertflow jobs list|status ID|logs ID [--follow]|stop ID`: jobs on a Ray cluster."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = "list, inspect, follow or stop jobs on a Ray cluster"
EPILOG = """examples:
  bertflow jobs list --address http://127.0.0.1:8265
  bertflow jobs logs raysubmit_abc123 --follow
  bertflow jobs stop raysubmit_abc123

--address defaults to $RAY_ADDRESS when it is an http URL."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertflow jobs", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", metavar="URL",
                        help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", parents=[common], help="jobs submitted to the cluster, newest first")
    for name, text in (("status", "a job's status (exit code 0 only if SUCCEEDED)"),
                       ("logs", "a job's logs"), ("stop", "stop a running job")):
        sp = sub.add_parser(name, parents=[common], help=text)
        sp.add_argument("job_id", metavar="ID", help="the submission id")
        if name == "logs":
            sp.add_argument("--follow", "-f", action="store_true",
                            help="keep streaming until the job ends")
    return p


def main(argv: list[str]) -> int:
    """Dispatch the jobs sub-verb."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from workflows.jobs import (connect, default_address, exit_code_for, follow_logs,
                                job_status, list_jobs, stop_job)
    from workflows.registry import format_table

    address = args.address or default_address()
    if not address:
        parser.error("--address is required (or set RAY_ADDRESS=http://HOST:8265)")
    client = connect(address)
    if args.action == "list":
        rows = list_jobs(client)
        if not rows:
            print(f"no jobs on {address}")
            return 0
        print(format_table(rows, ["id", "status", "verb", "start", "end", "message"]))
        return 0
    if args.action == "status":
        status = job_status(client, args.job_id)
        print(f"{args.job_id} {status}")
        return exit_code_for(status) if status in ("SUCCEEDED", "FAILED", "STOPPED") else 0
    if args.action == "logs":
        job_status(client, args.job_id)  # a clear error for an unknown id
        if args.follow:
            follow_logs(client, args.job_id, sys.stdout)
        else:
            sys.stdout.write(client.get_job_logs(args.job_id))
        return 0
    stopped = stop_job(client, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0
