"""Registration that can finish later: the end of a training stage when the MLflow
server may be down.

    finish_run        deliver the metrics rank 0 could not send (the run folder's
                      tracker_outbox), log the final model, register it; with the
                      tracker unreachable for a bounded wait (--tracker-wait-s), save a
                      PendingRegistration in the run folder and say which command ends it
    register_pending  that command's work (`bertflow registry register RUN_FOLDER`):
                      the same delivery, model and lineage, later

The run folder is the one place the model and the pending record live (a local folder
or an object-store URI; workflows.run_folder), so the command works from any machine
that reaches the folder and the server. Credentials come from the environment, never
from the record (its tracking URI is redacted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from data_prep.storage import redact
from workflows.run_folder import OUTBOX_DIR, PENDING_REGISTRATION, RunFolder
from workflows.tracking import (TAG_SWEEP_WINNER, TrackingError, check_model_name, client,
                                log_and_register, resolve_tracking_uri, tracker_reachable,
                                wait_for_tracker)
from workflows.tracking_outbox import deliver_spilled, write_whole
from workflows.transfer import local_model_dir

log = logging.getLogger(__name__)

# The exit status of a training verb whose model waits for `bertflow registry register`:
# the job trained, but a pipeline's next stage must not take `@latest` for its model.
PENDING_EXIT = 3

@dataclass
class PendingRegistration:
    """What a run whose tracker was unreachable at its end leaves in its run folder
    (`PENDING_REGISTRATION`), so `bertflow registry register RUN_FOLDER` logs and
    registers the model later with the lineage it would have had then."""

    run_id: str
    task: str
    model_dir: str                      # the final model folder (a path or URI)
    tags: dict[str, str]                # log_and_register's arguments
    version_tags: dict[str, str]
    metrics: dict[str, float]
    register_as: str | None
    tracking_uri: str                   # redacted: credentials come from the environment
    sweep_parent: str | None = None     # a sweep's winner: the parent run gets the tag
    reason: str = ""

    def save(self, run: RunFolder) -> None:
        write_whole(run.join(PENDING_REGISTRATION), json.dumps(dataclasses.asdict(self),
                                                               indent=2))

    @classmethod
    def load(cls, run: RunFolder) -> PendingRegistration | None:
        loc = run.join(PENDING_REGISTRATION)
        try:
            data = json.loads(loc.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TrackingError(f"{loc.uri}: unreadable ({exc}); it is written by a run "
                                f"whose registration was left for later") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def register_command(run_dir: Any, name: str | None) -> str:
    return f"bertflow registry register {run_dir}" + (f" --name {name}" if name else "")


def finish_run(run: RunFolder, pending: PendingRegistration, uri: str, wait_s: float,
               after: Any = None) -> tuple[str | None, str | None]:
    """The end of a training stage: deliver the metrics its rank 0 could not send (the
    run folder's tracker_outbox), log the final model and register it
    (`log_and_register`), then `after()` (a sweep tags its parent). With the tracker
    unreachable for `wait_s`, none of that: `pending` is saved in the run folder and a
    warning names the command that completes it (`register_pending`); returns (None,
    None). Else (model URI, version or None)."""
    deadline = time.monotonic() + wait_s
    reason = f"the MLflow server at {redact(uri)} did not answer for {wait_s:.0f} s"
    done = wait_for_tracker(uri, wait_s) and deliver_spilled(
        run.join(OUTBOX_DIR), uri, pending.run_id, max(0.0, deadline - time.monotonic()))
    if done:
        try:
            with local_model_dir(pending.model_dir) as model_dir:
                out = log_and_register(
                    model_dir, run_id=pending.run_id, uri=uri, task=pending.task,
                    tags=pending.tags, register_as=pending.register_as,
                    version_tags=pending.version_tags, metrics=pending.metrics)
            if after is not None:
                after()
            run.join(PENDING_REGISTRATION).delete()  # a rerun of the command completed it
            return out
        except Exception as exc:
            if tracker_reachable(uri):
                raise
            reason = (f"the MLflow server at {redact(uri)} stopped answering while the "
                      f"model was logged ({type(exc).__name__})")
    pending.reason = reason
    pending.save(run)
    log.warning("%s: the model is NOT %s. It is safe in %s; once the server answers, "
                "`%s` sends the metrics kept in the run folder, logs the model and %s",
                reason, "registered" if pending.register_as else "logged to MLflow",
                pending.model_dir, register_command(run.where, pending.register_as),
                "registers it with this run's lineage" if pending.register_as
                else "marks the run finished")
    return None, None


def register_pending(run: RunFolder, name: str | None, uri: str | None = None,
                     wait_s: float = 30.0) -> tuple[PendingRegistration, str, str | None]:
    """Complete what `finish_run` left in run folder `run`: (the pending record, model
    URI, version). `name` overrides the name the run was to register as."""
    pending = PendingRegistration.load(run)
    if pending is None:
        raise TrackingError(f"{run.where}: no registration waits there ({PENDING_REGISTRATION} "
                            f"is written only when the MLflow server was unreachable at the "
                            f"end of training); give the run folder the job named")
    name = check_model_name(name) if name else pending.register_as
    # --tracking-uri, else $MLFLOW_TRACKING_URI, else the server the run logged to
    uri = resolve_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI")
                               or pending.tracking_uri)
    if not wait_for_tracker(uri, wait_s) or not deliver_spilled(
            run.join(OUTBOX_DIR), uri, pending.run_id, wait_s):
        raise TrackingError(f"the MLflow server at {redact(uri)} does not answer (or did "
                            f"not take the run's kept metrics within {wait_s:.0f} s); "
                            f"nothing registered. Run this again once it is up")
    with local_model_dir(pending.model_dir) as model_dir:
        model_uri, version = log_and_register(
            model_dir, run_id=pending.run_id, uri=uri, task=pending.task, tags=pending.tags,
            register_as=name, version_tags=pending.version_tags, metrics=pending.metrics)
    if pending.sweep_parent:
        client(uri).set_tag(pending.sweep_parent, TAG_SWEEP_WINNER, pending.run_id)
    run.join(PENDING_REGISTRATION).delete()
    return pending, model_uri, version
