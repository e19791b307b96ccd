"""MLflow for bertflow: where runs are stored, logging models, registering versions, and
turning any model reference a user types into a local Hugging Face-format folder.

MLflow is imported inside the functions (this module is imported by CLI verbs at parse
time). Conventions other modules rely on:
- Default store: `sqlite:///<cwd>/mlruns.db`, artifacts in `<cwd>/mlartifacts/` (MLflow 3
  refuses plain `file:` stores; an absolute artifact folder keeps runs readable from any cwd).
- A bertflow model is logged as an MLflow pyfunc through models-from-code: the python model
  is the file `workflows/serving.py`, and the HF-format folder is the artifact named
  `MODEL_ARTIFACT` ("model"). Nothing is pickled, so it loads with
  MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
- Lineage lives in tags named in `TAG_*` on the run and on each registered version.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # key of the HF folder in the pyfunc's artifacts (serving.py reads it)
SERVING_FILE = Path(__file__).with_name("serving.py")

TAG_RUN_ID = "bertflow.run_id"
TAG_DATASET_FINGERPRINT = "bertflow.dataset_fingerprint"
TAG_DATASET_PATH = "bertflow.dataset_path"
TAG_BASE_MODEL = "bertflow.base_model"
TAG_TASK = "bertflow.task"
TAG_VERSION = "bertflow.version"
TAG_GIT_COMMIT = "bertflow.git_commit"
TAG_RUN_NAME = "bertflow.run_name"
TAG_MODEL_URI = "bertflow.model_uri"  # set on a run once its final model is logged
LINEAGE_TAGS = (TAG_RUN_ID, TAG_DATASET_FINGERPRINT, TAG_DATASET_PATH, TAG_BASE_MODEL, TAG_TASK)


class TrackingError(BertflowError):
    """A tracking store, run or model reference cannot be used; the message says which."""


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
            f"tracking URI {uri!r}: MLflow 3 does not accept plain file stores; use "
            f"sqlite:///PATH/mlruns.db or a server such as http://127.0.0.1:5000")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            return f"sqlite:///{path.resolve()}"
    return uri


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
            raise TrackingError(f"experiment {name!r} is deleted in {uri}; restore it "
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


def log_bert_model(model_dir: str | Path, *, run_id: str, tracking_uri: str | None = None,
                   artifact_path: str = "model", task: str = "pretraining",
                   extra_tags: dict[str, str] | None = None) -> str:
    """Log HF-format folder `model_dir` to run `run_id` as an MLflow pyfunc; return its URI.

    Models-from-code: the python model is `workflows/serving.py` (a file, not a pickled
    object) and the folder travels as the artifact `MODEL_ARTIFACT`, so loading it never
    unpickles anything. Requirements are given explicitly (inferring them would load the
    model in a subprocess); serving needs bertflow itself installed (serving.py imports
    it), so no code is copied into the model, which would shadow the installed packages.
    """
    import mlflow

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TrackingError(f"{model_dir}: not a Hugging Face-format model folder "
                            f"(config.json missing)")
    if not SERVING_FILE.is_file():
        raise TrackingError(f"{SERVING_FILE} is missing: cannot log a servable model")
    from importlib.metadata import version

    reqs = [f"{p}=={version(p)}" for p in ("torch", "safetensors", "numpy", "tokenizers")]
    tags = {TAG_TASK: task, **(extra_tags or {})}
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name=artifact_path, python_model=str(SERVING_FILE),
            artifacts={MODEL_ARTIFACT: str(model_dir)},
            pip_requirements=reqs, tags=tags)
    return info.model_uri


def register_model_version(model_uri: str, name: str, tags: dict[str, str] | None = None,
                           tracking_uri: str | None = None, timeout_s: float = 300):
    """Register `model_uri` under `name` as a NEW version (never overwrites); wait for READY."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    mlflow.set_registry_uri(resolve_tracking_uri(tracking_uri))
    mv = mlflow.register_model(model_uri, name, await_registration_for=int(timeout_s),
                               tags={k: str(v) for k, v in (tags or {}).items()})
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


def model_lineage(name: str, version: str | int, tracking_uri: str | None = None) -> dict[str, str]:
    """The lineage tags (run id, dataset fingerprint, base model, task) of a model version."""
    mv = client(tracking_uri).get_model_version(name, str(version))
    lineage = {k: v for k, v in mv.tags.items() if k in LINEAGE_TAGS}
    lineage.setdefault(TAG_RUN_ID, mv.run_id or "")
    return lineage


_MODELS_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


def _is_hf_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step under a Ray Train run folder."""
    def step_of(p: Path) -> int:
        state = p / "trainer_state.json"
        if state.is_file():
            return int(json.loads(state.read_text()).get("step", -1))
        digits = re.findall(r"\d+", p.name)
        return int(digits[-1]) if digits else -1

    ckpts = [p for p in run_dir.glob("checkpoint_*") if (p / "model").is_dir()]
    return max(ckpts, key=step_of) if ckpts else None


def find_hf_folder(path: Path) -> Path | None:
    """The HF-format model folder inside a local path: the folder itself, a bertflow
    checkpoint (`model/`), a Ray Train run folder (its latest checkpoint) or a downloaded
    MLflow pyfunc (`artifacts/model/`)."""
    if _is_hf_folder(path):
        return path
    for sub in (path / "model", path / "artifacts" / MODEL_ARTIFACT):
        if _is_hf_folder(sub):
            return sub
    ckpt = _latest_checkpoint(path)
    if ckpt is not None and _is_hf_folder(ckpt / "model"):
        return ckpt / "model"
    return None


def resolve_model(ref: str, dest: str | Path | None = None,
                  tracking_uri: str | None = None) -> Path:
    """A local HF-format folder for `ref`: `models:/NAME@ALIAS` (`@latest` = newest
    version), `models:/NAME/VERSION`, a checkpoint or Ray run folder, or an HF folder.

    Registered models are downloaded into `dest` (default: a fresh temporary folder).
    """
    match = _MODELS_REF.match(ref)
    if match is None:
        path = Path(ref).expanduser()
        if not path.exists():
            raise TrackingError(
                f"model {ref!r} not found: give models:/NAME@ALIAS, models:/NAME/VERSION, "
                f"a checkpoint folder or a Hugging Face-format folder (config.json + "
                f"model.safetensors)")
        found = find_hf_folder(path)
        if found is None:
            raise TrackingError(f"model {ref!r}: {path} holds no config.json + "
                                f"model.safetensors (nor a checkpoint with a model/ folder)")
        return found
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        if alias is not None:
            mv = c.get_model_version_by_alias(name, alias)
        elif version == "latest":
            mv = c.get_model_version_by_alias(name, "latest")
        else:
            mv = c.get_model_version(name, version)
    except MlflowException as exc:
        raise TrackingError(f"model {ref!r} is not in the registry at {uri}: "
                            f"{exc.message}. See `bertflow registry list`.") from None
    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="bertflow-model-"))
    dest.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dest)))
    found = find_hf_folder(local)
    if found is None:
        raise TrackingError(f"model {ref!r} (version {mv.version}) is not a bertflow model: "
                            f"no Hugging Face-format folder in its artifacts")
    return found
