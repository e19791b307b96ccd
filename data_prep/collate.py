"""Batch collation for pretraining: unpadded Parquet rows -> padded int64 model inputs.

Runs every training step on the Train worker's CPUs, so it is vectorised over the batch:
a list column is handled as Arrow lays it out (all values end to end plus row offsets),
masking picks every row's positions with one sort, and padding is one boolean scatter.
With pyarrow batches (`iter_batches(batch_format="pyarrow")`) there is no per-row Python
at all; numpy batches (object arrays of rows) cost one concatenate per column.

Dynamic masks are reproducible: `batch_rng(seed, epoch, batch_index, rank)` is the only
source of randomness, so a batch gets the same masks whatever thread collates it, in a
rerun and after a resume. `iter_collated` applies a collate function to a stream of raw
batches with that generator, prefetching on threads and keeping the order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from bert_core.config_io import BertflowError
from data_prep.masking import MaskingSpec

IGNORE_INDEX = -100
T = TypeVar("T")


def batch_rng(seed: int, epoch: int, batch_index: int, rank: int = 0) -> np.random.Generator:
    """The generator of one training batch: a pure function of (seed, epoch, batch index
    within the epoch, worker rank), so dynamic masks do not depend on thread scheduling
    and a resumed run draws the masks the lost attempt drew."""
    return np.random.default_rng([seed, epoch, rank, batch_index])


def iter_collated(batches: Iterable[Any], collate: Callable[[Any, np.random.Generator], T],
                  seed: int, epoch: int, rank: int = 0, start: int = 0,
                  prefetch: int = 2) -> Iterator[T]:
    """`collate(batch, batch_rng(seed, epoch, i, rank))` for the i-th batch of `batches`,
    for i >= `start`, in order.

    Batches before `start` (already trained on, when resuming) are read but not collated.
    Up to `prefetch` batches are collated ahead on threads (numpy releases the GIL in the
    heavy parts), so collation overlaps the training step."""
    source = iter(batches)
    for _ in range(start):
        if next(source, None) is None:
            return
    if prefetch <= 0:
        for i, batch in enumerate(source, start):
            yield collate(batch, batch_rng(seed, epoch, i, rank))
        return
    with ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="collate") as pool:
        pending: deque = deque()
        for i, batch in enumerate(source, start):
            pending.append(pool.submit(collate, batch, batch_rng(seed, epoch, i, rank)))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _has(batch: Any, name: str) -> bool:
    names = batch.column_names if hasattr(batch, "column_names") else batch
    return name in names and batch[name] is not None


def list_column(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column: row r is values[offsets[r]:offsets[r + 1]].

    Takes a pyarrow (Chunked)ListArray without copying rows, or any sequence of rows
    (lists or arrays, e.g. the object arrays of Ray Data's numpy batches)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column, (pa.ListArray, pa.LargeListArray)):
        offsets = column.offsets.to_numpy().astype(np.int64)
        values = column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        return values, offsets - offsets[0]
    rows = [np.asarray(r) for r in column]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((r.shape[0] for r in rows), np.int64, len(rows)), out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return values, offsets


def _pad(values: np.ndarray, valid: np.ndarray, fill: int) -> np.ndarray:
    out = np.full(valid.shape, fill, dtype=np.int64)
    out[valid] = values  # (B, T) row-major order is the values' order
    return out


def collate_pretraining(batch: Mapping[str, Any] | Any, pad_id: int,
                        masking: MaskingSpec | None = None,
                        rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Pad a batch of pretraining rows to its longest row and build MLM labels.

    `batch` is a pyarrow Table or a mapping of column names of the dataset schema to
    sequences of rows (Ray Data's numpy batches). Returns int64 arrays: `input_ids`,
    `attention_mask`, `token_type_ids` (B, T); `labels` (B, T) holding the original id at
    masked positions and -100 elsewhere; `next_sentence_label` (B,) when the column
    exists. Static masks come from `masked_lm_positions/ids`; with `masking` (dynamic
    masking) every row is masked afresh by `mask_flat` with `rng`, which is required so
    masks are reproducible (use `batch_rng`).
    """
    ids, offsets = list_column(batch["input_ids"])
    lengths = np.diff(offsets)
    n_rows = lengths.shape[0]
    width = int(lengths.max()) if n_rows else 0
    static = _has(batch, "masked_lm_positions")
    if masking is not None and static:
        raise BertflowError("this dataset is statically masked (it has masked_lm_positions); "
                            "train it without dynamic masking, or prepare it with "
                            "--masking dynamic")
    if masking is None and not static:
        raise BertflowError("this dataset has no masked_lm_positions (dynamic masking); "
                            "pass a MaskingSpec to collate_pretraining")
    valid = np.arange(width)[None, :] < lengths[:, None]  # (B, T)
    labels = np.full((n_rows, width), IGNORE_INDEX, dtype=np.int64)
    if masking is not None:
        if rng is None:
            raise BertflowError("dynamic masking needs a generator: pass "
                                "rng=batch_rng(seed, epoch, batch_index, rank)")
        ids, chosen, originals = masking.apply_flat(ids, offsets, rng)
        row = np.searchsorted(offsets, chosen, side="right") - 1
        labels[row, chosen - offsets[row]] = originals
    else:
        positions, pos_offsets = list_column(batch["masked_lm_positions"])
        originals, _ = list_column(batch["masked_lm_ids"])
        row = np.repeat(np.arange(n_rows), np.diff(pos_offsets))
        labels[row, positions] = originals

    out = {"input_ids": _pad(ids, valid, pad_id), "attention_mask": valid.astype(np.int64),
           "labels": labels}
    if _has(batch, "token_type_ids"):
        out["token_type_ids"] = _pad(list_column(batch["token_type_ids"])[0], valid, 0)
    else:
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
    if _has(batch, "next_sentence_label"):
        out["next_sentence_label"] = np.asarray(batch["next_sentence_label"], dtype=np.int64)
    return out
