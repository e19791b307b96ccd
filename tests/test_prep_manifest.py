"""Atomic output folders and manifests (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data_prep.manifest import (Manifest, ManifestError, atomic_output_dir, build_fingerprint,
                                fingerprint_file, is_up_to_date)


def _manifest(inputs, fp="abc"):
    return Manifest(kind="pretraining", config={"seed": 1}, inputs=inputs,
                    tokenizer={"fingerprint": "t"}, fingerprint=fp,
                    splits={"train": {"files": []}})


def test_atomic_dir_appears_only_on_success(tmp_path):
    final = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final) as tmp:
            (tmp / "part.parquet").write_text("half")
            assert tmp.parent == tmp_path and tmp.name.startswith(".ds.tmp-")
            # not guessable from the pid (a planted folder or link cannot be waiting)
            assert tmp.name != f".ds.tmp-{os.getpid()}" and tmp.name.endswith(f"-{os.getpid()}")
            raise RuntimeError("killed")
    assert not final.exists() and os.listdir(tmp_path) == []
    with atomic_output_dir(final) as tmp:
        (tmp / "part.parquet").write_text("whole")
    assert (final / "part.parquet").read_text() == "whole"
    with pytest.raises(ManifestError, match="already exists"):
        with atomic_output_dir(final):
            pass
    with atomic_output_dir(final, force=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(os.listdir(final)) == ["new"] and os.listdir(tmp_path) == ["ds"]


def test_stale_temp_dir_of_a_killed_process_is_cleaned(tmp_path):
    # a process that died: its pid no longer exists
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".ds.tmp-{proc.stdout.strip()}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with atomic_output_dir(tmp_path / "ds") as tmp:
        (tmp / "ok").write_text("1")
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_manifest_roundtrip_and_up_to_date(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    info = fingerprint_file(src)
    assert info["size"] == 6 and len(info["sha256"]) == 64
    ds = tmp_path / "ds"
    ds.mkdir()
    fp = build_fingerprint({"seed": 1}, [info], "tok")
    _manifest([info], fp).save(ds)
    again = Manifest.load(ds)
    assert again.inputs == [info] and again.created_at
    assert is_up_to_date(ds, fp) == (True, "up to date")
    assert is_up_to_date(ds, build_fingerprint({"seed": 2}, [info], "tok"))[0] is False
    src.write_text("hellO\n")  # same size, different content
    ok, reason = is_up_to_date(ds)
    assert not ok and "changed" in reason
    assert is_up_to_date(tmp_path / "none")[0] is False
    (ds / "manifest.json").write_text("{broken")
    with pytest.raises(ManifestError, match="invalid JSON"):
        Manifest.load(ds)
