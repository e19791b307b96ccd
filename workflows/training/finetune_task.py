"""The fine-tuning `TrainTask` for the engine: one class, four BERT uses.

`FinetuneTask` is what `workflows.training.engine.run_training` ships to each Ray Train
worker: it builds the head model from the base folder (shipped through the object store
and materialised on the worker's node, workflows/transfer.py), pads batches of task rows,
computes the loss, evaluates with the field's metrics (`workflows.metrics`), and saves a
self-contained model folder (`workflows.model_folder`). Predictions are decoded by
`workflows.decoding`, the same code that serves the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_prep.tasks.features import IGNORE, pad_batch
from workflows import metrics as M
from workflows.decoding import decode_answer, window_candidates
from workflows.model_folder import load_task_model, save_model_folder
from workflows.transfer import local_folder

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TARGETS = {"seq-cls": ("labels",), "pair-cls": ("labels",), "token-cls": ("labels",),
           "qa": ("start_positions", "end_positions")}
EXTRA = {"qa": ("example_index", "offset_start", "offset_end")}  # kept for evaluation
PRIMARY_METRIC = {"seq-cls": "accuracy", "pair-cls": "accuracy", "token-cls": "f1", "qa": "f1"}


@dataclass
class FinetuneTask:
    """A picklable TrainTask for seq-cls, pair-cls, token-cls and qa.

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

    # ---- model --------------------------------------------------------------------
    def _overrides(self) -> dict[str, Any]:
        if self.task == "qa":
            return {}
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
    def collate(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        keep = MODEL_INPUTS + TARGETS[self.task] + EXTRA.get(self.task, ())
        padded = pad_batch({k: v for k, v in batch.items() if k in keep}, self.pad_id)
        return {k: torch.as_tensor(v) for k, v in padded.items() if k in keep}

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor], with_targets: bool) -> Any:
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        if with_targets:
            inputs.update({k: batch[k] for k in TARGETS[self.task]})
        return model(**inputs)

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self._forward(model, batch, with_targets=True)
        if self.task == "qa":
            hit = (out.start_logits.argmax(-1) == batch["start_positions"]) & \
                  (out.end_logits.argmax(-1) == batch["end_positions"])
            return out.loss, {"span_correct": hit.sum().detach(), "span_count": hit.numel()}
        pred = out.logits.argmax(-1)
        labels = batch["labels"]
        seen = labels != IGNORE
        return out.loss, {"label_correct": ((pred == labels) & seen).sum().detach(),
                          "label_count": seen.sum().detach()}

    # ---- evaluation ---------------------------------------------------------------
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Validation loss and the task's metrics (accuracy/macro-F1, entity P/R/F1, EM/F1)."""
        losses, gold, pred = [], [], []
        windows: dict[int, list] = {}
        n_best = int(self.meta.get("n_best", 20))
        for batch in batches:
            out = self._forward(model, batch, with_targets=True)
            losses.append(float(out.loss))
            if self.task in ("seq-cls", "pair-cls"):
                gold += batch["labels"].tolist()
                pred += out.logits.argmax(-1).tolist()
            elif self.task == "token-cls":
                labels = batch["labels"].cpu().numpy()
                best = out.logits.argmax(-1).cpu().numpy()
                for row, p in zip(labels, best):
                    seen = row != IGNORE
                    gold.append([self.labels[i] for i in row[seen]])
                    pred.append([self.labels[i] for i in p[seen]])
            else:
                s_log = out.start_logits.float().cpu().numpy()
                e_log = out.end_logits.float().cpu().numpy()
                n_tok = batch["attention_mask"].sum(-1).tolist()
                for r, ex in enumerate(batch["example_index"].tolist()):
                    n = n_tok[r]
                    windows.setdefault(ex, []).append(window_candidates(
                        s_log[r, :n], e_log[r, :n], batch["offset_start"][r, :n].cpu().numpy(),
                        batch["offset_end"][r, :n].cpu().numpy(), n_best=n_best,
                        max_answer_length=int(self.meta.get("max_answer_length", 30))))
        result = {"loss": float(np.mean(losses)) if losses else float("nan")}
        if self.task in ("seq-cls", "pair-cls"):
            result.update(M.classification_metrics(gold, pred))
        elif self.task == "token-cls":
            result.update(M.entity_metrics(gold, pred))
        else:
            result.update(self.qa_metrics(windows))
        return result

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


def majority_baseline(task: str, train_records: list[dict], eval_records: list[dict]) -> dict[str, float]:
    """What a trivial model scores on the eval records: the most frequent training label
    (classification), all "O" (token-cls), or always the first context word / no answer
    (qa, whichever scores higher) — the bar a fine-tuned model must clearly beat."""
    from collections import Counter

    if task in ("seq-cls", "pair-cls"):
        top = Counter(r["label"] for r in train_records).most_common(1)[0][0]
        return M.classification_metrics([r["label"] for r in eval_records],
                                         [top] * len(eval_records))
    if task == "token-cls":
        return M.entity_metrics([r["tags"] for r in eval_records],
                                [["O"] * len(r["tags"]) for r in eval_records])
    golds = [[] if r["is_impossible"] else [a["text"] for a in r["answers"]] for r in eval_records]
    first = M.squad_metrics(golds, [(r["context"].split() or [""])[0] for r in eval_records])
    empty = M.squad_metrics(golds, [""] * len(eval_records))
    return first if first["f1"] >= empty["f1"] else empty
