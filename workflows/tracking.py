"""MLflow for bertflow: the one home of the run lifecycle and of model references.

- Store: `resolve_tracking_uri` (default `sqlite:///<cwd>/mlruns.db`, artifacts in
  `<cwd>/mlartifacts/`: MLflow 3 refuses plain `file:` stores; an absolute artifact folder
  keeps runs readable from any cwd), `client`, `ensure_experiment`, `find_run`.
- A stage's run: `open_run` (a new run with bertflow's tags, the params, the datasets as
  inputs; or, when resuming, the run of that name reopened), `log_and_register` (the
  final model folder as a pyfunc, then a new registered version whose tags carry the
  lineage and the `metric.*` values), `fail_run`.
- Lineage lives in the tags named `TAG_*` below, on runs and on registered versions.
- Model references: `parse_model_ref`, `get_model_version`, and `resolve_model(ref) ->
  Path` for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, checkpoints, run folders and
  model folders.
- A model that training starts from (fine-tuning's base, pretraining's `--init`) is
  pinned once: `pin_model(ref) -> PinnedModel`, the exact version (`models:/X/7`) or the
  model folder and the sha256 of its files. Its `lineage` (TAG_BASE_*, the exact
  reference and the one given) and `params` are what the run records, and its `fetch`
  yields exactly those bytes (the pinned version, checked against its manifest; the
  pinned folder, copied and checked against its sha256), so an alias promoted mid-run
  cannot make the record disagree with what was trained. The driver ships the fetched
  folder to the workers through the Ray object store (workflows/transfer.py) and deletes
  its copy: a worker never opens a driver-local path and needs no MLflow access.
- Server and credentials: `check_tracking_store(uri)` probes an MLflow server at start (a
  short timeout) so a server that is down is an error before any Ray work; `redact(text)`
  removes `user:password@` from URIs before they become params, tags or log lines. (The
  MLflow credential variables reach Ray workers through the runtime environment:
  data_prep.ray_env.worker_env_vars, workflows.training.engine.)
- Integrity: `register_model_version` records a sha256 manifest of every file of the
  version (the artifact `bertflow.sha256`, see workflows.integrity) and the manifest's own
  sha256 as the version tag `TAG_MANIFEST`; `verify_model_version` checks both, and
  `resolve_model` / `PinnedModel.fetch` refuse a version whose files differ. Registered
  names are checked by `check_model_name`.

A bertflow model is logged as an MLflow pyfunc through models-from-code: the python model
is the file `workflows/serving/pyfunc.py`, and the model folder is the artifact named
`MODEL_ARTIFACT` ("model"). Nothing is pickled, so it loads with
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. Loading it with MLflow still executes code from
the artifact store (the version's copy of pyfunc.py), which is why every version carries a
checksum manifest. MLflow is imported inside the functions (CLI verbs import this module
at parse time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from data_prep.storage import public_uri, redact
from workflows.run_folder import MODEL_ARTIFACT, find_model_folder

log = logging.getLogger(__name__)

SERVING_FILE = Path(__file__).parent / "serving" / "pyfunc.py"

# Lineage and provenance, on runs and registered versions.
TAG_RUN_ID = "bertflow.run_id"
TAG_DATASET_FINGERPRINT = "bertflow.dataset_fingerprint"
TAG_DATASET_PATH = "bertflow.dataset_path"
TAG_EVAL_DATASET = "bertflow.eval_dataset_fingerprint"
TAG_BASE_MODEL = "bertflow.base_model"
TAG_BASE_VERSION = "bertflow.base_model_version"
TAG_BASE_RUN = "bertflow.base_run_id"
TAG_BASE_DATASET = "bertflow.base_dataset_fingerprint"
TAG_BASE_REF = "bertflow.base_model_ref"  # as given (models:/X@champion); TAG_BASE_MODEL: pinned
TAG_BASE_FINGERPRINT = "bertflow.base_model_sha256"  # sha256 of the base's file manifest
BASE_TAGS = (TAG_BASE_MODEL, TAG_BASE_VERSION, TAG_BASE_RUN, TAG_BASE_DATASET, TAG_BASE_REF,
             TAG_BASE_FINGERPRINT)  # what PinnedModel.lineage records
TAG_TASK = "bertflow.task"
TAG_LABELS = "bertflow.labels"
TAG_VERSION = "bertflow.version"
TAG_GIT_COMMIT = "bertflow.git_commit"
TAG_RUN_NAME = "bertflow.run_name"
TAG_MODEL_URI = "bertflow.model_uri"  # set on a run once its final model is logged
TAG_SOURCE_PATH = "bertflow.source_path"  # an imported Hugging Face folder
TAG_CONFIG_HASH = "bertflow.config_sha256"
TAG_SWEEP_RUN = "bertflow.sweep_run_id"  # the parent run of the sweep a model won
TAG_SWEEP_NAME = "bertflow.sweep_name"
TAG_SWEEP_TRIAL = "bertflow.sweep_trial"  # a trial's child run: its run name
TAG_SWEEP_WINNER = "bertflow.sweep_winner_run_id"  # set on the parent once the winner is logged
TAG_SWEEP_WINNER_PARAMS = "bertflow.sweep_winner_params"  # the winning point, as JSON
TAG_KIND = "bertflow.kind"  # "sweep" on a sweep's parent run
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own tag: the UI nests child runs under it
TAG_MANIFEST = "bertflow.manifest_sha256"  # sha256 of the version's bertflow.sha256 artifact
# Set in every process bertflow starts (the CLI itself, Ray jobs, the MLflow server):
# MLflow may not unpickle model files, and sends no telemetry (on by default in MLflow 3).
MLFLOW_SAFE_ENV = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


class TrackingError(BertflowError):
    """A tracking store, run or model reference cannot be used; the message says which."""


class ModelNotFound(TrackingError):
    """A `models:/` reference names no registered version."""


class IntegrityError(TrackingError):
    """A registered version's files are not those it was registered with (or cannot be
    checked); the message names the files."""


def check_model_name(name: str) -> str:
    """`name` if it can be a registered model name, else a TrackingError saying why."""
    from workflows.config import MODEL_NAME, MODEL_NAME_RULE

    if not MODEL_NAME.match(name or ""):
        raise TrackingError(f"model name {name!r}: use {MODEL_NAME_RULE}")
    return name


def name_filter(name: str) -> str:
    """An MLflow filter string matching registered model `name` exactly (names made by
    other tools may hold an apostrophe: quoted with the other quote)."""
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise TrackingError(f"model name {name!r} holds both quote characters; MLflow cannot "
                        f"search for it (rename it in the MLflow UI)")


# ---------------------------------------------------------------- the store


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else `./mlruns.db` (sqlite).

    Relative sqlite paths are made absolute so that Ray workers (other cwd) find the same
    store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"
    if uri.startswith("file:") or (("://" not in uri) and not uri.startswith("databricks")):
        raise TrackingError(
            f"tracking URI {redact(uri)!r}: MLflow 3 does not accept plain file stores; use "
            f"sqlite:///PATH/mlruns.db or a server such as http://127.0.0.1:5000")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            return f"sqlite:///{path.resolve()}"
    return uri


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail now, not after the workers started, when the tracking store cannot answer:
    an http(s) server is probed at /health with a short timeout."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    if warning := cleartext_password_warning(uri):
        log.warning(warning)
    shown = redact(uri)
    url = public_uri(uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # it answers; credentials are checked on first use
            return
        raise TrackingError(f"MLflow server at {shown} answered {exc.code} on /health: is "
                            f"this an MLflow server? Set MLFLOW_TRACKING_URI (or "
                            f"--tracking-uri) to one") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow server at {shown} is not reachable ({reason}): start it (`bertflow "
            f"server`) or set MLFLOW_TRACKING_URI (or --tracking-uri) to a server that "
            f"runs") from None


def cleartext_password_warning(uri: str, environ: dict[str, str] | None = None) -> str | None:
    """What to tell the user when a password or token would cross the network in
    cleartext: an `http://` tracking URI to another machine with MLFLOW_TRACKING_PASSWORD
    / MLFLOW_TRACKING_TOKEN set (or a `user:password@` in the URI). None otherwise."""
    import ipaddress
    from urllib.parse import urlsplit

    environ = os.environ if environ is None else environ
    if not uri.lower().startswith("http://"):
        return None
    host = urlsplit(public_uri(uri)).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    sent = [k for k in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN") if environ.get(k)]
    if redact(uri) != uri:
        sent.append("the password in the tracking URI")
    if loopback or not sent:
        return None
    return (f"tracking URI {redact(uri)} is cleartext http:// to another machine: "
            f"{' and '.join(sent)} cross the network readable by anyone on the path. Put "
            f"the MLflow server behind a TLS reverse proxy and use https:// (docs/security.md)")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifact root for new experiments: a folder `mlartifacts` beside a sqlite store;
    None (the server decides) for other stores."""
    db = _sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def client(tracking_uri: str | None = None):
    """An MlflowClient bound to the resolved tracking (and registry) URI."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created (artifacts beside a sqlite store) if missing."""
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted in {redact(uri)}; restore it "
                                f"(mlflow experiments restore) or choose another --experiment")
        return exp.experiment_id
    root = default_artifact_root(uri)
    location = f"{root}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}" if root else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(experiment_id: str, run_name: str, tracking_uri: str | None = None):
    """The newest unfinished-or-finished run tagged with bertflow run name `run_name`, or None."""
    runs = client(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_RUN_NAME}` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def bertflow_tags() -> dict[str, str]:
    """Tags every bertflow run carries: the package version and the git commit (if any)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {TAG_VERSION: version("bertflow")}
    except PackageNotFoundError:
        tags = {TAG_VERSION: "unknown"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags[TAG_GIT_COMMIT] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


# ---------------------------------------------------------------- a stage's run


@dataclass
class DatasetInput:
    """A prepared dataset recorded as a run input: its folder, manifest and role."""

    path: Path | str              # a local folder, or a URI (s3://...)
    manifest: Any                 # data_prep.manifest.Manifest
    context: str                  # "train" or "eval"
    manifest_artifact: str        # where its manifest.json is logged in the run


def open_run(uri: str, experiment: str, run_name: str, *, tags: dict[str, str],
             params: dict[str, Any], inputs: list[DatasetInput] = (),
             metrics: dict[str, float] | None = None, resume: bool = False) -> str:
    """The id of a stage's MLflow run, which the driver creates and rank 0 logs into (a
    sweep trial's rank 0 opens its own: engine.RunTracking).

    With `resume`, the newest run named `run_name` is reopened (the curves continue);
    otherwise a new run gets bertflow's tags plus `tags`, the params (lists and dicts as
    JSON), each dataset as an input (manifest fingerprint and path, manifest logged) and
    `metrics` at step 0.
    """
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    experiment_id = ensure_experiment(experiment, uri)
    if resume and (run := find_run(experiment_id, run_name, uri)) is not None:
        log.info("resuming MLflow run %s (%s)", run.info.run_id, run_name)
        return run.info.run_id
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={k: redact(str(v)) for k, v in
                                {**bertflow_tags(), **tags, TAG_RUN_NAME: run_name}.items()},
                          log_system_metrics=False) as run:
        mlflow.log_params({k: redact(json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                           for k, v in params.items()})
        for ds in inputs:
            source = _dataset_source(ds.path)
            mlflow.log_input(MetaDataset(source, name=Path(str(ds.path)).name,
                                         digest=ds.manifest.fingerprint[:32]),
                             context=ds.context)
            mlflow.log_dict(ds.manifest.to_dict(), ds.manifest_artifact)
        if metrics:
            mlflow.log_metrics(metrics, step=0)
        return run.info.run_id


def _dataset_source(path: Path) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow registers the local source twice; harmless
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(path))


def fail_run(run_id: str, uri: str) -> None:
    """Mark the run FAILED (rerunning the same command resumes it from its checkpoint)."""
    client(uri).set_terminated(run_id, status="FAILED")


def log_and_register(model_dir: str | Path, *, run_id: str, uri: str, task: str,
                     tags: dict[str, str], register_as: str | None,
                     version_tags: dict[str, str] | None = None,
                     metrics: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """Log a stage's final model folder to its run and, with `register_as`, register it.

    The logged model carries `tags` (its lineage); the run gets `TAG_MODEL_URI` (so a
    rerun knows the model was logged). The registered version carries `tags`,
    `version_tags`, the run id and task, and one `metric.NAME` tag per numeric metric.
    Returns (model URI, version or None).
    """
    tags = {k: redact(str(v)) for k, v in tags.items()}
    version_tags = {k: redact(str(v)) for k, v in (version_tags or {}).items()}
    uploaded = uploaded_files(model_dir)  # hashed before the upload: record_manifest compares
    model_uri = log_bert_model(model_dir, run_id=run_id, tracking_uri=uri, task=task,
                               extra_tags=tags)
    client(uri).set_tag(run_id, TAG_MODEL_URI, model_uri)
    if not register_as:
        return model_uri, None
    mv_tags = {**tags, **version_tags, TAG_RUN_ID: run_id, TAG_TASK: task,
               **{f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()
                  if isinstance(v, (int, float))}}
    mv = register_model_version(model_uri, register_as, mv_tags, tracking_uri=uri,
                                uploaded=uploaded)
    return model_uri, str(mv.version)


# ---------------------------------------------------------------- is it there


def tracker_reachable(uri: str, timeout_s: float = 5.0) -> bool:
    """Whether the tracking store answers now (a server's /health; other stores: True)."""
    try:
        check_tracking_store(uri, timeout_s)
        return True
    except TrackingError:
        return False


def wait_for_tracker(uri: str, wait_s: float, poll_s: float = 5.0) -> bool:
    """Whether the tracking store answers within `wait_s` (checked every `poll_s`)."""
    deadline = time.monotonic() + wait_s
    while not tracker_reachable(uri, min(5.0, max(1.0, wait_s))):
        if time.monotonic() >= deadline:
            return False
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    return True


# Copied into every logged model (its `code/` folder, MLflow's code_paths), so MLflow's own
# environment manager can serve it from its requirements alone; pyfunc.py imports them.
CODE_PACKAGES = ("bert_core", "data_prep", "workflows")
# What that code imports beyond MLflow (which MLflow adds itself), pinned to the versions
# installed here. A local version label (`2.13.0+cpu`) names a build PyPI does not have.
SERVING_REQUIREMENTS = ("torch", "safetensors", "numpy", "tokenizers", "pyarrow", "pyyaml")


def serving_requirements() -> list[str]:
    """The pip requirements logged with a model: `SERVING_REQUIREMENTS` at the installed
    versions, without local version labels."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+', 1)[0]}" for p in SERVING_REQUIREMENTS]


def _code_files() -> dict[str, Path]:
    """`code/PKG/...` -> the file, for the `CODE_PACKAGES` a logged model carries."""
    root = Path(__file__).resolve().parents[1]
    return {f"code/{p.relative_to(root).as_posix()}": p
            for pkg in CODE_PACKAGES for p in sorted((root / pkg).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def uploaded_files(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file `log_bert_model` uploads from this machine, by its path in the
    logged model (the model folder under `artifacts/`, the pyfunc file, the code):
    taken before the upload, so `record_manifest` can refuse a store that returns other
    bytes than were sent."""
    from workflows.integrity import build_manifest, file_sha256, parse_manifest

    model_dir = Path(model_dir)
    # MLflow copies an artifact folder under its own name (artifacts/<folder name>/...).
    out = {f"artifacts/{model_dir.resolve().name}/{rel}": digest for rel, digest in
           parse_manifest(build_manifest(model_dir), str(model_dir)).items()}
    out[SERVING_FILE.name] = file_sha256(SERVING_FILE)
    out.update({rel: file_sha256(p) for rel, p in _code_files().items()})
    return out


def log_bert_model(model_dir: str | Path, *, run_id: str, tracking_uri: str | None = None,
                   artifact_path: str = "model", task: str = "pretraining",
                   extra_tags: dict[str, str] | None = None) -> str:
    """Log HF-format folder `model_dir` to run `run_id` as an MLflow pyfunc; return its URI.

    Models-from-code: the python model is `workflows/serving/pyfunc.py` (a file, not a pickled
    object) and the folder travels as the artifact `MODEL_ARTIFACT`, so loading it never
    unpickles anything. bertflow's own packages travel in the model's `code/` folder
    (`CODE_PACKAGES`; MLflow puts it first on sys.path when it loads the model, so the
    model runs the code it was registered with, covered by its manifest), and the
    requirements are explicit (`serving_requirements`; inferring them would load the
    model in a subprocess): MLflow's default environment manager can serve it.
    """
    import mlflow

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TrackingError(f"{model_dir}: not a Hugging Face-format model folder "
                            f"(config.json missing)")
    if not SERVING_FILE.is_file():
        raise TrackingError(f"{SERVING_FILE} is missing: cannot log a servable model")
    root = Path(__file__).resolve().parents[1]
    tags = {TAG_TASK: task, **(extra_tags or {})}
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name=artifact_path, python_model=str(SERVING_FILE),
            artifacts={MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(root / pkg) for pkg in CODE_PACKAGES],
            pip_requirements=serving_requirements(), tags=tags)
    return info.model_uri


def register_model_version(model_uri: str, name: str, tags: dict[str, str] | None = None,
                           tracking_uri: str | None = None, timeout_s: float = 300,
                           uploaded: dict[str, str] | None = None):
    """Register `model_uri` under `name` as a NEW version (never overwrites); wait for READY.

    Before registering, the logged model's files are hashed into the manifest artifact
    `bertflow.sha256`, and the version gets the manifest's sha256 as tag `TAG_MANIFEST`.
    `uploaded` (`uploaded_files`, taken before the upload) must agree with what the store
    returns, else nothing is registered (IntegrityError).
    """
    import mlflow

    check_model_name(name)
    uri = resolve_tracking_uri(tracking_uri)
    manifest_sha = record_manifest(model_uri, uri, uploaded)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from workflows.mlflow_internals import prints_to_log

    with prints_to_log():  # MLflow's "Successfully registered" lines: the log file only
        mv = mlflow.register_model(model_uri, name, await_registration_for=int(timeout_s),
                                   tags={**{k: str(v) for k, v in (tags or {}).items()},
                                         TAG_MANIFEST: manifest_sha})
    c = client(tracking_uri)
    deadline = time.monotonic() + timeout_s
    while mv.status != "READY":
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise TrackingError(f"registering {model_uri} as {name!r} failed "
                                f"(status {mv.status}: {mv.status_message})")
        time.sleep(1)
        mv = c.get_model_version(name, mv.version)
    log.info("registered %s version %s", name, mv.version)
    return mv


def record_manifest(model_uri: str, tracking_uri: str,
                    uploaded: dict[str, str] | None = None) -> str:
    """Hash every file of the logged model `model_uri` (models:/m-...) as stored, add the
    manifest to the model's artifacts and return the manifest's sha256. Each file of
    `uploaded` (path -> sha256 of the bytes sent) must be stored with those bytes: a file
    swapped in the store between the upload and this download is refused, not blessed."""
    import tempfile

    import mlflow

    from workflows.integrity import MANIFEST_FILE, build_manifest, parse_manifest, text_sha256

    model_id = model_uri.removeprefix("models:/")
    if not model_id.startswith("m-"):
        raise TrackingError(f"{model_uri}: only a logged model (models:/m-...) can be "
                            f"registered with a checksum manifest")
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="bertflow-manifest-") as tmp:
        stored = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=str(Path(tmp) / "model")))
        manifest = build_manifest(stored)
        entries = parse_manifest(manifest, f"{model_uri} as stored")
        changed = sorted(rel for rel, digest in (uploaded or {}).items()
                         if entries.get(rel) != digest)
        if changed:
            listed = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more"
                                               if len(changed) > 5 else "")
            raise IntegrityError(
                f"{model_uri}: the artifact store returned other bytes than were uploaded "
                f"for {listed}; not registered. Something changed the store's copy (or "
                f"the upload failed): check who can write it, then log the model again")
        path = Path(tmp) / MANIFEST_FILE
        path.write_text(manifest, encoding="utf-8")
        client(tracking_uri).log_model_artifact(model_id, str(path))
    return text_sha256(manifest)


# ---------------------------------------------------------------- model references

_MODELS_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?$")


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of `models:/NAME`, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION`; None for anything else (a path)."""
    m = _MODELS_REF.match(ref)
    return (m["name"], m["alias"], m["version"]) if m else None


def get_model_version(ref: str, tracking_uri: str | None = None) -> Any:
    """The registered ModelVersion of a `models:/` reference: by alias (`@latest` is the
    newest version), by number, or the newest one for a bare name."""
    from mlflow.exceptions import MlflowException

    parsed = parse_model_ref(ref)
    if parsed is None:
        raise ModelNotFound(f"{ref!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION "
                            f"reference")
    name, alias, version = parsed
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    try:
        if alias is not None or version == "latest":
            return c.get_model_version_by_alias(name, alias or "latest")
        if version is not None:
            return c.get_model_version(name, version)
        versions = c.search_model_versions(name_filter(name))
    except MlflowException as exc:
        raise ModelNotFound(f"model {ref!r} is not in the registry at {redact(uri)}: "
                            f"{redact(exc.message)}. "
                            "See `bertflow registry list`.") from None
    if not versions:
        raise ModelNotFound(f"model {ref!r}: no registered model of that name in "
                            f"{redact(uri)}. "
                            "See `bertflow registry list`.")
    return max(versions, key=lambda v: int(v.version))


@dataclass(frozen=True)
class PinnedModel:
    """A model reference resolved once (`pin_model`): the exact registered version, or a
    local model folder and the sha256 of its files.

    A run records the model it starts from with `lineage` and `params`, and loads it with
    `fetch`, which yields exactly the pinned bytes: an alias promoted, or a folder
    rewritten, after the pin cannot change what is trained (fetch fails instead). Plain
    values only, so it travels to Ray actors inside what they are given.
    """

    ref: str                        # as given: models:/X@champion, models:/X, a folder
    uri: str                        # exact: models:/X/7, or the model folder's absolute path
    fingerprint: str                # registered: its manifest's sha256 (TAG_MANIFEST); a
                                    # folder: sha256 of integrity.folder_manifest
    lineage: dict[str, str]         # the TAG_BASE_* tags of a model made from it
    name: str | None = None         # a registered version's name and number
    version: str | None = None
    tracking_uri: str | None = None  # the registry the version is in

    def params(self, key: str) -> dict[str, str]:
        """Run params naming the pin: `key` the exact reference, `<key>_ref` the one given."""
        return {key: self.uri, f"{key}_ref": self.ref}

    def fetch(self, dest: str | Path | None = None) -> Path:
        """The pinned model folder, a fresh copy under `dest` (default: a new temporary
        folder): the pinned version downloaded and checked against the manifest hash the
        pin holds, or the pinned folder copied and checked against its fingerprint."""
        import shutil
        import tempfile

        from workflows.integrity import folder_manifest, text_sha256

        dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="bertflow-model-"))
        if self.version is None:
            copy = dest / "model"
            shutil.copytree(self.uri, copy)  # links followed: the copy holds plain files
            if text_sha256(folder_manifest(copy)) != self.fingerprint:
                raise IntegrityError(
                    f"model {self.ref!r}: the files of {self.uri} changed after this run "
                    f"pinned them (sha256 {self.fingerprint[:16]}...); refusing to train "
                    f"from files other than those recorded. Run again once nothing writes "
                    f"the folder.")
            return copy
        local, checks = _download_checked(self.name, self.version, self.fingerprint,
                                          self.tracking_uri, dest)
        bad = [c for c in checks if not c.ok]
        if bad:
            listed = ", ".join(f"{c.path} ({c.status})" for c in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise IntegrityError(
                f"model {self.ref!r} (version {self.version} of {self.name}) was changed in "
                f"the artifact store since it was registered: {listed}{more}. Refusing to "
                f"load it; `bertflow registry verify {self.name}/{self.version}` lists "
                f"every file.")
        found = find_model_folder(local)
        if found is None:
            raise TrackingError(f"model {self.ref!r} (version {self.version}) is not a "
                                f"bertflow model: no Hugging Face-format folder in its "
                                f"artifacts")
        return found


def pin_model(ref: str, tracking_uri: str | None = None) -> PinnedModel:
    """Resolve `ref` once: a `models:/` reference (alias, number, bare name = newest) to
    its exact version, in one registry lookup (the version must carry its checksum
    manifest); a path to the model folder it holds (a checkpoint's; a run folder's latest
    checkpoint) and the sha256 of that folder's files. Nothing is downloaded yet: `fetch`."""
    from workflows.integrity import folder_manifest, text_sha256

    if parse_model_ref(ref) is None:
        folder = str(_model_folder_at(ref).resolve())
        fingerprint = text_sha256(folder_manifest(Path(folder)))
        return PinnedModel(ref, folder, fingerprint, {
            TAG_BASE_MODEL: folder, TAG_BASE_FINGERPRINT: fingerprint, TAG_BASE_REF: ref})
    uri = resolve_tracking_uri(tracking_uri)
    mv = get_model_version(ref, uri)
    expected = _manifest_tag(mv)
    exact = f"models:/{mv.name}/{mv.version}"
    tags = mv.tags or {}
    lineage = {TAG_BASE_MODEL: exact, TAG_BASE_VERSION: str(mv.version),
               TAG_BASE_RUN: tags.get(TAG_RUN_ID) or mv.run_id or "",
               TAG_BASE_FINGERPRINT: expected, TAG_BASE_REF: ref}
    if tags.get(TAG_DATASET_FINGERPRINT):
        lineage[TAG_BASE_DATASET] = tags[TAG_DATASET_FINGERPRINT]
    return PinnedModel(ref, exact, expected, lineage, mv.name, str(mv.version), uri)


def started_from(lineage: dict[str, str], run_tags: dict[str, str]) -> dict[str, str]:
    """`lineage` with the base-model tags a run recorded when it started in place of its
    own: what a resumed run's checkpoints continue from, whatever its reference names now."""
    return {**{k: v for k, v in lineage.items() if k not in BASE_TAGS},
            **{k: v for k, v in run_tags.items() if k in BASE_TAGS}}


def _model_folder_at(ref: str) -> Path:
    """The model folder a local path holds, or a TrackingError saying what to give."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise TrackingError(
            f"model {ref!r} not found: give models:/NAME@ALIAS, models:/NAME/VERSION, "
            f"a checkpoint folder or a Hugging Face-format folder (config.json + "
            f"model.safetensors)")
    found = find_model_folder(path)
    if found is None:
        raise TrackingError(f"model {ref!r}: {path} holds no config.json + "
                            f"model.safetensors (nor a checkpoint with a model/ folder)")
    return found


def resolve_model(ref: str, dest: str | Path | None = None,
                  tracking_uri: str | None = None) -> Path:
    """A local model folder for `ref`: `models:/NAME@ALIAS` (`@latest` = newest
    version), `models:/NAME/VERSION`, a checkpoint or Ray run folder, or a model folder.

    Registered models are downloaded into `dest` (default: a fresh temporary folder) and
    checked against their manifest; a local folder is used where it is. What is recorded
    as a run's starting point goes through `pin_model` instead.
    """
    if parse_model_ref(ref) is None:
        return _model_folder_at(ref)
    return pin_model(ref, tracking_uri).fetch(dest)


def verify_model_version(mv: Any, tracking_uri: str, dest: str | Path | None = None
                         ) -> tuple[Path, list[Any]]:
    """Download version `mv` into `dest` (default: a fresh temporary folder) and check its
    files against the manifest recorded at registration; returns (the downloaded folder,
    one `workflows.integrity.FileCheck` per file, the manifest first).

    The manifest itself must hash to the version's `TAG_MANIFEST` tag (a tag lives in the
    registry's database, the manifest beside the files it describes). A version without
    the tag was not registered by bertflow (or predates manifests): IntegrityError.
    """
    return _download_checked(mv.name, str(mv.version), _manifest_tag(mv), tracking_uri, dest)


def _manifest_tag(mv: Any) -> str:
    """The manifest sha256 a version was registered with (`TAG_MANIFEST`)."""
    expected = (mv.tags or {}).get(TAG_MANIFEST)
    if not expected:
        raise IntegrityError(
            f"model {mv.name} version {mv.version} has no checksum manifest (tag "
            f"{TAG_MANIFEST}): it was not registered by this bertflow, so its files cannot "
            f"be verified. Register the model folder again (e.g. `bertflow registry "
            f"import-hf DIR --name NAME`).")
    return expected


def _download_checked(name: str, version: str, expected: str, tracking_uri: str,
                      dest: str | Path | None) -> tuple[Path, list[Any]]:
    """Download exactly `name` version `version` and check it against its manifest, which
    must hash to `expected` (see verify_model_version)."""
    import tempfile

    import mlflow

    from workflows.integrity import MANIFEST_FILE, FileCheck, check_files, text_sha256

    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="bertflow-model-"))
    dest.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))
    manifest_path = local / MANIFEST_FILE
    if not manifest_path.is_file():
        return local, [FileCheck(MANIFEST_FILE, "MISSING")]
    manifest = manifest_path.read_text(encoding="utf-8", errors="replace")
    first = FileCheck(MANIFEST_FILE, "OK" if text_sha256(manifest) == expected else "MISMATCH")
    return local, [first, *check_files(local, manifest, f"{name}/{version}:{MANIFEST_FILE}")]


@contextlib.contextmanager
def resolved_model(ref: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """`resolve_model(ref)` for the length of a block: a registered version is downloaded
    into a temporary folder that is deleted at the end (ship it to workers meanwhile)."""
    import tempfile

    if parse_model_ref(ref) is None:
        yield resolve_model(ref)
        return
    with tempfile.TemporaryDirectory(prefix="bertflow-model-") as tmp:
        yield resolve_model(ref, dest=tmp, tracking_uri=tracking_uri)

