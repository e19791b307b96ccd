"""Google's recipe on generated corpora, without Ray: layout, pairing, lengths, masks."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.masking import MaskingSpec, num_to_predict
from data_prep.recipe import (RecipeSpec, create_instances, instances_to_table,
                              truncate_seq_pair)

CLS, SEP, MASK = 2, 3, 4
SPECIAL = (0, 1, 2, 3, 4)
VOCAB = 100_000


def corpus(n_docs=60, seed=0, max_sent=30, min_sents=1):
    """Doc d holds ids d*1000+1, d*1000+2, ... in order: every token says which document
    it came from and where, so pairs can be checked against the source."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        nxt, sents = (d + 1) * 1000 + 1, []
        for _ in range(int(rng.integers(min_sents, min_sents + 14))):
            n = int(rng.integers(3, max_sent))
            sents.append(list(range(nxt, nxt + n)))
            nxt += n
        docs.append(sents)
    return docs


def spec(**kw):
    base = dict(max_seq_len=64, objective="nsp", short_seq_prob=0.1, cls_id=CLS, sep_id=SEP)
    base.update(kw)
    return RecipeSpec(**base)


def segments(inst):
    ids = inst.input_ids
    seps = np.flatnonzero(ids == SEP)
    return ids[1:seps[0]], ids[seps[0] + 1:seps[1]], seps


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_pair_layout_and_lengths(objective):
    insts = create_instances(corpus(), spec(objective=objective, dupe_factor=3),
                             np.random.default_rng(1))
    assert len(insts) > 200
    for inst in insts:
        ids, types = inst.input_ids, inst.token_type_ids
        assert ids.dtype == np.int32 and types.dtype == np.int8
        assert len(ids) <= 64 and ids[0] == CLS and ids[-1] == SEP
        a, b, seps = segments(inst)
        assert len(seps) == 2 and len(a) >= 1 and len(b) >= 1
        # [CLS] A [SEP] are segment 0, B [SEP] segment 1
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:] == 1).all()
        assert inst.label in (0, 1)


def test_nsp_positive_is_continuation_negative_is_other_document():
    # many short sentences: chunks of one sentence (always random-next in Google's
    # recipe) are rare, so the coin decides and the labels are balanced
    insts = create_instances(corpus(max_sent=10, min_sents=20), spec(objective="nsp", dupe_factor=5),
                             np.random.default_rng(2))
    labels = np.array([i.label for i in insts])
    assert 0.45 < labels.mean() < 0.58
    for inst in insts:
        a, b, _ = segments(inst)
        if inst.label == 0:
            assert set(a // 1000) == set(b // 1000) and a.max() < b.min()
            assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()  # contiguous text
        else:
            assert set(b // 1000).isdisjoint(set(a // 1000))


def test_sop_negatives_are_swapped_segments_of_the_same_document():
    insts = create_instances(corpus(), spec(objective="sop", dupe_factor=5),
                             np.random.default_rng(3))
    labels = np.array([i.label for i in insts])
    assert abs(labels.mean() - 0.5) < 0.05
    for inst in insts:
        a, b, _ = segments(inst)
        assert set(a // 1000) == set(b // 1000)  # never another document
        if inst.label == 0:
            assert a.max() < b.min()
        else:
            assert a.min() > b.max()


def test_mlm_blocks_are_whole_sentences_in_one_segment():
    docs = corpus()
    starts = {s[0] for d in docs for s in d}
    ends = {s[-1] for d in docs for s in d}
    insts = create_instances(docs, spec(objective="mlm", short_seq_prob=0.0),
                             np.random.default_rng(4))
    total = sum(len(s) for d in docs for s in d)
    assert sum(len(i.input_ids) - 2 for i in insts) == total  # nothing lost, nothing doubled
    for inst in insts:
        body = inst.input_ids[1:-1]
        assert inst.label == -1 and (inst.token_type_ids == 0).all()
        assert len(inst.input_ids) <= 64 and (np.isin(inst.input_ids, SPECIAL).sum() == 2)
        assert body[0] in starts and body[-1] in ends


def test_short_seq_prob_makes_short_instances():
    docs = corpus(n_docs=80, seed=5)
    def short_fraction(p):
        insts = create_instances(docs, spec(short_seq_prob=p, max_seq_len=128),
                                 np.random.default_rng(6))
        return np.mean([len(i.input_ids) < 64 for i in insts])
    assert short_fraction(1.0) > short_fraction(0.0) + 0.2


def test_static_masking_counts_and_80_10_10():
    masking = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
    docs = corpus(n_docs=80, seed=7)
    unmasked = create_instances(docs, spec(dupe_factor=4), np.random.default_rng(8))
    insts = create_instances(docs, spec(dupe_factor=4, masking=masking), np.random.default_rng(8))
    assert len(insts) == len(unmasked)
    mask = rand = same = 0
    for inst in insts:
        assert len(inst.positions) == num_to_predict(len(inst.input_ids), 0.15, 20)
        assert not np.isin(inst.input_ids[0], SPECIAL[:2]) and inst.input_ids[0] == CLS
        assert not np.isin(inst.originals, SPECIAL).any()
        new = inst.input_ids[inst.positions]
        mask += int((new == MASK).sum())
        same += int((new == inst.originals).sum())
        rand += int(((new != MASK) & (new != inst.originals)).sum())
    total = mask + rand + same
    assert abs(mask / total - 0.8) < 0.02
    assert abs(rand / total - 0.1) < 0.02 and abs(same / total - 0.1) < 0.02


def test_whole_word_masking_in_instances():
    continuation = np.zeros(VOCAB, dtype=bool)
    continuation[np.arange(VOCAB) % 3 != 0] = True  # words of 3 pieces: x0 ##x1 ##x2
    continuation[list(SPECIAL)] = False
    masking = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL,
                          whole_word=True, continuation=continuation)
    insts = create_instances(corpus(seed=9), spec(masking=masking, dupe_factor=2),
                             np.random.default_rng(10))
    checked = 0
    for inst in insts:
        masked = np.zeros(len(inst.input_ids), bool)
        masked[inst.positions] = True
        original = inst.input_ids.copy()
        original[inst.positions] = inst.originals
        for p in range(2, len(original)):
            if continuation[original[p]] and not np.isin(original[p - 1], SPECIAL):
                assert masked[p] == masked[p - 1]
                checked += masked[p]
    assert checked > 100


def test_truncate_seq_pair_trims_the_longer_side():
    rng = np.random.default_rng(11)
    a, b = truncate_seq_pair(list(range(100)), list(range(200, 210)), 50, rng)
    assert len(a) + len(b) == 50 and len(b) == 10
    assert a == list(range(a[0], a[0] + len(a)))  # a contiguous piece of the original


def test_table_has_the_contract_schema():
    masking = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
    insts = create_instances(corpus(n_docs=5), spec(masking=masking), np.random.default_rng(0))
    table = instances_to_table(insts, "nsp", static=True)
    assert str(table.schema.field("input_ids").type) == "list<item: int32>"
    assert str(table.schema.field("token_type_ids").type) == "list<item: int8>"
    assert str(table.schema.field("next_sentence_label").type) == "int8"
    assert str(table.schema.field("masked_lm_positions").type) == "list<item: int32>"
    assert table.column("input_ids").to_pylist()[0] == insts[0].input_ids.tolist()
    mlm = instances_to_table(create_instances(corpus(n_docs=5), spec(objective="mlm"),
                                              np.random.default_rng(0)), "mlm", static=False)
    assert mlm.column_names == ["input_ids", "token_type_ids"]


@pytest.mark.parametrize("whole_word", [False, True])
def test_unit_rows_mask_as_each_document_alone_would(whole_word):
    """Prep's instance pass runs the recipe over a whole unit's tokens and masks many
    documents at once as columns; the rows, and each document's generator afterwards
    (it then draws the shuffle keys), equal pairing and masking document by document
    and building the table from the instances."""
    from data_prep.corpus import ListPool
    from data_prep.recipe import InstanceColumns, UnitRows, document_pairs, mask_columns

    docs = corpus(n_docs=40, seed=3)
    continuation = np.zeros(VOCAB, bool)
    continuation[np.arange(0, VOCAB, 3)] = True
    masking = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL,
                          whole_word=whole_word, continuation=continuation)
    pool, s = ListPool(docs), spec(dupe_factor=2)

    def rngs():
        return [np.random.default_rng([5, d]) for d in range(len(docs))]

    alone_rngs = rngs()
    alone = [document_pairs(doc, d, pool, s, rng)
             for d, (doc, rng) in enumerate(zip(docs, alone_rngs))]
    for instances, rng in zip(alone, alone_rngs):
        masked, positions, originals = masking.apply_batch([x.input_ids for x in instances],
                                                           rng)
        for x, ids, pos, orig in zip(instances, masked, positions, originals):
            x.input_ids, x.positions, x.originals = ids, pos.astype(np.int32), \
                orig.astype(np.int32)
    expected = instances_to_table([x for i in alone for x in i], "nsp", static=True)

    tokens = np.array([t for doc in docs for sent in doc for t in sent], np.int32)
    bounds = np.cumsum([0] + [len(sent) for doc in docs for sent in doc]).tolist()
    first = np.cumsum([0] + [len(doc) for doc in docs]).tolist()
    unit, together, halves = UnitRows(tokens, s), rngs(), []
    for group in (range(0, 17), range(17, len(docs))):
        rows = [unit.add(bounds[first[d]:first[d + 1] + 1], d, pool, together[d])[0]
                for d in group]
        halves.append(mask_columns(unit.columns(), rows, [together[d] for d in group],
                                   masking))
    assert InstanceColumns.concat(halves).to_table("nsp", True).equals(expected)
    assert [r.random() for r in together] == [r.random() for r in alone_rngs]
    empty = mask_columns(unit.columns(), [0, 0], together[:2], masking)
    assert len(empty) == 0 and empty.position_offsets.tolist() == [0]
