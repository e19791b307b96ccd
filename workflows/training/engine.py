"""The one training loop of bertflow, on Ray Train, shared by pretraining and fine-tuning:
its interface and its driver side.

A `TrainTask` (picklable, shipped to every worker) says what to train; the engine owns
how: DDP (gloo on CPUs, NCCL on GPUs), precision, gradient accumulation, clipping,
AdamW/LAMB, linear warmup + decay (workflows.training.step), validation and rank-0
MLflow logging into a run the driver created (workflows.training.loop), checkpoints and
resume (workflows.training.checkpoint).

`run_training` starts the workers and returns a `TrainResult`; when a run completes, its
result is saved in the run folder, and `finished_run` is the one place that says whether
a run already finished (and with what result). Rerunning a run name after the driver died
resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from bert_core.config_io import BertflowError, to_dict
from workflows.config import LoopSettings

log = logging.getLogger(__name__)

RESULT_FILE = "bertflow_result.json"  # written in the run folder when a run completes


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
    """The MLflow run (created by the driver) that rank 0 logs into."""

    tracking_uri: str
    run_id: str
    log_system_metrics: bool = True


@dataclass
class TrainResult:
    """What a finished `run_training` returns."""

    run_name: str
    run_dir: Path
    checkpoint_dir: Path            # the final checkpoint
    model_dir: Path                 # its HF-format model folder
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics of rank 0
    start_step: int = 0             # step the last worker group started from (>0: resumed)
    attempt: int = 0                # how many times the run was (re)started before


# ---------------------------------------------------------------- the driver side


def default_cpus_per_worker(loop: LoopSettings) -> float:
    """CPUs per worker when not given: 1 with GPUs; on CPUs, the cluster's CPUs minus one
    (kept free for Ray Data and the Train controller) shared by the workers, at most 1."""
    if loop.cpus_per_worker is not None:
        return loop.cpus_per_worker
    if loop.use_gpu:
        return 1.0
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    share = (total - 1) / loop.num_workers if total > 1 else total / (loop.num_workers + 1)
    return round(max(0.1, min(1.0, share)), 2)


def run_dir_for(loop: LoopSettings, run_name: str) -> Path:
    """The Ray Train run folder: <storage_path or ./runs>/<run_name>."""
    root = Path(loop.storage_path) if loop.storage_path else Path.cwd() / "runs"
    return root.resolve() / run_name


def finished_run(loop: LoopSettings, run_name: str) -> TrainResult | None:
    """The result of run `run_name` if it already finished, else None (never trained, or
    stopped before its end: rerunning resumes it)."""
    path = run_dir_for(loop, run_name) / RESULT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    result = TrainResult(**{f.name: saved[f.name] for f in dataclasses.fields(TrainResult)})
    for name in ("run_dir", "checkpoint_dir", "model_dir"):
        setattr(result, name, Path(getattr(result, name)))
    return result


def run_training(task: TrainTask, loop: LoopSettings, *, datasets: dict[str, Any],
                 run_name: str, tracking: RunTracking | None = None,
                 callbacks: list[Any] | None = None) -> TrainResult:
    """Train `task` with Ray Train under `loop` settings; returns the final checkpoint.

    `datasets` holds Ray Datasets `train` (split across workers; left out for a task that
    reads its own `train_location`, see training/rows.py) and optionally `val`.
    `callbacks` are Ray Train callbacks (e.g. a sweep's `TuneReportCallback`, which hands
    each checkpoint's metrics, the eval metrics of each epoch, to Ray Tune).
    Ray must already be initialised (data_prep.ray_env.init_ray). Rerunning the same
    `run_name` with the same storage resumes from its latest checkpoint; a run that
    already finished is an error (choose a new name).
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if "train" not in datasets and not getattr(task, "train_location", None):
        raise TrainingError("run_training needs a 'train' dataset (or a task that reads "
                            "its train_location)")
    run_dir = run_dir_for(loop, run_name)
    if (done := finished_run(loop, run_name)) is not None:
        raise TrainingError(
            f"run {run_name!r} already finished at step {done.step} ({run_dir}); "
            f"choose a new --run-name, or delete that folder to train it again")
    cpus = default_cpus_per_worker(loop)
    log.info("training %s: %d worker(s), %.2f CPU each, GPU=%s, run folder %s",
             run_name, loop.num_workers, cpus, loop.use_gpu, run_dir)
    from ray.data import ExecutionOptions

    from workflows.training.loop import worker_loop

    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"task": task, "loop": loop, "tracking": tracking,
                           "splits": sorted(datasets), "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=loop.num_workers, use_gpu=loop.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if loop.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=loop.keep_checkpoints),
            failure_config=FailureConfig(max_failures=loop.max_failures),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface ours as they are
        cause = exc
        while cause is not None:
            if isinstance(cause, BertflowError):
                raise type(cause)(str(cause)) from exc
            cause = cause.__cause__ or getattr(cause, "cause", None)
            if cause is exc:
                break
        raise
    if result.checkpoint is None:
        raise TrainingError(f"run {run_name!r} ended without a checkpoint ({run_dir})")
    ckpt_dir = Path(result.checkpoint.path)
    metrics = dict(result.metrics or {})
    out = TrainResult(run_name=run_name, run_dir=run_dir, checkpoint_dir=ckpt_dir,
                      model_dir=ckpt_dir / "model", step=int(metrics.get("step", 0)),
                      metrics=metrics, start_step=int(metrics.get("start_step", 0)),
                      attempt=int(metrics.get("attempt", 0)))
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps({**dataclasses.asdict(out), "loop": to_dict(loop)},
                              indent=2, default=str))
    tmp.replace(run_dir / RESULT_FILE)
    return out
