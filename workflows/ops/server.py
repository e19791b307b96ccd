"""The MLflow tracking server (with its UI): one launcher for `bertflow server` (foreground,
until Ctrl-C) and for tests and tools (`start_server`).

Locally it serves the project's sqlite store and `mlartifacts/` beside it. The way teams run
it: runs and the registry in a database (`--backend-store-uri postgresql://...`), artifacts
in object storage (`--artifacts-destination s3://BUCKET/mlartifacts`) served through the
server, so clients and Train workers need only the server's URL (and a user and password
with `--auth`, MLflow's basic-auth app), never the bucket's credentials.

Secrets stay out of `ps` and logs: the backend URI reaches `mlflow server` through its
environment (MLFLOW_BACKEND_STORE_URI), URIs are printed with their password redacted, the
basic-auth admin comes from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, and
the auth config file MLflow reads (MLFLOW_AUTH_CONFIG_PATH) is written in a private folder
(0700) that is removed when the server stops. Binding beyond loopback needs `--auth` or
`--insecure`.

`start_server` fails at once when the port is taken, starts `mlflow server` in its own
process group, waits until it answers and returns it with the URL a browser or client
should use; `stop_server` ends the whole group.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from data_prep.storage import redact
from workflows.config import ServerConfig

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_APP = "basic-auth"
DEFAULT_ADMIN = "admin"


class ServerError(BertflowError):
    """The tracking server cannot start on this store or port; the message says why."""


@dataclass
class ServerLaunch:
    """How `mlflow server` is started: its command line (no secrets), the variables added
    to its environment, and what to tell the user."""

    command: list[str]
    env: dict[str, str]
    url: str
    store: str                      # backend store URI, password redacted
    artifacts: str                  # where served artifacts are stored, redacted
    auth: bool = False
    private_dir: Path | None = None  # the auth config's folder, removed at stop
    notes: list[str] = field(default_factory=list)


def with_installed_driver(uri: str) -> str:
    """A `postgresql://` URI names the driver that is installed: SQLAlchemy 2.1 defaults to
    psycopg (3), SQLAlchemy 2.0 to psycopg2, and bertflow's `server` extra installs
    psycopg2-binary. URIs that name a driver are kept."""
    import importlib.util

    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return uri
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module):
            return f"postgresql+{driver}://{rest}"
    raise ServerError(f"{redact(uri)}: no PostgreSQL driver is installed; "
                      "pip install 'bertflow[server]' (psycopg2-binary)")


def backend_store_uri(cfg: ServerConfig, environ: dict[str, str] | None = None) -> str:
    """The database the server keeps runs and the registry in: --backend-store-uri, else
    $MLFLOW_BACKEND_STORE_URI, else the project's sqlite store."""
    from workflows.tracking import resolve_tracking_uri

    environ = os.environ if environ is None else environ
    uri = cfg.backend_store_uri or environ.get("MLFLOW_BACKEND_STORE_URI")
    if uri:
        if uri.startswith(("http://", "https://")):
            raise ServerError(f"--backend-store-uri {redact(uri)} is a server, not a "
                              "database: give postgresql://USER@HOST:PORT/DB (or mysql://, "
                              "sqlite:///ABSOLUTE/PATH)")
        return with_installed_driver(uri)
    uri = resolve_tracking_uri(cfg.tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise ServerError(f"tracking URI {redact(uri)}: `bertflow server` serves a "
                          "database; an http:// URI is already a server. Give "
                          "--backend-store-uri postgresql://... (or a sqlite:/// store)")
    return uri


def artifacts_destination(cfg: ServerConfig, store: str) -> str:
    """Where the server stores artifacts: --artifacts-destination (a folder or a URI),
    else `mlartifacts` beside a sqlite store. A database elsewhere needs it given."""
    from data_prep.storage import is_uri

    if cfg.artifacts_destination:
        dest = cfg.artifacts_destination
        if not is_uri(dest):
            return str(Path(dest).expanduser().resolve())
        from data_prep.storage import LocationError, check_location

        try:  # now, not at the first upload: the bucket exists, the credentials work
            check_location(dest, "--artifacts-destination", must_exist=False)
        except LocationError as exc:
            raise ServerError(str(exc)) from None
        return dest
    if store.startswith("sqlite:///"):
        return str((Path(store[len("sqlite:///"):]).parent / "mlartifacts").resolve())
    raise ServerError(f"backend store {redact(store)}: give --artifacts-destination "
                      "(e.g. s3://BUCKET/mlartifacts, storage every client reaches through "
                      "this server)")


def check_exposure(cfg: ServerConfig) -> None:
    """Refuse to bind beyond loopback without authentication unless `insecure`."""
    if cfg.host in LOOPBACK or cfg.auth:
        return
    message = (f"--host {cfg.host} exposes the store beyond this machine, and without "
               "--auth anyone who reaches it can read, change and delete runs and models")
    if not cfg.insecure:
        raise ServerError(message + ". Add --auth (set MLFLOW_AUTH_ADMIN_PASSWORD), or "
                                    "--insecure on a network you trust")
    log.warning("%s (--insecure)", message)


# Variables `mlflow server` and the web servers under it read, each of which can widen
# what `bertflow server` decided (--host, --port, --auth): gunicorn's and uvicorn's option
# strings may add a listener (`-b 0.0.0.0:5001`, `--fd`, `--uds`) beside the loopback one,
# and MLflow's security settings open CORS, the Host check, framing or GraphQL. Read in
# mlflow/cli/__init__.py, mlflow/utils/cli_args.py, mlflow/environment_variables.py
# (MLflow 3.x) and uvicorn (click's auto_envvar_prefix UVICORN, FORWARDED_ALLOW_IPS).
WIDENING_ENV = {
    "MLFLOW_GUNICORN_OPTS": "gunicorn options; a `-b` adds a listener beside --host",
    "GUNICORN_CMD_ARGS": "gunicorn options; a `-b` adds a listener beside --host",
    "MLFLOW_UVICORN_OPTS": "uvicorn options; `--fd`/`--uds` add listeners",
    "FORWARDED_ALLOW_IPS": "trusts X-Forwarded-* headers from these clients",
    "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": "lets other web sites call the server from a browser",
    "MLFLOW_SERVER_ALLOWED_HOSTS": "widens the Host-header check (DNS rebinding)",
    "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": "turns off CORS, Host and framing checks",
    "MLFLOW_SERVER_X_FRAME_OPTIONS": "changes the clickjacking protection",
    "MLFLOW_SERVER_ENABLE_GRAPHQL_AUTH": "turns off authorization of GraphQL queries",
    "MLFLOW_SERVER_ENABLE_CUSTOM_SCORERS": "lets clients run their own code in the server",
}
# Values of those variables that change nothing (MLflow's defaults).
_HARMLESS = {"MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": ("", "false", "0"),
             "MLFLOW_SERVER_X_FRAME_OPTIONS": ("", "SAMEORIGIN", "DENY"),
             "MLFLOW_SERVER_ENABLE_GRAPHQL_AUTH": ("", "true", "1"),
             "MLFLOW_SERVER_ENABLE_CUSTOM_SCORERS": ("", "false", "0")}


def widening_variables(environ: dict[str, str]) -> list[str]:
    """Names of the variables in `environ` that would widen the server (`WIDENING_ENV`,
    any UVICORN_* option), set to a value that changes something."""
    found = []
    for name, value in sorted(environ.items()):
        if name in WIDENING_ENV or name.startswith("UVICORN_"):
            harmless = _HARMLESS.get(name, ("",))
            if value.strip() not in harmless and value.strip().lower() not in harmless:
                found.append(name)
    return found


def check_server_environment(environ: dict[str, str]) -> None:
    """Refuse to start when the environment would widen the server beyond its flags: the
    loopback guard and --auth must be what decides who reaches it."""
    found = widening_variables(environ)
    if not found:
        return
    why = "; ".join(f"{n} ({WIDENING_ENV.get(n, 'a uvicorn option: may add a listener')})"
                    for n in found)
    raise ServerError(f"the environment sets {why}. `bertflow server` decides where it "
                      f"listens and who may call it from --host, --port and --auth only: "
                      f"unset {' '.join(found)} (e.g. `env -u {found[0]} bertflow server ...`)")


def write_auth_config(database_uri: str, admin: str) -> tuple[Path, Path]:
    """The basic-auth app's config (MLFLOW_AUTH_CONFIG_PATH) in a new private folder: its
    user database and the admin's name. The admin's password is not written; MLflow reads
    it from MLFLOW_AUTH_ADMIN_PASSWORD on the first start. Returns (folder, file)."""
    folder = Path(tempfile.mkdtemp(prefix="bertflow-server-auth-"))  # mode 0700
    ini = folder / "basic_auth.ini"
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = {database_uri}\n"
                f"admin_username = {admin}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                # Every request would check the password hash (werkzeug's scrypt, ~0.1 s
                # of CPU): remember a checked password for a minute. Each worker keeps its
                # own cache, and a password changed (or a user deleted) through the API is
                # dropped at once only from the cache of the worker that served the change:
                # the others still accept the old password for up to this minute
                # (docs/security.md).
                "auth_cache_ttl_seconds = 60\n")
    return folder, ini


# The SQLAlchemy pool of each of MLflow's stores (runs, registry, auth) in each worker, read
# by mlflow/store/db/utils.py:create_sqlalchemy_engine (MLflow 3.x); set here, never
# inherited. MLflow's log_batch holds a connection while _log_params/_log_metrics take a
# second one from the same pool (mlflow/store/tracking/sqlalchemy_store.py), so a pool that
# can hand out fewer connections than a worker runs requests at once deadlocks until
# SQLAlchemy's 30 s pool timeout: with SQLAlchemy's 5 + 10, 32 clients on one worker got
# a burst of answers every 30 s (bench/server_load.py). A worker runs at most
# WORKER_THREADS requests at once (anyio's default thread limiter, through which MLflow's
# FastAPI app runs its Flask handlers), so the pool may open that many connections beyond
# the --db-pool-size it keeps open; they are closed again when the burst is over.
WORKER_THREADS = 40
PG_DEFAULT_MAX_CONNECTIONS = 100
POOL_ENV = ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW")

# uvicorn's supervisor of several workers pings each one every half second and SIGKILLs
# one that does not answer within --timeout-worker-healthcheck (5 s by default), with the
# requests it was serving: on a loaded head a worker still importing MLflow, or busy, was
# killed and restarted again and again (seen in bench/server_load.py at load average 20 on
# 2 cores). A minute tells a hung worker from a slow one. Fixed here, never taken from the
# environment (MLFLOW_UVICORN_OPTS is refused: it could add listeners).
UVICORN_OPTS = "--timeout-worker-healthcheck 60"


def pool_env(cfg: ServerConfig) -> dict[str, str]:
    """The pool variables of `mlflow server`: `db_pool_size` connections kept open per store
    and worker, up to `WORKER_THREADS` more for a burst (closed after it)."""
    return dict(zip(POOL_ENV, (str(cfg.db_pool_size), str(WORKER_THREADS))))


def plan_server(cfg: ServerConfig, environ: dict[str, str] | None = None) -> ServerLaunch:
    """Check the settings and say how `mlflow server` is started (writes the auth config
    file when `cfg.auth`; `stop_server` or `discard` removes it)."""
    environ = dict(os.environ if environ is None else environ)
    check_server_environment(environ)
    check_exposure(cfg)
    store = backend_store_uri(cfg, environ)
    artifacts = artifacts_destination(cfg, store)
    command = [sys.executable, "-m", "mlflow", "server", "--host", cfg.host, "--port",
               str(cfg.port), "--artifacts-destination", artifacts, "--serve-artifacts",
               "--workers", str(cfg.workers), "--uvicorn-opts", UVICORN_OPTS]
    env = {"MLFLOW_BACKEND_STORE_URI": store, **pool_env(cfg)}
    launch = ServerLaunch(command, env, server_url(cfg.host, cfg.port), redact(store),
                          redact(artifacts))
    stores = 3 if cfg.auth else 2
    launch.notes.append(
        f"workers: {cfg.workers} (uvicorn); database connections kept open: up to "
        f"{cfg.workers} x {stores} stores x {cfg.db_pool_size} = "
        f"{cfg.workers * stores * cfg.db_pool_size}, more while many requests run at once "
        f"(about 2 per request)")
    kept = cfg.workers * stores * cfg.db_pool_size
    if store.startswith("postgresql") and kept > PG_DEFAULT_MAX_CONNECTIONS:
        # 8 workers x 3 stores x 5 (120) answered 32 clients with "FATAL: sorry, too many
        # clients already" from a default PostgreSQL (bench/server_load.py).
        launch.notes.append(
            f"warning: {kept} connections kept open is more than PostgreSQL's default "
            f"max_connections ({PG_DEFAULT_MAX_CONNECTIONS}): raise max_connections on the "
            "database or lower --workers / --db-pool-size, or requests fail with 'too many "
            "clients'")
    if cfg.auth:
        admin = environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or DEFAULT_ADMIN
        auth_db = with_installed_driver(cfg.auth_db_uri) if cfg.auth_db_uri else store
        launch.private_dir, ini = write_auth_config(auth_db, admin)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        if not environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            # CSRF key of the auth app's forms, the same for every worker (they inherit
            # this environment); a fresh one per start (browser sessions of a previous
            # start end).
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
        command += ["--app-name", AUTH_APP]
        launch.auth = True
        launch.notes.append(f"auth: basic (admin user {admin!r}; clients set "
                            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
    return launch


def discard(launch: ServerLaunch) -> None:
    """Remove what `plan_server` wrote (the private auth folder)."""
    if launch.private_dir is not None:
        shutil.rmtree(launch.private_dir, ignore_errors=True)


# MLflow 3's server starts a job queue (about eight huey consumer processes) for its GenAI
# evaluation jobs and trace roll-ups. bertflow uses neither; on a 2-core head those
# processes cost seconds of CPU at every start and memory for as long as the server runs.
NO_JOB_QUEUE_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: `base` (default: this process's) with unpickling of model
    files, MLflow's telemetry and its job queue switched off, and without the variables
    that would widen it (`WIDENING_ENV`: `plan_server` refuses them when set; this drops
    harmless ones too)."""
    from workflows.tracking import MLFLOW_SAFE_ENV

    base = os.environ if base is None else base
    kept = {k: v for k, v in base.items() if k not in WIDENING_ENV and not k.startswith("UVICORN_")}
    return {**kept, **MLFLOW_SAFE_ENV, **NO_JOB_QUEUE_ENV}


def server_url(host: str, port: int) -> str:
    """The URL that reaches a server bound to `host` (a wildcard is reached on loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Fail at once, with the fix, when the port is taken (mlflow itself would first spend
    many seconds starting its workers and then die with a less helpful message)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server binds (uvicorn and gunicorn set SO_REUSEADDR): a port whose last
        # server just stopped (connections in TIME_WAIT) is free, one that listens is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(
                f"cannot serve on {host}:{port}: {exc.strerror or exc}. Another server (maybe "
                f"an earlier `bertflow server`) uses that port: stop it or pass --port") from None


def wait_for_server(url: str, timeout_s: float = 60.0,
                    process: subprocess.Popen | None = None) -> None:
    """Return once the MLflow server at `url` answers /health; raise past `timeout_s` or if
    `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"mlflow server exited with code {process.returncode} "
                              f"before answering at {url} (its output above says why)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServerError(f"mlflow server at {url} did not answer within {timeout_s:.0f} s")


def start_server(cfg: ServerConfig, timeout_s: float = 60.0,
                 **popen_kwargs: Any) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` in its own process group; return it and its URL once it
    answers. The caller ends it with `stop_server`. `env` in `popen_kwargs` replaces this
    process's environment as the base of the server's."""
    base = popen_kwargs.pop("env", None)
    check_port_free(cfg.host, cfg.port)
    launch = plan_server(cfg, base)
    env = {**server_env(base), **launch.env}
    try:
        proc = subprocess.Popen(launch.command, start_new_session=True, env=env,
                                **popen_kwargs)
    except BaseException:
        discard(launch)
        raise
    proc.bertflow_launch = launch  # type: ignore[attr-defined]  (stop_server cleans up)
    try:
        wait_for_server(launch.url, timeout_s, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, launch.url


def stop_server(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Terminate a server started by `start_server` (its whole process group) and remove
    its private auth folder."""
    try:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
    finally:
        launch = getattr(proc, "bertflow_launch", None)
        if launch is not None:
            discard(launch)


def serve(cfg: ServerConfig, timeout_s: float = 120.0) -> int:
    """`bertflow server`: start the server, print where it answers, run until Ctrl-C."""
    proc, url = start_server(cfg, timeout_s)
    launch: ServerLaunch = proc.bertflow_launch  # type: ignore[attr-defined]
    print(f"MLflow UI and tracking server: {url}  (Ctrl-C stops it)", flush=True)
    print(f"  store:     {launch.store}")
    print(f"  artifacts: {launch.artifacts} (served: clients need no storage credentials)")
    for note in launch.notes:
        print(f"  {note}")
    sys.stdout.flush()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)
