"""`bertflow eval`: every (model, task, grid point, seed) of a suite as one Ray Tune trial
of the sweep machinery (workflows/training/sweep*.py), as many at once as the cluster
holds; a scorecard per model.

    run_eval(EvalConfig) -> EvalResult

1. Read the suite (`suite.load_suite`), pin every model once (`tracking.pin_model`), and
   name the evaluation after what it runs (`eval-SUITE-<sha256 of the pinned models, the
   suite and the seeds>`, or `--run-name`): the same command names the same evaluation.
2. Prepare each (model, task) once (`finetune.prepare_finetune`: the base shipped, the
   task files tokenized with the model's vocabulary), and open one MLflow parent run per
   model (`NAME-MODEL`), reopened by name when the evaluation runs again.
3. One Tune experiment (`<storage_path>/<name>`) grid-searches the list of trials, each a
   `sweep_trials.train_trial` of its (model, task) plan: an MLflow child run of its
   model's parent, one Train worker at a fraction of a CPU (`sweep.trial_resources`).
   Rerun after the driver died, it is restored: finished trials are not trained again,
   unfinished ones continue from their last epoch's checkpoint.
4. Each trial's score is its best epoch (the MLflow history of its selection metric, as
   early stopping would keep); each task's the best grid point's mean +- std over its
   restarts (`scorecard.task_score`). The scorecard is logged to the parent run
   (`eval/scorecard.json`, metrics `TASK/METRIC_mean`) and, for a registered model, kept
   as the version's tag `bertflow.scorecard.SUITE` (what `registry show/compare` read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from bert_core.config_io import BertflowError
from workflows.config import EvalConfig
from workflows.evaluation.scorecard import SCORECARD_TAG, Scorecard, average, task_score
from workflows.evaluation.suite import Suite, load_suite

log = logging.getLogger(__name__)

TAG_EVAL_SUITE = "bertflow.eval_suite"      # on an evaluation's parent run
TAG_EVAL_MODEL = "bertflow.eval_model"      # the exact model it scores


class EvalError(BertflowError):
    """An evaluation cannot start or end; the message says what to change."""


@dataclass
class EvalPlan:
    """What every trial of an evaluation needs: the sweep plan of each (model, task)."""

    name: str
    plans: dict[str, Any]                        # "MODEL_INDEX/TASK" -> SweepPlan


@dataclass
class EvalResult:
    """What `run_eval` returns: a scorecard per model (in the order given)."""

    name: str
    suite: Suite
    scorecards: list[Scorecard]
    trials: dict[str, list[Any]] = field(default_factory=dict)  # "i/TASK" -> TrialRecords
    experiment_path: str = ""
    resumed: bool = False


def suite_tag(suite_name: str) -> str:
    """The model version tag of a suite's scorecard."""
    return SCORECARD_TAG + re.sub(r"[^A-Za-z0-9_.-]", "_", suite_name)


def eval_trainable(config: dict[str, Any], plan: EvalPlan) -> None:
    """The Tune function trainable of an evaluation: one fine-tune of its (model, task)."""
    from ray import tune

    from workflows.training.sweep_trials import train_trial, trial_callbacks

    job = config["trial"]
    run_name = f"{plan.name}-{tune.get_context().get_trial_id()}"
    train_trial(plan.plans[job["job"]], dict(job["point"]), int(job["seed"]), run_name,
                callbacks=trial_callbacks)


def _model_label(pin: Any) -> str:
    if pin.version is not None:
        return f"{pin.name}-v{pin.version}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", pin.uri.rstrip("/").rsplit("/", 1)[-1])


def evaluation_name(suite: Suite, pins: list[Any], seed: int) -> str:
    """The default name: the suite's and a digest of what runs (models, suite, seeds)."""
    digest = hashlib.sha256(json.dumps(
        {"models": [p.uri for p in pins], "fingerprints": [p.fingerprint for p in pins],
         "suite": suite.fingerprint(), "seed": seed}, sort_keys=True).encode()).hexdigest()
    return f"eval-{re.sub(r'[^A-Za-z0-9_.-]', '_', suite.name)}-{digest[:10]}"


def best_epoch(client: Any, trial: Any, metric: str, mode: str) -> None:
    """Set `trial.value` and `trial.metrics` to its best evaluation after step 0 (the
    metric's MLflow history), the epoch early stopping would keep."""
    if trial.run_id is None:
        return
    history = [m for m in client.get_metric_history(trial.run_id, metric) if m.step > 0]
    if not history:
        return
    pick = max if mode == "max" else min
    best = pick(history, key=lambda m: (m.value, -m.step) if mode == "max" else (m.value, m.step))
    at_step = {}
    for key in trial.metrics:
        values = {m.step: m.value for m in client.get_metric_history(trial.run_id, key)}
        if best.step in values:
            at_step[key] = float(values[best.step])
    trial.value = float(best.value)
    trial.metrics = {**trial.metrics, **at_step}


def _trial_text(lines: dict[str, tuple[Any, int, str]], metrics: dict[str, str]) -> Any:
    """What an evaluation's trial line says of a trial config (sweep_trials.TrialLines)."""
    def describe(trial_config: dict[str, Any]) -> tuple[str, str, int]:
        from workflows.training.finetune import loop_for_epochs
        from workflows.training.sweep_space import trial_config as make_trial

        job = trial_config["trial"]
        cfg, train_rows, label = lines[job["job"]]
        task_name = job["job"].split("/", 1)[1]
        planned = loop_for_epochs(make_trial(cfg, job["point"], job["seed"]), train_rows)[0]
        text = " ".join(f"{k}={v}" for k, v in sorted(job["point"].items()))
        return (f"{label} {task_name} {text} seed={job['seed']}".replace("  ", " "),
                metrics[task_name], planned.max_steps)

    return describe


def run_eval(config: EvalConfig, suite: Suite | None = None) -> EvalResult:
    """Evaluate every model of `config` on its suite; see the module doc."""
    from ray import tune

    from data_prep.ray_env import init_ray
    from workflows import tracking as T
    from workflows.training.engine import run_folder
    from workflows.training.finetune import prepare_finetune
    from workflows.training.sweep import collect_trial, trial_resources
    from workflows.training.sweep_space import expand_points
    from workflows.training.sweep_trials import SweepPlan, quiet_tune_console, tune_callback_class

    cfg = config
    suite = suite or load_suite(cfg.suite, data_dir=cfg.data_dir, overrides=cfg.overrides,
                                restarts=cfg.restarts, grid=cfg.grid, tasks=cfg.tasks)
    first = next(iter(suite.tasks.values())).sweep_config("-")
    uri = T.resolve_tracking_uri(first.tracking.tracking_uri)
    T.check_tracking_store(uri)
    pins, seen = [], set()
    for ref in cfg.models:
        pin = T.pin_model(ref, uri)
        if pin.uri not in seen:
            seen.add(pin.uri)
            pins.append(pin)
    seed = first.loop.seed
    name = cfg.run_name or evaluation_name(suite, pins, seed)
    experiment_name = first.tracking.experiment
    experiment_id = T.ensure_experiment(experiment_name, uri)

    plans: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    for i, pin in enumerate(pins):
        for task in suite.tasks.values():
            key = f"{i}/{task.name}"
            configs[key] = task.sweep_config(pin.uri, max_concurrent=cfg.max_concurrent)
    experiment = run_folder(first.loop, name)  # Tune's experiment folder (--storage-path)
    exp_path = experiment.uri
    init_ray(first.address)
    at_once, cpus = trial_resources(configs[f"0/{next(iter(suite.tasks))}"])
    parents = {}
    for i, pin in enumerate(pins):
        run_name = f"{name}-{_model_label(pin)}"
        parents[i] = T.open_run(
            uri, experiment_name, run_name, resume=True,
            tags={T.TAG_KIND: "eval", TAG_EVAL_SUITE: suite.name, TAG_EVAL_MODEL: pin.uri},
            params={"model": pin.uri, "model_ref": pin.ref, "suite": suite.name,
                    "suite_source": suite.source, "suite_sha256": suite.fingerprint(),
                    "seed": seed, "tasks": {n: {"task": t.task, "metric": t.metric,
                                                "restarts": t.restarts, "grid": t.grid}
                                            for n, t in suite.tasks.items()}})
        recorded = T.client(uri).get_run(parents[i]).data.params.get("suite_sha256")
        if recorded not in (None, suite.fingerprint()):
            raise EvalError(f"evaluation {name!r} was run with another suite (sha256 "
                            f"{recorded[:12]}...); choose a new --run-name, or delete "
                            f"{exp_path} and its MLflow runs to run it again")
    for i, pin in enumerate(pins):
        for task in suite.tasks.values():
            key = f"{i}/{task.name}"
            log.info("eval %s: preparing %s for %s", name, task.name, pin.uri)
            plans[key] = SweepPlan(cfg=configs[key], name=name, prep=prepare_finetune(
                configs[key]), parent_run_id=parents[i], experiment=experiment,
                cpus_per_worker=cpus)
    plan = EvalPlan(name=name, plans=plans)

    jobs = []
    for key, task_cfg in configs.items():
        task = suite.tasks[key.split("/", 1)[1]]
        for point in expand_points(task.grid, "grid", 1, seed):
            for s in range(task.restarts):
                jobs.append({"job": key, "point": point, "seed": seed + s})

    # Plain values only: Tune pickles its callbacks with the experiment (no ObjectRefs).
    lines = {key: (sub.cfg, sub.prep.train_rows, _model_label(pins[int(key.split("/")[0])]))
             for key, sub in plans.items()}
    describe = _trial_text(lines, {n: f"val_{t.metric}" for n, t in suite.tasks.items()})

    trainable = tune.with_resources(tune.with_parameters(eval_trainable, plan=plan),
                                    {"CPU": 0, "memory": 2**20})
    resumed = tune.Tuner.can_restore(str(exp_path))
    if resumed:
        print(f"eval {name}: resuming in {exp_path} (finished trials are not trained again)",
              flush=True)
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=at_once,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=exp_path.rsplit("/", 1)[0],
                                      verbose=0,
                                      callbacks=[tune_callback_class()(describe)]))
    print(f"eval {name}: {len(pins)} model(s) x {len(suite.tasks)} task(s), {len(jobs)} "
          f"trials, {at_once} at once at {cpus:.2f} CPU each", flush=True)
    quiet_tune_console()
    grid = tuner.fit()

    client = T.client(uri)
    by_job: dict[str, list[Any]] = {key: [] for key in plans}
    for result in grid:
        job = (result.config or {}).get("trial")
        if job is None or job["job"] not in plans:
            continue
        task = suite.tasks[job["job"].split("/", 1)[1]]
        metric = f"val_{task.metric}"
        record = collect_trial(result, plans[job["job"]], metric, client, experiment_id,
                               dict(job["point"]), int(job["seed"]))
        if record.status == "done":
            best_epoch(client, record, metric, task.mode)
        by_job[job["job"]].append(record)
    cards = []
    missing = []
    for i, pin in enumerate(pins):
        scores = {}
        for task in suite.tasks.values():
            trials = sorted(by_job[f"{i}/{task.name}"], key=lambda t: t.trial_id)
            score = task_score(trials, task.metric, task.mode)
            if score is None:
                missing.append(f"{pin.uri} {task.name} ("
                               f"{', '.join(sorted({t.status for t in trials})) or 'no trials'})")
            elif not any(k == task.metric for k in score.scores):
                missing.append(f"{pin.uri} {task.name}: no trial reported {task.metric!r} "
                               f"(it reports {', '.join(sorted(score.scores)) or 'nothing'})")
            else:
                scores[task.name] = score
        card = Scorecard(model=pin.uri, version=pin.version, suite=suite.name, tasks=scores,
                         average=average(scores, suite.average) if len(scores) == len(
                             suite.tasks) else None, run_id=parents[i])
        cards.append(card)
    if missing:
        raise EvalError(f"eval {name}: no complete score for " + "; ".join(missing)
                        + f". See the trial lines above; rerunning the same command resumes "
                        f"the unfinished trials ({exp_path})")
    for i, (pin, card) in enumerate(zip(pins, cards)):
        _log_scorecard(client, card, by_job, i)
        if pin.version is not None:
            client.set_model_version_tag(pin.name, pin.version, suite_tag(suite.name),
                                         card.to_tag())
    return EvalResult(name=name, suite=suite, scorecards=cards, trials=by_job,
                      experiment_path=exp_path, resumed=resumed)


def _log_scorecard(client: Any, card: Scorecard, by_job: dict[str, list[Any]],
                   index: int) -> None:
    """The parent run: the scorecard, every trial's best epoch, a metric per task."""
    run = card.run_id
    client.log_text(run, json.dumps(card.to_json(), indent=1), "eval/scorecard.json")
    trials = [{"task": key.split("/", 1)[1], "trial_id": t.trial_id, "run_id": t.run_id,
               "seed": t.seed, "point": t.point, "status": t.status, "value": t.value,
               "epochs": t.epochs, "time_s": round(t.time_s, 1)}
              for key, records in by_job.items() if key.startswith(f"{index}/")
              for t in records]
    client.log_text(run, json.dumps(trials, indent=1, default=str), "eval/trials.json")
    for name, t in card.tasks.items():
        client.log_metric(run, f"{name}/{t.metric}_mean", t.mean)
        client.log_metric(run, f"{name}/{t.metric}_std", t.std)
    if card.average is not None:
        client.log_metric(run, "average", card.average)
