"""The quickstart's pieces: a real offline corpus, the summary (the task: test_quickstart_task).

The full quickstart (`make quickstart`) takes minutes of pretraining and fine-tuning, more
than this suite's budget on 2 shared cores; its steps are the library functions tested in
their own files (prep, pretrain, finetune, predict, registry).
"""

from __future__ import annotations

from workflows.config import QuickstartConfig
from workflows.quickstart.data import write_reference_corpus
from workflows.quickstart.pydoc_task import PydocTask
from workflows.quickstart.summary import QuickstartResult, TaskRun, render_summary


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


def test_summary_names_what_was_made_and_how_to_look_at_it(tmp_path):
    task = PydocTask(train=tmp_path / "t" / "train.csv", eval=tmp_path / "t" / "eval.csv",
                     heldout=tmp_path / "t" / "heldout.csv", labels=list("abcde"),
                     train_examples=420, eval_examples=180, train_topics=[], eval_topics=[],
                     majority_label="statements", majority_accuracy=0.301)
    runs = [TaskRun("frozen", "models:/quickstart-topics/1", "1", {"val_accuracy": 0.61,
                    "val_macro_f1": 0.55}, "mean", 40.0, 1260),
            TaskRun("fine-tuned", "models:/quickstart-topics/2", "2", {"val_accuracy": 0.82,
                    "val_macro_f1": 0.8}, "pooler", 90.0, 1260)]
    result = QuickstartResult(
        output=tmp_path, tracking_uri="sqlite:////x/mlruns.db",
        corpus={"documents": 222, "sentences": 3000, "topics": 79}, dataset=tmp_path / "d",
        dataset_counts={"instances": 1372, "tokens": 150954},
        pretrained="models:/quickstart-bert-tiny/1",
        loss_curve=[(1, 11.05), (5, 10.5), (10, 9.9), (20, 9.23)], base="models:/minilm/1",
        task=task, runs=runs, champion="fine-tuned", predictions=tmp_path / "p.csv",
        prediction_rows=[{"text": "Exceptions are raised.", "true_label": "execution model",
                          "label": "execution model"},
                         {"text": "A list is mutable.", "true_label": "builtin types",
                          "label": "data model"}],
        seconds={"prep": 30.0, "pretrain": 120.0})
    text = render_summary(result)
    assert "11.05" in text and "9.23" in text                     # the loss fell
    # the baseline and both uses side by side, with their speeds
    assert "majority class (statements)" in text and "0.301" in text
    frozen = next(line for line in text.splitlines() if "frozen (--pooling mean) v1" in line)
    assert "0.610" in frozen and "0.550" in frozen and "31.5" in frozen  # 1260 ex / 40 s
    tuned = next(line for line in text.splitlines() if "fine-tuned (--pooling pooler)" in line)
    assert "0.820" in tuned and "@champion" in tuned
    # held-out predictions next to their true labels, misses marked
    assert "(1/2 right on held-out paragraphs)" in text
    assert "MISS data model" in text and "(true: builtin types)" in text
    for command in ("bertflow registry list --tracking-uri sqlite:////x/mlruns.db",
                    "bertflow server", "bertflow predict --model models:/quickstart-topics@champion"):
        assert command in text
    # it ends with the three commands a user runs next on their own files
    last = text.splitlines()[-3:]
    assert last[0].startswith("  bertflow finetune --base models:/minilm/1 --train my_train.csv")
    assert last[1].startswith("  bertflow predict --model models:/my-model@latest")
    assert last[2].startswith("  bertflow registry show my-model@latest")
    assert all(line.endswith("--tracking-uri sqlite:////x/mlruns.db") for line in last)
    assert str(task.train) in text  # the task CSV, the template of the user's own


def test_quickstart_config_rejects_nonsense():
    import pytest

    from bert_core.config_io import ConfigError
    with pytest.raises(ConfigError, match="pretrain_steps"):
        QuickstartConfig(pretrain_steps=0)
