"""Evaluation metrics the field reports, dependency-free (numpy not even needed).

- Classification: accuracy and macro-F1 (over the labels seen in gold or predictions,
  like scikit-learn's `f1_score(average="macro")`).
- Token classification: entity-level micro precision/recall/F1 computed like seqeval's
  default (conlleval-compatible) mode, where an `I-X` after `O` opens an entity.
- QA: exact match and F1 with the official SQuAD v1.1/v2.0 normalisation, on 0-100 like
  the official script, plus HasAns/NoAns breakdowns when unanswerable questions exist.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping, Sequence

# ------------------------------------------------------------- classification


def classification_metrics(gold: Sequence, pred: Sequence) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted vs gold labels (any hashable labels)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return confusion_metrics(collections.Counter(zip(gold, pred)))


def confusion_metrics(counts: Mapping[tuple[Any, Any], int]) -> dict[str, float]:
    """`classification_metrics` from (gold, predicted) -> count: counts of several shards
    of an evaluation add up to the whole one's."""
    total = sum(counts.values())
    if not total:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    seen = [pair for pair, n in counts.items() if n]
    accuracy = sum(counts[(g, p)] for g, p in seen if g == p) / total
    f1s = []
    for label in sorted({g for g, _ in seen} | {p for _, p in seen}, key=repr):
        tp = counts.get((label, label), 0)
        fp = sum(counts[(g, p)] for g, p in seen if p == label and g != label)
        fn = sum(counts[(g, p)] for g, p in seen if g == label and p != label)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


# --------------------------------------------------------------- entities


def _split(tag: str) -> tuple[str, str]:
    if tag in ("O", "."):
        return tag, ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if kind else ("I", prefix)  # seqeval reads "PER" as I-PER


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities `(type, first, last)` in one tag sequence, the way seqeval finds them."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        t, kind = _split(tag)
        if _ends(prev_tag, t, prev_type, kind):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, t, prev_type, kind):
            begin = i
        prev_tag, prev_type = t, kind
    return chunks


def entity_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 over sentences of tags (seqeval's
    default mode), plus per-type F1 as `f1_<TYPE>`."""
    return entity_metrics_of_counts(entity_counts(gold, pred))


def entity_counts(gold: Sequence[Sequence[str]],
                  pred: Sequence[Sequence[str]]) -> collections.Counter:
    """What `entity_metrics` is computed from, per entity type: ("true", TYPE), ("pred",
    TYPE) and ("hit", TYPE) entities, and "tokens"/"tokens_correct". Counts of several
    shards of an evaluation add up to the whole one's (entities never span sentences)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    counts: collections.Counter = collections.Counter()
    for s, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted")
        true, found = set(get_entities(g)), set(get_entities(p))
        counts.update(("true", e[0]) for e in true)
        counts.update(("pred", e[0]) for e in found)
        counts.update(("hit", e[0]) for e in true & found)
        counts["tokens"] += len(g)
        counts["tokens_correct"] += sum(a == b for a, b in zip(g, p))
    return counts


def entity_metrics_of_counts(counts: Mapping[Any, int]) -> dict[str, float]:
    """`entity_metrics` from `entity_counts` (of one evaluation, or several added)."""
    def prf(kinds: set[str]) -> tuple[float, float, float]:
        tp, n_pred, n_true = (sum(counts.get((what, k), 0) for k in kinds)
                              for what in ("hit", "pred", "true"))
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    kinds = {key[1] for key, n in counts.items()
             if isinstance(key, tuple) and key[0] in ("true", "pred") and n}
    precision, recall, f1 = prf(kinds)
    tokens = counts.get("tokens", 0)
    out = {"precision": precision, "recall": recall, "f1": f1,
           "accuracy": counts.get("tokens_correct", 0) / tokens if tokens else 0.0}
    for kind in sorted(kinds):
        out[f"f1_{kind}"] = prf({kind})[2]
    return out


# ------------------------------------------------------------------ SQuAD


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, drop punctuation and the articles
    a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 after normalisation; empty vs empty is 1 (the v2.0 script's rule)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(golds: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """EM and F1 (0-100) of `predictions` against lists of gold answers (an empty list
    means unanswerable, gold ""), the max over gold answers like the official script;
    `HasAns_*`/`NoAns_*` and their totals are added when unanswerable questions exist."""
    if len(golds) != len(predictions):
        raise ValueError(f"{len(golds)} questions but {len(predictions)} predictions")
    em, f1, has = [], [], []
    for answers, pred in zip(golds, predictions):
        answers = [a for a in answers if normalize_answer(a)] or [""]
        has.append(answers != [""])
        em.append(max(exact_match(pred, a) for a in answers))
        f1.append(max(token_f1(pred, a) for a in answers))
    n = len(golds)
    out = {"exact": 100.0 * sum(em) / n if n else 0.0, "f1": 100.0 * sum(f1) / n if n else 0.0,
           "total": float(n)}
    if not all(has):
        for name, keep in (("HasAns", True), ("NoAns", False)):
            idx = [i for i in range(n) if has[i] == keep]
            out[f"{name}_total"] = float(len(idx))
            if idx:
                out[f"{name}_exact"] = 100.0 * sum(em[i] for i in idx) / len(idx)
                out[f"{name}_f1"] = 100.0 * sum(f1[i] for i in idx) / len(idx)
    return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain text table: one row per split/epoch, one column per metric."""
    cols = sorted({k for r in rows.values() for k in r})
    width = max([len(k) for k in rows] + [5])
    head = " " * width + "  " + "  ".join(f"{c:>10}" for c in cols)
    lines = [head]
    for name, r in rows.items():
        cells = [f"{r[c]:>10.4f}" if c in r else f"{'':>10}" for c in cols]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
