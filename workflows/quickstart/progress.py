"""A progress bar that follows a training run through its MLflow metrics."""

from __future__ import annotations

import threading
from typing import Any


class RunProgress:
    """A tqdm bar that follows a training run through its MLflow metrics.

    The training loop runs in Ray workers; rank 0 logs `metric` every few steps. A thread
    polls the run (found by name) and moves the bar to the latest step, showing the value.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, total: int,
                 desc: str, metric: str = "train_loss", poll_s: float = 2.0) -> None:
        self.args = (tracking_uri, experiment, run_name)
        self.total, self.desc, self.metric, self.poll_s = total, desc, metric, poll_s
        self.history: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> "RunProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _follow(self) -> None:
        from tqdm.auto import tqdm

        from workflows import tracking as t

        uri, experiment, run_name = self.args
        c = t.client(uri)
        bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True)
        run_id = None
        try:
            while True:
                stopping = self._stop.is_set()
                try:
                    if run_id is None:
                        exp = c.get_experiment_by_name(experiment)
                        if exp is not None:
                            run = t.find_run(exp.experiment_id, run_name, uri)
                            run_id = run.info.run_id if run else None
                    if run_id is not None:
                        hist = c.get_metric_history(run_id, self.metric)
                        self.history = sorted((m.step, m.value) for m in hist)
                        if self.history:
                            step, value = self.history[-1]
                            bar.update(max(0, min(step, self.total) - bar.n))
                            bar.set_postfix({self.metric: f"{value:.3f}"})
                except Exception:  # the store is busy or the run not there yet: try again
                    pass
                if stopping:
                    break
                self._stop.wait(self.poll_s)
        finally:
            bar.close()
