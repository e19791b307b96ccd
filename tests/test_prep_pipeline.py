"""End-to-end prep on a real local Ray: schema, manifest, idempotence, determinism,
atomicity under SIGKILL, bounded memory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.config import PrepConfig
from data_prep.manifest import Manifest

pytestmark = pytest.mark.ray

WORDS = ("the a of river mountain quickly said walked 北京 über naïve computer data model "
         "language small large green city people history music garden").split()


def write_corpus(root: Path, n_docs: int, seed: int = 0, bad: bool = True) -> Path:
    """Half BERT text format, half jsonl, plus files that break each bad-input rule."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def doc():
        return [" ".join(rng.choice(WORDS, int(rng.integers(4, 25)))).capitalize() + "."
                for _ in range(int(rng.integers(1, 12)))]
    with open(root / "part1.txt", "w", encoding="utf-8") as fh:
        for _ in range(n_docs // 2):
            fh.write("\n".join(doc()) + "\n\n")
    with open(root / "part2.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(n_docs - n_docs // 2):
            fh.write(json.dumps({"text": " ".join(doc())}) + "\n")
    if bad:
        (root / "empty.txt").write_bytes(b"")
        (root / "blob.txt").write_bytes(b"\x00\x01binary" * 100)
        (root / "latin1.txt").write_bytes(("ok sentence.\n\n" * 700).encode() +
                                          b"caf\xe9 cr\xe8me\n\n" + b"x" * 3000 + b"\n")
        with open(root / "broken.jsonl", "w") as fh:
            fh.write('{"text": "fine text here."}\n{oops\n{"text": ""}\n')
    return root


def config(tmp_path, minilm_dir, corpus, **kw):
    base = dict(input=[str(corpus)], output=str(tmp_path / "ds"), vocab=str(minilm_dir),
                max_seq_len=64, dupe_factor=2, docs_per_unit=25, val_fraction=0.1,
                max_line_bytes=2048, tokenize_workers=1)
    base.update(kw)
    return PrepConfig(**base)


def rows(directory: Path) -> dict[str, list]:
    out = {}
    for split in ("train", "val"):
        for f in sorted((directory / split).glob("*.parquet")):
            out[f"{split}/{f.name}"] = pq.read_table(f).to_pylist()
    return out


def test_build_schema_counts_rerun_and_determinism(ray_local, tmp_path, minilm_dir, capsys):
    from data_prep import build_pretraining_dataset
    from workflows.cli import main as cli

    corpus = write_corpus(tmp_path / "corpus", 120)
    cfg = config(tmp_path, minilm_dir, corpus)
    m = build_pretraining_dataset(cfg)
    ds = Path(cfg.output)
    assert sorted(p.name for p in ds.iterdir()) == ["manifest.json", "tokenizer", "train", "val"]

    # schema is the contract
    table = pq.read_table(next((ds / "train").glob("*.parquet")))
    assert {f.name: str(f.type) for f in table.schema} == {
        "input_ids": "list<element: int32>" if "element" in str(table.schema) else "list<item: int32>",
        "token_type_ids": str(table.schema.field("token_type_ids").type),
        "next_sentence_label": "int8", "masked_lm_positions": str(table.schema.field("masked_lm_positions").type),
        "masked_lm_ids": str(table.schema.field("masked_lm_ids").type)}
    assert table.schema.field("token_type_ids").type.value_type == "int8"
    assert table.schema.field("masked_lm_ids").type.value_type == "int32"
    first = table.to_pylist()[0]
    assert first["input_ids"][0] == 101 and first["input_ids"][-1] == 102 and len(first["input_ids"]) <= 64

    # manifest: inputs, tokenizer, counts; every document accounted for
    c = m.counts
    assert len(m.inputs) == 6 and all(len(i["sha256"]) == 64 for i in m.inputs)
    assert c["files_skipped"] == {"binary_file": 1, "empty_file": 1}
    assert c["documents_skipped"] == {"empty_document": 1, "invalid_json": 1,
                                      "line_too_long": 1, "undecodable_bytes": 1}
    assert c["documents_read"] == c["documents_used"] + sum(c["documents_skipped"].values())
    assert c["documents_used"] == 120 + 700 + 1
    n_rows = sum(pq.read_metadata(ds / f["path"]).num_rows
                 for s in m.splits.values() for f in s["files"])
    assert n_rows == c["instances"] == c["train"]["instances"] + c["val"]["instances"] > 0
    assert c["val"]["instances"] > 0 and c["masked_tokens"] > 0
    assert m.tokenizer["vocab_size"] == 30522
    assert Manifest.load(ds).fingerprint == m.fingerprint

    # rerun: up to date, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in ds.rglob("*")}
    assert cli(["prep", "rerun", str(ds)]) == 0
    assert {p: p.stat().st_mtime_ns for p in ds.rglob("*")} == mtimes
    assert build_pretraining_dataset(cfg).fingerprint == m.fingerprint
    assert {p: p.stat().st_mtime_ns for p in ds.rglob("*")} == mtimes

    # same seed, two workers and another run: identical rows
    cfg2 = config(tmp_path, minilm_dir, corpus, output=str(tmp_path / "ds2"), tokenize_workers=2)
    build_pretraining_dataset(cfg2)
    assert rows(ds) == rows(tmp_path / "ds2")

    # changed config -> rebuilt, different rows; changed input -> rebuilt
    cfg3 = config(tmp_path, minilm_dir, corpus, seed=7)
    m3 = build_pretraining_dataset(cfg3)
    assert m3.fingerprint != m.fingerprint and rows(ds) != rows(tmp_path / "ds2")
    with open(corpus / "part1.txt", "a") as fh:
        fh.write("A brand new document.\n")
    m4 = build_pretraining_dataset(cfg3)
    assert m4.counts["documents_read"] == m3.counts["documents_read"] + 1
    assert not any(p.name.startswith(".ds.") for p in tmp_path.iterdir())


def test_mlm_dynamic_and_trained_vocab(ray_local, tmp_path, minilm_dir):
    from data_prep import build_pretraining_dataset
    from data_prep.tokenizer import WordPieceTokenizer

    corpus = write_corpus(tmp_path / "corpus", 40, bad=False)
    cfg = config(tmp_path, minilm_dir, corpus, vocab=None, train_vocab=200,
                 objective="mlm", masking="dynamic", val_fraction=0.0)
    m = build_pretraining_dataset(cfg)
    ds = Path(cfg.output)
    table = pq.read_table(ds / "train")
    assert table.column_names == ["input_ids", "token_type_ids"]
    tok = WordPieceTokenizer.from_dir(ds)
    assert tok.vocab_size <= 200 and m.tokenizer["fingerprint"] == tok.fingerprint()
    assert m.counts["masked_tokens"] == 0 and m.splits["val"]["files"] == []


def _spawn(code: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


BUILD = """
    import json, resource, sys
    from data_prep import PrepConfig, build_pretraining_dataset
    cfg = PrepConfig(**json.loads(sys.argv[1] if len(sys.argv) > 1 else {cfg!r}))
    build_pretraining_dataset(cfg)
    print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def test_sigkill_midway_leaves_no_partial_output(ray_local, tmp_path, minilm_dir):
    from data_prep import build_pretraining_dataset

    corpus = write_corpus(tmp_path / "corpus", 800, bad=False)
    cfg = config(tmp_path, minilm_dir, corpus, docs_per_unit=10, address=_address(ray_local))
    fields = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    proc = _spawn(BUILD.format(cfg=json.dumps(fields)), tmp_path)
    deadline = time.time() + 240
    parts = []
    while time.time() < deadline and proc.poll() is None:
        # midway: some units already turned into (bucketed) instances
        parts = list(tmp_path.glob(".ds.tmp-*/_staging/instances-*.arrow"))
        if len(parts) >= 2:
            break
        time.sleep(0.2)
    assert parts, f"no unit done before the deadline: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ds").exists()  # killed midway: no DIR at all
    m = build_pretraining_dataset(PrepConfig(**{**fields, "address": None}))
    assert (tmp_path / "ds" / "manifest.json").is_file() and m.counts["instances"] > 0
    assert not list(tmp_path.glob(".ds.*"))  # the killed run's temp folder is gone


@pytest.mark.slow
def test_peak_memory_grows_far_less_than_corpus(ray_local, tmp_path, minilm_dir):
    peaks = {}
    for scale in (1, 10):
        corpus = write_corpus(tmp_path / f"c{scale}", 1500 * scale, seed=scale, bad=False)
        cfg = config(tmp_path, minilm_dir, corpus, output=str(tmp_path / f"ds{scale}"),
                     objective="mlm", dupe_factor=1, docs_per_unit=500,
                     address=_address(ray_local))
        size = sum(f.stat().st_size for f in corpus.iterdir())
        fields = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
        proc = _spawn(BUILD.format(cfg=json.dumps(fields)), tmp_path)
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        peaks[scale] = (int(out.split("MAXRSS")[1]), size)
    (rss1, size1), (rss10, size10) = peaks[1], peaks[10]
    assert size10 > 9 * size1
    # streaming: 10x the text, about the same memory. Holding the corpus would add more
    # than its size in Python strings (a 49-byte header per str, list slots); allow growth
    # under the added bytes (RSS noise, and the driver's state per Ray task: 30 units
    # instead of 3 grew it by 4.3-4.6 MB, 0.56-0.60 of the 7.7 MB added)
    assert (rss10 - rss1) * 1024 < size10 - size1, peaks


def test_output_inside_the_input_folder_is_not_read_back(ray_local, tmp_path, minilm_dir):
    from data_prep import build_pretraining_dataset

    corpus = write_corpus(tmp_path / "corpus", 30, bad=False)
    cfg = config(tmp_path, minilm_dir, corpus, output=str(corpus / "ds"), dupe_factor=1)
    first = build_pretraining_dataset(cfg)
    again = build_pretraining_dataset(cfg)  # sees the same two input files: up to date
    assert len(first.inputs) == 2 and again.fingerprint == first.fingerprint
    assert again.created_at == first.created_at


def test_one_document_files_nsp_pool_and_global_shuffle(ray_local, tmp_path, minilm_dir):
    """A corpus of one-document files (the layout where a per-file pool fails): random
    next segments come from another document of the same split, consecutive rows rarely
    share a document, and rows do not depend on workers or unit size."""
    from data_prep import build_pretraining_dataset
    from data_prep.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer.from_dir(minilm_dir)
    words = [w for w, i in sorted(tok.vocab.items(), key=lambda kv: kv[1])
             if w.isalpha() and w.isascii() and len(w) > 3 and i > 2000][:60 * 12]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    owner = {}  # token id -> the document (file) whose words hold it
    rng = np.random.default_rng(0)
    for d in range(60):
        mine = words[d * 12:(d + 1) * 12]
        owner.update({tok.vocab[w]: d for w in mine})
        sents = [" ".join(rng.choice(mine, int(rng.integers(4, 12)))) + " ." for _ in range(8)]
        (corpus / f"doc{d:03d}.txt").write_text("\n".join(sents) + "\n")
    cfg = config(tmp_path, minilm_dir, corpus, docs_per_unit=1, dupe_factor=3,
                 val_fraction=0.2, max_seq_len=48)
    m = build_pretraining_dataset(cfg)
    ds = Path(cfg.output)
    again = config(tmp_path, minilm_dir, corpus, output=str(tmp_path / "ds2"),
                   docs_per_unit=7, dupe_factor=3, val_fraction=0.2, max_seq_len=48,
                   tokenize_workers=2, tokenize_on="ray")
    build_pretraining_dataset(again)
    # unit size, workers and where the text is tokenized (here the driver, there Ray
    # tasks) change nothing
    assert rows(ds) == rows(tmp_path / "ds2")

    docs_of = {}
    for split in ("train", "val"):
        table = pq.read_table(ds / split)
        docs_in_split, sources, randoms = set(), [], 0
        for row in table.to_pylist():
            ids = np.array(row["input_ids"])
            ids[row["masked_lm_positions"]] = row["masked_lm_ids"]  # unmask
            sep = int(np.flatnonzero(ids == tok.sep_id)[0])
            a = {owner[t] for t in ids[1:sep] if t in owner}
            b = {owner[t] for t in ids[sep + 1:-1] if t in owner}
            assert len(a) == 1  # A is one document's text
            sources.append(a.pop())
            docs_in_split.add(sources[-1])
            if row["next_sentence_label"] == 1:
                randoms += 1
                assert sources[-1] not in b, "random next from A's own document"
            docs_of.setdefault(split, []).append(b)
        assert randoms > 0.3 * len(sources)
        # B comes from the same split's documents (val draws from val's pool)
        assert set().union(*docs_of[split]) <= docs_in_split
        same_next = np.mean([x == y for x, y in zip(sources[:-1], sources[1:])])
        assert same_next < 0.15, same_next  # grouped by file it would be ~0.9
    assert m.extra["shuffle"]["scope"] == "split"


def test_pass_tasks_fail_loudly(ray_local, tmp_path, minilm_dir):
    """A pass runs as plain Ray tasks, `tokenize_workers` at a time: every item gets its
    result, and one failed item fails the pass with its cause."""
    from data_prep.pipeline import run_tasks

    cfg = config(tmp_path, minilm_dir, tmp_path, tokenize_workers=2)
    where = (str(minilm_dir), cfg, str(tmp_path), str(tmp_path))
    (tmp_path / "none.json").write_text("[]")  # a split without instance files
    nothing = {"split": "train", "buckets": 5, "units_file": str(tmp_path / "none.json")}
    done = run_tasks("merge", [{**nothing, "bucket": b} for b in range(5)], *where)
    assert [(r["bucket"], r["file"]) for r in done] == [(b, None) for b in range(5)]
    merge = {"split": "train", "buckets": 1, "units_file": str(tmp_path / "no-such.json")}
    with pytest.raises(Exception, match="no-such.json"):
        run_tasks("merge", [{**merge, "bucket": 0}] * 4, *where)
    # the other failed tasks were taken too: Ray reports no unhandled error afterwards
    # (it did, in whatever test this worker ran next, when their refs were collected)
    import gc
    import logging

    reported = []
    handler = logging.Handler()
    handler.emit = lambda record: reported.append(record.getMessage())
    ray_worker_log = logging.getLogger("ray._private.worker")
    ray_worker_log.addHandler(handler)
    try:
        gc.collect()
        time.sleep(1.5)  # Ray's error-reporting thread
        gc.collect()
    finally:
        ray_worker_log.removeHandler(handler)
    assert not [m for m in reported if "Unhandled error" in m], reported



def test_pass_on_this_machines_processes(tmp_path, minilm_dir, caplog):
    """With no Ray, a pass runs on `PrepProcesses` once they are started (by the
    tokenizing), else in this process when it is small: the same results in item order
    either way; a failed item fails the pass with its cause, and a process that dies
    fails it with `ProcessDied`, saying what to check."""
    import logging

    from data_prep.pipeline import run_tasks
    from data_prep.processes import PrepProcesses, ProcessDied

    cfg = config(tmp_path, minilm_dir, tmp_path, tokenize_workers=2)
    where = (str(minilm_dir), cfg, str(tmp_path), str(tmp_path))
    (tmp_path / "none.json").write_text("[]")
    nothing = {"split": "train", "buckets": 7, "units_file": str(tmp_path / "none.json")}
    items = [{**nothing, "bucket": b} for b in range(7)]
    merge = {"split": "train", "buckets": 1, "units_file": str(tmp_path / "no-such.json")}
    with caplog.at_level(logging.INFO, logger="data_prep.pipeline"):
        with PrepProcesses(2) as cold:  # never started: 7 tiny items run here
            done = run_tasks("merge", items, *where, processes=cold)
            assert not cold.started
        assert [(r["bucket"], r["file"]) for r in done] == [(b, None) for b in range(7)]
        assert "merge: the 7 tasks take this process about" in caplog.text
        assert "on this process (1 processes)" in caplog.text
        with PrepProcesses(2) as warm:
            assert warm.submit(os.getpid).result() != os.getpid()
            caplog.clear()
            done = run_tasks("merge", items, *where, processes=warm)
            assert [(r["bucket"], r["file"]) for r in done] == [(b, None) for b in range(7)]
            assert re.search(r"merge: 7 tasks, .* on 2 local process\(es\) \([12] processes",
                             caplog.text), caplog.text
            with pytest.raises(FileNotFoundError, match="no-such.json"):
                run_tasks("merge", [{**merge, "bucket": 0}] * 4, *where, processes=warm)
            with pytest.raises(ProcessDied, match="ended abruptly.*--tokenize-workers"):
                PrepProcesses.result(warm.submit(os._exit, 9))
