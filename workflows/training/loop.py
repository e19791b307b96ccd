"""The worker side of the training loop: what each Ray Train worker runs, top to bottom.

    worker_loop          restore, then one flat loop over micro-batches
    train_batches        the batch stream: epochs, per-batch masking seeds, resume skipping
    evaluate             validation metrics, sharded over every worker when the task can
    report_checkpoint    write this rank's part of a checkpoint and hand it to Ray Train
    RunLogger            rank 0's MLflow logging, through an outbox that never blocks the
                         step (workflows.tracking_outbox); a no-op on every other rank

Data: a task with a `train_location` (pretraining) has each worker read the train split's
Parquet parts itself (`training/rows.py`), and so does a task with a `train_table`
(fine-tuning: the tokenized rows in Ray's object store, finetune_task.TrainRows): an
order reseeded every epoch, batch k of an epoch at a position computed from the parts'
row counts, so a resume seeks there and reads nothing before it. Otherwise the `train`
dataset is split across workers
(`get_dataset_shard`) by Ray Data, made deterministic with `preserve_order` (the same
order every epoch; a resume re-reads the consumed batches). Either way the data are never
loaded on the driver. Batches are collated by
`data_prep.collate.iter_collated` (threads collate ahead): batch i of an epoch on rank r
draws its dynamic masks from `batch_rng(seed, epoch, i, r)`, so masks do not depend on
thread scheduling, a rerun draws the same masks and a resume draws the masks the lost
attempt would have drawn. Across worker counts the rows of a batch differ, so the masks do;
a batch holding the same rows at the same (epoch, index, rank) gets the same masks.

Evaluation: `val` is not split. A task's own `val_rows` (pretraining: the val split's
parts, read in file order by training/rows.py's SplitRows; fine-tuning: the eval rows in
the object store) is read by each worker that evaluates, with no Ray Data pass per
evaluation; a `val` dataset handed to run_training is read through Ray Data. A task with `eval_sums`/`eval_metrics` (pretraining) or
`eval_share`/`eval_combine` (fine-tuning) is evaluated on every worker: the first
`eval_batches` batches of `val` (all for 0) are dealt round-robin (batch i to rank
i % world), each batch masked by `batch_rng(seed, EVAL_EPOCH, i)` whatever rank takes it;
sums are all-reduced (the metrics equal a one-worker evaluation up to float summation
order), shares (predictions, counts) gathered to every rank and combined (equal to a
one-worker evaluation). Other tasks evaluate on rank 0 alone.

Logged once per run: `global_batch_size` (batch x workers x accumulation) as a param; at
each log, `tokens_seen` (non-padding tokens trained on by all workers, kept in checkpoints).

Resume repeats the work done after the checkpoint (the steps between the checkpoint and
the failure are trained again and logged again at the same steps, which the outbox does
not send where the tracker already holds them), then continues from the checkpoint's
position (epoch, micro-batches consumed in it).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_prep.collate import batch_rng, iter_collated
from workflows.config import LoopSettings
from workflows.training.async_checkpoint import (CheckpointSchedule, report_to_ray,
                                                 snapshot_checkpoint)
from workflows.training.checkpoint import check_resume, restore
from workflows.run_folder import RunFolder
from workflows.training.contracts import (PLACEMENT_GROUP_KEY, RunTracking, TrainingError,
                                          TrainTask)
from workflows.training.rows import ORDER_VERSION, BatchPlan, RankReader, list_parts, rank_streams
from workflows.training.step import (MetricWindow, StepRunner, compile_model, count_tokens,
                                     host_values, mfu, to_device)

Batch = dict[str, torch.Tensor]
EVAL_EPOCH = 1_000_003  # the `epoch` of validation masks, apart from any training epoch


def worker_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by TorchTrainer."""
    import ray.train
    import ray.train.torch

    task: TrainTask = config["task"]
    loop: LoopSettings = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _record_pid(config["run"], rank)

    torch.manual_seed(loop.seed)
    plan = batch_plan(task, loop)  # None: the rows come from Ray Data's `train` shard
    start = restore(ray.train.get_checkpoint(), task, rank, loop.seed)
    check_resume(start.data, data_order(loop, plan is not None, world),
                 f"the checkpoint resumed by worker {rank}")
    model = ray.train.torch.prepare_model(start.model)
    raw_model = getattr(model, "module", model)
    if loop.compile:
        compile_model(raw_model, device)
    accum, divisor = rank_accumulation(loop, plan, rank, world)
    runner = StepRunner(model, loop, device, raw_model=raw_model, accum=accum,
                        loss_divisor=divisor, world=world)
    if start.trainer_state is not None:
        runner.load_state_dict(start.trainer_state)
    start_step, attempt = runner.step, start.attempt
    n_params = sum(p.numel() for p in raw_model.parameters())
    logger = RunLogger(config["tracking"] if rank == 0 else None, config["run"])
    logger.log({"attempt": attempt, "workers": world}, start_step)
    logger.log_params({"global_batch_size": loop.global_batch})
    sharded_eval = shards_evaluation(task)
    val = _val_source(task, config["splits"]) if rank == 0 or sharded_eval else None
    report = dict(task=task, model=raw_model, runner=runner, rank=rank, attempt=attempt,
                  start_step=start_step, data=data_order(loop, plan is not None, world))
    evaluate_now = functools.partial(evaluate, task, raw_model, val, loop, runner, device,
                                     rank, world)

    last_eval: dict[str, float] = {}
    if runner.step == 0 and val is not None:  # where validation starts: the curve shows the drop
        last_eval = evaluate_now()
        logger.log(last_eval, 0)
    saved_at = start_step if start.resumed else -1
    schedule = CheckpointSchedule(loop, device)
    epoch, window, new_tokens = start.epoch, MetricWindow(), 0
    shard = ray.train.get_dataset_shard("train") if "train" in config["splits"] else None
    batches = train_batches(shard, task, loop, rank, world, start.epoch, start.skip, device,
                            plan=plan)
    raw_model.train()
    cycle: list[tuple[int, int, Batch]] = []  # this rank's micro-batches of the step
    while runner.step < loop.max_steps:
        if not cycle:  # a step's token count (token-weighted losses) before its first one
            cycle = [next(batches) for _ in range(runner.accum)]
            runner.begin_cycle(task, [b for _, _, b in cycle])
        epoch, position, batch = cycle.pop(0)
        loss, metrics = runner.forward_backward(task, batch)
        tokens, samples = count_tokens(batch)
        window.add(loss, metrics, tokens, samples)
        new_tokens += tokens
        if not runner.cycle_done:
            continue
        step_info = runner.optimizer_step()
        step, final = runner.step, runner.step >= loop.max_steps
        log_now = step % loop.log_every == 0 or final
        checkpoint_now = schedule.due(step, final=final, log_now=log_now)
        if log_now or checkpoint_now:  # the same steps on every rank: a collective is safe
            runner.check_finite(step)  # host reads at these steps only; no diverged checkpoint
            runner.tokens_seen += int(all_reduce_sums({"t": new_tokens}, device)["t"])
            new_tokens = 0
        if log_now:
            logger.log({**train_summary(window, world, n_params, device),
                        **host_values(step_info), "tokens_seen": runner.tokens_seen}, step)
            window.reset()
        if _every(step, loop.eval_every) or final:
            last_eval = evaluate_now()
            logger.log(last_eval, step)
        if checkpoint_now:
            logger.checkpoint()
            report_checkpoint(**report, epoch=epoch, position=position, metrics=last_eval)
            saved_at = step
    if saved_at != runner.step:  # resumed at max_steps: report the final state again
        report_checkpoint(**report, epoch=epoch, position=0, metrics=last_eval)
    logger.close()


def batch_plan(task: TrainTask, loop: LoopSettings) -> BatchPlan | None:
    """The canonical micro-batch order of a task that reads its own train rows
    (`reads_own_rows`): the Parquet parts at its `train_location` (with `train_files`
    from the manifest when it has them), or its `train_table`'s `parts()` (read with
    `train_table.read`); else None."""
    location = getattr(task, "train_location", None)
    table = getattr(task, "train_table", None)
    if location:
        parts = list_parts(location, getattr(task, "train_files", None), prefix="train/")
    elif table is not None:
        parts = table.parts()
    else:
        return None
    return BatchPlan(tuple(parts), loop.batch_size, loop.micro_batches_per_step, loop.seed)


def _val_source(task: TrainTask, splits: list[str]) -> Any:
    """What `evaluate` iterates: the task's own `val_rows` (pretraining's SplitRows,
    fine-tuning's rows in the object store), read by this worker without a Ray Data pass
    per evaluation; else the `val` dataset handed to run_training; else None."""
    own = getattr(task, "val_rows", None)
    if own is not None:
        return own
    if "val" not in splits:
        return None
    import ray.train

    return ray.train.get_dataset_shard("val")


def reads_own_rows(task: TrainTask) -> bool:
    """Whether the task's workers read their train rows in the canonical order
    (`batch_plan`) rather than from Ray Data's `train` shards."""
    return bool(getattr(task, "train_location", None)) or \
        getattr(task, "train_table", None) is not None


def shards_evaluation(task: TrainTask) -> bool:
    """Whether every rank evaluates a share of `val` (see `evaluate`)."""
    return hasattr(task, "eval_sums") or hasattr(task, "eval_share")


def data_order(loop: LoopSettings, canonical: bool, world: int) -> dict[str, Any]:
    """What a checkpoint's data position is relative to. A canonical order depends on the
    global batch, the micro-batch and the seed only (any worker count may resume it);
    Ray Data's shards also on the workers and their accumulation."""
    if canonical:
        return {"canonical": True, "order": ORDER_VERSION, "global_batch": loop.global_batch,
                "micro_batch": loop.batch_size, "seed": loop.seed}
    return {"canonical": False, "workers": world, "batch_size": loop.batch_size,
            "grad_accum": loop.micro_batches_per_step // world, "seed": loop.seed}


def rank_accumulation(loop: LoopSettings, plan: BatchPlan | None, rank: int,
                      world: int) -> tuple[int, float]:
    """(micro-batches this rank accumulates per step, what each loss is divided by)."""
    if plan is None:
        accum = loop.micro_batches_per_step // world
        return accum, float(accum)
    if world > plan.streams:
        raise TrainingError(
            f"{world} workers for a global batch of {plan.streams} micro-batches: every "
            f"worker needs at least one; raise --global-batch-size (or --grad-accum) or use "
            f"at most {plan.streams} workers")
    return len(rank_streams(plan.streams, rank, world)), plan.streams / world


def train_batches(shard: Any, task: TrainTask, loop: LoopSettings, rank: int, world: int,
                  epoch: int, skip: int, device: torch.device, plan: BatchPlan | None = None
                  ) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, data position after this micro-batch, batch on `device`), epoch after epoch,
    from position `skip` of `epoch` (the checkpoint's).

    With a `plan` (training/rows.py) the position is the optimizer steps done in the
    epoch, the same on every rank: rank r trains its streams' micro-batch of each step,
    reads only their chunks (ahead, on a thread) and a resume opens nothing before the
    position; micro-batch (step k, stream s) is collated with `batch_rng(seed, epoch,
    k * streams + s)`, so its dynamic masks do not depend on the number of workers.
    Otherwise `shard` (Ray Data) is read in its fixed order, the position counts this
    rank's micro-batches, batch i is collated with `batch_rng(seed, epoch, i, rank)` and
    the `skip` batches are read but not collated.
    """
    if plan is not None:
        yield from _planned_batches(plan, task, loop, rank, world, epoch, skip, device)
        return
    while True:
        raw = shard.iter_batches(batch_size=loop.batch_size, batch_format="numpy",
                                 drop_last=True, prefetch_batches=2)
        seen = 0
        collated = iter_collated(raw, task.collate, loop.seed, epoch, rank, start=skip)
        for seen, batch in enumerate(collated, start=skip + 1):
            yield epoch, seen, _to_device(batch, device, task)
        if seen == 0 and skip == 0:
            raise TrainingError(
                f"the train split gave worker {rank} no batch in epoch {epoch}: it has "
                f"fewer rows than --num-workers x --batch-size ({world} x "
                f"{loop.batch_size}); use a smaller batch or more data")
        epoch, skip = epoch + 1, 0


def _planned_batches(plan: BatchPlan, task: TrainTask, loop: LoopSettings, rank: int,
                     world: int, epoch: int, skip: int, device: torch.device
                     ) -> Iterator[tuple[int, int, Batch]]:
    def collate(item: tuple[int, int, Any], _rng: Any) -> tuple[int, Batch]:
        step, stream, table = item  # the masks are the micro-batch's, not the rank's
        return step, task.collate(table, batch_rng(loop.seed, epoch, step * plan.streams + stream))

    read = getattr(getattr(task, "train_table", None), "read", None)  # None: from storage
    while True:
        with RankReader(plan, rank=rank, world=world, epoch=epoch, start_step=skip,
                        read=read) as reader:
            if reader.steps == 0:
                raise TrainingError(
                    f"the train split ({plan.rows} rows in {len(plan.parts)} parts) makes no "
                    f"optimizer step of {plan.streams} micro-batches of {plan.micro_batch} "
                    f"rows in epoch {epoch}: use a smaller --batch-size or "
                    f"--global-batch-size, or more data")
            for step, batch in iter_collated(reader.batches(), collate, loop.seed, epoch):
                yield epoch, step + 1, _to_device(batch, device, task)
        epoch, skip = epoch + 1, 0


def evaluate(task: TrainTask, model: nn.Module, val_shard: Any, loop: LoopSettings,
             runner: StepRunner, device: torch.device, rank: int = 0,
             world: int = 1) -> dict[str, float]:
    """`val_*` metrics on the first `eval_batches` batches of `val_shard` (all of it for 0),
    with the same masks every time; {} without a validation split.

    A task that `shards_evaluation` is evaluated by every rank on its share of the
    batches (batch i on rank i % world), so every rank must call this at the same steps:
    `eval_sums` are all-reduced, `eval_share(model, (index, batch) pairs)` is gathered
    from every rank and `eval_combine(shares)` gives the metrics; other tasks are
    evaluated on the whole of them (rank 0 alone)."""
    if val_shard is None:
        return {}
    sharded = shards_evaluation(task)
    raw = itertools.islice(val_shard.iter_batches(batch_size=loop.batch_size,
                                                  batch_format="numpy"),
                           loop.eval_batches or None)
    mine = ((i, _to_device(task.collate(b, batch_rng(loop.seed, EVAL_EPOCH, i)), device))
            for i, b in enumerate(raw) if not sharded or i % world == rank)
    model.eval()
    with torch.no_grad(), runner.autocast():
        if hasattr(task, "eval_share"):
            metrics = task.eval_combine(all_gather_objects(task.eval_share(model, mine)))
        elif sharded:
            sums = task.eval_sums(model, (b for _, b in mine))
            metrics = task.eval_metrics(all_reduce_sums(sums, device))
        else:
            metrics = task.evaluate(model, (b for _, b in mine))
    model.train()
    return {f"val_{k}": float(v) for k, v in metrics.items()}


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """`sums` added over every rank (float64; unchanged outside a process group). Every
    rank must pass the same keys."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(sums)
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_gather_objects(share: Any) -> list[Any]:
    """`share` of every rank, in rank order (picklable values; `[share]` outside a
    process group). Every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [share]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, share)
    return out


def report_checkpoint(*, task: TrainTask, model: nn.Module, runner: StepRunner, rank: int,
                      attempt: int, start_step: int, epoch: int, position: int,
                      metrics: dict[str, Any], data: dict[str, Any] | None = None) -> None:
    """Take this rank's part of a checkpoint at the runner's step and report it (with
    `metrics`) to Ray Train, which keeps the latest ones in the run folder; with
    `--checkpoint-upload async` (the default) it is written and uploaded while training
    goes on (training/async_checkpoint.py).

    The report names the worker group's placement group (`PLACEMENT_GROUP_KEY`): a sweep
    removes it when Tune stops the trial (see `training/sweep_trials.py`)."""
    import ray

    group = ray.get_runtime_context().get_placement_group_id()
    mode = runner.loop.checkpoint_upload
    snapshot = snapshot_checkpoint(task=task, raw_model=model, runner=runner, rank=rank,
                                   epoch=epoch, batches_in_epoch=position, attempt=attempt,
                                   data=data, copy_state=mode == "async")
    report_to_ray(snapshot, {**metrics, "step": runner.step, "start_step": start_step,
                             "attempt": attempt, **({PLACEMENT_GROUP_KEY: group} if group else {})},
                  name=f"checkpoint_{runner.step:08d}", mode=mode)


def train_summary(window: MetricWindow, world: int, n_params: int,
                  device: torch.device) -> dict[str, float]:
    """The window's metrics named as logged: `train_*`, the throughputs, and MFU on GPUs."""
    summary = {k if k in ("tokens_per_s", "samples_per_s") else f"train_{k}": v
               for k, v in window.summary(world).items()}
    if (util := mfu(summary["tokens_per_s"], n_params, device, world)) is not None:
        summary["mfu"] = util
    return summary


class RunLogger:
    """Rank 0's metrics and params, on their way to the run's MLflow run through an
    outbox (workflows.tracking_outbox): `log` returns at once, a thread sends, and while
    the tracker is unreachable what it has not taken is kept (beyond a bound, in the run
    folder's `tracker_outbox/`) and sent when it is back, so training neither waits for
    nor fails with the tracker. The run is opened by the sender thread when the driver
    did not open it (contracts.RunTracking). A no-op without tracking (every rank but 0)."""

    CLOSE_WAIT_S = 30.0  # at the end, for a tracker that answers; the driver waits longer

    def __init__(self, tracking: RunTracking | None, run: RunFolder | None = None) -> None:
        self.outbox = None
        self._monitor = None
        if tracking is not None:
            from workflows.run_folder import OUTBOX_DIR
            from workflows.tracking_outbox import MlflowTransport, Outbox

            transport = MlflowTransport(
                tracking.tracking_uri, tracking.run_id or tracking.resolve, reopen=True,
                on_run=self._start_system_metrics if tracking.log_system_metrics else None)
            self.outbox = Outbox(transport, run.join(OUTBOX_DIR) if run is not None else None)

    def _start_system_metrics(self, run_id: str) -> None:
        """MLflow's CPU/GPU/memory monitor (its own thread, started by the outbox's at
        first contact; it stops at its first failed request: a tracker outage ends it)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        uri = self.outbox.transport.tracking_uri
        try:
            self._monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=True)
            self._monitor.start()
        except Exception:  # best effort: never a reason to stop training
            self._monitor = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.outbox is not None and metrics:
            self.outbox.put_metrics(metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.put_params(params)

    def checkpoint(self) -> None:
        """At a checkpoint: what the tracker has not taken becomes durable (if it is down)."""
        if self.outbox is not None:
            self.outbox.checkpoint()

    def close(self) -> None:
        """Deliver what is queued (a short wait while the tracker answers; none while it is
        down: the rest stays in the run folder for the driver to send)."""
        if self.outbox is None:
            return
        delivered = self.outbox.close(0.0 if self.outbox.down else self.CLOSE_WAIT_S)
        if self._monitor is not None and delivered:
            with contextlib.suppress(Exception):
                self._monitor.finish()


def _every(step: int, interval: int) -> bool:
    return bool(interval) and step % interval == 0


def _to_device(batch: Batch, device: torch.device, task: TrainTask | None = None) -> Batch:
    """The batch on `device`, with its counts from the CPU copy (step.to_device)."""
    return to_device(batch, device, task)


def _record_pid(run: RunFolder, rank: int) -> None:
    """Which processes train this run (for operators, and the test that kills one); only
    in a local run folder (a pid means nothing on object storage)."""
    if not run.local:
        return
    pid_dir = Path(run.uri, "workers")
    with contextlib.suppress(OSError):
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
