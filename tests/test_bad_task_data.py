"""Bad fine-tuning and prediction input: every record is used or skipped with
a reason naming file and line; nothing raises a raw decoding/CSV/type error, nothing is
merged or silently dropped."""

from __future__ import annotations

import json
import types

import pytest

from data_prep.tasks.readers import TaskDataError, read_classification, read_conll, read_squad


def _squad(paragraphs, **article):
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs, **article}]}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_invalid_utf8_row_is_a_counted_skip_naming_the_line(tmp_path, suffix):
    p = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        p.write_bytes(b'{"text": "fine", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n'
                      b'{"text": "ok", "label": "neg"}\n')
    else:
        sep = b"\t" if suffix == ".tsv" else b","
        p.write_bytes(b"text" + sep + b"label\nfine" + sep + b"pos\ncaf\xe9" + sep + b"neg\n"
                      b"ok" + sep + b"neg\n")
    rows, report = read_classification(p, ("text",))
    assert [r["text"] for r in rows] == ["fine", "ok"]
    assert report.counts == {"invalid UTF-8": 1}
    line = 2 if suffix == ".jsonl" else 3
    assert report.messages[0].startswith(f"{p}:{line}: bytes that are not UTF-8")


def test_invalid_utf8_in_conll_and_squad_is_counted_not_raised(tmp_path):
    c = tmp_path / "ner.conll"
    c.write_bytes(b"Anna B-PER\n\nZ\xfcrich B-LOC\n\nParis B-LOC\n")
    rows, report = read_conll(c)
    assert [r["tokens"] for r in rows] == [["Anna"], ["Paris"]]
    assert report.counts == {"invalid UTF-8": 1} and f"{c}:3: line 3" in report.messages[0]
    s = tmp_path / "squad.json"
    good = {"context": "Anna lives in Oslo.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "Oslo", "answer_start": 14}]}]}
    bad = {"context": "Caf\u00e9 Oslo.", "qas": [
        {"id": "q2", "question": "Where?", "answers": [{"text": "Oslo", "answer_start": 5}]}]}
    text = json.dumps(_squad([good, bad]), indent=1, ensure_ascii=False).encode()
    s.write_bytes(text.replace("Caf\u00e9".encode(), b"Caf\xe9"))
    rows, report = read_squad(s)
    assert [r["id"] for r in rows] == ["q1"]
    assert report.counts == {"invalid UTF-8": 1} and "(id q2)" in report.messages[0]


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    p = tmp_path / "train.csv"
    p.write_bytes("\ufefftext,label\nhello,pos\n".encode())
    rows, report = read_classification(p, ("text",))
    assert rows == [{"text": "hello", "label": "pos", "line": 2}] and not report.total
    c = tmp_path / "ner.conll"
    c.write_bytes("\ufeffAnna B-PER\n".encode())
    assert read_conll(c)[0][0]["tokens"] == ["Anna"]
    s = tmp_path / "squad.json"
    s.write_bytes(b"\xef\xbb\xbf" + json.dumps(_squad([])).encode())
    assert read_squad(s) == ([], read_squad(s)[1])


def test_fields_over_128_kib_are_read_and_fields_over_the_limit_are_counted(tmp_path):
    from data_prep.tasks import readers

    p = tmp_path / "long.csv"
    big = "word " * 40_000  # 200 KB, over csv's default 128 KiB field limit
    huge = "x" * (readers.MAX_FIELD_CHARS + 10)
    p.write_text(f'text,label\n"{big}",pos\n"{huge}",neg\nshort,neg\n')
    rows, report = read_classification(p, ("text",))
    assert [len(r["text"]) for r in rows] == [len(big), 5]
    assert report.counts == {"field too large": 1} and report.messages[0].startswith(f"{p}:3:")


def test_unbalanced_quote_costs_one_row_and_the_rest_are_read(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('text,label\nfirst,pos\n"second,neg\nthird,pos\nfourth,neg\n')
    rows, report = read_classification(p, ("text",))
    assert [r["text"] for r in rows] == ["first", "third", "fourth"]
    assert report.counts == {"malformed row": 1}
    assert report.messages[0].startswith(f"{p}:3: unbalanced quote")
    # a quoted field that legitimately spans lines is still one record
    p.write_text('text,label\n"two\nlines",pos\nnext,neg\n')
    rows, report = read_classification(p, ("text",))
    assert [r["text"] for r in rows] == ["two\nlines", "next"] and not report.total


def test_squad_rejects_negative_starts_and_wrong_json_types_with_counts(tmp_path):
    ctx = "Marie Curie moved to Paris in 1891."
    paragraphs = [
        {"context": ctx, "qas": [
            {"id": "neg", "question": "When?", "answers": [{"text": "1891.", "answer_start": -5}]},
            {"id": "ok", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 21}]}]},
        {"context": 42, "qas": [{"id": "num", "question": "Q?", "answers": []}]},
        {"context": ctx, "qas": "not a list"},
        "not a paragraph",
    ]
    doc = {"data": [{"paragraphs": paragraphs}, {"paragraphs": "nope"}, 7]}
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(doc, indent=1))
    rows, report = read_squad(p)
    assert [r["id"] for r in rows] == ["ok"]
    assert report.counts == {"bad answer_start": 1, "missing field": 1, "malformed record": 4}
    assert report.total + len(rows) == 7  # 3 questions + 4 malformed containers
    assert any("(id neg)" in m and "negative" in m for m in report.messages)


@pytest.mark.timeout(20)
def test_squad_line_numbers_are_found_in_linear_time(tmp_path):
    n = 30_000  # the quadratic lookup took minutes here; one pass takes milliseconds
    ctx = "Anna lives in Oslo. " * 5
    paragraphs = [{"context": ctx, "qas": [{"id": f"q{i}", "question": "Where?",
                                            "answers": [{"text": "Oslo", "answer_start": 14}]}]}
                  for i in range(n)]
    p = tmp_path / "big.json"
    p.write_text(json.dumps(_squad(paragraphs), indent=1))
    rows, report = read_squad(p)
    assert len(rows) == n and not report.total
    lines = p.read_text().splitlines()
    for r in (rows[0], rows[n // 2], rows[-1]):
        assert f'"{r["id"]}"' in lines[r["line"] - 1]


def test_jsonl_values_of_the_wrong_type_and_odd_json_are_counted(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": ["a", "list"], "label": "pos"}\n[1, 2]\n{"text": 1e400, "label": 3}\n'
                 + "[" * 100_000 + "\n" + '{"text": "x", "label": "' + "9" * 5000 + '"}\n'
                 + '{"text": 12345' + "6" * 5000 + ', "label": "neg"}\n{"text": "\\ud800", "label": "a"}\n')
    rows, report = read_classification(p, ("text",))
    assert [r["text"] for r in rows] == ["inf", "x"]
    assert report.total == 5 and report.counts["invalid UTF-8"] == 1


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    import os

    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)
    with pytest.raises(TaskDataError, match="not a regular file"):
        read_classification(fifo, ("text",))


def test_predict_input_is_read_by_the_task_reader(tmp_path):
    """predict used pyarrow's CSV reader: an unbalanced quote merged rows and invalid
    UTF-8 reached the model as "b'caf\\xe9'"."""
    from data_prep.tasks.readers import read_table_frame
    from workflows.serving.batch import read_table_dataset

    fake_ray = types.SimpleNamespace(data=types.SimpleNamespace(from_pandas=lambda df: df))
    p = tmp_path / "in.csv"
    p.write_bytes(b'id,text\n1,first\n2,"second\n3,third\n4,caf\xe9\n5,fifth\n')
    df = read_table_dataset(fake_ray, p)
    assert df["text"].tolist() == ["first", "third", "fifth"]
    assert df["id"].tolist() == [1, 3, 5]  # an all-number CSV column is read as numbers
    frame, report = read_table_frame(p)
    assert report.counts == {"malformed row": 1, "invalid UTF-8": 1}
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "x", "n": 1}\n')
    (folder / "b.jsonl").write_text('{"text": "y", "m": 2}\nnot json\n')
    frame, report = read_table_frame(folder)
    assert frame["text"].tolist() == ["x", "y"] and list(frame.columns) == ["text", "n", "m"]
    assert report.counts == {"malformed row": 1}
