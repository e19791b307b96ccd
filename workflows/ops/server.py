"""The MLflow tracking server (with its UI) on the project's store: one launcher for
`bertflow server` (foreground, until Ctrl-C) and for tests and tools (`start_server`).

`start_server` fails at once when the port is taken, starts `mlflow server` in its own
process group, waits until it answers and returns it with the URL a browser or client
should use; `stop_server` ends the whole group. The server binds 127.0.0.1 unless told
otherwise: MLflow has no authentication here.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from workflows.config import ServerConfig

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerError(BertflowError):
    """The tracking server cannot start on this store or port; the message says why."""


def server_command(cfg: ServerConfig) -> list[str]:
    """The `mlflow server` command serving the project's store, UI and artifacts.

    The backend is the project's sqlite store; new artifacts are served by the server from
    `cfg.artifacts` (default: `mlartifacts` beside the store, where local runs put theirs).
    """
    from workflows.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise ServerError(f"tracking URI {uri}: `bertflow server` serves a local sqlite "
                          "store (e.g. sqlite:///$PWD/mlruns.db); an http:// URI is "
                          "already a server")
    db = Path(uri[len("sqlite:///"):])
    artifacts = Path(cfg.artifacts) if cfg.artifacts else db.parent / "mlartifacts"
    return [sys.executable, "-m", "mlflow", "server", "--host", cfg.host, "--port",
            str(cfg.port), "--backend-store-uri", uri, "--artifacts-destination",
            str(artifacts.resolve()), "--serve-artifacts", "--workers", "1"]


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: `base` (default: this process's) with unpickling of model
    files and MLflow's telemetry switched off."""
    from workflows.tracking import MLFLOW_SAFE_ENV

    return {**(os.environ if base is None else base), **MLFLOW_SAFE_ENV}


def server_url(host: str, port: int) -> str:
    """The URL that reaches a server bound to `host` (a wildcard is reached on loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Fail at once, with the fix, when the port is taken (mlflow itself would first spend
    many seconds starting its workers and then die with a less helpful message)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
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
                              f"before answering at {url} (is the port taken?)")
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
    answers. The caller ends it with `stop_server`."""
    if cfg.host not in LOOPBACK:
        log.warning("binding to %s: anyone who can reach it can read and change the store "
                    "(MLflow has no authentication here)", cfg.host)
    check_port_free(cfg.host, cfg.port)
    cmd = server_command(cfg)
    env = server_env(popen_kwargs.pop("env", None))
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, **popen_kwargs)
    url = server_url(cfg.host, cfg.port)
    try:
        wait_for_server(url, timeout_s, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Terminate a server started by `start_server` (its whole process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass


def serve(cfg: ServerConfig, timeout_s: float = 120.0) -> int:
    """`bertflow server`: start the server, print where it answers, run until Ctrl-C."""
    proc, url = start_server(cfg, timeout_s)
    cmd = proc.args
    print(f"MLflow UI and tracking server: {url}  (Ctrl-C stops it)", flush=True)
    print(f"  store:     {cmd[cmd.index('--backend-store-uri') + 1]}")
    print(f"  artifacts: {cmd[cmd.index('--artifacts-destination') + 1]}", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)
