"""Evaluation metrics the field reports, on numpy only (no scikit-learn/scipy at run time;
the tests check each against them).

- Classification: accuracy, macro-F1 (over the labels seen in gold or predictions, like
  scikit-learn's `f1_score(average="macro")`), Matthews correlation (`mcc`, binary and
  multiclass, scikit-learn's `matthews_corrcoef`: 0 when undefined, e.g. constant
  predictions) and, given the positive label, its F1 (`f1`, scikit-learn's binary F1:
  what GLUE reports for MRPC and QQP).
- Regression: Pearson and Spearman correlation (ties get their average rank, as scipy's
  `spearmanr`; 0 when undefined, i.e. a constant side) and the mean squared error.
- GLUE: `glue_average` of per-task scores by the BERT paper's rule or the leaderboard's.
- Token classification: entity-level micro precision/recall/F1 computed like seqeval's
  default (conlleval-compatible) mode, where an `I-X` after `O` opens an entity.
- QA: exact match and F1 with the official SQuAD v1.1/v2.0 normalisation, on 0-100 like
  the official script, plus HasAns/NoAns breakdowns when unanswerable questions exist.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

# ------------------------------------------------------------- classification


def classification_metrics(gold: Sequence, pred: Sequence,
                           positive: Any = None) -> dict[str, float]:
    """Accuracy, macro-F1 and MCC of predicted vs gold labels (any hashable labels); with
    `positive`, also `f1`, the F1 of that label (binary F1)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return confusion_metrics(collections.Counter(zip(gold, pred)), positive)


def confusion_metrics(counts: Mapping[tuple[Any, Any], int],
                      positive: Any = None) -> dict[str, float]:
    """`classification_metrics` from (gold, predicted) -> count: counts of several shards
    of an evaluation add up to the whole one's."""
    total = sum(counts.values())
    if not total:
        out = {"accuracy": 0.0, "macro_f1": 0.0, "mcc": 0.0}
        return {**out, "f1": 0.0} if positive is not None else out
    seen = [pair for pair, n in counts.items() if n]
    accuracy = sum(counts[(g, p)] for g, p in seen if g == p) / total
    f1 = {}
    for label in sorted({g for g, _ in seen} | {p for _, p in seen}, key=repr):
        tp = counts.get((label, label), 0)
        fp = sum(counts[(g, p)] for g, p in seen if p == label and g != label)
        fn = sum(counts[(g, p)] for g, p in seen if g == label and p != label)
        f1[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    out = {"accuracy": accuracy, "macro_f1": sum(f1.values()) / len(f1),
           "mcc": _mcc(counts, seen, total)}
    if positive is not None:
        out["f1"] = f1.get(positive, 0.0)
    return out


def _mcc(counts: Mapping[tuple[Any, Any], int], seen: list, total: int) -> float:
    """Matthews correlation from the confusion counts (Gorodkin's multiclass form, what
    scikit-learn computes): (c*s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    with c correct, s total, p_k / t_k the predicted / true counts of class k."""
    true: collections.Counter = collections.Counter()
    found: collections.Counter = collections.Counter()
    for g, p in seen:
        true[g] += counts[(g, p)]
        found[p] += counts[(g, p)]
    correct = sum(counts[(g, p)] for g, p in seen if g == p)
    s = float(total)
    cov_pt = correct * s - sum(found[k] * true[k] for k in true.keys() | found.keys())
    cov_pp = s * s - sum(v * v for v in found.values())
    cov_tt = s * s - sum(v * v for v in true.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


def matthews_corrcoef(gold: Sequence, pred: Sequence) -> float:
    """Matthews correlation of two label sequences (binary or multiclass)."""
    return classification_metrics(gold, pred)["mcc"]


# ------------------------------------------------------------- regression


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's `rankdata`)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Runs of equal values: each gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; 0 when it is undefined (fewer than two points, a constant side)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} gold values but {b.size} predictions")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0  # checked before centring: a constant minus its mean may not be 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    if denom == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(a @ b) / denom))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties handled as scipy does)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} gold values but {len(y)} predictions")
    return pearson(average_ranks(x), average_ranks(y))


def regression_metrics(gold: Sequence[float], pred: Sequence[float]) -> dict[str, float]:
    """Pearson, Spearman and the mean squared error of predicted vs gold scores."""
    a, b = np.asarray(gold, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} gold values but {b.size} predictions")
    mse = float(np.mean((a - b) ** 2)) if a.size else 0.0
    return {"pearson": pearson(a, b), "spearman": spearman(a, b), "mse": mse}


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


# ------------------------------------------------------------------- GLUE

# The BERT paper's GLUE average (Devlin et al. 2019, Table 1): one number per column,
# MNLI's matched and mismatched dev sets as two columns, F1 for QQP and MRPC, Spearman
# for STS-B, MCC for CoLA, accuracy for the rest, WNLI left out ("the problematic WNLI
# set"). Checked on the paper's own rows: BERT-base 84.6, 83.4, 71.2, 90.5, 93.5, 52.1,
# 85.8, 88.9, 66.4 average 79.6; BERT-large's 82.1.
GLUE_PAPER_COLUMNS: dict[str, tuple[str, ...]] = {
    "mnli-m": ("accuracy",), "mnli-mm": ("accuracy",), "qqp": ("f1",), "qnli": ("accuracy",),
    "sst2": ("accuracy",), "cola": ("mcc",), "stsb": ("spearman",), "mrpc": ("f1",),
    "rte": ("accuracy",)}
# The GLUE leaderboard's score (gluebenchmark.com): the unweighted mean over the nine
# tasks, WNLI included (the diagnostic AX is not), a task with two metrics scored by
# their mean (MRPC and QQP: F1 and accuracy; STS-B: Pearson and Spearman) and MNLI by the
# mean of matched and mismatched. Checked on BERT-large's leaderboard row (80.5).
GLUE_LEADERBOARD_TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "cola": (("cola", "mcc"),), "sst2": (("sst2", "accuracy"),),
    "mrpc": (("mrpc", "f1"), ("mrpc", "accuracy")),
    "stsb": (("stsb", "pearson"), ("stsb", "spearman")),
    "qqp": (("qqp", "f1"), ("qqp", "accuracy")),
    "mnli": (("mnli-m", "accuracy"), ("mnli-mm", "accuracy")),
    "qnli": (("qnli", "accuracy"),), "rte": (("rte", "accuracy"),),
    "wnli": (("wnli", "accuracy"),)}
_GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli_m": "mnli-m", "mnli_mm": "mnli-mm",
                 "mnli-matched": "mnli-m", "mnli-mismatched": "mnli-mm"}


def _glue_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Scores by lower-case task name (aliases folded), metric names without `val_`."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in scores.items():
        key = _GLUE_ALIASES.get(task.strip().lower(), task.strip().lower())
        out[key] = {k.removeprefix("val_"): float(v) for k, v in metrics.items()}
    return out


def _metric(scores: dict[str, dict[str, float]], task: str, name: str) -> float:
    if name not in scores[task]:
        raise ValueError(f"GLUE task {task} has no {name!r} score (it has "
                         f"{', '.join(sorted(scores[task])) or 'none'})")
    return scores[task][name]


def glue_columns(scores: Mapping[str, Mapping[str, float]],
                 rule: str = "paper") -> dict[str, float]:
    """The columns the GLUE average of `rule` is the mean of, for the tasks present in
    `scores` ({eval name: {metric: value}}; MNLI as `mnli-m` and `mnli-mm`; other keys,
    e.g. squad, ignored). `rule`: "paper" (the BERT paper's table) or "leaderboard"."""
    s = _glue_scores(scores)
    if rule == "paper":
        return {task: _metric(s, task, names[0])
                for task, names in GLUE_PAPER_COLUMNS.items() if task in s}
    if rule != "leaderboard":
        raise ValueError(f"rule {rule!r}: use paper or leaderboard")
    out = {}
    for task, parts in GLUE_LEADERBOARD_TASKS.items():
        present = [(t, m) for t, m in parts if t in s]
        if present:
            out[task] = sum(_metric(s, t, m) for t, m in present) / len(present)
    return out


def glue_average(scores: Mapping[str, Mapping[str, float]], rule: str = "paper") -> float:
    """The GLUE average of per-task dev scores, in the scores' own units (0-1 for
    bertflow's metrics): the mean of `glue_columns` (see it and the rules above). Only
    the GLUE tasks present count; a ValueError when none is, or a task lacks its metric."""
    columns = glue_columns(scores, rule)
    if not columns:
        raise ValueError(f"no GLUE task among {', '.join(scores) or 'no tasks'}")
    return sum(columns.values()) / len(columns)


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
