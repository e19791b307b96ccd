"""Quiet by default: bertflow's lines on the terminal, every library's in the log file."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from workflows.cli.logs import setup_logging


@pytest.fixture
def restore_logging(monkeypatch):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for var in ("RAY_DATA_LOGGING_CONFIG", "BERTFLOW_ROUTE_RAY_LOGS", "MLFLOW_CONFIGURE_LOGGING"):
        monkeypatch.delenv(var, raising=False)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _emit():
    logging.getLogger("workflows.training.finetune").info("fine-tuning seq-cls")
    logging.getLogger("somelib.execution").info("Execution plan of Dataset")
    logging.getLogger("mlflow.store").warning("schema is old")
    logging.getLogger("ray._private.auth").warning(
        "Token authentication is enabled for this Ray cluster. Set ...")
    logging.getLogger("bert_core").debug("loading tensors")


def test_quiet_terminal_and_full_file(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("BERTFLOW_LOG_DIR", str(tmp_path / "logs"))
    path = setup_logging("finetune", verbose=False)
    _emit()
    logging.captureWarnings(False)
    terminal = capsys.readouterr().err
    assert "fine-tuning seq-cls" in terminal and "schema is old" in terminal
    assert "Execution plan" not in terminal and "Token authentication" not in terminal
    assert "loading tensors" not in terminal
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    for line in ("fine-tuning seq-cls", "Execution plan", "schema is old",
                 "Token authentication", "loading tensors"):
        assert line in text
    assert path.parent == tmp_path / "logs" and path.name.startswith("bertflow-finetune-")
    # Ray Data reads its logging config from this file when ray.data is imported
    assert "propagate: true" in open(os.environ["RAY_DATA_LOGGING_CONFIG"]).read()
    assert os.environ["BERTFLOW_ROUTE_RAY_LOGS"] == "1"
    assert os.environ["MLFLOW_CONFIGURE_LOGGING"] == "false"  # MLflow's records reach ours


def test_the_log_file_is_private_and_holds_no_library_debug(tmp_path, monkeypatch,
                                                             restore_logging):
    monkeypatch.setenv("BERTFLOW_LOG_DIR", str(tmp_path / "logs"))
    path = setup_logging("finetune", verbose=False)
    logging.captureWarnings(False)
    logging.getLogger("botocore.endpoint").debug("Sending http request: Authorization: AWS4 k")
    logging.getLogger("urllib3.connectionpool").debug("GET /api Authorization: Basic dTpw")
    logging.getLogger("bert_core").debug("loading tensors")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    assert "loading tensors" in text and "Authorization" not in text
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "logs").stat().st_mode & 0o077 == 0
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_raylet_messages_go_through_logging_once_ray_is_up(tmp_path, monkeypatch, capsys,
                                                           restore_logging):
    """What the raylet pushes to the driver, which Ray prints straight to stderr: through
    the terminal filter once `init_ray`'s hooks ran (the startup-concurrency warning to the
    file only, another raylet warning to both); Ray's other output is printed as before."""
    import ray._private.worker as ray_worker

    from data_prep import ray_env

    monkeypatch.setenv("BERTFLOW_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    monkeypatch.setattr(ray_env, "AFTER_INIT", [])
    path = setup_logging("quickstart", verbose=False)
    logging.captureWarnings(False)
    assert len(ray_env.AFTER_INIT) == 1
    ray_env._after_init()
    ray_env._after_init()  # idempotent: routed once
    crowded = ("WARNING: 8 PYTHON worker processes have been started on node: ab12 with "
               "address: 127.0.0.1, which is 4x the maximum expected startup concurrency")
    ray_worker.print_to_stdstream({"lines": [crowded, "the node is out of disk"],
                                   "pid": "raylet", "is_err": False})
    ray_worker.print_to_stdstream({"lines": ["a worker's own line"], "pid": 4242,
                                   "ip": "127.0.0.1", "is_err": True, "task_name": "t"},
                                  ignore_prefix=True)
    terminal = capsys.readouterr().err
    assert "out of disk" in terminal and "PYTHON worker processes" not in terminal
    assert terminal.count("out of disk") == 1 and "a worker's own line" in terminal
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    assert "ray.raylet" in text and "8 PYTHON worker processes" in text
    assert "out of disk" in text


def test_quickstart_terminal_keeps_its_own_step_lines(tmp_path, monkeypatch, capsys,
                                                      restore_logging):
    """The quickstart prints one line per step itself: bertflow's INFO lines go to the
    file only; Python warnings pass the same filter (benign ones to the file only)."""
    import warnings

    monkeypatch.setenv("BERTFLOW_LOG_DIR", str(tmp_path / "logs"))
    path = setup_logging("quickstart", verbose=False)
    try:
        _emit()
        warnings.warn("Add type hints to the `predict` method to enable data validation")
        warnings.warn("a real problem")
    finally:
        logging.captureWarnings(False)
    terminal = capsys.readouterr().err
    assert "fine-tuning seq-cls" not in terminal and "schema is old" in terminal
    assert "a real problem" in terminal and "type hints" not in terminal
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "fine-tuning seq-cls" in path.read_text() and "type hints" in path.read_text()


def test_verbose_shows_everything(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("BERTFLOW_LOG_DIR", str(tmp_path / "logs"))
    setup_logging("prep", verbose=True)
    _emit()
    terminal = capsys.readouterr().err
    assert "Execution plan" in terminal and "fine-tuning seq-cls" in terminal
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ


@pytest.mark.ray
@pytest.mark.slow
def test_prep_cli_prints_no_ray_data_info(tmp_path, minilm_dir, ray_local):
    """`bertflow prep` end to end. With `--tokenize-on ray` it starts a Ray of its own:
    the terminal has bertflow's lines, not Ray's own (its token-authentication warning,
    "Started a local Ray instance", Ray Data's execution plans); the file named at the
    end has Ray's lines too. Left to its default on this machine it starts no Ray: the
    processes that tokenized run the instance and merge tasks, or, for a corpus of one
    unit per split, this process runs them. All three builds' parts equal a build on an
    already running Ray with other units and Ray tokenizing."""
    import pyarrow.parquet as pq

    from data_prep import PrepConfig, build_pretraining_dataset

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(
        "\n".join(f"Sentence {d} {i} about rivers {d * i} and mountains near the city."
                  for i in range(6 + d % 5))
        for d in range(120)) + "\n")
    env = {**os.environ, "BERTFLOW_LOG_DIR": str(tmp_path / "logs"), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_DATA_LOGGING_CONFIG", None)

    def prep(out: str, *args: str) -> tuple[str, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "workflows.cli", "prep", "--input", str(corpus),
             "--output", str(tmp_path / out), "--vocab", str(minilm_dir / "vocab.txt"),
             *args], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "data_prep.pipeline" in proc.stderr
        log_line = [ln for ln in proc.stderr.splitlines() if "full log in" in ln]
        assert log_line, proc.stderr[-3000:]
        return proc.stderr, open(log_line[-1].split("full log in ", 1)[1]).read()

    stderr, log_text = prep("out", "--docs-per-unit", "10", "--tokenize-on", "ray")
    assert re.search(r"instances: 13 tasks, [\d.]+ s of work in [\d.]+ s on \d+ Ray worker",
                     stderr), stderr[-3000:]
    assert "Started a local Ray instance" not in stderr
    assert "Started a local Ray instance" in log_text
    for noise in ("Execution plan", "streaming_executor", "Full logs are in",
                  "Token authentication"):
        assert noise not in stderr, noise
    for out, args, ran in (("here", ["--docs-per-unit", "10"], r"instances: 13 tasks, [\d.]+ "
                            r"s of work in [\d.]+ s on \d+ local process\(es\)"),
                           ("small", [], r"instances: the \d+ tasks take this process about")):
        terminal, log_text = prep(out, *args)
        assert re.search(ran, terminal), terminal[-3000:]
        assert "Started a local Ray instance" not in log_text and "Ray worker" not in terminal
    build_pretraining_dataset(PrepConfig(
        input=[str(corpus)], output=str(tmp_path / "again"), vocab=str(minilm_dir / "vocab.txt"),
        docs_per_unit=7, tokenize_on="ray", tokenize_workers=1))
    parts = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.parquet"))
    assert parts and parts == sorted(p.relative_to(tmp_path / "again")
                                     for p in (tmp_path / "again").rglob("*.parquet"))
    for part in parts:
        expected = (tmp_path / "again" / part).read_bytes()
        for out in ("out", "here", "small"):
            assert (tmp_path / out / part).read_bytes() == expected, (out, part)
    assert pq.read_table(tmp_path / "out" / parts[0]).num_rows > 0


def test_ray_loggers_imported_before_setup_are_adopted(tmp_path, monkeypatch, capsys,
                                                      restore_logging):
    """A process that imported Ray before calling bertflow's main(): Ray Data's INFO lines
    still go to the file only."""
    import ray.data  # noqa: F401  (configures the 'ray' and 'ray.data' loggers)

    data_logger = logging.getLogger("ray.data")
    before = (list(data_logger.handlers), data_logger.propagate)
    monkeypatch.setenv("BERTFLOW_LOG_DIR", str(tmp_path / "logs"))
    try:
        path = setup_logging("prep", verbose=False)
        logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset")
        terminal = capsys.readouterr().err
        for handler in logging.getLogger().handlers:
            handler.flush()
        assert "Execution plan" not in terminal
        assert "Execution plan" in path.read_text()
    finally:
        data_logger.handlers[:] = before[0]
        data_logger.propagate = before[1]
