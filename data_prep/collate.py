"""Batch collation for pretraining: unpadded Parquet rows -> padded int64 model inputs.

Runs every training step, so padding and label scattering are vectorised (one
concatenate + one boolean scatter per column) rather than per-row Python loops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bert_core.config_io import BertflowError
from data_prep.masking import MaskingSpec

IGNORE_INDEX = -100


def _rows(column: Any) -> list[np.ndarray]:
    return [np.asarray(r, dtype=np.int64) for r in column]


def _pad(rows: list[np.ndarray], lengths: np.ndarray, width: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.int64)
    if rows:
        valid = np.arange(width)[None, :] < lengths[:, None]  # (B, T) row-major = concat order
        out[valid] = np.concatenate(rows) if lengths.sum() else np.zeros(0, np.int64)
    return out


def collate_pretraining(batch: Mapping[str, Sequence[Any]], pad_id: int,
                        masking: MaskingSpec | None = None,
                        rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Pad a batch of pretraining rows to its longest row and build MLM labels.

    `batch` maps column names of the dataset schema to sequences of rows (lists or numpy
    arrays, as Ray Data's numpy batches give them). Returns int64 arrays:
    `input_ids`, `attention_mask`, `token_type_ids` (B, T); `labels` (B, T) holding the
    original id at masked positions and -100 elsewhere; `next_sentence_label` (B,) when
    the column exists. Static masks come from `masked_lm_positions/ids`; with `masking`
    (dynamic masking) each row is masked afresh by `mask_batch` (mask_tokens' rule) using
    `rng`.
    """
    ids_rows = _rows(batch["input_ids"])
    lengths = np.fromiter((r.shape[0] for r in ids_rows), dtype=np.int64, count=len(ids_rows))
    width = int(lengths.max()) if lengths.size else 0
    static = "masked_lm_positions" in batch and batch["masked_lm_positions"] is not None
    if masking is not None and static:
        raise BertflowError("this dataset is statically masked (it has masked_lm_positions); "
                            "train it without dynamic masking, or prepare it with "
                            "--masking dynamic")
    if masking is None and not static:
        raise BertflowError("this dataset has no masked_lm_positions (dynamic masking); "
                            "pass a MaskingSpec to collate_pretraining")

    labels = np.full((len(ids_rows), width), IGNORE_INDEX, dtype=np.int64)
    if masking is not None:
        rng = rng if rng is not None else np.random.default_rng()
        ids_rows, pos_rows, orig_rows = masking.apply_batch(ids_rows, rng)
    else:
        pos_rows = _rows(batch["masked_lm_positions"])
        orig_rows = _rows(batch["masked_lm_ids"])
    counts = np.fromiter((p.shape[0] for p in pos_rows), dtype=np.int64, count=len(pos_rows))
    if counts.sum():
        which_row = np.repeat(np.arange(len(pos_rows)), counts)
        labels[which_row, np.concatenate(pos_rows)] = np.concatenate(orig_rows)

    out = {
        "input_ids": _pad(ids_rows, lengths, width, pad_id),
        "attention_mask": (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64),
        "labels": labels,
    }
    if "token_type_ids" in batch:
        out["token_type_ids"] = _pad(_rows(batch["token_type_ids"]), lengths, width, 0)
    else:
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
    if "next_sentence_label" in batch and batch["next_sentence_label"] is not None:
        out["next_sentence_label"] = np.asarray(batch["next_sentence_label"], dtype=np.int64)
    return out
