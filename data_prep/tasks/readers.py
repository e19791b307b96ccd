"""Readers for fine-tuning files: classification CSV/TSV/JSONL, CoNLL, SQuAD v1.1/v2.0 JSON.

Every input record is accounted for: a reader returns the usable records and a
`SkipReport` that counts the others by reason and keeps the first messages, each naming
the file and line (or JSON path) and what is wrong. A file that cannot be read at all
(missing, no usable header, not JSON) raises `TaskDataError` before any work is done.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError

MAX_MESSAGES = 20  # messages kept per report; the counts cover every skipped record


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

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.total, "by_reason": dict(self.counts),
                "notes": dict(self.notes), "messages": list(self.messages)}


def _require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise TaskDataError(f"{p}: data file not found; pass an existing CSV, TSV, JSONL, "
                            "CoNLL or SQuAD JSON file")
    return p


# ----------------------------------------------------------------- classification

def _iter_table(path: Path) -> tuple[list[str], Any]:
    """(columns, iterator of (line number, dict)) for a CSV, TSV or JSONL file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        def rows():
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield lineno, exc
                        continue
                    yield lineno, obj
        return [], rows()
    if suffix not in (".csv", ".tsv", ".txt"):
        raise TaskDataError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .jsonl")
    delimiter = "\t" if suffix in (".tsv", ".txt") else ","
    f = path.open(encoding="utf-8", newline="")
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        f.close()
        raise TaskDataError(f"{path}: empty file; expected a header line") from None

    def rows():
        with f:
            for record in reader:
                lineno = reader.line_num
                if not any(c.strip() for c in record):
                    continue
                if len(record) != len(header):
                    yield lineno, ValueError(
                        f"{len(record)} columns where the header has {len(header)}")
                    continue
                yield lineno, dict(zip(header, record))
    return header, rows()


def read_classification(path: str | Path, text_fields: tuple[str, ...],
                        label_field: str = "label",
                        labels: list[str] | None = None,
                        require_label: bool = True) -> tuple[list[dict], SkipReport]:
    """Read `text_fields` + `label_field` records from a CSV, TSV or JSONL file.

    Each record is `{field: str, ..., "label": str, "line": int}`. Rows with a missing or
    empty field are skipped ("missing field"); with `labels` given, rows whose label is
    not in it are skipped ("unknown label"). Labels are strings (JSON numbers too).
    """
    p = _require_file(path)
    header, rows = _iter_table(p)
    wanted = list(text_fields) + ([label_field] if require_label else [])
    if header and not set(wanted) <= set(header):
        missing = [w for w in wanted if w not in header]
        raise TaskDataError(f"{p}:1: header has no column(s) {', '.join(missing)} "
                            f"(found {', '.join(header)}); expected columns {', '.join(wanted)}")
    known = set(labels) if labels is not None else None
    report = SkipReport()
    out: list[dict] = []
    for lineno, row in rows:
        where = f"{p}:{lineno}"
        if isinstance(row, Exception):
            report.skip("malformed row", where, f"malformed row ({row})")
            continue
        if not isinstance(row, dict):
            report.skip("malformed row", where, "expected a JSON object")
            continue
        missing = [k for k in wanted if row.get(k) is None or str(row.get(k)).strip() == ""]
        if missing:
            report.skip("missing field", where, f"missing field {missing[0]!r}")
            continue
        rec = {k: str(row[k]) for k in text_fields}
        if require_label:
            label = str(row[label_field]).strip()
            if known is not None and label not in known:
                report.skip("unknown label", where,
                            f"unknown label {label!r} (known: {', '.join(sorted(known))})")
                continue
            rec["label"] = label
        rec["line"] = lineno
        out.append(rec)
    return out, report


# ----------------------------------------------------------------------- CoNLL

_TAG = re.compile(r"^(O|[BIES]-\S+)$")


def read_conll(path: str | Path, tags: list[str] | None = None) -> tuple[list[dict], SkipReport]:
    """Read a CoNLL file: a token per line (tag in the last column), blank lines between
    sentences, `-DOCSTART-` lines skipped. Records are `{"tokens", "tags", "line"}` with
    `line` the sentence's first line. A sentence with a line lacking a tag column, a tag
    that is not BIO/IOB2 (`O`, `B-X`, `I-X`), or (with `tags` given) an unknown tag is
    skipped whole, with the offending line named.
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

    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
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

def _line_of(text: str, needle: str) -> int | None:
    """1-based line where `needle` first occurs in `text` (to point users at a record)."""
    idx = text.find(needle)
    return None if idx < 0 else text.count("\n", 0, idx) + 1


def read_squad(path: str | Path, require_answers: bool = True) -> tuple[list[dict], SkipReport]:
    """Read SQuAD v1.1 / v2.0 JSON into `{"id", "question", "context", "answers":
    [{"text", "answer_start"}], "is_impossible", "line"}` records.

    Skipped (counted, with the JSON path, id and line): a question with a missing field,
    an answerable question without answers, an answer whose text is not in its context.
    An `answer_start` that does not point at the answer text, where the text occurs
    elsewhere in the context, is moved to the nearest occurrence and counted as a note.
    """
    p = _require_file(path)
    raw = p.read_text(encoding="utf-8")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg}); expected a SQuAD "
                            "v1.1/v2.0 file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise TaskDataError(f"{p}: expected a SQuAD file with a top-level \"data\" list")
    report = SkipReport()
    out: list[dict] = []
    for i, article in enumerate(doc["data"]):
        for j, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            context = para.get("context") if isinstance(para, dict) else None
            for k, qa in enumerate(para.get("qas", []) if isinstance(para, dict) else []):
                qid = str(qa.get("id", f"{i}.{j}.{k}")) if isinstance(qa, dict) else f"{i}.{j}.{k}"
                line = _line_of(raw, f'"{qid}"') if isinstance(qa, dict) and "id" in qa else None
                where = f"{p}:{line or '?'} data[{i}].paragraphs[{j}].qas[{k}] (id {qid})"
                if not isinstance(qa, dict) or not context or not str(qa.get("question", "")).strip():
                    report.skip("missing field", where,
                                "missing field 'context'" if not context else "missing field 'question'")
                    continue
                impossible = bool(qa.get("is_impossible", False))
                answers = []
                bad = None
                for a in qa.get("answers", []) or []:
                    text = str(a.get("text", "")) if isinstance(a, dict) else ""
                    start = a.get("answer_start") if isinstance(a, dict) else None
                    if not text or not isinstance(start, int):
                        bad = ("missing field", "an answer lacks 'text' or 'answer_start'")
                        break
                    if context[start:start + len(text)] != text:
                        found = [m.start() for m in re.finditer(re.escape(text), context)]
                        if not found:
                            bad = ("answer not in context",
                                   f"answer {text!r} not found in its context")
                            break
                        start = min(found, key=lambda s: abs(s - start))
                        report.notes["answer_start corrected"] += 1
                    answers.append({"text": text, "answer_start": start})
                if bad is not None:
                    report.skip(bad[0], where, bad[1])
                    continue
                if require_answers and not impossible and not answers:
                    report.skip("missing field", where,
                                "no answers for an answerable question (set is_impossible for v2.0)")
                    continue
                out.append({"id": qid, "question": str(qa["question"]), "context": context,
                            "answers": answers, "is_impossible": impossible or not answers,
                            "line": line or 0})
    return out, report
