"""The quickstart's classification task: real text that ships with every CPython.

`pydoc_data.topics` holds the Python language reference as plain text, one document per
topic (`help("while")` prints one). Each paragraph is an example; its label is the group
its topic belongs to (numbers, text, control flow, classes and objects, containers, names
and modules). No template wrote this text, so scores mean something: the split is by
topic, and evaluation paragraphs come only from topics never seen in training.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections import Counter
from pathlib import Path

# Topic -> group. Topics a Python version lacks are skipped; topics not listed are unused.
GROUPS: dict[str, tuple[str, ...]] = {
    "numbers": ("integers", "floating", "imaginary", "numbers", "numeric-types", "power",
                "binary", "bitwise", "shifting", "unary", "operator-summary", "comparisons"),
    "text": ("strings", "string-methods", "formatstrings", "atom-literals", "conversions"),
    "control flow": ("if", "while", "for", "break", "continue", "else", "try", "raise",
                     "with", "assert", "pass", "return", "yield", "exceptions", "compound",
                     "context-managers", "async", "await"),
    "classes and objects": ("class", "customization", "attribute-access", "specialattrs",
                            "specialnames", "objects", "types", "callable-types",
                            "attribute-references", "bltin-type-objects", "typesmethods",
                            "function", "lambda", "calls", "typesfunctions"),
    "containers": ("lists", "dict", "typesmapping", "typesseq", "typesseq-mutable",
                   "sequence-types", "slicings", "subscriptions", "in", "exprlists", "truth"),
    "names and modules": ("naming", "global", "nonlocal", "identifiers", "atom-identifiers",
                          "execmodel", "import", "dynamic-features", "typesmodules", "id-classes",
                          "assignment", "augassign", "del", "debugger"),
}

_MIN_CHARS = 80  # shorter blocks are headings, grammar fragments or one-liners


@dataclasses.dataclass
class PydocTask:
    """Where the task was written and what is in it."""

    train: Path
    eval: Path
    heldout: Path  # a few eval paragraphs (text, true_label), for the predict step
    labels: list[str]
    train_examples: int
    eval_examples: int
    train_topics: list[str]
    eval_topics: list[str]
    majority_label: str
    majority_accuracy: float  # on eval: the score of always answering the commonest label


def paragraphs(text: str, max_chars: int) -> list[str]:
    """Prose paragraphs of one topic: grammar, code (indented) and headings are dropped;
    long paragraphs are cut at a sentence end before `max_chars`."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t", "|", "+")) for ln in lines):
            continue  # code samples and grammar rules are indented; tables are drawn
        if all(set(ln.strip()) <= set("*=-~") for ln in lines[1:]):
            continue  # a heading and its underline
        para = " ".join(ln.strip() for ln in lines)
        if len(para) > max_chars:
            cut = para.rfind(". ", 0, max_chars)
            para = para[:cut + 1] if cut >= _MIN_CHARS else para[:max_chars]
        if len(para) >= _MIN_CHARS:
            out.append(para)
    return out


def split_topics(sizes: dict[str, int], seed: int,
                 eval_fraction: float) -> tuple[dict[str, str], dict[str, str]]:
    """(train topic -> group, eval topic -> group) from each topic's paragraph count.

    Per group, topics in a seeded hash order go to evaluation until it holds
    `eval_fraction` of the group's paragraphs; at least one topic stays on each side.
    """
    train, held = {}, {}
    for group, names in GROUPS.items():
        present = [t for t in names if sizes.get(t, 0) > 0]
        if len(present) < 2:
            raise ValueError(f"pydoc_data.topics has too few topics of group {group!r}")
        present.sort(key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).digest())
        total, taken = sum(sizes[t] for t in present), 0
        for i, topic in enumerate(present):
            last_for_train = i == len(present) - 1
            if not last_for_train and (taken == 0 or taken + sizes[topic] / 2
                                       <= eval_fraction * total):
                held[topic] = group
                taken += sizes[topic]
            else:
                train[topic] = group
    return train, held


def build_pydoc_task(folder: Path, seed: int = 0, eval_fraction: float = 0.25,
                     max_chars: int = 400, max_per_topic: int = 40,
                     heldout_rows: int = 6) -> PydocTask:
    """Write train.csv / eval.csv (columns text,label,topic) and heldout.csv
    (text,true_label: `predict` adds its own `label` column beside the true one)."""
    from pydoc_data.topics import topics

    texts = {t: paragraphs(topics[t], max_chars)
             for names in GROUPS.values() for t in names if t in topics}
    # Some paragraphs are repeated across topics: drop them (ambiguous, and they would leak
    # from training into evaluation).
    seen = Counter(para for paras in texts.values() for para in paras)
    texts = {t: [p for p in paras if seen[p] == 1][:max_per_topic] for t, paras in texts.items()}
    train_topics, eval_topics = split_topics({t: len(p) for t, p in texts.items()}, seed,
                                             eval_fraction)
    folder.mkdir(parents=True, exist_ok=True)

    def rows(chosen: dict[str, str]) -> list[tuple[str, str, str]]:
        return [(para, chosen[t], t) for t in sorted(chosen) for para in texts[t]]

    splits = {"train": rows(train_topics), "eval": rows(eval_topics)}
    paths = {}
    for name, data in splits.items():
        paths[name] = folder / f"{name}.csv"
        _write_csv(paths[name], ["text", "label", "topic"], data)
    # Held-out examples for the predict step: one or two per label, from eval topics.
    by_label: dict[str, list[str]] = {}
    for text, label, _ in splits["eval"]:
        by_label.setdefault(label, []).append(text)
    picks = []
    for i in range(heldout_rows):
        label = sorted(by_label)[i % len(by_label)]
        options = by_label[label]
        picks.append((options[(i // len(by_label)) * 7 % len(options)], label))
    heldout = folder / "heldout.csv"
    _write_csv(heldout, ["text", "true_label"], picks)
    counts = Counter(label for _, label, _ in splits["eval"])
    majority, hits = max(sorted(counts.items()), key=lambda kv: kv[1])
    return PydocTask(train=paths["train"], eval=paths["eval"], heldout=heldout,
                     labels=sorted(GROUPS), train_examples=len(splits["train"]),
                     eval_examples=len(splits["eval"]), train_topics=sorted(train_topics),
                     eval_topics=sorted(eval_topics), majority_label=majority,
                     majority_accuracy=hits / max(1, len(splits["eval"])))


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def build_pydoc_suite(folder: Path, task: PydocTask, seed: int = 0, train_rows: int = 320,
                      eval_rows: int = 128, max_seq_len: int = 64, epochs: float = 2.0,
                      restarts: int = 2, lr: float = 1e-4) -> Path:
    """A two-task suite (`bertflow eval --suite`) from the topic task, small enough for the
    quickstart: `topics` (seq-cls: a paragraph's topic group, on up to `train_rows` /
    `eval_rows` of the task's rows) and `same-group` (pair-cls: do two paragraphs belong
    to the same topic group? pairs drawn within each split, half same and half different,
    so evaluation pairs still come only from topics never seen in training). Returns the
    suite file."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {"train": (task.train, train_rows), "eval": (task.eval, eval_rows)}
    for name, (path, n) in splits.items():
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [(r["text"], r["label"]) for r in csv.DictReader(fh)]
        rng.shuffle(rows)
        _write_csv(folder / f"topics_{name}.csv", ["text", "label"], rows[:n])
        by_group: dict[str, list[str]] = {}
        for text, label in rows:
            by_group.setdefault(label, []).append(text)
        groups = sorted(g for g, texts in by_group.items() if len(texts) >= 2)
        pairs = []
        for i in range(n):
            first = rng.choice(groups)
            if i % 2 == 0:
                a, b = rng.sample(by_group[first], 2)
                pairs.append((a, b, "same"))
            else:
                second = rng.choice([g for g in groups if g != first])
                pairs.append((rng.choice(by_group[first]), rng.choice(by_group[second]),
                              "different"))
        _write_csv(folder / f"pairs_{name}.csv", ["text_a", "text_b", "label"], pairs)
    suite = folder / "suite.yaml"
    tmp = suite.with_suffix(".yaml.tmp")
    tmp.write_text(f"""# The quickstart's suite: two small tasks from the Python reference (pydoc_task.py).
name: pyref
restarts: {restarts}
defaults: {{epochs: {epochs}, max_seq_len: {max_seq_len}, batch_size: 16, lr: {lr}, log_every: 4}}
tasks:
  topics: {{task: seq-cls, train: topics_train.csv, eval: topics_eval.csv, metric: accuracy}}
  same-group: {{task: pair-cls, train: pairs_train.csv, eval: pairs_eval.csv, metric: accuracy}}
""", encoding="utf-8")
    tmp.replace(suite)
    return suite
