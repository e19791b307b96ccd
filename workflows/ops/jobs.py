"""Run bertflow verbs on a Ray cluster through Ray's Jobs API, and watch them.

`submit_verb` ships an allowlist of the project (the packages, `configs/`,
`pyproject.toml`, `constraints.txt`: `SHIPPED`), copied into a temporary folder without
following links, as the job's `working_dir`; runs `python -m workflows.cli VERB ARGS...`
as the job's entrypoint, and passes the MLflow tracking URI and the submitter's credential
variables (object store, MLflow user/password/token; names printed, values never) through
the job's runtime environment, so a job reads and writes the same stores and logs and
registers into the same MLflow as a local run would. `connect` refuses a
dashboard that is reached in cleartext off this machine unless told `insecure`: Ray's
auth token and the shipped code would cross the network readable by anyone on the path.

Ray is imported inside the functions: `bertflow jobs --help` stays instant.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bert_core.config_io import BertflowError
from workflows.config import SERVE_TOKEN_ENV, SUBMITTABLE_VERBS
from workflows.tracking import MLFLOW_SAFE_ENV

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

# What a job ships of the project folder: the packages and the files that describe how
# to run them. Nothing else goes (.env files, keys, stores, corpora and run outputs stay
# home); the packages are required, the rest shipped when present (an installed bertflow
# has only the packages).
PACKAGES = ("bert_core", "data_prep", "workflows")
SHIPPED = (*PACKAGES, "configs", "pyproject.toml", "constraints.txt")
# Never shipped from inside those folders: caches a job rebuilds anyway.
SKIPPED_NAMES = ("__pycache__", ".pytest_cache")
SKIPPED_SUFFIXES = (".pyc", ".pyo")

# Environment every job gets: offline by design, like local runs (see Makefile), with
# MLflow's unpickling of model files and its telemetry off.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **MLFLOW_SAFE_ENV}

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
    from data_prep.storage import public_uri, redact

    warnings = []
    shown = redact(uri)
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
    elif public_uri(uri).startswith(("http://127.0.0.1", "http://localhost")) \
            and not local_cluster:
        warnings.append(
            f"tracking URI {shown} points at loopback, which on the cluster's nodes is the "
            "node itself, not this machine. Use an address the cluster can reach.")
    return warnings


# Set on the cluster's head (cluster.yaml), it is the --storage-path of every submitted job
# that names none: checkpoints of every run go to the cluster's shared storage.
STORAGE_PATH_ENV = "BERTFLOW_STORAGE_PATH"


def build_entrypoint(verb: str, args: list[str]) -> str:
    """The job's shell command: run the verb with the project's own CLI module. A verb
    that takes --storage-path and was given none gets the head's $BERTFLOW_STORAGE_PATH
    when that is set (expanded by the job's shell, on the head)."""
    if verb not in SUBMITTABLE_VERBS:
        raise JobError(f"cannot submit {verb!r}: choose one of {', '.join(SUBMITTABLE_VERBS)}")
    command = shlex.join(["python", "-m", "workflows.cli", verb, *args])
    given = any(a == "--storage-path" or a.startswith("--storage-path=") for a in args)
    if not given and verb_takes_option(verb, "--storage-path"):
        command += f' ${{{STORAGE_PATH_ENV}:+--storage-path "${STORAGE_PATH_ENV}"}}'
    return command


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


@dataclass
class Shipment:
    """What a job ships: a staged copy of the allowlisted project files."""

    folder: Path                                    # the job's working_dir
    entries: list[str]                              # top-level names shipped
    files: int = 0
    size: int = 0                                   # bytes
    skipped_links: list[str] = field(default_factory=list)  # never followed nor shipped

    def describe(self) -> str:
        names = ", ".join(e + "/" if (self.folder / e).is_dir() else e for e in self.entries)
        return f"{names} ({self.files} files, {self.size / 1e6:.1f} MB)"


def stage_project(project_dir: Path, dest: Path) -> Shipment:
    """Copy the `SHIPPED` entries of `project_dir` into the new folder `dest`.

    Only regular files are copied; a symbolic link (to a file or a folder) is skipped and
    listed, never followed, so a link to a corpus or a home folder ships nothing.
    """
    missing = [p for p in PACKAGES if not (project_dir / p).is_dir()
               or (project_dir / p).is_symlink()]
    if missing or not (project_dir / "workflows" / "cli" / "__main__.py").is_file():
        raise JobError(f"{project_dir} is not a bertflow project folder (it needs the "
                       f"packages {', '.join(PACKAGES)} with workflows/cli/__main__.py)")
    shipment = Shipment(dest, [])
    dest.mkdir(parents=True)
    for name in SHIPPED:
        src = project_dir / name
        if src.is_symlink():
            shipment.skipped_links.append(name)
            continue
        if src.is_file():
            _ship_file(src, dest / name, shipment, name)
        elif src.is_dir():
            for root, dirs, files in os.walk(src):  # followlinks=False: links not entered
                rel = Path(root).relative_to(project_dir)
                dirs[:] = sorted(d for d in dirs if d not in SKIPPED_NAMES)
                for d in dirs:
                    if (Path(root) / d).is_symlink():
                        shipment.skipped_links.append(str(rel / d))
                for f in sorted(files):
                    path = Path(root) / f
                    if not f.endswith(SKIPPED_SUFFIXES):
                        _ship_file(path, dest / rel / f, shipment, str(rel / f))
        else:
            continue
        shipment.entries.append(name)
    for link in shipment.skipped_links:
        log.warning("not shipped: %s is a symbolic link", project_dir / link)
    return shipment


def _ship_file(src: Path, dest: Path, shipment: Shipment, rel: str) -> None:
    """Copy `src` if it is a regular file, checked and read through one descriptor
    (storage.open_regular): a link swapped in after the listing is skipped and listed, a
    FIFO or socket skipped, never followed nor waited on."""
    from data_prep.storage import NotRegularFile, open_regular

    try:
        src_file = open_regular(src)
    except NotRegularFile:
        if src.is_symlink():
            shipment.skipped_links.append(rel)
        return
    except FileNotFoundError:  # removed since the listing
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src_file, open(dest, "xb") as out:
        shutil.copyfileobj(src_file, out, 1 << 20)
        shipment.size += out.tell()
    shipment.files += 1


def build_runtime_env(tracking_uri: str, working_dir: Path,
                      env_vars: dict[str, str] | None = None,
                      environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Ray runtime_env shipping `working_dir` (a `stage_project` folder) and passing the
    tracking URI and the submitter's credential variables (`environ`, default this
    process: the object store's AWS_* and MLflow's MLFLOW_TRACKING_USERNAME / PASSWORD /
    TOKEN, see data_prep.ray_env.worker_env_vars) to the job. The job's own `init_ray`
    hands them on to its Ray workers. Log only the names (`passed_variables`)."""
    from data_prep.ray_env import worker_env_vars

    env = {**JOB_ENV, **worker_env_vars(environ), "MLFLOW_TRACKING_URI": tracking_uri,
           **(env_vars or {})}
    return {"working_dir": str(working_dir), "env_vars": env}


def passed_variables(runtime_env: dict[str, Any]) -> list[str]:
    """Names of the credential variables a runtime env carries (never their values)."""
    from data_prep.ray_env import MLFLOW_CREDENTIAL_ENV_VARS
    from data_prep.storage import CREDENTIAL_ENV_VARS

    names = set(CREDENTIAL_ENV_VARS) | set(MLFLOW_CREDENTIAL_ENV_VARS) | {SERVE_TOKEN_ENV}
    return sorted(k for k in runtime_env.get("env_vars", {}) if k in names)


def is_loopback(host: str | None) -> bool:
    """Whether `host` is this machine (localhost, 127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address_is_private(address: str, insecure: bool = False) -> None:
    """Refuse (unless `insecure`) a cleartext dashboard address off loopback: Ray's auth
    token, the shipped code and the job's environment would cross the network unencrypted."""
    from urllib.parse import urlparse

    url = urlparse(address)
    if url.scheme not in ("http", "ray") or is_loopback(url.hostname):
        return
    message = (f"--dashboard-url {address} is {url.scheme}:// to another machine: Ray's auth "
               f"token, the shipped project and the job's environment would be sent in "
               f"cleartext. Tunnel the dashboard (`ray dashboard cluster.yaml`, or ssh -L "
               f"8265:localhost:8265 HEAD) and use http://127.0.0.1:8265, or use https://")
    if not insecure:
        raise JobError(message + "; --insecure sends it anyway (a network you trust)")
    log.warning("%s (sent anyway: --insecure)", message)


def connect(address: str, insecure: bool = False) -> "JobSubmissionClient":
    """A Jobs API client for the dashboard at `address` (http://HOST:8265); see
    `check_address_is_private` for `insecure`."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise JobError(f"--dashboard-url {address!r}: expected the dashboard URL, "
                       "e.g. http://127.0.0.1:8265 (or via `ray dashboard cluster.yaml`)")
    check_address_is_private(address, insecure)
    _use_ray_auth_token_if_present()
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as exc:
        raise JobError(f"cannot reach the Ray dashboard at {address}: {exc}. Is the cluster "
                       "up, and is the dashboard port forwarded?") from None


def _use_ray_auth_token_if_present() -> None:
    """Send Ray's auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) when
    one exists, as `ray start` does: clusters started by Ray >= 2.52 require it by default,
    and the Jobs client only sends it in token mode. RAY_AUTH_MODE, when set, wins.

    Ray caches the token it loaded, and the auth mode it read, once per process; both are
    read again first so the token and mode of this call's environment are the ones used (a
    process that talks to two clusters, one after the other, would otherwise send the
    first one's token, or none). These steps use private Ray functions
    (`workflows.ray_internals`)."""
    from workflows import ray_internals

    ray_internals.reset_auth_token_cache()
    ray_internals.follow_auth_mode_of_environment()
    if os.environ.get("RAY_AUTH_MODE"):
        return
    ray_internals.enable_token_auth_if_token_available()


@dataclass
class SubmittedJob:
    """What `submit_verb` started."""
    submission_id: str
    address: str
    entrypoint: str
    tracking_uri: str          # as it may be printed: redacted
    shipped: str = ""          # Shipment.describe(): what went to the cluster
    credentials: list[str] = field(default_factory=list)  # variable names passed, no values


def submit_verb(address: str, verb: str, args: list[str], tracking_uri: str, *,
                submission_id: str | None = None, project_dir: Path | None = None,
                env_vars: dict[str, str] | None = None,
                client: "JobSubmissionClient | None" = None,
                insecure: bool = False, probe: bool = True) -> SubmittedJob:
    """Submit `bertflow VERB ARGS...` as a Ray job; returns at once (see `wait_for_job`).

    The allowlisted project files are staged in a temporary folder, which Ray packs and
    uploads during the submission; it is removed afterwards."""
    import tempfile

    from data_prep.storage import redact
    from workflows.tracking import cleartext_password_warning

    warnings = check_tracking_uri_for_cluster(tracking_uri, address)
    warnings.append(cleartext_password_warning(tracking_uri, {**os.environ, **(env_vars or {})}))
    for warning in filter(None, warnings):
        log.warning(warning)
    entrypoint = build_entrypoint(verb, attach_to_cluster(verb, args))
    if verb == "serve" and os.environ.get(SERVE_TOKEN_ENV):  # the served routes' token
        env_vars = {SERVE_TOKEN_ENV: os.environ[SERVE_TOKEN_ENV], **(env_vars or {})}
    client = client or connect(address, insecure)
    with tempfile.TemporaryDirectory(prefix="bertflow-job-") as tmp:
        shipment = stage_project(project_dir or project_root(), Path(tmp) / "bertflow")
        runtime_env = build_runtime_env(tracking_uri, shipment.folder, env_vars)
        if probe:  # before shipping the job: can the cluster's python import bertflow's deps?
            from workflows.ops.probe import check_cluster_python

            check_cluster_python(client, address, {"env_vars": runtime_env["env_vars"]})
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                       submission_id=submission_id,
                                       metadata={"bertflow_verb": verb})
        except RuntimeError as exc:  # the SDK reports HTTP errors (e.g. a reused id) so
            raise JobError(f"the cluster at {address} refused the job: {exc}") from None
        shipped = shipment.describe()
    credentials = passed_variables(runtime_env)
    log.info("submitted %s as job %s to %s (credential variables passed: %s)", verb, job_id,
             address, ", ".join(credentials) or "none")
    return SubmittedJob(job_id, address, entrypoint, redact(tracking_uri), shipped,
                        credentials)


def log_tail(client: "JobSubmissionClient", job_id: str, lines: int = 20) -> str:
    """The last `lines` lines of a job's log ("" when the cluster has none)."""
    try:
        text = client.get_job_logs(job_id)
    except RuntimeError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


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
