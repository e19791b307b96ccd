"""Task readers and feature building: bad rows named and counted, labels aligned."""

from __future__ import annotations

import json

import pytest

from data_prep.tasks import features as F
from data_prep.tasks.readers import TaskDataError, read_classification, read_conll, read_squad


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from data_prep.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer.from_dir(minilm_dir)


def test_classification_csv_counts_bad_rows_with_file_and_line(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('text,label\n"a fine film",pos\n,neg\n"dull",\n"ok","meh"\n"bad, bad",neg\n')
    rows, report = read_classification(p, ("text",), labels=["pos", "neg"])
    assert [r["text"] for r in rows] == ["a fine film", "bad, bad"]
    assert report.counts == {"missing field": 2, "unknown label": 1}
    assert f"{p}:3: missing field 'text'" in report.messages
    assert any(m.startswith(f"{p}:5: unknown label 'meh'") for m in report.messages)


def test_a_task_file_swapped_for_a_link_after_the_check_is_not_followed(tmp_path):
    from data_prep.tasks.readers import iter_table

    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "the private key", "label": "pos"}\n')
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "public", "label": "pos"}\n')
    _, rows = iter_table(p)  # checked now, opened when the rows are read
    p.unlink()
    p.symlink_to(secret)
    with pytest.raises(TaskDataError, match="symbolic link"):
        list(rows)
    # A link the user names is read as its target, resolved when the file is checked.
    _, rows = iter_table(p)
    assert [row["text"] for _, row in rows] == ["the private key"]


def test_pair_jsonl_and_tsv_are_read_and_header_errors_are_clear(tmp_path):
    j = tmp_path / "dev.jsonl"
    j.write_text('{"text_a": "x", "text_b": "y", "label": 1}\n\n{"text_a": "z"}\nnot json\n')
    rows, report = read_classification(j, ("text_a", "text_b"))
    assert rows == [{"text_a": "x", "text_b": "y", "label": "1", "line": 1}]
    assert report.counts == {"missing field": 1, "malformed row": 1}
    t = tmp_path / "bad.tsv"
    t.write_text("sentence\tlabel\nhi\tpos\n")
    with pytest.raises(TaskDataError, match=r"bad.tsv:1: header has no column\(s\) text"):
        read_classification(t, ("text",))


def test_conll_skips_docstart_and_names_bad_sentences(tmp_path):
    p = tmp_path / "ner.conll"
    p.write_text("-DOCSTART- -X- O O\n\nAnna NNP B-PER\nlives VBZ O\n\n"
                 "in O\nRome X-LOC\n\nParis B-LOC\n\nBerlin\n")
    rows, report = read_conll(p)
    assert [r["tokens"] for r in rows] == [["Anna", "lives"], ["Paris"]]
    assert rows[0]["tags"] == ["B-PER", "O"] and rows[0]["line"] == 3
    assert report.counts == {"bad tag": 1, "missing field": 1}
    assert any("line 7: tag 'X-LOC'" in m for m in report.messages)


def test_squad_answer_not_in_context_is_skipped_and_starts_are_fixed(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
        "context": "Marie Curie moved to Paris in 1891.",
        "qas": [{"id": "q1", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 21}]},
                {"id": "q2", "question": "When?", "answers": [{"text": "1891", "answer_start": 0}]},
                {"id": "q3", "question": "Who?", "answers": [{"text": "Pierre", "answer_start": 0}]},
                {"id": "q4", "question": "Why?", "answers": [], "is_impossible": True}]}]}]}
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(doc, indent=1))
    rows, report = read_squad(p)
    assert [r["id"] for r in rows] == ["q1", "q2", "q4"]
    assert rows[1]["answers"][0]["answer_start"] == 30 and report.notes["answer_start corrected"] == 1
    assert rows[2]["is_impossible"] and report.counts == {"answer not in context": 1}
    assert "(id q3)" in report.messages[0] and "'Pierre' not found" in report.messages[0]


def test_first_piece_of_each_word_carries_the_label(tokenizer):
    words = [["Jean-Luc", "visited", "Zürich"]]
    rows = F.encode_words(tokenizer, F.word_pieces(tokenizer, words), [[1, 0, 3]], 32)
    pieces = tokenizer.convert_ids_to_tokens(rows["input_ids"][0])
    labelled = [(p, lab) for p, lab in zip(pieces, rows["labels"][0]) if lab != F.IGNORE]
    assert labelled == [("jean", 1), ("visited", 0), ("zurich", 3)]
    assert len(pieces) > 5  # Jean-Luc is several pieces, all but the first ignored


def test_qa_windows_cover_long_contexts_and_locate_the_answer(tokenizer):
    context = " ".join(f"Fact {i} is about town number {i}." for i in range(30)) + \
        " The treasure is hidden in Lisbon."
    s = context.index("Lisbon")
    rows = F.encode_qa(tokenizer, ["Where is the treasure?"], [context], max_seq_len=48,
                       doc_stride=16, answer_spans=[(s, s + 6)])
    assert len(rows["input_ids"]) > 5 and all(len(r) <= 48 for r in rows["input_ids"])
    hits = [i for i, sp in enumerate(rows["start_positions"]) if sp > 0]
    assert hits and hits[-1] == len(rows["input_ids"]) - 1
    for i in hits:
        sp, ep = rows["start_positions"][i], rows["end_positions"][i]
        assert context[rows["offset_start"][i][sp]:rows["offset_end"][i][ep]] == "Lisbon"
    # every context piece lies in some window
    covered = {o for r in rows["offset_start"] for o in r if o >= 0}
    assert covered == {o[0] for o in F.ids_and_offsets(tokenizer, [context])[0][1]}


def test_pad_batch_pads_each_column_with_its_own_value():
    b = F.pad_batch({"input_ids": [[1, 2, 3], [4]], "labels": [[0, 1, 2], [5]],
                     "example_index": [0, 1]}, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[0, 1, 2], [5, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["example_index"].tolist() == [0, 1]


def test_prediction_input_keeps_numeric_csv_columns_numeric(tmp_path):
    """CSV has no types: an all-number column (ids) is read as numbers, as pyarrow's CSV
    reader infers, so predictions are written back with the same ids; text stays text."""
    from data_prep.tasks.readers import read_table_frame

    src = tmp_path / "in.csv"
    src.write_text("id,text,code\n1,a story,007\n2,,x1\n3,123,9\n")
    df, report = read_table_frame(src)
    assert report.total == 0
    assert df["id"].tolist() == [1, 2, 3] and df["id"].dtype.kind == "i"
    assert df["text"].tolist() == ["a story", "", "123"]  # an empty cell keeps it text
    assert df["code"].tolist() == ["007", "x1", "9"]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"id": "007", "text": "a"}\n')
    assert read_table_frame(jsonl)[0]["id"].tolist() == ["007"]  # JSON types are kept


def test_classification_columns_are_named_by_the_user(tmp_path):
    """--text-column review --label-column stars: records keep bertflow's keys."""
    p = tmp_path / "mine.csv"
    p.write_text('id,review,stars\n1,"great",5\n2,"awful",1\n3,,4\n')
    rows, report = read_classification(p, ("text",), labels=None,
                                       columns={"text": "review", "label": "stars"})
    assert [(r["text"], r["label"]) for r in rows] == [("great", "5"), ("awful", "1")]
    assert report.counts == {"missing field": 1}
    with pytest.raises(TaskDataError, match="no column.*text.*--text-column"):
        read_classification(p, ("text",))
