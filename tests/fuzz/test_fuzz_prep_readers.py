"""Property tests over the pretraining readers (text, jsonl, parquet, each .gz where it
applies): any bytes give documents or counted skips, never an exception other than a
BertflowError, and `documents_read == yielded + skipped` with `documents_read` equal to
the documents the file holds by the format's own definition."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bert_core.config_io import BertflowError
from data_prep.readers import iter_documents

settings.load_profile("bertflow-fuzz")
pytestmark = pytest.mark.timeout(90)

MAX_LINE = 64  # small, so that over-long lines are cheap to generate
LINE = st.binary(max_size=90).map(lambda b: b.replace(b"\n", b" ")) | st.text(max_size=40).map(
    lambda t: t.replace("\n", " ").encode("utf-8"))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-prep")


def read(path, **kw) -> tuple[list, Counter]:
    stats: Counter = Counter()
    docs = []
    try:
        docs = list(iter_documents(path, stats, max_line_bytes=MAX_LINE, **kw))
    except BertflowError:
        pass
    skipped = sum(v for k, v in stats.items() if k.startswith("skipped."))
    assert stats["documents_read"] == len(docs) + skipped, stats
    return docs, stats


def file_skipped(data: bytes) -> bool:
    return not data or b"\0" in data[:8192]


def text_documents(data: bytes) -> int:
    """Runs of non-blank lines; a line over MAX_LINE bytes counts as non-blank."""
    n, inside = 0, False
    for line in data.split(b"\n"):
        filled = len(line) > MAX_LINE or bool(line.strip())
        n += filled and not inside
        inside = filled
    return n


def jsonl_records(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if len(line) > MAX_LINE or line.strip())


@given(lines=st.lists(LINE, max_size=30), gz=st.booleans())
def test_text_any_lines(folder, tried, lines, gz):
    data = b"\n".join(lines)
    p = folder / ("c.txt.gz" if gz else "c.txt")
    p.write_bytes(gzip.compress(data) if gz else data)
    docs, stats = read(p)
    expected = 0 if file_skipped(data) else text_documents(data)
    assert stats["documents_read"] == expected, stats
    tried("prep .txt.gz" if gz else "prep .txt", "documents" if docs else "none used")


@given(records=st.lists(JSON.map(lambda v: json.dumps(v).encode())
                        | st.fixed_dictionaries({"text": JSON | st.text(max_size=40)}).map(
                            lambda v: json.dumps(v).encode())
                        | LINE, max_size=20), gz=st.booleans())
def test_jsonl_any_records(folder, tried, records, gz):
    data = b"\n".join(records)
    p = folder / ("c.jsonl.gz" if gz else "c.jsonl")
    p.write_bytes(gzip.compress(data) if gz else data)
    docs, stats = read(p)
    expected = 0 if file_skipped(data) else jsonl_records(data)
    assert stats["documents_read"] == expected, stats
    tried("prep .jsonl.gz" if gz else "prep .jsonl", "documents" if docs else "none used")


@given(data=st.binary(max_size=3000), suffix=st.sampled_from(
    [".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz"]), cut=st.none() | st.integers(0, 300))
def test_random_bytes_and_broken_gzip(folder, tried, data, suffix, cut):
    if suffix.endswith(".gz") and cut is not None:
        data = gzip.compress(data)[:cut]  # a gzip stream cut short
    p = folder / f"random{suffix}"
    p.write_bytes(data)
    docs, stats = read(p)
    tried(f"prep {suffix} bytes", next((k for k in stats if k.startswith("files_")), "read"))


@given(size=st.integers(0, 5000), cap=st.integers(1, 4000))
def test_gz_cap_keeps_documents_before_it(folder, tried, size, cap):
    data = b"Sentence one. Two.\n\n" * (size // 20)
    p = folder / "capped.txt.gz"
    p.write_bytes(gzip.compress(data))
    docs, stats = read(p, max_decompressed_bytes=cap)
    if len(data) > cap:
        assert stats["files_skipped.decompressed_too_large"] == 1
    else:
        assert len(docs) == text_documents(data)
    tried("prep .gz cap", "cut" if len(data) > cap else "whole")


@given(values=st.lists(st.none() | st.text(max_size=40), max_size=30),
       other=st.sampled_from(["text", "int", "list", "missing"]))
def test_parquet_any_values(folder, tried, values, other):
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = {"text": pa.array(values, pa.string()),
              "int": pa.array(range(len(values)), pa.int64()),
              "list": pa.array([[v] for v in values], pa.list_(pa.string())),
              "missing": pa.array(values, pa.string())}[other]
    name = "body" if other == "missing" else "text"
    p = folder / "c.parquet"
    pq.write_table(pa.table({name: column}), p)
    docs, stats = read(p)
    if other != "missing":
        assert stats["documents_read"] == len(values), stats
    tried("prep .parquet", other)
