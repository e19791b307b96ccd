"""The one training loop of bertflow, on Ray Train, shared by pretraining and fine-tuning:
its driver side.

A `TrainTask` (picklable, shipped to every worker; workflows.training.contracts) says what
to train; the engine owns
how: DDP (gloo on CPUs, NCCL on GPUs), precision, gradient accumulation, clipping,
AdamW/LAMB, linear warmup + decay (workflows.training.step), validation and rank-0
MLflow logging (workflows.training.loop) into the run named by `RunTracking`, checkpoints
and resume (workflows.training.checkpoint).

`run_training` starts the workers in one `RunFolder` (workflows.run_folder: resolved once
per run, handed to the workers) and returns a `TrainResult`; when a run completes, its
result is saved in the run folder, and `RunFolder.result` is the one place that says
whether a run already finished (and with what result). Rerunning a run name after the
driver died resumes from the latest checkpoint.

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
snapshot, gets the storage filesystem resolved on the driver (`RunFolder.ray_storage`).
They are never in bertflow's logs, MLflow params or tags. Ray itself keeps runtime
environments in its job and Train run state: whoever reaches the Ray dashboard can read
them (cluster.yaml binds it to the head's loopback).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from bert_core.config_io import BertflowError, to_dict
from data_prep import ray_env
from data_prep.storage import LocationError, check_location, is_local, open_location, redact
from workflows import tracking
from workflows.config import LoopSettings
from workflows.run_folder import MODEL_ARTIFACT, RunFolder, TrainResult
from workflows.training.contracts import RunTracking, TrainingError, TrainTask
from workflows.training.checkpoint import check_resume
from workflows.training.loop import data_order, reads_own_rows, worker_loop
from workflows.training.resources import WaitNotice, check_cluster_fits

log = logging.getLogger(__name__)


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
    workers = loop.max_workers
    share = (total - 1) / workers if total > 1 else total / (workers + 1)
    return round(max(0.1, min(1.0, share)), 2)


def run_folder(loop: LoopSettings, run_name: str) -> RunFolder:
    """The folder of run `run_name` under `--storage-path` (default ./runs), resolved once;
    a location pyarrow cannot resolve is a TrainingError naming the flag."""
    try:
        return RunFolder.of(loop.storage_path, run_name)
    except LocationError as exc:
        raise TrainingError(str(exc)) from None


def finished_run(loop: LoopSettings, run_name: str) -> TrainResult | None:
    """The result of run `run_name` if it already finished, else None (see
    RunFolder.result)."""
    return run_folder(loop, run_name).result()


def check_workers(loop: LoopSettings, canonical: bool) -> None:
    """Refuse worker settings the task's data path cannot honour, before anything starts:
    an elastic range needs the canonical order (a task that reads its own train parts,
    training/rows.py), and Ray Data's shards need the accumulation to divide evenly."""
    if canonical:
        return
    if loop.elastic:
        raise TrainingError(
            f"--num-workers {loop.num_workers}: an elastic range needs a task that reads "
            f"its own train rows (pretraining, fine-tuning); give a fixed number of workers")
    if loop.micro_batches_per_step % loop.max_workers:
        raise TrainingError(
            f"--global-batch-size {loop.global_batch}: {loop.micro_batches_per_step} "
            f"micro-batches of {loop.batch_size} do not divide among {loop.max_workers} "
            f"workers; give a multiple of {loop.batch_size * loop.max_workers}")


def default_max_failures(loop: LoopSettings) -> int:
    """--max-failures, or its default: 0 on one node, 5 on a cluster of several nodes or
    for an elastic run (a lost node is a restart from the latest checkpoint)."""
    if loop.max_failures is not None:
        return loop.max_failures
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return 5 if nodes > 1 or loop.elastic else 0


def saved_data_order(run: RunFolder) -> dict[str, Any] | None:
    """The data order recorded in the run's latest trusted checkpoint (None: no checkpoint,
    or one from before orders were recorded)."""
    latest = run.latest_checkpoint()
    if latest is None:
        return None
    try:
        loc = open_location(latest).join("trainer_state.json")
        return json.loads(loc.read_text()).get("data")
    except (OSError, ValueError):
        return None


def worker_env_vars() -> dict[str, str]:
    """The variables every Train worker gets from the driver: MLflow's safety switches,
    the MLflow server credentials and the object-store credentials set here."""
    return {**tracking.MLFLOW_SAFE_ENV, **ray_env.worker_env_vars()}


def check_storage(loop: LoopSettings, tracking_uri: str | None = None) -> None:
    """Refuse storage the run cannot use, before any worker starts (see the module doc).
    Ray must be initialised (the node count decides whether ./runs is usable). On several
    nodes a sqlite `tracking_uri` is refused too: rank 0, which logs the metrics, may run
    on a node where that file is another (empty) store."""
    import ray

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


def run_training(task: TrainTask, loop: LoopSettings, *,
                 datasets: dict[str, Any] | None = None,
                 run: RunFolder, tracking: RunTracking | None = None,
                 callbacks: list[Any] | None = None) -> TrainResult:
    """Train `task` with Ray Train under `loop` settings into the run folder `run`
    (`run_folder(loop, name)`); returns the final checkpoint.

    `datasets` holds Ray Datasets `train` (split across workers; left out for a task that
    reads its own train rows, `loop.reads_own_rows`, see training/rows.py) and optionally
    `val` (left out for a task with its own `val_rows`: pretraining and fine-tuning hand
    no dataset at all).
    `callbacks` are Ray Train callbacks (e.g. a sweep's `TuneReportCallback`, which hands
    each checkpoint's metrics, the eval metrics of each epoch, to Ray Tune).
    Ray must already be initialised (data_prep.ray_env.init_ray) and the storage checked
    (`check_storage`, once per job: a stage's prepare step does it). Rerunning the same
    run folder resumes from its latest checkpoint; a run that already finished is an
    error (choose a new name).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    datasets = datasets or {}
    canonical = reads_own_rows(task)
    if "train" not in datasets and not canonical:
        raise TrainingError("run_training needs a 'train' dataset (or a task that reads "
                            "its own train rows)")
    if (done := run.result()) is not None:
        raise TrainingError(
            f"run {run.name!r} already finished at step {done.step} ({run.where}); "
            f"choose a new --run-name, or delete that folder to train it again")
    check_workers(loop, canonical)
    check_resume(saved_data_order(run), data_order(loop, canonical, loop.max_workers),
                 f"the latest checkpoint of run {run.name!r} ({run.where})")
    storage_path, storage_fs = run.ray_storage()
    cpus = default_cpus_per_worker(loop)
    check_cluster_fits(loop, cpus, ray_data=bool(datasets))  # before Ray Train waits silently
    failures = default_max_failures(loop)
    log.info("training %s: %s worker(s), %.2f CPU each, GPU=%s, %s restart(s) allowed, "
             "run folder %s", run.name, loop.num_workers, cpus, loop.use_gpu,
             "unlimited" if failures < 0 else failures, run.uri)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"task": task, "loop": loop, "tracking": tracking,
                           "splits": sorted(datasets), "run": run},
        scaling_config=ScalingConfig(num_workers=(loop.min_workers, loop.max_workers)
                                     if loop.elastic else loop.max_workers, use_gpu=loop.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if loop.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            worker_runtime_env={"env_vars": worker_env_vars()},
            checkpoint_config=CheckpointConfig(num_to_keep=loop.keep_checkpoints),
            failure_config=FailureConfig(max_failures=failures),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    need = {"CPU": cpus * loop.min_workers, "GPU": float(loop.min_workers if loop.use_gpu else 0)}
    try:
        with WaitNotice(need):  # a run that waits on other runs' resources says so
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
        raise TrainingError(f"run {run.name!r} ended without a checkpoint ({run.uri})")
    ckpt = run.join(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    metrics = dict(result.metrics or {})
    out = TrainResult(run_name=run.name, run_dir=run.where,
                      checkpoint_dir=run.where_of(ckpt),
                      model_dir=run.where_of(ckpt.join(MODEL_ARTIFACT)),
                      step=int(metrics.get("step", 0)),
                      metrics=metrics, start_step=int(metrics.get("start_step", 0)),
                      attempt=int(metrics.get("attempt", 0)))
    run.write_result(redact(json.dumps({**dataclasses.asdict(out), "loop": to_dict(loop)},
                                       indent=2, default=str)))
    return out
