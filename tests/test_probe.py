"""The cluster probe's own logic, without a cluster (the real probe runs in
test_cluster_e2e against `ray start --head`)."""

from __future__ import annotations

import subprocess
import sys

from workflows.ops.probe import (MARKER, REQUIRED_MODULES, explain, parse_probe_logs,
                                 probe_entrypoint)


def test_probe_command_reports_missing_modules_as_json():
    """The entrypoint is a shell command; run it here with this venv's python as `python`."""
    cmd = probe_entrypoint(("json", "no_such_module_xyz", "ray.no_such_sub"))
    assert cmd.startswith("python -c ")
    proc = subprocess.run(cmd.replace("python", sys.executable, 1), shell=True,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = parse_probe_logs("some job noise\n" + proc.stdout)
    assert report["missing"] == ["no_such_module_xyz", "ray.no_such_sub"]
    assert report["python"] == sys.executable
    assert explain("http://h:8265", "SUCCEEDED", report, proc.stdout).startswith(
        f"the cluster's Python ({sys.executable}")
    # this venv has everything a job needs
    full = subprocess.run(probe_entrypoint().replace("python", sys.executable, 1), shell=True,
                          capture_output=True, text=True, timeout=120)
    assert parse_probe_logs(full.stdout)["missing"] == []
    assert "torch" in REQUIRED_MODULES and "mlflow" in REQUIRED_MODULES


def test_a_probe_that_printed_nothing_shows_the_log_tail():
    logs = "/bin/sh: 1: python: not found\n"
    msg = explain("http://h:8265", "FAILED", parse_probe_logs(logs), logs)
    assert "python: not found" in msg and "pip install -c constraints.txt" in msg
    assert parse_probe_logs(f"{MARKER}{{broken") is None
