"""The private MLflow names bertflow reaches (workflows/mlflow_internals.py) still exist
and still do what bertflow relies on: an upgrade that moves one fails here, loudly."""

from __future__ import annotations

import logging


def test_registration_prints_go_to_the_log_not_the_terminal(capfd, caplog, monkeypatch):
    from mlflow.tracking._model_registry import fluent
    from mlflow.utils import logging_utils

    from workflows.mlflow_internals import prints_to_log

    assert fluent.eprint is logging_utils.eprint  # what mlflow.register_model prints with
    before = logging_utils.MLFLOW_LOGGING_STREAM
    # as under the CLI (MLFLOW_CONFIGURE_LOGGING=false): no stderr handler of MLflow's own
    monkeypatch.setattr(logging.getLogger("mlflow"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("mlflow"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="mlflow"), prints_to_log():
        fluent.eprint("Successfully registered model 'm'.")
        fluent.eprint("Created version '1' of model 'm'.")
    assert logging_utils.MLFLOW_LOGGING_STREAM is before  # restored
    assert "Successfully registered" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name == "mlflow"] == [
        "Successfully registered model 'm'.", "Created version '1' of model 'm'."]
