"""The fine-tuning `TrainTask` for the engine: one class, five BERT uses.

`FinetuneTask` is what `workflows.training.engine.run_training` ships to each Ray Train
worker: it builds the head model from the base folder (shipped through the object store
and materialised on the worker's node, workflows/transfer.py), pads batches of task rows,
computes the loss, evaluates with the field's metrics (`workflows.metrics`), and saves a
self-contained model folder (`workflows.model_folder`). Predictions are decoded by
`workflows.decoding`, the same code that serves the model.

Training rows: the tokenized train table in Ray's object store (`TrainRows`), read by
each worker through the canonical batch order of training/rows.py (as pretraining's
Parquet parts are): reshuffled every epoch, the same global batches on any number of
workers, and a resume starts at its position without reading the batches before it.

Evaluation is sharded (training/loop.py `evaluate`): each rank turns its share of the
validation batches into an `eval_share` (classification: loss per batch and counts of
(gold, predicted) labels; regression: each batch's gold and predicted scores, since
correlations do not add up over shards; token classification: entity counts; QA: each
question's
n-best spans and null score, since a question's windows may fall to several ranks), the
shares of every rank are gathered and `eval_combine` computes the metrics of the whole,
equal to a one-worker evaluation's (`evaluate` is the combination of one share).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from data_prep.tasks.features import IGNORE, pad_batch
from workflows import metrics as M
from workflows.decoding import decode_answer, window_candidates
from workflows.model_folder import load_task_model, save_model_folder
from workflows.training.rows import Chunk, Part, ReadStats
from workflows.transfer import local_folder

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TARGETS = {"seq-cls": ("labels",), "pair-cls": ("labels",), "regression": ("labels",),
           "token-cls": ("labels",), "qa": ("start_positions", "end_positions")}
EXTRA = {"qa": ("example_index", "offset_start", "offset_end")}  # kept for evaluation
PRIMARY_METRIC = {"seq-cls": "accuracy", "pair-cls": "accuracy", "regression": "pearson",
                  "token-cls": "f1", "qa": "f1"}
CLASSIFICATION = ("seq-cls", "pair-cls")
REGRESSION_HEAD = {"num_labels": 1, "id2label": {0: "score"}, "label2id": {"score": 0}}
TRAIN_PART = "object-store:train"  # the one part of the fine-tuning train rows


def train_parts(rows: int, size: int | None = None) -> tuple[Part, ...]:
    """The parts a batch plan of `rows` fine-tuning train rows is made of: one. With one
    part the plan cuts it into one chunk per stream, the same chunks every epoch, so every
    epoch has the same number of steps (`rows // global batch`), what `loop_for_epochs`
    plans with. Every epoch each chunk's rows come in a new order and the chunks go to
    other streams; a global batch holds micro-batch-size rows of every chunk (the rows
    were shuffled once when the dataset was built, data_prep.tasks)."""
    return (Part(TRAIN_PART, rows, size),)


@dataclass(frozen=True)
class TrainRows:
    """The tokenized train rows as the batch plan's part (`parts`) and the function that
    reads a chunk of it (`read`, training/rows.py's `RankReader(read=...)`). `table` is
    an ObjectRef of a pyarrow Table in Ray's object store (`put`), so a worker on any node
    fetches it from there (zero-copy on the node that holds it; another node pulls the
    whole table once: fine-tuning sets are small) and slices its chunks' rows; a Table in
    memory serves tests. The eval rows travel the same way and are iterated in order
    (`iter_batches`)."""

    table: Any
    rows: int
    size: int | None = None

    @classmethod
    def put(cls, table: pa.Table) -> TrainRows:
        import ray

        return cls(ray.put(table), table.num_rows, table.nbytes)

    def parts(self) -> tuple[Part, ...]:
        return train_parts(self.rows, self.size)

    def _table(self) -> pa.Table:
        if isinstance(self.table, pa.Table):
            return self.table
        import ray

        return ray.get(self.table)

    def read(self, part: Part, chunk: Chunk, stats: ReadStats) -> pa.Table:
        rows = self._table().slice(chunk.start, chunk.rows)
        stats.add_bytes(rows.nbytes)
        return rows

    def iter_batches(self, batch_size: int, batch_format: str = "pyarrow",
                     drop_last: bool = False, prefetch_batches: int = 0
                     ) -> Iterator[pa.Table]:
        """The rows in order, `batch_size` at a time, as pyarrow Tables: what the loop
        uses of a Ray Data iterator, for the eval rows (`FinetuneTask.val_rows`)."""
        table = self._table()
        for start in range(0, table.num_rows, batch_size):
            if drop_last and start + batch_size > table.num_rows:
                return
            yield table.slice(start, batch_size)


@dataclass
class FinetuneTask:
    """A picklable TrainTask for seq-cls, pair-cls, regression, token-cls and qa.

    `meta` is the bertflow.json written with the model (task, labels, inference
    settings, lineage). `qa_golds` maps a QA eval example index to its gold answer texts
    (empty for unanswerable) and context, so validation reports SQuAD EM/F1.
    """

    task: str
    base_dir: Any        # the base model folder: a transfer.ShippedFolder (what the driver
    tokenizer_dir: Any   # ships, materialised on each worker's node) or a local path
    labels: list[str]
    pad_id: int
    meta: dict[str, Any]
    freeze_encoder: bool = False
    pooling: str | None = None  # seq/pair-cls sentence vector (bert_core classifier_pooling)
    qa_golds: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    train_table: TrainRows | None = None  # the train rows (training/loop.py batch_plan)
    val_rows: TrainRows | None = None     # the eval rows, evaluated in order

    # ---- model --------------------------------------------------------------------
    def _overrides(self) -> dict[str, Any]:
        if self.task == "qa":
            return {}
        if self.task == "regression":  # one output trained with MSE, as HF's num_labels=1
            out: dict[str, Any] = dict(REGRESSION_HEAD)
        else:
            id2label = dict(enumerate(self.labels))
            out = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
                   "num_labels": len(self.labels)}
        if self.pooling is not None:
            out["classifier_pooling"] = self.pooling
        return out

    def build_model(self) -> nn.Module:
        """The head model on the base encoder (a new head, unless the base already has
        one of this shape)."""
        model = load_task_model(local_folder(self.base_dir), self.task, **self._overrides())
        if self.freeze_encoder:
            model.freeze_encoder()
        return model

    def load_model(self, model_dir: Path) -> nn.Module:
        model = load_task_model(model_dir, self.task)
        if self.freeze_encoder:
            model.freeze_encoder()
        return model

    def save_model(self, model: nn.Module, model_dir: Path) -> None:
        """HF folder + tokenizer + bertflow.json: everything serving needs."""
        save_model_folder(model, model_dir, local_folder(self.tokenizer_dir), self.meta)

    # ---- data ---------------------------------------------------------------------
    def collate(self, batch: dict[str, np.ndarray] | pa.Table,
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Pad a batch of rows: Ray Data's numpy batch or a pyarrow Table (the planned
        train rows)."""
        keep = MODEL_INPUTS + TARGETS[self.task] + EXTRA.get(self.task, ())
        if isinstance(batch, pa.Table):
            batch = {k: batch.column(k).to_numpy(zero_copy_only=False)
                     for k in batch.column_names if k in keep}
        padded = pad_batch({k: v for k, v in batch.items() if k in keep}, self.pad_id)
        return {k: torch.as_tensor(v) for k, v in padded.items() if k in keep}

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor], with_targets: bool) -> Any:
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        if with_targets:
            inputs.update({k: batch[k] for k in TARGETS[self.task]})
        return model(**inputs)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int | None:
        """Token classification: the labelled tokens of a collated batch (its CPU copy),
        what a step's loss is averaged over (StepRunner.begin_cycle); None for the tasks
        whose loss is a mean over sequences."""
        if self.task != "token-cls":
            return None
        return int(np.count_nonzero(batch["labels"].numpy() != IGNORE))

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                     tokens_per_micro: torch.Tensor | float | None = None,
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss, metrics). Token classification with `tokens_per_micro` (labelled tokens of
        the step's global batch / its micro-batches): the sum of this micro-batch's token
        losses divided by it, so a short sentence's tokens weigh as much as a long one's."""
        out = self._forward(model, batch, with_targets=True)
        if self.task == "qa":
            hit = (out.start_logits.argmax(-1) == batch["start_positions"]) & \
                  (out.end_logits.argmax(-1) == batch["end_positions"])
            return out.loss, {"span_correct": hit.sum().detach(), "span_count": hit.numel()}
        if self.task == "regression":
            return out.loss, {}  # the loss is the mean squared error
        pred = out.logits.argmax(-1)
        labels = batch["labels"]
        seen = labels != IGNORE
        count = seen.sum().detach()
        loss = out.loss
        if tokens_per_micro is not None and self.task == "token-cls":
            loss = loss * count / tokens_per_micro
        return loss, {"label_correct": ((pred == labels) & seen).sum().detach(),
                      "label_count": count}

    # ---- evaluation ---------------------------------------------------------------
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Validation loss and the task's metrics (accuracy/macro-F1/MCC, Pearson/Spearman,
        entity P/R/F1, EM/F1)."""
        return self.eval_combine([self.eval_share(model, enumerate(batches))])

    def eval_share(self, model: nn.Module,
                   batches: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, Any]:
        """What `eval_combine` needs of the (index, batch) pairs one rank evaluated:
        plain values, small (counts, or each QA question's n-best spans), picklable."""
        losses: dict[int, float] = {}
        counts: collections.Counter = collections.Counter()
        answers: dict[int, tuple[list, float]] = {}
        scores: dict[int, tuple[list[float], list[float]]] = {}
        n_best = int(self.meta.get("n_best", 20))
        for index, batch in batches:
            out = self._forward(model, batch, with_targets=True)
            losses[index] = float(out.loss)
            if self.task in CLASSIFICATION:
                counts.update(zip(batch["labels"].tolist(), out.logits.argmax(-1).tolist()))
            elif self.task == "regression":
                scores[index] = (batch["labels"].tolist(),
                                 out.logits.float().squeeze(-1).tolist())
            elif self.task == "token-cls":
                counts.update(self._entity_counts(batch["labels"], out.logits))
            else:
                self._add_answers(answers, batch, out, n_best)
        return {"losses": losses, "counts": counts, "answers": answers, "scores": scores}

    def eval_combine(self, shares: list[dict[str, Any]]) -> dict[str, float]:
        """The metrics of the batches of all `shares` (one per rank, in any order): the
        loss is the mean over batches in batch order, counts are added, a question's
        spans are merged, a regression's scores joined in batch order, so the result
        equals evaluating all batches at once."""
        losses: dict[int, float] = {}
        counts: collections.Counter = collections.Counter()
        answers: dict[int, tuple[list, float]] = {}
        scores: dict[int, tuple[list[float], list[float]]] = {}
        n_best = int(self.meta.get("n_best", 20))
        for share in shares:
            losses.update(share["losses"])
            counts.update(share["counts"])
            scores.update(share.get("scores", {}))
            for ex, found in share["answers"].items():
                answers[ex] = _merge_answers(answers.get(ex), found, n_best)
        result = {"loss": float(np.mean([losses[i] for i in sorted(losses)]))
                  if losses else float("nan")}
        if self.task in CLASSIFICATION:  # binary: F1 of label id 1 (GLUE's "1")
            result.update(M.confusion_metrics(counts, 1 if len(self.labels) == 2 else None))
        elif self.task == "regression":
            order = sorted(scores)
            result.update(M.regression_metrics([g for i in order for g in scores[i][0]],
                                               [p for i in order for p in scores[i][1]]))
        elif self.task == "token-cls":
            result.update(M.entity_metrics_of_counts(counts))
        else:
            result.update(self.qa_metrics({ex: [a] for ex, a in answers.items()}))
        return result

    def _entity_counts(self, labels: torch.Tensor, logits: torch.Tensor) -> collections.Counter:
        gold, pred = [], []
        for row, p in zip(labels.cpu().numpy(), logits.argmax(-1).cpu().numpy()):
            seen = row != IGNORE
            gold.append([self.labels[i] for i in row[seen]])
            pred.append([self.labels[i] for i in p[seen]])
        return M.entity_counts(gold, pred)

    def _add_answers(self, answers: dict[int, tuple[list, float]], batch: dict[str, torch.Tensor],
                     out: Any, n_best: int) -> None:
        """Fold each window's candidate spans into its question's n-best (what
        `decode_answer` keeps of all the question's windows) and lowest null score."""
        s_log = out.start_logits.float().cpu().numpy()
        e_log = out.end_logits.float().cpu().numpy()
        n_tok = batch["attention_mask"].sum(-1).tolist()
        for r, ex in enumerate(batch["example_index"].tolist()):
            n = n_tok[r]
            window = window_candidates(
                s_log[r, :n], e_log[r, :n], batch["offset_start"][r, :n].cpu().numpy(),
                batch["offset_end"][r, :n].cpu().numpy(), n_best=n_best,
                max_answer_length=int(self.meta.get("max_answer_length", 30)))
            answers[ex] = _merge_answers(answers.get(ex), window, n_best)

    def qa_metrics(self, windows: dict[int, list]) -> dict[str, float]:
        """SQuAD EM/F1 (and HasAns/NoAns) of the examples whose windows were seen."""
        golds, preds = [], []
        for ex, w in sorted(windows.items()):
            if ex not in self.qa_golds:
                continue
            context, answers = self.qa_golds[ex]
            best = decode_answer(w, context, allow_null=bool(self.meta.get("version_2")),
                                 null_score_threshold=float(self.meta.get("null_score_threshold", 0.0)),
                                 n_best=int(self.meta.get("n_best", 20)))
            golds.append(answers)
            preds.append(best["answer"])
        return M.squad_metrics(golds, preds)


def _merge_answers(have: tuple[list, float] | None, window: tuple[list, float],
                   n_best: int) -> tuple[list, float]:
    """(the n best candidate spans, the lowest null score) of a question's windows so far
    and one more: `decode_answer` on the merged pair chooses as on all the windows."""
    if have is None:
        return sorted(window[0], reverse=True)[:n_best], window[1]
    return sorted(have[0] + window[0], reverse=True)[:n_best], min(have[1], window[1])


def majority_baseline(task: str, train_records: list[dict], eval_records: list[dict],
                      labels: list[str] | None = None) -> dict[str, float]:
    """What a trivial model scores on the eval records: the most frequent training label
    (classification; `labels` in id order name binary F1's positive class, id 1), the
    mean training score (regression: no correlation, the MSE of the mean), all "O"
    (token-cls), or always the first context word / no answer (qa, whichever scores
    higher) — the bar a fine-tuned model must clearly beat."""
    from collections import Counter

    if task in CLASSIFICATION:
        top = Counter(r["label"] for r in train_records).most_common(1)[0][0]
        names = labels or sorted({r["label"] for r in train_records})
        return M.classification_metrics([r["label"] for r in eval_records],
                                         [top] * len(eval_records),
                                         names[1] if len(names) == 2 else None)
    if task == "regression":
        mean = float(np.mean([r["label"] for r in train_records]))
        return M.regression_metrics([r["label"] for r in eval_records],
                                    [mean] * len(eval_records))
    if task == "token-cls":
        return M.entity_metrics([r["tags"] for r in eval_records],
                                [["O"] * len(r["tags"]) for r in eval_records])
    golds = [[] if r["is_impossible"] else [a["text"] for a in r["answers"]] for r in eval_records]
    first = M.squad_metrics(golds, [(r["context"].split() or [""])[0] for r in eval_records])
    empty = M.squad_metrics(golds, [""] * len(eval_records))
    return first if first["f1"] >= empty["f1"] else empty
