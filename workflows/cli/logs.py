"""Where a command's logs go: bertflow's own lines on the terminal, everything to a file.

Ray and Ray Data log a lot at INFO (execution plans, resource tables, "Full logs are in
..."). By default a long-running verb shows only bertflow's INFO lines, warnings and errors
of any library, and progress bars; the whole log, every library at INFO and bertflow at
DEBUG, goes to a file that the command names when it ends. `-v` shows everything on the
terminal as well.

Ray Data configures its own logger when `ray.data` is imported, from the YAML named by
`RAY_DATA_LOGGING_CONFIG`: quiet mode writes one that keeps Ray Data's session log file
(`ray-data.log` in the Ray session's logs folder) and hands its records to the root
logger (terminal filter + bertflow's file) instead of Ray Data's own console handler. The
variable must be set before `ray.data` is imported, which verbs do lazily inside `run`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# Loggers whose INFO lines are bertflow's own and stay on the terminal.
OWN_LOGGERS = ("workflows", "data_prep", "bert_core", "bertflow")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Ray Data's session log handler is a private Ray class: named here by its dotted path (the
# CLI does not import Ray), it is `workflows.ray_internals.RAY_DATA_FILE_HANDLER`, and
# tests/test_ray_internals.py checks that this config names it.
_RAY_DATA_CONFIG = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray,
         filename: ray-data.log}
loggers:
  ray.data: {level: DEBUG, handlers: [file], propagate: true}
"""


# Warnings that are expected under bertflow and say nothing to its user (file only).
BENIGN = ("Token authentication is enabled for this Ray cluster",  # local Ray, loopback only
          "Progress bars disabled",  # bertflow draws its own bars over Ray Data's
          "Add type hints to the `predict` method",  # MLflow, about bertflow's pyfunc
          # the raylet, when tasks and actors start many worker processes on a small node
          "PYTHON worker processes have been started on node")


class _TerminalFilter(logging.Filter):
    """bertflow's lines from `own_level` up; other libraries' WARNING and above, less the
    benign."""

    def __init__(self, own_level: int = logging.INFO) -> None:
        super().__init__()
        self.own_level = own_level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in OWN_LOGGERS or record.name == "__main__"
        if record.levelno < (self.own_level if own else logging.WARNING):
            return False
        return own or record.levelno > logging.WARNING or not any(
            b in record.getMessage() for b in BENIGN)


def log_dir() -> Path:
    """$BERTFLOW_LOG_DIR, else $XDG_STATE_HOME/bertflow/logs, else ~/.local/state/..."""
    if os.environ.get("BERTFLOW_LOG_DIR"):
        return Path(os.environ["BERTFLOW_LOG_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "bertflow" / "logs"


# Verbs that print their own one line per step: their library INFO lines go to the file.
STEP_PRINTING_VERBS = {"quickstart"}


def setup_logging(verb: str, verbose: bool = False, to_file: bool = True) -> Path | None:
    """Configure the root logger for one command; returns the log file (None: no file).

    Quiet (default): terminal = bertflow INFO + everyone's warnings; file = everything.
    Verbose: everything on the terminal at DEBUG for bertflow, INFO for the rest, and in
    the file too.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # Other libraries at INFO: their DEBUG lines (request headers with credentials, in some)
    # are never made. bertflow's loggers are set to DEBUG below.
    root.setLevel(logging.INFO)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    if verbose:
        terminal.setLevel(logging.INFO)
    else:
        own_level = logging.WARNING if verb in STEP_PRINTING_VERBS else logging.INFO
        terminal.addFilter(_TerminalFilter(own_level))
        logging.captureWarnings(True)  # Python warnings: through the filter, and to the file
    root.addHandler(terminal)
    path = None
    if to_file:
        folder = log_dir()
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = folder / f"bertflow-{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            # Readable by this user only (it holds locations, hosts, user names): created
            # 0600, never through a link planted under its name.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:  # a read-only home must not stop the command
            logging.getLogger("bertflow").warning("no log file in %s (%s)", folder, exc)
            return None
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.setLevel(logging.DEBUG)
        root.addHandler(handler)
        os.environ["BERTFLOW_ROUTE_RAY_LOGS"] = "1"  # data_prep.ray_env hands Ray's logger over
        from data_prep import ray_env  # light: it imports Ray only inside its functions

        if _route_raylet_messages not in ray_env.AFTER_INIT:
            ray_env.AFTER_INIT.append(_route_raylet_messages)
        if not verbose and "RAY_DATA_LOGGING_CONFIG" not in os.environ:
            config = folder / "ray-data-logging.yaml"
            if not config.is_file() or config.read_text() != _RAY_DATA_CONFIG:
                import tempfile

                fd, tmp = tempfile.mkstemp(prefix=f".{config.name}.", dir=folder)
                with os.fdopen(fd, "w") as f:
                    f.write(_RAY_DATA_CONFIG)
                os.replace(tmp, config)
            os.environ["RAY_DATA_LOGGING_CONFIG"] = str(config)
    _adopt_imported_ray_loggers()
    # MLflow installs its own stderr handler on import unless told not to: let its records
    # reach ours (terminal filter + file) instead.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if not verbose:
        # MLflow draws a "Downloading artifacts" bar per download, straight to stderr and
        # inside bertflow's own bars (the downloads are logged, so the file keeps them).
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Libraries that chatter at INFO on every call.
    for name in ("urllib3", "alembic", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return path


def _route_raylet_messages() -> None:
    """Once Ray is up: the raylet's messages to the driver (printed straight to stderr by
    Ray) go to the 'ray.raylet' logger, so to the log file (and the terminal with -v)."""
    from workflows import ray_internals

    ray_internals.route_raylet_messages()


def _adopt_imported_ray_loggers() -> None:
    """When Ray or MLflow is already imported in this process (a caller of `main()`),
    their loggers have their own stderr handlers and do not propagate: hand them to ours
    (Ray Data keeps its session log file)."""
    import sys

    for name, keep in (("ray", ()), ("ray.data", ("SessionFileHandler",)), ("mlflow", ())):
        if name not in sys.modules:
            continue
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler).__name__ not in keep:
                logger.removeHandler(handler)
        logger.propagate = True
