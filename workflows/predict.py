"""Inference shared by serving (MLflow pyfunc), `bertflow predict`, `bertflow embed` and
evaluation: tokenize a DataFrame batch, run the model, decode its outputs.

A model folder is an HF-format BERT (config.json + model.safetensors + vocab.txt) plus,
for fine-tuned models, `bertflow.json` saying the task, the labels and the inference
settings (max_seq_len, QA window and decoding settings). Without it the folder is a
pretrained encoder and "predictions" are sentence embeddings.

Inputs per task (DataFrame columns) and outputs:
- seq-cls:   `text`                 -> `label`, `score`
- pair-cls:  `text_a`, `text_b`     -> `label`, `score`
- token-cls: `tokens` (list of words, or a string split on white space) -> `tags`
- qa:        `question`, `context`  -> `answer`, `start`, `end` (character span), `score`
- pretraining (no task head): `text` -> `embedding`
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bert_core.config_io import BertflowError
from data_prep.tasks import features as F

log = logging.getLogger(__name__)

META_FILE = "bertflow.json"
TASKS = ("seq-cls", "pair-cls", "token-cls", "qa")
HEADS = {"seq-cls": "BertForSequenceClassification",
         "pair-cls": "BertForSequenceClassification",
         "token-cls": "BertForTokenClassification",
         "qa": "BertForQuestionAnswering",
         "pretraining": "BertModel"}
INPUT_COLUMNS = {"seq-cls": ("text",), "pair-cls": ("text_a", "text_b"),
                 "token-cls": ("tokens",), "qa": ("question", "context"),
                 "pretraining": ("text",)}
POOLINGS = ("cls", "mean", "pooler")


class PredictError(BertflowError):
    """Inference input or model folder is unusable; the message says what to fix."""


def read_task_meta(model_dir: str | Path) -> dict[str, Any]:
    """The model folder's bertflow.json, or `{"task": "pretraining"}` when it has none."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {"task": "pretraining"}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PredictError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if meta.get("task") not in (*TASKS, "pretraining"):
        raise PredictError(f"{path}: task {meta.get('task')!r} is not one of "
                           f"{', '.join(TASKS)}, pretraining")
    return meta


def write_task_meta(model_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write bertflow.json (task, labels, inference settings, lineage) into a model folder."""
    path = Path(model_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def save_model_folder(model: Any, model_dir: str | Path, tokenizer_dir: str | Path,
                      meta: dict[str, Any]) -> Path:
    """Write a self-contained model folder: HF weights + config, the tokenizer and
    bertflow.json, i.e. everything `Predictor`, serving and `--init`/`--base` need."""
    from data_prep.tokenizer import WordPieceTokenizer

    model_dir = Path(model_dir)
    model.save_pretrained(model_dir)
    WordPieceTokenizer.from_dir(tokenizer_dir).save(model_dir)
    write_task_meta(model_dir, meta)
    return model_dir


def load_task_model(model_dir: str | Path, task: str) -> Any:
    """The bert_core model class for `task`, loaded from an HF-format folder."""
    import bert_core

    cls = getattr(bert_core, HEADS[task])
    return cls.from_pretrained(str(model_dir))


def encoder_of(model: Any) -> Any:
    """The BertModel inside a head model (or the model itself)."""
    return getattr(model, "bert", model)


# ------------------------------------------------------------------ decoding


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


# ------------------------------------------------------------------ predictor


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
        id2label = getattr(getattr(model, "config", None), "id2label", None)
        if not self.labels and id2label and self.task in ("seq-cls", "pair-cls", "token-cls"):
            self.labels = [id2label[i] for i in sorted(id2label)]  # a folder without labels
        self.max_seq_len = int(meta.get("max_seq_len", 128))
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | None = None,
                 batch_size: int = 32) -> Predictor:
        """Load model, tokenizer and bertflow.json from an HF-format model folder."""
        import torch

        from data_prep.tokenizer import WordPieceTokenizer

        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise PredictError(f"{d}: not a model folder (no config.json); pass a folder "
                               "written by bertflow or a Hugging Face-format BERT folder")
        meta = read_task_meta(d)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_task_model(d, meta["task"])
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
        need = INPUT_COLUMNS[self.task]
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
        errors = [_missing_field(row, INPUT_COLUMNS[self.task])
                  for row in df[list(INPUT_COLUMNS[self.task])].itertuples(index=False)]
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

        if self.task in ("seq-cls", "pair-cls"):
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
        pair = self.task == "pair-cls"
        a = [str(x) for x in self._column(df, "text_a" if pair else "text")]
        b = [str(x) for x in self._column(df, "text_b")] if pair else None
        rows = F.encode_classification(self.tokenizer, a, b, self.max_seq_len)
        labels: list[str] = [""] * len(a)
        scores: list[float] = [0.0] * len(a)
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

    def embed(self, texts: list[str], pooling: str = "mean", layer: int | None = None) -> np.ndarray:
        """(N, H) float32 features: the [CLS] vector, the mean over real tokens, or the
        pooler output, of the last layer or of hidden_states[layer] (0 = embeddings,
        negative counts from the end)."""
        if pooling not in POOLINGS:
            raise PredictError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and layer is not None:
            raise PredictError("--layer applies to cls or mean pooling; the pooler reads "
                               "the last layer only")
        rows = F.encode_classification(self.tokenizer, texts, None, self.max_seq_len)
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


# ------------------------------------------------------------------ batch files


def read_table_dataset(ray: Any, path: str | Path) -> Any:
    """A Ray Dataset over a CSV, TSV or JSONL input file (or a folder of them)."""
    p = Path(path)
    if not p.exists():
        raise PredictError(f"{p}: input not found; pass a CSV, TSV or JSONL file")
    suffix = (p.suffix if p.is_file() else next((f.suffix for f in sorted(p.iterdir())
                                                  if f.is_file()), "")).lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return ray.data.read_json(str(p), lines=True, file_extensions=None)
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pacsv

        opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
        return ray.data.read_csv(str(p), parse_options=opts, file_extensions=None)
    raise PredictError(f"{p}: unknown input format {suffix!r}; use .csv, .tsv or .jsonl")


class BatchPredictor:
    """Ray Data callable class: one Predictor per actor, DataFrame batches in and out
    (input columns kept, prediction columns appended, `error` always present)."""

    def __init__(self, model_dir: str, device: str | None = None, batch_size: int = 32) -> None:
        self.predictor = Predictor.from_dir(model_dir, device=device, batch_size=batch_size)

    def __call__(self, df: Any) -> Any:
        import pandas as pd

        out = self.predictor.predict(df)
        if "error" not in out.columns:
            out["error"] = pd.Series([None] * len(out), dtype=object)
        return pd.concat([df.reset_index(drop=True), out.reset_index(drop=True)], axis=1)


def write_frames(frames: Any, output: str | Path) -> int:
    """Stream DataFrames into one CSV or JSONL file that appears only when complete
    (written to a hidden temporary file, then renamed). List cells become JSON in CSV."""
    import os

    out = Path(output)
    fmt = out.suffix.lower()
    if fmt not in (".csv", ".tsv", ".jsonl", ".json"):
        raise PredictError(f"{out}: unknown output format {fmt!r}; use .csv, .tsv or .jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    rows = 0
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            for i, df in enumerate(frames):
                if fmt in (".jsonl", ".json"):
                    text = df.to_json(orient="records", lines=True, force_ascii=False)
                    f.write(text if text.endswith("\n") or not text else text + "\n")
                else:
                    df = df.copy()
                    for c in df.columns:
                        if df[c].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
                            df[c] = df[c].map(lambda v: json.dumps(list(v) if v is not None else None,
                                                                   default=float))
                    df.to_csv(f, index=False, header=i == 0, sep="\t" if fmt == ".tsv" else ",")
                rows += len(df)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


def predict_file(model: str, input_path: str | Path, output_path: str | Path, *,
                 batch_size: int = 64, concurrency: int = 1, num_cpus: float = 1.0,
                 use_gpu: bool = False, address: str | None = None,
                 tracking_uri: str | None = None) -> dict[str, Any]:
    """Batch predictions over a CSV/TSV/JSONL file with a Ray Data actor pool.

    `model` is anything `workflows.tracking.resolve_model` accepts. Output rows keep the
    input's columns and order, add the prediction columns and `error` (why a row got no
    prediction, e.g. a missing field). Returns {"rows", "errors", "output", "task"}.
    """
    from data_prep.ray_env import init_ray
    from workflows.tracking import resolve_model

    model_dir = resolve_model(model, tracking_uri=tracking_uri)
    task = read_task_meta(model_dir)["task"]
    ray = init_ray(address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows in input order
    ds = read_table_dataset(ray, input_path)
    ds = ds.map_batches(BatchPredictor, fn_constructor_args=(str(model_dir),),
                        fn_constructor_kwargs={"batch_size": 32}, batch_format="pandas",
                        batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                        num_cpus=num_cpus if not use_gpu else None, num_gpus=1 if use_gpu else None)
    errors = 0

    def frames():
        nonlocal errors
        for df in ds.iter_batches(batch_format="pandas", batch_size=None):
            errors += int(df["error"].notna().sum())
            yield df

    rows = write_frames(frames(), output_path)
    if errors:
        log.warning("%d of %d rows had no prediction (see the error column of %s)", errors,
                    rows, output_path)
    return {"rows": rows, "errors": errors, "output": str(output_path), "task": task}
