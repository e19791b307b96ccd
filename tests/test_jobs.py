"""Submitting verbs as Ray jobs: entrypoint, shipped project, tracking URI (no Ray needed)."""

from __future__ import annotations

import shlex

import pytest

from workflows.cli.commands import submit
from workflows.ops import jobs


def test_entrypoint_runs_the_projects_cli_with_the_args_quoted():
    cmd = jobs.build_entrypoint("prep", ["--input", "my corpus/a b.txt", "--output", "x"])
    assert shlex.split(cmd) == ["python", "-m", "workflows.cli", "prep",
                                "--input", "my corpus/a b.txt", "--output", "x"]


def test_only_workflow_verbs_can_be_submitted():
    with pytest.raises(jobs.JobError, match="prep, pretrain, finetune, predict, embed"):
        jobs.build_entrypoint("server", [])


def test_runtime_env_ships_the_project_without_local_state_and_passes_tracking():
    env = jobs.build_runtime_env("http://10.0.0.5:5000")
    assert env["working_dir"] == str(jobs.project_root())
    for local_only in (".venv", ".git", "mlruns.db", "mlartifacts", "quickstart_out"):
        assert local_only in env["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_runtime_env_refuses_a_folder_that_is_not_the_project(tmp_path):
    with pytest.raises(jobs.JobError, match="not a bertflow project"):
        jobs.build_runtime_env("http://h:5000", project_dir=tmp_path)


@pytest.mark.parametrize("uri,address,expect", [
    ("sqlite:///mlruns.db", "http://127.0.0.1:8265", "relative sqlite path"),
    ("sqlite:////home/me/mlruns.db", "http://10.0.0.2:8265", "shared filesystem"),
    ("http://127.0.0.1:5000", "http://10.0.0.2:8265", "loopback"),
    ("sqlite:////home/me/mlruns.db", "http://127.0.0.1:8265", None),
    ("http://10.0.0.5:5000", "http://10.0.0.2:8265", None),
])
def test_tracking_uris_the_cluster_cannot_use_are_warned_about(uri, address, expect):
    warnings = jobs.check_tracking_uri_for_cluster(uri, address)
    if expect is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expect in warnings[0]


def test_address_must_be_the_dashboard_url():
    with pytest.raises(jobs.JobError, match="dashboard URL"):
        jobs.connect("10.0.0.2:6379")


def test_exit_code_follows_job_status():
    assert jobs.exit_code_for("SUCCEEDED") == 0
    assert jobs.exit_code_for("FAILED") == 1
    assert jobs.exit_code_for("STOPPED") != 0


def test_submit_options_anywhere_and_the_rest_goes_to_the_verb():
    parser = submit.build_parser()
    args, rest = parser.parse_known_args(
        ["pretrain", "--data", "d", "--address", "http://h:8265", "--wait", "--max-steps", "5"])
    assert (args.verb, args.address, args.wait) == ("pretrain", "http://h:8265", True)
    assert rest == ["--data", "d", "--max-steps", "5"]


def test_submit_without_address_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from workflows.cli import main

    assert main(["submit", "prep", "--input", "x"]) == 2
    assert "--address is required" in capsys.readouterr().err


def test_jobs_that_start_ray_are_told_to_join_the_cluster():
    # prep starts Ray: inside a job it must join the cluster, not start a private Ray.
    assert jobs.attach_to_cluster("prep", ["--input", "x"]) == \
        ["--input", "x", "--address", "auto"]
    assert jobs.attach_to_cluster("prep", ["--address", "ray://h:10001"]) == \
        ["--address", "ray://h:10001"]
    assert jobs.attach_to_cluster("prep", ["rerun", "d"])[-2:] == ["--address", "auto"]
