"""The one training loop of bertflow, on Ray Train, shared by pretraining and fine-tuning:
its interface and its driver side.

A `TrainTask` (picklable, shipped to every worker) says what to train; the engine owns
how: DDP (gloo on CPUs, NCCL on GPUs), precision, gradient accumulation, clipping,
AdamW/LAMB, linear warmup + decay (workflows.training.step), validation and rank-0
MLflow logging (workflows.training.loop) into the run named by `RunTracking`, checkpoints
and resume (workflows.training.checkpoint).

`run_training` starts the workers and returns a `TrainResult`; when a run completes, its
result is saved in the run folder, and `finished_run` is the one place that says whether
a run already finished (and with what result). Rerunning a run name after the driver died
resumes from the latest checkpoint.

Storage: the run folder is `<storage_path>/<run name>`, where `storage_path` is a local
folder (default `./runs`) or any URI pyarrow.fs resolves (`s3://bucket/runs`, `gs://...`).
A URI stays a URI: Ray Train gets the filesystem it names, resolved on the driver, and the
path in it (`RunConfig(storage_path, storage_filesystem, name)`: Ray's storage layer
uploads each checkpoint from the worker that reports it), and everything bertflow reads
there (the result file, Ray's checkpoint snapshot, completion markers) is read through
pyarrow.fs. `check_storage` runs before any worker starts: a scheme pyarrow cannot resolve
or a missing bucket is an error, and so is a Ray cluster of several nodes without
`--storage-path` (./runs would be a different folder on every node: the final model could
land on another machine and a restart after a node failure could not find the
checkpoints); an explicit local path there is taken to be a shared mount, with a warning;
a sqlite MLflow store is refused there too (rank 0 logs from whichever node it runs on).

Credentials: in Ray 2.60, Train V2 creates its controller with Ray Train's own variables
over the job's runtime environment, and the workers with `RunConfig.worker_runtime_env`
over the controller's: variables the job's runtime env carries (data_prep.ray_env.init_ray
and `bertflow submit` put the credentials there) reach the workers, but on a Ray started
another way (a notebook, a shared test Ray) they would not, and the driver's os.environ
never does. So `worker_env_vars()` (the driver's MLflow and object-store credential
variables plus MLflow's safety switches) are given to the worker group explicitly
(`RunConfig.worker_runtime_env`), and the controller, which writes the checkpoint
snapshot, gets the storage filesystem resolved on the driver (`ray_storage`).
They are never in bertflow's logs, MLflow params or tags. Ray itself keeps runtime
environments in its job and Train run state: whoever reaches the Ray dashboard can read
them (cluster.yaml binds it to the head's loopback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
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
            from workflows import tracking as T

            if self.opening is None:
                raise TrainingError("RunTracking needs a run_id or an opening")
            self.run_id = T.open_run(self.tracking_uri, **{**self.opening, "resume": True})
        return self.run_id


@dataclass
class TrainResult:
    """What a finished `run_training` returns. The folders are Paths for local storage and
    URIs for remote storage (`local_model_dir` gives a local copy of the model folder)."""

    run_name: str
    run_dir: Path | str
    checkpoint_dir: Path | str      # the final checkpoint
    model_dir: Path | str           # its HF-format model folder
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


def run_location(loop: LoopSettings, run_name: str) -> Any:
    """The Ray Train run folder <storage_path or ./runs>/<run_name> as a
    data_prep.storage.Location (a local folder or a URI)."""
    from data_prep.storage import LocationError, open_location

    try:
        root = open_location(loop.storage_path or Path.cwd() / "runs")
    except LocationError as exc:
        raise TrainingError(f"--storage-path: {exc}") from None
    return root.join(run_name)


def run_dir_for(loop: LoopSettings, run_name: str) -> Path | str:
    """The run folder: a resolved Path for local storage, the URI for remote storage."""
    from data_prep.storage import is_local

    loc = run_location(loop, run_name)
    return Path(loc.path).resolve() if is_local(loc.uri) else loc.uri


def _as_location(where: Path | str) -> Any:
    from data_prep.storage import open_location

    return open_location(where)


def worker_env_vars() -> dict[str, str]:
    """The variables every Train worker gets from the driver: MLflow's safety switches,
    the MLflow server credentials and the object-store credentials set here."""
    from data_prep.ray_env import worker_env_vars as credentials
    from workflows import tracking as T

    return {**T.MLFLOW_SAFE_ENV, **credentials()}


def check_storage(loop: LoopSettings, tracking_uri: str | None = None) -> None:
    """Refuse storage the run cannot use, before any worker starts (see the module doc).
    Ray must be initialised (the node count decides whether ./runs is usable). On several
    nodes a sqlite `tracking_uri` is refused too: rank 0, which logs the metrics, may run
    on a node where that file is another (empty) store."""
    import ray

    from data_prep.storage import LocationError, check_location

    if loop.storage_path:
        try:
            check_location(loop.storage_path, "--storage-path", must_exist=False,
                           writable=True)
        except LocationError as exc:
            raise TrainingError(str(exc)) from None
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    check_cluster_storage(loop, tracking_uri, nodes)


def check_cluster_storage(loop: LoopSettings, tracking_uri: str | None, nodes: int) -> None:
    """The part of `check_storage` that depends on the number of alive nodes."""
    from data_prep.storage import is_local

    if nodes <= 1:
        return
    if not loop.storage_path:
        raise TrainingError(
            f"this Ray cluster has {nodes} nodes and no --storage-path was given: ./runs "
            f"would be a different folder on each node, so the final model could land on "
            f"another machine and a restart after a node failure could not find the "
            f"checkpoints. Set --storage-path s3://BUCKET/runs (or any pyarrow.fs URI, or "
            f"a folder that every node mounts at the same path)")
    if tracking_uri and tracking_uri.startswith("sqlite:"):
        raise TrainingError(
            f"this Ray cluster has {nodes} nodes and the MLflow store {tracking_uri} is a "
            f"file on this machine: rank 0 may log from another node. Run an MLflow server "
            f"(`bertflow server` on the head) and set MLFLOW_TRACKING_URI=http://HEAD:5000")
    if is_local(loop.storage_path):
        log.warning("--storage-path %s is a local path on a %d-node cluster: it must be a "
                    "filesystem every node mounts at that path (NFS), else use "
                    "s3://BUCKET/runs", loop.storage_path, nodes)


def ray_storage(loop: LoopSettings, run_dir: Path | str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig. Local: the folder,
    None. A URI: the filesystem resolved here, on the driver, and the path inside it.

    Ray Train's controller (which writes the checkpoint snapshot) runs with the job's
    runtime environment only; on a Ray started without the store's variables it could
    not resolve the URI itself. The resolved filesystem carries the endpoint and region,
    and for S3 the driver's keys when they come from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (inside Ray's pickled arguments, never in a log)."""
    import pyarrow.fs as pafs

    from data_prep.storage import credential_env, is_local

    if is_local(str(run_dir)):
        return str(Path(run_dir).parent), None
    fs, path = pafs.FileSystem.from_uri(str(loop.storage_path).rstrip("/"))
    env = credential_env()
    if isinstance(fs, pafs.S3FileSystem) and env.get("AWS_ACCESS_KEY_ID") \
            and env.get("AWS_SECRET_ACCESS_KEY"):
        options = dict(fs.__reduce__()[1][0])
        options.update(access_key=env["AWS_ACCESS_KEY_ID"],
                       secret_key=env["AWS_SECRET_ACCESS_KEY"],
                       session_token=env.get("AWS_SESSION_TOKEN"),
                       region=fs.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
        fs = pafs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})
    return path.rstrip("/"), fs


def finished_run(loop: LoopSettings, run_name: str) -> TrainResult | None:
    """The result of run `run_name` if it already finished, else None (never trained, or
    stopped before its end: rerunning resumes it)."""
    from data_prep.storage import is_local

    marker = run_location(loop, run_name).join(RESULT_FILE)
    try:
        saved = json.loads(marker.read_text())
    except (FileNotFoundError, OSError, ValueError):
        return None
    result = TrainResult(**{f.name: saved[f.name] for f in dataclasses.fields(TrainResult)})
    for name in ("run_dir", "checkpoint_dir", "model_dir"):
        value = getattr(result, name)
        if is_local(value):
            setattr(result, name, Path(value))
    return result


@contextlib.contextmanager
def local_model_dir(model_dir: Path | str) -> Iterator[Path]:
    """The model folder of a result as a local folder: itself when local, else a
    temporary download (removed on exit), e.g. to log it to MLflow."""
    from data_prep.storage import is_local
    from workflows.transfer import download_dir

    if is_local(model_dir):
        yield Path(model_dir)
        return
    with tempfile.TemporaryDirectory(prefix="bertflow-final-model-") as tmp:
        yield download_dir(_as_location(model_dir), Path(tmp) / "model")


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
    from data_prep.storage import is_local

    check_storage(loop, tracking.tracking_uri if tracking else None)
    run_loc = run_location(loop, run_name)
    run_dir = run_dir_for(loop, run_name)
    if (done := finished_run(loop, run_name)) is not None:
        raise TrainingError(
            f"run {run_name!r} already finished at step {done.step} ({run_dir}); "
            f"choose a new --run-name, or delete that folder to train it again")
    storage_path, storage_fs = ray_storage(loop, run_dir)
    cpus = default_cpus_per_worker(loop)
    log.info("training %s: %d worker(s), %.2f CPU each, GPU=%s, run folder %s",
             run_name, loop.num_workers, cpus, loop.use_gpu, run_loc.uri)
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
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            worker_runtime_env={"env_vars": worker_env_vars()},
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
        raise TrainingError(f"run {run_name!r} ended without a checkpoint ({run_loc.uri})")
    ckpt = run_loc.join(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    model = ckpt.join("model")
    local = is_local(run_loc.uri)
    metrics = dict(result.metrics or {})
    out = TrainResult(run_name=run_name, run_dir=run_dir,
                      checkpoint_dir=Path(ckpt.path) if local else ckpt.uri,
                      model_dir=Path(model.path) if local else model.uri,
                      step=int(metrics.get("step", 0)),
                      metrics=metrics, start_step=int(metrics.get("start_step", 0)),
                      attempt=int(metrics.get("attempt", 0)))
    from data_prep.storage import redact

    text = redact(json.dumps({**dataclasses.asdict(out), "loop": to_dict(loop)}, indent=2,
                             default=str))
    if local:  # written whole, then renamed: a reader never sees half a file
        tmp = Path(run_dir) / (RESULT_FILE + ".tmp")
        tmp.write_text(text)
        tmp.replace(Path(run_dir) / RESULT_FILE)
    else:  # one PUT: an object store shows all of it or nothing
        run_loc.join(RESULT_FILE).write_text(text)
    return out
