"""The quickstart's pieces: a real offline corpus, a fair generated task, the summary.

The full quickstart (`make quickstart`) takes minutes of pretraining and fine-tuning, more
than this suite's budget on 2 shared cores; its steps are the library functions tested in
their own files (prep, pretrain, finetune, predict, registry).
"""

from __future__ import annotations

import csv
from pathlib import Path

from workflows.config import QuickstartConfig
from workflows.quickstart.data import PRODUCTS, write_reference_corpus, write_review_task
from workflows.quickstart.summary import QuickstartResult, render_summary


def test_corpus_is_the_python_reference_in_bert_text_format(tmp_path):
    path = tmp_path / "corpus" / "ref.txt"
    counts = write_reference_corpus(path)
    text = path.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()]
    assert len(docs) == counts["documents"] > 100  # enough documents for random NSP pairs
    assert all(len(d.splitlines()) >= 2 for d in docs)
    assert counts["sentences"] == sum(len(d.splitlines()) for d in docs) > 2000
    assert 'The "while" statement is used for repeated execution' in text
    assert 'The "while" statement ****' not in text  # heading underlines are dropped
    assert not list(tmp_path.glob("corpus/*.tmp"))  # written atomically


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_review_task_is_balanced_and_evaluates_on_unseen_products(tmp_path):
    files = write_review_task(tmp_path, n_train=400, n_eval=100, seed=3)
    train, dev = read(files["train"]), read(files["dev"])
    assert (len(train), len(dev)) == (400, 100)
    for rows in (train, dev):
        share = sum(r["label"] == "positive" for r in rows) / len(rows)
        assert 0.35 < share < 0.65
    def products(rows):
        return {p for r in rows for p in PRODUCTS if f" {p} " in f" {r['text'].lower()} "}
    assert products(dev) and not products(dev) & products(train)
    assert read(files["unseen"]) and "label" not in read(files["unseen"])[0]
    # Deterministic for a seed: a rerun makes the same task.
    again = write_review_task(tmp_path / "again", n_train=400, n_eval=100, seed=3)
    assert files["train"].read_text() == again["train"].read_text()


def test_summary_names_what_was_made_and_how_to_look_at_it(tmp_path):
    result = QuickstartResult(
        output=tmp_path, tracking_uri="sqlite:////x/mlruns.db",
        corpus={"documents": 222, "sentences": 3000, "topics": 79}, dataset=tmp_path / "d",
        dataset_counts={"instances": 1372, "tokens": 150954},
        pretrained="models:/quickstart-bert-tiny/1",
        loss_curve=[(1, 11.05), (5, 10.5), (10, 9.9), (20, 9.23)], base="models:/minilm/1",
        classifier="models:/quickstart-reviews/1", finetune_metrics={"val_accuracy": 0.97},
        baseline={"val_accuracy": 0.52}, predictions=tmp_path / "p.csv",
        prediction_rows=[{"text": "The tent kept us dry.", "label": "positive"}],
        seconds={"prep": 30.0, "pretrain": 120.0})
    text = render_summary(result)
    assert "11.05" in text and "9.23" in text                     # the loss fell
    assert "val_accuracy=0.970" in text and "val_accuracy=0.520" in text
    assert "positive  The tent kept us dry." in text
    for command in ("bertflow registry list --tracking-uri sqlite:////x/mlruns.db",
                    "bertflow server", "bertflow predict --model models:/quickstart-reviews@champion"):
        assert command in text


def test_quickstart_config_rejects_nonsense():
    import pytest

    from bert_core.config_io import ConfigError
    with pytest.raises(ConfigError, match="pretrain_steps"):
        QuickstartConfig(pretrain_steps=0)
