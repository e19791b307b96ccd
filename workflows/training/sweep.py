"""Hyperparameter sweeps of fine-tuning on Ray Tune: the BERT paper's grid (or any space
over `FinetuneConfig` fields), each trial one fine-tuning run of the one training loop.

    run_sweep(SweepConfig) -> SweepResult

1. Prepare the data once (`finetune.prepare_finetune`: base model, tokenized datasets).
2. Expand the space into points (grid: all of them; random: `num_samples` drawn with the
   sweep's seed), times `restarts` seeds; optuna asks Optuna for each point instead.
3. Tune runs each (point, seed) as a function trial that calls `run_training` with one
   worker and a fraction of a CPU; the engine's `TuneReportCallback` hands each epoch's
   eval metrics to Tune, so ASHA can stop a trial that trails the others at an epoch.
   Each trial is an MLflow child run (`mlflow.parentRunId`) of the sweep's parent run,
   with its params and per-epoch metrics; rank 0 opens it and logs into it (the trial's
   actor, which only waits on its Train run, never imports MLflow).
4. Rank the points by the mean of the metric over their restarts (only points whose
   trials all ran to their end can win), log the trials table to the parent run, log the
   winning trial's model (no other model is logged) and register it with the sweep's run
   id in its lineage.

Resuming: the Tune experiment lives in `<storage_path>/<sweep name>` and each trial's Ray
Train run in `<storage_path>/<sweep name>/trials/<sweep name>-<trial id>`; rerunning the
same sweep name restores the experiment (`Tuner.restore(..., resume_unfinished=True)`),
and an unfinished trial continues from its last epoch checkpoint.

Stopped trials give their CPUs back: when Tune stops a trial (ASHA), it kills the trial's
actor, and with it the Ray Train controller, whose worker placement group then outlives it
(Ray removes a placement group by itself only once its creator's job has ended too). Ray
Train's own detached `PlacementGroupCleaner` is meant to notice, but it asks the Ray state
API (the dashboard's HTTP server) with an address found by scanning the machine's
processes: on a Ray started without the dashboard (bertflow's local Ray) it can never
answer, and with several Ray instances on one machine the scan fails with "Found multiple
active Ray instances" and the cleaner's thread dies. Either way the next trials wait for
CPUs that never come back. So each trial reports its worker group's placement group to
Tune with its metrics, and the sweep removes it when the trial ends.

The trial seed sets initialisation, dropout and masking; the order of the training rows
is the sweep's own `seed` for every trial (the data are tokenized and shuffled once).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError, ConfigError, read_mapping
from workflows.config import FinetuneConfig, LoopSettings, SweepConfig, config_from_mapping, flat_dict

log = logging.getLogger(__name__)

# The BERT paper (Devlin et al. 2019, appendix A.3): the fine-tuning grid of GLUE tasks.
PAPER_GRID: dict[str, list[Any]] = {"batch_size": [16, 32], "lr": [5e-5, 3e-5, 2e-5],
                                    "epochs": [2, 3, 4]}
DISTRIBUTIONS = ("loguniform", "uniform", "randint")

# Fields a space may not vary: they fix the data, the tracking or the trial's resources.
FIXED_FIELDS = frozenset({
    "task", "base", "train", "eval", "labels", "max_seq_len", "doc_stride", "max_query_len",
    "data_dir", "address", "run_name", "num_workers", "use_gpu", "cpus_per_worker",
    "storage_path", "tracking_uri", "experiment", "register_as", "log_system_metrics",
    "max_failures"})
SWEEP_ONLY = frozenset(f.name for f in dataclasses.fields(SweepConfig)) - frozenset(
    f.name for f in dataclasses.fields(FinetuneConfig))

# A trial's own actor only waits on its Ray Train run: it reserves no CPU (the CPUs go to
# the Train worker and Ray Data), only a token of memory, as Tune refuses an empty request.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the child runs
TAG_TRIAL = "bertflow.sweep_trial"
TAG_WINNER = "bertflow.sweep_winner_run_id"  # set on the parent once the winner is logged
PLACEMENT_GROUP_KEY = "train_placement_group"  # reported to Tune: the trial's workers' group


class SweepError(BertflowError):
    """A sweep cannot start or end; the message says what to change."""


# ---------------------------------------------------------------- the search space


def tunable_fields() -> list[str]:
    """The fine-tune fields a sweep may vary (flat names: lr, batch_size, epochs, seed...)."""
    probe = FinetuneConfig(base="-", train="-")
    return sorted(set(flat_dict(probe)) - FIXED_FIELDS)


def load_space(grid: str) -> dict[str, Any]:
    """`paper` or a YAML file: field -> list of values or {DIST: [LOW, HIGH]}."""
    if grid == "paper":
        return {k: list(v) for k, v in PAPER_GRID.items()}
    path = Path(grid)
    if not path.is_file():
        raise ConfigError(f"--grid {grid!r}: not 'paper' and no such YAML file")
    data = read_mapping(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{grid}: give a mapping of fine-tune fields to value lists, "
                          f"e.g. 'lr: [5e-5, 3e-5]'")
    return data


def check_space(space: dict[str, Any], cfg: SweepConfig, source: str) -> dict[str, Any]:
    """The space with every key a tunable field and every value a non-empty list or one
    distribution; each listed value is checked by building a trial config with it."""
    valid = tunable_fields()
    unknown = sorted(k for k in space if k not in valid)
    if unknown:
        fixed = [k for k in unknown if k in FIXED_FIELDS]
        why = (f" ({', '.join(fixed)} fix the data, tracking or resources of every trial: "
               f"set them as options of the sweep)" if fixed else "")
        raise ConfigError(f"{source}: cannot sweep {', '.join(map(repr, unknown))}{why}. "
                          f"Fields a sweep may vary: {', '.join(valid)}")
    if "seed" in space and cfg.restarts > 1:
        raise ConfigError(f"{source}: 'seed' is in the space and --restarts is "
                          f"{cfg.restarts}; use one or the other")
    out: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
                raise ConfigError(f"{source}: {key}: a distribution is one of "
                                  f"{', '.join(DISTRIBUTIONS)} with [LOW, HIGH], e.g. "
                                  f"{{loguniform: [1e-5, 1e-4]}}")
            (dist, bounds), = value.items()
            bounds = [_number(b) for b in bounds] if isinstance(bounds, list) else bounds
            if (not isinstance(bounds, list) or len(bounds) != 2
                    or not all(isinstance(b, (int, float)) for b in bounds)
                    or not bounds[0] < bounds[1] or (dist == "loguniform" and bounds[0] <= 0)):
                raise ConfigError(f"{source}: {key}: {dist} needs [LOW, HIGH] numbers with "
                                  f"LOW < HIGH (and LOW > 0 for loguniform)")
            if cfg.search == "grid":
                raise ConfigError(f"{source}: {key}: a distribution cannot be a grid; use "
                                  f"--search random or optuna, or list the values")
            trial_config(cfg, {key: bounds[0]})
            trial_config(cfg, {key: bounds[1] if dist != "randint" else bounds[1] - 1})
            out[key] = {dist: list(bounds)}
            continue
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ConfigError(f"{source}: {key}: give at least one value")
        typed = []
        for v in values:
            try:  # the field's own type: YAML reads 5e-5 (no dot) as a string
                typed.append(flat_dict(trial_config(cfg, {key: v}))[key])
            except ConfigError as exc:
                raise ConfigError(f"{source}: {key}={v!r}: {exc}") from None
        out[key] = typed
    return out


def _number(value: Any) -> Any:
    """A numeric string as a float (YAML 1.1 reads 1e-5, without a dot, as a string)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def expand_points(space: dict[str, Any], search: str, num_samples: int,
                  seed: int) -> list[dict[str, Any]]:
    """The points to try: every combination (grid) or `num_samples` draws (random; lists
    are drawn uniformly, distributions as named, with generator `seed`)."""
    import numpy as np

    if search == "grid":
        keys = list(space)
        return [dict(zip(keys, combo)) for combo in itertools.product(*space.values())]
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(num_samples):
        point = {}
        for key, value in space.items():
            if isinstance(value, list):
                point[key] = value[int(rng.integers(len(value)))]
                continue
            (dist, (low, high)), = value.items()
            if dist == "loguniform":
                point[key] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
            elif dist == "uniform":
                point[key] = float(rng.uniform(low, high))
            else:
                point[key] = int(rng.integers(low, high))
        points.append(point)
    return points


def trial_config(cfg: SweepConfig, params: dict[str, Any], seed: int | None = None,
                 run_name: str | None = None) -> FinetuneConfig:
    """The fine-tune config of one trial: the sweep's settings with `params` (and `seed`)."""
    data = {k: v for k, v in flat_dict(cfg).items() if k not in SWEEP_ONLY}
    data.update(params)
    data.update(register_as=None, run_name=run_name)
    if seed is not None:
        data["seed"] = seed
    return config_from_mapping(FinetuneConfig, data, "sweep trial")


def _optuna_space(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, value in space.items():
        if isinstance(value, list):
            out[key] = tune.choice(value)
        else:
            (dist, (low, high)), = value.items()
            out[key] = getattr(tune, dist)(low, high)
    return out


# ---------------------------------------------------------------- trials


@dataclass
class SweepPlan:
    """What every trial needs (shipped once to the object store by tune.with_parameters)."""

    cfg: SweepConfig
    name: str
    prep: Any                      # finetune.PreparedFinetune
    parent_run_id: str
    trials_dir: str                # Ray Train run folders of the trials
    cpus_per_worker: float

    def trial_loop(self, cfg: FinetuneConfig) -> tuple[LoopSettings, int]:
        """The trial's loop settings (epochs as steps, its CPUs, its folder)."""
        from workflows.training.finetune import loop_for_epochs

        loop, steps_per_epoch = loop_for_epochs(cfg, self.prep.train_rows)
        return dataclasses.replace(loop, storage_path=self.trials_dir,
                                   cpus_per_worker=self.cpus_per_worker), steps_per_epoch


def trial_params(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(point, seed) of a Tune trial config (grid/random nest the point, optuna does not)."""
    point = config["point"] if "point" in config else {k: v for k, v in config.items()
                                                       if k != "seed"}
    return dict(point), int(config["seed"])


def train_trial(plan: SweepPlan, point: dict[str, Any], seed: int, run_name: str,
                callbacks: list[Any] | None = None) -> Any:
    """One trial: a fine-tuning run of `point` with `seed` as an MLflow child run of the
    sweep; returns the engine's TrainResult (an earlier attempt's if it had finished)."""
    from workflows import tracking as T
    from workflows.training.engine import RunTracking, finished_run, run_training
    from workflows.training.finetune import run_params

    cfg = trial_config(plan.cfg, point, seed, run_name)
    loop, steps_per_epoch = plan.trial_loop(cfg)
    if (done := finished_run(loop, run_name)) is not None:  # the driver died after it ended
        return done
    prep = plan.prep
    # Rank 0 opens the child run (see RunTracking): the trial's actor stays free of MLflow.
    opening = dict(
        experiment=cfg.tracking.experiment, run_name=run_name, inputs=prep.inputs(),
        tags={**prep.run_tags(cfg.task), TAG_PARENT_RUN: plan.parent_run_id,
              T.TAG_SWEEP_RUN: plan.parent_run_id, T.TAG_SWEEP_NAME: plan.name,
              TAG_TRIAL: run_name},
        params={**run_params(cfg, prep, loop, steps_per_epoch),
                **{f"sweep.{k}": v for k, v in point.items()}, "sweep.seed": seed})
    return run_training(prep.task_for(cfg), loop, datasets=prep.ray_datasets(cfg.address),
                        run_name=run_name, callbacks=callbacks,
                        tracking=RunTracking(prep.uri, None, False, opening=opening))


def sweep_trainable(config: dict[str, Any], plan: SweepPlan) -> None:
    """The Tune function trainable: one trial, its epochs reported to Tune by the engine."""
    from ray import tune

    point, seed = trial_params(config)
    run_name = f"{plan.name}-{tune.get_context().get_trial_id()}"
    train_trial(plan, point, seed, run_name, callbacks=trial_callbacks())


_REPORT_QUEUE: list[Any] = []  # this trial actor's queue actor, once it has one


def _share_report_queue() -> None:
    """Give this trial the report queue of the actor's earlier trials.

    Tune's report callback hands metrics from the Train controller to the trial through a
    queue actor, and each trial's session makes a new one: a Python process started (and
    importing Ray) just as the trial's Train controller and worker start on the same CPUs.
    A reused trial actor (see `reuse_trial_actors`) keeps its first queue instead; it is
    empty between trials, as Tune takes a trial's last report before the trial ends."""
    from ray.train._internal.session import get_session

    session = get_session()
    if _REPORT_QUEUE:
        session._inter_actor_queue = _REPORT_QUEUE[0]
    else:
        _REPORT_QUEUE.append(session._get_or_create_inter_actor_queue())


def trial_callbacks() -> list[Any]:
    """The Ray Train callbacks of a trial (made in its Tune session): Tune's report
    callback, which hands each epoch's metrics to Tune, with the id of the worker group's
    placement group added (`PLACEMENT_GROUP_KEY`, see the module doc), and the worker-group
    hook that records that id in the Train controller."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        placement_group: str | None = None

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            if self.placement_group and metrics:
                metrics = [{**metrics[0], PLACEMENT_GROUP_KEY: self.placement_group},
                           *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    class RecordPlacementGroup(WorkerGroupCallback):
        # An internal Train hook (the one Ray's own cleaner uses); Ray Train runs the
        # non-user callbacks of RunConfig.callbacks as such. Both objects are pickled
        # together to the controller, so `report` is the controller's ReportToTune.
        def __init__(self, report: ReportToTune) -> None:
            self.report = report

        def after_worker_group_start(self, worker_group: Any) -> None:
            handle = worker_group.get_worker_group_state().placement_group_handle
            self.report.placement_group = handle.placement_group.id.hex()

    _share_report_queue()  # before ReportToTune() takes the session's queue
    report = ReportToTune()
    return [report, RecordPlacementGroup(report)]


def release_placement_group(result: dict[str, Any] | None) -> bool:
    """Remove the trial's worker placement group named in its last `result` if it still
    holds resources (its Train controller was killed with the trial); True if removed."""
    from ray import PlacementGroupID
    from ray.util.placement_group import (PlacementGroup, placement_group_table,
                                          remove_placement_group)

    pg_id = (result or {}).get(PLACEMENT_GROUP_KEY)
    if not pg_id:
        return False
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
    if placement_group_table(group).get("state", "REMOVED") == "REMOVED":
        return False  # the Train run ended and removed it itself
    remove_placement_group(group)
    log.info("released the placement group %s of a stopped trial", pg_id)
    return True


def _tune_callback_class() -> type:
    """A Tune callback printing one line per finished trial and releasing a stopped
    trial's worker placement group (built lazily: imports ray)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self, metric: str, cfg: SweepConfig, train_rows: int) -> None:
            self.metric, self.cfg, self.train_rows = metric, cfg, train_rows

        def _line(self, trial: Any, how: str) -> None:
            from workflows.training.finetune import loop_for_epochs

            r = trial.last_result or {}
            point, seed = trial_params(trial.config)
            planned = loop_for_epochs(trial_config(self.cfg, point, seed), self.train_rows)[0]
            if how == "ended" and r.get("step", 0) < planned.max_steps:
                how = "stopped"
            value = r.get(self.metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            print(f"trial {trial.trial_id} {how:<8} {_point_text(point)} seed={seed}  "
                  f"{self.metric}={shown}  epochs={r.get('training_iteration', 0)}  "
                  f"{r.get('time_total_s', 0.0):.0f}s", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release_placement_group(trial.last_result)
            self._line(trial, "ended")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release_placement_group(trial.last_result)
            self._line(trial, "FAILED")

    return TrialLines


def _point_text(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(point.items()))


# ---------------------------------------------------------------- ranking


@dataclass
class TrialRecord:
    """One trial as the sweep ends: its point, seed, status and final metric."""

    trial_id: str
    run_name: str
    point: dict[str, Any]
    seed: int
    status: str                    # done | stopped (by ASHA) | failed
    value: float | None            # the metric at its last reported epoch
    epochs: int                    # epochs reported to Tune
    time_s: float
    run_id: str | None = None      # its MLflow child run
    model_dir: Path | str | None = None  # done trials: the final model folder (or URI)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PointSummary:
    """A point's restarts: mean and std of the metric, and whether all ran to their end."""

    point: dict[str, Any]
    trials: list[TrialRecord]
    mean: float | None
    std: float | None
    complete: bool

    @property
    def time_s(self) -> float:
        return sum(t.time_s for t in self.trials)


def rank_points(trials: list[TrialRecord], mode: str) -> list[PointSummary]:
    """Points best first by the mean of their trials' metric: complete points (every
    restart ran to its end) before the others, then by mean (`mode` max or min)."""
    groups: dict[str, list[TrialRecord]] = {}
    for t in trials:
        groups.setdefault(repr(sorted(t.point.items())), []).append(t)
    out = []
    for members in groups.values():
        values = [t.value for t in members if t.value is not None]
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        out.append(PointSummary(members[0].point, sorted(members, key=lambda t: t.seed),
                                mean, std, all(t.status == "done" for t in members)))
    sign = -1 if mode == "max" else 1
    return sorted(out, key=lambda p: (not p.complete, p.mean is None,
                                      sign * (p.mean if p.mean is not None else 0.0)))


def ranked_rows(ranking: list[PointSummary], metric: str) -> list[dict[str, Any]]:
    """The ranked table as rows (rank, params, metric mean +- std, runs, status, time)."""
    rows = []
    for i, p in enumerate(ranking, start=1):
        value = "-" if p.mean is None else (
            f"{p.mean:.4f} +- {p.std:.4f}" if len(p.trials) > 1 else f"{p.mean:.4f}")
        statuses = sorted({t.status for t in p.trials})
        rows.append({"rank": i, **{k: v for k, v in sorted(p.point.items())}, metric: value,
                     "runs": len(p.trials), "status": ",".join(statuses),
                     "time": f"{p.time_s:.0f}s"})
    return rows


@dataclass
class SweepResult:
    """What `run_sweep` returns."""

    name: str
    run_id: str                          # the parent MLflow run
    metric: str
    trials: list[TrialRecord]
    ranking: list[PointSummary]          # best first
    winner: TrialRecord                  # the best seed of the best point
    model_uri: str
    model_version: str | None
    experiment_path: str           # the Tune experiment folder: a local path or a URI
    resumed: bool = False

    @property
    def rows(self) -> list[dict[str, Any]]:
        return ranked_rows(self.ranking, self.metric)


# ---------------------------------------------------------------- the driver


def selection_metric(cfg: SweepConfig) -> str:
    """The `val_*` metric the sweep selects on."""
    from workflows.training.finetune_task import PRIMARY_METRIC

    name = cfg.metric or PRIMARY_METRIC[cfg.task]
    return name if name.startswith("val_") else f"val_{name}"


def _resources(cfg: SweepConfig) -> tuple[int, float]:
    """(trials at once, CPUs per Train worker) on the running cluster."""
    import ray

    res = ray.cluster_resources()
    workers = cfg.loop.num_workers
    if cfg.loop.use_gpu:
        at_once = cfg.max_concurrent or max(1, int(res.get("GPU", 0)) // workers)
        return at_once, cfg.loop.cpus_per_worker or 1.0
    cpus = float(res.get("CPU", 1))
    at_once = cfg.max_concurrent or max(1, int(cpus - 1) // workers)
    # One CPU stays free for Ray Data's tasks (as in run_training's default).
    free = cpus - 1
    share = free / (at_once * workers) if cpus > 1 else cpus / (at_once * workers + 1)
    return at_once, cfg.loop.cpus_per_worker or math.floor(max(0.1, min(1.0, share)) * 100) / 100


def run_sweep(config: SweepConfig) -> SweepResult:
    """Prepare, tune, rank, log and register; see the module doc."""
    from ray import tune

    from data_prep.ray_env import init_ray
    from workflows import tracking as T
    from workflows.training.engine import local_model_dir, run_location
    from workflows.training.finetune import prepare_finetune

    cfg = config
    space = check_space(load_space(cfg.grid), cfg, f"--grid {cfg.grid}")
    metric = selection_metric(cfg)
    name = cfg.run_name or f"sweep-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_path = run_location(cfg.loop, name).uri  # a local folder or a URI (--storage-path)
    prep = prepare_finetune(cfg)
    init_ray(cfg.address)
    at_once, cpus = _resources(cfg)
    resumed = tune.Tuner.can_restore(str(exp_path))
    # A parent run of this name without a winner is this sweep's, even when the driver died
    # before Tune saved its first state: reuse it rather than open a second parent.
    earlier = T.find_run(T.ensure_experiment(cfg.tracking.experiment, prep.uri), name, prep.uri)
    reuse = resumed or (earlier is not None and TAG_WINNER not in earlier.data.tags)
    parent = T.open_run(prep.uri, cfg.tracking.experiment, name, inputs=prep.inputs(),
                        resume=reuse, tags={**prep.run_tags(cfg.task), "bertflow.kind": "sweep"},
                        params={**flat_dict(cfg), "space": space, "metric": metric},
                        metrics={f"baseline_{k}": v for k, v in prep.baseline.items()})
    client = T.client(prep.uri)
    if (done := client.get_run(parent).data.tags.get(TAG_WINNER)):
        raise SweepError(f"sweep {name!r} already finished (winner run {done}); choose a "
                         f"new --run-name, or delete {exp_path} to run it again")
    plan = SweepPlan(cfg=cfg, name=name, prep=prep, parent_run_id=parent,
                     trials_dir=f"{exp_path}/trials", cpus_per_worker=cpus)
    trainable = tune.with_resources(tune.with_parameters(sweep_trainable, plan=plan),
                                    TRIAL_DRIVER_RESOURCES)
    if resumed:
        print(f"sweep {name}: resuming the unfinished trials in {exp_path}", flush=True)
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(cfg, space, metric, name, exp_path, trainable, at_once,
                           prep.train_rows)
    n_points = "optuna" if cfg.search == "optuna" else len(
        expand_points(space, cfg.search, cfg.num_samples, cfg.loop.seed))
    log.info("sweep %s: %s points x %d restarts, %d at once, %.2f CPU per trial worker",
             name, n_points, cfg.restarts, at_once, cpus)
    grid = tuner.fit()
    trials = _collect(grid, plan, metric, client)
    if trials and all(t.value is None for t in trials):
        seen = sorted({k for t in trials for k in t.metrics})
        raise SweepError(f"--metric {metric.removeprefix('val_')}: no trial reported it; "
                         f"{cfg.task} reports {', '.join(seen) or 'nothing (see the log)'}")
    ranking = rank_points(trials, cfg.mode)
    if not ranking or not ranking[0].complete:
        raise SweepError(f"sweep {name!r}: no point had all its trials run to the end "
                         f"(see the lines above); nothing to register")
    best = ranking[0]
    pick = max if cfg.mode == "max" else min
    winner = pick((t for t in best.trials if t.value is not None), key=lambda t: t.value)
    _log_parent(client, parent, trials, ranking, metric, winner)
    with local_model_dir(winner.model_dir) as winner_dir:  # downloaded from object storage
        model_uri, version = T.log_and_register(
            winner_dir, run_id=winner.run_id, uri=prep.uri, task=cfg.task,
            tags={**prep.model_tags(), T.TAG_SWEEP_RUN: parent, T.TAG_SWEEP_NAME: name},
            register_as=cfg.tracking.register_as,
            version_tags={T.TAG_DATASET_PATH: str(prep.train.path)},
            metrics={**winner.metrics, f"{metric}_mean": best.mean,
                     f"{metric}_std": best.std})
    client.set_tag(parent, TAG_WINNER, winner.run_id)
    return SweepResult(name=name, run_id=parent, metric=metric, trials=trials,
                       ranking=ranking, winner=winner, model_uri=model_uri,
                       model_version=version, experiment_path=exp_path, resumed=resumed)


def _new_tuner(cfg: SweepConfig, space: dict[str, Any], metric: str, name: str,
               exp_path: str, trainable: Any, at_once: int, train_rows: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    seeds = [cfg.loop.seed + i for i in range(cfg.restarts)]
    search_alg = None
    if cfg.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            raise SweepError("--search optuna needs Optuna: pip install optuna "
                             "(or use --search random)") from None
        param_space = {**_optuna_space(space), "seed": seeds[0]}
        search_alg = OptunaSearch(seed=cfg.loop.seed)
        num_samples = cfg.num_samples
    else:
        points = expand_points(space, cfg.search, cfg.num_samples, cfg.loop.seed)
        param_space = {"point": tune.grid_search(points), "seed": tune.grid_search(seeds)}
        num_samples = 1
    if cfg.scheduler == "asha":
        if cfg.search != "optuna":
            max_epochs = max(trial_config(cfg, p).epochs for p in points)
        else:
            max_epochs = max(_bounds(space["epochs"])) if "epochs" in space else cfg.epochs
        scheduler = ASHAScheduler(time_attr="training_iteration",
                                  max_t=max(1, math.ceil(max_epochs)),
                                  grace_period=cfg.grace_period,
                                  reduction_factor=cfg.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=cfg.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=at_once,
                                    reuse_actors=reuse_trial_actors(cfg)),
        run_config=tune.RunConfig(name=name, storage_path=exp_path.rsplit("/", 1)[0], verbose=0,
                                  callbacks=[_tune_callback_class()(metric, cfg, train_rows)]))


def reuse_trial_actors(cfg: SweepConfig) -> bool:
    """Whether a finished trial's actor runs the next trial (Tune's `reuse_actors`).

    A trial actor spends seconds importing torch, MLflow and bertflow before its Ray Train
    run starts; reused, only the first trial pays that. Tune reuses an actor once the
    trial's function has returned, which is always so without a scheduler. ASHA stops a
    trial in the middle of its Ray Train run: the function's thread cannot be interrupted,
    Tune's reset would fail and the next trial would error, so an ASHA sweep gives each
    trial a fresh actor (and the stopped one is killed, with its Train run)."""
    return cfg.scheduler != "asha"


def _bounds(value: Any) -> list[float]:
    return value if isinstance(value, list) else next(iter(value.values()))


def _collect(grid: Any, plan: SweepPlan, metric: str, client: Any) -> list[TrialRecord]:
    """A TrialRecord per trial; MLflow runs of stopped trials end KILLED, failed FAILED.

    A trial is done when its last report is the final step: ASHA "stops" a trial at its
    last epoch too (before `run_training` returns), so the final checkpoint that Tune
    was told about (`checkpoint_path`) holds the model.
    """
    from workflows import tracking as T
    from workflows.training.engine import finished_run

    experiment_id = T.ensure_experiment(plan.cfg.tracking.experiment, plan.prep.uri)
    trials = []
    for result in grid:
        r = dict(result.metrics or {})
        trial_id = r.get("trial_id") or Path(result.path).name
        point, seed = trial_params(result.config)
        run_name = f"{plan.name}-{trial_id}"
        loop, _ = plan.trial_loop(trial_config(plan.cfg, point, seed, run_name))
        model_dir = None
        if (done := finished_run(loop, run_name)) is not None:
            r.update(done.metrics)
            model_dir = done.model_dir
        elif r.get("step", 0) >= loop.max_steps and r.get("checkpoint_path"):
            ckpt = checkpoint_uri(str(r["checkpoint_path"]), plan.trials_dir)
            model_dir = f"{ckpt}/model" if "://" in ckpt else Path(ckpt) / "model"
        status = "done" if model_dir is not None else ("failed" if result.error else "stopped")
        run = T.find_run(experiment_id, run_name, plan.prep.uri)
        if run is not None and run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run.info.run_id, {"done": "FINISHED", "stopped": "KILLED",
                                                    "failed": "FAILED"}[status])
        value = r.get(metric)
        trials.append(TrialRecord(
            trial_id=trial_id, run_name=run_name, point=point, seed=seed, status=status,
            value=None if value is None else float(value),
            epochs=int(r.get("training_iteration", 0)), time_s=float(r.get("time_total_s", 0.0)),
            run_id=run.info.run_id if run is not None else None, model_dir=model_dir,
            metrics={k: float(v) for k, v in r.items()
                     if k.startswith("val_") and isinstance(v, (int, float))}))
    return sorted(trials, key=lambda t: t.trial_id)


def checkpoint_uri(path: str, trials_dir: str) -> str:
    """The URI of a checkpoint Tune reported: Ray gives its path on the storage filesystem,
    without the scheme (`bucket/key` for `s3://bucket/key`); the trials' folder has it."""
    if "://" in path or "://" not in trials_dir:
        return path
    return f"{trials_dir.split('://', 1)[0]}://{path.lstrip('/')}"


def _log_parent(client: Any, parent: str, trials: list[TrialRecord],
                ranking: list[PointSummary], metric: str, winner: TrialRecord) -> None:
    """The parent run: every trial as a table, the ranking, the winner and its score."""
    import json

    table = {"trial_id": [], "run_id": [], "seed": [], "status": [], metric: [],
             "epochs": [], "time_s": []}
    keys = sorted({k for t in trials for k in t.point})
    for k in keys:
        table[k] = []
    for t in trials:
        for col, v in (("trial_id", t.trial_id), ("run_id", t.run_id), ("seed", t.seed),
                       ("status", t.status), (metric, t.value), ("epochs", t.epochs),
                       ("time_s", round(t.time_s, 1))):
            table[col].append(v)
        for k in keys:
            table[k].append(t.point.get(k))
    client.log_text(parent, json.dumps(table, indent=1, default=str), "sweep/trials.json")
    rows = ranked_rows(ranking, metric)
    client.log_text(parent, json.dumps(rows, indent=1, default=str), "sweep/ranking.json")
    best = ranking[0]
    client.log_metric(parent, f"best_{metric}_mean", best.mean)
    client.log_metric(parent, f"best_{metric}_std", best.std or 0.0)
    client.log_metric(parent, "trials", len(trials))
    client.log_metric(parent, "trials_stopped", sum(t.status == "stopped" for t in trials))
    client.set_tag(parent, "bertflow.sweep_winner_params", json.dumps(best.point, default=str))
