"""The one training loop of bertflow, on Ray Train, shared by pretraining and fine-tuning.

A `TrainTask` (picklable, shipped to every worker) says what to train; the engine owns
how: DDP (gloo on CPUs, NCCL on GPUs), precision (autocast bf16/fp16, a gradient scaler
for fp16), gradient accumulation, clipping, AdamW/LAMB, linear warmup + decay,
validation, checkpoints, resume and rank-0 MLflow logging into a run the driver created.

Data: the `train` dataset is split across workers (`get_dataset_shard`) and streamed
with `iter_torch_batches(collate_fn=...)`; it is never loaded on the driver. `val` is
not split: rank 0 evaluates on its first `eval_batches` batches (same batches, same
masking seed every time, so the curve is comparable).

Checkpoints (every `checkpoint_every` steps and at the end), one folder each:
    model/               the task's HF-format folder (safetensors, config, tokenizer)
    trainer_state.pt     optimizer, scheduler, scaler, step (torch.save of tensors and
                         plain values; read back with torch.load(weights_only=True))
    trainer_state.json   step, epoch, data position, attempt (human-readable)
    rank_<r>.pt          each worker's torch RNG state and data position

Resume (after a worker dies, with `max_failures`, or when the same run name is started
again after the driver died): the workers restart from the latest checkpoint with its
model, optimizer, scheduler and scaler, at its step. Data position: each worker counts
the micro-batches it consumed in the current epoch; on resume it re-reads and discards
that many batches of its shard (no compute), then continues. So a resumed run repeats the
work done after the checkpoint (the steps between the checkpoint and the failure are
trained again, and their metrics are logged again at the same steps) and skips nothing.
Which rows a worker sees follows Ray Data's split, made deterministic with
`preserve_order`; dynamic masks are drawn from a generator seeded by (seed, rank, epoch),
so the masks after resume are those the lost attempt would have drawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from bert_core.config_io import BertflowError, to_dict
from workflows.config import LoopSettings
from workflows.optim import build_optimizer, build_scheduler, global_grad_norm

log = logging.getLogger(__name__)

RESULT_FILE = "bertflow_result.json"  # written in the run folder when a run completes

# Peak dense bf16/fp16 FLOP/s of common GPUs, for model FLOPs utilisation (MFU).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


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


# ---------------------------------------------------------------- per-step mechanics


class StepRunner:
    """Forward/backward with accumulation and precision, and the optimizer step.

    Used by the Ray worker loop and directly by unit tests (no Ray needed).
    """

    def __init__(self, model: nn.Module, loop: LoopSettings, device: torch.device,
                 raw_model: nn.Module | None = None) -> None:
        self.model = model                      # what forward runs through (maybe DDP)
        self.raw_model = raw_model or model     # the parameters
        self.loop = loop
        self.device = device
        self.optimizer = build_optimizer(self.raw_model, loop)
        self.scheduler = build_scheduler(self.optimizer, loop)
        self.scaler = torch.amp.GradScaler(device.type, enabled=loop.precision == "fp16")
        self.step = 0
        self.micro = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.loop.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.loop.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def forward_backward(self, task: TrainTask,
                         batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        """One micro-batch; gradients are synchronised (DDP) only on the last of a cycle."""
        last = (self.micro + 1) % self.loop.grad_accum == 0
        no_sync = getattr(self.model, "no_sync", None)
        sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_ctx:
            with self.autocast():
                loss, metrics = task.compute_loss(self.model, batch)
            self.scaler.scale(loss / self.loop.grad_accum).backward()
        self.micro += 1
        return float(loss.detach()), metrics

    @property
    def cycle_done(self) -> bool:
        return self.micro % self.loop.grad_accum == 0

    def optimizer_step(self) -> dict[str, float]:
        """Unscale, clip, step, schedule; returns the lr used and the gradient norm."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        if self.loop.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.loop.max_grad_norm))
        else:
            grad_norm = global_grad_norm(params)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"lr": lr, "grad_norm": grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.micro = 0


class MetricWindow:
    """Accumulates per-micro-batch metrics between two logs (see TrainTask docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.tokens = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: float, metrics: dict[str, Any], tokens: int, samples: int) -> None:
        self.n += 1
        self.tokens += tokens
        self.samples += samples
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss
        for k, v in metrics.items():
            v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v

    def summary(self, world_size: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.sums.items():
            if k.endswith("_count"):
                continue
            if k.endswith("_correct"):
                count = self.sums.get(k[: -len("_correct")] + "_count", 0.0)
                if count > 0:
                    out[k[: -len("_correct")] + "_acc"] = v / count
                continue
            out[k] = v / max(1, self.n)
        elapsed = max(1e-9, time.perf_counter() - self.started)
        # Other ranks process as much as rank 0 (equal shards), hence the world factor.
        out["tokens_per_s"] = self.tokens * world_size / elapsed
        out["samples_per_s"] = self.samples * world_size / elapsed
        return out


def count_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(non-padding tokens, sequences) of a collated batch."""
    if "attention_mask" in batch:
        mask = batch["attention_mask"]
        return int(mask.sum()), int(mask.shape[0])
    first = next(iter(batch.values()))
    return int(first.numel()), int(first.shape[0])


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(dest: Path, *, task: TrainTask | None, raw_model: nn.Module | None,
                    runner: StepRunner | None, rank: int, epoch: int,
                    batches_in_epoch: int, attempt: int) -> None:
    """Write this rank's part of a checkpoint into `dest` (rank 0 writes model + state)."""
    dest.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        assert task is not None and raw_model is not None and runner is not None
        task.save_model(raw_model, dest / "model")
        torch.save(runner.state_dict(), dest / "trainer_state.pt")
        (dest / "trainer_state.json").write_text(json.dumps(
            {"step": runner.step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
             "attempt": attempt}, indent=2))
    torch.save({"torch_rng": torch.get_rng_state(), "epoch": epoch,
                "batches_in_epoch": batches_in_epoch}, dest / f"rank_{rank}.pt")


def load_checkpoint_state(src: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, this rank's state) from a checkpoint; only tensors and plain values
    are read (weights_only=True). A rank missing from the checkpoint (the run was resumed
    with more workers) takes rank 0's data position."""
    trainer = torch.load(src / "trainer_state.pt", weights_only=True, map_location="cpu")
    info = json.loads((src / "trainer_state.json").read_text())
    rank_file = src / f"rank_{rank}.pt"
    if not rank_file.is_file():
        rank_file = src / "rank_0.pt"
    rank_state = torch.load(rank_file, weights_only=True)
    trainer["attempt"] = int(info.get("attempt", 0))
    return trainer, rank_state


# ---------------------------------------------------------------- the worker loop


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def mfu(tokens_per_s: float, n_params: int, device: torch.device, world: int) -> float | None:
    """Model FLOPs utilisation of `world` GPUs: 6 * params FLOPs per token (forward and
    backward, attention ignored) against the GPUs' peak; None on CPUs or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return 6 * n_params * tokens_per_s / (peak * world) if peak else None


def _worker_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by TorchTrainer."""
    import ray.train
    import ray.train.torch

    task: TrainTask = config["task"]
    loop: LoopSettings = config["loop"]
    tracking: RunTracking | None = config["tracking"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Which processes train this run (for operators, and the test that kills one).
    pid_dir = Path(config["run_dir"], "workers")
    with contextlib.suppress(OSError):  # the run folder may be remote storage
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))

    torch.manual_seed(loop.seed)
    checkpoint = ray.train.get_checkpoint()
    epoch, skip, attempt, trainer_state = 0, 0, 0, None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer_state, rank_state = load_checkpoint_state(Path(d), rank)
            raw_model = task.load_model(Path(d) / "model")
        torch.set_rng_state(rank_state["torch_rng"])
        epoch, skip = int(rank_state["epoch"]), int(rank_state["batches_in_epoch"])
        attempt = trainer_state["attempt"] + 1
    else:
        raw_model = task.build_model()
    model = ray.train.torch.prepare_model(raw_model)
    raw_model = getattr(model, "module", model)
    runner = StepRunner(model, loop, device, raw_model=raw_model)
    if trainer_state is not None:
        runner.load_state_dict(trainer_state)
    start_step = runner.step
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info("rank %d/%d on %s: start at step %d (epoch %d, skip %d batches), attempt %d",
             rank, world, device, start_step, epoch, skip, attempt)

    mlflow = None
    if rank == 0 and tracking is not None:
        import mlflow

        mlflow.set_tracking_uri(tracking.tracking_uri)
        mlflow.start_run(run_id=tracking.run_id, log_system_metrics=tracking.log_system_metrics)
        mlflow.log_metric("attempt", attempt, step=start_step)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if "val" in config["splits"] else None
    window = MetricWindow()
    last_eval: dict[str, float] = {}
    last_ckpt_step = start_step if checkpoint is not None else -1

    def evaluate() -> dict[str, float]:
        if rank != 0 or val_shard is None:
            return {}
        rng = np.random.default_rng([loop.seed, 1_000_003])
        batches = val_shard.iter_torch_batches(
            batch_size=loop.batch_size, collate_fn=lambda b: task.collate(b, rng))
        limit = loop.eval_batches or math.inf
        def limited():
            for i, b in enumerate(batches):
                if i >= limit:
                    break
                yield _to_device(b, device)
        raw_model.eval()
        with torch.no_grad(), runner.autocast():
            metrics = task.evaluate(raw_model, limited())
        raw_model.train()
        return {f"val_{k}": float(v) for k, v in metrics.items()}

    def checkpoint_now(batches_in_epoch: int, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="bertflow-ckpt-") as tmp:
            save_checkpoint(Path(tmp), task=task, raw_model=raw_model, runner=runner,
                            rank=rank, epoch=epoch, batches_in_epoch=batches_in_epoch,
                            attempt=attempt)
            ray.train.report({**metrics, "step": runner.step, "start_step": start_step,
                              "attempt": attempt},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{runner.step:08d}")

    if runner.step == 0 and rank == 0 and mlflow is not None:
        last_eval = evaluate()  # where validation starts, so the curve shows the drop
        if last_eval:
            mlflow.log_metrics(last_eval, step=0)
    raw_model.train()
    while runner.step < loop.max_steps:
        rng = np.random.default_rng([loop.seed, rank, epoch])
        batches = train_shard.iter_torch_batches(
            batch_size=loop.batch_size, drop_last=True, prefetch_batches=2,
            collate_fn=lambda b, rng=rng: task.collate(b, rng))
        seen = 0
        for batch in batches:
            seen += 1
            if seen <= skip:
                continue  # consumed before the checkpoint we resumed from
            batch = _to_device(batch, device)
            loss, metrics = runner.forward_backward(task, batch)
            window.add(loss, metrics, *count_tokens(batch))
            if not runner.cycle_done:
                continue
            step_info = runner.optimizer_step()
            step = runner.step
            if not math.isfinite(loss) and loop.precision != "fp16":
                raise TrainingError(f"loss is {loss} at step {step}: lower --lr or use "
                                    f"--precision fp32")
            if mlflow is not None and (step % loop.log_every == 0 or step == loop.max_steps):
                summary = {f"train_{k}" if k not in ("tokens_per_s", "samples_per_s") else k: v
                           for k, v in window.summary(world).items()}
                summary.update(step_info)
                if (util := mfu(summary["tokens_per_s"], n_params, device, world)) is not None:
                    summary["mfu"] = util
                mlflow.log_metrics(summary, step=step)
                window.reset()
            elif rank != 0 and step % loop.log_every == 0:
                window.reset()
            final = step >= loop.max_steps
            if (loop.eval_every and step % loop.eval_every == 0) or final:
                last_eval = evaluate()
                if mlflow is not None and last_eval:
                    mlflow.log_metrics(last_eval, step=step)
            if (loop.checkpoint_every and step % loop.checkpoint_every == 0) or final:
                checkpoint_now(seen, last_eval)
                last_ckpt_step = step
            if final:
                break
        else:
            if seen == 0:
                raise TrainingError(
                    f"the train split gave worker {rank} no batch in epoch {epoch}: it has "
                    f"fewer rows than --num-workers x --batch-size ({world} x "
                    f"{loop.batch_size}); use a smaller batch or more data")
            epoch, skip = epoch + 1, 0
            continue
        break
    if last_ckpt_step != runner.step:  # resumed at max_steps: report the final state again
        checkpoint_now(0, last_eval)
    if mlflow is not None:
        mlflow.end_run()


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


def finished_result(run_dir: Path) -> dict[str, Any] | None:
    """The saved summary of a completed run in `run_dir`, or None if it never finished."""
    f = run_dir / RESULT_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def run_training(task: TrainTask, loop: LoopSettings, *, datasets: dict[str, Any],
                 run_name: str, tracking: RunTracking | None = None) -> TrainResult:
    """Train `task` with Ray Train under `loop` settings; returns the final checkpoint.

    `datasets` holds Ray Datasets `train` (split across workers) and optionally `val`.
    Ray must already be initialised (data_prep.ray_env.init_ray). Rerunning the same
    `run_name` with the same storage resumes from its latest checkpoint; a run that
    already finished is an error (choose a new name).
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if "train" not in datasets:
        raise TrainingError("run_training needs a 'train' dataset")
    run_dir = run_dir_for(loop, run_name)
    if (done := finished_result(run_dir)) is not None:
        raise TrainingError(
            f"run {run_name!r} already finished at step {done.get('step')} ({run_dir}); "
            f"choose a new --run-name, or delete that folder to train it again")
    cpus = default_cpus_per_worker(loop)
    log.info("training %s: %d worker(s), %.2f CPU each, GPU=%s, run folder %s",
             run_name, loop.num_workers, cpus, loop.use_gpu, run_dir)
    from ray.data import ExecutionOptions

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"task": task, "loop": loop, "tracking": tracking,
                           "splits": sorted(datasets), "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=loop.num_workers, use_gpu=loop.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if loop.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=loop.keep_checkpoints),
            failure_config=FailureConfig(max_failures=loop.max_failures)),
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
