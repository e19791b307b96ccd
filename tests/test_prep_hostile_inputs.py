"""Hostile pretraining inputs and outputs: FIFOs and outward symlinks in input
folders, gzip bombs, and an --output folder that only looks like a dataset."""

from __future__ import annotations

import gzip
import os
from collections import Counter

import pytest

from bert_core.config_io import ConfigError
from data_prep.config import PrepConfig
from data_prep.manifest import Manifest, ManifestError, fingerprint_file, is_dataset_folder
from data_prep.readers import PrepInputError, expand_inputs, iter_documents


@pytest.mark.timeout(30)
def test_a_fifo_in_an_input_folder_is_skipped_and_counted_not_waited_on(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("One sentence.\n")
    os.mkfifo(corpus / "pipe.txt")
    skipped: Counter = Counter()
    files = expand_inputs([str(corpus)], skipped)
    assert [f.name for f in files] == ["a.txt"]
    assert skipped == {"files_skipped.not_regular_file": 1}
    assert [f.name for f in expand_inputs([str(corpus / "*.txt")], skipped)] == ["a.txt"]
    with pytest.raises(PrepInputError, match="not a regular file"):
        expand_inputs([str(corpus / "pipe.txt")])
    stats: Counter = Counter()
    assert list(iter_documents(corpus / "pipe.txt", stats)) == []
    assert stats == {"files_skipped.not_regular_file": 1}
    with pytest.raises(ManifestError, match="not a regular file"):
        fingerprint_file(corpus / "pipe.txt")


def test_symlinks_leading_outside_the_input_folder_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a private key\n")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("Text.\n")
    (corpus / "leak.txt").symlink_to(secret)
    (corpus / "sub" / "inside.txt").symlink_to(corpus / "a.txt")
    (corpus / "outdir").symlink_to(tmp_path, target_is_directory=True)
    skipped: Counter = Counter()
    files = expand_inputs([str(corpus)], skipped)
    assert secret not in files and [f.name for f in files] == ["a.txt"]  # inside link: a dupe
    assert skipped == {"files_skipped.symlink_outside_input": 1,
                       "files_skipped.symlinked_folder": 1}
    assert expand_inputs([str(corpus / "leak.txt")]) == [secret]  # named explicitly: allowed


@pytest.mark.timeout(30)
def test_a_link_or_fifo_swapped_in_after_expansion_is_not_followed(tmp_path):
    """Expansion checks the files; the reader opens each one again later. A file replaced
    by a link to a secret (or by a FIFO) in between is refused on the descriptor
    (O_NOFOLLOW, O_NONBLOCK, fstat), never read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("The private key is here.\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", "c.parquet"):
        (corpus / name).write_text("Public text.\n")
    files = expand_inputs([str(corpus)])
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.parquet"]
    for f in (files[0], files[2]):
        f.unlink()
        f.symlink_to(secret)
    files[1].unlink()
    os.mkfifo(files[1])
    for f in files:
        stats: Counter = Counter()
        assert list(iter_documents(f, stats)) == []
        assert stats == {"files_skipped.not_regular_file": 1}
    # A link inside the folder is read as its target, resolved at expansion: swapping the
    # link afterwards changes nothing.
    (corpus / "real.txt").write_text("Inside text.\n")
    (corpus / "alias.txt").symlink_to(corpus / "real.txt")
    listed = expand_inputs([str(corpus / "alias.txt")])
    assert listed == [corpus / "real.txt"]
    (corpus / "alias.txt").unlink()
    (corpus / "alias.txt").symlink_to(secret)
    assert list(iter_documents(listed[0], Counter())) == [["Inside text."]]


def test_decompressed_size_of_a_gz_is_capped_and_counted(tmp_path):
    bomb = tmp_path / "bomb.txt.gz"
    doc = "A sentence that repeats. " * 40 + "\n\n"
    with gzip.open(bomb, "wt") as fh:
        fh.write(doc * 3000)  # ~3 MB of text from a few KB
    assert bomb.stat().st_size < 100_000
    stats: Counter = Counter()
    docs = list(iter_documents(bomb, stats, max_decompressed_bytes=1 << 20))
    assert 0 < len(docs) < 3000
    assert stats["files_skipped.decompressed_too_large"] == 1
    assert stats["documents_read"] == len(docs)  # every document read was kept
    full: Counter = Counter()
    assert len(list(iter_documents(bomb, full))) == 3000  # the default cap is far higher
    with pytest.raises(ConfigError, match="max_decompressed_bytes"):
        PrepConfig(max_decompressed_bytes=10)


def test_only_a_folder_whose_manifest_loads_counts_as_a_dataset(tmp_path):
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "My App", "icons": []}')
    (web / "index.html").write_text("<html></html>")
    for text in ('{"name": "My App", "icons": []}', "{}", "[]", '{"kind": 1, "config": {}, '
                 '"inputs": [], "tokenizer": {}}', "\xff"):
        (web / "manifest.json").write_text(text, encoding="latin-1")
        assert not is_dataset_folder(web)
        with pytest.raises(ManifestError, match="manifest.json"):
            Manifest.load(web)
    real = tmp_path / "ds"
    real.mkdir()
    Manifest(kind="pretraining", config={}, inputs=[], tokenizer={}).save(real)
    assert is_dataset_folder(real)


def test_prep_refuses_to_replace_a_folder_that_only_has_a_manifest_json(tmp_path, minilm_dir):
    from data_prep.pipeline import build_pretraining_dataset

    corpus = tmp_path / "c.txt"
    corpus.write_text("One sentence here.\nAnd another.\n")
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "My App"}')
    (web / "index.html").write_text("<html></html>")
    config = PrepConfig(input=[str(corpus)], output=str(web), vocab=str(minilm_dir))
    with pytest.raises(ManifestError, match=f"{web} exists and is not a bertflow dataset"):
        build_pretraining_dataset(config)
    assert (web / "index.html").is_file()
