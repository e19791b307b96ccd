"""The fine-tuning TrainTask without Ray: models, batches, loss, evaluation, saved folders."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

import finetune_data as D
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


def test_a_regression_fine_tune_learns_scores_and_serves_them(tiny_base, tokenizer, tmp_path):
    """STS-B's task: one output trained with MSE (transformers' num_labels=1), evaluated by
    Pearson/Spearman, saved as a folder that transformers loads to the same outputs, and
    served as a float `score` per text, or per pair when it was trained on pairs."""
    import pandas as pd
    import transformers

    D.write_scores(tmp_path / "train.jsonl", 96, seed=11)
    D.write_scores(tmp_path / "dev.jsonl", 48, seed=12)
    table, records, labels = D.task_table(tmp_path / "train.jsonl", "regression", tokenizer,
                                          max_seq_len=24)
    dev, dev_records, _ = D.task_table(tmp_path / "dev.jsonl", "regression", tokenizer,
                                       max_seq_len=24)
    assert labels == [] and isinstance(records[0]["label"], float)
    task = _planned_task(tiny_base, tokenizer, "regression", table, records, labels)
    torch.manual_seed(0)
    model = task.build_model()
    assert model.classifier.out_features == 1 and model.config.id2label == {0: "score"}
    rng = np.random.default_rng(0)

    def batches(t, size):
        return [task.collate(t.slice(i, size), rng) for i in range(0, t.num_rows, size)]

    with torch.no_grad():
        before = task.evaluate(model.eval(), batches(dev, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(5):  # epochs (seeded: the same run every time)
        for batch in batches(table, 16):
            loss, _ = task.compute_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = task.evaluate(model.eval(), batches(dev, 16))
    assert after["pearson"] > 0.9 and after["spearman"] > 0.6, (before, after)
    assert after["loss"] < before["loss"] / 4 and after["mse"] < 0.5
    baseline = majority_baseline("regression", records, dev_records)
    assert baseline["pearson"] == 0.0 and baseline["mse"] > after["mse"]

    task.meta["inputs"] = ["text"]
    task.save_model(model, tmp_path / "m")
    texts = ["what a superb film !", "the plot was dreadful ."]
    scores = Predictor.from_dir(tmp_path / "m", device="cpu").predict(
        pd.DataFrame({"text": texts}))["score"].tolist()
    assert scores[0] > 3 > 2 > scores[1]
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    ids = [[tokenizer.cls_id, *r, tokenizer.sep_id] for r in tokenizer.encode_batch(texts[:1])]
    with torch.no_grad():
        assert float(hf(torch.tensor(ids)).logits) == pytest.approx(scores[0], abs=1e-4)
    # Trained on pairs (`--text-pair-column`), the model reads and is served pairs.
    from data_prep.tasks.pipeline import read_task_file

    D.write_scores(tmp_path / "pairs.jsonl", 8, seed=13, pair=True)
    pairs, _ = read_task_file(tmp_path / "pairs.jsonl", "regression",
                              columns={"text_a": "text_a", "text_b": "text_b", "label": "label"})
    assert set(pairs[0]) == {"text_a", "text_b", "label", "line"}
    task.meta["inputs"] = ["text_a", "text_b"]
    task.save_model(model, tmp_path / "pair")
    out = Predictor.from_dir(tmp_path / "pair", device="cpu").predict(
        pd.DataFrame(pairs)[["text_a", "text_b"]])
    assert list(out.columns) == ["score"] and len(out) == 8


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


# ---- sharded evaluation and the planned train rows (training/loop.py, no Ray) -----------

EVAL_FILES = {"seq-cls": ("eval.jsonl", lambda p: D.write_sentiment(p, 40, seed=2, fmt="jsonl")),
              "pair-cls": ("eval.jsonl", lambda p: D.write_pairs(p, 40, seed=4)),
              "regression": ("eval.jsonl", lambda p: D.write_scores(p, 40, seed=3)),
              "token-cls": ("eval.conll", lambda p: D.write_conll(p, 30, seed=6)),
              "qa": ("eval.json", lambda p: D.write_squad(p, 8, seed=8, v2=True))}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, minilm_dir):
    return D.write_tiny_base(tmp_path_factory.mktemp("tiny") / "base", minilm_dir)


def _planned_task(base, tokenizer, task, table, records, labels):
    from workflows.training.finetune_task import TrainRows

    golds = {r["example_index"]: (r["context"], [] if r["is_impossible"] else
                                  [a["text"] for a in r["answers"]])
             for r in records} if task == "qa" else {}
    return FinetuneTask(task=task, base_dir=str(base), tokenizer_dir=str(base), labels=labels,
                        pad_id=tokenizer.pad_id, qa_golds=golds,
                        meta={"task": task, "labels": labels, "version_2": task == "qa",
                              "n_best": 5, "max_answer_length": 10},
                        train_table=TrainRows(table, table.num_rows))


@pytest.mark.parametrize("task", ["seq-cls", "pair-cls", "regression", "token-cls", "qa"])
def test_evaluation_sharded_over_ranks_equals_one_worker(task, tiny_base, tokenizer, tmp_path,
                                                         monkeypatch):
    """Each of 3 ranks evaluates its batches (i % 3); the gathered shares combine into
    exactly the metrics of a one-worker evaluation, though no share alone gives them."""
    from tests.helpers import FakeShard
    from workflows.config import LoopSettings
    from workflows.training import loop as L
    from workflows.training.step import StepRunner

    name, write = EVAL_FILES[task]
    write(tmp_path / name)
    spec = dict(max_seq_len=28, doc_stride=8) if task == "qa" else dict(max_seq_len=40)
    table, records, labels = D.task_table(tmp_path / name, task, tokenizer, **spec)
    t = _planned_task(tiny_base, tokenizer, task, table, records, labels)
    torch.manual_seed(0)
    model = t.build_model()
    settings = LoopSettings(batch_size=4, seed=1, max_steps=1, warmup_steps=0, eval_batches=0)
    runner, cpu, val = StepRunner(model, settings, torch.device("cpu")), torch.device("cpu"), \
        FakeShard(table)
    shares: list = []
    monkeypatch.setattr(L, "all_gather_objects", lambda share: shares.append(share) or [share])
    single = L.evaluate(t, model, val, settings, runner, cpu, rank=0, world=1)
    alone = [L.evaluate(t, model, val, settings, runner, cpu, rank=r, world=3) for r in range(3)]
    whole, parts = shares[0], shares[1:]
    assert sorted(i for p in parts for i in p["losses"]) == sorted(whole["losses"])
    combined = {f"val_{k}": v for k, v in t.eval_combine(parts[::-1]).items()}
    assert combined == single  # exactly, whatever order the shares come in
    assert all(a != single for a in alone)
    assert single["val_loss"] > 0
    if task == "qa":  # a question's windows fell to several ranks, and all were decoded
        split = {ex for ex in whole["answers"] if sum(ex in p["answers"] for p in parts) > 1}
        assert split and single["val_total"] == len(records)
    if task == "token-cls":
        assert single["val_f1"] >= 0 and "val_accuracy" in single
    if task == "regression":
        assert {"val_pearson", "val_spearman", "val_mse"} <= set(single)
    if task in ("seq-cls", "pair-cls"):
        assert "val_mcc" in single and ("val_f1" in single) == (len(labels) == 2)


def test_planned_train_rows_reshuffle_each_epoch_and_resume_where_they_stopped(
        tiny_base, tokenizer, tmp_path):
    """Fine-tuning rows through the canonical batch plan: every epoch a new order of the
    same rows (none twice), the same global batches on 1 or 2 workers, as many steps per
    epoch as `loop_for_epochs` plans, and a resume mid-epoch continues with exactly the
    batches an uninterrupted run trains next."""
    from workflows.config import FinetuneConfig, config_from_mapping
    from workflows.training import loop as L
    from workflows.training.finetune import loop_for_epochs

    D.write_sentiment(tmp_path / "train.csv", 70, seed=1)
    table, records, labels = D.task_table(tmp_path / "train.csv", "seq-cls", tokenizer,
                                          max_seq_len=32)
    t = _planned_task(tiny_base, tokenizer, "seq-cls", table, records, labels)
    cfg = config_from_mapping(FinetuneConfig, dict(base="b", train="t", batch_size=4,
                                                   global_batch_size=8, epochs=3, seed=5))
    loop, steps = loop_for_epochs(cfg, table.num_rows)
    assert steps == 70 // 8 and L.reads_own_rows(t)
    plan, cpu = L.batch_plan(t, loop), torch.device("cpu")

    def stream(rank, world, epoch=0, skip=0):
        return L.train_batches(None, t, loop, rank, world, epoch, skip, cpu, plan=plan)

    one = stream(0, 1)
    run = [next(one) for _ in range(3 * steps * 2)]  # 3 epochs of 2 micro-batches a step
    def rows_of(batches):  # each row as its pieces: a multiset of the rows trained
        return Counter(tuple(r[m.bool()].tolist()) for _, _, b in batches
                       for r, m in zip(b["input_ids"], b["attention_mask"]))

    table_rows = Counter(tuple(r) for r in table.column("input_ids").to_pylist())
    epochs = [run[e * 2 * steps:(e + 1) * 2 * steps] for e in range(3)]
    assert [e for e, _, _ in run[::2 * steps]] == [0, 1, 2]
    assert [p for _, p, _ in run[:2 * steps:2]] == list(range(1, steps + 1))
    for e in epochs:  # full steps of 8 rows of the table, none twice
        assert sum(rows_of(e).values()) == steps * 8 and not rows_of(e) - table_rows
    order = [[b["input_ids"].tolist() for _, _, b in e] for e in epochs]
    assert order[0] != order[1] != order[2]  # reshuffled
    two = [stream(r, 2) for r in range(2)]
    for step in range(steps):  # rank r trains stream r of each step: the same global batch
        for r in range(2):
            epoch, position, batch = next(two[r])
            assert (epoch, position) == run[2 * step + r][:2]
            assert torch.equal(batch["input_ids"], run[2 * step + r][2]["input_ids"])
    resumed = stream(0, 1, epoch=1, skip=3)
    for want in run[2 * steps + 6:2 * steps + 12]:
        epoch, position, batch = next(resumed)
        assert (epoch, position) == want[:2]
        assert all(torch.equal(batch[k], want[2][k]) for k in batch)
