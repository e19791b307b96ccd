"""Batch inference over files on a Ray Data actor pool: `bertflow predict` and
`bertflow embed`.

`predict_file(PredictConfig)` reads CSV, TSV or JSONL, runs one `Predictor` per actor and
writes CSV/TSV/JSONL rows that keep the input's columns and order, add the prediction
columns and `error` (why a row got no prediction). `embed_file(EmbedConfig)` adds an
`embedding` column (list<float32>): the [CLS] vector, the mean of the real tokens'
vectors, or the pooler output, of the last layer or of `hidden_states[layer]`, and writes
one Parquet file. Output files appear only when complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from workflows.config import EmbedConfig, PredictConfig
from workflows.serving.predictor import PredictError, Predictor

log = logging.getLogger(__name__)


def read_table_dataset(ray: Any, path: str | Path) -> Any:
    """A Ray Dataset over a CSV, TSV or JSONL input file (or a folder of them), read by
    data_prep's task reader: unreadable rows are skipped, counted and logged by line."""
    from data_prep.tasks.readers import read_table_frame

    df, report = read_table_frame(path)
    if report.total:
        log.warning("%s: skipped %d unreadable row(s): %s (first: %s)", path, report.total,
                    dict(report.counts), report.messages[0])
    return ray.data.from_pandas(df)


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


def predict_file(cfg: PredictConfig) -> dict[str, Any]:
    """Batch predictions over a CSV/TSV/JSONL file with a Ray Data actor pool.

    `cfg.model` is anything `workflows.tracking.resolve_model` accepts. Output rows keep the
    input's columns and order, add the prediction columns and `error` (why a row got no
    prediction, e.g. a missing field). Returns {"rows", "errors", "output", "task"}.
    """
    from data_prep.ray_env import init_ray
    from workflows.model_folder import read_task_meta
    from workflows.tracking import resolve_model

    model_dir = resolve_model(cfg.model, tracking_uri=cfg.tracking_uri)
    task = read_task_meta(model_dir)["task"]
    ray = init_ray(cfg.address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows in input order
    ds = read_table_dataset(ray, cfg.input)
    ds = ds.map_batches(BatchPredictor, fn_constructor_args=(str(model_dir),),
                        fn_constructor_kwargs={"batch_size": 32}, batch_format="pandas",
                        batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                        num_cpus=cfg.num_cpus if not cfg.use_gpu else None,
                        num_gpus=1 if cfg.use_gpu else None)
    errors = 0

    def frames():
        nonlocal errors
        for df in ds.iter_batches(batch_format="pandas", batch_size=None):
            errors += int(df["error"].notna().sum())
            yield df

    rows = write_frames(frames(), cfg.output)
    if errors:
        log.warning("%d of %d rows had no prediction (see the error column of %s)", errors,
                    rows, cfg.output)
    return {"rows": rows, "errors": errors, "output": str(cfg.output), "task": task}


class BatchEmbedder:
    """Ray Data callable class: DataFrame batches of texts in, `embedding` column added."""

    def __init__(self, model_dir: str, pooling: str, layer: int | None, text_column: str,
                 normalize: bool = False, max_seq_len: int | None = None) -> None:
        self.predictor = Predictor.from_dir(model_dir)
        self.pooling, self.layer, self.text_column = pooling, layer, text_column
        self.normalize, self.max_seq_len = normalize, max_seq_len

    def __call__(self, df: Any) -> Any:
        if self.text_column not in df.columns:
            raise PredictError(f"input has no column {self.text_column!r} (columns: "
                               f"{', '.join(map(str, df.columns))})")
        texts = ["" if v is None or v != v else str(v) for v in df[self.text_column]]
        vecs = self.predictor.embed(texts, pooling=self.pooling, layer=self.layer,
                                    normalize=self.normalize, max_seq_len=self.max_seq_len)
        df = df.reset_index(drop=True).copy()
        df["embedding"] = list(vecs.astype("float32"))
        return df


def embed_file(cfg: EmbedConfig) -> dict[str, Any]:
    """Embed every row's `cfg.text_column`; returns {"rows", "dim", "output"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.ray_env import init_ray
    from workflows.tracking import resolve_model

    out = Path(cfg.output)
    model_dir = resolve_model(cfg.model, tracking_uri=cfg.tracking_uri)
    pooling, max_seq_len, normalize = embed_settings(cfg, model_dir)
    ray = init_ray(cfg.address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = read_table_dataset(ray, cfg.input).map_batches(
        BatchEmbedder,
        fn_constructor_args=(str(model_dir), pooling, cfg.layer, cfg.text_column, normalize,
                             max_seq_len),
        batch_format="pandas", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    rows, dim, writer = 0, 0, None
    try:
        for df in ds.iter_batches(batch_format="pandas", batch_size=None):
            vecs = df.pop("embedding")
            dim = len(vecs.iloc[0]) if len(vecs) else dim
            table = pa.Table.from_pandas(df, preserve_index=False).append_column(
                "embedding", pa.array([list(v) for v in vecs], type=pa.list_(pa.float32())))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += len(df)
        if writer is not None:
            writer.close()
            writer = None
        else:  # empty input: still an (empty) file with the embedding column
            pq.write_table(pa.table({"embedding": pa.array([], pa.list_(pa.float32()))}), tmp)
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %d embeddings of dimension %d to %s", rows, dim, out)
    return {"rows": rows, "dim": dim, "output": str(out), "pooling": pooling,
            "layer": cfg.layer, "max_seq_len": max_seq_len, "normalize": normalize}


def embed_settings(cfg: EmbedConfig, model_dir: Path) -> tuple[str, int | None, bool]:
    """(pooling, max_seq_len, normalize): the flags, else the folder's sentence-transformers
    settings, else mean pooling, the folder's max_seq_len and no normalisation."""
    from workflows.serving.st_settings import read_embed_settings

    folder = read_embed_settings(model_dir)
    pooling = cfg.pooling or folder.pooling or "mean"
    max_seq_len = cfg.max_seq_len or folder.max_seq_len
    normalize = cfg.normalize if cfg.normalize is not None else bool(folder.normalize)
    if folder.source:
        log.info("embedding as %s says: pooling %s, max_seq_len %s, normalize %s "
                 "(flags override)", folder.source, pooling, max_seq_len, normalize)
    return pooling, max_seq_len, normalize
