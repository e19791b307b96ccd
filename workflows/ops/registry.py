"""Browsing and curating the MLflow model registry: `bertflow registry
list|show|promote|verify|export|register`.

It reads what `workflows.tracking` writes: the lineage tags `TAG_*` on every registered
version. MLflow is imported inside the functions so that `bertflow registry --help` is
instant. Importing a Hugging Face folder is `workflows.ops.hf_import`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
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


def _version_metrics(c: Any, mv: Any) -> dict[str, float]:
    """A version's metrics: the `metric.*` tags registering wrote (no run lookup), else
    its run's."""
    tagged = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith("metric."):
            try:
                tagged[k[len("metric."):]] = float(v)
            except ValueError:
                pass
    return tagged or _run_metrics(c, mv.run_id)


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per registered model: name, latest version, aliases, task, base model, key
    metric, created (of the latest version), and `versions`: one row per version, newest
    first (`model` NAME/VERSION, aliases, task, key metric, base model, created)."""
    c = t.client(tracking_uri)
    versions_of = _all_versions(c)
    rows = []
    for rm in c.search_registered_models(max_results=1000, order_by=["name ASC"]):
        versions = sorted(versions_of.get(rm.name, []), key=lambda v: -int(v.version))
        if not versions:
            continue
        alias_of: dict[str, list[str]] = {}
        for a, v in sorted((rm.aliases or {}).items()):
            alias_of.setdefault(str(v), []).append(a)
        vrows = [{
            "model": f"{rm.name}/{mv.version}", "version": str(mv.version),
            "aliases": ", ".join(alias_of.get(str(mv.version), [])),
            "task": mv.tags.get(t.TAG_TASK, "-"),
            "key_metric": key_metric(_version_metrics(c, mv)),
            "base_model": mv.tags.get(t.TAG_BASE_MODEL, "-"),
            "created": _fmt_time(mv.creation_timestamp),
        } for mv in versions]
        latest = vrows[0]
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted((rm.aliases or {}).items()))
        rows.append({"name": rm.name, "latest": latest["version"], "aliases": aliases,
                     "task": latest["task"], "base_model": latest["base_model"],
                     "key_metric": latest["key_metric"], "created": latest["created"],
                     "versions": vrows})
    return rows


def version_rows(models: list[dict[str, Any]], per_model: int | None = 5
                 ) -> list[dict[str, Any]]:
    """`list_models`' versions as one table (the newest `per_model` of each model; None:
    all), with a row saying how many older ones were left out."""
    out = []
    for m in models:
        shown = m["versions"] if per_model is None else m["versions"][:per_model]
        out += shown
        if len(m["versions"]) > len(shown):
            out.append({"model": f"  ({len(m['versions']) - len(shown)} older: --all)"})
    return out


def _all_versions(c: Any) -> dict[str, list[Any]]:
    """{model name: its versions} over the whole registry, in one paged search with no
    filter string (a name that needs quoting cannot break it)."""
    found: dict[str, list[Any]] = {}
    token = None
    while True:
        page = c.search_model_versions(max_results=10_000, page_token=token)
        for v in page:
            found.setdefault(v.name, []).append(v)
        token = getattr(page, "token", None)
        if not token:
            return found


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
    try:
        info["labels"] = json.loads(mv.tags.get(t.TAG_LABELS, "null"))
    except ValueError:
        info["labels"] = None
    info["scorecards"] = scorecards_of(mv)
    info.update(_model_files(info["model_artifacts"]))
    if info["run_id"]:
        try:
            run = c.get_run(info["run_id"])
            info.update(run_name=run.info.run_name, run_status=run.info.status,
                        params=dict(run.data.params), metrics=dict(run.data.metrics),
                        artifact_uri=run.info.artifact_uri, experiment_id=run.info.experiment_id)
        except Exception as exc:  # the run may have been deleted; the version remains
            info["run_status"] = f"unavailable ({exc.__class__.__name__})"
    return info


def _model_files(model_artifacts: str) -> dict[str, Any]:
    """`size_bytes` of the version's model folder (the pyfunc's artifact
    `t.MODEL_ARTIFACT`) and its `architecture` (config.json: layers, hidden size, vocab);
    empty when the store cannot list them (show never fails on it)."""
    import tempfile

    from mlflow.artifacts import download_artifacts, list_artifacts

    folder = f"{model_artifacts.rstrip('/')}/artifacts/{t.MODEL_ARTIFACT}"
    out: dict[str, Any] = {}
    try:
        files = list_artifacts(artifact_uri=folder)
        out["size_bytes"] = sum(f.file_size or 0 for f in files if not f.is_dir)
        if any(f.path.endswith("config.json") for f in files):
            with tempfile.TemporaryDirectory(prefix="bertflow-show-") as tmp:
                config = json.loads(open(download_artifacts(
                    artifact_uri=f"{folder}/config.json", dst_path=tmp)).read())
            out["architecture"] = {k: config[k] for k in (
                "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "classifier_pooling") if k in config}
    except Exception as exc:  # an unreachable or foreign store: show the rest
        logging.getLogger(__name__).debug("no file listing for %s: %s", folder, exc)
    return out


# The settings that say how a version was trained, by task (the rest: --all).
KEY_PARAMS = {
    "pretraining": ("model_size", "max_steps", "lr", "batch_size", "grad_accum",
                    "num_workers", "max_seq_len", "optimizer", "precision", "seed"),
    "qa": ("epochs", "lr", "batch_size", "max_seq_len", "doc_stride", "max_query_len",
           "max_answer_len", "freeze_encoder", "seed"),
    "token-cls": ("epochs", "lr", "batch_size", "max_seq_len", "freeze_encoder", "seed"),
    "cls": ("epochs", "lr", "batch_size", "max_seq_len", "classifier_pooling",
            "freeze_encoder", "seed"),
}
SCORE_PREFIXES = ("val_", "eval_")
PARAM_LABELS = {"classifier_pooling": "pooling"}  # as the flag says it (--pooling)


def _scores(metrics: dict[str, float]) -> list[str]:
    """Eval metrics, each beside the trivial baseline's when there is one."""
    out = []
    for k in sorted(metrics):
        if not k.startswith(SCORE_PREFIXES) or k.endswith("_examples"):
            continue
        name = k.split("_", 1)[1]
        base = metrics.get(f"baseline_{name}", metrics.get(f"baseline_{k}"))
        out.append(f"{k} {metrics[k]:.4g}" + (f" (baseline {base:.4g})" if base is not None
                                               else ""))
    return out


def _size(info: dict[str, Any]) -> str:
    parts = []
    if info.get("size_bytes"):
        parts.append(f"{info['size_bytes'] / 1e6:.1f} MB")
    arch = info.get("architecture") or {}
    if "num_hidden_layers" in arch and "hidden_size" in arch:
        parts.append(f"{arch['num_hidden_layers']} layers x {arch['hidden_size']} hidden"
                     + (f", vocab {arch['vocab_size']}" if "vocab_size" in arch else ""))
    return "; ".join(parts) or "-"


def _how_to_use(ref: str, task: str) -> list[str]:
    if task in ("seq-cls", "pair-cls", "regression", "token-cls", "qa"):
        return [f"bertflow predict --model models:/{ref} --input FILE.csv --output scored.csv",
                f"bertflow registry promote {ref.replace('/', ' ')} --alias champion"]
    return [f"bertflow finetune --base models:/{ref} --train train.csv --eval dev.csv",
            f"bertflow embed --model models:/{ref} --input FILE.csv --output vectors.parquet",
            f"bertflow prep --vocab models:/{ref} --input CORPUS --output DIR"]


def render_summary(info: dict[str, Any]) -> str:
    """What a user needs first about a version: labels, how it was trained, its eval
    scores against the trivial baseline, its size and how to use it (`render_model`:
    everything, under `registry show --all`)."""
    ref = f"{info['name']}/{info['version']}"
    task = info["task"]
    params, metrics = info.get("params") or {}, info.get("metrics") or {}
    aliases = f"aliases {', '.join(info['aliases'])}; " if info["aliases"] else ""
    lines = [f"{info['name']} version {info['version']}  ({aliases}created {info['created']})"]
    labels = info.get("labels")
    lines.append(f"  task        {task}" + (
        f", {len(labels)} labels: {', '.join(map(str, labels))}" if labels else ""))
    keys = KEY_PARAMS.get(task, KEY_PARAMS["cls"] if task in ("seq-cls", "pair-cls", "regression")
                          else ())
    trained = [f"{PARAM_LABELS.get(k, k)} {_show_param(k, params[k])}" for k in keys
               if params.get(k) not in (None, "None")]
    base = info["tags"].get(t.TAG_BASE_MODEL)
    if task == "base":
        lines.append(f"  imported    from {info['tags'].get(t.TAG_SOURCE_PATH, '-')}")
    elif base or trained:
        lines.append(f"  trained     {'from ' + base + ': ' if base else ''}"
                     f"{', '.join(trained) or '-'}")
    if info["dataset_path"] != "-":
        lines.append(f"  data        {info['dataset_path']}")
    scores = _scores(metrics)
    if scores:
        lines.append(f"  eval        {scores[0]}")
        lines += [f"              {x}" for x in scores[1:]]
    for suite, card in sorted((info.get("scorecards") or {}).items()):
        lines += _scorecard_lines(suite, card)
    lines.append(f"  size        {_size(info)}")
    use = _how_to_use(ref, task)
    lines.append(f"  use it      {use[0]}")
    lines += [f"              {x}" for x in use[1:]]
    lines.append(f"  more        bertflow registry show {ref} --all  (lineage, run, files, "
                 "every param and metric)")
    return "\n".join(lines)


def scorecards_of(mv: Any) -> dict[str, dict[str, Any]]:
    """The version's scorecards (`bertflow eval`), suite -> the tag's JSON."""
    from workflows.evaluation.scorecard import SCORECARD_TAG

    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(SCORECARD_TAG):
            try:
                card = json.loads(value)
            except ValueError:
                continue
            out[card.get("suite", key[len(SCORECARD_TAG):])] = card
    return out


def _scorecard_lines(suite: str, card: dict[str, Any]) -> list[str]:
    avg = card.get("average")
    head = f"  scorecard   {suite}" + (f": average {avg:.4f}" if avg is not None else "")
    lines = [head]
    for name, t in card.get("tasks", {}).items():
        pm = (f"{t['mean']:.4f} +- {t['std']:.4f} over {t['n']} restarts" if t.get("n", 1) > 1
              else f"{t['mean']:.4f}")
        lines.append(f"              {name:<12} {t['metric']} {pm}")
    return lines


def compare_models(ref_a: str, ref_b: str, suite: str | None = None,
                   tracking_uri: str | None = None) -> tuple[Any, Any, list[Any]]:
    """The scorecards of two versions on one suite (`suite`, or the one both have) and
    their per-task differences (evaluation.scorecard.compare: B - A, the noise rule)."""
    from workflows.evaluation.scorecard import Scorecard, compare

    cards = []
    for ref in (ref_a, ref_b):
        mv = get_version(ref, tracking_uri)
        cards.append((mv, scorecards_of(mv)))
    (mv_a, a), (mv_b, b) = cards
    common = sorted(set(a) & set(b))
    if suite is None:
        if len(common) != 1:
            have = "; ".join(f"{mv.name}/{mv.version}: {', '.join(sorted(c)) or 'none'}"
                             for mv, c in cards)
            raise RegistryError(
                ("no suite scored for both versions" if not common else
                 f"both versions have scorecards for {', '.join(common)}: choose one with "
                 f"--suite") + f" ({have}). Score them with `bertflow eval A B --suite FILE`")
        suite = common[0]
    for mv, c in cards:
        if suite not in c:
            raise RegistryError(f"{mv.name}/{mv.version} has no scorecard for suite "
                                f"{suite!r} (it has: {', '.join(sorted(c)) or 'none'}); run "
                                f"`bertflow eval models:/{mv.name}/{mv.version} --suite ...`")
    card_a = Scorecard.from_tag(json.dumps(a[suite]), f"models:/{mv_a.name}/{mv_a.version}",
                                str(mv_a.version))
    card_b = Scorecard.from_tag(json.dumps(b[suite]), f"models:/{mv_b.name}/{mv_b.version}",
                                str(mv_b.version))
    return card_a, card_b, compare(card_a, card_b)


def _show_param(name: str, value: Any) -> str:
    if name == "classifier_pooling":  # bert_core's name of BERT's tanh pooler is "cls"
        return "pooler" if value == "cls" else str(value)
    return str(value)


def render_model(info: dict[str, Any]) -> str:
    """`show_model`'s result as readable text for the terminal: everything it holds."""
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


@dataclass
class Exported:
    """What `export` wrote: the version, the folder (the verified MLflow model), the model
    folder inside it, how many files were checked, and `transformers`: None when the
    model folder loads in transformers and predicts what bertflow predicts, else why not."""

    version: Any
    folder: Path
    model_folder: Path
    files: int
    transformers: str | None


def transformers_caveat(model_folder: Path) -> str | None:
    """Why a model folder cannot be used as a transformers model with bertflow's
    predictions, or None. Transformers' BertForSequenceClassification always runs its tanh
    pooler over [CLS]: a classifier trained with `--pooling mean` (or mean_last4) loads
    there without an error (its pooler newly initialised) and predicts something else."""
    config = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
    pooling = config.get("classifier_pooling", "cls")
    if "BertForSequenceClassification" in (config.get("architectures") or []) \
            and pooling != "cls":
        return (f"trained with --pooling {pooling}, which transformers' "
                f"BertForSequenceClassification does not implement (it would apply a "
                f"newly initialised [CLS] pooler and predict something else): use it "
                f"through bertflow or MLflow, not as a transformers model")
    return None


def export(ref: str, dest: str | Path, tracking_uri: str | None = None) -> Exported:
    """Write version `ref` (NAME@ALIAS, NAME/VERSION, NAME or models:/...) to the new folder
    `dest`: the MLflow model exactly as verified against the manifest recorded at
    registration. It is downloaded into a private temporary folder beside `dest`, checked
    there and renamed into place, so `dest` holds the bytes that were checked (or does not
    appear at all). Serve or load that copy (`mlflow models serve -m DEST`,
    `mlflow.pyfunc.load_model(DEST)`); `sha256sum -c bertflow.sha256` inside it re-checks."""
    import os
    import shutil
    import tempfile

    from workflows.integrity import LOCAL_ONLY_FILES
    from workflows.run_folder import find_model_folder

    mv = get_version(ref, tracking_uri)
    uri = t.resolve_tracking_uri(tracking_uri)
    dest = Path(dest).expanduser().absolute()
    if dest.exists() or dest.is_symlink():
        raise RegistryError(f"{dest} already exists; export writes a new folder (remove it "
                            f"or choose another)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))  # 0700
    try:
        local, checks = t.verify_model_version(mv, uri, tmp)
        bad = [c for c in checks if not c.ok]
        if bad:
            listed = ", ".join(f"{c.path} ({c.status})" for c in bad[:5])
            raise t.IntegrityError(
                f"{mv.name} version {mv.version} was changed in the artifact store since it "
                f"was registered: {listed}. Nothing exported; `bertflow registry verify "
                f"{mv.name}/{mv.version}` lists every file.")
        for name in LOCAL_ONLY_FILES:  # MLflow's download note: not part of the model
            (local / name).unlink(missing_ok=True)
        mask = os.umask(0o077)
        os.umask(mask)
        os.chmod(local, 0o777 & ~mask)
        os.rename(local, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model_folder = find_model_folder(dest)
    if model_folder is None:
        raise RegistryError(f"{dest}: version {mv.version} of {mv.name} holds no model folder "
                            f"(config.json + model.safetensors)")
    return Exported(mv, dest, model_folder, len(checks), transformers_caveat(model_folder))


def register_run(run_folder: str, name: str | None = None,
                 tracking_uri: str | None = None) -> tuple[Any, str, str | None]:
    """`bertflow registry register RUN_FOLDER`: complete the registration a job left in
    its run folder when the MLflow server was unreachable at its end (its kept metrics,
    the model, the version with the run's lineage; workflows.deferred_registration).
    Returns (the pending record, model URI, version or None)."""
    from data_prep.storage import LocationError
    from workflows.deferred_registration import register_pending
    from workflows.run_folder import RunFolder

    try:
        run = RunFolder.at(run_folder)
    except LocationError as exc:
        raise RegistryError(f"RUN_FOLDER {run_folder}: {exc}") from None
    if not run.location.is_dir() and not run.location.has_content():
        raise RegistryError(f"RUN_FOLDER {run_folder}: no such run folder (give the folder "
                            f"the training job printed)")
    return register_pending(run, name, tracking_uri)
