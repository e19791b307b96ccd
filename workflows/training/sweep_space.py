"""The search space of a sweep, pure: which `FinetuneConfig` fields a space may vary,
reading and checking a space (the BERT paper's grid, or a YAML file of field -> list of
values or one distribution), expanding it into points (grid: every combination; random:
`num_samples` draws with the sweep's seed), and the fine-tune config of one trial. No Ray
and no MLflow, except `optuna_space` (Ray Tune's distributions, imported when called).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

from bert_core.config_io import ConfigError, read_mapping
from workflows.config import FinetuneConfig, SweepConfig, config_from_mapping, flat_dict

# The BERT paper (Devlin et al. 2019, appendix A.3): the fine-tuning grid of GLUE tasks.
PAPER_GRID: dict[str, list[Any]] = {"batch_size": [16, 32], "lr": [5e-5, 3e-5, 2e-5],
                                    "epochs": [2, 3, 4]}


DISTRIBUTIONS = ("loguniform", "uniform", "randint")

# Fields a space may not vary: they fix the data, the tracking or the trial's resources.
FIXED_FIELDS = frozenset({
    "task", "base", "train", "eval", "labels", "max_seq_len", "doc_stride", "max_query_len",
    "text_column", "text_pair_column", "label_column",
    "data_dir", "address", "run_name", "num_workers", "use_gpu", "cpus_per_worker",
    "storage_path", "tracking_uri", "experiment", "register_as", "log_system_metrics",
    "tracker_wait_s", "max_failures"})


SWEEP_ONLY = frozenset(f.name for f in dataclasses.fields(SweepConfig)) - frozenset(
    f.name for f in dataclasses.fields(FinetuneConfig))


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


def optuna_space(space: dict[str, Any]) -> dict[str, Any]:
    """The space as Ray Tune distributions (what OptunaSearch samples from)."""
    from ray import tune

    out = {}
    for key, value in space.items():
        if isinstance(value, list):
            out[key] = tune.choice(value)
        else:
            (dist, (low, high)), = value.items()
            out[key] = getattr(tune, dist)(low, high)
    return out
