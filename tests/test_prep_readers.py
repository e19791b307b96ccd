"""Readers: formats, folders/globs, and the documented rule for every kind of bad input."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections import Counter

import pytest

from data_prep.readers import (PrepInputError, expand_inputs, iter_documents,
                               split_sentences)


def read(path, **kw):
    stats = Counter()
    docs = list(iter_documents(path, stats, **kw))
    return docs, stats


def accounted(docs, stats):
    skipped = sum(v for k, v in stats.items() if k.startswith("skipped."))
    return stats["documents_read"] == len(docs) + skipped


def test_text_format_blank_lines_separate_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("First sentence.\nSecond one.\n\n\n\nOther doc.\n  \nThird doc line.\n")
    docs, stats = read(f)
    assert docs == [["First sentence.", "Second one."], ["Other doc."], ["Third doc line."]]
    assert stats["documents_read"] == 3 and accounted(docs, stats)
    g = tmp_path / "a.txt.gz"
    g.write_bytes(gzip.compress(f.read_bytes()))
    assert read(g)[0] == docs


def test_jsonl_and_parquet_documents_are_split_into_sentences(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["Hello there. How are you? Fine!", "中文句子。第二句！", "line one\nline two"]
    j = tmp_path / "d.jsonl.gz"
    j.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts + [None], "id": [1, 2, 3, 4]}), p)
    expected = [["Hello there.", "How are you?", "Fine!"], ["中文句子。", "第二句！"],
                ["line one", "line two"]]
    assert read(j)[0] == expected
    docs, stats = read(p)
    assert docs == expected and stats["skipped.empty_document"] == 1 and accounted(docs, stats)
    with pytest.raises(PrepInputError, match="no column 'body'"):
        read(p, text_field="body")


def test_bad_input_rules_are_counted_and_never_crash(tmp_path):
    good = "Good sentence one.\nGood two.\n\n"
    filler = "Filler line.\n\n" * 800  # past the 8 KiB sniffed for binary files
    bad_utf8 = b"Caf\xe9 au lait in latin-1.\n\n"
    nul_doc = b"has a \x00 nul inside.\n\n"
    f = tmp_path / "mixed.txt"
    f.write_bytes(good.encode() + filler.encode() + bad_utf8 + nul_doc + b"Last doc.\n")
    docs, stats = read(f)
    assert docs[0] == ["Good sentence one.", "Good two."] and docs[-1] == ["Last doc."]
    assert len(docs) == 802
    assert stats["skipped.undecodable_bytes"] == 1 and stats["skipped.nul_bytes"] == 1
    assert accounted(docs, stats)

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    (tmp_path / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    for name, reason in [("empty.txt", "empty_file"), ("image.txt", "binary_file"),
                         ("corrupt.txt.gz", "corrupt_compressed_file")]:
        docs, stats = read(tmp_path / name)
        assert docs == [] and stats[f"files_skipped.{reason}"] == 1

    j = tmp_path / "r.jsonl"
    j.write_bytes(b'{"text": "ok."}\n{not json\n{"title": "no text"}\n{"text": "   "}\n'
                  b'\n{"text": 5}\n' + b'{"text": "\xff\xfe"}\n')
    docs, stats = read(j)
    assert docs == [["ok."]]
    assert (stats["skipped.invalid_json"], stats["skipped.missing_text_field"],
            stats["skipped.empty_document"], stats["skipped.undecodable_bytes"]) == (1, 2, 1, 1)
    assert stats["documents_read"] == 6 and accounted(docs, stats)


def test_a_50mb_line_is_skipped_in_bounded_memory(tmp_path):
    f = tmp_path / "huge.txt"
    with open(f, "wb") as fh:
        fh.write(b"Before.\n\nDoc with a monster line.\n")
        chunk = b"x" * (1 << 20)
        for _ in range(50):
            fh.write(chunk)  # 50 MB, no newline
        fh.write(b"\nrest of that doc.\n\nAfter.")
    tracemalloc.start()
    docs, stats = read(f, max_line_bytes=1_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert docs == [["Before."], ["After."]]
    assert stats["skipped.line_too_long"] == 1 and accounted(docs, stats)
    assert peak < 8 << 20  # never held the 50 MB line


def test_expand_inputs_folders_globs_and_missing_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.txt", "a.jsonl", "sub/c.txt.gz", ".hidden.txt"]:
        (tmp_path / name).write_text("x\n")
    files = expand_inputs([str(tmp_path)])
    assert [f.name for f in files] == ["a.jsonl", "b.txt", "c.txt.gz"]
    assert [f.name for f in expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "b.txt")])] == ["b.txt"]
    with pytest.raises(PrepInputError, match=r"nope\.txt.*glob matches no file"):
        expand_inputs([str(tmp_path / "nope.txt"), str(tmp_path / "*.csv")])


def test_split_sentences():
    assert split_sentences("A b. C d! E?\n\nF") == ["A b.", "C d!", "E?", "F"]
    assert split_sentences("3.14 is pi. Yes") == ["3.14 is pi.", "Yes"]
