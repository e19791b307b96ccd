"""Checksum manifests of model files: what a registered version held when it was registered.

A manifest is the text `sha256sum` writes and `sha256sum -c` reads: one line
`<64 hex digits>  <path relative to the model's root>` per regular file, sorted by path.
`workflows.tracking` records one for every registered model version (the artifact
`MANIFEST_FILE`, and the manifest's own sha256 as a version tag, so a changed manifest is
detected too) and checks it whenever it resolves a `models:/` reference. Pure stdlib: no
MLflow here.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bert_core.config_io import BertflowError

MANIFEST_FILE = "bertflow.sha256"
# Written by MLflow into a downloaded registered model; never stored with the model.
LOCAL_ONLY_FILES = frozenset({"registered_model_meta"})

_LINE = re.compile(r"^(?P<digest>[0-9a-f]{64}) [ *](?P<path>.+)$")


class ManifestError(BertflowError):
    """A checksum manifest cannot be written or read; the message names the file."""


@dataclass(frozen=True)
class FileCheck:
    """One file's verdict: OK, MISMATCH (other content), MISSING (listed, absent) or
    UNEXPECTED (present, not listed)."""

    path: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (model weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _model_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `root` that a manifest covers.
    A symlink is an error: a model's files are plain files, and a link could point
    anywhere on the machine that verifies."""
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise ManifestError(f"{p}: a symbolic link among the model's files; a model "
                                f"holds plain files only")
        if p.is_file() and rel != MANIFEST_FILE and rel not in LOCAL_ONLY_FILES:
            files.append(rel)
    return files


def build_manifest(root: Path) -> str:
    """The manifest of every file under `root` (the manifest file itself excluded)."""
    return "".join(f"{file_sha256(root / rel)}  {rel}\n" for rel in _model_files(root))


def folder_manifest(root: Path) -> str:
    """The manifest of every file under a local folder, links followed (what copying the
    folder reads): the fingerprint of a model folder a run starts from
    (workflows.tracking.pin_model). A registered version's files use `build_manifest`."""
    files = []
    for folder, _, names in os.walk(root, followlinks=True):
        files += [Path(folder, n) for n in names if Path(folder, n).is_file()]
    rels = sorted((p.relative_to(root).as_posix(), p) for p in files)
    return "".join(f"{file_sha256(p)}  {rel}\n" for rel, p in rels)


def parse_manifest(text: str, source: str) -> dict[str, str]:
    """{relative path: sha256} of a manifest; a malformed line or a path leaving the
    model's root is a ManifestError naming `source` and the line."""
    entries: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _LINE.match(line)
        path = PurePosixPath(m["path"]) if m else None
        if path is None or path.is_absolute() or ".." in path.parts:
            raise ManifestError(f"{source}:{n}: not a manifest line "
                                f"('<sha256>  <relative path>'): {line[:80]!r}")
        entries[str(path)] = m["digest"]
    return entries


def check_files(root: Path, manifest: str, source: str = MANIFEST_FILE) -> list[FileCheck]:
    """Each file's verdict against `manifest`: every listed file, then unlisted ones."""
    expected = parse_manifest(manifest, source)
    present = set(_model_files(root))
    checks = []
    for rel, digest in sorted(expected.items()):
        if rel not in present:
            checks.append(FileCheck(rel, "MISSING"))
        else:
            same = file_sha256(root / rel) == digest
            checks.append(FileCheck(rel, "OK" if same else "MISMATCH"))
    checks += [FileCheck(rel, "UNEXPECTED") for rel in sorted(present - set(expected))]
    return checks
