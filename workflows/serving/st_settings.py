"""A model folder's sentence-transformers settings, so `bertflow embed` encodes as the model
was trained to be used.

A sentence-transformers folder says, next to the BERT weights: which pooling turns token
vectors into one vector (`1_Pooling/config.json`), the longest input
(`sentence_bert_config.json` max_seq_length) and whether vectors are L2-normalised (a
`Normalize` module in `modules.json`). Only the files are read; sentence-transformers is
not imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bert_core.config_io import BertflowError

# sentence-transformers' pooling flags -> bertflow's pooling names
_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class EmbedSettings:
    """How a folder's texts become vectors (None: the folder does not say)."""

    pooling: str | None = None
    max_seq_len: int | None = None
    normalize: bool | None = None
    source: str = ""  # what the settings were read from, for logs


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BertflowError(f"{path}: unreadable sentence-transformers settings ({exc})") from None
    if not isinstance(data, (dict, list)):
        raise BertflowError(f"{path}: expected a JSON object")
    return data


def read_embed_settings(folder: str | Path) -> EmbedSettings:
    """The folder's sentence-transformers settings, or empty settings for a plain BERT."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return EmbedSettings()
    modules = _json(modules_file)
    if not isinstance(modules, list):
        raise BertflowError(f"{modules_file}: expected a list of modules")
    pooling, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith(".Pooling"):
            config = _json(folder / str(module.get("path", "")) / "config.json")
            used = [flag for flag in (*_POOLING_FLAGS, *_UNSUPPORTED) if config.get(flag)]
            if len(used) != 1 or used[0] in _UNSUPPORTED:
                raise BertflowError(
                    f"{folder}: sentence-transformers pooling {used or 'none'} is not "
                    "supported (bertflow embeds with cls or mean pooling); pass --pooling")
            pooling = _POOLING_FLAGS[used[0]]
        elif kind.endswith(".Normalize"):
            normalize = True
    max_len = None
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        value = _json(st_config).get("max_seq_length")
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise BertflowError(f"{st_config}: max_seq_length must be an integer >= 2")
            max_len = value
    return EmbedSettings(pooling, max_len, normalize, source=str(modules_file))
