"""Property tests over the fine-tuning readers (CSV/TSV/JSONL tables, CoNLL, SQuAD):
whatever the bytes, a reader returns or raises a BertflowError (never a raw decoding,
CSV, JSON or type error), within the deadline, and where the format defines records,
`used + skipped == records in the file`."""

from __future__ import annotations

import csv
import io
import json
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bert_core.config_io import BertflowError
from data_prep.tasks import readers
from data_prep.tasks.readers import read_classification, read_conll, read_squad

settings.load_profile("bertflow-fuzz")
pytestmark = pytest.mark.timeout(90)

# Small limits so that "huge" fields and lines are cheap to generate.
SMALL = dict(MAX_FIELD_CHARS=40, MAX_RECORD_CHARS=300, MAX_LINE_BYTES=300)
# No white space, quotes or delimiters: every generated line is a non-blank record.
WORD = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                             blacklist_characters='"\t,\ufeff'), min_size=1, max_size=12)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


def attempt(fn, *args, **kwargs):
    """fn's result, or None when it raised a BertflowError (any other error fails)."""
    try:
        return fn(*args, **kwargs)
    except BertflowError:
        return None


def small_limits():
    return mock.patch.multiple(readers, **SMALL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-tasks")


def corrupt_line(line: bytes, how: str, where: int) -> bytes:
    """One line spoiled: a byte that is not UTF-8, a stray opening quote, an extra
    column, a field over the limit, or cut short."""
    cut = where % (len(line) + 1)
    if how == "bad byte":
        return line[:cut] + b"\xff" + line[cut:]
    if how == "stray quote":
        return b'"' + line
    if how == "extra column":
        return line + b",x"
    if how == "huge field":
        return b"y" * (where % 400 + 41) + line
    return line[:cut] or b"z"


@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_tables_random_bytes(folder, tried, data, suffix):
    p = folder / f"random{suffix}"
    p.write_bytes(data)
    with small_limits():
        out = attempt(read_classification, p, ("text",))
    tried(f"table{suffix} bytes", "read" if out else "refused")


@given(rows=st.lists(st.tuples(st.text(max_size=30), st.text(max_size=8)), max_size=25),
       suffix=st.sampled_from([".csv", ".tsv"]), bom=st.booleans())
def test_tables_any_text_quoted_properly_is_read_record_for_record(folder, tried, rows,
                                                                   suffix, bom):
    """Any text at all (quotes, delimiters, newlines, \\r) written by csv.writer comes
    back as exactly one used-or-skipped record per non-blank row."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
    w.writerow(["text", "label"])
    w.writerows(rows)
    p = folder / f"quoted{suffix}"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8"))
    got, report = read_classification(p, ("text",))
    expected = sum(1 for r in rows if any(c.strip() for c in r))
    assert len(got) + report.total == expected
    wanted = [r for r in rows if r[0].strip() and r[1].strip()]
    assert [(g["text"], g["label"]) for g in got] == [(t, lab.strip()) for t, lab in wanted]
    tried(f"table{suffix} quoted", "read")


@given(rows=st.lists(st.tuples(WORD, WORD), min_size=1, max_size=25),
       damage=st.lists(st.tuples(st.integers(0, 24), st.sampled_from(
           ["bad byte", "stray quote", "extra column", "huge field", "cut"]),
           st.integers(0, 10_000)), max_size=6),
       suffix=st.sampled_from([".csv", ".tsv"]), truncate=st.none() | st.integers(0, 2000))
def test_tables_damaged_lines_are_each_accounted_for(folder, tried, rows, damage, suffix,
                                                     truncate):
    sep = b"\t" if suffix == ".tsv" else b","
    lines = [b"text" + sep + b"label"] + [t.encode() + sep + lab.encode() for t, lab in rows]
    for index, how, where in damage:
        i = 1 + index % len(rows)
        lines[i] = corrupt_line(lines[i], how, where).replace(b",", sep)
    data = b"\n".join(lines) + b"\n"
    if truncate is not None and truncate > len(lines[0]) + 1:
        data = data[:truncate]
    p = folder / f"damaged{suffix}"
    p.write_bytes(data)
    with small_limits():
        got, report = read_classification(p, ("text",))
    records = [ln for ln in data.split(b"\n")[1:] if ln]
    assert len(got) + report.total == len(records), report.to_dict()
    tried(f"table{suffix} damaged", "some skipped" if report.total else "all used")


@given(objs=st.lists(JSON | st.fixed_dictionaries({"text": JSON, "label": JSON}), max_size=20),
       damage=st.lists(st.tuples(st.integers(0, 19), st.sampled_from(["bad byte", "cut"]),
                                 st.integers(0, 1000)), max_size=4),
       blank=st.booleans())
def test_jsonl_any_values_and_damage_account_for_every_line(folder, tried, objs, damage, blank):
    lines = [json.dumps(o).encode() for o in objs]
    for index, how, where in damage:
        if lines:
            i = index % len(lines)
            lines[i] = corrupt_line(lines[i], how, where)
    if blank:
        lines.insert(len(lines) // 2, b"   ")
    data = b"\n".join(lines) + b"\n"
    p = folder / "odd.jsonl"
    p.write_bytes(data)
    got, report = read_classification(p, ("text",))

    def is_record(i: int, raw: bytes) -> bool:
        try:
            return bool(raw.decode("utf-8-sig" if i == 0 else "utf-8").strip())
        except UnicodeDecodeError:
            return True
    expected = sum(is_record(i, ln) for i, ln in enumerate(data.split(b"\n")))
    assert len(got) + report.total == expected, report.to_dict()
    tried("table.jsonl odd json", "read")


CONLL_TAGS = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "X-BAD", "per", ""])


@given(sentences=st.lists(st.lists(st.tuples(WORD, CONLL_TAGS), min_size=1, max_size=6),
                          max_size=12),
       docstart=st.booleans(),
       damage=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 100)), max_size=4))
def test_conll_every_sentence_is_used_or_skipped(folder, tried, sentences, docstart, damage):
    blocks = []
    for sent in sentences:
        blocks.append([(w + (" " + t if t else "")).encode() for w, t in sent
                       if w != "-DOCSTART-"] or [b"word O"])
    flat = [(b, i) for b, block in enumerate(blocks) for i in range(len(block))]
    for index, where in damage:
        if flat:
            b, i = flat[index % len(flat)]
            blocks[b][i] = corrupt_line(blocks[b][i], "bad byte", where)
    parts = [b"-DOCSTART- -X- O O\n\n"] if docstart else []
    parts += [b"\n".join(block) + b"\n\n" for block in blocks]
    p = folder / "ner.conll"
    p.write_bytes(b"".join(parts))
    got, report = read_conll(p)
    assert len(got) + report.total == len(blocks), report.to_dict()
    tried("conll", "read")


@given(data=st.binary(max_size=2000))
def test_conll_random_bytes(folder, tried, data):
    p = folder / "random.conll"
    p.write_bytes(data)
    with small_limits():
        out = attempt(read_conll, p)
    tried("conll bytes", "read" if out else "refused")


# --- SQuAD: a structure with wrong types anywhere, counted by the format's rules -----

ANSWER = st.one_of(
    st.fixed_dictionaries({"text": st.sampled_from(["Oslo", "Anna", "x", ""]) | JSON,
                           "answer_start": st.integers(-30, 60) | JSON}), JSON)
QA = st.one_of(
    st.fixed_dictionaries({"id": st.text(max_size=6) | JSON,
                           "question": st.text(max_size=10) | JSON,
                           "answers": st.lists(ANSWER, max_size=3) | JSON},
                          optional={"is_impossible": JSON}), JSON)
GOOD_QA = st.fixed_dictionaries({
    "id": st.text(max_size=6), "question": st.sampled_from(["Where?", "Who lives there?"]),
    "answers": st.lists(st.fixed_dictionaries({"text": st.sampled_from(["Oslo", "Anna"]),
                                               "answer_start": st.integers(-3, 20)}),
                        max_size=2)})
CONTEXT = "Anna lives in Oslo. \u2603"
PARAGRAPH = st.one_of(
    st.fixed_dictionaries({"context": st.just(CONTEXT),
                           "qas": st.lists(GOOD_QA | QA, max_size=4)}),
    st.fixed_dictionaries({"context": st.sampled_from([CONTEXT, ""]) | JSON,
                           "qas": st.lists(QA, max_size=4) | JSON}), JSON)
ARTICLE = st.one_of(st.fixed_dictionaries({"paragraphs": st.lists(PARAGRAPH, max_size=3)
                                           | JSON}), JSON)


def squad_records(doc: dict) -> int:
    """Questions under well-formed containers, plus one per malformed container."""
    n = 0
    for article in doc["data"]:
        paragraphs = article.get("paragraphs", []) if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            n += 1
            continue
        for para in paragraphs:
            qas = para.get("qas", []) if isinstance(para, dict) else None
            n += len(qas) if isinstance(qas, list) else 1
    return n


@given(articles=st.lists(ARTICLE, max_size=4), bad_bytes=st.booleans(), indent=st.booleans())
def test_squad_any_structure_accounts_for_every_question(folder, tried, articles, bad_bytes,
                                                         indent):
    doc = {"version": "v2.0", "data": articles}
    text = json.dumps(doc, ensure_ascii=False, indent=1 if indent else None)
    raw = text.encode("utf-8")
    if bad_bytes:  # the snowman sits inside context strings only: structure unchanged
        raw = raw.replace("\u2603".encode(), b"\xe9")
    p = folder / "squad.json"
    p.write_bytes(raw)
    got, report = read_squad(p)
    assert len(got) + report.total == squad_records(doc), report.to_dict()
    for r in got:
        for a in r["answers"]:
            assert a["answer_start"] >= 0
            assert r["context"][a["answer_start"]:][:len(a["text"])] == a["text"]
    tried("squad structure", "some used" if got else "none used")


@given(data=st.binary(max_size=2000) | JSON.map(lambda v: json.dumps(v).encode()),
       cut=st.none() | st.integers(0, 400))
def test_squad_random_bytes_and_odd_json(folder, tried, data, cut):
    p = folder / "odd-squad.json"
    p.write_bytes(data if cut is None else data[:cut])
    out = attempt(read_squad, p)
    tried("squad bytes/json", "read" if out else "refused")
