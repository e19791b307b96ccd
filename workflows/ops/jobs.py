"""Run bertflow verbs on a Ray cluster through Ray's Jobs API, and watch them.

`submit_verb` ships the project folder as the job's `working_dir` (without local
environments, data or run outputs), runs `python -m workflows.cli VERB ARGS...` as the
job's entrypoint, and passes the MLflow tracking URI through the environment, so a job
logs and registers into the same store as a local run would.

Ray is imported inside the functions: `bertflow jobs --help` stays instant.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bert_core.config_io import BertflowError
from workflows.config import SUBMITTABLE_VERBS

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

# Never upload these with the job: environments, VCS data, stores and outputs. Ray's
# working_dir upload is size-limited, and a shipped .venv would break the cluster's Python.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "**/__pycache__", "*.egg-info", ".pytest_cache",
    "data", "runs", "quickstart_out", "mlruns", "mlruns.db", "mlartifacts",
    "*.parquet", "*.safetensors", "*.pt",
]

# Environment every job gets: offline by design, like local runs (see Makefile).
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(BertflowError):
    """A job could not be submitted, found or watched; the message says what to do."""


def project_root() -> Path:
    """The bertflow project folder (holds pyproject.toml): what a job ships to the cluster."""
    return Path(__file__).resolve().parents[2]


def check_tracking_uri_for_cluster(uri: str, address: str) -> list[str]:
    """Warnings about a tracking URI that jobs on the cluster at `address` may not reach.

    A sqlite or file store is read by the job's processes on the cluster's nodes: a relative
    path would land in the job's temporary working_dir (and vanish with it), and a local
    absolute path is only the same store if the cluster shares that filesystem.
    """
    warnings = []
    local_cluster = any(h in address for h in ("127.0.0.1", "localhost"))
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            warnings.append(
                f"tracking URI {uri} is a relative sqlite path: on the cluster it would be "
                "created inside the job's temporary working_dir and lost. Use an absolute "
                "path on a filesystem the cluster shares, or an http:// MLflow server "
                "(`bertflow server`).")
        elif not local_cluster:
            warnings.append(
                f"tracking URI {uri} is a local file: the job writes to {path} on the "
                "cluster's nodes, which is the same store only on a shared filesystem. "
                "Otherwise pass --tracking-uri http://HOST:5000 (an MLflow server the "
                "cluster can reach).")
    elif uri.startswith(("http://127.0.0.1", "http://localhost")) and not local_cluster:
        warnings.append(
            f"tracking URI {uri} points at loopback, which on the cluster's nodes is the "
            "node itself, not this machine. Use an address the cluster can reach.")
    return warnings


def build_entrypoint(verb: str, args: list[str]) -> str:
    """The job's shell command: run the verb with the project's own CLI module."""
    if verb not in SUBMITTABLE_VERBS:
        raise JobError(f"cannot submit {verb!r}: choose one of {', '.join(SUBMITTABLE_VERBS)}")
    return shlex.join(["python", "-m", "workflows.cli", verb, *args])


def verb_takes_option(verb: str, option: str) -> bool:
    """Whether `bertflow VERB` accepts `option` (read from the verb's own parser)."""
    from workflows.cli import verb_module

    try:
        parser = verb_module(verb).build_parser()
    except ImportError:
        return False
    return option in parser._option_string_actions


def attach_to_cluster(verb: str, args: list[str]) -> list[str]:
    """`args` plus `--address auto` for verbs that start Ray, so that the job joins the
    cluster it runs on: by default bertflow starts a private local Ray, which inside a job
    would leave the cluster's GPUs idle."""
    if any(a == "--address" or a.startswith("--address=") for a in args):
        return list(args)
    if verb_takes_option(verb, "--address"):
        return [*args, "--address", "auto"]
    return list(args)


def build_runtime_env(tracking_uri: str, project_dir: Path | None = None,
                      env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """Ray runtime_env shipping `project_dir` and passing the tracking URI to the job."""
    project_dir = project_dir or project_root()
    if not (project_dir / "workflows" / "cli" / "__main__.py").is_file():
        raise JobError(f"{project_dir} is not a bertflow project folder "
                       f"(no workflows/cli/__main__.py)")
    env = {**JOB_ENV, "MLFLOW_TRACKING_URI": tracking_uri, **(env_vars or {})}
    return {"working_dir": str(project_dir), "excludes": list(WORKING_DIR_EXCLUDES),
            "env_vars": env}


def connect(address: str) -> "JobSubmissionClient":
    """A Jobs API client for the dashboard at `address` (http://HOST:8265)."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address {address!r}: expected the dashboard URL, "
                       "e.g. http://127.0.0.1:8265 (or via `ray dashboard cluster.yaml`)")
    _use_ray_auth_token_if_present()
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as exc:
        raise JobError(f"cannot reach the Ray dashboard at {address}: {exc}. Is the cluster "
                       "up, and is the dashboard port forwarded?") from None


def _use_ray_auth_token_if_present() -> None:
    """Send Ray's auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) when
    one exists, as `ray start` does: clusters started by Ray >= 2.52 require it by default,
    and the Jobs client only sends it in token mode. RAY_AUTH_MODE, when set, wins."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@dataclass
class SubmittedJob:
    """What `submit_verb` started."""
    submission_id: str
    address: str
    entrypoint: str
    tracking_uri: str


def submit_verb(address: str, verb: str, args: list[str], tracking_uri: str, *,
                submission_id: str | None = None, project_dir: Path | None = None,
                env_vars: dict[str, str] | None = None,
                client: "JobSubmissionClient | None" = None) -> SubmittedJob:
    """Submit `bertflow VERB ARGS...` as a Ray job; returns at once (see `wait_for_job`)."""
    for warning in check_tracking_uri_for_cluster(tracking_uri, address):
        log.warning(warning)
    entrypoint = build_entrypoint(verb, attach_to_cluster(verb, args))
    runtime_env = build_runtime_env(tracking_uri, project_dir, env_vars)
    client = client or connect(address)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   submission_id=submission_id,
                                   metadata={"bertflow_verb": verb})
    except RuntimeError as exc:  # the SDK reports HTTP errors (e.g. a reused id) this way
        raise JobError(f"the cluster at {address} refused the job: {exc}") from None
    log.info("submitted %s as job %s to %s", verb, job_id, address)
    return SubmittedJob(job_id, address, entrypoint, tracking_uri)


def job_status(client: "JobSubmissionClient", job_id: str) -> str:
    """The job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    try:
        return str(client.get_job_status(job_id))
    except RuntimeError as exc:
        raise JobError(f"no job {job_id!r} on this cluster ({exc}). "
                       "`bertflow jobs list` shows the jobs it knows.") from None


def follow_logs(client: "JobSubmissionClient", job_id: str, out: TextIO = sys.stdout) -> None:
    """Stream the job's logs to `out` until the job ends."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()
    asyncio.run(tail())


def wait_for_job(client: "JobSubmissionClient", job_id: str, *, stream: bool = True,
                 timeout_s: float | None = None, poll_s: float = 1.0,
                 out: TextIO = sys.stdout) -> str:
    """Wait until the job reaches a terminal status and return it.

    With `stream`, its logs are written to `out` as they come. `timeout_s` bounds the wait;
    past it a JobError says so and the job keeps running.
    """
    if stream:
        follow_logs(client, job_id, out)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = job_status(client, job_id)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {status} after {timeout_s:.0f} s; it keeps "
                           f"running (`bertflow jobs status {job_id}`)")
        time.sleep(poll_s)


def exit_code_for(status: str) -> int:
    """Shell exit code mirroring a job's final status (0 only for SUCCEEDED)."""
    return {"SUCCEEDED": 0, "STOPPED": 130}.get(status, 1)


def list_jobs(client: "JobSubmissionClient") -> list[dict[str, Any]]:
    """Jobs the cluster knows, newest first, as plain rows for a table."""
    rows = []
    for job in client.list_jobs():
        if job.submission_id is None:  # drivers started by hand, not through the Jobs API
            continue
        rows.append({
            "id": job.submission_id,
            "status": str(job.status),
            "verb": (job.metadata or {}).get("bertflow_verb", "-"),
            "start": _fmt_ms(job.start_time),
            "end": _fmt_ms(job.end_time),
            "entrypoint": job.entrypoint,
            "message": job.message or "",
        })
    rows.sort(key=lambda r: r["start"], reverse=True)
    return rows


def stop_job(client: "JobSubmissionClient", job_id: str) -> bool:
    """Ask the cluster to stop the job; True if it was running."""
    job_status(client, job_id)  # a clear error for an unknown id
    return bool(client.stop_job(job_id))


def _fmt_ms(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def default_address() -> str | None:
    """RAY_ADDRESS if it is a dashboard URL (as `ray job submit` reads it), else None."""
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else None
