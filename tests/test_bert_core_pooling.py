"""Sentence vectors for classification: cls (BERT fine-tuning) vs mean pooling (frozen use)."""

from __future__ import annotations

import json

import pytest
import torch

import bert_core
from bert_core import BertConfig, BertflowError, ConfigError

from data_prep.tokenizer import WordPieceTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(vocab: int = 99):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    return ids.masked_fill(mask == 0, 0), mask


def _cfg(**kw) -> BertConfig:
    return BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=64, num_labels=3, **kw)


def test_mean_pooling_averages_real_tokens_only():
    torch.manual_seed(0)
    model = bert_core.BertForSequenceClassification(_cfg(classifier_pooling="mean")).eval()
    assert model.bert.pooler is None  # no parameter left without a gradient under DDP
    ids, mask = _batch()
    with torch.no_grad():
        last = model.bert(ids, mask).last_hidden_state  # (B, T, H)
        want = torch.stack([last[i, :int(n)].mean(0) for i, n in enumerate(mask.sum(1))])
        got = model.sentence_vector(ids, mask)
        # pad tokens must not move the vector: extra padding leaves it unchanged
        padded = model.sentence_vector(torch.cat([ids, torch.zeros(3, 4, dtype=ids.dtype)], 1),
                                       torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], 1))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded, want, atol=1e-5, rtol=0)


def test_mean_last4_concatenates_four_layers():
    torch.manual_seed(0)
    model = bert_core.BertForSequenceClassification(_cfg(classifier_pooling="mean_last4")).eval()
    assert model.classifier.in_features == 4 * 32
    ids, mask = _batch()
    with torch.no_grad():
        states = model.bert(ids, mask, output_hidden_states=True).hidden_states
        got = model.sentence_vector(ids, mask)
    first = states[-4][0, :9].mean(0)
    torch.testing.assert_close(got[0, :32], first, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="classifier_pooling"):
        BertConfig.preset("tiny", classifier_pooling="mean_last4")  # 2 layers
    with pytest.raises(ConfigError, match="classifier_pooling.*max"):
        _cfg(classifier_pooling="max")


def test_pooling_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = bert_core.BertForSequenceClassification(_cfg(classifier_pooling="mean")).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["classifier_pooling"] == "mean"
    back = bert_core.BertForSequenceClassification.from_pretrained(tmp_path, strict=True).eval()
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask).logits, model(ids, mask).logits)


def test_real_checkpoint_loads_into_mean_pooling(minilm_dir):
    """MiniLM's folder has a pooler; a mean-pooling classifier leaves it out, says so, and
    refuses it when loading strictly."""
    model = bert_core.BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=3, classifier_pooling="mean")
    assert model.config.classifier_pooling == "mean"
    assert "bert.pooler.dense.weight" in model.loading_info["unexpected_keys"]
    assert model.loading_info["missing_keys"] == ["classifier.bias", "classifier.weight"]
    with pytest.raises(BertflowError, match="pooler"):
        bert_core.BertForSequenceClassification.from_pretrained(
            minilm_dir, strict=True, num_labels=3, classifier_pooling="mean")


WEATHER = ["It rained all afternoon and the streets flooded.", "A cold wind blew snow "
           "across the valley.", "The forecast promises sunshine and warm air tomorrow.",
           "Thunder rolled over the hills before the storm.", "Fog covered the harbour at "
           "dawn.", "Heavy hail damaged the cars parked outside.", "The drought left the "
           "fields dry and cracked.", "A gentle drizzle fell through the night.",
           "Temperatures dropped below freezing after sunset.", "The hurricane made "
           "landfall with violent gusts.", "Clouds gathered and the sky turned grey.",
           "Humid heat hung over the city all week."]
CODE = ["The function returns a list of integers.", "Compile the module before running "
        "the tests.", "This variable stores a pointer to the buffer.", "The loop iterates "
        "over every key of the dictionary.", "An exception is raised when the file is "
        "missing.", "The class inherits its methods from the base type.", "Call the method "
        "with a string argument.", "The compiler reports a syntax error on line ten.",
        "Import the package and create an instance.", "The script parses arguments from "
        "the command line.", "Recursion ends when the list is empty.", "The debugger "
        "stops at the breakpoint in the parser."]


def _frozen_accuracy(minilm_dir, pooling: str) -> float:
    """Train only a linear head on frozen MiniLM; accuracy on held-out sentences."""
    tok = WordPieceTokenizer.from_dir(minilm_dir)

    def encode(texts):
        rows = [[tok.cls_id, *ids[:30], tok.sep_id] for ids in tok.encode_batch(texts)]
        T = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in rows])
        return ids, (ids != tok.pad_id).long()

    train_x = WEATHER[:8] + CODE[:8]
    test_x = WEATHER[8:] + CODE[8:]
    train_y = torch.tensor([0] * 8 + [1] * 8)
    test_y = torch.tensor([0] * 4 + [1] * 4)
    torch.manual_seed(0)
    model = bert_core.BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2, classifier_pooling=pooling)
    model.freeze_encoder()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.classifier.parameters()}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    ids, mask = encode(train_x)
    model.train()
    for _ in range(40):
        loss = model(ids, mask, labels=train_y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ids, mask = encode(test_x)
        pred = model(ids, mask).logits.argmax(-1)
    return float((pred == test_y).float().mean())


def test_frozen_encoder_with_mean_pooling_learns(minilm_dir):
    """The feature-based use: frozen MiniLM + mean pooling separates held-out sentences of
    two topics (majority baseline 0.5) with only a linear head trained."""
    assert _frozen_accuracy(minilm_dir, "mean") >= 0.875
