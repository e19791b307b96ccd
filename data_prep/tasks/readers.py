"""Readers for fine-tuning files: classification and regression CSV/TSV/JSONL, CoNLL,
SQuAD v1.1/v2.0 JSON.

Every input record is accounted for: a reader returns the usable records and a
`SkipReport` that counts the others by reason and keeps the first messages, each naming
the file and line (or JSON path) and what is wrong. A file that cannot be read at all
(missing, not a regular file, no usable header, not JSON) raises `TaskDataError` before
any work is done.

Bad bytes never stop a read: files are decoded line by line as UTF-8 (a leading
byte-order mark is dropped), and a line that is not UTF-8 or longer than
`MAX_LINE_BYTES` is skipped and counted with its line number. In CSV/TSV a field over
`MAX_FIELD_CHARS` is a counted skip, and a quote that never closes cannot swallow the
rows after it: a record that fails after spanning several lines is skipped at its first
line and the lines it had taken are read again one row each. So for tables,
`used + skipped` equals the non-blank records of the file.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from bert_core.config_io import BertflowError

MAX_MESSAGES = 20  # messages kept per report; the counts cover every skipped record
MAX_FIELD_CHARS = 1 << 20  # a CSV/TSV field beyond this is skipped ("field too large")
MAX_RECORD_CHARS = 8 << 20  # a table record (or one line) beyond this is never held
MAX_LINE_BYTES = MAX_RECORD_CHARS
MAX_JSON_BYTES = 1 << 30  # a SQuAD file is parsed whole; beyond this it is refused
_SKIP_CHUNK = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes / lone \\u escapes


class TaskDataError(BertflowError):
    """A fine-tuning data file cannot be used; the message names the file and the fix."""


@dataclass
class SkipReport:
    """Records skipped while reading, counted by reason, with the first messages kept."""

    counts: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # fixed, not skipped (e.g. answer_start)

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(f"{where}: {detail}")

    def merge(self, other: SkipReport) -> None:
        """Add another report's counts (and messages, up to the limit) to this one."""
        self.counts.update(other.counts)
        self.notes.update(other.notes)
        self.messages += other.messages[:max(0, MAX_MESSAGES - len(self.messages))]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.total, "by_reason": dict(self.counts),
                "notes": dict(self.notes), "messages": list(self.messages)}


class SkipRow(NamedTuple):
    """Stands for a record that cannot be used: a counted reason and what is wrong."""

    reason: str
    detail: str


def _require_file(path: str | Path) -> Path:
    """The file to read: `path`, or, when `path` is a symbolic link the user named, its
    target resolved now, once (`_open_file` then never follows a link)."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise TaskDataError(f"{p}: not a regular file (a folder, FIFO or device); pass a "
                            "CSV, TSV, JSONL, CoNLL or SQuAD JSON file")
    if not p.is_file():
        raise TaskDataError(f"{p}: data file not found; pass an existing CSV, TSV, JSONL, "
                            "CoNLL or SQuAD JSON file")
    return p.resolve() if p.is_symlink() else p


def _open_file(path: Path) -> Any:
    """`path` opened in one step, not following a link swapped in since `_require_file`
    (data_prep.storage.open_regular); a TaskDataError when it is no longer a file."""
    from data_prep.storage import NotRegularFile, open_regular

    try:
        return open_regular(path)
    except NotRegularFile as exc:
        raise TaskDataError(f"{exc}; it changed since it was checked") from None
    except FileNotFoundError:
        raise TaskDataError(f"{path}: removed since it was checked") from None


def _has_surrogate(*texts: object) -> bool:
    return any(isinstance(t, str) and _SURROGATE.search(t) for t in texts)


def iter_lines(path: Path) -> Iterator[tuple[int, str | SkipRow]]:
    """(line number, text with its newline) per physical line, or a `SkipRow` for a line
    that is not UTF-8 or is longer than MAX_LINE_BYTES (read in chunks, never held).
    A UTF-8 byte-order mark at the start of the file is dropped."""
    with _open_file(path) as fh:
        lineno = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                    pass
                yield lineno, SkipRow("line too long",
                                      f"line over {MAX_LINE_BYTES} bytes, not read")
                continue
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, SkipRow("invalid UTF-8", f"bytes that are not UTF-8 at column "
                                      f"{exc.start + 1}; re-encode the file as UTF-8")


# ----------------------------------------------------------------- tables

class _BadLine(Exception):
    def __init__(self, lineno: int, row: SkipRow):
        super().__init__(row.detail)
        self.lineno, self.row = lineno, row


class _LineFeed:
    """Feeds csv.reader decoded lines and remembers those of the record in progress, so
    a failed record can be taken apart line by line."""

    def __init__(self, lines: Iterator[tuple[int, str | SkipRow]]):
        self.lines = lines
        self.taken: list[tuple[int, str]] = []
        self.chars = 0

    def __iter__(self) -> _LineFeed:
        return self

    def start_record(self) -> None:
        self.taken, self.chars = [], 0

    def __next__(self) -> str:
        lineno, text = next(self.lines)
        if isinstance(text, SkipRow):
            raise _BadLine(lineno, text)
        self.chars += len(text)
        if self.chars > MAX_RECORD_CHARS:
            raise _BadLine(lineno, SkipRow("field too large", f"record over "
                                           f"{MAX_RECORD_CHARS} characters (an unclosed quote?)"))
        self.taken.append((lineno, text))
        return text


def _csv_error_row(exc: csv.Error) -> SkipRow:
    msg = str(exc)
    if "field larger than field limit" in msg:
        return SkipRow("field too large", f"a field over {MAX_FIELD_CHARS} characters")
    if "unexpected end of data" in msg:
        return SkipRow("malformed row", "unbalanced quote: a quoted field never closes")
    return SkipRow("malformed row", f"malformed row ({msg})")


def _check_row(record: list[str], ncols: int | None, multiline: bool) -> SkipRow | None:
    if ncols is not None and len(record) != ncols:
        if multiline:
            return SkipRow("malformed row", f"unbalanced quote: a quoted field runs over "
                           f"several lines into {len(record)} columns (header has {ncols})")
        return SkipRow("malformed row", f"{len(record)} columns where the header has {ncols}")
    if any(len(c) > MAX_FIELD_CHARS for c in record):
        return SkipRow("field too large", f"a field over {MAX_FIELD_CHARS} characters")
    return None


def _csv_records(path: Path, delimiter: str
                 ) -> Iterator[tuple[int, list[str] | SkipRow]]:
    """(first line, fields) per non-blank CSV/TSV record, or (line, SkipRow). Quoted
    fields may span lines; a record that fails after taking several lines is skipped at
    its first line and the other lines are parsed again, each on its own, so an
    unbalanced quote costs one row and every line is accounted for."""
    if csv.field_size_limit() < MAX_RECORD_CHARS:  # the default 128 KiB is too small
        csv.field_size_limit(MAX_RECORD_CHARS)
    feed = _LineFeed(iter_lines(path))
    reader = csv.reader(feed, delimiter=delimiter, strict=True)
    ncols: int | None = None

    def one_line(lineno: int, text: str) -> Iterator[tuple[int, list[str] | SkipRow]]:
        if not text.strip():
            return
        try:
            record = next(csv.reader([text], delimiter=delimiter, strict=True), [])
        except csv.Error as exc:
            yield lineno, _csv_error_row(exc)
            return
        if any(c.strip() for c in record):
            yield lineno, _check_row(record, ncols, False) or record

    def retake(first: SkipRow, rest: list[tuple[int, str]], start: int):
        yield start, first
        for lineno, text in rest:
            yield from one_line(lineno, text)

    while True:
        feed.start_record()
        try:
            record = next(reader)
        except StopIteration:
            return
        except _BadLine as bad:
            taken = feed.taken
            if taken:  # the bad line broke a record that spans lines
                yield from retake(SkipRow("malformed row", f"quoted field broken by line "
                                          f"{bad.lineno} ({bad.row.reason})"),
                                  taken[1:], taken[0][0])
            yield bad.lineno, bad.row
            continue
        except csv.Error as exc:
            taken = feed.taken or [(0, "")]
            yield from retake(_csv_error_row(exc), taken[1:], taken[0][0])
            continue
        taken = feed.taken
        if not any(c.strip() for c in record) and (
                ncols is None or len(record) == ncols or not any(t.strip() for _, t in taken)):
            continue  # a blank row (`,` under two columns); `""` under two is malformed
        if ncols is None:
            ncols = len(record)
            yield taken[0][0], record  # the header
            continue
        bad_row = _check_row(record, ncols, len(taken) > 1)
        if bad_row is None:
            yield taken[0][0], record
        elif len(taken) > 1:
            yield from retake(bad_row, taken[1:], taken[0][0])
        else:
            yield taken[0][0], bad_row


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | SkipRow]]:
    for lineno, text in iter_lines(path):
        if isinstance(text, SkipRow):
            yield lineno, text
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, nesting
            yield lineno, SkipRow("malformed row", f"malformed row (invalid JSON: "
                                  f"{getattr(exc, 'msg', None) or type(exc).__name__})")
            continue
        if not isinstance(obj, dict):
            yield lineno, SkipRow("malformed row", "expected a JSON object")
            continue
        yield lineno, obj


TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".ndjson")


def iter_table(path: str | Path) -> tuple[list[str], Iterator[tuple[int, dict | SkipRow]]]:
    """(columns, iterator of (line, row dict or SkipRow)) for a CSV, TSV or JSONL file.

    CSV/TSV columns come from the header line (`TaskDataError` without one); JSONL has
    no header (columns `[]`) and each line is one record. Blank lines are not records."""
    p = _require_file(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return [], _jsonl_records(p)
    if suffix not in TABLE_SUFFIXES:
        raise TaskDataError(f"{p}: unknown table format {suffix!r}; use .csv, .tsv or .jsonl")
    records = _csv_records(p, "\t" if suffix in (".tsv", ".txt") else ",")
    first = next(records, None)
    if first is None:
        raise TaskDataError(f"{p}: empty file; expected a header line")
    lineno, header = first
    if isinstance(header, SkipRow):
        raise TaskDataError(f"{p}:{lineno}: cannot read the header line ({header.detail})")
    columns = [h.strip() for h in header]

    def rows() -> Iterator[tuple[int, dict | SkipRow]]:
        for n, record in records:
            yield n, record if isinstance(record, SkipRow) else dict(zip(columns, record))
    return columns, rows()


def _text_value(row: dict, key: str) -> str | SkipRow | None:
    """The row's value for `key` as text; None when missing or blank."""
    v = row.get(key)
    if v is None or isinstance(v, float) and v != v:
        return None
    if isinstance(v, (dict, list)):
        return SkipRow("malformed row", f"field {key!r} is a JSON {type(v).__name__}, "
                       "expected text")
    if _has_surrogate(v):
        return SkipRow("invalid UTF-8", f"field {key!r} holds undecodable text")
    s = str(v)
    return s if s.strip() else None


def read_classification(path: str | Path, text_fields: tuple[str, ...],
                        label_field: str = "label",
                        labels: list[str] | None = None,
                        require_label: bool = True,
                        columns: dict[str, str] | None = None) -> tuple[list[dict], SkipReport]:
    """Read `text_fields` + `label_field` records from a CSV, TSV or JSONL file.

    Each record is `{field: str, ..., "label": str, "line": int}`. `columns` maps a field
    to the file's column holding it (`--text-column review` reads `text` from `review`);
    fields it leaves out are read from the column of their own name. Rows with a missing
    or empty field are skipped ("missing field"); with `labels` given, rows whose label is
    not in it are skipped ("unknown label"). Labels are strings (JSON numbers too).
    Unreadable rows (bad bytes, broken quoting, huge fields) are skipped by reason.
    """
    p = Path(path)
    header, rows = iter_table(p)
    fields = list(text_fields) + ([label_field] if require_label else [])
    column = {f: (columns or {}).get(f, f) for f in fields}
    wanted = [column[f] for f in fields]
    if header and not set(wanted) <= set(header):
        missing = [w for w in wanted if w not in header]
        raise TaskDataError(f"{p}:1: header has no column(s) {', '.join(missing)} "
                            f"(found {', '.join(header)}); expected columns {', '.join(wanted)}"
                            " (name yours with --text-column, --text-pair-column, "
                            "--label-column)")
    known = set(labels) if labels is not None else None
    report = SkipReport()
    out: list[dict] = []
    for lineno, row in rows:
        where = f"{p}:{lineno}"
        if isinstance(row, SkipRow):
            report.skip(row.reason, where, row.detail)
            continue
        values = {k: _text_value(row, k) for k in wanted}
        bad = next((v for v in values.values() if isinstance(v, SkipRow)), None)
        if bad is not None:
            report.skip(bad.reason, where, bad.detail)
            continue
        missing = [k for k in wanted if values[k] is None]
        if missing:
            report.skip("missing field", where, f"missing field {missing[0]!r}")
            continue
        rec = {k: values[column[k]] for k in text_fields}
        if require_label:
            label = values[column[label_field]].strip()
            if known is not None and label not in known:
                report.skip("unknown label", where,
                            f"unknown label {label!r} (known: {', '.join(sorted(known))})")
                continue
            rec["label"] = label
        rec["line"] = lineno
        out.append(rec)
    return out, report


def read_regression(path: str | Path, text_fields: tuple[str, ...],
                    label_field: str = "label",
                    columns: dict[str, str] | None = None) -> tuple[list[dict], SkipReport]:
    """`read_classification` for scores: each record's `label` is a float. A label that
    is not a finite number is skipped ("bad score", with file and line)."""
    import math

    rows, report = read_classification(path, text_fields, label_field, columns=columns)
    out = []
    for rec in rows:
        try:
            score = float(rec["label"])
        except ValueError:
            score = float("nan")
        if not math.isfinite(score):
            report.skip("bad score", f"{path}:{rec['line']}",
                        f"label {rec['label']!r} is not a number (a regression needs scores)")
            continue
        out.append({**rec, "label": score})
    return out, report


def read_table_frame(path: str | Path) -> tuple[Any, SkipReport]:
    """Every readable row of a CSV, TSV or JSONL file (or of the table files in a folder,
    in name order) as a pandas DataFrame of all its columns, for prediction.

    Rows that cannot be read (bad bytes, broken quoting, invalid JSON, huge fields) are
    left out and counted in the report with file and line; nothing is merged or guessed."""
    import pandas as pd

    p = Path(path)
    if p.is_dir():
        files = [_require_file(f) for f in sorted(p.iterdir()) if f.is_file()
                 and not f.name.startswith(".") and f.suffix.lower() in TABLE_SUFFIXES]
        if not files:
            raise TaskDataError(f"{p}: folder holds no .csv, .tsv or .jsonl file")
    elif p.exists() and not p.is_file():
        raise TaskDataError(f"{p}: not a regular file (a FIFO or device); pass a CSV, TSV "
                            "or JSONL file")
    elif not p.is_file():
        raise TaskDataError(f"{p}: input not found; pass a CSV, TSV or JSONL file")
    else:
        files = [p]
    report = SkipReport()
    columns: dict[str, None] = {}
    out: list[dict] = []
    for f in files:
        header, rows = iter_table(f)
        columns.update(dict.fromkeys(header))
        for lineno, row in rows:
            if isinstance(row, SkipRow):
                report.skip(row.reason, f"{f}:{lineno}", row.detail)
                continue
            bad = [k for k, v in row.items() if _has_surrogate(k, v)]
            if bad:
                report.skip("invalid UTF-8", f"{f}:{lineno}",
                            f"field {bad[0]!r} holds undecodable text")
                continue
            columns.update(dict.fromkeys(row))
            out.append(row)
    frame = pd.DataFrame(out, columns=list(columns))
    if all(f.suffix.lower() in (".csv", ".tsv") for f in files):
        frame = _numeric_columns(frame)
    return frame, report


def _numeric_columns(frame: Any) -> Any:
    """CSV has no types: a column whose every value is a number (an id, a score) becomes
    numeric, as pyarrow's CSV reader infers, so `1` is written back as 1, not "1". Columns
    with any text or any empty cell stay strings."""
    import pandas as pd

    for name in frame.columns:
        values = frame[name]
        if values.isna().any() or not len(values):
            continue
        if any(not isinstance(v, str) or not v.strip() for v in values):
            continue
        try:
            frame[name] = pd.to_numeric(values)
        except (ValueError, TypeError):
            continue
    return frame


# ----------------------------------------------------------------------- CoNLL

_TAG = re.compile(r"^(O|[BIES]-\S+)$")


def read_conll(path: str | Path, tags: list[str] | None = None) -> tuple[list[dict], SkipReport]:
    """Read a CoNLL file: a token per line (tag in the last column), blank lines between
    sentences, `-DOCSTART-` lines skipped. Records are `{"tokens", "tags", "line"}` with
    `line` the sentence's first line. A sentence with a line lacking a tag column, a tag
    that is not BIO/IOB2 (`O`, `B-X`, `I-X`), (with `tags` given) an unknown tag, or a
    line that is not UTF-8 is skipped whole, with the offending line named.
    """
    p = _require_file(path)
    known = set(tags) if tags is not None else None
    report = SkipReport()
    out: list[dict] = []
    tokens: list[str] = []
    labels: list[str] = []
    start = 0
    error: tuple[str, str] | None = None

    def flush() -> None:
        nonlocal tokens, labels, error
        if error is not None:
            report.skip(error[0], f"{p}:{start}", error[1])
        elif tokens:
            out.append({"tokens": tokens, "tags": labels, "line": start})
        tokens, labels, error = [], [], None

    for lineno, line in iter_lines(p):
        parts = line.split() if isinstance(line, str) else [""]
        if not parts:
            flush()
            continue
        if parts[0] == "-DOCSTART-":
            flush()
            continue
        if not tokens and error is None:
            start = lineno
        if error is not None:
            continue
        if isinstance(line, SkipRow):
            error = (line.reason, f"line {lineno}: {line.detail}")
            continue
        if len(parts) < 2:
            error = ("missing field", f"line {lineno}: token {parts[0]!r} has no tag column")
            continue
        tag = parts[-1]
        if not _TAG.match(tag):
            error = ("bad tag", f"line {lineno}: tag {tag!r} is not BIO/IOB2 (O, B-X, I-X)")
            continue
        if known is not None and tag not in known:
            error = ("unknown label", f"line {lineno}: unknown tag {tag!r} "
                     f"(known: {', '.join(sorted(known))})")
            continue
        tokens.append(parts[0])
        labels.append(tag)
    flush()
    return out, report


# ----------------------------------------------------------------------- SQuAD

_ID_KEY = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?[0-9][^,}\]\s]*)')


def _id_lines(raw: str) -> dict[str, int]:
    """1-based line of the first `"id": ...` of each question id, in one pass over the
    text (a lookup per question would be quadratic on SQuAD-sized files)."""
    lines: dict[str, int] = {}
    line, pos = 1, 0
    for m in _ID_KEY.finditer(raw):
        line += raw.count("\n", pos, m.start())
        pos = m.start()
        try:
            key = str(json.loads(m.group(1)))
        except (ValueError, RecursionError):
            continue
        lines.setdefault(key, line)
    return lines


def _check_answers(answers: object, context: str) -> tuple[list[dict], SkipRow | None, int]:
    """(answers with start fixed, SkipRow or None, starts corrected) of one question."""
    if answers is None:
        answers = []
    if not isinstance(answers, list):
        return [], SkipRow("malformed record", "'answers' is not a list"), 0
    out, fixed = [], 0
    for a in answers:
        text = a.get("text") if isinstance(a, dict) else None
        start = a.get("answer_start") if isinstance(a, dict) else None
        if not isinstance(text, str) or not text or not isinstance(start, int) \
                or isinstance(start, bool):
            return [], SkipRow("missing field", "an answer lacks 'text' or 'answer_start'"), 0
        if _has_surrogate(text):
            return [], SkipRow("invalid UTF-8", "an answer holds undecodable text"), 0
        if start < 0:
            return [], SkipRow("bad answer_start", f"answer_start {start} is negative"), 0
        if context[start:start + len(text)] != text:
            found = [m.start() for m in re.finditer(re.escape(text), context)]
            if not found:
                return [], SkipRow("answer not in context",
                                   f"answer {text!r} not found in its context"), 0
            start = min(found, key=lambda s: abs(s - start))
            fixed += 1
        out.append({"text": text, "answer_start": start})
    return out, None, fixed


def read_squad(path: str | Path, require_answers: bool = True) -> tuple[list[dict], SkipReport]:
    """Read SQuAD v1.1 / v2.0 JSON into `{"id", "question", "context", "answers":
    [{"text", "answer_start"}], "is_impossible", "line"}` records.

    Skipped (counted, with the JSON path, id and line): a question with a missing or
    non-text field, an answerable question without answers, an answer whose text is not
    in its context or whose answer_start is negative, text that is not UTF-8; an article,
    paragraph or `qas` of the wrong JSON type counts as one skipped record. An
    `answer_start` that does not point at the answer text, where the text occurs
    elsewhere in the context, is moved to the nearest occurrence and counted as a note.
    """
    p = _require_file(path)
    if p.stat().st_size > MAX_JSON_BYTES:
        raise TaskDataError(f"{p}: {p.stat().st_size} bytes is over the {MAX_JSON_BYTES}-byte "
                            "limit for a SQuAD file; split it into several files")
    # Bad bytes become lone surrogates, so one broken context costs its questions only.
    with _open_file(p) as fh:
        raw = fh.read(MAX_JSON_BYTES + 1).decode("utf-8-sig", errors="surrogateescape")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg}); expected a SQuAD "
                            "v1.1/v2.0 file") from None
    except (ValueError, RecursionError) as exc:
        raise TaskDataError(f"{p}: unreadable JSON ({type(exc).__name__}: {exc}); expected "
                            "a SQuAD v1.1/v2.0 file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise TaskDataError(f"{p}: expected a SQuAD file with a top-level \"data\" list")
    id_lines = _id_lines(raw)
    report = SkipReport()
    out: list[dict] = []

    def malformed(where: str, what: str) -> None:
        report.skip("malformed record", f"{p}: {where}", what)

    for i, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs", []) if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            malformed(f"data[{i}]", "expected an article object with a 'paragraphs' list")
            continue
        for j, para in enumerate(paragraphs):
            qas = para.get("qas", []) if isinstance(para, dict) else None
            if not isinstance(qas, list):
                malformed(f"data[{i}].paragraphs[{j}]",
                          "expected a paragraph object with a 'qas' list")
                continue
            context = para.get("context")
            for k, qa in enumerate(qas):
                qid = str(qa.get("id", f"{i}.{j}.{k}")) if isinstance(qa, dict) else f"{i}.{j}.{k}"
                line = id_lines.get(qid) if isinstance(qa, dict) and "id" in qa else None
                where = f"{p}:{line or '?'} data[{i}].paragraphs[{j}].qas[{k}] (id {qid})"
                question = qa.get("question") if isinstance(qa, dict) else None
                if not isinstance(qa, dict):
                    report.skip("malformed record", where, "expected a question object")
                    continue
                if not isinstance(context, str) or not context.strip():
                    report.skip("missing field", where, "missing field 'context' (text)")
                    continue
                if not isinstance(question, str) or not question.strip():
                    report.skip("missing field", where, "missing field 'question' (text)")
                    continue
                if _has_surrogate(context, question):
                    report.skip("invalid UTF-8", where, "question or context holds bytes that "
                                "are not UTF-8; re-encode the file as UTF-8")
                    continue
                impossible = bool(qa.get("is_impossible", False))
                answers, bad, fixed = _check_answers(qa.get("answers"), context)
                if bad is not None:
                    report.skip(bad.reason, where, bad.detail)
                    continue
                if fixed:
                    report.notes["answer_start corrected"] += fixed
                if require_answers and not impossible and not answers:
                    report.skip("missing field", where,
                                "no answers for an answerable question (set is_impossible for v2.0)")
                    continue
                out.append({"id": qid, "question": question, "context": context,
                            "answers": answers, "is_impossible": impossible or not answers,
                            "line": line or 0})
    return out, report
