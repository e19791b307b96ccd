"""The official benchmark distributions (GLUE, SQuAD v1.1/v2.0, CoNLL-2003) read as
bertflow fine-tuning data: pure functions, no Ray.

What a caller gets (the choice, so `bertflow eval` needs nothing else): for a
(data_dir, task) pair, `prepare_benchmark(data_dir, name, out_dir)` returns a
`PreparedBenchmark` with one **train location** and one **eval location per dev set**
(`evals`, e.g. MNLI's `{"mnli-m": ..., "mnli-mm": ...}`) that `bertflow finetune` reads
unchanged, plus the **fine-tune fields** (`fields`: `task`, `labels` in id order, the
column names) to put into a `FinetuneConfig` / sweep. Classification and regression
splits are normalised into JSONL files written atomically under `out_dir/<task>/`
(`train.jsonl`, `<eval name>.jsonl`): keys `text` (single sentence) or `text_a`/`text_b`
(pairs) and `label` (the label string, or the score as a JSON number for STS-B), which
finetune's default columns read. The same bytes are written for the same input, so the
tokenized datasets built from them are reused. SQuAD JSON and CoNLL files are already
in finetune's formats: their locations are the distributed files themselves.
`read_benchmark_split(data_dir, name, split)` gives the same rows in memory
(`(records, SkipReport)`, records as `data_prep.tasks.readers` returns them).

Layouts (`data_dir` is the folder holding the task folders, as GLUE's download script
leaves it, or the task folder itself):

    CoLA/   train.tsv dev.tsv    no header; source, label, original label, sentence
    SST-2/  train.tsv dev.tsv    sentence, label
    MRPC/   train.tsv dev.tsv    Quality, #1 ID, #2 ID, #1 String, #2 String
    QQP/    train.tsv dev.tsv    id, qid1, qid2, question1, question2, is_duplicate
    STS-B/  train.tsv dev.tsv    index, genre, ..., sentence1, sentence2, score (0-5)
    MNLI/   train.tsv dev_matched.tsv dev_mismatched.tsv   ..., sentence1, sentence2,
                                 ..., gold_label (contradiction/entailment/neutral)
    QNLI/   train.tsv dev.tsv    index, question, sentence, label
    RTE/    train.tsv dev.tsv    index, sentence1, sentence2, label
    WNLI/   train.tsv dev.tsv    index, sentence1, sentence2, label
    SQuAD   train-v1.1.json dev-v1.1.json / train-v2.0.json dev-v2.0.json
    CoNLL-2003  eng.train eng.testa (or train.txt valid.txt): token ... tag per line

GLUE's TSVs are read as Google's and Hugging Face's processors read them: split on tabs
with quoting off (`csv.QUOTE_NONE`): a `"` in a sentence is text, never a quote. Columns
are found by their header names (CoLA, header-less, by position). Every row is used or
counted as skipped with its file and line (`SkipReport`): a row whose number of fields
differs from the header's, an empty text, a label the task does not have, an STS-B score
that is not a number in [0, 5], bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.tasks.readers import (SkipReport, SkipRow, TaskDataError, _require_file,
                                     iter_lines, read_conll, read_squad)

TaskKind = Literal["seq-cls", "pair-cls", "regression", "token-cls", "qa"]


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark task: where its files are, how it is fine-tuned and scored.

    `metric` is the headline (what the BERT paper's table reports; the key of bertflow
    finetune's eval metrics, `val_<metric>`), `metrics` every official one. `labels` are
    the label strings in id order (finetune's `--labels`), None for regression/qa/NER."""

    name: str
    task: TaskKind
    train_file: str
    eval_files: dict[str, str]
    metric: str
    metrics: tuple[str, ...]
    labels: tuple[str, ...] | None
    folder: str = ""                       # the task's folder under data_dir
    columns: tuple[str, ...] = ()          # header names: text(s) then label
    position: tuple[int, ...] = ()         # header-less files (CoLA): field indices
    width: int = 0                         # header-less files: fields per row
    alternates: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other file names


def _glue(name: str, folder: str, task: TaskKind, columns: tuple[str, ...],
          labels: tuple[str, ...] | None, metric: str, metrics: tuple[str, ...],
          evals: dict[str, str] | None = None, **extra: object) -> BenchmarkTask:
    return BenchmarkTask(name=name, task=task, train_file="train.tsv",
                         eval_files=evals or {name: "dev.tsv"}, metric=metric,
                         metrics=metrics, labels=labels, folder=folder, columns=columns,
                         **extra)  # type: ignore[arg-type]


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

# The nine GLUE tasks. Headline metrics as the BERT paper reports them: MCC for CoLA,
# F1 for MRPC and QQP, Spearman for STS-B, accuracy for the others.
GLUE_TASKS: dict[str, BenchmarkTask] = {t.name: t for t in (
    _glue("cola", "CoLA", "seq-cls", ("sentence", "label"), _BINARY, "mcc", ("mcc",),
          position=(3, 1), width=4),
    _glue("sst2", "SST-2", "seq-cls", ("sentence", "label"), _BINARY, "accuracy",
          ("accuracy",)),
    _glue("mrpc", "MRPC", "pair-cls", ("#1 String", "#2 String", "Quality"), _BINARY,
          "f1", ("f1", "accuracy")),
    _glue("qqp", "QQP", "pair-cls", ("question1", "question2", "is_duplicate"), _BINARY,
          "f1", ("f1", "accuracy")),
    _glue("stsb", "STS-B", "regression", ("sentence1", "sentence2", "score"), None,
          "spearman", ("pearson", "spearman")),
    _glue("mnli", "MNLI", "pair-cls", ("sentence1", "sentence2", "gold_label"),
          ("contradiction", "entailment", "neutral"), "accuracy", ("accuracy",),
          evals={"mnli-m": "dev_matched.tsv", "mnli-mm": "dev_mismatched.tsv"}),
    _glue("qnli", "QNLI", "pair-cls", ("question", "sentence", "label"), _NLI2,
          "accuracy", ("accuracy",)),
    _glue("rte", "RTE", "pair-cls", ("sentence1", "sentence2", "label"), _NLI2,
          "accuracy", ("accuracy",)),
    _glue("wnli", "WNLI", "pair-cls", ("sentence1", "sentence2", "label"), _BINARY,
          "accuracy", ("accuracy",)),
)}

OTHER_TASKS: dict[str, BenchmarkTask] = {t.name: t for t in (
    BenchmarkTask("squad", "qa", "train-v1.1.json", {"squad": "dev-v1.1.json"}, "f1",
                  ("exact", "f1"), None, folder="SQuAD"),
    BenchmarkTask("squad_v2", "qa", "train-v2.0.json", {"squad_v2": "dev-v2.0.json"},
                  "f1", ("exact", "f1"), None, folder="SQuAD"),
    BenchmarkTask("conll2003", "token-cls", "eng.train", {"conll2003": "eng.testa"}, "f1",
                  ("f1", "precision", "recall"), None, folder="CoNLL-2003",
                  alternates={"eng.train": ("train.txt",),
                              "eng.testa": ("valid.txt", "dev.txt")}),
)}

BENCHMARK_TASKS: dict[str, BenchmarkTask] = {**GLUE_TASKS, **OTHER_TASKS}


def benchmark_task(name: str) -> BenchmarkTask:
    """The task called `name` (case-insensitive; `sst-2`, `sts-b` and `mnli-m` too)."""
    key = name.strip().lower()
    key = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli",
           "squad-v1.1": "squad", "squad-v2.0": "squad_v2", "squad2": "squad_v2",
           "conll": "conll2003"}.get(key, key)
    if key not in BENCHMARK_TASKS:
        raise TaskDataError(f"unknown benchmark task {name!r}; known: "
                            f"{', '.join(BENCHMARK_TASKS)}")
    return BENCHMARK_TASKS[key]


def split_file(data_dir: str | Path, name: str, split: str) -> Path:
    """The distributed file of `split` ("train", an eval name such as "mnli-mm", or
    "dev" for a task's only dev set): under `data_dir/<folder>/`, else `data_dir/`."""
    t = benchmark_task(name)
    if split == "train":
        wanted = t.train_file
    elif split in t.eval_files:
        wanted = t.eval_files[split]
    elif split == "dev" and len(t.eval_files) == 1:
        wanted = next(iter(t.eval_files.values()))
    else:
        raise TaskDataError(f"{t.name}: no split {split!r}; use train or "
                            f"{', '.join(t.eval_files)}")
    root = Path(data_dir)
    folders = [root / t.folder, root] if t.folder else [root]
    names = (wanted, *t.alternates.get(wanted, ()))
    for folder in folders:
        for n in names:
            if (folder / n).is_file():
                return folder / n
    raise TaskDataError(f"{root}: no {t.name} {split} file (looked for "
                        f"{', '.join(str(f / n) for f in folders for n in names)}); pass "
                        "the folder holding the benchmark as distributed")


# --------------------------------------------------------------------- GLUE TSV

def _glue_fields(t: BenchmarkTask) -> tuple[str, ...]:
    if t.task == "seq-cls":
        return ("text",)
    return ("text_a", "text_b")


def _score(value: str) -> float | SkipRow:
    try:
        score = float(value)
    except ValueError:
        return SkipRow("bad score", f"score {value!r} is not a number")
    if not math.isfinite(score) or not 0.0 <= score <= 5.0:
        return SkipRow("bad score", f"score {value!r} is outside [0, 5]")
    return score


def read_glue_tsv(path: str | Path, t: BenchmarkTask) -> tuple[list[dict], SkipReport]:
    """Rows of one GLUE TSV as finetune records: `{"text" | "text_a", "text_b", "label",
    "line"}` (STS-B's label a float), fields split on tabs with quoting off."""
    p = _require_file(path)
    report = SkipReport()
    out: list[dict] = []
    fields = _glue_fields(t)
    known = set(t.labels) if t.labels is not None else None
    index: tuple[int, ...] | None = t.position or None
    width = t.width or None
    for lineno, line in iter_lines(p):
        where = f"{p}:{lineno}"
        if isinstance(line, SkipRow):
            if index is None:
                raise TaskDataError(f"{where}: cannot read the header line ({line.detail})")
            report.skip(line.reason, where, line.detail)
            continue
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        parts = text.split("\t")
        if index is None:  # the header
            header = [h.strip() for h in parts]
            missing = [c for c in t.columns if c not in header]
            if missing:
                raise TaskDataError(
                    f"{where}: header has no column(s) {', '.join(missing)} (found "
                    f"{', '.join(header)}); expected the {t.folder} file as distributed "
                    f"with columns {', '.join(t.columns)}")
            index, width = tuple(header.index(c) for c in t.columns), len(header)
            continue
        if len(parts) != width:
            report.skip("malformed row", where, f"{len(parts)} tab-separated fields where "
                        f"the {'header has' if not t.position else 'file has'} {width}")
            continue
        values = [parts[i].strip() for i in index]
        empty = next((c for c, v in zip((*fields, "label"), values) if not v), None)
        if empty is not None:
            report.skip("missing field", where, f"missing field {empty!r}")
            continue
        label: str | float | SkipRow = values[-1]
        if t.task == "regression":
            label = _score(values[-1])
        elif known is not None and label not in known:
            report.skip("unknown label", where, f"unknown label {label!r} (known: "
                        f"{', '.join(sorted(known))})")
            continue
        if isinstance(label, SkipRow):
            report.skip(label.reason, where, label.detail)
            continue
        out.append({**dict(zip(fields, values[:-1])), "label": label, "line": lineno})
    if index is None and not t.position:
        raise TaskDataError(f"{p}: empty file; expected the {t.folder} TSV with its header")
    return out, report


def read_benchmark_split(data_dir: str | Path, name: str,
                         split: str) -> tuple[list[dict], SkipReport]:
    """The records of one split as `data_prep.tasks.readers` gives them (and finetune
    reads them): GLUE rows `{"text"|"text_a","text_b", "label", "line"}`, SQuAD
    questions, CoNLL sentences `{"tokens", "tags", "line"}`; and the skip report."""
    t = benchmark_task(name)
    path = split_file(data_dir, t.name, split)
    if t.task == "qa":
        return read_squad(path)
    if t.task == "token-cls":
        return read_conll(path)
    return read_glue_tsv(path, t)


# ------------------------------------------------------------- finetune's view

@dataclass
class PreparedBenchmark:
    """A task ready for `bertflow finetune`: files it reads unchanged and its fields."""

    task: BenchmarkTask
    train: str                             # the train file (normalised JSONL or as distributed)
    evals: dict[str, str]                  # eval name -> file
    fields: dict[str, object]              # FinetuneConfig fields: task, labels, columns
    reports: dict[str, SkipReport] = field(default_factory=dict)  # split -> rows skipped
    rows: dict[str, int] = field(default_factory=dict)            # split -> rows kept


def finetune_fields(name: str) -> dict[str, object]:
    """The `FinetuneConfig` fields that read a prepared task's files: `task`, `labels`
    (id order, so binary F1's positive class, id 1, is GLUE's "1") and for the STS-B
    pairs `text_pair_column` (a regression reads pairs when it is given)."""
    t = benchmark_task(name)
    out: dict[str, object] = {"task": t.task}
    if t.labels is not None:
        out["labels"] = list(t.labels)
    if t.task == "regression":
        out["text_column"], out["text_pair_column"] = "text_a", "text_b"
    return out


def write_jsonl_atomic(records: list[dict], path: Path) -> Path:
    """Write records as JSONL (keys in a fixed order, no `line`) via a temporary file
    renamed into place; an unchanged file is left as it is."""
    lines = [json.dumps({k: v for k, v in r.items() if k != "line"}, ensure_ascii=False)
             for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    if path.is_file() and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def prepare_benchmark(data_dir: str | Path, name: str,
                      out_dir: str | Path) -> PreparedBenchmark:
    """Locate (and, for GLUE, normalise into `out_dir/<task>/*.jsonl`) one task's train
    and dev files; see the module doc. A split with no usable row is a TaskDataError."""
    t = benchmark_task(name)
    splits = ["train", *t.eval_files]
    result = PreparedBenchmark(task=t, train="", evals={}, fields=finetune_fields(t.name))
    for split in splits:
        if t.task in ("qa", "token-cls"):
            where = str(split_file(data_dir, t.name, split))
            records, report = read_benchmark_split(data_dir, t.name, split)
        else:
            records, report = read_benchmark_split(data_dir, t.name, split)
            where = str(write_jsonl_atomic(records, Path(out_dir) / t.name / f"{split}.jsonl"))
        if not records:
            raise TaskDataError(f"{split_file(data_dir, t.name, split)}: no usable {t.name} "
                                f"rows ({report.total} skipped: "
                                f"{'; '.join(report.messages[:3]) or 'empty file'})")
        result.reports[split], result.rows[split] = report, len(records)
        if split == "train":
            result.train = where
        else:
            result.evals[split] = where
    return result
