"""Reading raw corpora as a stream of documents (lists of sentences), safely.

Formats, chosen by suffix (a trailing `.gz` means gzip):
- text (`.txt` and anything unrecognised): BERT's format, one sentence per line and a
  blank line between documents (several blank lines count as one).
- `.jsonl`: one document per record, its text in `text_field`; split into sentences.
- `.parquet`: one document per row of column `text_field`; split into sentences.

Rules for bad input (each counted in the `Counter` passed in, and so in the manifest;
none stops the run). Every document read is either yielded or skipped with a reason, so
`documents_read == yielded + sum(skipped.*)`:
- file of zero bytes (or empty once decompressed): `files_skipped.empty_file`.
- binary file (a NUL byte in its first 8 KiB): `files_skipped.binary_file`, nothing read.
- corrupt gzip stream: documents so far are kept, `files_skipped.corrupt_compressed_file`.
- a document with a NUL byte later on: `skipped.nul_bytes`.
- a document with bytes that are not UTF-8: `skipped.undecodable_bytes` (we do not guess
  encodings; re-encode the file as UTF-8 to keep it).
- a line over `max_line_bytes` (e.g. a 50 MB line with no newline): the line is consumed
  in 1 MiB chunks without being held, and its whole document is skipped
  (`skipped.line_too_long`); memory stays bounded.
- a jsonl record that is not JSON: `skipped.invalid_json`; no string `text_field`:
  `skipped.missing_text_field`; a blank text: `skipped.empty_document`.
- a document over 8 MiB of text is cut at sentence boundaries into several documents
  (`oversize_documents_split`), so one huge document cannot exhaust a worker's memory.
- a `.gz` that decompresses to more than `max_decompressed_bytes`: documents so far are
  kept, the rest is not read (`files_skipped.decompressed_too_large`).
Files found in input folders (and globs) that are not regular files (FIFOs, sockets,
devices: reading one could block forever) are skipped, as are symlinks whose target lies
outside the folder searched (`files_skipped.not_regular_file`,
`files_skipped.symlink_outside_input`, counted by `expand_inputs`).
A missing path, a glob matching nothing, a named path that is not a regular file, or a
Parquet file without the text column is a user error raised before any work
(`PrepInputError`).

Inputs may also be URIs that `pyarrow.fs` resolves (`s3://bucket/prefix/`, a file, or a
glob inside a prefix: `s3://bucket/shards/*.jsonl.gz`), expanded by `expand_locations`
and read as streams through pyarrow (a `.gz` still capped by `max_decompressed_bytes`);
the same rules and counts apply. Keys under a prefix whose name (or a folder's) starts
with "." are left out, as hidden files are in local folders. An object store has no
FIFOs or symlinks, so those checks are local only. A missing bucket, an unknown scheme or
refused credentials is a `storage.LocationError`; a prefix that holds no file is a
`PrepInputError`, both before any work.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
import logging
import re
import stat
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from bert_core.config_io import BertflowError
from data_prep.storage import (Location, NotRegularFile, check_location, is_uri, open_location,
                              open_regular, public_uri)

log = logging.getLogger(__name__)

MAX_DOC_BYTES = 8 << 20
MAX_DECOMPRESSED_BYTES = 8 << 30  # default cap on what one .gz may expand to
_SNIFF_BYTES = 8192
_SKIP_CHUNK = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])\s+(?=\S)|(?<=[\u3002\uff01\uff1f])")


class PrepInputError(BertflowError):
    """An input path or file that cannot be used as given."""


def file_format(path: str | Path) -> tuple[str, bool]:
    """(format, gzipped) from the suffixes: format is "text", "jsonl" or "parquet"."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl", gz
    if name.endswith(".parquet"):
        if gz:
            raise PrepInputError(f"{path}: gzip-compressed Parquet is not supported; Parquet "
                                 "compresses its own pages, pass the .parquet file")
        return "parquet", False
    return "text", gz


def expand_inputs(patterns: Sequence[str], skipped: Counter | None = None) -> list[Path]:
    """Regular files named by local `patterns` (files, folders searched recursively,
    globs), in a stable order. Raises PrepInputError naming every missing path, before any
    work is done.

    Inside folders and glob matches, entries that are not regular files (FIFOs, sockets,
    devices) and symlinks leading outside the folder searched are left out, logged and
    counted in `skipped` as `files_skipped.<reason>`; a path named directly must be a
    regular file."""
    return [Path(f) for f in expand_locations(patterns, skipped)]


def expand_locations(patterns: Sequence[str], skipped: Counter | None = None) -> list[str]:
    """Like `expand_inputs`, for local paths and URIs alike: the input files as strings
    (absolute resolved paths, or URIs without query strings), duplicates removed."""
    files: list[str] = []
    missing: list[str] = []
    skipped = skipped if skipped is not None else Counter()
    for pattern in patterns:
        if is_uri(pattern) and not pattern.lower().startswith("file://"):
            files += _expand_uri(pattern, missing)
        else:
            if pattern.lower().startswith("file://"):
                pattern = open_location(pattern).path
            files += [str(f.resolve()) for f in _expand_local(pattern, skipped, missing)]
    if missing:
        raise PrepInputError("input not found: " + "; ".join(missing)
                             + ". Check the --input paths (files, folders or globs).")
    return list(dict.fromkeys(files))


def _expand_local(pattern: str, skipped: Counter, missing: list[str]) -> list[Path]:
    p = Path(pattern).expanduser()
    if glob.has_magic(pattern):
        base = _glob_base(p)
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        found = []
        for m in matches:
            if m.is_dir() and not m.is_symlink():
                found += _walk(m, skipped)
            elif (usable := _usable(m, base, skipped)) is not None:
                found.append(usable)
        if not found:
            missing.append(f"{pattern} (glob matches no file)")
        return found
    if p.is_dir():
        found = _walk(p, skipped)
        if not found:
            missing.append(f"{pattern} (folder holds no file)")
        return found
    if p.exists() and not p.is_file():
        missing.append(f"{pattern} (not a regular file: a FIFO, socket or device)")
    elif p.is_file():  # a link the user named: its target, resolved once
        return [p.resolve() if p.is_symlink() else p]
    else:
        missing.append(pattern)
    return []


def _expand_uri(pattern: str, missing: list[str]) -> list[str]:
    """Files of one URI: an object, every object under a prefix, or a glob's matches (a
    matched "folder" brings every object under it). Hidden names are left out."""
    shown = public_uri(pattern)
    magic = glob.has_magic(pattern.split("://", 1)[1].split("?", 1)[0])
    root = pattern
    if magic:  # list from the prefix before the first wildcard
        scheme, rest = pattern.split("://", 1)
        where, _, query = rest.partition("?")
        parts = where.split("/")
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = f"{scheme}://{'/'.join(parts[:fixed])}" + (f"?{query}" if query else "")
    loc = check_location(root, "--input", must_exist=False)
    if not magic and loc.is_file():
        return [loc.uri]
    files = [f for f in loc.list_files()
             if not any(part.startswith(".") for part in f.path[len(loc.path):].split("/"))]
    if magic:
        want = open_location(pattern).path.split("/")
        files = [f for f in files if _glob_match(want, f.path.split("/"))]
    if not files:
        what = "glob matches no file" if magic else "no such object, or a prefix holding no file"
        missing.append(f"{shown} ({what})")
    return [f.uri for f in files]


def _glob_match(pattern: list[str], path: list[str]) -> bool:
    """Component-wise glob match: `*`, `?`, `[...]` within one name, `**` any number of
    names; a path under a matched folder matches too."""
    if not pattern:
        return True  # the pattern named a folder above this path (or the path itself)
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) \
        and _glob_match(pattern[1:], path[1:])


def _glob_base(pattern: Path) -> Path:
    """The folder part of a glob before its first wildcard."""
    parts = []
    for part in pattern.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _usable(path: Path, root: Path, skipped: Counter) -> Path | None:
    """The file to read for `path`: itself when a regular file, its target (resolved now,
    once) when a symlink to a regular file inside `root`; None (counted and logged) for
    anything else. Readers open the returned path without following links
    (storage.open_regular), so a link swapped in later is never followed."""
    reason = None
    target = path
    try:
        if path.is_symlink():
            target = path.resolve()
            if root.resolve() != target and root.resolve() not in target.parents:
                reason = "symlink_outside_input"
        if reason is None and not stat.S_ISREG(os.stat(target).st_mode):
            reason = "not_regular_file"
    except (OSError, RuntimeError):  # dangling link, loop, no permission
        reason = "not_regular_file"
    if reason is None:
        return target
    skipped[f"files_skipped.{reason}"] += 1
    log.warning("%s: skipped (%s)", path, reason.replace("_", " "))
    return None


def _walk(folder: Path, skipped: Counter) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            skipped["files_skipped.symlinked_folder"] += 1  # os.walk does not follow them
            log.warning("%s: symlinked folder not followed", Path(root) / d)
        out += [usable for n in sorted(names) if not n.startswith(".")
                and (usable := _usable(Path(root) / n, folder, skipped)) is not None]
    return out


def split_sentences(text: str) -> list[str]:
    """Sentences of a free-text document: every line break ends one; inside a line a
    sentence ends at . ! ? … followed by whitespace, or right after 。！？ (CJK)."""
    out = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line):
            piece = piece.strip()
            if piece:
                out.append(piece)
    return out


class DecompressedTooLarge(Exception):
    """A .gz expanded past its cap (a gzip bomb, or a cap set too low for the corpus)."""


class _CappedGzipFile(gzip.GzipFile):
    """A GzipFile that raises DecompressedTooLarge once more than `cap` bytes came out."""

    def __init__(self, source: Path | IO[bytes], cap: int):
        if isinstance(source, Path):
            super().__init__(source, "rb")
        else:
            super().__init__(fileobj=source, mode="rb")
            self._source = source  # GzipFile does not close a fileobj it was given
        self.cap, self.produced = cap, 0

    def _count(self, data: bytes) -> bytes:
        self.produced += len(data)
        if self.produced > self.cap:
            raise DecompressedTooLarge(f"decompresses to more than {self.cap} bytes")
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self._count(super().read(size if size is None or size < 0
                                        else min(size, self.cap + 1)))

    def readline(self, size: int | None = -1) -> bytes:
        return self._count(super().readline(size))

    def close(self) -> None:
        try:
            super().close()
        finally:
            source = getattr(self, "_source", None)
            if source is not None:
                source.close()


Source = Path | Location  # a local file, or a file on a pyarrow filesystem


def _open_binary(source: Source, gz: bool, cap: int = MAX_DECOMPRESSED_BYTES) -> IO[bytes]:
    if isinstance(source, Location):  # a buffered stream: readline on the raw one is slow
        raw: IO[bytes] = io.BufferedReader(source.open_input_stream(), 1 << 20)
        return _CappedGzipFile(raw, cap) if gz else raw
    raw = open_regular(source)  # no link followed, no FIFO opened: checked on the descriptor
    return _CappedGzipFile(raw, cap) if gz else raw


def _size(source: Source) -> int:
    return (source.size() or 0) if isinstance(source, Location) else source.stat().st_size


def sniff_file(path: Source) -> str | None:
    """A files_skipped reason ("empty_file", "binary_file", "corrupt_compressed_file") or
    None when the file looks like text."""
    fmt, gz = file_format(path.name)
    if _size(path) == 0:
        return "empty_file"
    if fmt == "parquet":
        return None
    try:
        with _open_binary(path, gz) as fh:
            head = fh.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error):
        return "corrupt_compressed_file"
    if not head:
        return "empty_file"
    if b"\0" in head:
        return "binary_file"
    return None


def _read_lines(fh: IO[bytes], max_line_bytes: int) -> Iterator[bytes | None]:
    """Lines (with newline) of at most max_line_bytes; None stands for a longer line,
    whose remainder is read and dropped in chunks (never held whole)."""
    while True:
        line = fh.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while True:
                rest = fh.readline(_SKIP_CHUNK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
        else:
            yield line


def _cap(sentences: list[str], stats: Counter) -> Iterator[list[str]]:
    """Cut a document over MAX_DOC_BYTES into several at sentence boundaries (the caller
    counted one document read; each extra piece counts as one more)."""
    size, start = 0, 0
    for i, s in enumerate(sentences):
        size += len(s)
        if size > MAX_DOC_BYTES and i > start:
            stats["oversize_documents_split"] += 1
            stats["documents_read"] += 1  # each piece is a document from here on
            yield sentences[start:i]
            start, size = i, len(s)
    yield sentences[start:]


def iter_documents(path: str | Path, stats: Counter, *, text_field: str = "text",
                   max_line_bytes: int = 1_000_000,
                   max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES) -> Iterator[list[str]]:
    """Documents of one file as lists of sentences, applying the module's rules.

    Counts go to `stats`: documents_read, skipped.<reason>, files_skipped.<reason>.
    `path` may be a URI (read as a stream through pyarrow.fs)."""
    p: Source
    if is_uri(path) and not str(path).lower().startswith("file://"):
        p = open_location(path)
        fmt, gz = file_format(p.name)
        if not p.is_file():
            stats["files_skipped.not_regular_file"] += 1
            return
    else:
        p = Path(open_location(path).path if is_uri(path) else path)
        fmt, gz = file_format(p)
        try:  # the reader opens it again, without following a link (open_regular)
            regular = stat.S_ISREG(os.lstat(p).st_mode)
        except OSError:
            regular = False
        if not regular:  # never open a FIFO or device: it may block forever
            stats["files_skipped.not_regular_file"] += 1
            return
    try:
        reason = sniff_file(p)
    except NotRegularFile:  # swapped for a link or a FIFO since the listing
        stats["files_skipped.not_regular_file"] += 1
        return
    if reason:
        stats[f"files_skipped.{reason}"] += 1
        return
    reader = {"text": _text_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs}[fmt]
    try:
        yield from reader(p, gz, stats, text_field, max_line_bytes, max_decompressed_bytes)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        stats["files_skipped.corrupt_compressed_file"] += 1
    except NotRegularFile:
        stats["files_skipped.not_regular_file"] += 1
    except DecompressedTooLarge as exc:
        log.warning("%s: %s; the documents before that point are kept (raise "
                    "--max-decompressed-bytes to read it all)", p, exc)
        stats["files_skipped.decompressed_too_large"] += 1


def _text_docs(path: Source, gz: bool, stats: Counter, _field: str,
               max_line_bytes: int, cap: int) -> Iterator[list[str]]:
    lines: list[str] = []
    bad: str | None = None
    started = False
    size = 0

    def finish() -> Iterator[list[str]]:
        if bad:
            stats["documents_read"] += 1
            stats[f"skipped.{bad}"] += 1
        elif lines:  # empty only when an oversize document was just flushed
            stats["documents_read"] += 1
            yield lines

    with _open_binary(path, gz, cap) as fh:
        for raw in _read_lines(fh, max_line_bytes):
            if raw is None:
                bad, started = bad or "line_too_long", True
                continue
            stripped = raw.strip()
            if not stripped:
                if started:
                    yield from finish()
                lines, bad, started, size = [], None, False, 0
                continue
            started = True
            if bad:
                continue
            if b"\0" in stripped:
                bad = "nul_bytes"
                continue
            try:
                text = stripped.decode("utf-8")
            except UnicodeDecodeError:
                bad = "undecodable_bytes"
                continue
            lines.append(text)
            size += len(stripped)
            if size > MAX_DOC_BYTES:  # flush early: a file with no blank line is one doc
                stats["oversize_documents_split"] += 1
                stats["documents_read"] += 1
                yield lines
                lines, size = [], 0
        if started:
            yield from finish()


def _text_doc(text: object, stats: Counter) -> Iterator[list[str]]:
    stats["documents_read"] += 1
    if not isinstance(text, str):
        stats["skipped.missing_text_field"] += 1
    elif "\0" in text:
        stats["skipped.nul_bytes"] += 1
    elif _SURROGATE.search(text):  # a lone \ud800 escape in JSON: not encodable text
        stats["skipped.undecodable_bytes"] += 1
    else:
        sentences = split_sentences(text)
        if not sentences:
            stats["skipped.empty_document"] += 1
        else:
            yield from _cap(sentences, stats)


def _jsonl_docs(path: Source, gz: bool, stats: Counter, field: str,
                max_line_bytes: int, cap: int) -> Iterator[list[str]]:
    with _open_binary(path, gz, cap) as fh:
        for raw in _read_lines(fh, max_line_bytes):
            if raw is None:
                stats["documents_read"] += 1
                stats["skipped.line_too_long"] += 1
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats["documents_read"] += 1
                stats["skipped.undecodable_bytes"] += 1
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # invalid JSON, 5000-digit numbers, nesting
                stats["documents_read"] += 1
                stats["skipped.invalid_json"] += 1
                continue
            text = record.get(field) if isinstance(record, dict) else None
            yield from _text_doc(text, stats)


def _parquet_docs(path: Source, _gz: bool, stats: Counter, field: str,
                  _max_line_bytes: int, _cap: int) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    source = path.open_input_file() if isinstance(path, Location) else open_regular(path)
    try:
        pf = pq.ParquetFile(source)
    except Exception:  # pyarrow raises several types for a non-Parquet file
        source.close()
        stats["files_skipped.unreadable_parquet"] += 1
        return
    with source:
        yield from _parquet_batches(path, pf, stats, field)


def _parquet_batches(path: Source, pf: Any, stats: Counter, field: str
                     ) -> Iterator[list[str]]:
    names = pf.schema_arrow.names
    if field not in names:
        raise PrepInputError(f"{path}: no column {field!r} (columns: {', '.join(names)}); "
                             "pass --text-field NAME")
    batches = pf.iter_batches(batch_size=1024, columns=[field])
    while True:
        try:
            batch = next(batches)
            texts = batch.column(0).to_pylist()
        except StopIteration:
            return
        except Exception:  # a damaged page or invalid UTF-8: keep what was read so far
            stats["files_skipped.unreadable_parquet"] += 1
            return
        for text in texts:
            if text is None:
                stats["documents_read"] += 1
                stats["skipped.empty_document"] += 1
                continue
            yield from _text_doc(text, stats)
