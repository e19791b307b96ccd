"""Google's create_pretraining_data recipe as pure functions over token ids.

`document_instances(document, index, pool, spec, rng)` turns one tokenized document (a
list of sentences, each a list of ids) into its training instances, exactly as Google's
script does, with these documented differences:
- NSP's random "next" segment comes from `pool`, a `DocumentPool` of every document of
  the split (prep passes a `SplitPool` over the whole tokenized corpus), and is always
  from another document (Google retries 10 times, then accepts its own document).
- random numbers come from a `numpy.random.Generator` per document (prep seeds it from
  the seed, the split and the document's number in the split), so rows equal Google's in
  distribution, not bit for bit, and do not depend on how the work is cut.
- `sop` (ALBERT's sentence order): the negative is the same A and B swapped. A chunk of
  one sentence is cut inside the sentence so that it still yields an ordered pair.
- `mlm`: contiguous blocks of whole sentences up to the target length, one segment;
  a sentence longer than the block is cut into block-sized pieces.
Shuffling instances is not the recipe's business: prep shuffles the whole split.
`create_instances(documents, spec, rng)` is the recipe over a small in-memory corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from data_prep.corpus import Document, DocumentPool, ListPool
from data_prep.masking import MaskingSpec, choose_flat, replace_flat

Sentence = list[int]


@dataclass(frozen=True)
class RecipeSpec:
    """Settings of the recipe (a slice of PrepConfig plus the tokenizer's special ids)."""

    max_seq_len: int
    objective: str            # "nsp" | "sop" | "mlm"
    short_seq_prob: float
    cls_id: int
    sep_id: int
    dupe_factor: int = 1
    masking: MaskingSpec | None = None   # static masking when set


@dataclass
class Instance:
    input_ids: np.ndarray       # int32, [CLS] A [SEP] B [SEP] (masked when static)
    token_type_ids: np.ndarray  # int8
    label: int                  # 0 = B follows A, 1 = random/swapped; -1 for mlm
    positions: np.ndarray | None = None
    originals: np.ndarray | None = None


def truncate_seq_pair(a: list[int], b: list[int], max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Google's truncation: drop from the longer side, from its front or back at random,
    until the pair fits. Returns new lists (the inputs are not modified)."""
    excess = len(a) + len(b) - max_num_tokens
    if excess <= 0:
        return a, b
    coins = rng.random(excess) < 0.5
    a0, a1, b0, b1 = 0, len(a), 0, len(b)
    for front in coins:
        if (a1 - a0) > (b1 - b0):
            if front:
                a0 += 1
            else:
                a1 -= 1
        elif front:
            b0 += 1
        else:
            b1 -= 1
    return a[a0:a1], b[b0:b1]


def _pair(a: list[int], b: list[int], label: int, spec: RecipeSpec) -> Instance:
    ids = np.empty(len(a) + len(b) + 3, dtype=np.int32)
    ids[0] = spec.cls_id
    ids[1:len(a) + 1] = a
    ids[len(a) + 1] = spec.sep_id
    ids[len(a) + 2:-1] = b
    ids[-1] = spec.sep_id
    types = np.zeros(ids.shape[0], dtype=np.int8)
    types[len(a) + 2:] = 1
    return Instance(ids, types, label)


def _target_length(max_num_tokens: int, spec: RecipeSpec, rng: np.random.Generator) -> int:
    # Google draws a shorter target (once per document) so the model sees short inputs.
    if rng.random() < spec.short_seq_prob:
        return int(rng.integers(2, max_num_tokens + 1))
    return max_num_tokens


def _flat(chunk: list[Sentence]) -> list[int]:
    out: list[int] = []
    for s in chunk:
        out.extend(s)
    return out


def pair_instances(document: Document, index: int, pool: DocumentPool, spec: RecipeSpec,
                   rng: np.random.Generator) -> list[Instance]:
    """NSP/SOP instances of one document (Google's create_instances_from_document);
    `index` is the document's number in `pool`, where random next segments come from."""
    max_num_tokens = spec.max_seq_len - 3
    target = _target_length(max_num_tokens, spec, rng)
    instances: list[Instance] = []
    chunk: list[Sentence] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            a = _flat(chunk[:a_end])
            label = 0
            if spec.objective == "nsp":
                if len(chunk) == 1 or rng.random() < 0.5:
                    label = 1
                    b = _random_b(pool, index, target - len(a), rng)
                    # the sentences not used as B go back to the stream
                    i -= len(chunk) - a_end
                else:
                    b = _flat(chunk[a_end:])
            else:  # sop
                if len(chunk) == 1:
                    a, b = _cut_sentence(a, rng)
                else:
                    b = _flat(chunk[a_end:])
                if a and b and rng.random() < 0.5:
                    a, b, label = b, a, 1
            if a and b:
                a, b = truncate_seq_pair(a, b, max_num_tokens, rng)
                instances.append(_pair(a, b, label, spec))
            chunk, length = [], 0
        i += 1
    return instances


def _cut_sentence(tokens: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    if len(tokens) < 2:
        return tokens, []
    cut = int(rng.integers(1, len(tokens)))
    return tokens[:cut], tokens[cut:]


def _random_b(pool: DocumentPool, index: int, target_b: int,
              rng: np.random.Generator) -> list[int]:
    """Sentences of another document from a random start, up to `target_b` tokens.
    Uniform over the other documents of the pool (a pool of one reuses itself)."""
    if len(pool) > 1:
        other = int(rng.integers(0, len(pool) - 1))
        other += other >= index
    else:
        other = index
    start = int(rng.integers(0, pool.num_sentences(other)))
    return pool.tokens_from(other, start, target_b)


def mlm_instances(document: Document, spec: RecipeSpec,
                  rng: np.random.Generator) -> list[Instance]:
    """Single-segment instances: blocks of whole sentences up to the target length."""
    max_num_tokens = spec.max_seq_len - 2
    target = _target_length(max_num_tokens, spec, rng)
    instances: list[Instance] = []
    block: list[int] = []
    for sentence in document:
        pieces = [sentence[k:k + max_num_tokens] for k in range(0, len(sentence), max_num_tokens)]
        for piece in pieces:
            if block and len(block) + len(piece) > target:
                instances.append(_single(block, spec))
                block = []
            block.extend(piece)
    if block:
        instances.append(_single(block, spec))
    return instances


def _single(block: list[int], spec: RecipeSpec) -> Instance:
    ids = np.empty(len(block) + 2, dtype=np.int32)
    ids[0], ids[-1] = spec.cls_id, spec.sep_id
    ids[1:-1] = block
    return Instance(ids, np.zeros(ids.shape[0], dtype=np.int8), -1)


def document_instances(document: Document, index: int, pool: DocumentPool,
                       spec: RecipeSpec, rng: np.random.Generator) -> list[Instance]:
    """All instances of one document: `dupe_factor` passes, each instance masked on its
    own when `spec.masking` is set (the masks are drawn after the pairs, from `rng`)."""
    return _mask(document_pairs(document, index, pool, spec, rng), spec.masking, rng)


def document_pairs(document: Document, index: int, pool: DocumentPool, spec: RecipeSpec,
                   rng: np.random.Generator) -> list[Instance]:
    """`document_instances` before masking (`mask_documents` masks many at once)."""
    instances: list[Instance] = []
    for _ in range(spec.dupe_factor):
        if spec.objective == "mlm":
            instances.extend(mlm_instances(document, spec, rng))
        else:
            instances.extend(pair_instances(document, index, pool, spec, rng))
    return instances


def mask_documents(documents: list[list[Instance]], rngs: list[np.random.Generator],
                   masking: MaskingSpec) -> None:
    """Mask, in place, the unmasked instances of many documents, each from its own
    generator: the result and every generator's state afterwards equal `_mask` called
    document by document (each draws its keys, then its rolls and random ids), with the
    choice of positions vectorised over all of them. Whole-word masking goes document by
    document."""
    if masking.whole_word:
        for instances, rng in zip(documents, rngs):
            _mask(instances, masking, rng)
        return
    rows = [inst.input_ids for instances in documents for inst in instances]
    if not rows:
        return
    lengths = np.fromiter((r.shape[0] for r in rows), np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    doc_rows = np.cumsum([0] + [len(x) for x in documents])
    doc_starts = offsets[doc_rows]  # flat index of each document's first token
    key = np.concatenate([rng.random(int(b - a)) for rng, a, b, instances
                          in zip(rngs, doc_starts[:-1], doc_starts[1:], documents)
                          if instances])  # `_mask` draws nothing for a document without rows
    flat = np.concatenate(rows)
    chosen = choose_flat(flat, offsets, key, special_ids=masking.special_ids,
                         masked_lm_prob=masking.masked_lm_prob,
                         max_predictions=masking.max_predictions)
    per_doc = np.diff(np.searchsorted(chosen, doc_starts))
    rolls, random_ids = [], []
    for rng, n, instances in zip(rngs, per_doc.tolist(), documents):
        if instances:
            rolls.append(rng.random(n))
            random_ids.append(rng.integers(0, masking.vocab_size, n))
    masked, chosen, originals = replace_flat(flat, chosen, np.concatenate(rolls),
                                             np.concatenate(random_ids), masking.mask_id)
    row = np.searchsorted(offsets, chosen, side="right") - 1
    positions = (chosen - offsets[row]).astype(np.int32)
    cuts = np.cumsum(np.bincount(row, minlength=len(rows)))[:-1]
    originals = originals.astype(np.int32)
    for inst, ids, pos, orig in zip((i for x in documents for i in x),
                                    np.split(masked, offsets[1:-1]), np.split(positions, cuts),
                                    np.split(originals, cuts)):
        inst.input_ids, inst.positions, inst.originals = ids, pos, orig


def _mask(instances: list[Instance], masking: MaskingSpec | None,
          rng: np.random.Generator) -> list[Instance]:
    if masking is not None and instances:
        masked, positions, originals = masking.apply_batch(
            [inst.input_ids for inst in instances], rng)
        for inst, ids, pos, orig in zip(instances, masked, positions, originals):
            inst.input_ids = ids
            inst.positions = pos.astype(np.int32)
            inst.originals = orig.astype(np.int32)
    return instances


def create_instances(documents: list[Document], spec: RecipeSpec,
                     rng: np.random.Generator) -> list[Instance]:
    """All instances of a small in-memory corpus, shuffled (Google's script on a corpus
    that fits in memory; one generator for the whole corpus)."""
    pool = ListPool(documents)
    unmasked = replace(spec, masking=None)  # pairs first, then masks: as Google orders it
    instances: list[Instance] = []
    for index, document in enumerate(documents):
        instances.extend(document_instances(document, index, pool, unmasked, rng))
    instances = _mask(instances, spec.masking, rng)
    order = rng.permutation(len(instances))
    return [instances[k] for k in order]


def _list_array(rows: list[np.ndarray], dtype: Any) -> Any:
    import pyarrow as pa

    lengths = np.fromiter((r.shape[0] for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(rows).astype(dtype, copy=False) if rows else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def instances_to_table(instances: list[Instance], objective: str, static: bool) -> Any:
    """A pyarrow Table in the dataset schema (the contract training and tools read)."""
    import pyarrow as pa

    cols = {"input_ids": _list_array([x.input_ids for x in instances], np.int32),
            "token_type_ids": _list_array([x.token_type_ids for x in instances], np.int8)}
    if objective != "mlm":
        cols["next_sentence_label"] = pa.array(
            np.fromiter((x.label for x in instances), dtype=np.int8, count=len(instances)))
    if static:
        cols["masked_lm_positions"] = _list_array([x.positions for x in instances], np.int32)
        cols["masked_lm_ids"] = _list_array([x.originals for x in instances], np.int32)
    return pa.table(cols, schema=output_schema(objective, static))


def output_schema(objective: str, static: bool) -> Any:
    """The Parquet schema of a pretraining dataset for this objective and masking."""
    import pyarrow as pa

    fields = [pa.field("input_ids", pa.list_(pa.int32())),
              pa.field("token_type_ids", pa.list_(pa.int8()))]
    if objective != "mlm":
        fields.append(pa.field("next_sentence_label", pa.int8()))
    if static:
        fields += [pa.field("masked_lm_positions", pa.list_(pa.int32())),
                   pa.field("masked_lm_ids", pa.list_(pa.int32()))]
    return pa.schema(fields)
