"""The Predictor: a loaded model folder that tokenizes a DataFrame batch, runs the model and
decodes its outputs. Used by serving (the MLflow pyfunc), `bertflow predict` and
`bertflow embed` (workflows.serving.batch).

Inputs per task (DataFrame columns) and outputs:
- seq-cls:   `text`                 -> `label`, `score`
- pair-cls:  `text_a`, `text_b`     -> `label`, `score`
- regression: `text`, or `text_a`, `text_b` (as trained: bertflow.json `inputs`) -> `score`
  (the predicted number)
- token-cls: `tokens` (list of words, or a string split on white space) -> `tags`
- qa:        `question`, `context`  -> `answer`, `start`, `end` (character span), `score`
- pretraining (no task head): `text` -> `embedding`
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bert_core.config_io import BertflowError
from data_prep.tasks import features as F
from workflows.config import POOLINGS
from workflows.decoding import (decode_answer, decode_classification, decode_word_tags,
                                window_candidates)
from workflows.model_folder import encoder_of, load_task_model, read_task_meta

log = logging.getLogger(__name__)

INPUT_COLUMNS = {"seq-cls": ("text",), "pair-cls": ("text_a", "text_b"),
                 "regression": ("text",),  # or a pair: the folder's bertflow.json `inputs`
                 "token-cls": ("tokens",), "qa": ("question", "context"),
                 "pretraining": ("text",)}


class PredictError(BertflowError):
    """Inference input is unusable; the message says what to fix."""


def _missing_field(values: tuple, names: Sequence[str]) -> str:
    """"missing field 'x'" for the first empty input of a row, else ""."""
    for name, v in zip(names, values):
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            return f"missing field {name!r}"
        if not isinstance(v, str) and hasattr(v, "__len__") and len(v) == 0:
            return f"missing field {name!r}"
    return ""


class Predictor:
    """A loaded model folder that predicts over DataFrames (and embeds texts).

    Batches are sorted by length so padding stays small; results come back in the
    input's order.
    """

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any],
                 device: str = "cpu", batch_size: int = 32) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.meta = meta
        self.task = meta.get("task", "pretraining")
        self.labels = list(meta.get("labels") or [])
        # The columns the model reads (a regression: a text or a pair, as it was trained).
        self.inputs = tuple(meta.get("inputs") or INPUT_COLUMNS[self.task])
        id2label = getattr(getattr(model, "config", None), "id2label", None)
        if not self.labels and id2label and self.task in ("seq-cls", "pair-cls", "token-cls"):
            self.labels = [id2label[i] for i in sorted(id2label)]  # a folder without labels
        self.max_seq_len = int(meta.get("max_seq_len", 128))
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | None = None,
                 batch_size: int = 32, threads: int | None = None) -> Predictor:
        """Load model, tokenizer and bertflow.json from an HF-format model folder;
        `threads`: torch's threads in this process (the CPUs granted to a replica)."""
        import torch

        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        from bert_core.hf_compat import check_tokenizer_fits
        from data_prep.tokenizer import WordPieceTokenizer

        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise PredictError(f"{d}: not a model folder (no config.json); pass a folder "
                               "written by bertflow or a Hugging Face-format BERT folder")
        meta = read_task_meta(d)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # strict: a task folder lacking head weights is refused, never served with a random head
        model = load_task_model(d, meta["task"], strict=meta["task"] != "pretraining")
        check_tokenizer_fits(d, model.config.vocab_size)
        return cls(model, WordPieceTokenizer.from_dir(d), meta, device, batch_size)

    # ---- low level -----------------------------------------------------------------
    def _forward(self, rows: dict[str, list], **kwargs: Any):
        """Yield (row indices, model output) over length-sorted padded batches."""
        import torch

        order = np.argsort([len(r) for r in rows["input_ids"]], kind="stable")
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            batch = F.pad_batch({k: [rows[k][j] for j in idx]
                                 for k in ("input_ids", "token_type_ids")},
                                self.tokenizer.pad_id)
            tensors = {k: torch.as_tensor(batch[k], device=self.device)
                       for k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.inference_mode():
                yield idx, batch["attention_mask"], self.model(**tensors, **kwargs)

    @staticmethod
    def _column(df: Any, name: str) -> list:
        if name not in df.columns:
            raise PredictError(f"input has no column {name!r} (columns: "
                               f"{', '.join(map(str, df.columns))})")
        return df[name].tolist()

    def _check_columns(self, df: Any) -> None:
        need = self.inputs
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise PredictError(
                f"a {self.task} model needs column(s) {', '.join(need)}; the input has "
                f"{', '.join(map(str, df.columns)) or 'none'} (missing {', '.join(missing)})")

    # ---- tasks ---------------------------------------------------------------------
    def predict(self, df: Any) -> Any:
        """Predictions for every row of a pandas DataFrame, as a DataFrame (same order).

        Rows with an empty or missing input get no prediction and an `error` column that
        says which field is missing (the column appears only when such rows exist)."""
        import pandas as pd

        self._check_columns(df)
        df = df.reset_index(drop=True)
        errors = [_missing_field(row, self.inputs)
                  for row in df[list(self.inputs)].itertuples(index=False)]
        if any(errors):
            ok = [i for i, e in enumerate(errors) if not e]
            out = self._predict(df.iloc[ok].reset_index(drop=True)) if ok else None
            # None (not NaN) in the rows without a prediction, so files show null, not "nan".
            full = pd.DataFrame({c: pd.Series([None] * len(df), dtype=object)
                                 for c in (out.columns if out is not None else [])})
            if out is not None:
                for c in out.columns:
                    full.loc[ok, c] = pd.Series(out[c].tolist(), index=ok, dtype=object)
            full["error"] = pd.Series([e or None for e in errors], dtype=object)
            return full
        return self._predict(df)

    def _predict(self, df: Any) -> Any:
        import pandas as pd

        if self.task in ("seq-cls", "pair-cls", "regression"):
            return pd.DataFrame(self._classify(df))
        if self.task == "token-cls":
            return pd.DataFrame({"tags": self.tag_words(self._words(df))})
        if self.task == "qa":
            return pd.DataFrame(self.answer(self._column(df, "question"),
                                            self._column(df, "context")))
        pooling = self.meta.get("pooling", "mean")
        vecs = self.embed([str(t) for t in self._column(df, "text")], pooling=pooling)
        return pd.DataFrame({"embedding": [v.tolist() for v in vecs]})

    def _classify(self, df: Any) -> dict[str, list]:
        """seq-cls/pair-cls: the label and its probability; regression: the score."""
        pair = len(self.inputs) == 2
        a = [str(x) for x in self._column(df, self.inputs[0])]
        b = [str(x) for x in self._column(df, self.inputs[1])] if pair else None
        rows = F.encode_classification(self.tokenizer, a, b, self.max_seq_len)
        labels: list[str] = [""] * len(a)
        scores: list[float] = [0.0] * len(a)
        if self.task == "regression":
            for idx, _, out in self._forward(rows):
                for j, v in zip(idx, out.logits.float().squeeze(-1).cpu().tolist()):
                    scores[j] = float(v)
            return {"score": scores}
        for idx, _, out in self._forward(rows):
            names, probs = decode_classification(out.logits.float().cpu().numpy(), self.labels)
            for j, n, p in zip(idx, names, probs):
                labels[j], scores[j] = n, p
        return {"label": labels, "score": scores}

    def _words(self, df: Any) -> list[list[str]]:
        words = []
        for x in self._column(df, "tokens"):
            if isinstance(x, str):
                words.append(x.split())
            else:
                words.append([str(w) for w in list(x)])
        return words

    def tag_words(self, sentences: list[list[str]]) -> list[list[str]]:
        """A tag per word for every sentence; a sentence longer than the model's window
        is tagged chunk by chunk, so no word is left out."""
        pieces = F.word_pieces(self.tokenizer, sentences)
        chunks = []  # (sentence, first word, pieces of the chunk's words)
        for s, p in enumerate(pieces):
            for lo, hi in F.chunk_words([len(x) for x in p], self.max_seq_len - 2):
                chunks.append((s, lo, p[lo:hi]))
        rows = F.encode_words(self.tokenizer, [c[2] for c in chunks], None, self.max_seq_len)
        tags = [["O"] * len(s) for s in sentences]
        for idx, _, out in self._forward(rows):
            logits = out.logits.float().cpu().numpy()
            for r, j in enumerate(idx):
                s, lo, chunk = chunks[j]
                wids = np.asarray(rows["word_ids"][j])
                t = decode_word_tags(logits[r, : len(wids)], wids, len(chunk), self.labels)
                tags[s][lo:lo + len(chunk)] = t
        return tags

    def answer(self, questions: list, contexts: list) -> dict[str, list]:
        """Answer text, character span and score per question over its context windows."""
        questions = [str(q) for q in questions]
        contexts = [str(c) for c in contexts]
        m = self.meta
        rows = F.encode_qa(self.tokenizer, questions, contexts,
                           max_seq_len=self.max_seq_len, doc_stride=int(m.get("doc_stride", 128)),
                           max_query_len=int(m.get("max_query_len", 64)))
        windows: list[list] = [[] for _ in questions]
        for idx, _, out in self._forward(rows):
            s_log = out.start_logits.float().cpu().numpy()
            e_log = out.end_logits.float().cpu().numpy()
            for r, j in enumerate(idx):
                n = len(rows["input_ids"][j])
                windows[rows["example_index"][j]].append(window_candidates(
                    s_log[r, :n], e_log[r, :n], rows["offset_start"][j], rows["offset_end"][j],
                    n_best=int(m.get("n_best", 20)),
                    max_answer_length=int(m.get("max_answer_length", 30))))
        results = [decode_answer(w, c, allow_null=bool(m.get("version_2", False)),
                                 null_score_threshold=float(m.get("null_score_threshold", 0.0)),
                                 n_best=int(m.get("n_best", 20)))
                   for w, c in zip(windows, contexts)]
        return {k: [r[k] for r in results] for k in ("answer", "start", "end", "score")}

    def embed(self, texts: list[str], pooling: str = "mean", layer: int | None = None,
              normalize: bool = False, max_seq_len: int | None = None) -> np.ndarray:
        """(N, H) float32 features: the [CLS] vector, the mean over real tokens, or the
        pooler output, of the last layer or of hidden_states[layer] (0 = embeddings,
        negative counts from the end); L2-normalised with `normalize`. Texts are cut at
        `max_seq_len` word pieces (default: the folder's max_seq_len)."""
        limit = max_seq_len or self.max_seq_len
        positions = int(getattr(encoder_of(self.model).config, "max_position_embeddings", limit))
        if limit > positions:
            raise PredictError(f"max_seq_len {limit} exceeds the model's "
                               f"max_position_embeddings={positions}")
        if pooling not in POOLINGS:
            raise PredictError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and layer is not None:
            raise PredictError("--layer applies to cls or mean pooling; the pooler reads "
                               "the last layer only")
        rows = F.encode_classification(self.tokenizer, texts, None, limit)
        encoder = encoder_of(self.model)
        saved, self.model = self.model, encoder
        out_vecs: list[np.ndarray | None] = [None] * len(texts)
        try:
            for idx, mask, out in self._forward(rows, output_hidden_states=layer is not None):
                if pooling == "pooler":
                    vec = out.pooler_output
                else:
                    h = out.last_hidden_state if layer is None else self._layer(out, layer)
                    if pooling == "cls":
                        vec = h[:, 0]
                    else:
                        import torch

                        m = torch.as_tensor(mask, device=h.device, dtype=h.dtype).unsqueeze(-1)
                        vec = (h * m).sum(1) / m.sum(1).clamp(min=1)
                if normalize:
                    import torch

                    vec = torch.nn.functional.normalize(vec.float(), dim=-1)
                arr = vec.float().cpu().numpy()
                for r, j in enumerate(idx):
                    out_vecs[j] = arr[r]
        finally:
            self.model = saved
        width = encoder.config.hidden_size if hasattr(encoder, "config") else 0
        return np.stack(out_vecs) if out_vecs else np.zeros((0, width), np.float32)

    @staticmethod
    def _layer(out: Any, layer: int) -> Any:
        hs = out.hidden_states
        if not -len(hs) <= layer < len(hs):
            raise PredictError(f"--layer {layer} is out of range: the model has "
                               f"{len(hs)} hidden states (0 = embeddings .. {len(hs) - 1})")
        return hs[layer]
