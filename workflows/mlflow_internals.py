"""Every reach into MLflow's private names, behind one door (as workflows.ray_internals
is for Ray).

- MLflow's event stream (`mlflow.utils.logging_utils.MLFLOW_LOGGING_STREAM`): its
  registration helper (`mlflow.register_model`, MLflow 3.x) prints "Successfully
  registered model ..." and "Created version ... of model ..." with `eprint`, straight to
  stderr and past every logger, so a bertflow command's terminal showed them between its
  own lines (bertflow logs the registration itself). No public API routes those prints
  (MLflow 3.x has `disable_logging`, which drops them); `prints_to_log` swaps the stream
  `eprint` writes to for one that hands each line to a logger, so they land in the log
  file only. `tests/test_mlflow_internals.py` checks the name still exists and works.

This module imports MLflow: import it inside the function that needs it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from mlflow.utils import logging_utils

_swap_lock = threading.Lock()


class _LoggerStream:
    """A text stream whose complete lines become records of `logger` at INFO."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info("%s", line)
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.logger.info("%s", self.pending)
        self.pending = ""


@contextlib.contextmanager
def prints_to_log(logger_name: str = "mlflow") -> Iterator[None]:
    """While inside: MLflow's `eprint` lines go to logger `logger_name` (INFO), not stderr."""
    with _swap_lock:
        stream = _LoggerStream(logging.getLogger(logger_name))
        saved = logging_utils.MLFLOW_LOGGING_STREAM
        logging_utils.MLFLOW_LOGGING_STREAM = stream
        try:
            yield
        finally:
            stream.flush()
            logging_utils.MLFLOW_LOGGING_STREAM = saved
