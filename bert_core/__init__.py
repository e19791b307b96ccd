"""bert_core: a BERT encoder and its task heads in plain torch, weight-compatible with
Hugging Face transformers. Imports torch and safetensors only (never ray, mlflow or
transformers). Names are resolved lazily so that `bert_core.config_io` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it (filled in as the package grows)
_EXPORTS: dict[str, str] = {
    "BertConfig": "bert_core.config",
    "BertModel": "bert_core.model",
    "BertOutput": "bert_core.model",
    "BertForPreTraining": "bert_core.heads",
    "BertForMaskedLM": "bert_core.heads",
    "BertForSequenceClassification": "bert_core.heads",
    "BertForTokenClassification": "bert_core.heads",
    "BertForQuestionAnswering": "bert_core.heads",
    "BertPreTrainedModel": "bert_core.model",
    "PreTrainingOutput": "bert_core.heads",
    "MaskedLMOutput": "bert_core.heads",
    "ClassifierOutput": "bert_core.heads",
    "QuestionAnsweringOutput": "bert_core.heads",
    "PRESETS": "bert_core.config",
    "ConfigError": "bert_core.config_io",
    "BertflowError": "bert_core.config_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bert_core' has no attribute {name!r}")
