"""`bertflow submit` against a real Ray head on 127.0.0.1: a prep job, then a tiny pretrain job.

The head is started with `ray start --head --block` in its own process group and that
process group alone is terminated at the end: never `ray stop`, which would kill every other
Ray on the machine. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests import services
from tests.helpers import pydoc_corpus
from tests.services import free_ports
from workflows.ops import jobs
from workflows.cli import main as cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 420


def jobs_api_installed() -> bool:
    """The Jobs API lives in Ray's dashboard, which needs the `ray[default]` extras."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("aiohttp_cors", "grpc", "opencensus"))


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (2 CPUs, dashboard + Jobs API on 127.0.0.1); yields the dashboard URL."""
    if not services.jobs_api_installed():
        pytest.skip("Ray's Jobs API needs `pip install 'ray[default]'` (dashboard extras)")
    with services.cluster_lock():
        head = services.start_ray_head(num_cpus=2)
        try:
            yield head.dashboard
        finally:
            services.stop_ray(head.proc)
            shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_prep_and_pretrain_jobs_on_a_real_cluster(ray_head, tmp_path, minilm_dir, capsys):
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    data = tmp_path / "data" / "pydoc128"
    # submit --wait streams the job's logs and exits with its status.
    code = cli(["submit", "prep", "--dashboard-url", ray_head, "--wait", "--timeout",
                str(JOB_TIMEOUT_S), "--tracking-uri", tracking_uri, "--submission-id",
                "bertflow-test-prep", "--input", str(pydoc_corpus(tmp_path / "corpus.txt", 40)),
                "--output", str(data), "--vocab", str(minilm_dir / "vocab.txt"),
                "--max-seq-len", "64", "--dupe-factor", "2"])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "job bertflow-test-prep SUCCEEDED" in out
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["counts"]["train"]["instances"] > 0

    # The job is visible to `bertflow jobs`.
    assert cli(["jobs", "status", "bertflow-test-prep", "--dashboard-url", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert cli(["jobs", "list", "--dashboard-url", ray_head]) == 0
    listing = capsys.readouterr().out
    assert "bertflow-test-prep" in listing and "prep" in listing

    if not (Path(jobs.project_root()) / "workflows" / "cli" / "commands" / "pretrain.py").is_file():
        pytest.skip("bertflow pretrain is not available yet")
    code = cli(["submit", "pretrain", "--dashboard-url", ray_head, "--wait", "--timeout",
                str(JOB_TIMEOUT_S), "--tracking-uri", tracking_uri, "--submission-id",
                "bertflow-test-pretrain", "--data", str(data), "--run-name", "job-tiny",
                "--model-size", "tiny", "--max-steps", "8", "--warmup-steps", "2",
                "--batch-size", "8", "--eval-every", "0", "--eval-batches", "2",
                "--checkpoint-every", "0", "--log-every", "2", "--no-log-system-metrics",
                "--storage-path", str(tmp_path / "runs"), "--register-as", "bert-job"])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    from workflows.ops import registry

    info = registry.show_model("bert-job", tracking_uri)
    assert info["version"] == "1" and info["run_name"] == "job-tiny"
    assert info["dataset_path"] == str(data)


def test_unknown_job_and_unreachable_cluster_are_clear_errors(ray_head, capsys):
    assert cli(["jobs", "status", "no-such-job", "--dashboard-url", ray_head]) == 2
    assert "no-such-job" in capsys.readouterr().err
    port = free_ports(1)[0]
    assert cli(["jobs", "list", "--dashboard-url", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


def test_cluster_python_without_bertflow_is_caught_before_submitting(ray_head, tmp_path,
                                                                      capsys):
    """A head whose `python` lacks bertflow's dependencies (here: a PATH without the venv)
    is refused before the job is shipped, saying what to install where; a job that fails
    on the cluster ends with the last lines of its log and the command for all of it."""
    from workflows.ops.probe import ClusterPythonError, check_cluster_python

    client = jobs.connect(ray_head)
    report = check_cluster_python(client, ray_head, {"env_vars": {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}})
    assert report["missing"] == [] and report["python"].startswith(str(VENV_BIN))
    # a head whose `python` is the system interpreter, without bertflow's dependencies
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.base_prefix + "/bin/python3")
    with pytest.raises(ClusterPythonError, match="cannot import torch.*pip install -c "
                                                 "constraints.txt"):
        check_cluster_python(client, ray_head, {"env_vars": {
            "PATH": f"{bare}{os.pathsep}/usr/bin{os.pathsep}/bin"}})

    code = cli(["submit", "prep", "--dashboard-url", ray_head, "--wait", "--timeout",
                str(JOB_TIMEOUT_S), "--submission-id", "bertflow-test-fails",
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
                "--input", str(tmp_path / "no-such-corpus.txt"), "--output",
                str(tmp_path / "out"), "--vocab", str(tmp_path / "no-vocab.txt")])
    out, err = capsys.readouterr()
    assert code == 1 and "job bertflow-test-fails FAILED" in out
    assert "last lines of its log" in err and "no-such-corpus" in err.split(
        "last lines of its log", 1)[1]
    assert f"bertflow jobs logs bertflow-test-fails --dashboard-url {ray_head}" in err
