"""`bertflow server`: a real `mlflow server` on loopback; a tiny pretrain logs and registers
through it, and `bertflow registry` browses the result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from data_prep.storage import redact
from workflows.config import ServerConfig
from workflows.ops import registry, server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_local_default_serves_the_sqlite_store_on_loopback(tmp_path):
    launch = server.plan_server(ServerConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
                                             port=5123), environ={})
    cmd = launch.command
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    # The store reaches mlflow through its environment: a URI's password never lands in `ps`.
    assert "--backend-store-uri" not in cmd
    assert launch.env == {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
                          "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "5",
                          "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "40"}
    # A team's defaults: 4 uvicorn workers, which uvicorn's supervisor does not kill for
    # being slow to answer its ping on a loaded machine; bertflow's own options only.
    assert cmd[cmd.index("--workers") + 1] == "4"
    assert cmd[cmd.index("--uvicorn-opts") + 1] == "--timeout-worker-healthcheck 60"
    sized = server.plan_server(ServerConfig(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                                            workers=2, db_pool_size=3), environ={})
    assert sized.command[sized.command.index("--workers") + 1] == "2"
    assert sized.env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"] == "3"
    assert "up to 2 x 2 stores x 3 = 12" in sized.notes[0]
    with pytest.raises(Exception, match="workers"):
        ServerConfig(workers=0)
    # The pool's overflow covers every request a worker runs at once (anyio's threads).
    import anyio

    async def threads() -> float:
        return anyio.to_thread.current_default_thread_limiter().total_tokens

    assert anyio.run(threads) <= server.WORKER_THREADS
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    assert "--serve-artifacts" in cmd and "--app-name" not in cmd
    with pytest.raises(server.ServerError, match="already a server"):
        server.plan_server(ServerConfig(tracking_uri="http://127.0.0.1:5000"), environ={})
    # A wildcard bind is reached on loopback; IPv6 hosts are bracketed.
    assert server.server_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert server.server_url("::1", 5001) == "http://[::1]:5001"


def test_a_database_needs_an_artifact_destination_and_passwords_are_redacted(tmp_path):
    uri = "postgresql://mlflow:s3cr3t-pw@db.internal:5432/mlflow"
    assert redact(uri) == "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert redact("postgresql://mlflow@db:5432/m") == "postgresql://mlflow@db:5432/m"
    # The one redaction of logs, params and tags: a bare http(s) userinfo is a token.
    assert (redact("at http://tok3n@h:5000 and https://u:p@h/x; abfs://box@acct.dfs/d")
            == "at http://***@h:5000 and https://u:***@h/x; abfs://box@acct.dfs/d")
    with pytest.raises(server.ServerError, match="--artifacts-destination") as err:
        server.plan_server(ServerConfig(backend_store_uri=uri), environ={})
    assert "s3cr3t-pw" not in str(err.value)
    launch = server.plan_server(ServerConfig(artifacts_destination=str(tmp_path / "art")),
                                environ={"MLFLOW_BACKEND_STORE_URI": uri})
    # postgresql:// names the installed driver (SQLAlchemy 2.1 would default to psycopg 3)
    import importlib.util

    driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"
    installed = uri.replace("postgresql://", f"postgresql+{driver}://")
    assert launch.env["MLFLOW_BACKEND_STORE_URI"] == installed
    assert launch.store == redact(installed) and "***" in launch.store
    assert not any("s3cr3t-pw" in part for part in launch.command)
    assert not any("max_connections" in note for note in launch.notes)
    # More connections kept open than a default PostgreSQL accepts: said before it fails.
    crowded = server.plan_server(ServerConfig(artifacts_destination=str(tmp_path / "art"),
                                              workers=12),
                                 environ={"MLFLOW_BACKEND_STORE_URI": uri})
    assert any("120 connections" in n and "max_connections (100)" in n for n in crowded.notes)


def test_binding_beyond_loopback_needs_auth_or_insecure(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(server.ServerError, match="--auth.*--insecure"):
        server.plan_server(ServerConfig(host="0.0.0.0", tracking_uri=store), environ={})
    assert server.plan_server(ServerConfig(host="0.0.0.0", tracking_uri=store, insecure=True),
                              environ={}).command[5] == "0.0.0.0"
    launch = server.plan_server(ServerConfig(host="0.0.0.0", tracking_uri=store, auth=True),
                                environ={"MLFLOW_AUTH_ADMIN_PASSWORD": "never-written-1"})
    try:
        assert launch.command[-2:] == ["--app-name", "basic-auth"]
        ini = Path(launch.env["MLFLOW_AUTH_CONFIG_PATH"])
        # MLflow's auth config lives in a private folder and holds no password.
        assert ini.parent.stat().st_mode & 0o077 == 0 and ini.stat().st_mode & 0o077 == 0
        text = ini.read_text()
        assert f"database_uri = {store}" in text and "admin_username = admin" in text
        assert "never-written-1" not in text and "admin_password" not in text
        assert len(launch.env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    finally:
        server.discard(launch)
    assert not ini.parent.exists()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_environment_cannot_widen_the_server(tmp_path, monkeypatch):
    """MLFLOW_GUNICORN_OPTS="-b 0.0.0.0:PORT" gave a second listener without auth beside
    the loopback one: now `bertflow server` refuses to start, naming the variable, and
    neither port answers."""
    port, extra = free_port(), free_port()
    monkeypatch.setenv("MLFLOW_GUNICORN_OPTS", f"-b 0.0.0.0:{extra}")
    cfg = ServerConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", port=port,
                       workers=1)
    try:
        proc, _ = server.start_server(cfg, timeout_s=120, stdout=open(tmp_path / "log", "wb"),
                                      stderr=subprocess.STDOUT)
    except server.ServerError as exc:
        assert "MLFLOW_GUNICORN_OPTS" in str(exc) and "listener" in str(exc)
    else:
        server.stop_server(proc)
        pytest.fail("the server started with MLFLOW_GUNICORN_OPTS set")
    assert not _listening(extra) and not _listening(port)
    monkeypatch.delenv("MLFLOW_GUNICORN_OPTS")
    for name, value in [("GUNICORN_CMD_ARGS", "--bind 0.0.0.0:1"),
                        ("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS", "*"),
                        ("MLFLOW_SERVER_ALLOWED_HOSTS", "*"),
                        ("MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE", "true"),
                        ("MLFLOW_UVICORN_OPTS", "--uds /tmp/x.sock"), ("UVICORN_FD", "3"),
                        ("MLFLOW_SERVER_ENABLE_GRAPHQL_AUTH", "false")]:
        with pytest.raises(server.ServerError, match=name):
            server.plan_server(cfg, environ={name: value})
    # MLflow's defaults spelled out change nothing; the server's env never carries them.
    harmless = {"MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": "false",
                "MLFLOW_SERVER_X_FRAME_OPTIONS": "DENY"}
    server.plan_server(cfg, environ=harmless)
    assert not set(harmless) & set(server.server_env({**harmless, "PATH": "/bin"}))


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real MLflow server on a free loopback port; terminated (its process group) after."""
    store = tmp_path / "store"
    store.mkdir()
    log = open(tmp_path / "server.log", "wb")
    proc, url = server.start_server(
        ServerConfig(tracking_uri=f"sqlite:///{store / 'mlruns.db'}", port=free_port(),
                     workers=1),
        timeout_s=300, stdout=log, stderr=log)
    try:
        yield url, store / "mlartifacts"
    finally:
        server.stop_server(proc)
        log.close()


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(server.ServerError, match="uses that port"):
            server.start_server(ServerConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
                                             port=port), timeout_s=60, stdout=open(tmp_path / "log", "wb"),
                                  stderr=open(tmp_path / "err", "wb"))


def test_bertflow_server_is_the_same_launcher_with_the_port_check(tmp_path, capsys):
    """`bertflow server` goes through start_server: a busy port is a clear error at once,
    not mlflow dying after its workers started."""
    from workflows.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["server", "--port", str(port),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}"]) == 2
    assert "uses that port" in capsys.readouterr().err


def test_the_server_runs_without_unpickling_or_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    env = server.server_env()
    assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DO_NOT_TRACK"] == "true"
    assert env["PATH"]  # the rest of the environment is kept


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_pretrain_through_the_server_then_browse_it(ray_local, mlflow_server, tmp_path,
                                                          minilm_dir):
    from pydoc_data.topics import topics

    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pretraining_dataset
    from workflows import tracking
    from workflows.config import PretrainConfig, config_from_mapping
    from workflows.training.pretrain import run_pretrain

    url, artifacts = mlflow_server
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k].strip() for k in sorted(topics)[:20]) + "\n")
    data = tmp_path / "data"
    build_pretraining_dataset(PrepConfig(input=[str(corpus)], output=str(data),
                                         vocab=str(minilm_dir / "vocab.txt"),
                                         max_seq_len=64, dupe_factor=1))
    result = run_pretrain(config_from_mapping(PretrainConfig, dict(
        data=str(data), run_name="served-tiny", model_size="tiny", max_steps=4,
        warmup_steps=1, batch_size=8, log_every=1, eval_every=0, eval_batches=2,
        checkpoint_every=0, storage_path=str(tmp_path / "runs"), tracking_uri=url,
        register_as="served-bert", log_system_metrics=False)))
    assert result.model_version == "1"

    rows = registry.list_models(url)
    assert [r["name"] for r in rows] == ["served-bert"]
    assert rows[0]["task"] == "pretraining" and rows[0]["latest"] == "1"
    info = registry.show_model("served-bert/1", url)
    assert info["run_name"] == "served-tiny" and info["dataset_path"] == str(data)
    assert info["metrics"].get("train_loss", 0) > 0
    # The server stored the model files in its artifact folder and serves them back.
    assert list(artifacts.rglob("model.safetensors"))
    folder = tracking.resolve_model("models:/served-bert/1", dest=tmp_path / "dl",
                                    tracking_uri=url)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


CLIENT = """
import mlflow
with mlflow.start_run(experiment_id=mlflow.create_experiment("team-check")) as run:
    mlflow.log_param("where", "postgres")
    mlflow.log_text("served, not uploaded by me", "notes/hello.txt")
print(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/hello.txt"))
"""


@pytest.mark.slow
def test_the_team_server_postgres_s3_artifacts_basic_auth(team_mlflow, postgres, tmp_path):
    """The server a cluster head runs: a client with only the server's URL and a user logs a
    run and an artifact; the artifact lands in the bucket through the server; no password
    shows in the server's command lines or its log; anonymous requests are refused."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    import boto3

    search = f"{team_mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(search, timeout=10)
    assert denied.value.code == 401

    client_env = {k: v for k, v in os.environ.items()
                  if not k.startswith(("AWS_", "PG", "MLFLOW_AUTH_"))}
    client_env.update(team_mlflow.client_env)
    done = subprocess.run([sys.executable, "-c", CLIENT], env=client_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("served, not uploaded by me")

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = team_mlflow.bucket.removeprefix("s3://")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("mlartifacts/") and k.endswith("notes/hello.txt") for k in keys)

    secrets = (postgres.password, team_mlflow.password)
    ps = subprocess.run(["ps", "-ww", "-o", "args=", "-g", str(team_mlflow.proc.pid)],
                        capture_output=True, text=True).stdout
    assert "--app-name basic-auth" in ps and "--artifacts-destination s3://" in ps
    assert not any(s in ps for s in secrets)
    assert not any(s in team_mlflow.log.read_text(errors="replace") for s in secrets)


@pytest.mark.slow
def test_concurrent_jobs_on_the_team_server_lose_nothing(team_mlflow, monkeypatch):
    """Eight jobs at once on the team server (PostgreSQL, basic auth, two workers):
    each opens a run, logs metric batches as rank 0 does, and all register a version of one
    model name at the same moment. Every metric is stored once at its step; the versions
    are 1..8 without a gap or a repeat, one per run."""
    import threading
    import time
    import uuid

    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    for key, value in team_mlflow.client_env.items():
        monkeypatch.setenv(key, value)
    launch = team_mlflow.proc.bertflow_launch
    assert int(launch.command[launch.command.index("--workers") + 1]) > 1
    jobs, steps = 8, 10
    keys = ("train_loss", "lr", "grad_norm", "tokens_per_s")
    name = f"concurrent-{uuid.uuid4().hex[:8]}"
    experiment = MlflowClient(team_mlflow.url).create_experiment(name)
    together = threading.Barrier(jobs)
    versions: dict[str, str] = {}
    failures: list[BaseException] = []

    def job(i: int) -> None:
        client = MlflowClient(team_mlflow.url, team_mlflow.url)
        try:
            together.wait(timeout=120)
            run_id = client.create_run(experiment, run_name=f"job-{i}").info.run_id
            for step in range(steps):
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, step + i / 10, now, step)
                                                  for k in keys])
            client.set_terminated(run_id)
            together.wait(timeout=120)  # every job registers at the same moment
            try:  # what mlflow.register_model (bertflow's registration) sends
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{client.get_run(run_id).info.artifact_uri}/model"
            versions[run_id] = client.create_model_version(name, source, run_id).version
        except BaseException as exc:  # noqa: BLE001  (reported below)
            failures.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    client = MlflowClient(team_mlflow.url, team_mlflow.url)
    stored = {mv.run_id: mv.version for mv in client.search_model_versions(f"name='{name}'")}
    assert stored == versions and len(versions) == jobs
    assert sorted(int(v) for v in stored.values()) == list(range(1, jobs + 1))
    for run_id in versions:
        for key in keys:
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == \
                list(range(steps)), (run_id, key)
