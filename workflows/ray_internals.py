"""Every reach into Ray's private names, behind one door.

Ray's public API cannot do these jobs (as of Ray 2.60, the only version they are proven
on; pyproject.toml pins `ray>=2.60,<2.61` for that reason). Each private name is imported
here when this module loads, so a Ray that moves one fails at the first import, and
`tests/test_ray_internals.py` checks the attributes used here exist on the real classes
(an assignment to a renamed attribute would otherwise be silent).

This module imports Ray: import it inside the function that needs it, never at the top of
a module that `bertflow --help` or inference loads.

- The report queue of a Tune trial's session (`ray.train._internal.session`): Tune's
  `TuneReportCallback` hands a trial's metrics from its Ray Train controller to the trial
  through a queue actor that the session creates once per session; a reused trial actor
  gives its later trials the first queue (see `workflows.training.sweep_trials`). No public
  API shares or names that queue (Ray 2.60).
- Ray's auth token (`ray._raylet`, `ray._private.authentication`): clusters started by
  Ray >= 2.52 require it by default, the Jobs client sends it only in token mode, and Ray
  caches the token it loaded, and the RAY_AUTH_MODE it read into its config, once per
  process; `ray start` turns token mode on with the same private function, and no public
  API finds the token, drops the cache or re-reads the mode (`workflows/ops/jobs.py`).
- Ray Data's session log file handler (`ray.data._internal.logging`): Ray Data reads its
  logging config from a YAML file that names the handler class by its dotted path;
  `workflows/cli/logs.py` writes that file without importing Ray (the CLI starts light),
  so it spells `RAY_DATA_FILE_HANDLER` out and the test checks the two agree.
- Ray Train's upload of a checkpoint folder (`StorageContext.persist_current_checkpoint`,
  reached through the DeveloperAPI `TrainContext.get_storage`): an async checkpoint's
  files are written on Ray's upload thread by our `checkpoint_upload_fn`
  (`workflows/training/async_checkpoint.py`), which must then upload them itself; Ray
  2.60 offers no public call that does its default upload.

- The driver's printer of raylet messages (`ray._private.worker.print_to_stdstream`): the
  driver's error-listener thread prints what the raylet pushes (e.g. "N PYTHON worker
  processes have been started ... the maximum expected startup concurrency") straight to
  stderr, with no logger a CLI could quiet; `route_raylet_messages` sends those lines to a
  logger instead (the bertflow CLI's log file; the terminal with `-v`). No public API
  routes them (Ray 2.60).

Where a public API does the job it is used instead: a trial's Train worker group's
placement group comes from `ray.get_runtime_context().get_placement_group_id()` in the
worker (`workflows/training/loop.py`), not from Ray Train's internal worker-group hooks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray._private.worker as ray_worker
from ray._private.authentication.authentication_token_setup import (
    maybe_enable_token_auth_if_token_available)
from ray._raylet import (AuthenticationMode, AuthenticationTokenLoader, Config,
                         get_authentication_mode)
from ray.data._internal.logging import SessionFileHandler
from ray.train._internal.session import _TrainSession, get_session
from ray.train.v2._internal.execution.storage import StorageContext

# The dotted name of Ray Data's session log handler, as its logging config names it.
RAY_DATA_FILE_HANDLER = f"{SessionFileHandler.__module__}.{SessionFileHandler.__qualname__}"
# The attribute of a Tune session that holds its report queue (read by the session when
# it fetches results, set by `_get_or_create_inter_actor_queue`).
REPORT_QUEUE_ATTRIBUTE = "_inter_actor_queue"


def _tune_session() -> _TrainSession:
    session = get_session()
    if session is None:
        raise RuntimeError("not in a Ray Tune trial: there is no session report queue")
    return session


def session_report_queue() -> Any:
    """The report queue of this Tune trial's session, created if it has none yet."""
    return _tune_session()._get_or_create_inter_actor_queue()


def adopt_report_queue(queue: Any) -> None:
    """Make `queue` (an earlier trial's, on this actor) the report queue of this trial's
    session, so Tune's report callback takes it instead of starting a new queue actor."""
    session = _tune_session()
    if not hasattr(session, REPORT_QUEUE_ATTRIBUTE):  # a Ray that renamed it: say so
        raise RuntimeError(f"Ray's Tune session has no {REPORT_QUEUE_ATTRIBUTE!r}: "
                           f"workflows/ray_internals.py needs updating for this Ray")
    setattr(session, REPORT_QUEUE_ATTRIBUTE, queue)


def checkpoint_persister() -> Any:
    """Ray Train's own upload of a local checkpoint folder into this run's folder:
    `(checkpoint, checkpoint_dir_name) -> the persisted Checkpoint`, callable from any
    thread. Call this in a Train worker's training function."""
    import ray.train

    storage: StorageContext = ray.train.get_context().get_storage()
    return storage.persist_current_checkpoint


def reset_auth_token_cache() -> None:
    """Forget the auth token Ray loaded in this process (the next call loads it again)."""
    AuthenticationTokenLoader.instance().reset_cache()


def token_auth_mode() -> bool:
    """Whether this process's Ray config is in token mode (what the Jobs client obeys)."""
    return get_authentication_mode() == AuthenticationMode.TOKEN


def follow_auth_mode_of_environment() -> None:
    """Make this process's Ray config read RAY_AUTH_MODE again if it changed since.

    Ray reads RAY_AUTH_MODE into its C++ config once per process, at the first use, and a
    later change of the variable is not seen: a process that talked to a cluster without
    auth and then to one with a token would send no token. Re-reading the config is what
    Ray itself does when it turns token mode on (`_enable_token_auth`)."""
    wanted = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if token_auth_mode() != wanted:
        Config.initialize("")


def enable_token_auth_if_token_available() -> bool:
    """Token mode when a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) and RAY_AUTH_MODE is unset, as `ray start` does; True if on."""
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def route_raylet_messages(logger_name: str = "ray.raylet") -> None:
    """Lines the raylet pushes to this driver go to `logger_name` at WARNING instead of
    straight to stderr; every other output Ray prints goes on as before. Idempotent."""
    printer = ray_worker.print_to_stdstream
    if getattr(printer, "bertflow_routed", False):
        return
    log = logging.getLogger(logger_name)

    def routed(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix=ignore_prefix)
            return
        for line in data.get("lines") or []:
            log.warning("%s", line)

    routed.bertflow_routed = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = routed
