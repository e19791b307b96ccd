"""Masked-LM masking, exactly as Google's create_pretraining_data does it.

One pure rule, `mask_tokens` for a row and `mask_batch` for many rows at once (the same
rule, vectorised), used both at prep time (static masking: `dupe_factor` copies, each
with its own mask) and at training time (dynamic masking, from `collate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def num_to_predict(n_tokens: int, masked_lm_prob: float, max_predictions: int) -> int:
    """Google's count: min(max_predictions, max(1, round(n_tokens * prob))).

    `n_tokens` is the whole sequence including [CLS]/[SEP]; Python's round (half to even)
    is what Google's script uses, so counts match it instance for instance."""
    return min(max_predictions, max(1, int(round(n_tokens * masked_lm_prob))))


def mask_tokens(input_ids: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                mask_id: int, special_ids: Any, masked_lm_prob: float = 0.15,
                max_predictions: int = 20, word_starts: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask one sequence; returns (masked_ids, positions, original_ids).

    - `min(max_predictions, max(1, round(len(input_ids) * masked_lm_prob)))` positions
      are chosen uniformly among tokens not in `special_ids` (callers pass
      [CLS]/[SEP]/[PAD]; [UNK] can be masked, as in Google's script); fewer only
      when the sequence has fewer candidates.
    - Each chosen position becomes [MASK] with probability 0.8, a random id in
      [0, vocab_size) with 0.1 (Google draws from the whole vocabulary), else stays.
    - With `word_starts` (bool per position: True where a piece starts a word, i.e. does
      not begin with "##"), the pieces of a word are chosen together; as in Google's code
      a word that would overshoot the count is passed over, so the count can fall short.
    `positions` are sorted ascending; `original_ids` are the ids before replacement.
    """
    ids = np.asarray(input_ids)
    n = int(ids.shape[0])
    k = num_to_predict(n, masked_lm_prob, max_predictions)
    special = np.zeros(n, dtype=bool)
    for sid in special_ids:  # a handful of ids: cheaper than np.isin on short rows
        special |= ids == sid
    candidates = np.flatnonzero(~special)
    if candidates.size == 0:
        return ids.copy(), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=ids.dtype)
    if word_starts is None:
        positions = np.sort(rng.permutation(candidates)[:k])
    else:
        positions = _whole_word_positions(candidates, np.asarray(word_starts, dtype=bool),
                                          k, rng)
    originals = ids[positions]
    masked = ids.copy()
    roll = rng.random(positions.size)
    random_ids = rng.integers(0, vocab_size, positions.size)
    replacement = np.where(roll < 0.8, mask_id, np.where(roll < 0.9, random_ids, originals))
    masked[positions] = replacement.astype(ids.dtype, copy=False)
    return masked, positions.astype(np.int64), originals


def mask_batch(rows: Sequence[np.ndarray], rng: np.random.Generator, *, vocab_size: int,
               mask_id: int, special_ids: Any, masked_lm_prob: float = 0.15,
               max_predictions: int = 20, word_starts: Sequence[np.ndarray] | None = None,
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """`mask_tokens` over many rows at once: the same rule per row (count, candidates,
    80/10/10), vectorised over the batch. Returns lists (masked, positions, originals).

    Each row's positions are a uniform random subset of its candidates: every token draws
    a random key and the row keeps its `k` smallest keys among non-special tokens. With
    `word_starts` (whole-word masking) rows are masked one by one by `mask_tokens`."""
    if word_starts is not None:
        out = [mask_tokens(r, rng, vocab_size=vocab_size, mask_id=mask_id,
                           special_ids=special_ids, masked_lm_prob=masked_lm_prob,
                           max_predictions=max_predictions, word_starts=w)
               for r, w in zip(rows, word_starts)]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
    if len(rows) == 0:
        return [], [], []
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(r) for r in rows])
    masked, chosen, originals = mask_flat(
        flat, offsets, rng, vocab_size=vocab_size, mask_id=mask_id, special_ids=special_ids,
        masked_lm_prob=masked_lm_prob, max_predictions=max_predictions)
    row = np.searchsorted(offsets, chosen, side="right") - 1
    positions = chosen - offsets[row]
    cuts = np.cumsum(np.bincount(row, minlength=len(rows)))[:-1]
    return (np.split(masked, offsets[1:-1]), np.split(positions, cuts),
            np.split(originals, cuts))


def mask_flat(flat: np.ndarray, offsets: np.ndarray, rng: np.random.Generator, *,
              vocab_size: int, mask_id: int, special_ids: Any, masked_lm_prob: float = 0.15,
              max_predictions: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`mask_batch` on rows laid end to end: `flat` holds every row's ids, row r is
    `flat[offsets[r]:offsets[r + 1]]` (the layout of an Arrow list column).

    Returns (masked flat ids, chosen indices into `flat` ascending, original ids there).
    No per-row Python: one sort over the batch picks every row's positions. The draws,
    in order: one key per token (`choose_flat`), then per chosen position a roll and a
    random id (`replace_flat`)."""
    flat = np.asarray(flat)
    chosen = choose_flat(flat, offsets, rng.random(flat.shape[0]), special_ids=special_ids,
                         masked_lm_prob=masked_lm_prob, max_predictions=max_predictions)
    roll = rng.random(chosen.size)
    random_ids = rng.integers(0, vocab_size, chosen.size)
    return replace_flat(flat, chosen, roll, random_ids, mask_id)


def choose_flat(flat: np.ndarray, offsets: np.ndarray, key: np.ndarray, *, special_ids: Any,
                masked_lm_prob: float = 0.15, max_predictions: int = 20) -> np.ndarray:
    """The positions `mask_flat` masks (indices into `flat`, ascending) given its random
    `key` per token: each row keeps its `k` smallest keys among non-special tokens."""
    offsets = np.asarray(offsets, dtype=np.int64)
    n_rows = offsets.shape[0] - 1
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(n_rows), lengths)
    special = np.zeros(flat.shape[0], dtype=bool)
    for sid in special_ids:
        special |= flat == sid
    key = key.copy()
    key[special] = 2.0  # sorts after every candidate of its row
    # rows are contiguous and ascending, so one argsort of row*4 + key orders each row's
    # tokens by key and keeps rows in place: a token's rank is its place in its row
    order = np.argsort(row * 4.0 + key)
    rank = np.empty(flat.shape[0], dtype=np.int64)
    rank[order] = np.arange(flat.shape[0]) - offsets[row]
    # np.round is half-to-even like Python's round, so counts equal num_to_predict's
    k = np.minimum(max_predictions, np.maximum(1, np.round(lengths * masked_lm_prob)))
    return np.flatnonzero((rank < k[row]) & ~special)


def replace_flat(flat: np.ndarray, chosen: np.ndarray, roll: np.ndarray,
                 random_ids: np.ndarray, mask_id: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT's 80/10/10 at the `chosen` positions: [MASK] where roll < 0.8, the random id
    where roll < 0.9, else the token itself. Returns (masked, chosen, originals)."""
    originals = flat[chosen]
    masked = flat.copy()
    masked[chosen] = np.where(roll < 0.8, mask_id,
                              np.where(roll < 0.9, random_ids, originals)).astype(flat.dtype)
    return masked, chosen, originals


def _whole_word_positions(candidates: np.ndarray, word_starts: np.ndarray, k: int,
                          rng: np.random.Generator) -> np.ndarray:
    # A group starts at a word-start piece, or wherever the previous candidate is not the
    # previous position (a "##" piece right after [SEP] must not join the other segment).
    starts = word_starts[candidates].copy()
    starts[0] = True
    starts[1:] |= np.diff(candidates) != 1
    bounds = np.append(np.flatnonzero(starts), candidates.size)
    chosen: list[np.ndarray] = []
    count = 0
    for g in rng.permutation(bounds.size - 1):
        if count >= k:
            break
        size = int(bounds[g + 1] - bounds[g])
        if count + size > k:
            continue
        chosen.append(candidates[bounds[g]:bounds[g + 1]])
        count += size
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class MaskingSpec:
    """What dynamic masking needs at training time (picklable, no tokenizer object)."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]          # never masked: [CLS], [SEP], [PAD]
    masked_lm_prob: float = 0.15
    max_predictions: int = 20
    whole_word: bool = False
    # True at ids whose piece continues a word ("##..."); only used when whole_word.
    continuation: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, masked_lm_prob: float = 0.15,
                       max_predictions: int = 20, whole_word: bool = False) -> MaskingSpec:
        # Only [CLS]/[SEP] (and [PAD]) are never masked, as in Google's script: [UNK]
        # is a token of the text like any other and is chosen like any other.
        never = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
        return cls(vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                   special_ids=never, masked_lm_prob=masked_lm_prob,
                   max_predictions=max_predictions, whole_word=whole_word,
                   continuation=tokenizer.continuation_mask() if whole_word else None)

    def apply(self, input_ids: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`mask_tokens` with this spec's settings."""
        starts = None
        if self.whole_word and self.continuation is not None:
            starts = ~self.continuation[np.asarray(input_ids)]
        return mask_tokens(input_ids, rng, vocab_size=self.vocab_size, mask_id=self.mask_id,
                           special_ids=self.special_ids, masked_lm_prob=self.masked_lm_prob,
                           max_predictions=self.max_predictions, word_starts=starts)

    def apply_flat(self, flat: np.ndarray, offsets: np.ndarray, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`mask_flat` with this spec's settings (rows end to end; what collate uses).
        Whole-word masking goes row by row through `mask_tokens`."""
        if self.whole_word and self.continuation is not None:
            rows = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            masked, positions, originals = self.apply_batch(rows, rng)
            chosen = [p + a for p, a in zip(positions, offsets[:-1])]
            if not rows:
                return flat.copy(), np.zeros(0, np.int64), flat[:0]
            return (np.concatenate(masked), np.concatenate(chosen).astype(np.int64),
                    np.concatenate(originals))
        return mask_flat(flat, offsets, rng, vocab_size=self.vocab_size, mask_id=self.mask_id,
                         special_ids=self.special_ids, masked_lm_prob=self.masked_lm_prob,
                         max_predictions=self.max_predictions)

    def apply_batch(self, rows: Sequence[np.ndarray], rng: np.random.Generator
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """`mask_batch` with this spec's settings (what prep and collate use)."""
        starts = None
        if self.whole_word and self.continuation is not None:
            starts = [~self.continuation[np.asarray(r)] for r in rows]
        return mask_batch(rows, rng, vocab_size=self.vocab_size, mask_id=self.mask_id,
                          special_ids=self.special_ids, masked_lm_prob=self.masked_lm_prob,
                          max_predictions=self.max_predictions, word_starts=starts)
