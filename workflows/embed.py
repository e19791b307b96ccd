"""`bertflow embed`: features of texts from any BERT, written to one Parquet file.

Each output row keeps the input's columns and adds `embedding` (list<float32>): the
[CLS] vector, the mean of the real tokens' vectors, or the pooler output, of the last
layer or of `hidden_states[layer]` (0 = embeddings, negative counts from the end). The
work runs on a Ray Data actor pool (one model per actor) over CSV, TSV or JSONL input
with a `text` column; the file appears only when complete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from workflows.predict import POOLINGS, PredictError, Predictor, read_table_dataset

log = logging.getLogger(__name__)


class BatchEmbedder:
    """Ray Data callable class: DataFrame batches of texts in, `embedding` column added."""

    def __init__(self, model_dir: str, pooling: str, layer: int | None, text_column: str) -> None:
        self.predictor = Predictor.from_dir(model_dir)
        self.pooling, self.layer, self.text_column = pooling, layer, text_column

    def __call__(self, df: Any) -> Any:
        if self.text_column not in df.columns:
            raise PredictError(f"input has no column {self.text_column!r} (columns: "
                               f"{', '.join(map(str, df.columns))})")
        texts = ["" if v is None or v != v else str(v) for v in df[self.text_column]]
        vecs = self.predictor.embed(texts, pooling=self.pooling, layer=self.layer)
        df = df.reset_index(drop=True).copy()
        df["embedding"] = list(vecs.astype("float32"))
        return df


def embed_file(model: str, input_path: str | Path, output_path: str | Path, *,
               pooling: str = "mean", layer: int | None = None, text_column: str = "text",
               batch_size: int = 64, concurrency: int = 1, address: str | None = None,
               tracking_uri: str | None = None) -> dict[str, Any]:
    """Embed every row's `text_column`; returns {"rows", "dim", "output"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.ray_env import init_ray
    from workflows.tracking import resolve_model

    if pooling not in POOLINGS:
        raise PredictError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling == "pooler" and layer is not None:
        raise PredictError("--layer applies to cls or mean pooling; the pooler reads the last layer")
    out = Path(output_path)
    if out.suffix.lower() != ".parquet":
        raise PredictError(f"{out}: embeddings are written as Parquet; name it FILE.parquet")
    model_dir = resolve_model(model, tracking_uri=tracking_uri)
    ray = init_ray(address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = read_table_dataset(ray, input_path).map_batches(
        BatchEmbedder, fn_constructor_args=(str(model_dir), pooling, layer, text_column),
        batch_format="pandas", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency))
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
    return {"rows": rows, "dim": dim, "output": str(out), "pooling": pooling, "layer": layer}
