"""Training outlives its tracker: metrics go through an outbox (workflows.tracking_outbox)
that keeps them in order, in memory then in the run folder, while the tracker is down,
sends them once it is back, never twice; a run whose server is still down at its end
leaves its model in the run folder for `bertflow registry register`.

The fast tests talk to a tiny HTTP tracker on 127.0.0.1 that is really stopped (its
socket closed: connection refused) and started again on its port, and to a real MLflow
sqlite store; the slow one pretrains against a real `bertflow server` on PostgreSQL with
auth that is killed under it."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_prep.storage import open_location
from workflows.tracking_outbox import Outbox, deliver_spilled

# ---------------------------------------------------------------- a tiny tracker


class TinyTracker:
    """An HTTP tracker that stores what it is sent: POST /send (records), GET /latest
    (key -> latest step). `stop` closes its socket; `start` listens on the same port."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        tracker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                latest: dict[str, int] = {}
                for r in tracker.records:
                    if "k" in r:
                        latest[r["k"]] = max(r["s"], latest.get(r["k"], -1))
                self._reply(latest)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                tracker.records.extend(json.loads(body))
                self._reply({})

            def _reply(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def metrics(self) -> list[tuple[str, int, float, int]]:
        return [(r["k"], r["s"], r["v"], r["t"]) for r in self.records if "k" in r]


class HttpTransport:
    describe = "the tiny tracker"

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def latest_steps(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/latest", timeout=5) as r:
            return json.loads(r.read())

    def send(self, records: list[dict]) -> None:
        req = urllib.request.Request(f"{self.url}/send", data=json.dumps(records).encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def segments(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("segment_*.jsonl")) if folder.is_dir() else []


@pytest.fixture()
def tracker():
    t = TinyTracker()
    yield t
    t.stop()


# ---------------------------------------------------------------- no Ray, no server


def test_an_outage_keeps_every_metric_in_order_spills_beyond_the_bound_and_warns_twice(
        tracker, tmp_path, caplog):
    spill = tmp_path / "run" / "tracker_outbox"
    outbox = Outbox(HttpTransport(tracker.port), open_location(spill), memory_limit=30,
                    max_backoff_s=0.2)
    caplog.set_level(logging.WARNING, logger="workflows.tracking_outbox")
    outbox.put_params({"global_batch_size": 64})
    outbox.put_metrics({"loss": 9.0, "acc": 0.0}, step=0, timestamp_ms=1_000)
    wait_for(lambda: len(tracker.records) == 3, "the first records")

    tracker.stop()  # connection refused from here on
    for step in range(1, 61):  # 120 values: past the bound of 30, so on disk
        outbox.put_metrics({"loss": 9.0 - step / 10, "acc": step / 100}, step,
                           timestamp_ms=1_000 + step)
    wait_for(lambda: outbox.down, "the outbox to notice")
    outbox.checkpoint()  # what is left in memory becomes durable too
    assert len(segments(spill)) >= 4, segments(spill)
    assert outbox.pending() == 120

    tracker.start()
    assert outbox.close(wait_s=60)
    got = tracker.metrics()
    want = [(k, s, (9.0 - s / 10) if k == "loss" else s / 100, 1_000 + s)
            for s in range(61) for k in ("loss", "acc")]
    want[:2] = [("loss", 0, 9.0, 1_000), ("acc", 0, 0.0, 1_000)]
    assert got == want  # each once, in order, with its own step and timestamp
    assert tracker.records[0] == {"p": "global_batch_size", "v": "64"}
    assert segments(spill) == []  # delivered segments are deleted
    warned = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in warned) == 1, warned
    assert sum("is back" in m for m in warned) == 1, warned


def test_a_restarted_rank_0_resends_what_was_kept_and_never_duplicates(tracker, tmp_path):
    spill = open_location(tmp_path / "run" / "tracker_outbox")
    first = Outbox(HttpTransport(tracker.port), spill, max_backoff_s=0.2)
    for step in range(1, 6):
        first.put_metrics({"loss": float(step)}, step)
    wait_for(lambda: len(tracker.records) == 5, "steps 1-5")
    tracker.stop()
    for step in range(6, 11):  # a checkpoint at 8, then rank 0 is lost at 10
        first.put_metrics({"loss": float(step)}, step)
    wait_for(lambda: first.down, "the outbox to notice")
    assert not first.close(wait_s=0)  # what it held is in the run folder now
    assert segments(Path(spill.path))

    # The restarted worker group resumes at step 8 and logs 8, 9, ... again.
    tracker.start()
    second = Outbox(HttpTransport(tracker.port), spill, max_backoff_s=0.2)
    for step in range(8, 13):
        second.put_metrics({"loss": step + 0.5}, step)
    assert second.close(wait_s=60)
    assert [(s, v) for _, s, v, _ in tracker.metrics()] == \
        [(s, float(s)) for s in range(1, 11)] + [(11, 11.5), (12, 12.5)]
    assert second.dropped == 3  # 8, 9 and 10: already sent from the first one's segment


def test_kept_metrics_reach_a_real_mlflow_run_once(tmp_path, tracking_uri):
    """The MLflow side: an unopenable sqlite store, then the real one; the run's history
    holds each step once, at its original timestamp, however often delivery runs."""
    from workflows import tracking as T
    from workflows.tracking_outbox import MlflowTransport

    c = T.client(tracking_uri)
    run_id = c.create_run(T.ensure_experiment("outage", tracking_uri)).info.run_id
    c.log_metric(run_id, "loss", 1.0, timestamp=1_001, step=1)  # sent before the outage
    spill = open_location(tmp_path / "run" / "tracker_outbox")
    gone = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlruns.db'}"
    outbox = Outbox(MlflowTransport(gone, run_id), spill, max_backoff_s=0.2)
    for step in (1, 2, 3):
        outbox.put_metrics({"loss": float(step)}, step, timestamp_ms=1_000 + step)
    assert not outbox.close(wait_s=0)

    assert deliver_spilled(spill, tracking_uri, run_id, wait_s=60)
    assert deliver_spilled(spill, tracking_uri, run_id, wait_s=60)  # nothing left: no-op
    history = sorted((m.step, m.value, m.timestamp)
                     for m in c.get_metric_history(run_id, "loss"))
    assert history == [(1, 1.0, 1_001), (2, 2.0, 1_002), (3, 3.0, 1_003)]
    assert not any(Path(spill.path).glob("segment_*"))


# ---------------------------------------------------------------- real Ray + server


class KillableServer:
    """`bertflow server` on the session's PostgreSQL with basic auth, artifacts in a
    folder, on a fixed port: `kill` ends its process group, `start` brings it back."""

    def __init__(self, postgres, work: Path) -> None:
        import secrets

        from tests.services import free_ports
        from workflows.config import ServerConfig

        self.user, self.password = "outage-admin", secrets.token_hex(12)
        self.cfg = ServerConfig(
            port=free_ports(1)[0], backend_store_uri=postgres.url.replace(
                f":{postgres.password}@", "@"),
            artifacts_destination=str(work / "artifacts"), auth=True, workers=1)
        self.env = {**__import__("os").environ, "PGPASSWORD": postgres.password,
                    "MLFLOW_AUTH_ADMIN_USERNAME": self.user,
                    "MLFLOW_AUTH_ADMIN_PASSWORD": self.password}
        self.log, self.proc, self.url = work / "server.log", None, None
        self.start()

    def start(self) -> None:
        import subprocess

        from workflows.ops import server

        with open(self.log, "ab") as out:
            self.proc, self.url = server.start_server(
                self.cfg, timeout_s=300, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        from workflows.ops import server

        server.stop_server(self.proc)
        self.proc = None

    @property
    def client_env(self) -> dict[str, str]:
        # MLflow's retry budget made short (a refused connection is retried once, after
        # 1 s): an outage of seconds outlasts it. A loaded server still has 30 s to answer.
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": self.user,
                "MLFLOW_TRACKING_PASSWORD": self.password,
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@pytest.fixture()
def killable_server(postgres, tmp_path):
    server = KillableServer(postgres, tmp_path)
    yield server
    if server.proc is not None:
        server.kill()


def checkpoints(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("checkpoint_0*") if p.is_dir()} \
        if run_dir.is_dir() else set()


def outage(server: KillableServer, run_dir: Path, seen: dict, restart: bool) -> None:
    """Kill the server once the run has a checkpoint; with `restart`, start it again
    once two more checkpoints were written while it was down (and the outage outlasted
    MLflow's retry budget)."""
    wait_for(lambda: checkpoints(run_dir), "a first checkpoint", timeout_s=600)
    seen["at_kill"] = checkpoints(run_dir)
    server.kill()
    killed_at = time.monotonic()
    if not restart:
        return
    wait_for(lambda: len(checkpoints(run_dir) - seen["at_kill"]) >= 2
             and time.monotonic() - killed_at > 15, "checkpoints during the outage", 600)
    seen["while_down"] = checkpoints(run_dir) - seen["at_kill"]
    server.start()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pretraining_outlives_a_killed_server_and_registers_now_or_later(
        ray_local, killable_server, tmp_path, monkeypatch):
    """Two pretraining runs on a real `bertflow server` (PostgreSQL, auth) killed under
    them: (1) killed after the first checkpoint and restarted after two more: training
    went on, the run ends FINISHED with every logged step once and the model
    registered; (2) killed for good: the job ends with the model in its run folder, and
    `bertflow registry register` completes it once the server is back, with the lineage
    and the whole history."""
    import subprocess
    import sys

    from data_prep.config import PrepConfig
    from data_prep.manifest import Manifest
    from data_prep.pipeline import build_pretraining_dataset
    from tests.helpers import templated_corpus
    from workflows import tracking as T
    from workflows.config import PretrainConfig, config_from_mapping
    from workflows.deferred_registration import PendingRegistration
    from workflows.run_folder import RunFolder
    from workflows.training.pretrain import run_pretrain

    server = killable_server
    for k, v in server.client_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    build_pretraining_dataset(PrepConfig(
        input=[str(templated_corpus(tmp_path / "corpus.txt", n_docs=300))],
        output=str(tmp_path / "ds"), train_vocab=200, max_seq_len=32, objective="mlm",
        masking="dynamic", dupe_factor=1, val_fraction=0.1, tokenize_workers=1))
    fingerprint = Manifest.load(tmp_path / "ds").fingerprint

    def pretrain(name: str, restart: bool):
        cfg = config_from_mapping(PretrainConfig, dict(
            data=str(tmp_path / "ds"), run_name=name, model_size="tiny", num_workers=1,
            cpus_per_worker=0.5, batch_size=8, max_steps=200, warmup_steps=5,
            checkpoint_every=20, keep_checkpoints=20, eval_every=100, eval_batches=2,
            log_every=10, storage_path=str(tmp_path / "runs"), experiment="outage",
            register_as="outage-tiny", log_system_metrics=False,
            tracker_wait_s=300 if restart else 2))
        seen: dict = {}
        killer = threading.Thread(target=outage, args=(server, tmp_path / "runs" / name,
                                                       seen, restart), daemon=True)
        killer.start()
        result = run_pretrain(cfg)
        killer.join(timeout=600)
        return result, seen

    def history_once(run_id: str) -> None:
        c = T.client(server.url)
        steps = [m.step for m in c.get_metric_history(run_id, "train_loss")]
        assert sorted(steps) == list(range(10, 201, 10)), steps  # every logged step, once
        val = [m.step for m in c.get_metric_history(run_id, "val_mlm_loss")]
        assert sorted(val) == [0, 100, 200], val
        assert c.get_run(run_id).info.status == "FINISHED"

    # (1) Killed mid-run, back before the end.
    live, seen = pretrain("outage-back", restart=True)
    assert len(seen["while_down"]) >= 2  # training went on while the server was away
    assert live.step == 200 and live.model_version and live.pending is None
    history_once(live.run_id)
    mv = T.client(server.url).get_model_version("outage-tiny", live.model_version)
    assert mv.tags[T.TAG_RUN_ID] == live.run_id

    # (2) Killed for good: the model waits in the run folder.
    later, seen = pretrain("outage-end", restart=False)
    assert later.step == 200 and later.model_version is None
    run = RunFolder.at(later.run_dir)
    pending = PendingRegistration.load(run)
    assert pending.run_id == later.run_id and pending.register_as == "outage-tiny"
    assert later.pending == f"bertflow registry register {later.run_dir} --name outage-tiny"
    assert (Path(later.model_dir) / "model.safetensors").is_file()
    assert list((Path(later.run_dir) / "tracker_outbox").glob("segment_*.jsonl"))

    server.start()
    cli = subprocess.run([sys.executable, "-m", "workflows.cli", "registry", "register",
                          str(later.run_dir), "--name", "outage-tiny"],
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    history_once(later.run_id)
    c = T.client(server.url)
    versions = c.search_model_versions("name = 'outage-tiny'")
    mv = next(v for v in versions if (v.tags or {}).get(T.TAG_RUN_ID) == later.run_id)
    assert mv.tags[T.TAG_RUN_ID] == later.run_id
    assert mv.tags[T.TAG_DATASET_FINGERPRINT] == fingerprint
    assert mv.tags[T.TAG_RUN_NAME] == "outage-end"
    assert int(mv.version) == int(live.model_version) + 1
    assert PendingRegistration.load(run) is None
    assert not list((Path(later.run_dir) / "tracker_outbox").glob("segment_*.jsonl"))
