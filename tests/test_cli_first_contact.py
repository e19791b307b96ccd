"""A newcomer's first commands, through the real CLI: a base model registered, a corpus
prepared with that model's vocabulary (`prep --vocab models:/NAME@ALIAS`), a classifier
fine-tuned on a CSV whose columns are the user's own, the registry read back. The
terminal holds bertflow's lines only (no MLflow download bars, no registration chatter,
no Ray core_worker line); the log file named at the end holds the rest, and `-v` on
`registry` writes the log file it promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.finetune_data import write_sentiment

# Five CLI processes and two Ray starts: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

NOISE = ("Downloading artifacts", "Successfully registered", "Created version",
         "core_worker", "Uploading artifacts")


def bertflow(*args: str, env: dict[str, str], cwd: Path) -> tuple[str, Path | None]:
    """Run `bertflow ARGS` (exit 0 expected); its terminal (stdout + stderr) and log file."""
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bertflow {' '.join(args)}:\n{terminal[-4000:]}"
    named = re.findall(r"full log in (\S+)", terminal)
    return terminal, Path(named[-1]) if named else None


def test_own_data_from_a_registered_base_with_a_quiet_terminal(tmp_path, minilm_dir):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "BERTFLOW_LOG_DIR": str(tmp_path / "logs"), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": uri}
    for key in ("RAY_DATA_LOGGING_CONFIG", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        env.pop(key, None)

    # -v on a verb without a log of its own still writes the file it promises
    terminal, log = bertflow("registry", "import-hf", str(minilm_dir), "--name", "minilm",
                             "-v", env=env, cwd=tmp_path)
    assert "registered" in terminal and log is not None and log.is_file()
    assert "Successfully registered model 'minilm'" in log.read_text()

    # prep with a registered model's vocabulary: pinned to the exact version
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(
        "\n".join(f"Sentence {d} {i} about rivers and mountains near the city." for i in range(6))
        for d in range(20)) + "\n")
    terminal, log = bertflow("prep", "--input", str(corpus), "--output", str(tmp_path / "ds"),
                             "--vocab", "models:/minilm@latest", "--dupe-factor", "1",
                             "--max-seq-len", "32", env=env, cwd=tmp_path)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["config"]["vocab"] == "models:/minilm/1"
    assert (tmp_path / "ds" / "tokenizer" / "vocab.txt").read_text() == \
        (minilm_dir / "vocab.txt").read_text()
    for noise in NOISE:
        assert noise not in terminal, (noise, terminal[-3000:])
    # the pinned version is what `prep rerun` reads again: nothing changed, nothing rebuilt
    terminal, _ = bertflow("prep", "rerun", str(tmp_path / "ds"), env=env, cwd=tmp_path)
    assert "up to date" in terminal

    # a CSV with the user's own column names, fine-tuned from the registered base
    data = tmp_path / "mine.csv"
    write_sentiment(tmp_path / "s.csv", 48, seed=1)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "text,label"
    data.write_text("\n".join(["review,stars", *lines[1:]]) + "\n")
    terminal, log = bertflow(
        "finetune", "--base", "models:/minilm@latest", "--train", str(data), "--eval",
        str(data), "--text-column", "review", "--label-column", "stars", "--epochs", "1",
        "--max-seq-len", "32", "--register-as", "mine", "--no-log-system-metrics",
        "--data-dir", str(tmp_path / "cache"), "--storage-path", str(tmp_path / "runs"),
        env=env, cwd=tmp_path)
    assert "registered:   models:/mine/1" in terminal
    for noise in NOISE:
        assert noise not in terminal, (noise, terminal[-3000:])
    assert log is not None
    text = log.read_text()
    assert "Successfully registered model 'mine'" in text  # the chatter: the file only
    assert "Created version '1' of model 'mine'" in text

    # the registry says what was made, each version with its score, nothing cut
    terminal, _ = bertflow("registry", "list", env=env, cwd=tmp_path)
    rows = {line.split()[0]: line for line in terminal.splitlines()[1:] if line.strip()}
    assert re.search(r"val_\w+=", rows["mine/1"]) and "models:/minilm/1" in rows["mine/1"]
    assert "…" not in terminal
    terminal, _ = bertflow("registry", "show", "mine@latest", env=env, cwd=tmp_path)
    head = terminal.splitlines()
    assert head[0].startswith("mine version 1")
    assert "2 labels: neg, pos" in head[1]
    assert "from models:/minilm/1" in terminal and "lr 5e-05" in terminal
    assert "pooling pooler" in terminal
    assert re.search(r"val_accuracy \S+ \(baseline \S+\)", terminal)
    assert "bertflow predict --model models:/mine/1" in terminal
    assert "params" not in terminal  # the flat dump waits for --all
    terminal, _ = bertflow("registry", "show", "mine/1", "--all", env=env, cwd=tmp_path)
    assert "params" in terminal and "lineage" in terminal
