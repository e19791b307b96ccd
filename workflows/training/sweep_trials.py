"""The trials of a sweep: what each Ray Tune trial runs and the callbacks around it.

    sweep_trainable(config, plan)   the Tune function trainable: one (point, seed)
    train_trial(plan, point, ...)   one fine-tuning run, an MLflow child run of the sweep
    trial_callbacks()               the Ray Train callbacks of a trial (Tune's report)
    tune_callback_class()           the driver's Tune callback: a line per trial, cleanup
    sweep_trial_text(...)           what that line says of a sweep's trial

Each trial calls `run_training` with one worker and a fraction of a CPU; Tune's
`TuneReportCallback` hands each epoch's eval metrics to Tune, so ASHA can stop a trial
that trails the others at an epoch. Each trial is an MLflow child run
(`tracking.TAG_PARENT_RUN`) of the sweep's parent run, with its params and per-epoch
metrics; rank 0 opens it and logs into it (the trial's actor, which only waits on its
Train run, never imports MLflow).

Stopped trials give their CPUs back: when Tune stops a trial (ASHA), it kills the trial's
actor, and with it the Ray Train controller, whose worker placement group then outlives it
(Ray removes a placement group by itself only once its creator's job has ended too). Ray
Train's own detached `PlacementGroupCleaner` is meant to notice, but it asks the Ray state
API (the dashboard's HTTP server) with an address found by scanning the machine's
processes: on a Ray started without the dashboard (bertflow's local Ray) it can never
answer, and with several Ray instances on one machine the scan fails with "Found multiple
active Ray instances" and the cleaner's thread dies. Either way the next trials wait for
CPUs that never come back. So every checkpoint report of a Train worker names its worker
group's placement group (`contracts.PLACEMENT_GROUP_KEY`, from the public
`ray.get_runtime_context().get_placement_group_id()`), Tune's report callback passes it on
with the metrics, and the sweep removes the group when the trial ends.

The one private Ray name a trial needs (the report queue of its Tune session, shared by a
reused trial actor's trials) is reached through `workflows.ray_internals`.

The trial seed sets initialisation, dropout and masking; the order of the training rows
is the sweep's own `seed` for every trial (the data are tokenized and shuffled once).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workflows.config import FinetuneConfig, LoopSettings, SweepConfig
from workflows.training.contracts import PLACEMENT_GROUP_KEY, RunTracking
from workflows.training.sweep_space import trial_config

log = logging.getLogger(__name__)

# A trial's own actor only waits on its Ray Train run: it reserves no CPU (the CPUs go to
# the Train worker and Ray Data), only a token of memory, as Tune refuses an empty request.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}


@dataclass
class SweepPlan:
    """What every trial needs (shipped once to the object store by tune.with_parameters)."""

    cfg: SweepConfig
    name: str
    prep: Any                      # finetune.PreparedFinetune
    parent_run_id: str
    experiment: Any                # run_folder.RunFolder: Tune's folder of the sweep
    cpus_per_worker: float

    @property
    def trials_dir(self) -> str:
        """Where the trials' Ray Train run folders go (a local folder or a URI)."""
        return self.experiment.join("trials").uri

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
                callbacks: Callable[[], list[Any]] | None = None) -> Any:
    """One trial: a fine-tuning run of `point` with `seed` as an MLflow child run of the
    sweep; returns the engine's TrainResult (an earlier attempt's if it had finished).
    `callbacks` makes the Ray Train callbacks (`trial_callbacks`) when the trial trains."""
    from workflows import tracking as T
    from workflows.run_folder import checkpoint_step
    from workflows.training.engine import run_folder, run_training
    from workflows.training.finetune import run_params

    cfg = trial_config(plan.cfg, point, seed, run_name)
    loop, steps_per_epoch = plan.trial_loop(cfg)
    run = run_folder(loop, run_name)
    if (done := run.result()) is not None:  # the driver died after it ended...
        report_finished_trial(done)  # ...and before Tune recorded its end
        return done
    # The driver died after the trial's last checkpoint and before its run ended: resumed,
    # the run trains no step and so reports nothing to Tune, which would then hold the
    # trial as ended without a result (a later rerun counts it as no trial at all). The
    # run is finished without the Train callbacks and its result reported as above.
    latest = run.latest_checkpoint()
    at_end = latest is not None and checkpoint_step(latest) >= loop.max_steps
    prep = plan.prep
    # Rank 0 opens the child run (see RunTracking): the trial's actor stays free of MLflow.
    opening = dict(
        experiment=cfg.tracking.experiment, run_name=run_name, inputs=prep.inputs(),
        tags={**prep.run_tags(cfg.task), T.TAG_PARENT_RUN: plan.parent_run_id,
              T.TAG_SWEEP_RUN: plan.parent_run_id, T.TAG_SWEEP_NAME: plan.name,
              T.TAG_SWEEP_TRIAL: run_name},
        params={**run_params(cfg, prep, loop, steps_per_epoch),
                **{f"sweep.{k}": v for k, v in point.items()}, "sweep.seed": seed})
    result = run_training(prep.task_for(cfg), loop, run=run,
                          callbacks=callbacks() if callbacks and not at_end else None,
                          tracking=RunTracking(prep.uri, None, False, opening=opening))
    if at_end:
        report_finished_trial(result)
    return result


def report_finished_trial(done: Any) -> None:
    """Tell Tune the final metrics of a trial that had finished before this attempt.

    A driver killed after a trial's run wrote its result but before Tune saved the trial
    as ended reruns the trial on resume; it trains nothing again, but Tune and its searcher
    (Optuna needs the metric of every completed trial) must still get its result, which a
    trial that returned without reporting does not give them."""
    from ray import tune

    # From the trial's own thread: `train_trial` makes the Train callbacks only after this
    # check, as a session that has their report queue never passed such a report to Tune.
    tune.report({**{k: v for k, v in done.metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)},
                 "step": done.step})


def sweep_trainable(config: dict[str, Any], plan: SweepPlan) -> None:
    """The Tune function trainable: one trial, its epochs reported to Tune by the engine."""
    from ray import tune

    point, seed = trial_params(config)
    run_name = f"{plan.name}-{tune.get_context().get_trial_id()}"
    train_trial(plan, point, seed, run_name, callbacks=trial_callbacks)


_REPORT_QUEUE: list[Any] = []  # this trial actor's queue actor, once it has one


def _share_report_queue() -> None:
    """Give this trial the report queue of the actor's earlier trials.

    Tune's report callback hands metrics from the Train controller to the trial through a
    queue actor, and each trial's session makes a new one: a Python process started (and
    importing Ray) just as the trial's Train controller and worker start on the same CPUs.
    A reused trial actor (see `reuse_trial_actors`) keeps its first queue instead; it is
    empty between trials, as Tune takes a trial's last report before the trial ends.
    No public Ray API shares it: `workflows.ray_internals` reaches the session's."""
    from workflows import ray_internals

    if _REPORT_QUEUE:
        ray_internals.adopt_report_queue(_REPORT_QUEUE[0])
    else:
        _REPORT_QUEUE.append(ray_internals.session_report_queue())


def trial_callbacks() -> list[Any]:
    """The Ray Train callbacks of a trial (made in its Tune session): Tune's report
    callback, which hands each epoch's metrics to Tune. Those of rank 0 name the worker
    group's placement group (`contracts.PLACEMENT_GROUP_KEY`, see the module doc), so Tune's
    last result of a trial says which group to release."""
    from ray.tune.integration.ray_train import TuneReportCallback

    _share_report_queue()  # before TuneReportCallback() takes the session's queue
    return [TuneReportCallback()]


def reuse_trial_actors(cfg: SweepConfig) -> bool:
    """Whether a finished trial's actor runs the next trial (Tune's `reuse_actors`).

    A trial actor spends seconds importing torch, MLflow and bertflow before its Ray Train
    run starts; reused, only the first trial pays that. Tune reuses an actor once the
    trial's function has returned, which is always so without a scheduler. ASHA stops a
    trial in the middle of its Ray Train run: the function's thread cannot be interrupted,
    Tune's reset would fail and the next trial would error, so an ASHA sweep gives each
    trial a fresh actor (and the stopped one is killed, with its Train run)."""
    return cfg.scheduler != "asha"


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


def sweep_trial_text(metric: str, cfg: SweepConfig, train_rows: int) -> Any:
    """What a sweep's trial line says of a trial config: (its point and seed, the
    metric shown, the steps it was planned to run)."""
    def describe(config: dict[str, Any]) -> tuple[str, str, int]:
        from workflows.training.finetune import loop_for_epochs

        point, seed = trial_params(config)
        planned = loop_for_epochs(trial_config(cfg, point, seed), train_rows)[0]
        return f"{_point_text(point)} seed={seed}", metric, planned.max_steps

    return describe


def quiet_tune_console() -> None:
    """Ray Tune prints nothing of its own: bertflow prints one line per trial. At
    verbose=0, Ray 2.60's output engine still prints an experiment box and the results'
    and TensorBoard's paths; its earlier engine (RAY_AIR_NEW_OUTPUT=0) prints nothing.
    Called on the driver before `Tuner.fit` (a user's own setting wins)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def tune_callback_class() -> type:
    """A Tune callback printing one line per finished trial and releasing a stopped
    trial's worker placement group (built lazily: imports ray). It is made with a
    `describe(trial config) -> (text, metric, planned steps)`, e.g. `sweep_trial_text`."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self, describe: Any) -> None:
            self.describe = describe

        def _line(self, trial: Any, how: str) -> None:
            r = trial.last_result or {}
            text, metric, planned = self.describe(trial.config)
            if how == "ended" and r.get("step", 0) < planned:
                how = "stopped"
            value = r.get(metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            print(f"trial {trial.trial_id} {how:<8} {text}  "
                  f"{metric}={shown}  epochs={r.get('training_iteration', 0)}  "
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
