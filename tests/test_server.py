"""`bertflow server`: a real `mlflow server` on loopback; a tiny pretrain logs and registers
through it, and `bertflow registry` browses the result."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from workflows.config import ServerConfig
from workflows.ops import registry, server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_command_serves_the_sqlite_store_on_loopback(tmp_path):
    cmd = server.server_command(ServerConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
                                             port=5123))
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    assert "--serve-artifacts" in cmd
    with pytest.raises(server.ServerError, match="already a server"):
        server.server_command(ServerConfig(tracking_uri="http://127.0.0.1:5000"))
    # A wildcard bind is reached on loopback; IPv6 hosts are bracketed.
    assert server.server_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert server.server_url("::1", 5001) == "http://[::1]:5001"


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real MLflow server on a free loopback port; terminated (its process group) after."""
    store = tmp_path / "store"
    store.mkdir()
    log = open(tmp_path / "server.log", "wb")
    proc, url = server.start_server(
        ServerConfig(tracking_uri=f"sqlite:///{store / 'mlruns.db'}", port=free_port()),
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
