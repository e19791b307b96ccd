"""`bertflow datasets list`: finds prepared datasets, summarises them, flags stale ones."""

from __future__ import annotations

import json

import pytest

from tests.helpers import pydoc_corpus
from workflows.cli import main as cli
from workflows.ops.datasets import find_datasets


def test_search_skips_hidden_and_environment_folders(tmp_path):
    for d in ("a/ds1", "b/c/ds2", ".tmp-ds3", ".venv/x", "a/ds1/train"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "manifest.json").write_text("{}")
    found = [p.relative_to(tmp_path).as_posix() for p in find_datasets(tmp_path)]
    assert found == ["a/ds1", "b/c/ds2"]


def test_unreadable_manifest_is_reported_not_fatal(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert cli(["datasets", "list", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"].startswith("unreadable") and "invalid JSON" in row["status"]


def test_missing_root_is_a_clear_error(tmp_path, capsys):
    assert cli(["datasets", "list", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.ray
def test_lists_a_real_dataset_then_flags_it_stale_when_its_input_changes(
        ray_local, tmp_path, minilm_dir, capsys):
    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pretraining_dataset

    corpus = pydoc_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "data" / "pydoc64"
    build_pretraining_dataset(PrepConfig(
        input=[str(corpus)], output=str(out), vocab=str(minilm_dir / "vocab.txt"),
        max_seq_len=64, dupe_factor=1))

    assert cli(["datasets", "list", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert row["path"] == str(out) and row["status"] == "up to date"
    assert row["kind"] == manifest["kind"] and row["objective"] == "nsp"
    assert row["instances"] == manifest["counts"]["instances"] > 0
    assert row["tokens"] == manifest["counts"]["tokens"] > 0

    with corpus.open("a", encoding="utf-8") as fh:
        fh.write("\nA new paragraph appended to the corpus after the build.\n")
    assert cli(["datasets", "list", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "STALE" in table and "changed" in table


def test_show_a_dataset_and_list_whole_paths(tmp_path, capsys):
    """`datasets show DIR` says how a dataset was made and how to use it; `datasets list`
    prints paths whole (pasted into `prep rerun`), however long."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "wiki128"
    deep.mkdir(parents=True)
    manifest = {"kind": "pretraining", "config": {"objective": "sop", "max_seq_len": 128,
                                                  "vocab": "models:/minilm/1", "seed": 3},
                "inputs": [{"path": "/data/corpus.txt", "size": 10, "sha256": "0" * 64}],
                "tokenizer": {"fingerprint": "f" * 64, "vocab_size": 30522,
                              "do_lower_case": True},
                "counts": {"instances": 7, "tokens": 90, "documents_skipped": {"empty": 1}},
                "splits": {"train": {"instances": 7, "files": []}}, "fingerprint": "e" * 64,
                "created_at": "2026-01-01T00:00:00Z"}
    (deep / "manifest.json").write_text(json.dumps(manifest))
    assert cli(["datasets", "list", str(tmp_path), "--no-check"]) == 0
    out = capsys.readouterr().out
    assert str(deep) in out and "…" not in out
    assert cli(["datasets", "show", str(deep), "--no-check"]) == 0
    text = capsys.readouterr().out
    assert "objective sop" in text and "vocab models:/minilm/1" in text
    assert "vocab 30522, lowercase" in text and "/data/corpus.txt" in text
    assert "skipped     empty 1" in text
    assert f"bertflow pretrain --data {deep} --run-name NAME" in text
    assert cli(["datasets", "show", str(tmp_path / "nope")]) == 2
