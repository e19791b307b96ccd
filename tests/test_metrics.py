"""Evaluation metrics agree with the references the field uses (seqeval, SQuAD script)."""

from __future__ import annotations

import random

import pytest

from workflows.metrics import (classification_metrics, entity_metrics, exact_match,
                               format_table, get_entities, normalize_answer, squad_metrics,
                               token_f1)


def test_classification_accuracy_and_macro_f1_by_hand():
    gold = ["pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "neg", "neg", "neg", "pos"]
    m = classification_metrics(gold, pred)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # pos: tp1 fp1 fn1 -> 0.5 ; neg: tp2 fp1 fn0 -> 0.8 ; neu: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_entities_found_like_seqeval_default_mode():
    # I- after O opens an entity; a type change closes one (conlleval rules).
    assert get_entities(["O", "I-PER", "I-PER", "B-LOC", "I-ORG", "O"]) == [
        ("PER", 1, 2), ("LOC", 3, 3), ("ORG", 4, 4)]


def test_entity_metrics_match_installed_seqeval_on_hand_and_random_examples():
    seqeval = pytest.importorskip("seqeval.metrics")
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-LOC", "O", "B-PER", "B-PER"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "I-LOC", "B-PER", "I-PER"]]
    m = entity_metrics(gold, pred)
    assert (m["precision"], m["recall"]) == (0.25, 0.2)
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    for _ in range(30):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(5)]
        pred = [[rng.choice(tags) if rng.random() < 0.4 else t for t in s] for s in gold]
        m = entity_metrics(gold, pred)
        assert m["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
        assert m["recall"] == pytest.approx(seqeval.recall_score(gold, pred))
        assert m["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
        assert m["accuracy"] == pytest.approx(seqeval.accuracy_score(gold, pred))


def test_squad_normalisation_em_and_f1_like_the_official_script():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert exact_match("the Sorbonne.", "Sorbonne") == 1
    # pred tokens {in, 1891}; gold {1891}: P=1/2 R=1 -> F1 2/3
    assert token_f1("in 1891", "1891") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("", "Paris") == 0.0


def test_squad_v2_metrics_split_has_answer_and_no_answer():
    golds = [["Paris", "paris france"], ["1891"], []]
    preds = ["Paris, France", "in 1891", ""]
    m = squad_metrics(golds, preds)
    assert m["HasAns_exact"] == pytest.approx(50.0)  # "paris france" matches exactly
    assert m["HasAns_f1"] == pytest.approx(100 * (1.0 + 2 / 3) / 2)
    assert m["NoAns_exact"] == 100.0 and m["NoAns_total"] == 1.0
    assert m["exact"] == pytest.approx(100 * 2 / 3)
    assert "HasAns_exact" not in squad_metrics(golds[:2], preds[:2])


def test_metrics_table_lists_every_row_and_metric():
    table = format_table({"epoch 1": {"accuracy": 0.5}, "epoch 2": {"accuracy": 0.75, "f1": 0.7}})
    lines = table.splitlines()
    assert "accuracy" in lines[0] and "f1" in lines[0]
    assert lines[2].startswith("epoch 2") and "0.7500" in lines[2]
