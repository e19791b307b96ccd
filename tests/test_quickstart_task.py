"""The quickstart's task from pydoc_data.topics: real text, split by document."""

from __future__ import annotations

import csv
from collections import Counter

from workflows.quickstart.pydoc_task import GROUPS, build_pydoc_task, paragraphs


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_split_has_no_document_on_both_sides(tmp_path):
    task = build_pydoc_task(tmp_path / "a", seed=0)
    train, held = _rows(task.train), _rows(task.eval)
    train_topics, eval_topics = {r["topic"] for r in train}, {r["topic"] for r in held}
    assert train_topics and eval_topics and not train_topics & eval_topics
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    # every group is learned and evaluated
    assert {r["label"] for r in train} == {r["label"] for r in held} == set(GROUPS)
    assert (task.train_examples, task.eval_examples) == (len(train), len(held))
    assert len(held) >= 100 and len(train) >= 3 * len(held) // 2
    # the baseline is what always answering the commonest eval label scores
    label, hits = Counter(r["label"] for r in held).most_common(1)[0]
    assert task.majority_label == label and abs(task.majority_accuracy - hits / len(held)) < 1e-9
    assert task.majority_accuracy < 0.5
    # held-out examples for the predict step come from evaluation topics, with labels
    heldout = _rows(task.heldout)
    pairs = {(h["text"], h["label"]) for h in held}
    assert heldout and all((r["text"], r["true_label"]) in pairs for r in heldout)
    assert len({r["true_label"] for r in heldout}) >= 5


def test_same_seed_same_task_other_seed_other_split(tmp_path):
    a = build_pydoc_task(tmp_path / "a", seed=0)
    b = build_pydoc_task(tmp_path / "b", seed=0)
    c = build_pydoc_task(tmp_path / "c", seed=1)
    assert a.train.read_bytes() == b.train.read_bytes()
    assert a.eval_topics == b.eval_topics != c.eval_topics


def test_paragraphs_drop_code_grammar_and_headings():
    text = ('The "while" statement\n*********************\n\nThe "while" statement is used '
            'for repeated execution as long as an\nexpression is true, which is checked '
            'before each pass.\n\n   while_stmt ::= "while" expression ":" suite\n\nshort.\n')
    assert paragraphs(text, max_chars=400) == [
        'The "while" statement is used for repeated execution as long as an expression is '
        'true, which is checked before each pass.']
