"""What `bertflow submit` lets out: the tracking URI printed without its
password, a warning before a password crosses the network in cleartext, a probe job
that carries no credential, and a shipped file checked and copied in one step."""

from __future__ import annotations

import logging
import os

from workflows.ops import jobs
from workflows.ops.probe import probe_runtime_env
from workflows.tracking import cleartext_password_warning


def test_tracking_uri_warnings_never_show_the_password():
    uri = "http://admin:hunter2-pw@127.0.0.1:5000"
    warnings = jobs.check_tracking_uri_for_cluster(uri, "http://10.0.0.5:8265")
    assert warnings and all("hunter2" not in w and "admin:***@" in w for w in warnings)


def test_a_password_to_a_cleartext_server_off_this_machine_is_warned_about():
    env = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pw-1"}
    warning = cleartext_password_warning("http://mlflow.corp:5000", env)
    assert "MLFLOW_TRACKING_PASSWORD" in warning and "https://" in warning
    assert "pw-1" not in warning
    assert "the password in the tracking URI" in cleartext_password_warning(
        "http://u:secret@10.1.2.3:5000", {})
    assert "secret" not in cleartext_password_warning("http://u:secret@10.1.2.3:5000", {})
    # Loopback, TLS, or nothing secret to send: no warning.
    assert cleartext_password_warning("http://127.0.0.1:5000", env) is None
    assert cleartext_password_warning("http://localhost:5000", env) is None
    assert cleartext_password_warning("https://mlflow.corp", env) is None
    assert cleartext_password_warning("http://mlflow.corp:5000",
                                      {"MLFLOW_TRACKING_USERNAME": "alice"}) is None


def test_the_probe_job_gets_no_credentials():
    runtime_env = jobs.build_runtime_env(
        "http://u:pw@mlflow:5000", jobs.project_root(), env_vars={"BERTFLOW_STORAGE_PATH": "/s"},
        environ={"AWS_SECRET_ACCESS_KEY": "aws-secret", "AWS_ACCESS_KEY_ID": "AKIA",
                 "MLFLOW_TRACKING_PASSWORD": "mlflow-pw", "MLFLOW_TRACKING_TOKEN": "tok"})
    assert runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "aws-secret"  # the job's
    probe = probe_runtime_env({"env_vars": runtime_env["env_vars"]})
    values = " ".join(probe["env_vars"].values())
    for secret in ("aws-secret", "AKIA", "mlflow-pw", "tok", ":pw@"):
        assert secret not in values
    assert probe["env_vars"]["BERTFLOW_STORAGE_PATH"] == "/s"
    assert probe["env_vars"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"


def test_a_file_swapped_for_a_link_after_the_listing_is_not_shipped(tmp_path, caplog):
    secret = tmp_path / "id_rsa"
    secret.write_text("private key")
    src = tmp_path / "project" / "notes.txt"
    src.parent.mkdir()
    src.symlink_to(secret)  # listed as a file a moment ago, a link now
    fifo = tmp_path / "project" / "pipe.txt"
    os.mkfifo(fifo)
    shipment = jobs.Shipment(tmp_path / "staged", [])
    with caplog.at_level(logging.WARNING):
        jobs._ship_file(src, tmp_path / "staged" / "notes.txt", shipment, "notes.txt")
        jobs._ship_file(fifo, tmp_path / "staged" / "pipe.txt", shipment, "pipe.txt")
    assert not (tmp_path / "staged" / "notes.txt").exists()
    assert not (tmp_path / "staged" / "notes.txt").is_symlink()
    assert not (tmp_path / "staged" / "pipe.txt").exists()
    assert shipment.skipped_links == ["notes.txt"] and shipment.files == 0
