"""Turning model outputs into answers: pure functions on numpy arrays, shared by
evaluation during training (workflows.training.finetune_task) and inference
(workflows.serving.predictor), so that a model is scored by the code that serves it."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def decode_classification(logits: np.ndarray, labels: Sequence[str]) -> tuple[list[str], list[float]]:
    """Best label and its softmax probability per row of `logits` (B, C)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    best = probs.argmax(-1)
    return [labels[i] for i in best], [float(probs[r, i]) for r, i in enumerate(best)]


def decode_word_tags(logits: np.ndarray, word_ids: np.ndarray, n_words: int,
                     labels: Sequence[str]) -> list[str]:
    """Tag per word from one row's token logits (T, C): the first piece of each word
    decides (the same piece that carried the label in training); words without a piece
    in this row (cut off) get "O"."""
    tags = ["O"] * n_words
    seen = set()
    best = np.asarray(logits).argmax(-1)
    for pos, w in enumerate(np.asarray(word_ids).tolist()):
        if w >= 0 and w not in seen:
            seen.add(w)
            tags[w] = labels[int(best[pos])]
    return tags


def window_candidates(start_logits: np.ndarray, end_logits: np.ndarray,
                      offset_start: np.ndarray, offset_end: np.ndarray, *,
                      n_best: int, max_answer_length: int) -> tuple[list[tuple[float, int, int]], float]:
    """(candidates, null score) of one QA window: candidates are `(score, char_start,
    char_end)` for the n-best start x n-best end pairs that lie in the context, in order,
    and at most `max_answer_length` pieces long; the null score is start+end at [CLS]."""
    s_log, e_log = np.asarray(start_logits), np.asarray(end_logits)
    o_s, o_e = np.asarray(offset_start), np.asarray(offset_end)
    n = len(o_s)
    s_top = np.argsort(-s_log[:n])[:n_best]
    e_top = np.argsort(-e_log[:n])[:n_best]
    out = []
    for s in s_top:
        if o_s[s] < 0:
            continue
        for e in e_top:
            if o_s[e] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            out.append((float(s_log[s] + e_log[e]), int(o_s[s]), int(o_e[e])))
    return out, float(s_log[0] + e_log[0])


def decode_answer(windows: list[tuple[list[tuple[float, int, int]], float]], context: str, *,
                  allow_null: bool, null_score_threshold: float, n_best: int) -> dict[str, Any]:
    """The answer of one question from its windows' candidates: the best span over all
    windows, or no answer ("" at -1, -1) when unanswerable questions are allowed and the
    smallest null score beats the best span by more than `null_score_threshold` (the rule
    of Google's run_squad for v2.0). `score` is the softmax probability of the choice
    among the n-best spans (and the null answer when allowed)."""
    cands = sorted((c for w in windows for c in w[0]), reverse=True)[:n_best]
    null = min((w[1] for w in windows), default=0.0)
    scores = [c[0] for c in cands] + ([null] if allow_null else [])
    probs = softmax(np.asarray(scores)) if scores else np.asarray([])
    if not cands or (allow_null and null - cands[0][0] > null_score_threshold):
        return {"answer": "", "start": -1, "end": -1,
                "score": float(probs[-1]) if allow_null and len(probs) else 0.0}
    _, start, end = cands[0]
    return {"answer": context[start:end], "start": start, "end": end, "score": float(probs[0])}
