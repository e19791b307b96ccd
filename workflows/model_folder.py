"""The model folder: what bertflow writes for every trained model and reads to use one.

A model folder is an HF-format BERT (config.json + model.safetensors), its tokenizer
(vocab.txt, tokenizer_config.json) and, for a task model, `bertflow.json` saying the task,
the labels, the inference settings (max_seq_len, QA window and decoding settings) and the
lineage. Without `bertflow.json` the folder is a pretrained encoder.

Training writes folders (`save_model_folder`) and serving reads them (`load_task_model`,
`read_task_meta`); both import this module, never each other. Finding the folder inside
whatever a user points at (a checkpoint, a run folder, a downloaded MLflow model) is
`workflows.run_folder.find_model_folder`, which needs no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from bert_core import (BertForPreTraining, BertForQuestionAnswering,
                       BertForSequenceClassification, BertForTokenClassification, BertModel)
from bert_core.config_io import BertflowError

META_FILE = "bertflow.json"

# The model class of each task; "pretraining" folders are used as encoders.
TASK_HEADS: dict[str, type[nn.Module]] = {
    "seq-cls": BertForSequenceClassification,
    "pair-cls": BertForSequenceClassification,
    "regression": BertForSequenceClassification,  # one output, MSE (num_labels=1, as HF)
    "token-cls": BertForTokenClassification,
    "qa": BertForQuestionAnswering,
    "pretraining": BertModel,
}
PRETRAINING_HEAD = BertForPreTraining  # what pretraining trains and resumes


class ModelFolderError(BertflowError):
    """A model folder is missing a file or holds an unreadable bertflow.json."""


def read_task_meta(model_dir: str | Path) -> dict[str, Any]:
    """The model folder's bertflow.json, or `{"task": "pretraining"}` when it has none."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {"task": "pretraining"}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if meta.get("task") not in TASK_HEADS:
        raise ModelFolderError(f"{path}: task {meta.get('task')!r} is not one of "
                               f"{', '.join(TASK_HEADS)}")
    return meta


def write_task_meta(model_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write bertflow.json (task, labels, inference settings, lineage) into a model folder."""
    path = Path(model_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def save_model_folder(model: nn.Module, model_dir: str | Path, tokenizer_dir: str | Path,
                      meta: dict[str, Any]) -> Path:
    """Write a self-contained model folder: HF weights + config, the tokenizer and
    bertflow.json, i.e. everything serving and `--init`/`--base` need."""
    from data_prep.tokenizer import WordPieceTokenizer

    model_dir = Path(model_dir)
    model.save_pretrained(model_dir)
    WordPieceTokenizer.from_dir(tokenizer_dir).save(model_dir)
    write_task_meta(model_dir, meta)
    return model_dir


def load_task_model(model_dir: str | Path, task: str, **overrides: Any) -> nn.Module:
    """The model of `task` from an HF-format folder; `overrides` change its config (e.g.
    the labels of a new classification head on a pretrained encoder)."""
    return TASK_HEADS[task].from_pretrained(str(model_dir), **overrides)


def encoder_of(model: nn.Module) -> nn.Module:
    """The BertModel inside a head model (or the model itself)."""
    return getattr(model, "bert", model)
