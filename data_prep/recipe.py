"""Google's create_pretraining_data recipe as pure functions over token ids.

`document_instances(document, index, pool, spec, rng)` turns one tokenized document (a
list of sentences, each a list of ids) into its training instances, exactly as Google's
script does (`UnitRows`, which prep runs over whole units), with these documented
differences:
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
    a0, a1, b0, b1 = _truncate(0, len(a), 0, len(b), max_num_tokens, rng)
    return a[a0:a1], b[b0:b1]


def _truncate(a0: int, a1: int, b0: int, b1: int, max_num_tokens: int,
              rng: np.random.Generator) -> tuple[int, int, int, int]:
    # `truncate_seq_pair` on the bounds of A and B: one coin per token too many
    excess = (a1 - a0) + (b1 - b0) - max_num_tokens
    if excess > 0:
        for coin in rng.random(excess).tolist():
            if (a1 - a0) > (b1 - b0):
                if coin < 0.5:
                    a0 += 1
                else:
                    a1 -= 1
            elif coin < 0.5:
                b0 += 1
            else:
                b1 -= 1
    return a0, a1, b0, b1


def _target_length(max_num_tokens: int, spec: RecipeSpec, rng: np.random.Generator) -> int:
    # Google draws a shorter target (once per document) so the model sees short inputs.
    if rng.random() < spec.short_seq_prob:
        return int(rng.integers(2, max_num_tokens + 1))
    return max_num_tokens


def document_instances(document: Document, index: int, pool: DocumentPool,
                       spec: RecipeSpec, rng: np.random.Generator) -> list[Instance]:
    """All instances of one document: `dupe_factor` passes, each instance masked on its
    own when `spec.masking` is set (the masks are drawn after the pairs, from `rng`)."""
    return _mask(document_pairs(document, index, pool, spec, rng), spec.masking, rng)


def document_pairs(document: Document, index: int, pool: DocumentPool, spec: RecipeSpec,
                   rng: np.random.Generator) -> list[Instance]:
    """`document_instances` before masking: `UnitRows` over this one document."""
    bounds = np.zeros(len(document) + 1, np.int64)
    np.cumsum([len(s) for s in document], out=bounds[1:])
    tokens = np.fromiter((t for s in document for t in s), np.int32, count=int(bounds[-1]))
    rows = UnitRows(tokens, spec)
    rows.add(bounds.tolist(), index, pool, rng)
    return rows.columns().instances()


@dataclass
class InstanceColumns:
    """Instances laid end to end in the dataset's columns (Arrow's list layout: row r of
    a list column is `values[offsets[r]:offsets[r + 1]]`): what prep's instance pass
    keeps and writes, with no array per row."""

    input_ids: np.ndarray        # int32, every row's ids (masked when static) end to end
    token_type_ids: np.ndarray   # int8, laid out as input_ids
    offsets: np.ndarray          # int64 (rows + 1), of input_ids and token_type_ids
    labels: np.ndarray           # int8 (rows,)
    positions: np.ndarray | None = None         # int32, each row's masked positions
    originals: np.ndarray | None = None         # int32, the ids there
    position_offsets: np.ndarray | None = None  # int64 (rows + 1), of both

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def concat(cls, parts: list[InstanceColumns]) -> InstanceColumns:
        def joined(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        def offsets(name: str) -> np.ndarray:  # each part's own, shifted past the ones before
            bases = np.cumsum([0] + [int(getattr(p, name)[-1]) for p in parts[:-1]])
            return np.concatenate([np.zeros(1, np.int64)] + [
                getattr(p, name)[1:] + base for p, base in zip(parts, bases.tolist())])

        static = parts[0].positions is not None
        return cls(joined("input_ids"), joined("token_type_ids"), offsets("offsets"),
                   joined("labels"),
                   joined("positions") if static else None,
                   joined("originals") if static else None,
                   offsets("position_offsets") if static else None)

    def instances(self) -> list[Instance]:
        """The rows as `Instance`s (unmasked columns; for small in-memory corpora)."""
        bounds = self.offsets.tolist()
        return [Instance(self.input_ids[a:b].copy(), self.token_type_ids[a:b].copy(),
                         int(label))
                for a, b, label in zip(bounds[:-1], bounds[1:], self.labels.tolist())]

    def to_table(self, objective: str, static: bool) -> Any:
        """The rows as a pyarrow Table in the dataset schema (`instances_to_table`'s)."""
        import pyarrow as pa

        def lists(offsets: np.ndarray, values: np.ndarray) -> Any:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                            pa.array(values))

        cols = {"input_ids": lists(self.offsets, self.input_ids),
                "token_type_ids": lists(self.offsets, self.token_type_ids)}
        if objective != "mlm":
            cols["next_sentence_label"] = pa.array(self.labels)
        if static:
            cols["masked_lm_positions"] = lists(self.position_offsets, self.positions)
            cols["masked_lm_ids"] = lists(self.position_offsets, self.originals)
        return pa.table(cols, schema=output_schema(objective, static))


def mask_columns(columns: InstanceColumns, doc_rows: list[int],
                 rngs: list[np.random.Generator], masking: MaskingSpec | None
                 ) -> InstanceColumns:
    """Unmasked `columns` (the rows of many documents, `doc_rows[d]` of them for
    document d) masked, when `masking` is set, each document from its own generator:
    the rows, and every generator's state afterwards, equal `_mask` called document by
    document (each draws its keys, then its rolls and random ids), with the choice of
    positions vectorised over all of them. Whole-word masking goes document by document."""
    offsets, flat = columns.offsets, columns.input_ids
    n_rows = offsets.shape[0] - 1
    if masking is None:
        return columns
    if n_rows == 0:
        columns.positions = np.zeros(0, np.int32)
        columns.originals = np.zeros(0, np.int32)
        columns.position_offsets = offsets
        return columns
    doc_bounds = np.cumsum([0] + list(doc_rows)).tolist()
    if masking.whole_word:
        masked, positions, originals = [], [], []
        for rng, r0, r1 in zip(rngs, doc_bounds[:-1], doc_bounds[1:]):
            if r1 > r0:  # `_mask` draws nothing for a document without rows
                rows = [flat[a:b] for a, b in zip(offsets[r0:r1].tolist(),
                                                  offsets[r0 + 1:r1 + 1].tolist())]
                m, p, o = masking.apply_batch(rows, rng)
                masked += m
                positions += [x.astype(np.int32) for x in p]
                originals += [x.astype(np.int32) for x in o]
        columns.input_ids = np.concatenate(masked)
        columns.positions = np.concatenate(positions)
        columns.originals = np.concatenate(originals)
        columns.position_offsets = np.zeros(n_rows + 1, np.int64)
        np.cumsum([x.shape[0] for x in positions], out=columns.position_offsets[1:])
        return columns
    doc_starts = offsets[doc_bounds]  # flat index of each document's first token
    # `_mask` draws nothing for a document without rows
    drawn = [(rng, a, b) for rng, a, b, r0, r1 in zip(
        rngs, doc_starts[:-1].tolist(), doc_starts[1:].tolist(), doc_bounds[:-1],
        doc_bounds[1:]) if r1 > r0]
    key = np.concatenate([rng.random(b - a) for rng, a, b in drawn])
    chosen = choose_flat(flat, offsets, key, special_ids=masking.special_ids,
                         masked_lm_prob=masking.masked_lm_prob,
                         max_predictions=masking.max_predictions)
    per_doc = np.diff(np.searchsorted(chosen, [a for _, a, _ in drawn] + [offsets[-1]]))
    rolls, random_ids = [np.zeros(0)], [np.zeros(0, np.int64)]
    for (rng, _, _), n in zip(drawn, per_doc.tolist()):
        rolls.append(rng.random(n))
        random_ids.append(rng.integers(0, masking.vocab_size, n))
    masked, chosen, originals = replace_flat(flat, chosen, np.concatenate(rolls),
                                             np.concatenate(random_ids), masking.mask_id)
    row = np.searchsorted(offsets, chosen, side="right") - 1
    columns.input_ids = masked
    columns.positions = (chosen - offsets[row]).astype(np.int32)
    columns.originals = originals.astype(np.int32)
    columns.position_offsets = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=n_rows), out=columns.position_offsets[1:])
    return columns


class UnitRows:
    """The recipe itself (Google's create_instances_from_document for nsp/sop, the
    blocks of `mlm`) over the documents of one tokenized unit: rows are kept as token
    ranges and laid out as columns for many documents at once (`columns`), so no list or
    array is built per sentence or per instance. Prep's instance pass runs it over each
    unit; `document_pairs` over one document.

    `tokens` holds the unit's ids end to end. `add(bounds, index, pool, rng)` takes a
    document as the list of its sentence bounds in `tokens` (sentence i is
    `tokens[bounds[i]:bounds[i + 1]]`) and records its rows: per row the
    start and length of segment A, of segment B (in `tokens`, or in a random next
    segment read from the pool), and the label."""

    def __init__(self, tokens: np.ndarray, spec: RecipeSpec) -> None:
        self.tokens, self.spec = tokens, spec
        self._extra: list[np.ndarray] = []   # random next segments, numbered after tokens
        self._extra_size = tokens.shape[0]
        self._rows: list[tuple[int, int, int, int, int]] = []

    def add(self, bounds: list[int], index: int, pool: DocumentPool,
            rng: np.random.Generator) -> tuple[int, int]:
        """Record the rows of one document (`dupe_factor` passes); returns how many, and
        their tokens."""
        before = len(self._rows)
        for _ in range(self.spec.dupe_factor):
            if self.spec.objective == "mlm":
                self._blocks(bounds, rng)
            else:
                self._pairs(bounds, index, pool, rng)
        new = self._rows[before:]
        specials = 2 if self.spec.objective == "mlm" else 3
        return len(new), sum(r[1] + r[3] for r in new) + specials * len(new)

    def _random_b(self, pool: DocumentPool, index: int, target_b: int,
                  rng: np.random.Generator) -> tuple[int, int]:
        # sentences of another document from a random start, up to `target_b` tokens,
        # uniform over the other documents of the pool (a pool of one reuses itself);
        # the segment is kept whole and numbered after `tokens`
        if len(pool) > 1:
            other = int(rng.integers(0, len(pool) - 1))
            other += other >= index
        else:
            other = index
        start = int(rng.integers(0, pool.num_sentences(other)))
        segment = pool.segment_from(other, start, target_b)
        at = self._extra_size
        self._extra.append(segment)
        self._extra_size += segment.shape[0]
        return at, at + segment.shape[0]

    def _pairs(self, bounds: list[int], index: int, pool: DocumentPool,
               rng: np.random.Generator) -> None:
        # Google's create_instances_from_document over (start, end) ranges of tokens:
        # chunks of sentences up to the target length, A = the chunk's first a_end
        # sentences, B = the rest (or, for half of NSP's pairs and every chunk of one
        # sentence, a random next segment, the unused sentences going back to the stream)
        spec, rows = self.spec, self._rows
        max_num_tokens = spec.max_seq_len - 3
        target = _target_length(max_num_tokens, spec, rng)
        nsp = spec.objective == "nsp"
        n = len(bounds) - 1
        first, i = 0, 0  # the chunk is sentences first..i
        while i < n:
            if i == n - 1 or bounds[i + 1] - bounds[first] >= target:
                size = i - first + 1
                a_end = first + (int(rng.integers(1, size)) if size >= 2 else 1)
                a0, a1 = bounds[first], bounds[a_end]
                label = 0
                if nsp:
                    if size == 1 or rng.random() < 0.5:
                        label = 1
                        b0, b1 = self._random_b(pool, index, target - (a1 - a0), rng)
                        i = a_end - 1  # the sentences not used as B go back to the stream
                    else:
                        b0, b1 = a1, bounds[i + 1]
                else:  # sop
                    if size == 1:
                        if a1 - a0 < 2:
                            b0 = b1 = a1
                        else:
                            cut = a0 + int(rng.integers(1, a1 - a0))
                            a1, b0, b1 = cut, cut, a1
                    else:
                        b0, b1 = a1, bounds[i + 1]
                    if a1 > a0 and b1 > b0 and rng.random() < 0.5:
                        a0, a1, b0, b1, label = b0, b1, a0, a1, 1
                if a1 > a0 and b1 > b0:
                    a0, a1, b0, b1 = _truncate(a0, a1, b0, b1, max_num_tokens, rng)
                    rows.append((a0, a1 - a0, b0, b1 - b0, label))
                first = i + 1
            i += 1

    def _blocks(self, bounds: list[int], rng: np.random.Generator) -> None:
        # `mlm`: blocks of whole sentences up to the target length (a sentence longer
        # than the block cut into block-sized pieces), each one range of `tokens`; one
        # segment, no B
        max_num_tokens = self.spec.max_seq_len - 2
        target = _target_length(max_num_tokens, self.spec, rng)
        start = size = 0
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            for k in range(s0, s1, max_num_tokens):
                piece = min(max_num_tokens, s1 - k)
                if size and size + piece > target:
                    self._rows.append((start, size, 0, 0, -1))
                    size = 0
                if not size:
                    start = k
                size += piece
        if size:
            self._rows.append((start, size, 0, 0, -1))

    def columns(self) -> InstanceColumns:
        """The rows recorded since the last call, unmasked, as columns (then cleared)."""
        spec = self.spec
        fields = np.array(self._rows, np.int64).reshape(-1, 5)
        n_rows = fields.shape[0]
        single = self.spec.objective == "mlm"
        # each row is 5 runs of a source: [CLS], A, [SEP], B, [SEP] (mlm: no B, no 2nd SEP)
        source = np.concatenate([self.tokens, *self._extra,
                                 np.array([spec.cls_id, spec.sep_id], self.tokens.dtype)])
        cls_at, sep_at = source.shape[0] - 2, source.shape[0] - 1
        starts = np.empty((n_rows, 5), np.int64)
        lengths = np.empty((n_rows, 5), np.int64)
        starts[:, 0], starts[:, 1], starts[:, 2] = cls_at, fields[:, 0], sep_at
        starts[:, 3], starts[:, 4] = fields[:, 2], sep_at
        lengths[:, 0], lengths[:, 1], lengths[:, 2] = 1, fields[:, 1], 1
        lengths[:, 3], lengths[:, 4] = fields[:, 3], 0 if single else 1
        run_lengths = lengths.ravel()
        total = int(run_lengths.sum())
        run_out = np.zeros(run_lengths.shape[0], np.int64)  # where each run starts in the rows
        np.cumsum(run_lengths[:-1], out=run_out[1:])
        index = np.repeat(starts.ravel() - run_out, run_lengths) + np.arange(total)
        offsets = np.zeros(n_rows + 1, np.int64)
        np.cumsum(lengths.sum(axis=1), out=offsets[1:])
        types = np.repeat(np.tile(np.array([0, 0, 0, 1, 1], np.int8), n_rows), run_lengths)
        self._extra, self._extra_size, self._rows = [], self.tokens.shape[0], []
        return InstanceColumns(source[index], types, offsets, fields[:, 4].astype(np.int8))


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
