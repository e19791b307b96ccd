"""The worker side of the training loop: what each Ray Train worker runs, top to bottom.

    worker_loop          restore, then one flat loop over micro-batches
    train_batches        the batch stream: epochs, per-epoch masking seeds, resume skipping
    evaluate             validation metrics on rank 0
    report_checkpoint    write this rank's part of a checkpoint and hand it to Ray Train
    RunLogger            rank 0's MLflow logging; a no-op on every other rank

Data: the `train` dataset is split across workers (`get_dataset_shard`) and streamed with
`iter_torch_batches(collate_fn=...)`; it is never loaded on the driver. Which rows a
worker sees follows Ray Data's split, made deterministic with `preserve_order`; dynamic
masks are drawn from a generator seeded by (seed, rank, epoch), so the masks after a
resume are those the lost attempt would have drawn. `val` is not split: rank 0 evaluates
on its first `eval_batches` batches (same batches, same masking seed every time, so the
curve is comparable).

Resume repeats the work done after the checkpoint (the steps between the checkpoint and
the failure are trained again and their metrics logged again at the same steps) and skips
nothing: each worker re-reads and discards the micro-batches of the current epoch that it
had consumed (no compute), then continues.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workflows.config import LoopSettings
from workflows.training.checkpoint import restore, save_checkpoint
from workflows.training.engine import RunTracking, TrainingError, TrainTask
from workflows.training.step import MetricWindow, StepRunner, count_tokens, mfu

Batch = dict[str, torch.Tensor]


def worker_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by TorchTrainer."""
    import ray.train
    import ray.train.torch

    task: TrainTask = config["task"]
    loop: LoopSettings = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _record_pid(Path(config["run_dir"], "workers"), rank)

    torch.manual_seed(loop.seed)
    start = restore(ray.train.get_checkpoint(), task, rank)
    model = ray.train.torch.prepare_model(start.model)
    raw_model = getattr(model, "module", model)
    runner = StepRunner(model, loop, device, raw_model=raw_model)
    if start.trainer_state is not None:
        runner.load_state_dict(start.trainer_state)
    start_step, attempt = runner.step, start.attempt
    n_params = sum(p.numel() for p in raw_model.parameters())
    logger = RunLogger(config["tracking"] if rank == 0 else None)
    logger.log({"attempt": attempt}, start_step)
    val = ray.train.get_dataset_shard("val") if rank == 0 and "val" in config["splits"] else None
    report = dict(task=task, model=raw_model, runner=runner, rank=rank, attempt=attempt,
                  start_step=start_step)

    last_eval: dict[str, float] = {}
    if runner.step == 0 and logger.active:  # where validation starts: the curve shows the drop
        last_eval = evaluate(task, raw_model, val, loop, runner, device)
        logger.log(last_eval, 0)
    saved_at = start_step if start.resumed else -1
    epoch, window = start.epoch, MetricWindow()
    batches = train_batches(ray.train.get_dataset_shard("train"), task, loop, rank, world,
                            start.epoch, start.skip, device)
    raw_model.train()
    while runner.step < loop.max_steps:
        epoch, position, batch = next(batches)
        loss, metrics = runner.forward_backward(task, batch)
        window.add(loss, metrics, *count_tokens(batch))
        if not runner.cycle_done:
            continue
        step_info = runner.optimizer_step()
        step, final = runner.step, runner.step >= loop.max_steps
        if not math.isfinite(loss) and loop.precision != "fp16":
            raise TrainingError(f"loss is {loss} at step {step}: lower --lr or use "
                                f"--precision fp32")
        if step % loop.log_every == 0 or final:
            logger.log({**train_summary(window, world, n_params, device), **step_info}, step)
            window.reset()
        if _every(step, loop.eval_every) or final:
            last_eval = evaluate(task, raw_model, val, loop, runner, device)
            logger.log(last_eval, step)
        if _every(step, loop.checkpoint_every) or final:
            report_checkpoint(**report, epoch=epoch, position=position, metrics=last_eval)
            saved_at = step
    if saved_at != runner.step:  # resumed at max_steps: report the final state again
        report_checkpoint(**report, epoch=epoch, position=0, metrics=last_eval)
    logger.close()


def train_batches(shard: Any, task: TrainTask, loop: LoopSettings, rank: int, world: int,
                  epoch: int, skip: int, device: torch.device
                  ) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, micro-batches consumed in that epoch, batch on `device`), epoch after epoch.

    Each epoch draws dynamic masks from a generator seeded by (seed, rank, epoch); the
    first `skip` batches of the first epoch were consumed before the checkpoint resumed
    from, so they are read and dropped.
    """
    while True:
        rng = np.random.default_rng([loop.seed, rank, epoch])
        batches = shard.iter_torch_batches(
            batch_size=loop.batch_size, drop_last=True, prefetch_batches=2,
            collate_fn=lambda b, rng=rng: task.collate(b, rng))
        seen = 0
        for seen, batch in enumerate(batches, start=1):
            if seen > skip:
                yield epoch, seen, _to_device(batch, device)
        if seen == 0:
            raise TrainingError(
                f"the train split gave worker {rank} no batch in epoch {epoch}: it has "
                f"fewer rows than --num-workers x --batch-size ({world} x "
                f"{loop.batch_size}); use a smaller batch or more data")
        epoch, skip = epoch + 1, 0


def evaluate(task: TrainTask, model: nn.Module, val_shard: Any, loop: LoopSettings,
             runner: StepRunner, device: torch.device) -> dict[str, float]:
    """`val_*` metrics on the first `eval_batches` batches of `val_shard` (all of it for 0),
    with the same masking seed every time; {} without a validation split."""
    if val_shard is None:
        return {}
    rng = np.random.default_rng([loop.seed, 1_000_003])
    batches = val_shard.iter_torch_batches(batch_size=loop.batch_size,
                                           collate_fn=lambda b: task.collate(b, rng))
    limited = (_to_device(b, device) for b in itertools.islice(batches, loop.eval_batches or None))
    model.eval()
    with torch.no_grad(), runner.autocast():
        metrics = task.evaluate(model, limited)
    model.train()
    return {f"val_{k}": float(v) for k, v in metrics.items()}


def report_checkpoint(*, task: TrainTask, model: nn.Module, runner: StepRunner, rank: int,
                      attempt: int, start_step: int, epoch: int, position: int,
                      metrics: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint at the runner's step and report it (with
    `metrics`) to Ray Train, which keeps the latest ones in the run folder."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="bertflow-ckpt-") as tmp:
        save_checkpoint(Path(tmp), task=task, raw_model=model, runner=runner, rank=rank,
                        epoch=epoch, batches_in_epoch=position, attempt=attempt)
        ray.train.report({**metrics, "step": runner.step, "start_step": start_step,
                          "attempt": attempt},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{runner.step:08d}")


def train_summary(window: MetricWindow, world: int, n_params: int,
                  device: torch.device) -> dict[str, float]:
    """The window's metrics named as logged: `train_*`, the throughputs, and MFU on GPUs."""
    summary = {k if k in ("tokens_per_s", "samples_per_s") else f"train_{k}": v
               for k, v in window.summary(world).items()}
    if (util := mfu(summary["tokens_per_s"], n_params, device, world)) is not None:
        summary["mfu"] = util
    return summary


class RunLogger:
    """Logs metrics into the MLflow run the driver created; a no-op without one (every rank
    but 0 gets none)."""

    def __init__(self, tracking: RunTracking | None) -> None:
        self.active = tracking is not None
        if tracking is not None:
            import mlflow

            mlflow.set_tracking_uri(tracking.tracking_uri)
            mlflow.start_run(run_id=tracking.run_id,
                             log_system_metrics=tracking.log_system_metrics)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.active and metrics:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        if self.active:
            import mlflow

            mlflow.end_run()


def _every(step: int, interval: int) -> bool:
    return bool(interval) and step % interval == 0


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _record_pid(pid_dir: Path, rank: int) -> None:
    """Which processes train this run (for operators, and the test that kills one)."""
    with contextlib.suppress(OSError):  # the run folder may be remote storage
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
