"""Starting or joining Ray the same way everywhere in bertflow, and the environment every
Ray worker needs to reach bertflow's stores.

Ray workers (Ray Data tasks, Ray Train workers) open data locations and the MLflow
server themselves, possibly on other nodes. They get the driver's credential variables
(`worker_env_vars`: the store variables of `data_prep.storage.CREDENTIAL_ENV_VARS` and
MLflow's `MLFLOW_TRACKING_*` credentials) through the Ray runtime environment: `init_ray`
sets them for the whole job. Code that may run on a Ray started elsewhere (a shared test
Ray, a Ray started before the variables were set) asks `missing_worker_env()` for the
variables the job lacks and hands them over itself: prep's tasks get them as an object
in the object store (`env_for_tasks` / `apply_worker_env`), never as task options, which
Ray Data writes into its logs. Only variable names are ever logged, never values.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# MLflow's client credentials (basic auth, token, TLS settings) for workers that log.
MLFLOW_CREDENTIAL_ENV_VARS = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
)
# How long MLflow's client retries one request (not secrets): rank 0 logs with the
# driver's budget.
MLFLOW_CLIENT_ENV_VARS = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
)


def worker_env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The credential variables set in `environ` (default: this process) that Ray workers
    need: object-store endpoint/credentials and MLflow credentials. Never log the values."""
    from data_prep.storage import credential_env

    environ = os.environ if environ is None else environ
    env = credential_env(environ)
    env.update({k: environ[k] for k in (*MLFLOW_CREDENTIAL_ENV_VARS, *MLFLOW_CLIENT_ENV_VARS)
                if environ.get(k)})
    return env


def job_env_var_names() -> set[str]:
    """Variables the Ray job this driver runs in already sets for all its workers (a job
    submitted with `bertflow submit` carries the credentials in its runtime env). Ray
    refuses a ray.init runtime env that names any of them again, even with equal values,
    and its error message prints every value."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set(((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}))
    except (ValueError, AttributeError):
        return set()


def worker_runtime_env(runtime_env: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """`runtime_env` (or a new one) with `worker_env_vars()` added to its env_vars
    (variables the caller set explicitly win; those the job's own runtime env already
    sets are left to it); None when there is nothing to add."""
    inherited = job_env_var_names()
    env = {k: v for k, v in worker_env_vars().items() if k not in inherited}
    if not env and not runtime_env:
        return None
    merged = dict(runtime_env or {})
    merged["env_vars"] = {**env, **dict(merged.get("env_vars") or {})}
    return merged


def missing_worker_env() -> dict[str, str]:
    """The `worker_env_vars()` that the current Ray job's runtime environment does not
    already carry with the same value ({} when `init_ray` started or joined Ray with
    them; everything when Ray was initialised elsewhere without them)."""
    import ray

    env = worker_env_vars()
    try:
        job_env = dict(ray.get_runtime_context().runtime_env.get("env_vars") or {})
    except Exception:  # not initialised, or an old runtime context
        job_env = {}
    return {k: v for k, v in env.items() if job_env.get(k) != v}


def env_for_tasks() -> Any:
    """An object ref of `missing_worker_env()` for tasks to `apply_worker_env`, or None
    when the job already carries every variable. Values travel through the object store,
    not through task options (which Ray Data logs)."""
    import ray

    missing = missing_worker_env()
    return ray.put(missing) if missing else None


def apply_worker_env(env_ref: Any) -> None:
    """In a task: set the variables `env_for_tasks` shipped (no-op for None)."""
    if env_ref is None:
        return
    if not isinstance(env_ref, dict):  # Ray resolves a ref passed as a top-level argument
        import ray

        env_ref = ray.get(env_ref)
    os.environ.update(env_ref)


# Called by `init_ray` once Ray is up in this process (the bertflow CLI adds one that routes
# the raylet's driver messages into its log: workflows/cli/logs.py).
AFTER_INIT: list[Callable[[], None]] = []


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; what Ray counts on a local start)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_ray(address: str | None = None, **kwargs: Any) -> Any:
    """Return the `ray` module, initialised.

    - Ray already initialised in this process: reuse it (tests share one local Ray).
    - `address=None`: start a private local Ray (`address="local"`), so a run never
      silently attaches to some other cluster that happens to be reachable.
    - an address ("ray://host:10001", "host:6379", "auto"): connect to that cluster.
    Either way the job's runtime environment carries `worker_env_vars()` (merged into a
    `runtime_env` passed here), so every worker of the job sees the driver's credentials.
    Usage stats are off and worker logs are not streamed to the driver unless asked.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if os.environ.get("BERTFLOW_ROUTE_RAY_LOGS") == "1":
        # The bertflow CLI owns logging: Ray's records go through its handlers (terminal
        # filter + log file) instead of Ray's own stderr handler.
        ray_logger = logging.getLogger("ray")
        for handler in list(ray_logger.handlers):
            ray_logger.removeHandler(handler)
        ray_logger.propagate = True

    if ray.is_initialized():
        _after_init()
        return ray
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "configure_logging": False}
    options.update(kwargs)
    runtime_env = worker_runtime_env(options.get("runtime_env"))
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
        log.info("Ray workers get the credential variables %s",
                 ", ".join(sorted(runtime_env.get("env_vars", {}))) or "(none)")
    if address is None:
        start_local_ray(ray, options)
        log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    else:
        options.pop("include_dashboard", None)  # only valid when starting a new cluster
        options.pop("num_cpus", None)
        set_train_env(RAY_TRAIN_ENV)
        ray.init(address=address, **options)
        log.info("connected to Ray at %s", address)
    _after_init()
    return ray


def _after_init() -> None:
    for hook in AFTER_INIT:
        hook()


# Ray Train settings, read by the driver and handed on to Train's controller; a value the
# user set wins. Every run: the controller polls its workers every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a poll is also when it takes a
# worker's report (a queue of one): a run's end, and a checkpoint reported within that
# interval of the previous one, waited up to 2 s for it. A poll is one small actor call.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# On a private local Ray only: Ray Train 2.60 starts a preemption watcher actor (a process
# of its own) for every training run, to notice nodes being drained; there are none.
LOCAL_RAY_TRAIN_ENV = {**RAY_TRAIN_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def set_train_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        os.environ.setdefault(key, value)


def start_local_ray(ray: Any, options: dict[str, Any], attempts: int = 3) -> None:
    """`ray.init(address="local")`, started again when its node times out during startup:
    Ray waits a fixed time for its raylet, which a busy machine can overrun. Train runs
    on it skip what only a cluster needs (`LOCAL_RAY_TRAIN_ENV`)."""
    set_train_env(LOCAL_RAY_TRAIN_ENV)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **options)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            log.warning("the local Ray timed out starting (busy machine?); starting it again "
                        "(%d of %d)", attempt + 1, attempts)
            ray.shutdown()


def map_with_actor_pool(ds: Any, fn: type, size: int, **options: Any) -> Any:
    """`ds.map_batches(fn, compute=ActorPoolStrategy(size=size), **options)` with actors
    that are not restarted. Ray Data hands every pool actor its constructor arguments
    through the object store, and with its default of endless restarts Ray logs an
    error per actor that a restart could lose them (ray-project/ray#53727), which reads
    like a failure: a lost actor fails the run instead, and the rerun starts afresh.
    Ray 2.60 deprecates such actor options (`ray_remote_args`) without a named
    replacement for max_restarts yet; its warning is kept off the user's terminal."""
    import ray

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(fn, compute=ray.data.ActorPoolStrategy(size=size),
                              max_restarts=0, **options)
