"""Turn task records into model inputs: pure functions over a WordPiece tokenizer.

The tokenizer is data_prep's `WordPieceTokenizer` (anything with `encode_batch`,
`encode_with_offsets`, `cls_id`, `sep_id`, `unk_id`). Outputs are unpadded rows (lists of
ints), the Parquet schema of task datasets; padding happens per batch at collate time.
Training, evaluation and prediction all build their inputs here, so they cannot drift.
"""

from __future__ import annotations

from typing import Any, Sequence

IGNORE = -100  # label id the losses ignore (non-first word pieces, specials)


def ids_and_offsets(tokenizer: Any, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) per text, without special tokens, whatever shape the
    tokenizer's `encode_with_offsets` returns (pairs, or objects with .ids/.offsets)."""
    encoded = tokenizer.encode_with_offsets(list(texts))
    if isinstance(encoded, tuple) and len(encoded) == 2 and len(texts) != 2:
        encoded = list(zip(*encoded))
    out = []
    for item in encoded:
        if hasattr(item, "ids"):
            ids, offsets = item.ids, item.offsets
        elif isinstance(item, dict):
            ids, offsets = item["ids"], item["offsets"]
        else:
            ids, offsets = item
        out.append(([int(i) for i in ids], [(int(s), int(e)) for s, e in offsets]))
    return out


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Longest-first truncation of a pair to `max_tokens` pieces in all (like BERT's)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def encode_classification(tokenizer: Any, texts_a: Sequence[str],
                          texts_b: Sequence[str] | None, max_seq_len: int) -> dict[str, list]:
    """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` rows, truncated to `max_seq_len`."""
    ids_a = tokenizer.encode_batch(list(texts_a))
    ids_b = tokenizer.encode_batch(list(texts_b)) if texts_b is not None else None
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    input_ids, token_types = [], []
    for i, a in enumerate(ids_a):
        if ids_b is None:
            a = list(a)[: max_seq_len - 2]
            input_ids.append([cls, *a, sep])
            token_types.append([0] * (len(a) + 2))
        else:
            a, b = truncate_pair(a, ids_b[i], max_seq_len - 3)
            input_ids.append([cls, *a, sep, *b, sep])
            token_types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    return {"input_ids": input_ids, "token_type_ids": token_types}


def word_pieces(tokenizer: Any, words_list: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Pieces of every word of every sentence (one batched call); a word the tokenizer
    drops entirely (e.g. a control character) becomes [UNK] so words stay aligned."""
    flat = [w for words in words_list for w in words]
    pieces = tokenizer.encode_batch(flat) if flat else []
    out, k = [], 0
    for words in words_list:
        out.append([list(p) or [tokenizer.unk_id] for p in pieces[k:k + len(words)]])
        k += len(words)
    return out


def chunk_words(piece_counts: Sequence[int], max_pieces: int) -> list[tuple[int, int]]:
    """Split a sentence into [start, end) word ranges whose pieces fit `max_pieces`, so
    prediction tags every word of a sentence longer than the model's window."""
    ranges, start, used = [], 0, 0
    for i, n in enumerate(piece_counts):
        n = min(n, max_pieces)
        if used + n > max_pieces and i > start:
            ranges.append((start, i))
            start, used = i, 0
        used += n
    ranges.append((start, len(piece_counts)))
    return ranges if piece_counts else []


def encode_words(tokenizer: Any, pieces: Sequence[Sequence[Sequence[int]]],
                 tag_ids: Sequence[Sequence[int]] | None, max_seq_len: int) -> dict[str, list]:
    """Token-classification rows from per-word pieces: the first piece of each word
    carries its tag id, the other pieces and the specials carry -100. `word_ids` maps each
    position to its word (-1 for specials); words past `max_seq_len` are cut."""
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    input_ids, labels, word_ids, token_types = [], [], [], []
    for s, words in enumerate(pieces):
        ids, labs, wids = [cls], [IGNORE], [-1]
        for w, p in enumerate(words):
            p = list(p)[: max_seq_len - 2]
            if len(ids) + len(p) > max_seq_len - 1:
                break
            ids += p
            tag = tag_ids[s][w] if tag_ids is not None else IGNORE
            labs += [tag] + [IGNORE] * (len(p) - 1)
            wids += [w] * len(p)
        ids.append(sep)
        labs.append(IGNORE)
        wids.append(-1)
        input_ids.append(ids)
        labels.append(labs)
        word_ids.append(wids)
        token_types.append([0] * len(ids))
    return {"input_ids": input_ids, "token_type_ids": token_types, "labels": labels,
            "word_ids": word_ids}


def encode_qa(tokenizer: Any, questions: Sequence[str], contexts: Sequence[str], *,
              max_seq_len: int, doc_stride: int, max_query_len: int = 64,
              answer_spans: Sequence[tuple[int, int] | None] | None = None,
              example_ids: Sequence[int] | None = None) -> dict[str, list]:
    """`[CLS] question [SEP] context-window [SEP]` rows over sliding context windows.

    Windows start every `doc_stride` context pieces (Google's run_squad meaning; capped
    at the window size so no piece is skipped). Per row: `example_index`, and
    `offset_start`/`offset_end` giving each position's character span in the context
    (-1 outside it), used to map predicted spans back to the original text. With
    `answer_spans` (character [start, end), None if unanswerable), `start_positions` /
    `end_positions` are the answer's token positions, or 0 ([CLS]) when the answer is not
    wholly inside the window or there is none.
    """
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    q_ids = tokenizer.encode_batch(list(questions))
    ctx = ids_and_offsets(tokenizer, contexts)
    cols: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "example_index",
                                             "offset_start", "offset_end")}
    if answer_spans is not None:
        cols["start_positions"], cols["end_positions"] = [], []
    for i, (c_ids, offsets) in enumerate(ctx):
        q = list(q_ids[i])[:max_query_len]
        room = max_seq_len - len(q) - 3
        if room < 1:
            q = q[: max(1, max_seq_len - 4)]
            room = max_seq_len - len(q) - 3
        step = max(1, min(doc_stride, room))
        start = 0
        while True:
            end = min(start + room, len(c_ids))
            ids = [cls, *q, sep, *c_ids[start:end], sep]
            prefix = len(q) + 2
            cols["input_ids"].append(ids)
            cols["token_type_ids"].append([0] * prefix + [1] * (end - start + 1))
            cols["example_index"].append(int(example_ids[i]) if example_ids is not None else i)
            cols["offset_start"].append([-1] * prefix + [o[0] for o in offsets[start:end]] + [-1])
            cols["offset_end"].append([-1] * prefix + [o[1] for o in offsets[start:end]] + [-1])
            if answer_spans is not None:
                s_tok = e_tok = 0
                span = answer_spans[i]
                if span is not None:
                    s_char, e_char = span
                    inside = [t for t in range(start, end)
                              if offsets[t][1] > s_char and offsets[t][0] < e_char]
                    # Only label the window when it holds the whole answer.
                    if inside and offsets[inside[0]][0] <= s_char \
                            and offsets[inside[-1]][1] >= e_char:
                        s_tok, e_tok = inside[0] - start + prefix, inside[-1] - start + prefix
                cols["start_positions"].append(s_tok)
                cols["end_positions"].append(e_tok)
            if end >= len(c_ids):
                break
            start += step
    return cols


# Padding value per column; anything else pads with 0.
PAD_VALUES = {"labels": IGNORE, "offset_start": -1, "offset_end": -1, "word_ids": -1}


def pad_batch(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Pad the list-valued columns of a batch of unpadded rows to its longest row.

    Returns int64 numpy arrays `(B, T)` for every list column (`input_ids` padded with
    `pad_id`, labels with -100, offsets and word ids with -1, the rest with 0), an
    `attention_mask`, and scalar columns as `(B,)` arrays.
    """
    import numpy as np

    rows = [list(r) for r in batch["input_ids"]]
    width = max((len(r) for r in rows), default=0)
    out: dict[str, Any] = {}
    for name, col in batch.items():
        col = list(col)
        if col and hasattr(col[0], "__len__") and not isinstance(col[0], str):
            fill = pad_id if name == "input_ids" else PAD_VALUES.get(name, 0)
            arr = np.full((len(col), width), fill, dtype=np.int64)
            for i, r in enumerate(col):
                arr[i, : len(r)] = np.asarray(r, dtype=np.int64)
            out[name] = arr
        else:
            out[name] = np.asarray(col)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        mask[i, : len(r)] = 1
    out["attention_mask"] = mask
    return out
