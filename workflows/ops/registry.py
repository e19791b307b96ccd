"""Browsing and curating the MLflow model registry: `bertflow registry
list|show|promote|verify`.

It reads what `workflows.tracking` writes: the lineage tags `TAG_*` on every registered
version. MLflow is imported inside the functions so that `bertflow registry --help` is
instant. Importing a Hugging Face folder is `workflows.ops.hf_import`.
"""

from __future__ import annotations

import time
from typing import Any

from bert_core.config_io import BertflowError
from workflows import tracking as t

# Metric shown as "key metric", by preference: task quality first, then losses.
KEY_METRIC_PREFERENCE = ("f1", "exact_match", "accuracy", "mlm_accuracy", "loss")


class RegistryError(BertflowError):
    """A registered model, version or alias cannot be changed."""


def as_model_ref(ref: str) -> str:
    """`models:/...` for what a user types at `bertflow registry`: NAME, NAME@ALIAS,
    NAME/VERSION (or already models:/...)."""
    return ref if ref.startswith("models:/") else f"models:/{ref}"


def get_version(ref: str, tracking_uri: str | None = None) -> Any:
    """The ModelVersion named by `NAME`, `NAME@ALIAS` or `NAME/VERSION` (NAME: the latest)."""
    return t.get_model_version(as_model_ref(ref), tracking_uri)


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
    c = t.client(tracking_uri)
    latest_of = _latest_versions(c)
    rows = []
    for rm in c.search_registered_models(max_results=1000, order_by=["name ASC"]):
        latest = latest_of.get(rm.name)
        if latest is None:
            continue
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted((rm.aliases or {}).items()))
        rows.append({
            "name": rm.name, "latest": str(latest.version), "aliases": aliases,
            "task": latest.tags.get(t.TAG_TASK, "-"),
            "base_model": latest.tags.get(t.TAG_BASE_MODEL, "-"),
            "key_metric": key_metric(_run_metrics(c, latest.run_id)),
            "created": _fmt_time(latest.creation_timestamp),
        })
    return rows


def _latest_versions(c: Any) -> dict[str, Any]:
    """{model name: its newest version} over the whole registry, in one paged search with
    no filter string (a name that needs quoting cannot break it)."""
    latest: dict[str, Any] = {}
    token = None
    while True:
        page = c.search_model_versions(max_results=10_000, page_token=token)
        for v in page:
            if v.name not in latest or int(v.version) > int(latest[v.name].version):
                latest[v.name] = v
        token = getattr(page, "token", None)
        if not token:
            return latest


def base_model_chain(ref: str, tracking_uri: str | None = None, max_depth: int = 10
                     ) -> list[str]:
    """The models `ref` was built from, nearest first, following the base-model tag of each
    registered version until a model that is not in the registry (e.g. a folder)."""
    chain: list[str] = []
    current = ref
    for _ in range(max_depth):
        try:
            mv = get_version(current, tracking_uri)
        except t.ModelNotFound:
            break
        base = mv.tags.get(t.TAG_BASE_MODEL)
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
    c = t.client(tracking_uri)
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
    if info["tags"].get(t.TAG_SWEEP_RUN):  # the winner of a `bertflow sweep`
        lines.append(f"  sweep            {info['tags'].get(t.TAG_SWEEP_NAME, '-')}  "
                     f"(run {info['tags'][t.TAG_SWEEP_RUN]})")
    extra = {k: v for k, v in info["tags"].items() if k in (
        t.TAG_SOURCE_PATH, t.TAG_CONFIG_HASH, t.TAG_MANIFEST, t.TAG_BASE_REF,
        t.TAG_BASE_FINGERPRINT)}
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

    c = t.client(tracking_uri)
    get_version(f"{name}/{version}", tracking_uri)  # a clear error for a missing version
    try:
        c.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise RegistryError(f"cannot set alias {alias!r} on {name} version {version}: "
                            f"{exc.message}") from None
    return c.get_model_version_by_alias(name, alias)


def verify(ref: str, tracking_uri: str | None = None) -> tuple[Any, list[Any]]:
    """(the version, one `FileCheck` per file) of `NAME@ALIAS`, `NAME/VERSION` or `NAME`:
    its files as stored now against the checksum manifest recorded at registration."""
    import tempfile

    mv = get_version(ref, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="bertflow-verify-") as tmp:
        _, checks = t.verify_model_version(mv, t.resolve_tracking_uri(tracking_uri), tmp)
    return mv, checks
