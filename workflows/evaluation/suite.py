"""A suite: the fine-tuning tasks a model is measured on, read from YAML (or the built-in
`glue`), pure: no Ray, no MLflow.

    name: topics                  # optional; default: the file's stem
    restarts: 3                   # seeds --seed, --seed+1, ... per grid point
    grid: {lr: [5e-5, 3e-5]}      # paper | glue | a space file | a mapping, as `sweep --grid`
    defaults: {epochs: 3, batch_size: 32}   # any fine-tune field, for every task
    tasks:
      topic:
        task: seq-cls             # seq-cls | pair-cls | token-cls | qa | regression
        train: topics/train.csv   # a path (relative to the suite file or --data-dir) or URI
        eval: topics/eval.csv
        metric: accuracy          # what the task's best grid point is chosen on
        restarts: 5               # optional: this task's own restarts / grid
        max_seq_len: 64           # any fine-tune field

Settings apply in this order, later winning: the fine-tune defaults, the suite's
`defaults`, the task's own fields, the command line (`bertflow eval --epochs 2 ...`).

The built-in `glue` suite (`glue_suite`): the GLUE folder as distributed (`--data-dir`),
read by `data_prep.tasks.benchmarks` into files `bertflow finetune` reads, fine-tuned as
the BERT paper did (batch 32, 3 epochs, the best of lr 5e-5, 4e-5, 3e-5, 2e-5 on dev; restarts for
the small tasks) and averaged by the paper's rule (`workflows.metrics.glue_average`).

MNLI's two dev sets are two tasks of the suite, `mnli-m` and `mnli-mm`, each trained on
MNLI's training set (finetune evaluates one file per run): the average has both columns,
as the paper's table does. Tasks whose folder is missing from `--data-dir` are left out
(one line says which); `--tasks` chooses some.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_core.config_io import ConfigError, read_mapping

SUITE_KEYS = ("name", "description", "restarts", "grid", "defaults", "tasks")
TASK_KEYS = ("task", "train", "eval", "metric", "mode", "restarts", "grid")
# Fine-tune fields a suite cannot set: the model comes from the command, and a trial's
# run name and registration are the evaluation's.
NOT_IN_SUITE = ("base", "run_name", "register_as")

# The BERT paper's GLUE fine-tuning (Devlin et al. 2019, section 4.1): batch 32, 3 epochs,
# the best of lr 5e-5, 4e-5, 3e-5, 2e-5 on dev; random restarts for the small tasks.
GLUE_GRID: dict[str, list[Any]] = {"lr": [5e-5, 4e-5, 3e-5, 2e-5], "batch_size": [32],
                                   "epochs": [3]}
GLUE_SMALL_TASKS = ("cola", "mrpc", "stsb", "rte", "wnli")
GLUE_SMALL_RESTARTS = 5

log = logging.getLogger(__name__)


@dataclass
class SuiteTask:
    """One task of a suite, its settings merged (defaults <- task <- command line)."""

    name: str
    task: str
    train: str
    eval: str
    metric: str                          # selection metric, without `val_`
    mode: str                            # max | min
    restarts: int
    grid: dict[str, Any]                 # the space, as sweep_space.load_space reads it
    settings: dict[str, Any] = field(default_factory=dict)  # fine-tune fields
    metrics: tuple[str, ...] = ()        # the scores the scorecard keeps (all when empty)

    def sweep_config(self, base: str, **extra: Any) -> Any:
        """The SweepConfig of this task fine-tuned from `base` (what a trial is made of)."""
        from workflows.config import SweepConfig, config_from_mapping

        data = {**self.settings, "task": self.task, "base": base, "train": self.train,
                "eval": self.eval, "metric": self.metric, "mode": self.mode,
                "restarts": self.restarts, **extra}
        return config_from_mapping(SweepConfig, data, f"suite task {self.name!r}")


@dataclass
class Suite:
    """A suite's tasks and where it came from."""

    name: str
    tasks: dict[str, SuiteTask]
    source: str
    average: str = "mean"                # mean of the tasks' scores, or glue (the paper's)

    def fingerprint(self) -> str:
        """sha256 of what the suite runs (tasks, files, grids, seeds, settings)."""
        data = {"name": self.name, "average": self.average,
                "tasks": {k: dataclasses.asdict(t) for k, t in sorted(self.tasks.items())}}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str)
                              .encode()).hexdigest()


def parse_grid(grid: Any, source: str, base_dir: Path | None = None) -> dict[str, Any]:
    """A grid given as paper, glue, a space file, a mapping, or a YAML mapping in text
    (`--grid '{lr: [5e-5, 3e-5]}'`) as the space sweep_space.check_space takes."""
    from workflows.training.sweep_space import PAPER_GRID, load_space

    if isinstance(grid, dict):
        return dict(grid)
    if not isinstance(grid, str) or not grid.strip():
        raise ConfigError(f"{source}: grid: give paper, glue, a space file or a mapping "
                          f"such as {{lr: [5e-5, 3e-5]}}")
    if grid == "paper":
        return {k: list(v) for k, v in PAPER_GRID.items()}
    if grid == "glue":
        return {k: list(v) for k, v in GLUE_GRID.items()}
    if grid.lstrip().startswith("{"):
        import yaml

        try:
            data = yaml.safe_load(grid)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: grid {grid!r} is not a YAML mapping: {exc}") from None
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{source}: grid {grid!r}: give a mapping of fields to values")
        return data
    path = Path(grid)
    if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
        path = base_dir / path
    return load_space(str(path))


def _resolve(where: Any, key: str, source: str, root: Path | None) -> str:
    if not isinstance(where, str) or not where.strip():
        raise ConfigError(f"{source}: {key}: give a file path or a URI")
    if "://" in where or root is None or Path(where).is_absolute():
        return where
    return str(root / where)


def _primary_metric(task: str) -> str:
    from workflows.training.finetune_task import PRIMARY_METRIC

    return PRIMARY_METRIC.get(task, "accuracy")


def _check_settings(settings: dict[str, Any], source: str) -> None:
    """Every key a fine-tune field of a value it accepts (a probe config built with it)."""
    from workflows.config import FinetuneConfig, config_from_mapping

    bad = [k for k in NOT_IN_SUITE if k in settings]
    if bad:
        raise ConfigError(f"{source}: {', '.join(map(repr, bad))} cannot be set in a suite "
                          f"(the models come from the command line, and each trial's run "
                          f"name is the evaluation's)")
    probe = {"base": "-", "train": "-", **settings}
    try:
        config_from_mapping(FinetuneConfig, probe, source)
    except ConfigError as exc:
        text = str(exc)
        if "unknown key" in text:
            text += f" (and the suite's own task keys: {', '.join(TASK_KEYS)})"
        raise ConfigError(text) from None


def build_suite(data: dict[str, Any], source: str, *, root: Path | None = None,
                name: str | None = None, overrides: dict[str, Any] | None = None,
                restarts: int | None = None, grid: Any = None) -> Suite:
    """A Suite from its YAML mapping `data` (read from `source`); relative files are read
    from `root`. `overrides` (fine-tune fields), `restarts` and `grid` are the command
    line's and win over the suite's."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a suite is a mapping with the keys {', '.join(SUITE_KEYS)}")
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown suite key(s) {', '.join(map(repr, unknown))}. "
                          f"Valid keys: {', '.join(SUITE_KEYS)} (fine-tune fields for every "
                          f"task go under 'defaults')")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"{source}: tasks: give at least one task, e.g. "
                          f"'tasks: {{topic: {{task: seq-cls, train: train.csv, eval: dev.csv}}}}'")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults: a mapping of fine-tune fields")
    _check_settings(defaults, f"{source}: defaults")
    overrides = dict(overrides or {})
    _check_settings(overrides, "command line")
    suite_restarts = restarts if restarts is not None else data.get("restarts", 1)
    suite_grid = grid if grid is not None else data.get("grid")
    out: dict[str, SuiteTask] = {}
    for task_name, spec in tasks.items():
        where = f"{source}: tasks.{task_name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: a mapping with task, train, eval (and metric, ...)")
        own = {k: v for k, v in spec.items() if k in TASK_KEYS}
        settings = {**defaults, **{k: v for k, v in spec.items() if k not in TASK_KEYS}}
        _check_settings(settings, where)
        settings.update(overrides)
        for key in ("task", "train", "eval"):
            if key not in own:
                raise ConfigError(f"{where}: {key}: missing (every task needs task, train "
                                  f"and eval)")
        n = restarts if restarts is not None else own.get("restarts", suite_restarts)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{where}: restarts: {n!r} is not a whole number >= 1")
        task_grid = grid if grid is not None else own.get("grid", suite_grid)
        space = parse_grid(task_grid, where, root) if task_grid is not None else {}
        mode = own.get("mode", "max")
        if mode not in ("max", "min"):
            raise ConfigError(f"{where}: mode: {mode!r} is not max or min")
        metric = str(own.get("metric") or _primary_metric(str(own["task"])))
        t = SuiteTask(name=str(task_name), task=str(own["task"]),
                      train=_resolve(own["train"], "train", where, root),
                      eval=_resolve(own["eval"], "eval", where, root),
                      metric=metric.removeprefix("val_"), mode=mode, restarts=n,
                      grid=space, settings=settings)
        _check_task(t, where)
        out[t.name] = t
    return Suite(name=str(data.get("name") or name or "suite"), tasks=out, source=source)


def _check_task(t: SuiteTask, where: str) -> None:
    """The task's config and grid are valid (a trial config built from each value)."""
    from workflows.training.sweep_space import check_space

    try:
        cfg = t.sweep_config("-")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if t.grid:
        t.grid = check_space(t.grid, cfg, f"{where}: grid")


def load_suite(spec: str, *, data_dir: str | None = None,
               overrides: dict[str, Any] | None = None, restarts: int | None = None,
               grid: Any = None, tasks: list[str] | None = None) -> Suite:
    """`glue` (the GLUE folder `data_dir`) or a suite YAML file; see the module doc.
    `tasks` keeps only those tasks (in the suite's order)."""
    if spec == "glue":
        return glue_suite(data_dir, overrides=overrides, restarts=restarts, grid=grid,
                          tasks=tasks)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--suite {spec!r}: no such suite file (or give --suite glue "
                          f"--data-dir GLUE_DIR)")
    root = Path(data_dir) if data_dir else path.resolve().parent
    data = read_mapping(path)
    if tasks:
        have = data.get("tasks") if isinstance(data.get("tasks"), dict) else {}
        unknown = [t for t in tasks if t not in have]
        if unknown:
            raise ConfigError(f"--tasks {', '.join(unknown)}: not in {path} (its tasks: "
                              f"{', '.join(have) or 'none'})")
        data = {**data, "tasks": {k: v for k, v in have.items() if k in tasks}}
    return build_suite(data, str(path), root=root, name=path.stem,
                       overrides=overrides, restarts=restarts, grid=grid)


def glue_suite(data_dir: str | None, *, overrides: dict[str, Any] | None = None,
               restarts: int | None = None, grid: Any = None,
               tasks: list[str] | None = None) -> Suite:
    """The GLUE suite over the folder `data_dir` (see the module doc)."""
    from data_prep.tasks.benchmarks import GLUE_TASKS, prepare_benchmark
    from data_prep.tasks.readers import TaskDataError
    from workflows.training.finetune import user_cache_dir

    if not data_dir:
        raise ConfigError("--suite glue: give the GLUE folder as distributed (--data-dir "
                          "DIR holding CoLA/, SST-2/, MRPC/, ...)")
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"--data-dir {data_dir}: no such folder")
    out_dir = user_cache_dir() / "benchmarks" / hashlib.sha256(
        str(root).encode()).hexdigest()[:12]
    wanted = set(tasks or ())
    unknown = sorted(wanted - set(GLUE_TASKS) - {"mnli-m", "mnli-mm"})
    if unknown:
        raise ConfigError(f"--tasks {', '.join(unknown)}: not GLUE tasks; GLUE has "
                          f"{', '.join(GLUE_TASKS)} (mnli as mnli-m and mnli-mm)")
    specs: dict[str, dict[str, Any]] = {}
    missing = []
    for name, t in GLUE_TASKS.items():
        evals = list(t.eval_files)
        if wanted and name not in wanted and not wanted & set(evals):
            continue
        try:
            prepared = prepare_benchmark(root, name, out_dir)
        except TaskDataError as exc:
            if wanted:
                raise ConfigError(f"--suite glue: {exc}") from None
            missing.append(name)
            continue
        fields = dict(prepared.fields)
        for eval_name, where in prepared.evals.items():
            if wanted and name not in wanted and eval_name not in wanted:
                continue
            spec = {**fields, "train": prepared.train, "eval": where, "metric": t.metric}
            if name in GLUE_SMALL_TASKS:
                spec["restarts"] = GLUE_SMALL_RESTARTS
            specs[eval_name] = spec
    if not specs:
        raise ConfigError(f"--data-dir {data_dir}: no GLUE task folder found (CoLA/, SST-2/, "
                          f"MRPC/, QQP/, STS-B/, MNLI/, QNLI/, RTE/, WNLI/)")
    if missing:
        log.warning("glue: no %s in %s; scoring the other tasks", ", ".join(missing), root)
        print(f"glue: {', '.join(missing)} not in {root}: left out of the suite", flush=True)
    data = {"name": "glue", "restarts": 1, "grid": GLUE_GRID, "tasks": specs}
    suite = build_suite(data, f"glue ({root})", root=root, name="glue", overrides=overrides,
                        restarts=restarts, grid=grid)
    suite.average = "glue"
    return suite
