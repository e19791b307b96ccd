"""Batch inference over files on a Ray Data actor pool: `bertflow predict` and
`bertflow embed`.

`predict_file(PredictConfig)` reads CSV, TSV or JSONL, runs one `Predictor` per actor and
writes CSV/TSV/JSONL rows that keep the input's columns and order, add the prediction
columns and `error` (why a row got no prediction). `embed_file(EmbedConfig)` adds an
`embedding` column (list<float32>): the [CLS] vector, the mean of the real tokens'
vectors, or the pooler output, of the last layer or of `hidden_states[layer]`, and writes
one Parquet file. Output files appear only when complete.

Locations: `--input` and `--output` may be URIs (s3://..., anything pyarrow.fs resolves):
the input is fetched to the driver, which reads it (bad rows counted) and hands the rows
to Ray through the object store; the output is written on the driver and published whole
(workflows.transfer.staged_output: a temporary object, then a move onto the name). The
model is resolved on the driver and shipped to the actors through the object store
(workflows.tracking.resolved_model + workflows.transfer.ship_folder): an actor on another
node never opens a driver path and needs no MLflow access.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.ray_env import map_with_actor_pool
from workflows.config import EmbedConfig, FileInference, PredictConfig
from workflows.serving.predictor import PredictError, Predictor

log = logging.getLogger(__name__)


def replica_cpus(ray: Any, replicas: int, num_cpus: float | None) -> float:
    """CPUs each of `replicas` model replicas asks Ray for: `num_cpus`, else the cluster's
    free CPUs shared among them, at most one node's and at least one.

    A replica runs torch on as many threads as it was granted CPUs (`granted_threads`):
    one CPU per replica left a 2-core machine half idle behind one actor, while
    SentenceTransformer.encode used both cores."""
    if num_cpus is not None:
        return float(num_cpus)
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    free = float(ray.available_resources().get("CPU", 0))
    if not cpus:
        return 1.0
    return max(1.0, min(max(cpus), float(int(free // max(1, replicas)))))


def replica_resources(ray: Any, cfg: FileInference) -> dict[str, Any]:
    """map_batches' num_cpus / num_gpus of one replica of a predict or embed run."""
    if cfg.use_gpu:
        return {"num_cpus": cfg.num_cpus or 1.0, "num_gpus": 1}
    return {"num_cpus": replica_cpus(ray, cfg.concurrency, cfg.num_cpus)}


def granted_threads() -> int:
    """torch threads for this Ray actor: the CPUs Ray granted it (0.5 CPUs: one thread).
    Set explicitly, since a worker process may have been started for another task."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


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
    (input columns kept, prediction columns appended, `error` always present). An input
    column named like a prediction column (a gold `label`, an earlier `score`) is kept as
    `input_<name>`, so both survive and the prediction keeps its documented name."""

    def __init__(self, model_dir: Any, device: str | None = None, batch_size: int = 32,
                 columns: dict[str, str] | None = None) -> None:
        from workflows.transfer import local_folder

        self.predictor = Predictor.from_dir(local_folder(model_dir), device=device,
                                            batch_size=batch_size, threads=granted_threads())
        # {the predictor's column: the input's column} (--text-column, --text-pair-column)
        self.columns = {k: v for k, v in (columns or {}).items() if k != v}

    def __call__(self, df: Any) -> Any:
        import pandas as pd

        view = df
        if self.columns:  # the predictor reads its own names; the output keeps the input's
            view = df.copy()
            for name, column in self.columns.items():
                if column not in df.columns:
                    raise PredictError(f"input has no column {column!r} (columns: "
                                       f"{', '.join(map(str, df.columns))})")
                view[name] = df[column]
        out = self.predictor.predict(view)
        if "error" not in out.columns:
            out["error"] = pd.Series([None] * len(out), dtype=object)
        return join_predictions(df, out)


def join_predictions(df: Any, out: Any) -> Any:
    """Input columns then prediction columns; clashing input names become `input_<name>`."""
    import pandas as pd

    clash = {c: f"input_{c}" for c in df.columns if c in out.columns}
    return pd.concat([df.rename(columns=clash).reset_index(drop=True),
                      out.reset_index(drop=True)], axis=1)


def output_format(output: str | Path) -> str:
    """The format of an output file by its suffix (.csv, .tsv, .jsonl/.json)."""
    fmt = Path(str(output)).suffix.lower()
    if fmt not in (".csv", ".tsv", ".jsonl", ".json"):
        raise PredictError(f"{output}: unknown output format {fmt!r}; use .csv, .tsv or .jsonl")
    return fmt


def write_frames(frames: Any, output: str | Path) -> int:
    """Stream DataFrames into one CSV or JSONL file (a path or a URI) that appears only
    when complete (workflows.transfer.staged_output). List cells become JSON in CSV."""
    from workflows.transfer import staged_output

    fmt = output_format(output)
    rows = 0
    with staged_output(output) as tmp:
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
    return rows


def predict_file(cfg: PredictConfig) -> dict[str, Any]:
    """Batch predictions over a CSV/TSV/JSONL file with a Ray Data actor pool.

    `cfg.model` is anything `workflows.tracking.resolve_model` accepts. Output rows keep the
    input's columns and order, add the prediction columns and `error` (why a row got no
    prediction, e.g. a missing field). Returns {"rows", "errors", "output", "task"}.
    """
    from data_prep.ray_env import init_ray
    from workflows.model_folder import read_task_meta
    from workflows.transfer import local_file, ship_model_folder

    output_format(cfg.output)
    check_locations(cfg)
    ray = init_ray(cfg.address)
    with _resolved(cfg) as model_dir:
        meta = read_task_meta(model_dir)
        task = meta["task"]
        model = ship_model_folder(model_dir, origin=cfg.model)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows in input order
    with local_file(cfg.input, "--input") as path:
        ds = read_table_dataset(ray, path)
    ds = map_with_actor_pool(ds, BatchPredictor, cfg.concurrency, fn_constructor_args=(model,),
                             fn_constructor_kwargs={
                                 "batch_size": cfg.micro_batch,
                                 "columns": cfg.input_columns(task, meta.get("inputs"))},
                             batch_format="pandas", batch_size=cfg.batch_size,
                             **replica_resources(ray, cfg))
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

    def __init__(self, model_dir: Any, pooling: str, layer: int | None, text_column: str,
                 normalize: bool = False, max_seq_len: int | None = None,
                 batch_size: int = 32) -> None:
        from workflows.transfer import local_folder

        self.predictor = Predictor.from_dir(local_folder(model_dir), batch_size=batch_size,
                                            threads=granted_threads())
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
    """Embed every row's `cfg.text_column` (default text); returns {"rows", "dim", "output"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.ray_env import init_ray
    from workflows.transfer import local_file, ship_model_folder, staged_output

    out = cfg.output
    check_locations(cfg)
    ray = init_ray(cfg.address)
    with _resolved(cfg) as model_dir:
        pooling, max_seq_len, normalize = embed_settings(cfg, model_dir)
        model = ship_model_folder(model_dir, origin=cfg.model)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    with local_file(cfg.input, "--input") as path:
        ds = read_table_dataset(ray, path)
    ds = map_with_actor_pool(
        ds, BatchEmbedder, cfg.concurrency,
        fn_constructor_args=(model, pooling, cfg.layer, cfg.text_column or "text", normalize,
                             max_seq_len),
        fn_constructor_kwargs={"batch_size": cfg.micro_batch},
        batch_format="pandas", batch_size=cfg.batch_size,
        **replica_resources(ray, cfg))
    rows, dim, writer = 0, 0, None
    with staged_output(out) as tmp:
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
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # empty input: still an (empty) file with the embedding column
            pq.write_table(pa.table({"embedding": pa.array([], pa.list_(pa.float32()))}), tmp)
    log.info("wrote %d embeddings of dimension %d to %s", rows, dim, out)
    return {"rows": rows, "dim": dim, "output": str(out), "pooling": pooling,
            "layer": cfg.layer, "max_seq_len": max_seq_len, "normalize": normalize}


def check_locations(cfg: Any) -> None:
    """Before any Ray work: the MLflow server answers (for a models:/ reference), the
    input exists and the output's store is usable, each error naming its location."""
    from workflows import tracking as T
    from workflows.transfer import open_checked

    if T.parse_model_ref(cfg.model) is not None:
        uri = T.resolve_tracking_uri(cfg.tracking_uri)
        T.check_tracking_store(uri)
        T.get_model_version(cfg.model, uri)
    else:  # a hostile or broken folder fails here, naming it, not in a Ray actor
        from workflows.transfer import check_model_ref

        check_model_ref(cfg.model)
    if "://" in cfg.input:  # local files keep the readers' own messages
        open_checked(cfg.input, "--input", must_exist=True)
    if "://" in cfg.output:
        open_checked(cfg.output, "--output", writable=True)


@contextlib.contextmanager
def _resolved(cfg: Any) -> Iterator[Path]:
    from workflows.tracking import resolved_model

    with resolved_model(cfg.model, cfg.tracking_uri) as model_dir:
        yield model_dir


def embed_settings(cfg: EmbedConfig, model_dir: Path) -> tuple[str, int | None, bool]:
    """(pooling, max_seq_len, normalize): the flags, else the folder's sentence-transformers
    settings, else mean pooling, the folder's max_seq_len and no normalisation."""
    s = folder_embed_settings(model_dir, cfg.pooling, cfg.max_seq_len, cfg.normalize)
    return s.pooling, s.max_seq_len, bool(s.normalize)


def folder_embed_settings(model_dir: Path, pooling: str | None = None,
                          max_seq_len: int | None = None,
                          normalize: bool | None = None) -> Any:
    """The EmbedSettings `bertflow embed` (and `bertflow serve`'s /embed) uses for a folder:
    the given values, else the folder's sentence-transformers settings, else mean pooling,
    the folder's max_seq_len (None) and no normalisation."""
    from workflows.serving.st_settings import EmbedSettings, read_embed_settings

    folder = read_embed_settings(model_dir)
    pooling = pooling or folder.pooling or "mean"
    max_seq_len = max_seq_len or folder.max_seq_len
    normalize = normalize if normalize is not None else bool(folder.normalize)
    if folder.source:
        log.info("embedding as %s says: pooling %s, max_seq_len %s, normalize %s "
                 "(flags override)", folder.source, pooling, max_seq_len, normalize)
    return EmbedSettings(pooling, max_seq_len, normalize, folder.source)
