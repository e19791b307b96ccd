"""Batch inference over files, in this process or on a Ray Data actor pool: `bertflow
predict` and `bertflow embed`.

`predict_file(PredictConfig)` reads CSV, TSV or JSONL, runs one `Predictor` per replica and
writes CSV/TSV/JSONL rows that keep the input's columns and order, add the prediction
columns and `error` (why a row got no prediction). `embed_file(EmbedConfig)` adds an
`embedding` column (list<float32>): the [CLS] vector, the mean of the real tokens'
vectors, or the pooler output, of the last layer or of `hidden_states[layer]`, and writes
one Parquet file. Output files appear only when complete.

Engines (`--engine`, `choose_engine`): `ray` maps the rows through a Ray Data actor pool
(a cluster, several replicas, a GPU each); `local` runs the same replica class over the
same batches in this process, without Ray (one machine, one replica), so a run pays
neither Ray's start nor an actor's start, the model's trip through the object store and
Ray Data's hand-offs. The input is read whole on the driver by either engine, so its size
does not change the choice. Both hand the replica the same batches (`batch_size` rows of
the input in order) on as many torch threads, and write the same bytes.

Locations: `--input` and `--output` may be URIs (s3://..., anything pyarrow.fs resolves):
the input is fetched to the driver, which reads it (bad rows counted) and, on the Ray
engine, hands the rows to Ray through the object store; the output is written on the
driver and published whole (workflows.transfer.staged_output: a temporary object, then a
move onto the name). The model is resolved on the driver; the Ray engine ships it to the
actors through the object store (workflows.tracking.resolved_model +
workflows.transfer.ship_folder): an actor on another node never opens a driver path and
needs no MLflow access. The local engine loads it once, from the resolved folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.ray_env import usable_cpus

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


def read_table_rows(path: str | Path) -> tuple[Any, int]:
    """(the rows of a CSV, TSV or JSONL input file, or of a folder of them, as a
    DataFrame; how many were skipped), read by data_prep's task reader: unreadable rows
    are skipped, counted and logged by line (both engines' skip accounting)."""
    from data_prep.tasks.readers import read_table_frame

    df, report = read_table_frame(path)
    if report.total:
        log.warning("%s: skipped %d unreadable row(s): %s (first: %s)", path, report.total,
                    dict(report.counts), report.messages[0])
    return df, report.total


def read_table_dataset(ray: Any, path: str | Path) -> Any:
    """A Ray Dataset over the rows `read_table_rows(path)` reads."""
    return ray.data.from_pandas(read_table_rows(path)[0])


def choose_engine(cfg: FileInference) -> str:
    """`cfg.engine`, or for auto: ray when a cluster is named (--address), several
    replicas are asked for, or Ray already runs in this process (a test's shared Ray, a
    driver that started it: its resources are the ones to use), else local. A job sent
    with `bertflow submit` gets --address auto, so it runs on the cluster's actors."""
    if cfg.engine != "auto":
        return cfg.engine
    ray = sys.modules.get("ray")  # not imported: not running either (and no import paid)
    running = ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()
    return "ray" if cfg.address is not None or cfg.concurrency > 1 or running else "local"


class RayEngine:
    """Replicas as a Ray Data actor pool (`cfg.concurrency` actors): the model folder goes
    through the object store, rows in `cfg.batch_size` batches, output in input order."""

    name = "ray"

    def __init__(self, cfg: FileInference) -> None:
        from data_prep.ray_env import init_ray

        self.cfg = cfg
        self.ray = init_ray(cfg.address)
        self.ray.data.DataContext.get_current().execution_options.preserve_order = True

    def load(self, replica: type, model_dir: Path, origin: str, *args: Any,
             **kwargs: Any) -> Any:
        """The replica class with its constructor arguments, the folder shipped."""
        from workflows.transfer import ship_model_folder

        return replica, (ship_model_folder(model_dir, origin=origin), *args), kwargs

    def map(self, loaded: Any, rows: Any) -> Iterator[Any]:
        replica, args, kwargs = loaded
        ds = map_with_actor_pool(self.ray.data.from_pandas(rows), replica, self.cfg.concurrency,
                                 fn_constructor_args=args, fn_constructor_kwargs=kwargs,
                                 batch_format="pandas", batch_size=self.cfg.batch_size,
                                 **replica_resources(self.ray, self.cfg))
        return (plain_objects(df) for df in ds.iter_batches(batch_format="pandas",
                                                            batch_size=None))


def plain_objects(df: Any) -> Any:
    """`df` with Ray Data's pickled-object columns as plain object columns. Ray stores a
    column Arrow cannot type (token-cls `tokens` holding lists and strings) as pickled
    Python objects, which come back in pandas as Ray's own extension dtype: its
    positional take fails (`df.iloc[rows]`) and pandas' to_json crashed on it."""
    import pandas as pd

    odd = [c for c in df.columns if type(df[c].dtype).__module__.startswith("ray.")]
    if not odd:
        return df
    df = df.copy()
    for c in odd:
        df[c] = pd.Series(list(df[c]), index=df.index, dtype=object)
    return df


class LocalEngine:
    """One replica in this process: the same class, batches and torch threads as one Ray
    actor on this machine would get (--num-cpus, else the CPUs this process may use)."""

    name = "local"

    def __init__(self, cfg: FileInference) -> None:
        self.cfg = cfg
        self.threads = max(1, int(cfg.num_cpus if cfg.num_cpus is not None else usable_cpus()))
        self.device = "cuda" if cfg.use_gpu else "cpu"
        if cfg.use_gpu:
            import torch

            if not torch.cuda.is_available():
                raise PredictError("--use-gpu: this machine has no CUDA device torch can use")

    def load(self, replica: type, model_dir: Path, origin: str, *args: Any,
             **kwargs: Any) -> Any:
        """The replica, loaded from the resolved folder after the driver's folder check
        (the Ray engine's, so a bad folder fails with the same message)."""
        from workflows.transfer import check_model_folder

        check_model_folder(model_dir, origin)
        return replica(model_dir, *args, device=self.device, threads=self.threads, **kwargs)

    def map(self, loaded: Any, rows: Any) -> Iterator[Any]:
        size = self.cfg.batch_size
        for start in range(0, len(rows), size):
            yield loaded(rows.iloc[start:start + size].reset_index(drop=True))


@contextlib.contextmanager
def inference_engine(cfg: FileInference) -> Iterator[RayEngine | LocalEngine]:
    """The engine `choose_engine` picks; the local one's torch threads are this process's
    for the run and restored after (a library call leaves the caller's setting alone)."""
    engine = choose_engine(cfg)
    log.info("%s engine", engine)
    if engine == "ray":
        yield RayEngine(cfg)
        return
    import torch

    before = torch.get_num_threads()
    try:
        yield LocalEngine(cfg)
    finally:
        torch.set_num_threads(before)


class BatchPredictor:
    """Ray Data callable class: one Predictor per actor, DataFrame batches in and out
    (input columns kept, prediction columns appended, `error` always present). An input
    column named like a prediction column (a gold `label`, an earlier `score`) is kept as
    `input_<name>`, so both survive and the prediction keeps its documented name."""

    def __init__(self, model_dir: Any, device: str | None = None, batch_size: int = 32,
                 columns: dict[str, str] | None = None, threads: int | None = None) -> None:
        from workflows.transfer import local_folder

        self.predictor = Predictor.from_dir(
            local_folder(model_dir), device=device, batch_size=batch_size,
            threads=threads if threads is not None else granted_threads())
        # {the predictor's column: the input's column} (--text-column, --text-pair-column)
        self.columns = {k: v for k, v in (columns or {}).items() if k != v}

    def __call__(self, df: Any) -> Any:
        import pandas as pd

        df = plain_objects(df)
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
    """Batch predictions over a CSV/TSV/JSONL file, in this process or with a Ray Data
    actor pool (`choose_engine`).

    `cfg.model` is anything `workflows.tracking.resolve_model` accepts. Output rows keep the
    input's columns and order, add the prediction columns and `error` (why a row got no
    prediction, e.g. a missing field). Returns {"rows", "errors", "output", "task",
    "engine", "skipped"} (skipped: unreadable input rows, left out).
    """
    from workflows.model_folder import read_task_meta
    from workflows.transfer import local_file

    output_format(cfg.output)
    check_locations(cfg)
    with inference_engine(cfg) as engine:
        with _resolved(cfg) as model_dir:
            meta = read_task_meta(model_dir)
            task = meta["task"]
            model = engine.load(BatchPredictor, model_dir, cfg.model,
                                batch_size=cfg.micro_batch,
                                columns=cfg.input_columns(task, meta.get("inputs")))
        with local_file(cfg.input, "--input") as path:
            table, skipped = read_table_rows(path)
        errors = 0

        def frames():
            nonlocal errors
            for df in engine.map(model, table):
                errors += int(df["error"].notna().sum())
                yield df

        rows = write_frames(frames(), cfg.output)
    if errors:
        log.warning("%d of %d rows had no prediction (see the error column of %s)", errors,
                    rows, cfg.output)
    return {"rows": rows, "errors": errors, "output": str(cfg.output), "task": task,
            "engine": engine.name, "skipped": skipped}


class BatchEmbedder:
    """Ray Data callable class: DataFrame batches of texts in, `embedding` column added."""

    def __init__(self, model_dir: Any, pooling: str, layer: int | None, text_column: str,
                 normalize: bool = False, max_seq_len: int | None = None,
                 batch_size: int = 32, device: str | None = None,
                 threads: int | None = None) -> None:
        from workflows.transfer import local_folder

        self.predictor = Predictor.from_dir(
            local_folder(model_dir), device=device, batch_size=batch_size,
            threads=threads if threads is not None else granted_threads())
        self.pooling, self.layer, self.text_column = pooling, layer, text_column
        self.normalize, self.max_seq_len = normalize, max_seq_len

    def __call__(self, df: Any) -> Any:
        df = plain_objects(df)
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
    """Embed every row's `cfg.text_column` (default text), in this process or with a Ray
    Data actor pool (`choose_engine`); returns {"rows", "dim", "output", "engine", ...}."""
    from workflows.transfer import local_file

    out = cfg.output
    check_locations(cfg)
    with inference_engine(cfg) as engine:
        with _resolved(cfg) as model_dir:
            pooling, max_seq_len, normalize = embed_settings(cfg, model_dir)
            model = engine.load(BatchEmbedder, model_dir, cfg.model, pooling, cfg.layer,
                                cfg.text_column or "text", normalize, max_seq_len,
                                batch_size=cfg.micro_batch)
        with local_file(cfg.input, "--input") as path:
            table, skipped = read_table_rows(path)
        rows, dim = write_embeddings(engine.map(model, table), out)
    log.info("wrote %d embeddings of dimension %d to %s", rows, dim, out)
    return {"rows": rows, "dim": dim, "output": str(out), "pooling": pooling,
            "layer": cfg.layer, "max_seq_len": max_seq_len, "normalize": normalize,
            "engine": engine.name, "skipped": skipped}


def write_embeddings(frames: Any, out: str | Path, row_group: int = 65_536) -> tuple[int, int]:
    """Stream DataFrames with an `embedding` column into one Parquet file (a path or a
    URI) that appears only when complete; returns (rows, dimension). Row groups hold
    `row_group` rows whatever the frames' sizes (Ray Data merges or splits its blocks as
    it likes), so the file's bytes depend on the rows only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.transfer import staged_output

    rows, dim, writer, pending = 0, 0, None, []

    def flush(final: bool) -> list:
        table = pa.concat_tables(pending).combine_chunks()
        full = len(table) if final else len(table) // row_group * row_group
        for start in range(0, full, row_group):
            writer.write_table(table.slice(start, min(row_group, full - start)))
        return [table.slice(full)] if full < len(table) else []

    with staged_output(out) as tmp:
        try:
            for df in frames:
                vecs = df.pop("embedding")
                dim = len(vecs.iloc[0]) if len(vecs) else dim
                # Without pandas' schema metadata: it records how the frame was backed
                # (numpy, or Arrow after Ray Data's hand-offs), not the data, and the
                # engines write the same bytes.
                table = pa.Table.from_pandas(df, preserve_index=False).append_column(
                    "embedding", float32_lists(vecs, dim)).replace_schema_metadata(None)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                pending.append(table.cast(writer.schema))
                rows += len(df)
                if sum(map(len, pending)) >= row_group:
                    pending = flush(final=False)
            if pending:
                flush(final=True)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # empty input: still an (empty) file with the embedding column
            pq.write_table(pa.table({"embedding": pa.array([], pa.list_(pa.float32()))}), tmp)
    return rows, dim


def float32_lists(vectors: Any, dim: int) -> Any:
    """A list<float32> Arrow array of equally long vectors, built from one flat buffer
    (a Python list per row cost 0.26 s per 1,024 vectors of 384)."""
    import pyarrow as pa

    flat = (np.stack(list(vectors)).astype(np.float32, copy=False).ravel() if len(vectors)
            else np.zeros(0, np.float32))
    offsets = np.arange(0, len(vectors) * dim + 1, dim, dtype=np.int32) if dim else \
        np.zeros(len(vectors) + 1, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


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
