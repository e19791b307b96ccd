"""Masked-LM masking, exactly as Google's create_pretraining_data does it.

One pure function, `mask_tokens`, used both at prep time (static masking: `dupe_factor`
copies, each with its own mask) and at training time (dynamic masking, from `collate`).
"""

from __future__ import annotations

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
      are chosen uniformly among non-special tokens (never [CLS]/[SEP]/[PAD]); fewer only
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
    candidates = np.flatnonzero(~np.isin(ids, np.asarray(special_ids)))
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
    special_ids: tuple[int, ...]
    masked_lm_prob: float = 0.15
    max_predictions: int = 20
    whole_word: bool = False
    # True at ids whose piece continues a word ("##..."); only used when whole_word.
    continuation: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, masked_lm_prob: float = 0.15,
                       max_predictions: int = 20, whole_word: bool = False) -> MaskingSpec:
        return cls(vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                   special_ids=tuple(tokenizer.special_ids), masked_lm_prob=masked_lm_prob,
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
