"""Real services on 127.0.0.1 for integration tests, each a process the test owns.

Every service is started in its own process group and stopped by that process id (never
by name, never `ray stop`), and every wait is bounded. Fixtures in `conftest.py` wrap them.
"""

from __future__ import annotations

import contextlib
import json
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
from collections.abc import Iterator
from typing import Any, Callable

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_until(ready: Callable[[], Any], proc: subprocess.Popen, log: Path, what: str,
               timeout_s: float, interval_s: float = 0.2) -> Any:
    """Poll `ready()` until it returns something truthy (returned; an OSError counts as
    not yet); fail with `log`'s tail if `proc` dies first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if value := ready():
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in {timeout_s:.0f} s:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(interval_s)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # any HTTP status: the server is up
        return True


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    """Wait until `url` answers (any HTTP status); fail with the log's tail if `proc` dies."""
    wait_until(lambda: _answers(url), proc, log, url, timeout_s)


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


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The folder holding PostgreSQL's server programs (initdb, pg_ctl), or None."""
    import shutil

    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


@dataclass
class Postgres:
    """A PostgreSQL server on 127.0.0.1 whose data folder the test owns."""

    url: str                      # postgresql://USER:PASSWORD@127.0.0.1:PORT/DB
    password: str
    data_dir: Path
    bin_dir: Path
    as_user: list[str]            # prefix that runs a program as the server's owner


def _run_as(prefix: list[str], cmd: list[str], log: Path, timeout_s: float = 120) -> None:
    with open(log, "ab") as out:
        done = subprocess.run(prefix + cmd, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({done.returncode}):\n"
                           f"{log.read_text(errors='replace')[-3000:]}")


def start_postgres(db: str = "mlflow", user: str = "mlflow") -> Postgres:
    """initdb + pg_ctl start in a new temporary folder, on a free port of 127.0.0.1, with a
    password-protected user and database `db`. PostgreSQL refuses to run as root: as root
    its programs run as the `postgres` user (runuser), in a folder that user owns."""
    import secrets
    import shutil
    import tempfile

    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL's server programs are missing: apt-get install -y "
                           "postgresql (make test's setup does it)")
    root = Path(tempfile.mkdtemp(prefix="bfpg", dir="/tmp"))  # short: socket paths are limited
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    password = secrets.token_hex(12)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if prefix:
        shutil.chown(pwfile, "postgres", "postgres")
    data, log = root / "data", root / "pg.log"
    port = free_ports(1)[0]
    _run_as(prefix, [str(bin_dir / "initdb"), "-D", str(data), "-U", user, "-A",
                     "scram-sha-256", f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8"],
            root / "initdb.log")
    pwfile.unlink()
    _run_as(prefix, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                     "-t", "60", "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root} "
                     "-c fsync=off -c full_page_writes=off", "start"], root / "pg_ctl.log")
    pg = Postgres(f"postgresql://{user}:{password}@127.0.0.1:{port}/{db}", password, data,
                  bin_dir, prefix)
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password,
                            dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()
    return pg


def stop_postgres(pg: Postgres) -> None:
    """pg_ctl stop -m fast on this data folder (it signals that folder's postmaster pid)."""
    import shutil

    subprocess.run(pg.as_user + [str(pg.bin_dir / "pg_ctl"), "-D", str(pg.data_dir), "-m",
                                 "fast", "-w", "stop"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)
    shutil.rmtree(pg.data_dir.parent, ignore_errors=True)


# ---------------------------------------------------------------- Ray nodes

# The head notices a dead node in ~5 s instead of Ray's default ~15-30 s (a killed raylet
# refuses connections at once); the timeout stays generous so a node that is only slow on
# a loaded machine is not declared dead.
RAY_FAST_FAILURE_ENV = {"RAY_health_check_period_ms": "1000",
                        "RAY_health_check_timeout_ms": "5000",
                        "RAY_health_check_failure_threshold": "5"}


CREDENTIAL_PREFIXES = ("AWS_", "MLFLOW_TRACKING_", "MLFLOW_AUTH_", "PG", "GOOGLE_", "AZURE_")


def jobs_api_installed() -> bool:
    """The Jobs API lives in Ray's dashboard, which needs the `ray[default]` extras."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("aiohttp_cors", "grpc", "opencensus"))


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a `ray start`: the venv first on PATH, no
    RAY_ADDRESS, no usage stats, and no credentials (AWS_*, MLFLOW_TRACKING_*, PG*): a
    node's workers inherit its environment, and jobs must get theirs from their runtime
    environment, as on a cluster whose nodes hold no keys."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(CREDENTIAL_PREFIXES) and k != "RAY_ADDRESS"}
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
                "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})})
    return env


@dataclass
class RayHead:
    dashboard: str                # http://127.0.0.1:PORT (Jobs API)
    gcs_address: str              # 127.0.0.1:PORT (what `ray start --address` joins)
    proc: subprocess.Popen
    temp_dir: Path
    log: Path


def wait_for_trial_kill_point(trial_dirs, proc: subprocess.Popen, log: Path,
                              timeout_s: float = 480) -> tuple[Path, Path]:
    """(finished run folder, unfinished run folder) of a sweep or eval driver `proc` once
    one trial has finished and another has saved a checkpoint: the moment to SIGKILL the
    driver in a resume test. `trial_dirs()` lists the trials' run folders."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the driver ended early:\n{log.read_text()[-3000:]}"
        runs = sorted(trial_dirs())
        done = [r for r in runs if (r / "bertflow_result.json").is_file()]
        started = [r for r in runs if r not in done
                   and (r / "checkpoint_manager_snapshot.json").is_file()]
        if done and started:
            return done[0], started[0]
        time.sleep(0.2)
    raise AssertionError(f"no kill point in {timeout_s} s:\n{log.read_text()[-3000:]}")


def mark_trial_running(experiment: Path, run_dir: Path) -> None:
    """Put a finished trial back where a driver SIGKILLed between the trial's last
    checkpoint and the end of its run leaves it: no result file in its run folder, and
    Tune's newest experiment state holding it as running with no result (the timing a
    kill only sometimes hits: the CI run that found it). Tune's state file is its own
    JSON (`trial_data`: [trial state, run metadata] per trial)."""
    trial_id = run_dir.name.rsplit("-", 1)[-1]
    state_file = max(experiment.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] == trial_id:
            trial["status"] = "RUNNING"
            meta = json.loads(entry[1])
            meta["last_result"] = {}
            entry[:] = [json.dumps(trial), json.dumps(meta)]
            break
    else:
        raise AssertionError(f"no trial {trial_id} in {state_file}")
    state_file.write_text(json.dumps(state))
    (run_dir / "bertflow_result.json").unlink()


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL a driver started with `start_new_session=True` together with its local Ray
    (`kill_tree`), then what is left of its session. Killing the driver alone left its
    Ray's Train workers running long enough to finish the trial being resumed, so the
    resumed run found it done instead of continuing it from its checkpoint."""
    kill_tree(proc)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def forget_ray_auth() -> None:
    """Drop the auth token and mode Ray cached in this process (it keeps both once read):
    after a test talked to a token cluster from this process, a local Ray started later
    in the same xdist worker gave its GCS a new token while this process still sent the
    cluster's ("Failed to start GCS ... InvalidAuthToken")."""
    from workflows import ray_internals

    ray_internals.reset_auth_token_cache()
    ray_internals.follow_auth_mode_of_environment()


@contextlib.contextmanager
def cluster_lock() -> Iterator[None]:
    """Held by a test for as long as it runs a multi-process Ray cluster of its own (a head
    started with `ray start`, extra nodes): such tests in different xdist workers then take
    turns, instead of starting their heads at once on a 2-core machine, where Ray's fixed
    30 s for a raylet to register ran out."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "bertflow-tests-ray-cluster.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_ray_head(num_cpus: int = 2, env: dict[str, str] | None = None,
                   timeout_s: float = 180, attempts: int = 2) -> RayHead:
    """`ray start --head --block` on 127.0.0.1 in its own process group, dashboard and Jobs
    API on 127.0.0.1; returns once the dashboard answers. Stop it with `stop_ray`. A head
    that dies or does not answer in `timeout_s` is started again (`attempts` in all): on a
    loaded machine Ray gives up on its own raylet after a fixed 30 s."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_ray_head(num_cpus, env, timeout_s)
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_ray_head(num_cpus: int, env: dict[str, str] | None, timeout_s: float) -> RayHead:
    import tempfile

    gcs, dash, agent, metrics = free_ports(4)
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: socket paths
    log = temp_dir / "head.log"
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
         "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ray_env(env),
        start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", proc, temp_dir, log)
    try:
        wait_http(f"{head.dashboard}/api/version", proc, log, timeout_s)  # 401 counts: up
    except BaseException:
        stop_ray(proc)
        raise
    return head


def start_ray_node_private(gcs_address: str, hidden: list[Path], num_cpus: int, log: Path,
                           env: dict[str, str] | None = None) -> subprocess.Popen:
    """A second Ray node, `ray start --address GCS --block`, in its own mount namespace:
    a private tmpfs on /tmp (Ray's session folder and HOME live there), and each folder of
    `hidden` (the driver's working folders) covered by an empty tmpfs, so a worker that
    opens a driver-local path fails. The venv and the repository stay visible.

    Needs root (mount namespaces). The node is the process group of the returned process:
    SIGKILL that group and the node dies with everything it started."""
    import shlex

    # The venv and the repository must stay visible even when they live under /tmp (a CI
    # checkout there): bind them aside on a private tmpfs, cover /tmp, bind them back.
    keep = sorted({str(p) for p in (REPO_ROOT, Path(sys.prefix).resolve(), VENV_BIN.parent)
                   if str(p).startswith("/tmp/")})
    mounts = ["mount -t tmpfs -o size=1m bertflow-keep /mnt"] if keep else []
    for i, path in enumerate(keep):
        mounts += [f"mkdir -p /mnt/k{i}", f"mount --bind {shlex.quote(path)} /mnt/k{i}"]
    mounts.append("mount -t tmpfs -o size=4g bertflow-node-tmp /tmp")
    for i, path in enumerate(keep):
        mounts += [f"mkdir -p {shlex.quote(path)}", f"mount --bind /mnt/k{i} {shlex.quote(path)}"]
    for path in hidden:
        if not str(path).startswith("/tmp/"):
            mounts.append(f"mount -t tmpfs -o size=1m bertflow-hidden {shlex.quote(str(path))}")
    ray_cmd = [str(VENV_BIN / "ray"), "start", "--address", gcs_address, "--block",
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--temp-dir", "/tmp/ray", "--disable-usage-stats"]
    script = " && ".join([*mounts, "mkdir -p /tmp/home /tmp/ray",
                          "cd /tmp/home", "exec " + shlex.join(ray_cmd)])
    node_env = ray_env({**(env or {}), "HOME": "/tmp/home", "TMPDIR": "/tmp"})
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=node_env,
                            start_new_session=True)
    # Remember the node's mount namespace while its first process lives: `kill_node` finds
    # every process of the node by it, even after that first process is gone.
    ours, deadline = os.readlink("/proc/self/ns/mnt"), time.monotonic() + 10
    proc.mount_namespace = None  # type: ignore[attr-defined]
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            namespace = os.readlink(f"/proc/{proc.pid}/ns/mnt")
        except OSError:
            break
        if namespace != ours:
            proc.mount_namespace = namespace  # type: ignore[attr-defined]
            break
        time.sleep(0.05)
    return proc


def start_ray_node(gcs_address: str, num_cpus: int, log: Path,
                   env: dict[str, str] | None = None) -> subprocess.Popen:
    """A second Ray node on this machine, sharing its filesystem (`ray start --address GCS
    --block` in its own process group). `kill_tree` ends it as a lost machine ends."""
    import tempfile

    temp_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    return subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--address", gcs_address, "--block",
         "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ray_env(env),
        start_new_session=True)


def kill_tree(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGKILL `proc` and every process descended from it (a node's raylet and the
    workers it started, whatever session they moved to). Returns how many died."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, tree = [proc.pid], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout_s)
    return len(tree)


def alive_node_ids(dashboard: str, headers: dict[str, str] | None = None,
                   workers_only: bool = False) -> set[str]:
    """Ids of the nodes the cluster counts alive now (without the head: `workers_only`)."""
    return {n["node_id"] for n in ray_nodes_alive(dashboard, headers)
            if not (workers_only and n.get("is_head_node"))}


def wait_for_new_node(dashboard: str, known: set[str], proc: subprocess.Popen, log: Path,
                      headers: dict[str, str] | None = None, timeout_s: float = 120) -> str:
    """Wait until a worker node not in `known` is alive (the one `proc` starts) and return
    its id; fail with the node's log if `proc` dies first."""
    new = wait_until(lambda: alive_node_ids(dashboard, headers, workers_only=True) - known,
                     proc, log, "a new Ray node", timeout_s, interval_s=1)
    return new.pop()


def wait_until_dead(dashboard: str, node_id: str, headers: dict[str, str] | None = None,
                    timeout_s: float = 60) -> None:
    """Wait until the cluster no longer counts `node_id` alive."""
    deadline = time.monotonic() + timeout_s
    while node_id in alive_node_ids(dashboard, headers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {node_id} still counted alive after {timeout_s:.0f} s")
        time.sleep(0.5)


def ray_nodes_alive(dashboard: str, headers: dict[str, str] | None = None) -> list[dict]:
    """The cluster's alive nodes as the dashboard's state API lists them."""
    import json

    req = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=100", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        rows = json.load(resp)["data"]["result"]["result"]
    return [r for r in rows if r.get("state") == "ALIVE"]


def kill_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGKILL the process group `proc` leads."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout_s)


def kill_node(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    """A node dies the way a lost machine does: SIGKILL every process of the mount
    namespace `proc` (from `start_ray_node_private`) runs in, its process group first
    (raylet, GCS client, agents), then the workers Ray started in sessions of their own.
    Returns how many processes were killed."""
    namespace = getattr(proc, "mount_namespace", None)
    members = []
    if namespace is not None and namespace != os.readlink("/proc/self/ns/mnt"):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == namespace:
                        members.append(int(entry.name))
                except OSError:
                    pass
    kill_group(proc, timeout_s)
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(members)


def stop_ray(proc: subprocess.Popen) -> None:
    """End a `ray start --block` process group: SIGTERM, then SIGKILL (`--block` may
    ignore SIGTERM). Never `ray stop`, which would end every Ray on the machine."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        kill_group(proc)
    except ProcessLookupError:
        pass


@dataclass
class TeamMlflow:
    """An MLflow server on PostgreSQL with S3 artifacts and basic auth (conftest's
    `team_mlflow`)."""

    url: str
    username: str
    password: str
    bucket: str                   # s3://NAME; artifacts under s3://NAME/mlartifacts
    store: str                    # the backend URI as given (no password in it)
    log: Path
    proc: subprocess.Popen

    @property
    def client_env(self) -> dict[str, str]:
        """What a client (or a job) sets to log and register there."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}
