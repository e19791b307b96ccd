"""Fine-tuning: from any BERT (registered, checkpoint or Hugging Face folder) to an
evaluated, registered, servable task model, on the one training loop
(workflows.training.engine).

    run_finetune(FinetuneConfig) -> FinetuneResult

1. Check what can be checked before Ray starts: the MLflow server answers, `base` exists
   and is pinned once (workflows.tracking.pin_model: `models:/X@champion` becomes the
   exact `models:/X/7`, a folder its path and sha256; the lineage tags and params name
   the pin), the `--storage-path` is usable (engine.check_storage). Fetch exactly the
   pinned base on the driver into a temporary folder (checked against its manifest) and
   ship it through the Ray object store (workflows/transfer.py): the workers materialise
   it on their node, and the driver's download is deleted before training starts.
2. Read, validate and tokenize the train/eval files with data_prep.tasks (Ray Data,
   Parquet + manifest in the driver's cache, reused when up to date). `--train`/`--eval`
   may be URIs (fetched through pyarrow.fs). Labels come from the training file (sorted)
   or `labels`; eval rows with unknown labels are skipped and counted. The tokenized rows
   reach the Train workers through the object store, never as a path: the train rows as
   the task's `train_table` (finetune_task.TrainRows), which each worker reads in the
   canonical batch order of training/rows.py (reshuffled every epoch, the same global
   batches on any number of workers, a resume continues at its position without
   re-reading), the eval rows as the task's `val_rows` (the same kind of object), which
   every worker evaluates a share of, in order (no Ray Data pass per evaluation).
3. Turn epochs into optimizer steps, evaluate and checkpoint at each epoch's end, and
   train through `run_training` with a `FinetuneTask`; rank 0 logs metrics to the MLflow
   run created here (params = the whole config, dataset inputs, trivial baseline).
4. Log the final model folder as an MLflow pyfunc (workflows/serving/pyfunc.py), print the
   metrics per epoch as a table, and register it under `register_as` with tags for the
   task, labels, base model lineage, dataset fingerprint and eval metrics. With the
   MLflow server unreachable past `--tracker-wait-s`, the model stays in the run folder
   and `result.pending` is the command that registers it later
   (workflows.deferred_registration).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from workflows.config import FinetuneConfig, LoopSettings, flat_dict

log = logging.getLogger(__name__)


class FinetuneError(BertflowError):
    """A fine-tuning run cannot start; the message says what to change."""


@dataclass
class FinetuneResult:
    """What `run_finetune` returns."""

    model_dir: Path | str                # the final HF-format folder (a URI on remote storage)
    run_id: str                          # MLflow run
    model_uri: str | None                # the logged pyfunc (None: left for later)
    metrics: dict[str, float]            # final eval metrics (val_*)
    baseline: dict[str, float]           # trivial baseline on the eval file
    history: dict[str, dict[str, float]] = field(default_factory=dict)  # "epoch N" -> metrics
    model_version: str | None = None     # registered version, if register_as
    labels: list[str] = field(default_factory=list)
    steps: int = 0
    skipped: dict[str, Any] = field(default_factory=dict)  # per split: reason -> count
    table: str = ""
    pending: str | None = None           # the command that registers it later (tracker down)


def loop_for_epochs(cfg: FinetuneConfig, train_rows: int) -> tuple[LoopSettings, int]:
    """LoopSettings with epochs turned into steps; (loop, steps per epoch): the steps of
    an epoch of the batch plan the workers read (training/rows.py), the same every epoch
    (finetune_task.train_parts)."""
    from workflows.training.finetune_task import train_parts
    from workflows.training.rows import BatchPlan

    loop = cfg.loop
    plan = BatchPlan(train_parts(train_rows), loop.batch_size, loop.micro_batches_per_step,
                     loop.seed)
    steps_per_epoch = plan.steps_per_epoch(0)
    if steps_per_epoch < 1:
        raise FinetuneError(
            f"{cfg.train}: {train_rows} training rows make no full step of a global batch "
            f"of {loop.global_batch} (--batch-size {loop.batch_size} x --num-workers "
            f"{loop.max_workers} x --grad-accum {loop.grad_accum}, or --global-batch-size); "
            f"use a smaller batch or more data")
    max_steps = min(loop.max_steps, max(1, math.ceil(cfg.epochs * steps_per_epoch)))
    warmup = min(loop.warmup_steps or int(cfg.warmup_ratio * max_steps), max_steps)
    loop = dataclasses.replace(
        loop, max_steps=max_steps, warmup_steps=warmup,
        eval_every=loop.eval_every or steps_per_epoch,
        checkpoint_every=loop.checkpoint_every or steps_per_epoch,
        log_every=min(loop.log_every, steps_per_epoch))
    return loop, steps_per_epoch


def _history(client: Any, run_id: str, steps_per_epoch: int) -> dict[str, dict[str, float]]:
    """Eval metrics per evaluation step from the MLflow run, as table rows."""
    rows: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("val_"):
            for m in client.get_metric_history(run_id, key):
                rows.setdefault(m.step, {})[key[4:]] = m.value
    return {(f"epoch {step / steps_per_epoch:g} (step {step})" if step else "before training"):
            rows[step] for step in sorted(rows)}


def user_cache_dir() -> Path:
    """bertflow's cache folder: $XDG_CACHE_HOME/bertflow, else ~/.cache/bertflow."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "bertflow"


@dataclass
class PreparedFinetune:
    """What every fine-tuning run of one task, base and data shares (`prepare_finetune`):
    the resolved base, its lineage, the tokenized datasets, labels and the baseline. A
    sweep prepares once and trains many runs from it."""

    uri: str                             # resolved tracking URI
    base: Any                            # the base model folder (transfer.ShippedFolder)
    base_pin: Any                        # tracking.PinnedModel: what `base` was fetched from
    train: Any                           # data_prep.tasks TaskDataset
    evalset: Any | None
    labels: list[str]
    meta: dict[str, Any]                 # bertflow.json of the model
    qa_golds: dict[int, tuple[str, list[str]]]
    pad_id: int
    baseline: dict[str, float]
    train_table: Any = None              # finetune_task.TrainRows: the train rows (object store)
    val_table: Any = None                # finetune_task.TrainRows: the eval rows, or None

    @property
    def lineage(self) -> dict[str, str]:
        """The base model's tags (the exact version or folder sha256, the ref given)."""
        return self.base_pin.lineage

    @property
    def train_rows(self) -> int:
        return int(self.train.manifest.counts["rows"])

    def task_for(self, cfg: FinetuneConfig) -> Any:
        """The FinetuneTask of a run with settings `cfg` (frozen encoder, pooling)."""
        from workflows.training.finetune_task import FinetuneTask

        return FinetuneTask(task=cfg.task, base_dir=self.base,
                            tokenizer_dir=self.base, labels=self.labels,
                            pad_id=self.pad_id, meta=self.meta,
                            freeze_encoder=cfg.freeze_encoder,
                            pooling=cfg.classifier_pooling, qa_golds=self.qa_golds,
                            train_table=self.train_table, val_rows=self.val_table)

    def inputs(self) -> list[Any]:
        """The datasets as MLflow run inputs."""
        from workflows import tracking as T

        out = [T.DatasetInput(self.train.path, self.train.manifest, "train",
                              "datasets/train_manifest.json")]
        if self.evalset is not None:
            out.append(T.DatasetInput(self.evalset.path, self.evalset.manifest, "eval",
                                      "datasets/eval_manifest.json"))
        return out

    def run_tags(self, task: str) -> dict[str, str]:
        """Lineage tags of a run trained on these data."""
        from workflows import tracking as T

        return {**self.lineage, T.TAG_TASK: task, T.TAG_LABELS: json.dumps(self.labels),
                T.TAG_DATASET_FINGERPRINT: self.train.manifest.fingerprint,
                T.TAG_DATASET_PATH: str(self.train.path)}

    def model_tags(self) -> dict[str, str]:
        """Lineage tags of the logged model and its registered version."""
        from workflows import tracking as T

        extra = {T.TAG_LABELS: json.dumps(self.labels),
                 T.TAG_DATASET_FINGERPRINT: self.train.manifest.fingerprint, **self.lineage}
        if self.evalset is not None:
            extra[T.TAG_EVAL_DATASET] = self.evalset.manifest.fingerprint
        return extra



def prepare_finetune(cfg: FinetuneConfig) -> PreparedFinetune:
    """Steps 1-2 of the module doc: resolve the base, tokenize the train/eval files (reused
    when up to date), labels, bertflow.json and the trivial baseline."""
    import pyarrow.parquet as pq

    from data_prep.tasks.pipeline import TaskFeatures, build_task_dataset, text_fields
    from data_prep.tokenizer import WordPieceTokenizer
    from workflows import tracking as T
    from workflows.training.finetune_task import TrainRows, majority_baseline

    from data_prep.ray_env import init_ray
    from workflows.training.engine import check_storage
    from workflows.transfer import check_model_ref, local_file, open_checked, ship_model_folder

    uri = T.resolve_tracking_uri(cfg.tracking.tracking_uri)
    T.check_tracking_store(uri)
    pinned = T.pin_model(cfg.base, uri)  # once; a missing base fails here, before Ray
    check_model_ref(cfg.base)  # so does a broken or hostile folder
    for what, where in (("--train", cfg.train), ("--eval", cfg.eval)):
        if where and "://" in where:
            open_checked(where, what, must_exist=True)
    init_ray(cfg.address)
    check_storage(cfg.loop, uri)
    spec = TaskFeatures(cfg.task, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len)
    data_root = Path(cfg.data_dir) if cfg.data_dir else user_cache_dir() / "finetune"

    def build(where: str, split: str, labels: list[str] | None) -> Any:
        with local_file(where, f"--{split}") as path:
            return build_task_dataset(path, spec, base_dir, data_root, split=split,
                                      labels=labels, seed=cfg.loop.seed, address=cfg.address,
                                      source=where if "://" in where else None,
                                      columns=cfg.columns)

    with tempfile.TemporaryDirectory(prefix="bertflow-base-") as tmp:
        base_dir = pinned.fetch(tmp)  # exactly the pinned version's (or folder's) bytes
        if not (base_dir / "vocab.txt").is_file():
            raise FinetuneError(f"base model {cfg.base!r} has no vocab.txt: a model folder "
                                "must carry its tokenizer")
        tokenizer = WordPieceTokenizer.from_dir(base_dir)
        train = build(cfg.train, "train", cfg.labels)
        labels = train.labels
        evalset = (build(cfg.eval, "eval", labels if cfg.task != "qa" else None)
                   if cfg.eval else None)
        base = ship_model_folder(base_dir, origin=pinned.uri)  # the driver's copy goes with tmp
    version_2 = any(r["is_impossible"] for r in train.records) if cfg.task == "qa" else False
    meta = {"task": cfg.task, "labels": labels, "max_seq_len": cfg.max_seq_len,
            "doc_stride": cfg.doc_stride, "max_query_len": cfg.max_query_len,
            "max_answer_length": cfg.max_answer_len, "n_best": cfg.n_best,
            "null_score_threshold": cfg.null_score_threshold, "version_2": version_2,
            "base_model": pinned.uri,
            "dataset_fingerprint": train.manifest.fingerprint}
    if cfg.task == "regression":  # what the served model reads: a text or a pair
        meta["inputs"] = list(text_fields(cfg.task, cfg.columns))
    qa_golds = {}
    if cfg.task == "qa" and evalset is not None:
        qa_golds = {r["example_index"]: (r["context"], [] if r["is_impossible"] else
                                         [a["text"] for a in r["answers"]])
                    for r in evalset.records}
    baseline = (majority_baseline(cfg.task, train.records, evalset.records, labels)
                if evalset else {})
    train_table = TrainRows.put(pq.read_table(train.parquet_dir))
    val_table = TrainRows.put(pq.read_table(evalset.parquet_dir)) if evalset is not None else None
    return PreparedFinetune(uri=uri, base=base, base_pin=pinned, train=train,
                            evalset=evalset, labels=labels, meta=meta, qa_golds=qa_golds,
                            pad_id=tokenizer.pad_id, baseline=baseline,
                            train_table=train_table, val_table=val_table)


def run_params(cfg: FinetuneConfig, prep: PreparedFinetune, loop: LoopSettings,
               steps_per_epoch: int) -> dict[str, Any]:
    """The params of a fine-tuning run: the whole config and the derived step counts."""
    return {**flat_dict(cfg), **prep.base_pin.params("base"),  # base: the exact version
            "global_batch_size": loop.global_batch,  # the effective one (rank 0 logs it too)
            "steps_per_epoch": steps_per_epoch, "total_steps": loop.max_steps,
            "warmup_total": loop.warmup_steps,
            "train_examples": len(prep.train.records),
            "trainable_parameters_frozen": cfg.freeze_encoder,
            "classifier_pooling": cfg.classifier_pooling}


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune, evaluate, log and (with `register_as`) register; see the module doc."""
    from data_prep.storage import public_uri
    from workflows import tracking as T
    from workflows.deferred_registration import (PendingRegistration, finish_run,
                                                 register_command)
    from workflows.metrics import format_table
    from workflows.training.contracts import RunTracking
    from workflows.training.engine import run_folder, run_training

    cfg = config
    prep = prepare_finetune(cfg)
    uri, train, evalset, labels, baseline = (prep.uri, prep.train, prep.evalset, prep.labels,
                                             prep.baseline)
    task = prep.task_for(cfg)
    loop, steps_per_epoch = loop_for_epochs(cfg, prep.train_rows)

    # The driver creates the run; rank 0 logs training metrics into it.
    run_name = cfg.run_name or f"finetune-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = T.open_run(
        uri, cfg.tracking.experiment, run_name, inputs=prep.inputs(),
        tags=prep.run_tags(cfg.task), params=run_params(cfg, prep, loop, steps_per_epoch),
        metrics={f"baseline_{k}": v for k, v in baseline.items()})
    log.info("fine-tuning %s from %s: %d train rows, %d steps (%d per epoch)", cfg.task,
             prep.base_pin.uri, prep.train_rows, loop.max_steps, steps_per_epoch)
    run = run_folder(loop, run_name)
    result = run_training(task, loop, run=run,
                          tracking=RunTracking(uri, run_id, cfg.tracking.log_system_metrics))

    # The metrics rank 0 could not send, the model, its registration (workflows.
    # deferred_registration): or, with the server unreachable, left for later.
    final = {k: float(v) for k, v in result.metrics.items()
             if k.startswith("val_") and isinstance(v, (int, float))}
    pending = PendingRegistration(
        run_id=run_id, task=cfg.task, model_dir=str(result.model_dir),
        tags=prep.model_tags(), version_tags={T.TAG_DATASET_PATH: str(train.path)},
        metrics=final, register_as=cfg.tracking.register_as, tracking_uri=public_uri(uri))
    model_uri, version = finish_run(run, pending, uri, cfg.tracking.tracker_wait_s)
    history = {}
    if model_uri is not None:  # the server holds every epoch's metrics
        client = T.client(uri)
        history = _history(client, run_id, steps_per_epoch)
        final = {k: float(v) for k, v in client.get_run(run_id).data.metrics.items()
                 if k.startswith("val_")}
    elif final:
        history = {"final": final}
    table_rows = dict(history)
    if baseline:
        table_rows = {"trivial baseline": baseline, **table_rows}
    table = format_table(table_rows) if table_rows else "(no eval file: no metrics)"
    print(f"\n{cfg.task} evaluation on {cfg.eval}:\n{table}\n", flush=True)
    skipped = {"train": train.report.to_dict()}
    if evalset is not None:
        skipped["eval"] = evalset.report.to_dict()
    return FinetuneResult(model_dir=result.model_dir, run_id=run_id, model_uri=model_uri,
                          metrics=final, baseline=baseline, history=history,
                          model_version=version, labels=labels, steps=result.step,
                          skipped=skipped, table=table,
                          pending=None if model_uri else register_command(
                              run.where, cfg.tracking.register_as))
