"""Hyperparameter sweeps of fine-tuning on Ray Tune: the BERT paper's grid (or any space
over `FinetuneConfig` fields), each trial one fine-tuning run of the one training loop.

    run_sweep(SweepConfig) -> SweepResult

1. Prepare the data once (`finetune.prepare_finetune`: base model, tokenized datasets).
2. Expand the space into points (`sweep_space`: grid, all of them; random, `num_samples`
   drawn with the sweep's seed), times `restarts` seeds; optuna asks Optuna for each
   point instead.
3. Tune runs each (point, seed) as a function trial (`sweep_trials`): one fine-tuning run
   with one worker and a fraction of a CPU, an MLflow child run of the sweep's parent
   run, its epochs reported to Tune so ASHA can stop a trial that trails the others.
4. Rank the points by the mean of the metric over their restarts (`sweep_ranking`: only
   points whose trials all ran to their end can win), log the trials table to the parent
   run, log the winning trial's model (no other model is logged) and register it with the
   sweep's run id in its lineage.

Resuming: the Tune experiment lives in `<storage_path>/<sweep name>` and each trial's Ray
Train run in `<storage_path>/<sweep name>/trials/<sweep name>-<trial id>`; rerunning the
same sweep name restores the experiment (`Tuner.restore(..., resume_unfinished=True)`),
and an unfinished trial continues from its last epoch checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from workflows.config import SweepConfig, flat_dict
from workflows.training.sweep_ranking import PointSummary, TrialRecord, rank_points, ranked_rows
from workflows.training.sweep_space import (check_space, expand_points, load_space,
                                            optuna_space, trial_config)
from workflows.training.sweep_trials import (TRIAL_DRIVER_RESOURCES, SweepPlan,
                                             reuse_trial_actors, sweep_trainable,
                                             sweep_trial_text, trial_params,
                                             quiet_tune_console, tune_callback_class)

log = logging.getLogger(__name__)


class SweepError(BertflowError):
    """A sweep cannot start or end; the message says what to change."""


@dataclass
class SweepResult:
    """What `run_sweep` returns."""

    name: str
    run_id: str                          # the parent MLflow run
    metric: str
    trials: list[TrialRecord]
    ranking: list[PointSummary]          # best first
    winner: TrialRecord                  # the best seed of the best point
    model_uri: str | None
    model_version: str | None
    experiment_path: str           # the Tune experiment folder: a local path or a URI
    resumed: bool = False
    pending: str | None = None    # the command that registers the winner later

    @property
    def rows(self) -> list[dict[str, Any]]:
        return ranked_rows(self.ranking, self.metric)


def selection_metric(cfg: SweepConfig) -> str:
    """The `val_*` metric the sweep selects on."""
    from workflows.training.finetune_task import PRIMARY_METRIC

    name = cfg.metric or PRIMARY_METRIC[cfg.task]
    return name if name.startswith("val_") else f"val_{name}"


def trial_resources(cfg: SweepConfig) -> tuple[int, float]:
    """(trials at once, CPUs per Train worker) on the running cluster (`bertflow eval`'s
    trials too)."""
    import ray

    res = ray.cluster_resources()
    workers = cfg.loop.max_workers
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
    from data_prep.storage import public_uri
    from workflows import tracking as T
    from workflows.deferred_registration import (PendingRegistration, finish_run,
                                                 register_command)
    from workflows.training.engine import run_folder
    from workflows.training.finetune import prepare_finetune

    cfg = config
    space = check_space(load_space(cfg.grid), cfg, f"--grid {cfg.grid}")
    metric = selection_metric(cfg)
    name = cfg.run_name or f"sweep-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = run_folder(cfg.loop, name)  # Tune's experiment folder (--storage-path)
    exp_path = experiment.uri
    prep = prepare_finetune(cfg)
    init_ray(cfg.address)
    at_once, cpus = trial_resources(cfg)
    resumed = tune.Tuner.can_restore(str(exp_path))
    # A parent run of this name without a winner is this sweep's, even when the driver died
    # before Tune saved its first state: reuse it rather than open a second parent.
    earlier = T.find_run(T.ensure_experiment(cfg.tracking.experiment, prep.uri), name, prep.uri)
    reuse = resumed or (earlier is not None and T.TAG_SWEEP_WINNER not in earlier.data.tags)
    parent = T.open_run(prep.uri, cfg.tracking.experiment, name, inputs=prep.inputs(),
                        resume=reuse, tags={**prep.run_tags(cfg.task), T.TAG_KIND: "sweep"},
                        params={**flat_dict(cfg), **prep.base_pin.params("base"),
                                "space": space, "metric": metric},
                        metrics={f"baseline_{k}": v for k, v in prep.baseline.items()})
    client = T.client(prep.uri)
    if (done := client.get_run(parent).data.tags.get(T.TAG_SWEEP_WINNER)):
        raise SweepError(f"sweep {name!r} already finished (winner run {done}); choose a "
                         f"new --run-name, or delete {exp_path} to run it again")
    plan = SweepPlan(cfg=cfg, name=name, prep=prep, parent_run_id=parent,
                     experiment=experiment, cpus_per_worker=cpus)
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
    quiet_tune_console()
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
    # As a fine-tuning run ends (workflows.deferred_registration): or left for later.
    winner_run = run_folder(cfg.loop, winner.run_name)
    pending = PendingRegistration(
        run_id=winner.run_id, task=cfg.task, model_dir=str(winner.model_dir),
        tags={**prep.model_tags(), T.TAG_SWEEP_RUN: parent, T.TAG_SWEEP_NAME: name},
        version_tags={T.TAG_DATASET_PATH: str(prep.train.path)},
        metrics={**winner.metrics, f"{metric}_mean": best.mean, f"{metric}_std": best.std},
        register_as=cfg.tracking.register_as, tracking_uri=public_uri(prep.uri),
        sweep_parent=parent)
    model_uri, version = finish_run(
        winner_run, pending, prep.uri, cfg.tracking.tracker_wait_s,
        after=lambda: client.set_tag(parent, T.TAG_SWEEP_WINNER, winner.run_id))
    return SweepResult(name=name, run_id=parent, metric=metric, trials=trials,
                       ranking=ranking, winner=winner, model_uri=model_uri,
                       model_version=version, experiment_path=exp_path, resumed=resumed,
                       pending=None if model_uri else register_command(
                           winner_run.where, cfg.tracking.register_as))


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
        param_space = {**optuna_space(space), "seed": seeds[0]}
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
                                  callbacks=[tune_callback_class()(
                                      sweep_trial_text(metric, cfg, train_rows))]))


def _bounds(value: Any) -> list[float]:
    return value if isinstance(value, list) else next(iter(value.values()))


def _collect(grid: Any, plan: SweepPlan, metric: str, client: Any) -> list[TrialRecord]:
    """A TrialRecord per trial (`collect_trial`), in trial id order."""
    from workflows import tracking as T

    experiment_id = T.ensure_experiment(plan.cfg.tracking.experiment, plan.prep.uri)
    trials = [collect_trial(result, plan, metric, client, experiment_id,
                            *trial_params(result.config)) for result in grid]
    return sorted(trials, key=lambda t: t.trial_id)


def collect_trial(result: Any, plan: SweepPlan, metric: str, client: Any,
                  experiment_id: str, point: dict[str, Any], seed: int) -> TrialRecord:
    """The TrialRecord of one Tune result of (point, seed) run from `plan`; its MLflow
    run ends KILLED if stopped, FAILED if failed (`bertflow eval` collects with it too).

    A trial is done when its last report is the final step: ASHA "stops" a trial at its
    last epoch too (before `run_training` returns), so the final checkpoint that Tune
    was told about (`checkpoint_path`) holds the model.
    """
    from workflows import tracking as T
    from workflows.run_folder import MODEL_ARTIFACT
    from workflows.training.engine import finished_run

    r = dict(result.metrics or {})
    trial_id = r.get("trial_id") or Path(result.path).name
    run_name = f"{plan.name}-{trial_id}"
    loop, _ = plan.trial_loop(trial_config(plan.cfg, point, seed, run_name))
    model_dir = None
    if (done := finished_run(loop, run_name)) is not None:
        r.update(done.metrics)
        model_dir = done.model_dir
    elif r.get("step", 0) >= loop.max_steps and r.get("checkpoint_path"):
        # Ray reports the path on the storage filesystem, without a URI's scheme.
        ckpt = plan.experiment.location.with_path(str(r["checkpoint_path"]))
        model_dir = plan.experiment.where_of(ckpt.join(MODEL_ARTIFACT))
    status = "done" if model_dir is not None else ("failed" if result.error else "stopped")
    run = T.find_run(experiment_id, run_name, plan.prep.uri)
    if run is not None and run.info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(run.info.run_id, {"done": "FINISHED", "stopped": "KILLED",
                                                "failed": "FAILED"}[status])
    value = r.get(metric)
    return TrialRecord(
        trial_id=trial_id, run_name=run_name, point=point, seed=seed, status=status,
        value=None if value is None else float(value),
        epochs=int(r.get("training_iteration", 0)), time_s=float(r.get("time_total_s", 0.0)),
        run_id=run.info.run_id if run is not None else None, model_dir=model_dir,
        metrics={k: float(v) for k, v in r.items()
                 if k.startswith("val_") and isinstance(v, (int, float))})


def _log_parent(client: Any, parent: str, trials: list[TrialRecord],
                ranking: list[PointSummary], metric: str, winner: TrialRecord) -> None:
    """The parent run: every trial as a table, the ranking, the winner and its score."""
    import json

    from workflows import tracking as T

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
    client.set_tag(parent, T.TAG_SWEEP_WINNER_PARAMS, json.dumps(best.point, default=str))
