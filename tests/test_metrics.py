"""Evaluation metrics agree with the references the field uses (scikit-learn, scipy,
seqeval, the SQuAD script, the GLUE averages of the BERT paper and the leaderboard)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from workflows.metrics import (average_ranks, classification_metrics, confusion_metrics,
                               entity_metrics, exact_match, format_table, get_entities,
                               glue_average, glue_columns, matthews_corrcoef,
                               normalize_answer, pearson, regression_metrics, spearman,
                               squad_metrics, token_f1)


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


@pytest.mark.filterwarnings("ignore:A single label was found")  # scikit-learn on [a, a]
def test_mcc_and_binary_f1_equal_scikit_learn_binary_multiclass_and_degenerate():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    for classes in (2, 3, 5):
        for _ in range(20):
            gold = [rng.randrange(classes) for _ in range(rng.randint(2, 40))]
            pred = [g if rng.random() < 0.6 else rng.randrange(classes) for g in gold]
            m = classification_metrics(gold, pred, positive=1)
            assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(gold, pred))
            assert m["accuracy"] == pytest.approx(sk.accuracy_score(gold, pred))
            if classes == 2:
                assert m["f1"] == pytest.approx(sk.f1_score(gold, pred, zero_division=0))
    # Constant predictions (and constant gold) have no correlation: 0, as scikit-learn says.
    for gold, pred in (([0, 1, 1, 0], [1, 1, 1, 1]), ([1, 1, 1], [0, 1, 0]),
                       (["a", "a"], ["a", "a"])):
        assert classification_metrics(gold, pred)["mcc"] == sk.matthews_corrcoef(gold, pred) == 0.0
    assert matthews_corrcoef(["x", "y", "x"], ["y", "x", "y"]) == pytest.approx(-1.0)
    # Counts of two shards add up to the whole evaluation's MCC.
    gold, pred = [0, 1, 2, 1, 0, 2, 2], [0, 2, 2, 1, 1, 2, 0]
    whole = confusion_metrics(Counter(zip(gold, pred)))
    halves = Counter(zip(gold[:3], pred[:3])) + Counter(zip(gold[3:], pred[3:]))
    assert confusion_metrics(halves) == whole


def test_pearson_spearman_equal_scipy_with_ties_and_constant_sides():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(2)
    for _ in range(30):
        n = rng.randint(3, 50)
        gold = [round(rng.uniform(0, 5), rng.choice([0, 1, 2])) for _ in range(n)]  # ties
        pred = [g + rng.gauss(0, 1.5) if rng.random() < 0.7 else rng.choice([1.0, 2.0])
                for g in gold]
        if len(set(gold)) < 2 or len(set(pred)) < 2:
            continue
        m = regression_metrics(gold, pred)
        assert m["pearson"] == pytest.approx(stats.pearsonr(gold, pred)[0], abs=1e-12)
        assert m["spearman"] == pytest.approx(stats.spearmanr(gold, pred)[0], abs=1e-12)
        assert m["mse"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(gold, pred)) / n)
        assert list(average_ranks(pred)) == pytest.approx(list(stats.rankdata(pred)))
    assert pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0  # scipy: nan; a score card: 0
    assert pearson([0.5, 3.7, 4.1, 1.3], [2.4] * 4) == 0.0  # centred, 2.4 - mean is not 0.0
    assert spearman([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


def test_glue_average_follows_the_bert_paper_and_the_leaderboard():
    # BERT-base's dev row of the paper's Table 1 (F1 for QQP/MRPC, Spearman for STS-B).
    paper = {"MNLI-m": {"accuracy": 84.6}, "mnli-mm": {"val_accuracy": 83.4},
             "qqp": {"f1": 71.2, "accuracy": 89.2}, "qnli": {"accuracy": 90.5},
             "SST-2": {"accuracy": 93.5}, "cola": {"mcc": 52.1},
             "sts-b": {"spearman": 85.8, "pearson": 87.1}, "mrpc": {"f1": 88.9, "accuracy": 84.8},
             "rte": {"accuracy": 66.4}, "wnli": {"accuracy": 65.1}, "squad": {"f1": 88.5}}
    assert glue_average(paper) == pytest.approx(79.6, abs=0.05)
    assert len(glue_columns(paper)) == 9 and "wnli" not in glue_columns(paper)
    # BERT-large's leaderboard row: two-metric tasks and MNLI m/mm averaged, WNLI in.
    board = {"cola": {"mcc": 60.5}, "sst2": {"accuracy": 94.9},
             "mrpc": {"f1": 89.3, "accuracy": 85.4}, "stsb": {"pearson": 87.6, "spearman": 86.5},
             "qqp": {"f1": 72.1, "accuracy": 89.3}, "mnli-m": {"accuracy": 86.7},
             "mnli-mm": {"accuracy": 85.9}, "qnli": {"accuracy": 92.7},
             "rte": {"accuracy": 70.1}, "wnli": {"accuracy": 65.1}}
    assert glue_average(board, rule="leaderboard") == pytest.approx(80.5, abs=0.05)
    assert glue_columns(board, "leaderboard")["mnli"] == pytest.approx(86.3)
    with pytest.raises(ValueError, match="cola has no 'mcc'"):
        glue_average({"cola": {"accuracy": 0.7}})
    with pytest.raises(ValueError, match="no GLUE task"):
        glue_average({"squad": {"f1": 0.8}})
