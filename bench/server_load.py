"""The tracking server under a team's load: `bertflow server` as a cluster head runs it
(basic auth, a non-admin jobs user) on PostgreSQL, and on sqlite for contrast, with 1, 8 and
32 concurrent clients.

Each client is one job's rank 0 speaking MLflow's REST API, as `loop.RunLogger` does through
the MLflow client: it opens a run, logs its params in one batch, logs `--batches` metric
batches (one step's nine training metrics each, the next as soon as the last is answered:
a rank logging every step of a fast model, the worst case), ends the run and registers a
version of the one model name that every client of the level shares. Clients are threads
of this process, one keep-alive connection each, started together; nothing is retried, so
every failed request is counted.

Printed per store and level: requests/s, p50/p99 of a metrics batch and of every request,
p99 of a registration, errors (an answer other than 200, besides the expected "already
exists" of the shared name, or a failed connection) and what is counted back afterwards:
metrics lost (each run's history read back, every key at every step once) and the versions
(distinct, numbered 1..N without gaps, one per run). Then PostgreSQL's figures over
sqlite's. Goals on PostgreSQL: zero errors and zero lost metrics at 32 clients, p99 of a
metrics batch under 250 ms at 8 (the 2-core development machine; the clients share its
CPUs with the server). The load average is printed before and after.

    python bench/server_load.py [--quick] [--batches 60] [--concurrency 1 8 32]
        [--stores postgres sqlite] [--workers N] [--db-pool-size N]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What a pretraining rank logs every `--log-every` steps (loop.train_summary + the step's).
METRIC_KEYS = ("train_loss", "train_mlm_loss", "train_nsp_loss", "train_mlm_accuracy",
               "tokens_per_s", "samples_per_s", "lr", "grad_norm", "tokens_seen")
API = "/api/2.0/mlflow"


class Client:
    """One keep-alive connection with a user's basic-auth header; `call` times a request."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.port = port
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"content-type": "application/json", "authorization": f"Basic {token}"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: dict | None = None
             ) -> tuple[int, dict, float]:
        """(status, JSON answer, seconds); status 0 for a failed connection."""
        start = time.perf_counter()
        try:
            self.conn.request(method, API + path, json.dumps(body) if body else None,
                              self.headers)
            resp = self.conn.getresponse()
            raw = resp.read()
            status = resp.status
        except OSError:
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            return 0, {}, time.perf_counter() - start
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        return status, answer, time.perf_counter() - start

    def close(self) -> None:
        self.conn.close()


class Level:
    """What the clients of one level measured (shared, under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.runs: list[str] = []
        self.sent = 0  # metric values sent (answered or not)

    def record(self, kind: str, status: int, answer: dict, seconds: float,
               accept: tuple[str, ...] = ()) -> bool:
        ok = status == 200 or answer.get("error_code") in accept
        with self.lock:
            self.latency.setdefault(kind, []).append(seconds)
            if not ok:
                self.errors.append(f"{kind}: {status} {answer.get('error_code', '')} "
                                   f"{str(answer.get('message', ''))[:120]}")
        return ok


def job(client: Client, level: Level, experiment_id: str, model: str, index: int,
        batches: int, start: threading.Barrier) -> None:
    """One training job's traffic: run, params, metric batches, end, a registered version."""
    start.wait()
    now = int(time.time() * 1000)
    status, answer, s = client.call("POST", "/runs/create", {
        "experiment_id": experiment_id, "run_name": f"job-{index}", "start_time": now})
    with level.lock:
        level.sent += batches * len(METRIC_KEYS)
    if not level.record("create run", status, answer, s):
        return
    run_id = answer["run"]["info"]["run_id"]
    artifact_uri = answer["run"]["info"]["artifact_uri"]
    params = [{"key": f"param_{k}", "value": str(k * index)} for k in range(20)]
    level.record("params", *client.call("POST", "/runs/log-batch",
                                        {"run_id": run_id, "params": params}))
    for step in range(batches):
        ts = int(time.time() * 1000)
        metrics = [{"key": k, "value": step + j / 10 + index, "timestamp": ts, "step": step}
                   for j, k in enumerate(METRIC_KEYS)]
        level.record("metrics batch", *client.call("POST", "/runs/log-batch",
                                                   {"run_id": run_id, "metrics": metrics}))
    level.record("end run", *client.call("POST", "/runs/update", {
        "run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)}))
    status, answer, s = client.call("POST", "/registered-models/create", {"name": model})
    level.record("register", status, answer, s, accept=("RESOURCE_ALREADY_EXISTS",))
    if level.record("register", *client.call("POST", "/model-versions/create", {
            "name": model, "source": f"{artifact_uri}/model", "run_id": run_id})):
        with level.lock:
            level.runs.append(run_id)


def count_back(client: Client, level: Level, model: str, batches: int) -> dict[str, object]:
    """Read every run's metric history and the model's versions back (not timed)."""
    found = duplicated = 0
    for run_id in level.runs:
        for key in METRIC_KEYS:
            q = urllib.parse.urlencode({"run_id": run_id, "metric_key": key,
                                        "max_results": 25000})
            status, answer, _ = client.call("GET", f"/metrics/get-history?{q}")
            steps = [m["step"] for m in answer.get("metrics", [])] if status == 200 else []
            found += len(set(steps) & set(range(batches)))
            duplicated += len(steps) - len(set(steps))
    q = urllib.parse.urlencode({"filter": f"name='{model}'", "max_results": 1000})
    status, answer, _ = client.call("GET", f"/model-versions/search?{q}")
    versions = answer.get("model_versions", []) if status == 200 else []
    numbers = sorted(int(v["version"]) for v in versions)
    by_run = sorted(v.get("run_id", "") for v in versions)
    return {"lost": level.sent - found, "duplicated": duplicated,
            "versions_ok": (numbers == list(range(1, len(level.runs) + 1))
                            and by_run == sorted(level.runs)),
            "versions": numbers}


def group_cpu_seconds(pgids: set[int]) -> float:
    """CPU seconds (user + system, reaped children included) of every live process in
    the process groups `pgids`: the server's workers, PostgreSQL's backends."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:  # fields[2]: pgrp; 11-14: utime stime cutime cstime
            total += sum(int(f) for f in fields[11:15]) / tick
    return total


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def run_level(port: int, user: str, password: str, store: str, clients: int,
              batches: int, pgids: set[int]) -> dict[str, object]:
    setup = Client(port, user, password)
    status, answer, _ = setup.call("POST", "/experiments/create",
                                   {"name": f"load-{store}-{clients}-{secrets.token_hex(3)}"})
    setup.close()  # an idle keep-alive connection is closed by the server after 5 s
    if status != 200:
        raise SystemExit(f"cannot create the experiment: {status} {answer}")
    experiment_id, model = answer["experiment_id"], f"load-{store}-{clients}"
    level = Level()
    conns = [Client(port, user, password) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=job, args=(conns[i], level, experiment_id, model, i,
                                                  batches, barrier)) for i in range(clients)]
    for t in threads:
        t.start()
    cpu0 = group_cpu_seconds(pgids)
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    cpu = group_cpu_seconds(pgids) - cpu0
    for c in conns:
        c.close()
    reader = Client(port, user, password)
    counted = count_back(reader, level, model, batches)
    reader.close()
    every = [s for values in level.latency.values() for s in values]
    return {"rps": len(every) / elapsed, "elapsed": elapsed, "requests": len(every),
            "cpu_ms": 1000 * cpu / max(1, len(every)),
            "batch_p50": pct(level.latency.get("metrics batch", []), 0.50),
            "batch_p99": pct(level.latency.get("metrics batch", []), 0.99),
            "all_p50": pct(every, 0.50), "all_p99": pct(every, 0.99),
            "register_p99": pct(level.latency.get("register", []), 0.99),
            "errors": len(level.errors), "error_kinds": sorted(set(level.errors))[:3],
            **counted}


def start_store_server(store: str, work: Path, args: argparse.Namespace, pg) -> tuple:
    """`bertflow server --auth` on `store`; returns (process, port, jobs user, password)."""
    from tests.services import free_ports
    from workflows.config import ServerConfig
    from workflows.ops import server

    admin, admin_pw = "bench-admin", secrets.token_hex(12)
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_USERNAME": admin,
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_pw}
    port = free_ports(1)[0]
    options = {k: v for k, v in (("workers", args.workers), ("db_pool_size", args.db_pool_size))
               if v is not None}
    if store == "postgres":
        env["PGPASSWORD"] = pg.password
        cfg = ServerConfig(port=port, backend_store_uri=pg.url.replace(f":{pg.password}@", "@"),
                           artifacts_destination=str(work / "pg-artifacts"), auth=True,
                           **options)
    else:
        cfg = ServerConfig(port=port, tracking_uri=f"sqlite:///{work / 'mlruns.db'}", auth=True,
                           **options)
    log = open(work / f"server-{store}.log", "wb")
    proc, _ = server.start_server(cfg, timeout_s=600, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    print(f"{store}: {' '.join(proc.bertflow_launch.notes[:1])}", flush=True)
    jobs_user, jobs_pw = "bench-jobs", secrets.token_hex(12)
    status, answer, _ = Client(port, admin, admin_pw).call(
        "POST", "/users/create", {"username": jobs_user, "password": jobs_pw})
    if status != 200:
        server.stop_server(proc)
        raise SystemExit(f"cannot create the jobs user: {status} {answer}")
    return proc, port, jobs_user, jobs_pw


def postmaster_pgid(pg) -> int:
    """The process group of PostgreSQL's postmaster (its backends are in it)."""
    pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    return os.getpgid(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 15 batches per client, levels 1 and 8 and 32")
    parser.add_argument("--batches", type=int, default=60,
                        help="metric batches each client logs (default 60)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--stores", nargs="+", default=["postgres", "sqlite"],
                        choices=["postgres", "sqlite"])
    parser.add_argument("--workers", type=int, default=None,
                        help="bertflow server --workers (default: its own default)")
    parser.add_argument("--db-pool-size", type=int, default=None,
                        help="bertflow server --db-pool-size (default: its own default)")
    args = parser.parse_args()
    batches = 15 if args.quick else args.batches
    # `timeout` and Ctrl-C end the run through the `finally`s: the server and PostgreSQL stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("server_load: terminated"))
    load_before = os.getloadavg()

    from tests.services import postgres_bin, start_postgres, stop_postgres
    from workflows.ops import server

    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    pg = None
    if "postgres" in args.stores:
        if postgres_bin() is None:
            raise SystemExit("PostgreSQL's server programs are missing: `make postgres` "
                             "(apt-get install postgresql), or --stores sqlite")
        pg = start_postgres()
    results: dict[str, dict[int, dict[str, object]]] = {}
    try:
        for store in args.stores:
            proc, port, user, password = start_store_server(store, work, args, pg)
            pgids = {proc.pid} | ({postmaster_pgid(pg)} if store == "postgres" else set())
            try:
                run_level(port, user, password, store + "-warmup", 4, 3, pgids)  # not counted
                results[store] = {}
                for c in args.concurrency:
                    r = run_level(port, user, password, store, c, batches, pgids)
                    results[store][c] = r
                    print(f"  {c:3d} clients: {r['rps']:6.1f} req/s  server CPU "
                          f"{r['cpu_ms']:4.0f} ms/request  metrics batch p50 "
                          f"{r['batch_p50']:5.0f} ms p99 {r['batch_p99']:5.0f} ms  all p99 "
                          f"{r['all_p99']:5.0f} ms  register p99 {r['register_p99']:5.0f} ms  "
                          f"errors {r['errors']}  lost {r['lost']}  duplicated "
                          f"{r['duplicated']}  versions "
                          f"{'1..%d ok' % len(r['versions']) if r['versions_ok'] else r['versions']}"
                          + (f"  {r['error_kinds']}" if r["errors"] else ""), flush=True)
            finally:
                server.stop_server(proc)
    finally:
        if pg is not None:
            stop_postgres(pg)
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); "
          f"{batches} metric batches of {len(METRIC_KEYS)} per client; {os.cpu_count()} CPUs")
    if "postgres" in results and "sqlite" in results:
        for c in args.concurrency:
            pgr, lite = results["postgres"][c], results["sqlite"][c]
            print(f"{c:3d} clients: postgres/sqlite throughput {pgr['rps'] / lite['rps']:.2f}x, "
                  f"metrics batch p99 {pgr['batch_p99']:.0f} vs {lite['batch_p99']:.0f} ms, "
                  f"errors {pgr['errors']} vs {lite['errors']}, lost {pgr['lost']} vs "
                  f"{lite['lost']}")
    if "postgres" in results:
        pgr = results["postgres"]
        goals = []
        if 32 in pgr:
            goals.append(f"zero errors and lost at 32: "
                         f"{'met' if not pgr[32]['errors'] and not pgr[32]['lost'] else 'NOT met'}")
        if 8 in pgr:
            goals.append(f"metrics batch p99 < 250 ms at 8: "
                         f"{'met' if pgr[8]['batch_p99'] < 250 else 'NOT met'}")
        print("goals (postgres): " + "; ".join(goals))
    print(f"(server logs in {work})")


if __name__ == "__main__":
    main()
