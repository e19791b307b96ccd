"""mask_tokens follows Google's recipe; collate_pretraining pads and labels correctly."""

from __future__ import annotations

import numpy as np
import pytest

from bert_core.config_io import BertflowError
from data_prep.collate import collate_pretraining
from data_prep.masking import MaskingSpec, mask_tokens, num_to_predict

CLS, SEP, MASK, PAD, VOCAB = 2, 3, 4, 0, 1000
SPECIAL = (0, 1, 2, 3, 4)


def _sequence(rng, n):
    body = rng.integers(10, VOCAB, n - 3)
    cut = max(1, (n - 3) // 2)
    return np.concatenate([[CLS], body[:cut], [SEP], body[cut:], [SEP]]).astype(np.int32)


def test_mask_count_is_googles_formula_and_never_special():
    rng = np.random.default_rng(0)
    for n in [4, 5, 10, 33, 100, 128, 200]:
        ids = _sequence(rng, n)
        masked, pos, orig = mask_tokens(ids, rng, vocab_size=VOCAB, mask_id=MASK,
                                        special_ids=SPECIAL, max_predictions=20)
        assert len(pos) == min(20, max(1, round(n * 0.15)), n - 3)
        assert np.all(np.diff(pos) > 0)
        assert not np.isin(ids[pos], SPECIAL).any()
        assert np.array_equal(orig, ids[pos])
        untouched = np.setdiff1d(np.arange(n), pos)
        assert np.array_equal(masked[untouched], ids[untouched])
    assert num_to_predict(128, 0.15, 20) == 19 and num_to_predict(3, 0.15, 20) == 1
    assert num_to_predict(500, 0.15, 20) == 20


def test_80_10_10_split_within_tolerance():
    rng = np.random.default_rng(1)
    kinds = {"mask": 0, "random": 0, "same": 0}
    total = 0
    for _ in range(2000):
        ids = _sequence(rng, 128)
        masked, pos, orig = mask_tokens(ids, rng, vocab_size=VOCAB, mask_id=MASK,
                                        special_ids=SPECIAL)
        new = masked[pos]
        kinds["mask"] += int((new == MASK).sum())
        kinds["same"] += int((new == orig).sum())
        kinds["random"] += int(((new != MASK) & (new != orig)).sum())
        total += len(pos)
    # random draws that hit the original id count as "same": 0.1 / VOCAB, negligible
    assert abs(kinds["mask"] / total - 0.8) < 0.01
    assert abs(kinds["random"] / total - 0.1) < 0.01
    assert abs(kinds["same"] / total - 0.1) < 0.01


def test_same_seed_same_mask():
    ids = _sequence(np.random.default_rng(2), 64)
    a = mask_tokens(ids, np.random.default_rng(7), vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
    b = mask_tokens(ids, np.random.default_rng(7), vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_whole_word_masking_masks_all_pieces_of_a_word():
    rng = np.random.default_rng(3)
    for _ in range(200):
        ids = _sequence(rng, 60)
        starts = rng.random(60) < 0.5  # words of 1..k pieces
        starts[[0]] = True
        _, pos, _ = mask_tokens(ids, rng, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL,
                                word_starts=starts)
        k = num_to_predict(60, 0.15, 20)
        assert 0 < len(pos) <= k
        chosen = np.zeros(60, bool)
        chosen[pos] = True
        special = np.isin(ids, SPECIAL)
        for i in range(1, 60):
            # a continuation piece is chosen iff the piece before it (same word) is
            if not starts[i] and not special[i] and not special[i - 1]:
                assert chosen[i] == chosen[i - 1]


def _rows(rng, n_rows, with_static=True):
    batch = {"input_ids": [], "token_type_ids": [], "next_sentence_label": [],
             "masked_lm_positions": [], "masked_lm_ids": []}
    for _ in range(n_rows):
        n = int(rng.integers(6, 40))
        ids = _sequence(rng, n)
        masked, pos, orig = mask_tokens(ids, rng, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
        batch["input_ids"].append(masked if with_static else ids)
        batch["token_type_ids"].append(np.r_[np.zeros(n // 2, np.int8), np.ones(n - n // 2, np.int8)])
        batch["next_sentence_label"].append(int(rng.integers(0, 2)))
        batch["masked_lm_positions"].append(pos.astype(np.int32))
        batch["masked_lm_ids"].append(orig.astype(np.int32))
    if not with_static:
        del batch["masked_lm_positions"], batch["masked_lm_ids"]
    return batch


def test_collate_static_pads_and_places_labels():
    rng = np.random.default_rng(4)
    batch = _rows(rng, 8)
    # as Ray Data gives numpy batches: object arrays of arrays
    as_numpy = {k: np.array(v, dtype=object) if k != "next_sentence_label" else np.array(v)
                for k, v in batch.items()}
    out = collate_pretraining(as_numpy, pad_id=PAD)
    T = max(len(r) for r in batch["input_ids"])
    assert out["input_ids"].shape == out["labels"].shape == out["token_type_ids"].shape == (8, T)
    assert all(v.dtype == np.int64 for v in out.values())
    for i, row in enumerate(batch["input_ids"]):
        n = len(row)
        assert np.array_equal(out["input_ids"][i, :n], row)
        assert (out["input_ids"][i, n:] == PAD).all()
        assert out["attention_mask"][i].sum() == n and out["attention_mask"][i, :n].all()
        assert np.array_equal(out["token_type_ids"][i, :n], batch["token_type_ids"][i])
        expect = np.full(T, -100)
        expect[batch["masked_lm_positions"][i]] = batch["masked_lm_ids"][i]
        assert np.array_equal(out["labels"][i], expect)
    assert np.array_equal(out["next_sentence_label"], batch["next_sentence_label"])


def test_collate_dynamic_masks_with_the_spec():
    rng = np.random.default_rng(5)
    batch = _rows(rng, 16, with_static=False)
    spec = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
    out = collate_pretraining(batch, pad_id=PAD, masking=spec, rng=np.random.default_rng(0))
    again = collate_pretraining(batch, pad_id=PAD, masking=spec, rng=np.random.default_rng(0))
    other = collate_pretraining(batch, pad_id=PAD, masking=spec, rng=np.random.default_rng(1))
    assert np.array_equal(out["input_ids"], again["input_ids"])
    assert not np.array_equal(out["labels"], other["labels"])
    for i, row in enumerate(batch["input_ids"]):
        labelled = np.flatnonzero(out["labels"][i] != -100)
        assert len(labelled) == num_to_predict(len(row), 0.15, 20)
        assert np.array_equal(out["labels"][i, labelled], np.asarray(row)[labelled])
        unlabelled = np.setdiff1d(np.arange(len(row)), labelled)
        assert np.array_equal(out["input_ids"][i, unlabelled], np.asarray(row)[unlabelled])
    assert "next_sentence_label" in out
    with pytest.raises(BertflowError, match="dynamic"):
        collate_pretraining(batch, pad_id=PAD)
    with pytest.raises(BertflowError, match="statically masked"):
        collate_pretraining(_rows(rng, 2), pad_id=PAD, masking=spec, rng=rng)


def test_mask_batch_follows_the_same_rule_as_mask_tokens():
    from data_prep.masking import mask_batch

    rng = np.random.default_rng(6)
    rows = [_sequence(rng, int(n)) for n in rng.integers(4, 140, 3000)]
    masked, positions, originals = mask_batch(rows, rng, vocab_size=VOCAB, mask_id=MASK,
                                              special_ids=SPECIAL)
    hits = np.zeros(40)
    kinds = np.zeros(3)
    for row, m, pos, orig in zip(rows, masked, positions, originals):
        n = len(row)
        assert len(pos) == min(num_to_predict(n, 0.15, 20), n - 3)
        assert np.all(np.diff(pos) > 0) and not np.isin(row[pos], SPECIAL).any()
        assert np.array_equal(orig, row[pos])
        keep = np.setdiff1d(np.arange(n), pos)
        assert np.array_equal(m[keep], row[keep]) and m.dtype == row.dtype
        new = m[pos]
        kinds += [(new == MASK).sum(), ((new != MASK) & (new != orig)).sum(), (new == orig).sum()]
    assert np.allclose(kinds / kinds.sum(), [0.8, 0.1, 0.1], atol=0.01)
    # uniform over candidates: on rows of 40 tokens no position is favoured
    same = [_sequence(rng, 40) for _ in range(2000)]
    for pos in mask_batch(same, rng, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)[1]:
        hits[pos] += 1
    body = np.delete(hits, [0, 19, 39])  # [CLS], middle [SEP], final [SEP]
    assert hits[[0, 19, 39]].sum() == 0
    assert body.min() > 0.75 * body.mean() and body.max() < 1.25 * body.mean()


def test_unk_is_chosen_for_masking_like_any_text_token(minilm_dir):
    """Google excludes only [CLS]/[SEP]: [UNK] in the text is masked as often as any
    other token; [CLS]/[SEP]/[PAD] never are."""
    from data_prep.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer.from_dir(minilm_dir)
    spec = MaskingSpec.from_tokenizer(tok)
    assert tok.unk_id not in spec.special_ids
    assert {tok.cls_id, tok.sep_id, tok.pad_id} <= set(spec.special_ids)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(400):
        body = rng.integers(2000, 3000, 30)
        body[rng.random(30) < 0.2] = tok.unk_id
        rows.append(np.r_[tok.cls_id, body[:15], tok.sep_id, body[15:], tok.sep_id])
    flat, offsets = np.concatenate(rows), np.r_[0, np.cumsum([len(r) for r in rows])]
    _, chosen, originals = spec.apply_flat(flat, offsets, rng)
    unk_share_text = (flat == tok.unk_id).sum() / (~np.isin(flat, spec.special_ids)).sum()
    unk_share_masked = (originals == tok.unk_id).mean()
    assert abs(unk_share_masked - unk_share_text) < 0.03 and unk_share_masked > 0.1
    assert not np.isin(flat[chosen], [tok.cls_id, tok.sep_id, tok.pad_id]).any()


def test_dynamic_masks_are_a_function_of_seed_epoch_and_batch_index():
    """Collated through iter_collated, whatever the threads: same (seed, epoch, batch)
    -> same masks, in a rerun, with other prefetching, and after a resume at batch 3."""
    from data_prep.collate import batch_rng, iter_collated

    spec = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=(PAD, CLS, SEP))
    rng = np.random.default_rng(9)
    raw = [_rows(rng, 16, with_static=False) for _ in range(8)]

    def collate(b, g):
        return collate_pretraining(b, PAD, spec, g)

    def run(**kw):
        return [o["input_ids"] for o in iter_collated(raw, collate, seed=3, epoch=1, **kw)]

    first, rerun = run(prefetch=4), run(prefetch=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, rerun)) and len(first) == 8
    resumed = run(start=3, prefetch=2)
    assert len(resumed) == 5 and all(np.array_equal(a, b) for a, b in zip(first[3:], resumed))
    # a direct call with the batch's generator gives the same batch
    assert np.array_equal(collate(raw[5], batch_rng(3, 1, 5))["input_ids"], first[5])
    next_epoch = [o["input_ids"] for o in iter_collated(raw, collate, seed=3, epoch=2)]
    assert not any(np.array_equal(a, b) for a, b in zip(first, next_epoch))
    with pytest.raises(BertflowError, match="batch_rng"):
        collate_pretraining(raw[0], PAD, spec)


def test_collate_of_a_pyarrow_batch_equals_the_numpy_batch():
    import pyarrow as pa

    rng = np.random.default_rng(10)
    batch = _rows(rng, 12)
    table = pa.table({k: pa.array([np.asarray(r).tolist() for r in v]) if k != "next_sentence_label"
                      else pa.array(v, pa.int8()) for k, v in batch.items()})
    a, b = collate_pretraining(batch, PAD), collate_pretraining(table.slice(0), PAD)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    spec = MaskingSpec(vocab_size=VOCAB, mask_id=MASK, special_ids=(PAD, CLS, SEP))
    dyn = table.drop_columns(["masked_lm_positions", "masked_lm_ids"]).slice(3, 6)
    plain = {k: v[3:9] for k, v in _rows(np.random.default_rng(10), 12).items()
             if not k.startswith("masked")}
    x = collate_pretraining(dyn, PAD, spec, np.random.default_rng(1))
    y = collate_pretraining(plain, PAD, spec, np.random.default_rng(1))
    assert all(np.array_equal(x[k], y[k]) for k in x)
