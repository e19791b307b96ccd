"""Browsing and curating the MLflow model registry, and serving the store with its UI.

`list_models`, `show_model`, `promote`, `import_hf` back `bertflow registry`;
`server_command` / `start_server` back `bertflow server`. They read what
`workflows.tracking` writes: the lineage tags `TAG_*` on every registered version.
MLflow is imported inside the functions so that `bertflow registry --help` is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError

log = logging.getLogger(__name__)

# Tags written here in addition to workflows.tracking's lineage tags.
TAG_SOURCE_PATH = "bertflow.source_path"
TAG_CONFIG_HASH = "bertflow.config_sha256"

# Files of a Hugging Face BERT folder that a bertflow model needs (others, such as a
# sentence-transformers pooling config, are not copied into the registry).
HF_MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.json", "bertflow.json")

# Metric shown as "key metric", by preference: task quality first, then losses.
KEY_METRIC_PREFERENCE = ("f1", "exact_match", "accuracy", "mlm_accuracy", "loss")


class RegistryError(BertflowError):
    """A registered model, version or alias does not exist or cannot be changed."""


def default_tracking_uri(uri: str | None = None) -> str:
    """The store to use: `uri`, else $MLFLOW_TRACKING_URI, else ./mlruns.db (absolute)."""
    from workflows.tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri)


def format_table(rows: list[dict[str, Any]], columns: list[str], max_width: int = 48) -> str:
    """A plain aligned text table of `rows` (long cells lose their middle to an ellipsis)."""
    def cell(v: Any) -> str:
        s = "-" if v is None or v == "" else str(v)
        s = s.replace("\n", " ")
        if len(s) <= max_width:
            return s
        # Cut the middle: the start and the end of paths and messages say the most.
        head = (max_width - 1) // 2
        return s[:head] + "…" + s[len(s) - (max_width - 1 - head):]

    table = [[c.upper().replace("_", " ") for c in columns]]
    table += [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in table)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `NAME`, `NAME@ALIAS`, `NAME/VERSION` or `models:/...`."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.split("/", 1)
        return name, None, version
    return ref, None, None


def _client(tracking_uri: str | None):
    from workflows.tracking import client

    return client(tracking_uri)


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def key_metric(metrics: dict[str, float]) -> str:
    """The most telling metric of a run as `name=value` (task quality before losses)."""
    for wanted in KEY_METRIC_PREFERENCE:
        # prefer eval metrics, then the shortest name (e.g. eval_f1 over eval_f1_macro)
        hits = sorted((k for k in metrics if k.split("/")[-1].endswith(wanted)),
                      key=lambda k: (0 if "eval" in k or "val" in k else 1, len(k)))
        if hits:
            return f"{hits[0]}={metrics[hits[0]]:.4g}"
    return "-"


def _run_metrics(c: Any, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        return dict(c.get_run(run_id).data.metrics)
    except Exception:  # a run deleted after registering: the version still lists
        return {}


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per registered model: name, latest version, aliases, task, base model, key
    metric, created (of the latest version)."""
    from workflows.tracking import TAG_BASE_MODEL, TAG_TASK

    c = _client(tracking_uri)
    rows = []
    for rm in c.search_registered_models(max_results=1000, order_by=["name ASC"]):
        versions = c.search_model_versions(f"name = '{rm.name}'")
        if not versions:
            continue
        latest = max(versions, key=lambda v: int(v.version))
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted((rm.aliases or {}).items()))
        rows.append({
            "name": rm.name, "latest": str(latest.version), "aliases": aliases,
            "task": latest.tags.get(TAG_TASK, "-"),
            "base_model": latest.tags.get(TAG_BASE_MODEL, "-"),
            "key_metric": key_metric(_run_metrics(c, latest.run_id)),
            "created": _fmt_time(latest.creation_timestamp),
        })
    return rows


def get_version(ref: str, tracking_uri: str | None = None) -> Any:
    """The ModelVersion named by `NAME`, `NAME@ALIAS` or `NAME/VERSION` (NAME: the latest)."""
    from mlflow.exceptions import MlflowException

    c = _client(tracking_uri)
    name, alias, version = parse_ref(ref)
    try:
        if alias is not None:
            return c.get_model_version_by_alias(name, alias)
        if version is not None:
            return c.get_model_version(name, version)
        versions = c.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise RegistryError(f"{ref}: not in the registry ({exc.message}). "
                            "`bertflow registry list` shows the registered models.") from None
    if not versions:
        raise RegistryError(f"{ref}: no registered model of that name. "
                            "`bertflow registry list` shows the registered models.")
    return max(versions, key=lambda v: int(v.version))


def base_model_chain(ref: str, tracking_uri: str | None = None, max_depth: int = 10
                     ) -> list[str]:
    """The models `ref` was built from, nearest first, following the base-model tag of each
    registered version until a model that is not in the registry (e.g. a folder)."""
    from workflows.tracking import TAG_BASE_MODEL

    chain: list[str] = []
    current = ref
    for _ in range(max_depth):
        try:
            mv = get_version(current, tracking_uri)
        except RegistryError:
            break
        base = mv.tags.get(TAG_BASE_MODEL)
        if not base or base in chain:
            break
        chain.append(base)
        current = base
    return chain


def _model_artifact_location(c: Any, mv: Any) -> str:
    """Where the version's files are stored (MLflow 3 versions point at a logged model)."""
    model_id = getattr(mv, "model_id", None)
    if not model_id and str(mv.source).startswith("models:/m-"):
        model_id = str(mv.source).removeprefix("models:/")
    if model_id:
        try:
            return c.get_logged_model(model_id).artifact_location
        except Exception:  # an older store without logged models: show the source
            pass
    return str(mv.source)


def show_model(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Everything known about one model version: version, aliases, run, params, metrics,
    dataset, base-model chain and where its artifacts are."""
    from workflows import tracking as t

    c = _client(tracking_uri)
    mv = get_version(ref, tracking_uri)
    rm = c.get_registered_model(mv.name)
    info: dict[str, Any] = {
        "name": mv.name, "version": str(mv.version),
        "aliases": sorted(a for a, v in (rm.aliases or {}).items() if str(v) == str(mv.version)),
        "status": mv.status, "created": _fmt_time(mv.creation_timestamp),
        "task": mv.tags.get(t.TAG_TASK, "-"),
        "run_id": mv.run_id or mv.tags.get(t.TAG_RUN_ID, ""),
        "dataset_fingerprint": mv.tags.get(t.TAG_DATASET_FINGERPRINT, "-"),
        "dataset_path": mv.tags.get(t.TAG_DATASET_PATH, "-"),
        "base_model_chain": base_model_chain(f"{mv.name}/{mv.version}", tracking_uri),
        "source": mv.source, "tags": dict(mv.tags),
        "run_name": "-", "run_status": "-", "params": {}, "metrics": {}, "artifact_uri": "-",
        "model_artifacts": _model_artifact_location(c, mv),
    }
    if info["run_id"]:
        try:
            run = c.get_run(info["run_id"])
            info.update(run_name=run.info.run_name, run_status=run.info.status,
                        params=dict(run.data.params), metrics=dict(run.data.metrics),
                        artifact_uri=run.info.artifact_uri, experiment_id=run.info.experiment_id)
        except Exception as exc:  # the run may have been deleted; the version remains
            info["run_status"] = f"unavailable ({exc.__class__.__name__})"
    return info


def render_model(info: dict[str, Any]) -> str:
    """`show_model`'s result as readable text for the terminal."""
    chain = " <- ".join([f"{info['name']}/{info['version']}", *info["base_model_chain"]])
    lines = [
        f"{info['name']} version {info['version']}  ({info['status']}, created {info['created']})",
        f"  aliases          {', '.join(info['aliases']) or '-'}",
        f"  task             {info['task']}",
        f"  lineage          {chain}",
        f"  run              {info['run_id'] or '-'}  ({info['run_name']}, {info['run_status']})",
        f"  dataset          {info['dataset_path']}",
        f"  fingerprint      {info['dataset_fingerprint']}",
        f"  model files      {info['model_artifacts']}",
        f"  run artifacts    {info['artifact_uri']}",
    ]
    extra = {k: v for k, v in info["tags"].items() if k in (TAG_SOURCE_PATH, TAG_CONFIG_HASH)}
    lines += [f"  {k.split('.', 1)[1]:<16} {v}" for k, v in sorted(extra.items())]
    if info["metrics"]:
        lines.append("  metrics")
        lines += [f"    {k:<28} {v:.6g}" for k, v in sorted(info["metrics"].items())]
    if info["params"]:
        lines.append("  params")
        lines += [f"    {k:<28} {v}" for k, v in sorted(info["params"].items())]
    return "\n".join(lines)


def promote(name: str, version: str, alias: str, tracking_uri: str | None = None) -> Any:
    """Point `alias` (e.g. champion) at `name` version `version`; returns that version."""
    from mlflow.exceptions import MlflowException

    c = _client(tracking_uri)
    get_version(f"{name}/{version}", tracking_uri)  # a clear error for a missing version
    try:
        c.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise RegistryError(f"cannot set alias {alias!r} on {name} version {version}: "
                            f"{exc.message}") from None
    return c.get_model_version_by_alias(name, alias)


def config_hash(model_dir: Path) -> str:
    """sha256 of the model's config.json with keys sorted (formatting does not count)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def check_hf_bert_folder(model_dir: Path) -> dict[str, Any]:
    """The config of a Hugging Face-format BERT folder, or a RegistryError saying what is
    missing. Only safetensors weights are accepted (pickled .bin files are never loaded)."""
    if not model_dir.is_dir():
        raise RegistryError(f"{model_dir}: no such folder")
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt")
               if not (model_dir / f).is_file()]
    if missing:
        hint = (" (pytorch_model.bin is not accepted: convert it to safetensors first)"
                if (model_dir / "pytorch_model.bin").exists() else "")
        raise RegistryError(f"{model_dir}: not a Hugging Face-format BERT folder, missing "
                            f"{', '.join(missing)}{hint}")
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{model_dir / 'config.json'}:{exc.lineno}: invalid JSON") from None
    if config.get("model_type", "bert") != "bert":
        raise RegistryError(f"{model_dir / 'config.json'}: model_type is "
                            f"{config.get('model_type')!r}; bertflow imports BERT models only")
    return config


def import_hf(model_dir: str | Path, name: str, tracking_uri: str | None = None,
              experiment: str = "bertflow") -> Any:
    """Register an existing Hugging Face-format BERT folder (e.g. MiniLM) as a base model.

    A run named `import-NAME` records the source path, the config hash and the architecture;
    the model files are logged as a bertflow pyfunc and registered as a new version of
    `name` (task "base"). Returns the ModelVersion.
    """
    import mlflow

    from workflows import tracking as t

    src = Path(model_dir).expanduser().resolve()
    config = check_hf_bert_folder(src)
    uri = t.resolve_tracking_uri(tracking_uri)
    exp_id = t.ensure_experiment(experiment, uri)
    digest = config_hash(src)
    tags = {TAG_SOURCE_PATH: str(src), TAG_CONFIG_HASH: digest, t.TAG_TASK: "base",
            t.TAG_BASE_MODEL: str(src)}
    arch = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "vocab_size", "max_position_embeddings")
            if k in config}
    with tempfile.TemporaryDirectory(prefix="bertflow-import-") as tmp:
        # Copy only what a bertflow model needs, so the registry holds no stray files.
        staged = Path(tmp) / "model"
        staged.mkdir()
        for f in HF_MODEL_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, staged / f)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"import-{name}",
                              tags={**t.bertflow_tags(), **tags}, log_system_metrics=False) as run:
            mlflow.log_params({"source_path": str(src), "config_sha256": digest, **arch})
        model_uri = t.log_bert_model(staged, run_id=run.info.run_id, tracking_uri=uri,
                                     task="base", extra_tags=tags)
        mv = t.register_model_version(model_uri, name, tracking_uri=uri,
                                      tags={**tags, t.TAG_RUN_ID: run.info.run_id})
    log.info("imported %s as %s version %s", src, name, mv.version)
    return mv


# ---------------------------------------------------------------- tracking server

def server_command(tracking_uri: str | None = None, host: str = "127.0.0.1",
                   port: int = 5000, artifacts_dir: str | Path | None = None) -> list[str]:
    """The `mlflow server` command serving the project's store, UI and artifacts.

    The backend is the project's sqlite store; new artifacts are served by the server from
    `artifacts_dir` (default: `mlartifacts` beside the store, where local runs put theirs).
    """
    from workflows.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise RegistryError(f"tracking URI {uri}: `bertflow server` serves a local sqlite "
                            "store (e.g. sqlite:///$PWD/mlruns.db); an http:// URI is "
                            "already a server")
    db = Path(uri[len("sqlite:///"):])
    artifacts = Path(artifacts_dir) if artifacts_dir else db.parent / "mlartifacts"
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--backend-store-uri", uri, "--artifacts-destination", str(artifacts.resolve()),
            "--serve-artifacts", "--workers", "1"]


def wait_for_server(url: str, timeout_s: float = 60.0,
                    process: subprocess.Popen | None = None) -> None:
    """Return once the MLflow server at `url` answers /health; raise past `timeout_s` or if
    `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RegistryError(f"mlflow server exited with code {process.returncode} "
                                f"before answering at {url} (is the port taken?)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RegistryError(f"mlflow server at {url} did not answer within {timeout_s:.0f} s")


def _check_port_free(host: str, port: int) -> None:
    """Fail at once, with the fix, when the port is taken (mlflow itself would first spend
    many seconds starting its workers and then die with a less helpful message)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise RegistryError(
                f"cannot serve on {host}:{port}: {exc.strerror or exc}. Another server (maybe "
                f"an earlier `bertflow server`) uses that port: stop it or pass --port") from None


def start_server(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000,
                 artifacts_dir: str | Path | None = None, timeout_s: float = 60.0,
                 **popen_kwargs: Any) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` in its own process group; return it and its URL once it
    answers. The caller terminates it (`os.killpg(proc.pid, SIGTERM)`)."""
    _check_port_free(host, port)
    cmd = server_command(tracking_uri, host, port, artifacts_dir)
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        wait_for_server(url, timeout_s, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Terminate a server started by `start_server` (its whole process group)."""
    import os
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
