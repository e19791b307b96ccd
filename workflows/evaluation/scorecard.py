"""Scorecards, pure: a model's score per task (the best grid point's mean +- std over its
restarts), their average, the comparison of two scorecards and its verdict. No Ray, no
MLflow: `run.py` fills them, `registry` stores and shows them.

The noise rule of a comparison: the difference of two means is beyond the restart noise
when it exceeds two standard errors of the difference, 2 * sqrt(sA^2/nA + sB^2/nB) (about
a 95% interval if the restarts' scores are normal). With one restart on either side the
noise is unknown and no difference is called.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

# The model version tag holding a suite's scorecard (compact JSON): SCORECARD_TAG + suite.
SCORECARD_TAG = "bertflow.scorecard."
# MLflow refuses model version tag values longer than this (mlflow.utils.validation).
MAX_TAG_VALUE = 5000


@dataclass
class TaskScore:
    """One task: its selection metric at the best grid point, over that point's restarts."""

    metric: str                                  # selection metric (no val_ prefix)
    mean: float
    std: float
    n: int                                       # restarts the mean is over
    values: list[float] = field(default_factory=list)   # per seed
    scores: dict[str, float] = field(default_factory=dict)  # every metric, mean over seeds
    point: dict[str, Any] = field(default_factory=dict)    # the best grid point
    mode: str = "max"


@dataclass
class Scorecard:
    """A model's scores on a suite (`to_json` is what `bertflow eval --json` prints)."""

    model: str                                   # exact: models:/NAME/VERSION or a folder
    version: str | None
    suite: str
    tasks: dict[str, TaskScore]
    average: float | None
    run_id: str | None = None                    # the evaluation's parent MLflow run

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "suite": self.suite,
                "tasks": {name: {"metric": t.metric, "mean": t.mean, "std": t.std,
                                 "scores": dict(t.scores)}
                          for name, t in self.tasks.items()},
                "average": self.average}

    def to_tag(self) -> str:
        """The compact JSON kept as a model version tag (scores dropped if too long)."""
        import json

        data = {"suite": self.suite, "average": _round(self.average), "run_id": self.run_id,
                "tasks": {n: {"metric": t.metric, "mean": _round(t.mean), "std": _round(t.std),
                              "n": t.n, "mode": t.mode,
                              "scores": {k: _round(v) for k, v in t.scores.items()}}
                          for n, t in self.tasks.items()}}
        text = json.dumps(data, separators=(",", ":"))
        if len(text) > MAX_TAG_VALUE:
            for t in data["tasks"].values():
                t.pop("scores")
            text = json.dumps(data, separators=(",", ":"))
        return text

    @classmethod
    def from_tag(cls, text: str, model: str, version: str | None) -> "Scorecard":
        import json

        data = json.loads(text)
        tasks = {n: TaskScore(metric=t["metric"], mean=t["mean"], std=t["std"], n=t["n"],
                              scores=t.get("scores", {}), mode=t.get("mode", "max"))
                 for n, t in data["tasks"].items()}
        return cls(model=model, version=version, suite=data["suite"], tasks=tasks,
                   average=data.get("average"), run_id=data.get("run_id"))


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def task_score(trials: list[Any], metric: str, mode: str = "max") -> TaskScore | None:
    """The task's score from its trials (sweep_ranking.TrialRecord, `value` the trial's
    best epoch): the point with the best mean over its restarts among the points whose
    trials all ran to their end; None when no point did."""
    from workflows.training.sweep_ranking import rank_points

    ranking = rank_points(trials, mode)
    if not ranking or not ranking[0].complete or ranking[0].mean is None:
        return None
    best = ranking[0]
    values = [t.value for t in best.trials if t.value is not None]
    mean, std = mean_std(values)
    keys = sorted({k for t in best.trials for k in t.metrics})
    scores = {}
    for k in keys:
        got = [t.metrics[k] for t in best.trials if k in t.metrics]
        if len(got) == len(best.trials):
            scores[k.removeprefix("val_")] = statistics.fmean(got)
    return TaskScore(metric=metric, mean=mean, std=std, n=len(values), values=values,
                     scores=scores, point=dict(best.point), mode=mode)


def average(tasks: dict[str, TaskScore], rule: str = "mean") -> float | None:
    """The suite's average: the mean of the tasks' scores (`mean`), or GLUE's as the BERT
    paper reports it (`glue`: workflows.metrics.glue_average over each task's scores)."""
    if not tasks:
        return None
    if rule == "glue":
        from workflows.metrics import glue_average

        return glue_average({name: t.scores for name, t in tasks.items()})
    return statistics.fmean(t.mean for t in tasks.values())


@dataclass
class Difference:
    """One task of a comparison: B's mean minus A's and whether it beats the noise."""

    task: str
    metric: str
    a: TaskScore | None
    b: TaskScore | None
    diff: float | None
    noise: float | None                          # 2 standard errors of the difference
    beyond_noise: bool | None                    # None: unknown (one restart, or missing)
    better: str | None = None                    # "a" | "b" | None (within the noise)


def difference(task: str, a: TaskScore | None, b: TaskScore | None) -> Difference:
    """B - A for one task with the noise rule of the module doc."""
    metric = (a or b).metric if (a or b) else "-"
    if a is None or b is None:
        return Difference(task, metric, a, b, None, None, None)
    diff = b.mean - a.mean
    if a.n < 2 or b.n < 2:
        return Difference(task, metric, a, b, diff, None, None)
    noise = 2 * math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
    beyond = abs(diff) > noise
    sign = diff if a.mode == "max" else -diff
    better = ("b" if sign > 0 else "a") if beyond else None
    return Difference(task, metric, a, b, diff, noise, beyond, better)


def compare(a: Scorecard, b: Scorecard) -> list[Difference]:
    """Per task (A's order, then B's own), B minus A."""
    names = list(a.tasks) + [n for n in b.tasks if n not in a.tasks]
    return [difference(n, a.tasks.get(n), b.tasks.get(n)) for n in names]


def verdict(diffs: list[Difference], a_name: str = "A", b_name: str = "B") -> str:
    """One line: on how many tasks B beats A beyond the noise, and what that means."""
    known = [d for d in diffs if d.diff is not None]
    if not known:
        return "no task was scored for both models: nothing to compare"
    b_wins = [d.task for d in known if d.better == "b"]
    a_wins = [d.task for d in known if d.better == "a"]
    unknown = [d.task for d in known if d.beyond_noise is None]
    if unknown and len(unknown) == len(known):
        return (f"{b_name} vs {a_name}: the noise is unknown with one restart; use "
                f"--restarts 2 or more to tell a difference from luck")
    if b_wins and not a_wins:
        return (f"{b_name} is better than {a_name} beyond the restart noise on "
                f"{len(b_wins)} of {len(known)} tasks ({', '.join(b_wins)}) and worse on none")
    if a_wins and not b_wins:
        return (f"{b_name} is worse than {a_name} beyond the restart noise on "
                f"{len(a_wins)} of {len(known)} tasks ({', '.join(a_wins)}) and better on none")
    if a_wins and b_wins:
        return (f"mixed: {b_name} is better on {', '.join(b_wins)} and worse on "
                f"{', '.join(a_wins)}, beyond the restart noise")
    return (f"no difference beyond the restart noise between {b_name} and {a_name} on any "
            f"of {len(known)} tasks")


def _pm(t: TaskScore | None) -> str:
    if t is None:
        return "-"
    return f"{t.mean:.4f} +- {t.std:.4f}" if t.n > 1 else f"{t.mean:.4f}"


def scorecard_rows(card: Scorecard) -> list[dict[str, Any]]:
    """The scorecard as table rows: task, metric, mean +- std, restarts, other scores."""
    rows = []
    for name, t in card.tasks.items():
        others = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t.scores.items())
                           if k != t.metric and not k.endswith(("_examples", "loss")))
        rows.append({"task": name, "metric": t.metric, "score": _pm(t), "restarts": t.n,
                     "also": others or "-"})
    if card.average is not None:
        rows.append({"task": "average", "metric": "", "score": f"{card.average:.4f}",
                     "restarts": "", "also": ""})
    return rows


def compare_rows(a: Scorecard, b: Scorecard, diffs: list[Difference]) -> list[dict[str, Any]]:
    """Side by side: task, metric, A, B, B - A, the noise and whether it is beyond it."""
    rows = []
    for d in diffs:
        beyond = {True: "yes", False: "no", None: "unknown"}[d.beyond_noise]
        rows.append({"task": d.task, "metric": d.metric, "a": _pm(d.a), "b": _pm(d.b),
                     "b - a": "-" if d.diff is None else f"{d.diff:+.4f}",
                     "noise": "-" if d.noise is None else f"{d.noise:.4f}",
                     "beyond noise": beyond})
    if a.average is not None and b.average is not None:
        rows.append({"task": "average", "metric": "", "a": f"{a.average:.4f}",
                     "b": f"{b.average:.4f}", "b - a": f"{b.average - a.average:+.4f}",
                     "noise": "", "beyond noise": ""})
    return rows
