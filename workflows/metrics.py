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
from typing import Sequence

# ------------------------------------------------------------- classification


def classification_metrics(gold: Sequence, pred: Sequence) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted vs gold labels (any hashable labels)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for label in set(gold) | set(pred):
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
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
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    true_set, pred_set = set(), set()
    for s, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted")
        true_set |= {(s, *e) for e in get_entities(g)}
        pred_set |= {(s, *e) for e in get_entities(p)}

    def prf(t: set, p: set) -> tuple[float, float, float]:
        tp = len(t & p)
        precision = tp / len(p) if p else 0.0
        recall = tp / len(t) if t else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    precision, recall, f1 = prf(true_set, pred_set)
    out = {"precision": precision, "recall": recall, "f1": f1,
           "accuracy": _token_accuracy(gold, pred)}
    for kind in sorted({e[1] for e in true_set | pred_set}):
        out[f"f1_{kind}"] = prf({e for e in true_set if e[1] == kind},
                                {e for e in pred_set if e[1] == kind})[2]
    return out


def _token_accuracy(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    n = sum(len(g) for g in gold)
    return sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p)) / n if n else 0.0


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
