"""The corpus-wide NSP pool and the global shuffle, without Ray: the passes of prep are
plain functions, run here on generated token ids (token d*1000+k belongs to document d)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.config import PrepConfig
from data_prep.corpus import ListPool, SplitPool, read_tokenized, write_tokenized
from data_prep.masking import MaskingSpec
from data_prep.pipeline import instance_unit, merge_bucket, num_buckets
from data_prep.recipe import RecipeSpec, document_instances

CLS, SEP, MASK, PAD = 2, 3, 4, 0


def corpus(n_docs: int, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        nxt, sents = (d + 1) * 1000 + 1, []
        for _ in range(int(rng.integers(1, 12))):
            n = int(rng.integers(3, 25))
            sents.append(list(range(nxt, nxt + n)))
            nxt += n
        docs.append(sents)
    return docs


def spec(objective: str = "nsp", static: bool = True) -> RecipeSpec:
    masking = MaskingSpec(vocab_size=100_000, mask_id=MASK, special_ids=(PAD, CLS, SEP)) \
        if static else None
    return RecipeSpec(max_seq_len=48, objective=objective, short_seq_prob=0.1, cls_id=CLS,
                      sep_id=SEP, dupe_factor=3, masking=masking)


def write_units(folder: Path, docs, per_unit: int) -> list[tuple[str, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    units = []
    for u, k in enumerate(range(0, len(docs), per_unit)):
        path = folder / f"tokens-{u:06d}.bin"
        write_tokenized(path, docs[k:k + per_unit])
        units.append((str(path), len(docs[k:k + per_unit])))
    return units


def test_unit_files_round_trip_and_the_split_pool_reads_any_document(tmp_path):
    docs = corpus(50)
    units = write_units(tmp_path, docs, per_unit=7)
    assert [d for path, _ in units for d in read_tokenized(Path(path))] == docs
    pool, reference = SplitPool(units, max_open=3), ListPool(docs)
    assert len(pool) == 50
    rng = np.random.default_rng(0)
    for _ in range(500):
        d = int(rng.integers(0, 50))
        n = pool.num_sentences(d)
        assert n == reference.num_sentences(d)
        start, need = int(rng.integers(0, n)), int(rng.integers(0, 60))
        assert (pool.segment_from(d, start, need).tolist()
                == reference.segment_from(d, start, need).tolist())
    pool.close()


def test_random_next_is_never_from_a_documents_own_text():
    """One-document files: the pool is every document, and a random B never comes from
    A's document, even with only two documents in the pool."""
    for n_docs in (2, 40):
        docs = corpus(n_docs, seed=n_docs)
        pool = ListPool(docs)
        randoms = 0
        for d, doc in enumerate(docs):
            for inst in document_instances(doc, d, pool, spec(static=False),
                                           np.random.default_rng([1, d])):
                seps = np.flatnonzero(inst.input_ids == SEP)
                a, b = inst.input_ids[1:seps[0]], inst.input_ids[seps[0] + 1:seps[1]]
                assert set(a // 1000) == {d + 1}
                if inst.label == 1:
                    randoms += 1
                    assert d + 1 not in set(b // 1000)
        assert randoms > 0


def _build(tmp: Path, docs, per_unit: int, objective: str = "nsp") -> list:
    """Passes 2 and 3 of prep on pre-tokenized docs: (instance tables of every bucket)."""
    units = write_units(tmp / "_staging", docs, per_unit)
    pool = SplitPool(units)
    cfg = PrepConfig(dupe_factor=3, masking="static")
    buckets = max(3, num_buckets(sum(len(s) for d in docs for s in d), cfg))
    paths, first = [], 0
    for index, (path, n) in enumerate(units):
        unit = {"index": index, "split": "train", "first_doc": first, "tokens_path": path,
                "buckets": buckets}
        paths.append(instance_unit(unit, spec(objective), 12345, pool, tmp / "_staging")
                     ["instances_path"])
        first += n
    listing = tmp / "units.json"
    listing.write_text(json.dumps(paths))
    tables = []
    for b in range(buckets):
        result = merge_bucket({"split": "train", "bucket": b, "buckets": buckets,
                               "units_file": str(listing)}, tmp)
        tables.append(pq.read_table(tmp / result["file"]["path"]))
    pool.close()
    return tables


def _source(row) -> int:
    """A's document: the first token, unmasked."""
    ids = np.array(row["input_ids"])
    ids[row["masked_lm_positions"]] = row["masked_lm_ids"]
    return int(ids[1]) // 1000


@pytest.mark.parametrize("objective", ["nsp", "mlm"])
def test_shuffle_is_global_and_does_not_depend_on_unit_size(tmp_path, objective):
    docs = corpus(120, seed=3)
    small = _build(tmp_path / "a", docs, per_unit=5, objective=objective)
    large = _build(tmp_path / "b", docs, per_unit=49, objective=objective)
    assert [t.to_pylist() for t in small] == [t.to_pylist() for t in large]
    rows = [r for t in small for r in t.to_pylist()]
    source = [_source(r) for r in rows]
    assert len(set(source)) == 120 and len(rows) > 800
    same_next = np.mean([x == y for x, y in zip(source[:-1], source[1:])])
    assert same_next < 0.05  # about 1/120 when shuffled; ~1 when grouped by document
    # every part is a random sample of the whole split, not a range of documents
    for t in small:
        docs_in_part = {_source(r) for r in t.to_pylist()}
        assert len(docs_in_part) > 60


def test_parts_per_split_follow_the_size_rule_unless_num_parts_is_given():
    """Training workers read disjoint parts: a split of 64 MB or more gets at least 64,
    parts stay at most ~64 MB and none under 1 MB by default; --num-parts overrides."""
    cfg = PrepConfig(dupe_factor=1, masking="dynamic")  # 5 bytes a token
    assert num_buckets(1_000, cfg) == 1  # a few KB: one part
    assert num_buckets(2_000_000, cfg) == 9  # ~10 MB: parts of at least 1 MB
    assert num_buckets(14_000_000, cfg) == 64  # ~70 MB: 64 parts of ~1 MB
    assert num_buckets(2_000_000_000, cfg) == 150  # ~10 GB: parts of at most 64 MB
    assert num_buckets(1_000, PrepConfig(num_parts=7)) == 7
    with pytest.raises(Exception, match="num_parts"):
        PrepConfig(num_parts=-1)
