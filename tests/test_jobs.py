"""Submitting verbs as Ray jobs: entrypoint, shipped project, tracking URI (no Ray needed)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from workflows.cli.commands import submit
from workflows.ops import jobs


def test_entrypoint_runs_the_projects_cli_with_the_args_quoted():
    cmd = jobs.build_entrypoint("prep", ["--input", "my corpus/a b.txt", "--output", "x"])
    assert shlex.split(cmd) == ["python", "-m", "workflows.cli", "prep",
                                "--input", "my corpus/a b.txt", "--output", "x"]


def test_the_heads_storage_path_is_the_default_of_training_jobs():
    """cluster.yaml sets BERTFLOW_STORAGE_PATH on the head: a training job given no
    --storage-path gets it (expanded by the job's shell there); an explicit one wins."""
    import subprocess

    def argv(verb, args, head_env):
        cmd = jobs.build_entrypoint(verb, args).replace("python -m workflows.cli",
                                                         "printf '%s\\n'", 1)
        out = subprocess.run(["sh", "-c", cmd], env=head_env, capture_output=True, text=True)
        return out.stdout.split()

    head = {"BERTFLOW_STORAGE_PATH": "s3://team/runs", "PATH": "/usr/bin:/bin"}
    assert argv("pretrain", ["--data", "s3://d"], head)[-2:] == ["--storage-path", "s3://team/runs"]
    assert argv("pretrain", ["--data", "s3://d"], {"PATH": "/usr/bin:/bin"}) == [
        "pretrain", "--data", "s3://d"]
    assert argv("finetune", ["--storage-path", "s3://mine"], head) == [
        "finetune", "--storage-path", "s3://mine"]
    assert "--storage-path" not in argv("prep", ["--input", "x"], head)


def test_only_workflow_verbs_can_be_submitted():
    with pytest.raises(jobs.JobError, match="prep, pretrain, finetune, sweep, predict, embed"):
        jobs.build_entrypoint("server", [])


def fake_project(root: Path) -> Path:
    """A project folder holding the packages beside what must never leave the machine."""
    for pkg in jobs.PACKAGES:
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "workflows" / "cli").mkdir()
    (root / "workflows" / "cli" / "__main__.py").write_text("print('hi')\n")
    (root / "workflows" / "__pycache__").mkdir()
    (root / "workflows" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (root / "configs").mkdir()
    (root / "configs" / "pretrain.yaml").write_text("lr: 1e-4\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'bertflow'\n")
    (root / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (root / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (root / "mlruns.db").write_bytes(b"sqlite")
    (root / "corpus").mkdir()
    (root / "corpus" / "wiki.txt").write_text("text\n")
    return root


def test_submit_ships_only_the_allowlist_and_never_follows_links(tmp_path):
    project = fake_project(tmp_path / "project")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    (project / "configs" / "home").symlink_to(home, target_is_directory=True)
    (project / "workflows" / "token.txt").symlink_to(home / ".ssh" / "id_rsa")
    shipment = jobs.stage_project(project, tmp_path / "staged")
    shipped = sorted(p.relative_to(shipment.folder).as_posix()
                     for p in shipment.folder.rglob("*") if p.is_file())
    assert shipped == ["bert_core/__init__.py", "configs/pretrain.yaml", "data_prep/__init__.py",
                       "pyproject.toml", "workflows/__init__.py", "workflows/cli/__main__.py"]
    assert not any(p.is_symlink() for p in shipment.folder.rglob("*"))
    assert sorted(shipment.skipped_links) == ["configs/home", "workflows/token.txt"]
    assert shipment.files == 6 and shipment.size == sum(
        (shipment.folder / f).stat().st_size for f in shipped)
    assert shipment.describe().startswith(
        "bert_core/, data_prep/, workflows/, configs/, pyproject.toml (6 files, ")


def test_an_installed_bertflow_ships_its_packages_not_site_packages(tmp_path):
    site = tmp_path / "site-packages"
    for pkg in jobs.PACKAGES:
        (site / pkg).mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("")
    (site / "workflows" / "cli").mkdir()
    (site / "workflows" / "cli" / "__main__.py").write_text("")
    (site / "torch").mkdir()
    (site / "torch" / "lib.so").write_bytes(b"\0" * 1000)
    shipment = jobs.stage_project(site, tmp_path / "staged")
    assert shipment.entries == list(jobs.PACKAGES) and shipment.files == 4
    assert not (shipment.folder / "torch").exists()


def test_runtime_env_passes_tracking_and_keeps_mlflow_safe(tmp_path):
    env = jobs.build_runtime_env("http://10.0.0.5:5000", tmp_path)
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["env_vars"]["DO_NOT_TRACK"] == "true"


def test_the_job_gets_the_submitters_credentials_by_name_only(tmp_path):
    """Train workers and Ray Data tasks of the job need the object store's and MLflow's
    credentials; the job gets them through its runtime env, and only names are reported."""
    environ = {"AWS_ACCESS_KEY_ID": "AKIA-test", "AWS_SECRET_ACCESS_KEY": "s3cret-key",
               "AWS_ENDPOINT_URL": "http://10.0.0.9:9000", "MLFLOW_TRACKING_USERNAME": "ana",
               "MLFLOW_TRACKING_PASSWORD": "pw-not-shown", "HOME": "/home/ana"}
    env = jobs.build_runtime_env("http://10.0.0.5:5000", tmp_path, environ=environ)
    assert {k: env["env_vars"][k] for k in environ if k != "HOME"} == {
        k: v for k, v in environ.items() if k != "HOME"}
    assert "HOME" not in env["env_vars"]  # only credential variables, not the whole env
    names = jobs.passed_variables(env)
    assert names == ["AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY",
                     "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"]


def test_a_folder_that_is_not_the_project_is_refused(tmp_path):
    with pytest.raises(jobs.JobError, match="not a bertflow project"):
        jobs.stage_project(tmp_path, tmp_path / "staged")


def test_the_auth_token_is_not_sent_in_cleartext_off_loopback(caplog):
    for address in ("http://10.0.0.2:8265", "http://head.example.com:8265",
                    "ray://10.0.0.2:10001"):
        with pytest.raises(jobs.JobError, match="cleartext"):
            jobs.check_address_is_private(address)
    for address in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265",
                    "https://head.example.com:8265"):
        jobs.check_address_is_private(address)
    jobs.check_address_is_private("http://10.0.0.2:8265", insecure=True)
    assert "--insecure" in caplog.text
    with pytest.raises(jobs.JobError, match="cleartext"):
        jobs.connect("http://10.0.0.2:8265")


def test_the_cli_keeps_mlflow_from_unpickling_and_phoning_home(monkeypatch):
    from workflows.cli import main

    for key in ("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "MLFLOW_DISABLE_TELEMETRY",
                "DO_NOT_TRACK"):
        monkeypatch.delenv(key, raising=False)
    assert main(["--help"]) == 0
    import os

    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["DO_NOT_TRACK"] == "true"


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
        ["pretrain", "--data", "d", "--dashboard-url", "http://h:8265", "--wait",
         "--max-steps", "5"])
    assert (args.verb, args.dashboard_url, args.wait) == ("pretrain", "http://h:8265", True)
    assert rest == ["--data", "d", "--max-steps", "5"]


def test_submit_without_address_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from workflows.cli import main

    assert main(["submit", "prep", "--input", "x"]) == 2
    assert "--dashboard-url is required" in capsys.readouterr().err


def test_jobs_that_start_ray_are_told_to_join_the_cluster():
    # prep starts Ray: inside a job it must join the cluster, not start a private Ray.
    assert jobs.attach_to_cluster("prep", ["--input", "x"]) == \
        ["--input", "x", "--address", "auto"]
    assert jobs.attach_to_cluster("prep", ["--address", "ray://h:10001"]) == \
        ["--address", "ray://h:10001"]
    assert jobs.attach_to_cluster("prep", ["rerun", "d"])[-2:] == ["--address", "auto"]
