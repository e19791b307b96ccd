"""The ranking of a sweep's trials: each trial as it ended (`TrialRecord`), the points
best first by the mean of their restarts (`rank_points`: only a point whose trials all ran
to their end can win) and the ranked table (`ranked_rows`). Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
