"""What the driver and the Ray Train workers agree on: the task a worker trains
(`TrainTask`), the MLflow run rank 0 logs into (`RunTracking`), the error either side
raises (`TrainingError`), and the key a worker's reports name its placement group by
(`PLACEMENT_GROUP_KEY`). The result a run leaves, and the names of the files in its
folder, are `workflows.run_folder` (inference reads them too).

Both sides import this module at the top; it imports neither of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bert_core.config_io import BertflowError
from workflows import tracking

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

# In every checkpoint report of a worker: the id of its worker group's placement group
# (`ray.get_runtime_context()`), which a sweep removes when Tune stops the trial.
PLACEMENT_GROUP_KEY = "train_placement_group"


class TrainingError(BertflowError):
    """The training run cannot start or go on; the message says why and what to do."""


@runtime_checkable
class TrainTask(Protocol):
    """What to train. Must pickle (it is shipped to each Ray Train worker).

    compute_loss returns the loss (mean over the micro-batch) and metrics. Metric values
    are floats or 0-d tensors; `X_correct` with a matching `X_count` becomes accuracy
    `X_acc` (summed over the logging window), every other metric is averaged.
    """

    def build_model(self) -> nn.Module:
        """A new model on CPU (randomly initialised, or from the task's init weights)."""

    def load_model(self, model_dir: Path) -> nn.Module:
        """The model saved by `save_model` in `model_dir` (used on resume)."""

    def collate(self, batch: dict[str, np.ndarray],
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Turn a batch of Parquet rows into padded tensors (dynamic masking uses rng)."""

    def compute_loss(self, model: nn.Module,
                     batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss, metrics) of one micro-batch; `model` may be DDP-wrapped."""

    def evaluate(self, model: nn.Module,
                 batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Validation metrics over `batches` (called under no_grad, model in eval mode)."""

    def save_model(self, model: nn.Module, model_dir: Path) -> None:
        """Write a self-contained HF-format folder (weights, config, tokenizer, bertflow.json)."""


@dataclass
class RunTracking:
    """The MLflow run that rank 0 logs into: `run_id`, created by the driver, or (with
    `run_id` None) the run rank 0 opens itself as `tracking.open_run(tracking_uri,
    **opening)` with `resume=True`, so a restarted worker group finds it again. A sweep
    trial takes the second way: its Tune actor then never imports MLflow nor opens the store
    (seconds per trial actor), which rank 0 does anyway to log."""

    tracking_uri: str
    run_id: str | None
    log_system_metrics: bool = True
    opening: dict[str, Any] | None = None

    def resolve(self) -> str:
        """The run's id, opening the run first when the driver did not."""
        if self.run_id is None:
            if self.opening is None:
                raise TrainingError("RunTracking needs a run_id or an opening")
            self.run_id = tracking.open_run(self.tracking_uri, **{**self.opening, "resume": True})
        return self.run_id
