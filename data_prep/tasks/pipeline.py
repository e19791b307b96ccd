"""Tokenized fine-tuning datasets: Parquet + manifest, atomic and idempotent.

`build_task_dataset` reads one task file on the driver (validation is sequential and
cheap next to tokenization: every record is either used or skipped with a reason), fixes
the label ids, then tokenizes the records: in the driver's process for files of up to
`LOCAL_FEATURIZE_MAX_RECORDS` records (a Ray Data pass costs a worker's start-up and the
pass's scheduling, seconds next to the milliseconds such a file's tokenizing takes), on
Ray Data beyond (a callable class holds the tokenizer per worker; the tokenizer travels
pickled, so no worker opens a driver path). Both write the same rows, in the same order,
and the driver writes the features as Parquet into a hidden folder renamed into place
with its manifest (the folder is the driver's cache; training reads it back on the driver
and hands the rows to Ray through the object store). The folder name carries the fingerprint of (task settings, labels, input
file, tokenizer), so the same inputs reuse the same folder ("up to date") and anything
that changes the features gets a new one.

Rows are shuffled once with the seed before writing, so a file sorted by label still
trains well when read in order.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from data_prep.manifest import (Manifest, atomic_output_dir, build_fingerprint,
                                fingerprint_file, is_up_to_date)
from data_prep.ray_env import map_with_actor_pool
from data_prep.tasks import features as F
from data_prep.tasks.readers import (SkipReport, TaskDataError, read_classification,
                                     read_conll, read_regression, read_squad)

log = logging.getLogger(__name__)

TEXT_FIELDS = {"seq-cls": ("text",), "pair-cls": ("text_a", "text_b")}
# A regression scores one text, or a pair when its columns name a second text (`text_b`).
REGRESSION_FIELDS = {False: ("text",), True: ("text_a", "text_b")}
# Files of up to this many records are tokenized in the driver's process (the same
# Featurizer, batch by batch): a GLUE dev set or a user's few thousand rows takes well
# under a second there, where a Ray Data pass takes seconds to start. Larger ones go to
# Ray Data, off the driver's CPU.
LOCAL_FEATURIZE_MAX_RECORDS = 50_000
FEATURIZE_BATCH = 256


def text_fields(task: str, columns: dict[str, str] | None = None) -> tuple[str, ...]:
    """The record keys holding a classification or regression task's texts."""
    if task == "regression":
        return REGRESSION_FIELDS["text_b" in (columns or {})]
    return TEXT_FIELDS[task]


@dataclasses.dataclass(frozen=True)
class TaskFeatures:
    """The settings that decide a task dataset's features (a slice of FinetuneConfig)."""

    task: str
    max_seq_len: int = 128
    doc_stride: int = 128
    max_query_len: int = 64


@dataclasses.dataclass
class TaskDataset:
    """A built (or reused) task dataset: its folder, manifest, labels and records."""

    path: Path
    manifest: Manifest
    labels: list[str]
    records: list[dict]
    report: SkipReport
    reused: bool

    @property
    def parquet_dir(self) -> Path:
        return self.path / "data"


def read_task_file(path: str | Path, task: str, labels: list[str] | None = None,
                   columns: dict[str, str] | None = None) -> tuple[list[dict], SkipReport]:
    """Read a task file; with `labels`, records whose label is unknown are skipped.
    `columns` ({"text": "review", "label": "stars"}) names a classification file's columns."""
    if task in TEXT_FIELDS:
        return read_classification(path, TEXT_FIELDS[task], labels=labels, columns=columns)
    if task == "regression":
        return read_regression(path, text_fields(task, columns), columns=columns)
    if task == "token-cls":
        return read_conll(path, tags=labels)
    if task == "qa":
        return read_squad(path)
    raise TaskDataError(f"unknown task {task!r}")


def label_list(records: list[dict], task: str) -> list[str]:
    """Sorted label names of `records` ("O" first for tags, then B-/I- by type)."""
    if task in ("qa", "regression"):
        return []
    if task == "token-cls":
        tags = {t for r in records for t in r["tags"]}
        types = sorted({t[2:] for t in tags if t != "O"})
        full = ["O"] + [f"{p}-{k}" for k in types for p in ("B", "I")]
        return full + sorted(tags - set(full))
    return sorted({r["label"] for r in records})


def featurize(records: list[dict], tokenizer: Any, spec: TaskFeatures,
              label_ids: dict[str, int]) -> dict[str, list]:
    """Feature columns of a batch of records (the Parquet schema of a task dataset)."""
    n = spec.max_seq_len
    if spec.task in TEXT_FIELDS or spec.task == "regression":
        fields = TEXT_FIELDS.get(spec.task) or REGRESSION_FIELDS[bool(records) and
                                                                 "text_b" in records[0]]
        cols = F.encode_classification(tokenizer, [r[fields[0]] for r in records],
                                       [r[fields[1]] for r in records] if len(fields) > 1 else None, n)
        cols["labels"] = ([float(r["label"]) for r in records] if spec.task == "regression"
                          else [label_ids[r["label"]] for r in records])
    elif spec.task == "token-cls":
        pieces = F.word_pieces(tokenizer, [r["tokens"] for r in records])
        cols = F.encode_words(tokenizer, pieces,
                              [[label_ids[t] for t in r["tags"]] for r in records], n)
    else:
        spans = []
        for r in records:
            a = r["answers"][0] if r["answers"] and not r["is_impossible"] else None
            spans.append((a["answer_start"], a["answer_start"] + len(a["text"])) if a else None)
        cols = F.encode_qa(tokenizer, [r["question"] for r in records],
                           [r["context"] for r in records], max_seq_len=n,
                           doc_stride=spec.doc_stride, max_query_len=spec.max_query_len,
                           answer_spans=spans, example_ids=[r["example_index"] for r in records])
    if spec.task != "qa":
        cols["example_index"] = [r["example_index"] for r in records]
    return cols


class Featurizer:
    """Ray Data callable class: one tokenizer per worker, records in, feature rows out."""

    def __init__(self, tokenizer: Any, spec: TaskFeatures, labels: list[str]) -> None:
        self.tokenizer = tokenizer  # a WordPieceTokenizer
        self.spec = spec
        self.label_ids = {name: i for i, name in enumerate(labels)}

    def __call__(self, batch: Any) -> Any:
        return self.table(batch.to_pylist())

    def table(self, records: list[dict]) -> Any:
        """The feature rows of `records` as a pyarrow table."""
        import pyarrow as pa

        cols = featurize(records, self.tokenizer, self.spec, self.label_ids)
        list_type = pa.list_(pa.int32())
        return pa.table({k: pa.array(v, type=list_type if v and isinstance(v[0], list)
                                     else pa.float64() if v and isinstance(v[0], float)
                                     else pa.int64()) for k, v in cols.items()})


def featurize_tables(items: list[dict], tokenizer: Any, spec: TaskFeatures,
                     labels: list[str], address: str | None = None) -> list[Any]:
    """Feature tables of `items` (`_ray_item` records), in order: in this process for up
    to LOCAL_FEATURIZE_MAX_RECORDS items, else on Ray Data."""
    if len(items) <= LOCAL_FEATURIZE_MAX_RECORDS:
        featurizer = Featurizer(tokenizer, spec, labels)
        return [featurizer.table(items[i:i + FEATURIZE_BATCH])
                for i in range(0, len(items), FEATURIZE_BATCH)]
    from data_prep.ray_env import init_ray

    ray = init_ray(address)
    # Few blocks: per-row blocks would cost more scheduling than tokenizing.
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(8, len(items) // 2000)))
    ds = map_with_actor_pool(ds, Featurizer, 1, fn_constructor_args=(tokenizer, spec, labels),
                             batch_format="pyarrow", batch_size=FEATURIZE_BATCH)
    return list(ray.get(ds.to_arrow_refs()))


def build_task_dataset(path: str | Path, spec: TaskFeatures, tokenizer_dir: str | Path,
                       out_root: str | Path, *, split: str, labels: list[str] | None = None,
                       seed: int = 0, address: str | None = None,
                       source: str | None = None,
                       columns: dict[str, str] | None = None) -> TaskDataset:
    """Read, validate and tokenize one task file into `out_root/<task>-<split>-<hash>/`.

    `path` is a local file; `source` (e.g. the s3:// URI `path` was fetched from) is the
    name recorded in the manifest and the fingerprint instead of that local copy.

    `labels` (the training labels, or a user-given list) maps names to ids; without it
    the file's own sorted labels are used. Returns the dataset with the records actually
    used (each with `example_index`), which evaluation needs (gold answers, contexts).
    `columns` names the file's columns of a classification task (`read_task_file`).
    """
    import numpy as np

    from data_prep.tokenizer import WordPieceTokenizer

    records, report = read_task_file(path, spec.task, labels, columns)
    if not records:
        raise TaskDataError(f"{path}: no usable {spec.task} records ({report.total} skipped: "
                            f"{'; '.join(report.messages[:3]) or 'empty file'})")
    labels = list(labels) if labels is not None else label_list(records, spec.task)
    if spec.task not in ("qa", "regression") and len(labels) < 2:
        raise TaskDataError(f"{path}: only one label ({', '.join(labels)}); "
                            "classification needs at least two")
    for i, r in enumerate(records):
        r["example_index"] = i
    if report.total:
        log.warning("%s: skipped %d record(s): %s (first: %s)", path, report.total,
                    dict(report.counts), report.messages[0])
    tokenizer = WordPieceTokenizer.from_dir(tokenizer_dir)
    inputs = [fingerprint_file(path)]
    if source is not None:
        from data_prep.storage import open_location

        inputs[0]["path"] = open_location(source).uri
    config = {**dataclasses.asdict(spec), "labels": labels, "split": split, "seed": seed}
    renamed = {k: v for k, v in (columns or {}).items() if k != v}
    if renamed:  # only then: the datasets of default columns keep their fingerprints
        config["columns"] = renamed
    if spec.task == "regression":  # a text or a pair: other features from the same file
        config["text_fields"] = list(text_fields(spec.task, columns))
    fp = build_fingerprint(config, inputs, tokenizer.fingerprint(), kind=f"task-{spec.task}")
    final = Path(out_root).absolute() / f"{spec.task}-{split}-{fp[:12]}"
    ok, reason = is_up_to_date(final, fp)
    if ok:
        log.info("%s: up to date, reusing %s", path, final)
        return TaskDataset(final, Manifest.load(final), labels, records, report, True)
    log.info("tokenizing %s (%d records) into %s (%s)", path, len(records), final, reason)

    order = np.random.default_rng(seed).permutation(len(records))
    items = [_ray_item(records[i]) for i in order]
    with atomic_output_dir(final, force=True) as tmp:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Written here, on the driver: a Ray Data write would put the files on whichever
        # node ran the write task.
        tables = [t for t in featurize_tables(items, tokenizer, spec, labels, address)
                  if t.num_rows]
        (tmp / "data").mkdir(parents=True, exist_ok=True)
        if tables:
            pq.write_table(pa.concat_tables(tables), tmp / "data" / "part-00000.parquet")
        files = sorted((tmp / "data").glob("*.parquet"))

        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        schema = {f.name: str(f.type) for f in pq.read_schema(files[0])} if files else {}
        manifest = Manifest(
            kind=f"task-{spec.task}", config=config, inputs=inputs,
            tokenizer={"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                       "lowercase": tokenizer.lowercase},
            counts={"records_read": len(records) + report.total, "examples": len(records),
                    "skipped": report.total, "skipped_by_reason": dict(report.counts),
                    "rows": rows},
            splits={split: {"rows": rows, "files": [
                {"path": str(f.relative_to(tmp)), "size": f.stat().st_size} for f in files]}},
            schema=schema, fingerprint=fp,
            extra={"labels": labels, "skip_messages": report.messages, "notes": dict(report.notes)})
        manifest.save(tmp)
    return TaskDataset(final, manifest, labels, records, report, False)


def _ray_item(record: dict) -> dict:
    """A record as Ray Data stores it (QA answers flattened: only the first is trained on)."""
    item = {k: v for k, v in record.items() if k not in ("answers", "line")}
    if "answers" in record:
        a = record["answers"][0] if record["answers"] else {"text": "", "answer_start": -1}
        item["answers"] = [{"text": a["text"], "answer_start": int(a["answer_start"])}]
    return item
