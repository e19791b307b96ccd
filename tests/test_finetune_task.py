"""The fine-tuning TrainTask without Ray: models, batches, loss, evaluation, saved folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_prep.tasks import features as F
from workflows.serving.predictor import Predictor
from workflows.training.finetune_task import FinetuneTask, majority_baseline

TAGS = ["O", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from data_prep.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer.from_dir(minilm_dir)


def _task(minilm_dir, tokenizer, task="token-cls", labels=TAGS, **kw):
    return FinetuneTask(task=task, base_dir=str(minilm_dir), tokenizer_dir=str(minilm_dir),
                        labels=labels, pad_id=tokenizer.pad_id,
                        meta={"task": task, "labels": labels, "max_seq_len": 32}, **kw)


def _ner_batch(tokenizer):
    words = [["Anna", "Schmidt", "sleeps"], ["hello", "Tom"]]
    tags = [[1, 2, 0], [0, 1]]
    rows = F.encode_words(tokenizer, F.word_pieces(tokenizer, words), tags, 32)
    batch = {k: np.array([np.array(r) for r in v], dtype=object) for k, v in rows.items()}
    return batch


def test_token_task_loss_eval_and_saved_folder_round_trip(minilm_dir, tokenizer, tmp_path):
    task = _task(minilm_dir, tokenizer)
    model = task.build_model().eval()
    batch = task.collate(_ner_batch(tokenizer), np.random.default_rng(0))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    loss, metrics = task.compute_loss(model, batch)
    assert torch.isfinite(loss) and int(metrics["label_count"]) == 5  # one label per word
    with torch.no_grad():
        scores = task.evaluate(model, [batch])
    assert {"loss", "precision", "recall", "f1"} <= set(scores)
    task.save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "bertflow.json").read_text())
    assert meta["labels"] == TAGS and (tmp_path / "m" / "vocab.txt").is_file()
    again = task.load_model(tmp_path / "m").eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits)
    tags = Predictor.from_dir(tmp_path / "m", device="cpu").tag_words([["Anna", "sleeps"]])
    assert len(tags[0]) == 2 and set(tags[0]) <= set(TAGS)


def test_frozen_encoder_task_trains_only_the_head(minilm_dir, tokenizer):
    full = _task(minilm_dir, tokenizer, "seq-cls", ["neg", "pos"]).build_model()
    frozen = _task(minilm_dir, tokenizer, "seq-cls", ["neg", "pos"], freeze_encoder=True).build_model()
    assert frozen.num_parameters(trainable_only=True) == 384 * 2 + 2
    assert full.num_parameters(trainable_only=True) > 10_000 * frozen.num_parameters(trainable_only=True)
    rows = F.encode_classification(tokenizer, ["good", "bad"], None, 16)
    frozen_batch = {k: np.array([np.array(r) for r in v], dtype=object) for k, v in rows.items()}
    frozen_batch["labels"] = np.array([1, 0])
    task = _task(minilm_dir, tokenizer, "seq-cls", ["neg", "pos"], freeze_encoder=True)
    loss, _ = task.compute_loss(frozen, task.collate(frozen_batch, np.random.default_rng(0)))
    loss.backward()
    assert all(p.grad is None for p in frozen.bert.parameters())
    assert frozen.classifier.weight.grad is not None


def test_trivial_baselines():
    train = [{"label": "pos"}] * 3 + [{"label": "neg"}]
    assert majority_baseline("seq-cls", train, [{"label": "neg"}, {"label": "pos"}])["accuracy"] == 0.5
    ner = [{"tags": ["B-PER", "O"]}]
    assert majority_baseline("token-cls", ner, ner)["f1"] == 0.0
    qa = [{"context": "Oslo is cold", "answers": [{"text": "Oslo"}], "is_impossible": False},
          {"context": "Rome", "answers": [], "is_impossible": True}]
    # first word: right on the answerable one, wrong on the other; empty: the reverse
    assert majority_baseline("qa", qa, qa)["exact"] == 50.0


def test_pooling_follows_freezing_and_reaches_the_served_model(minilm_dir, tokenizer, tmp_path):
    """--pooling auto: mean pooling for a frozen encoder (its [CLS] pooler was trained for
    NSP), cls otherwise; the saved folder carries it, so serving pools the same way."""
    from bert_core.config_io import ConfigError
    from workflows.config import FinetuneConfig

    def cfg(**kw):
        return FinetuneConfig(base="b", train="t", **kw)

    assert cfg(freeze_encoder=True).classifier_pooling == "mean"
    assert cfg().classifier_pooling == "cls"
    assert cfg(pooling="mean_last4").classifier_pooling == "mean_last4"
    assert cfg(task="token-cls").classifier_pooling is None
    with pytest.raises(ConfigError, match="pooling"):
        cfg(task="token-cls", pooling="mean")

    labels = ["neg", "pos"]
    task = _task(minilm_dir, tokenizer, task="seq-cls", labels=labels, freeze_encoder=True,
                 pooling="mean")
    model = task.build_model()
    assert model.config.classifier_pooling == "mean" and model.bert.pooler is None
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["classifier.weight", "classifier.bias"]
    task.save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["classifier_pooling"] == "mean"
    predictor = Predictor.from_dir(tmp_path / "m", device="cpu")
    import pandas as pd

    texts = pd.DataFrame({"text": ["a short text", "another, longer text about nothing"]})
    out = predictor.predict(texts)
    model.eval()
    ids = tokenizer.encode_batch(list(texts["text"]))
    with torch.no_grad():
        for i, row in enumerate(ids):
            x = torch.tensor([[tokenizer.cls_id, *row, tokenizer.sep_id]])
            want = labels[int(model(x, torch.ones_like(x)).logits.argmax(-1))]
            assert out["label"][i] == want


def test_task_datasets_are_cached_in_the_user_cache(monkeypatch, tmp_path):
    from workflows.training.finetune import user_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "bertflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "bertflow"
