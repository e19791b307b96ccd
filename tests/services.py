"""Real services on 127.0.0.1 for integration tests, each a process the test owns.

Every service is started in its own process group and stopped by that process id (never
by name, never `ray stop`), and every wait is bounded. Fixtures in `conftest.py` wrap them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    """Wait until `url` answers (any HTTP status); fail with the log's tail if `proc` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout_s)


@dataclass
class S3Server:
    """moto's S3 server: a real HTTP S3 endpoint (not an in-process mock)."""

    endpoint: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"]
                     ).create_bucket(Bucket=name)
        return f"s3://{name}"


def start_s3(workdir: Path) -> S3Server:
    """Start `moto_server` on a free port of 127.0.0.1. Its `env` holds the standard AWS
    variables a client needs (endpoint, fake keys, region)."""
    port = free_ports(1)[0]
    log = workdir / "moto.log"
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, proc, log)
    except BaseException:
        stop(proc)
        raise
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bertflow-test",
           "AWS_SECRET_ACCESS_KEY": "bertflow-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
    return S3Server(endpoint, proc, env)
