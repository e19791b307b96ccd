"""Dataset manifests and atomic output folders, shared by every data_prep builder.

A prepared dataset is a folder that appears all at once: builders write into a hidden
temporary sibling (`atomic_output_dir`) and rename it into place when everything,
including `manifest.json`, is on disk. The manifest says what went in (config, input file
hashes, tokenizer hash), what came out (counts, files) and a fingerprint of the inputs
side, so a rerun can tell "up to date" from "rebuild" without reading the data.

Datasets may also live on an object store (`s3://bucket/prefix`, anything `pyarrow.fs`
resolves), where nothing can be renamed. There `output_location` publishes instead: a
marker object (`_BUILDING`) goes up first, an old manifest is deleted (the old dataset is
unpublished before any of its files change), the old files are deleted, the builder
writes its files directly under the prefix (and its intermediates under a
`_staging-<token>/` prefix it deletes), and `manifest.json` is written last, in one PUT:
the dataset exists from that moment. Readers trust only a prefix whose manifest loads
(`Manifest.load`, `is_dataset_folder`), so a half-written or half-deleted dataset is never
read or listed. A prefix holding only an unfinished build's files (the marker, no
manifest) is replaced by the next build without `--force`; any other non-dataset content
needs `--force`. Two builds writing the same prefix at the same time are not supported.

Input fingerprints: local files by path, size and sha256; object-store files by their URI
(without query string), size and the sha256 of their bytes, read as a stream (object
ETags are not content hashes for multipart uploads and differ between stores, so the
content decides, as it does locally).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError
from data_prep.storage import Location, is_local, is_uri, open_location

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: corpus-wide NSP pool, globally shuffled parts
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
BUILDING_MARKER = "_BUILDING"  # an unfinished build on an object store (no rename there)
STAGING_PREFIX = "_staging"


class ManifestError(BertflowError):
    """A manifest is missing, unreadable, or an output folder cannot be replaced."""


@dataclasses.dataclass
class Manifest:
    """What a prepared dataset folder holds and how it was made (manifest.json)."""

    kind: str                                   # "pretraining", or a task kind
    config: dict[str, Any]                      # the full stage config (config_io.to_dict)
    inputs: list[dict[str, Any]]                # fingerprint_file() of every input file
    tokenizer: dict[str, Any]                   # {"fingerprint", "vocab_size", "lowercase"...}
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)
    splits: dict[str, Any] = dataclasses.field(default_factory=dict)   # split -> files, rows
    schema: dict[str, str] = dataclasses.field(default_factory=dict)
    fingerprint: str = ""                       # build_fingerprint(config, inputs, tokenizer)
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path | Location) -> str:
        """Write `manifest.json` in `directory` (local: fsynced; object store: one PUT).
        It marks the dataset complete, so it is written last. Returns its location."""
        if not self.created_at:
            self.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        loc = directory if isinstance(directory, Location) else open_location(directory)
        target = loc.join(MANIFEST_NAME)
        if not loc.local:
            target.write_text(text)
            return target.uri
        with open(target.path, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        return target.path

    @classmethod
    def load(cls, directory: str | Path | Location) -> Manifest:
        """Read `DIR/manifest.json` (or a manifest file path); DIR may be a URI."""
        loc = directory if isinstance(directory, Location) else open_location(directory)
        target = loc if loc.path.endswith(".json") else loc.join(MANIFEST_NAME)
        path = target.uri
        try:
            raw = target.read_bytes() if target.is_file() else None
        except OSError as exc:
            raise ManifestError(f"{path}: cannot be read ({exc})") from None
        if raw is None:
            hint = "" if loc.local else (" (on an object store, a dataset whose build did "
                                         "not finish has no manifest and is never read)")
            raise ManifestError(f"{path}: no manifest here; is {loc.uri} a dataset prepared by "
                                f"`bertflow prep`?{hint}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); rebuild the "
                                "dataset with --force") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"{path}: unreadable ({type(exc).__name__}); not a manifest "
                                "written by bertflow") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object; not a bertflow manifest")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ManifestError(f"{path}: unknown key(s) {', '.join(unknown)}; written by a "
                                "newer bertflow?")
        required = ("kind", "config", "inputs", "tokenizer")
        lacking = [k for k in required if k not in data]
        if lacking:
            raise ManifestError(f"{path}: lacks {', '.join(lacking)}; not a bertflow manifest")
        kinds = {"kind": str, "config": dict, "inputs": list, "tokenizer": dict,
                 "counts": dict, "splits": dict, "format_version": int}
        wrong = [k for k, t in kinds.items() if k in data and not isinstance(data[k], t)]
        if wrong:
            raise ManifestError(f"{path}: {wrong[0]} is not a {kinds[wrong[0]].__name__}; "
                                "not a bertflow manifest")
        return cls(**data)


def is_dataset_folder(directory: str | Path | Location) -> bool:
    """True when `directory` (a path or URI) holds a manifest.json that loads as a bertflow
    dataset's (a folder that merely has a file of that name is not one)."""
    loc = directory if isinstance(directory, Location) else open_location(directory)
    try:
        Manifest.load(loc.join(MANIFEST_NAME))
    except ManifestError:
        return False
    return True


def open_dataset(location: str | Path, what: str = "--data") -> tuple[Location, Manifest]:
    """(location, manifest) of a prepared dataset that readers may trust: the location is
    usable (scheme, bucket, credentials: a LocationError otherwise) and its manifest loads.
    A folder or prefix without one (a build that did not finish, or not a dataset) is
    refused with a ManifestError naming the location and what to do."""
    from data_prep.storage import check_location

    loc = check_location(location, what, must_exist=True)
    try:
        return loc, Manifest.load(loc)
    except ManifestError as exc:
        if loc.join(MANIFEST_NAME).exists():
            raise ManifestError(f"{what} {loc.uri}: {exc}") from None
        unfinished = (" It holds files but no manifest: a build that did not finish (a "
                      "dataset is published by writing its manifest last)."
                      if loc.has_content() else "")
        raise ManifestError(f"{what} {loc.uri}: not a prepared dataset (no manifest.json)."
                            f"{unfinished} Build it with `bertflow prep --output "
                            f"{loc.uri} ...`.") from None


def fingerprint_file(path: str | Path, chunk_size: int = 1 << 20) -> dict[str, Any]:
    """{path (absolute, or the URI without query string), size, sha256} of a file, read in
    chunks (any size)."""
    if is_uri(path) and not is_local(path):
        loc = open_location(path)
        size = loc.size()
        if size is None:
            raise ManifestError(f"{loc.uri}: not a file; cannot fingerprint it")
        return {"path": loc.uri, "size": size, "sha256": loc.sha256(chunk_size)}
    p = Path(open_location(path).path if is_uri(path) else path).resolve()
    if not stat.S_ISREG(os.stat(p).st_mode):  # opening a FIFO would block forever
        raise ManifestError(f"{p}: not a regular file; cannot fingerprint it")
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return {"path": str(p), "size": p.stat().st_size, "sha256": h.hexdigest()}


def build_fingerprint(config: dict[str, Any], inputs: list[dict[str, Any]],
                      tokenizer_fingerprint: str, kind: str = "pretraining") -> str:
    """sha256 over everything that decides the output: kind, config, inputs, tokenizer."""
    payload = {"kind": kind, "format_version": FORMAT_VERSION, "config": config,
               "inputs": [{"sha256": i["sha256"], "size": i["size"], "path": i["path"]}
                          for i in inputs],
               "tokenizer": tokenizer_fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def is_up_to_date(directory: str | Path | Location, expected_fingerprint: str | None = None
                  ) -> tuple[bool, str]:
    """(True, "up to date") when DIR's manifest matches its inputs (and the expected
    fingerprint, when given); otherwise (False, the first reason found). DIR and the
    inputs may be URIs."""
    d = directory if isinstance(directory, Location) else open_location(directory)
    if not d.exists():
        return False, f"{d.uri} does not exist"
    try:
        manifest = Manifest.load(d)
    except ManifestError as exc:
        return False, str(exc)
    if expected_fingerprint is not None and manifest.fingerprint != expected_fingerprint:
        return False, "the config, inputs or tokenizer changed since the last build"
    # the fingerprint already covers the inputs' hashes, which the caller just computed
    for item in manifest.inputs if expected_fingerprint is None else []:
        p = open_location(item["path"])
        if p.size() is None:
            return False, f"input {p.uri} is gone"
        if p.size() != item["size"] or fingerprint_file(item["path"])["sha256"] != item["sha256"]:
            return False, f"input {p.uri} changed"
    for split in manifest.splits.values():
        for f in split.get("files", []):
            part = d.join(f["path"])
            if part.size() != f["size"]:
                return False, f"output {part.uri} is missing or was modified"
    return True, "up to date"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale(final_dir: Path) -> None:
    """Remove temp siblings left by killed runs (their pid is gone); restore a folder
    that a killed replace had moved aside."""
    parent = final_dir.parent
    if not parent.is_dir():
        return
    for tag in (_TMP_TAG, _OLD_TAG):
        for p in parent.glob(f".{final_dir.name}{tag}*"):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if _pid_alive(pid) and pid != os.getpid():
                continue
            if tag == _OLD_TAG and not final_dir.exists():
                log.warning("restoring %s from an interrupted replace", final_dir)
                os.replace(p, final_dir)
            else:
                log.info("removing stale temporary folder %s", p)
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(final_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a hidden temp folder beside `final_dir`; on success fsync it and rename it to
    `final_dir`; on any failure delete it. An existing `final_dir` is replaced only with
    `force=True` (else ManifestError before any work). Stale temp folders of killed runs
    are removed first."""
    final = Path(final_dir).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    if final.exists() and not force:
        raise ManifestError(f"{final} already exists; pass --force to replace it")
    # An unpredictable name (mkdtemp), ending in the pid that clean_stale reads; the mode
    # a plain mkdir would give (mkdtemp's is 0700).
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_TAG}", suffix=f"-{os.getpid()}",
                                dir=final.parent))
    mask = os.umask(0o077)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}{_OLD_TAG}{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_location(final: str | Path, force: bool = False) -> Iterator[Location]:
    """Where a builder writes a dataset that appears all at once at `final` (a path or a
    URI); the builder writes `manifest.json` last, inside the block.

    Local: `atomic_output_dir` (a hidden temp sibling renamed into place). Object store:
    the prefix itself, after unpublishing what was there (module docstring); on failure
    its files are deleted again (best effort: the manifest is absent, so nothing is read).
    An existing dataset or other content is replaced only with `force=True`, except the
    leftovers of an unfinished build."""
    loc = open_location(final)
    if loc.local:
        with atomic_output_dir(loc.path, force=force) as tmp:
            yield open_location(tmp)
        return
    leftovers = loc.join(BUILDING_MARKER).exists() and not loc.join(MANIFEST_NAME).exists()
    if loc.has_content() and not (force or leftovers):
        raise ManifestError(f"{loc.uri} already exists; pass --force to replace it")
    marker = loc.join(BUILDING_MARKER)
    try:  # the first write: a store that refuses writes fails here, before any work
        marker.write_text(json.dumps({"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()),
                                      "pid": os.getpid()}) + "\n")
    except OSError as exc:
        from data_prep.storage import LocationError, env_hint

        raise LocationError(f"{loc.uri}: cannot write there ({str(exc).splitlines()[0][:300]})."
                            f" Check that these credentials may write to it "
                            f"({env_hint(loc.uri)}).") from None
    loc.join(MANIFEST_NAME).delete()  # unpublish first: readers stop trusting the old files
    _delete_except(loc, marker)
    try:
        yield loc
    except BaseException:
        try:
            _delete_except(loc, marker)
            marker.delete()
        except OSError as exc:  # the manifest is absent: leftovers are never read
            log.warning("could not clean up %s (%s); the next build replaces it", loc.uri, exc)
        raise
    if not loc.join(MANIFEST_NAME).exists():
        raise ManifestError(f"{loc.uri}: the build wrote no manifest (a bug)")
    marker.delete()


def _delete_except(loc: Location, keep: Location) -> None:
    """Delete every file under `loc` but `keep` (on an object store, one DELETE each)."""
    for f in loc.list_files():
        if f.path != keep.path:
            f.fs.delete_file(f.path)
