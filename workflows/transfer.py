"""Files between the driver, the Ray workers and object storage: nothing a worker opens
lives only on the driver.

On a cluster the nodes share no disk. Three rules follow, and this module is their home:

- Folders a worker must open as files (the `--init`/`--base` model, a tokenizer, the
  model `predict`/`embed` serve) are *shipped*: the driver reads the folder once (for a
  registered model, after downloading it from MLflow and checking it against the version's
  sha256 manifest, workflows.tracking.verify_model_version), puts its bytes into the Ray
  object store (`ship_folder` -> `ShippedFolder`) and may delete its own copy at once.
  A worker calls `ShippedFolder.materialize()`: the bytes are pulled to its node by Ray
  (once per node: the node's object store keeps the copy), checked against the sha256 the
  driver computed, and written to a node-local cache folder named by that sha256 (written
  once per node, atomically, shared by the workers of the node). The cache is private to
  the user (`<temp>/bertflow-shipped-<uid>`, mode 0700, owner and mode checked), and a
  copy found there is used only after its files match the driver's per-file sha256s.
  Workers therefore need no MLflow access and no credentials for it, and a driver-local
  path never reaches them.
- A location the driver reads as a file (`--train`, `--eval`, `--input`) may be a URI:
  `local_file` fetches it through `pyarrow.fs` into a temporary file on the driver.
- A file the driver writes (`--output`) may be a URI: `staged_output` gives a local file
  to write, then `publish_file` writes a temporary object beside the target and moves it
  into place (on object stores a server-side copy:
  readers see the old object or the whole new one, never a partial file).
- A remote folder the driver must open as files (a checkpoint's model folder on S3, to
  register it) is fetched with `download_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError

log = logging.getLogger(__name__)

SHIPPED_CACHE = "bertflow-shipped"  # <temp>/bertflow-shipped-<uid>: shipped_cache_root
_DONE = ".bertflow-complete"


class TransferError(BertflowError):
    """A location cannot be read or written; the message names it and what to check."""


# ---------------------------------------------------------------- shipped folders


def folder_digest(files: dict[str, Any]) -> str:
    """sha256 over the sorted (relative path, bytes) pairs of a folder."""
    h = hashlib.sha256()
    for rel in sorted(files):
        data = memoryview(files[rel]).cast("B")
        h.update(rel.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def shipped_cache_root(root: str | Path | None = None) -> Path:
    """This user's cache of shipped folders on this node, `<temp>/bertflow-shipped-<uid>`
    (or `root`): created with mode 0700, and refused unless it is a real folder (not a
    link) owned by this user that nobody else may enter. In a shared /tmp a folder planted
    under that name by another login is an error, never used."""
    root = Path(root) if root is not None else \
        Path(tempfile.gettempdir()) / f"{SHIPPED_CACHE}-{os.getuid()}"
    try:
        os.mkdir(root, 0o700)
        os.chmod(root, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
            or st.st_mode & 0o077:
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else \
            f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
        raise TransferError(
            f"{root}: the cache of shipped models must be a folder owned by uid "
            f"{os.getuid()} with mode 0700, but it is {kind}; another user may have "
            f"planted it. Remove it, or point TMPDIR at a private folder")
    return root


def _sha256(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


@dataclass(frozen=True)
class ShippedFolder:
    """A folder's files in the Ray object store (`ship_folder`); picklable, so it travels
    inside a TrainTask or a Ray Data actor's arguments. `origin` names where it came from
    (for messages and lineage), never a path a worker opens."""

    ref: Any        # ray.ObjectRef of {relative path: numpy uint8 array}
    digest: str     # folder_digest of the files
    origin: str
    hashes: dict[str, str]  # relative path -> sha256 of its bytes (what a cache hit must hold)

    def materialize(self, cache_root: str | Path | None = None) -> Path:
        """The folder on this node: <temp>/bertflow-shipped-<uid>/<digest>/ (private to
        this user, `shipped_cache_root`), written once per node (atomically; concurrent
        workers of a node agree on one copy). A copy already there is used only after
        every file is checked against the driver's sha256s; a changed one is replaced."""
        root = shipped_cache_root(cache_root)
        final = root / self.digest[:32]
        if (final / _DONE).is_file():
            problem = self.check_copy(final)
            if problem is None:
                return final
            log.warning("%s: the cached copy of %s changed (%s); fetching it again",
                        final, self.origin, problem)
            shutil.rmtree(final, ignore_errors=True)
        import ray

        files = ray.get(self.ref)
        if folder_digest(files) != self.digest:
            raise TransferError(f"{self.origin}: the shipped files do not match the "
                                f"sha256 the driver computed; the transfer was corrupted")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            for rel, data in files.items():
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with dest.open("xb") as f:
                    f.write(memoryview(data).cast("B"))
            (tmp / _DONE).write_text(self.digest)
            try:
                os.rename(tmp, final)
            except OSError:  # another worker of this node was first
                if not (final / _DONE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        problem = self.check_copy(final)
        if problem is not None:
            raise TransferError(f"{final}: the copy of {self.origin} does not hold the "
                                f"shipped files ({problem})")
        return final

    def check_copy(self, folder: Path) -> str | None:
        """None when `folder` holds exactly the shipped files (plain files, same sha256),
        else what differs."""
        from workflows.integrity import file_sha256

        if folder.is_symlink() or not folder.is_dir():
            return "not a folder"
        found: dict[str, Path] = {}
        for p in folder.rglob("*"):
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                return f"{rel} is a symbolic link"
            if p.is_file() and rel != _DONE:
                found[rel] = p
        if set(found) != set(self.hashes):
            diff = sorted(set(found) ^ set(self.hashes))
            return f"files {', '.join(diff[:3])} added or missing"
        for rel, path in sorted(found.items()):
            if file_sha256(path) != self.hashes[rel]:
                return f"{rel} has other bytes"
        return None


def ship_folder(folder: str | Path, origin: str | None = None) -> ShippedFolder:
    """Put every file under local `folder` into the Ray object store (Ray initialised)."""
    import numpy as np
    import ray

    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): np.frombuffer(p.read_bytes(), dtype=np.uint8)
             for p in sorted(folder.rglob("*")) if p.is_file()}
    if not files:
        raise TransferError(f"{origin or folder}: the folder {folder} holds no files")
    return ShippedFolder(ray.put(files), folder_digest(files), origin or str(folder),
                         {rel: _sha256(data) for rel, data in files.items()})


def check_model_folder(folder: str | Path, origin: str | None = None) -> Path:
    """`folder` after bert_core's load check on the driver (config.json against the
    weights' headers, the model built on the meta device: nothing allocated), so a hostile
    or broken folder fails here, with one message, and not inside a Ray actor. With
    `origin` (what the user named: a models:/ reference, a folder), the message names it
    instead of `folder` (a temporary copy)."""
    from bert_core.model import BertModel

    try:
        BertModel.check_pretrained(folder)
    except BertflowError as exc:
        text = str(exc) if origin is None else str(exc).replace(str(folder), origin)
        raise TransferError(text) from None
    return Path(folder)


def check_model_ref(ref: str) -> None:
    """Before any Ray work: the model folder a local reference names (a folder, a
    checkpoint or run folder) passes `check_model_folder`, its errors naming the user's
    own path. A models:/ reference is checked once downloaded (`ship_model_folder`)."""
    from workflows.tracking import parse_model_ref, resolve_model

    if parse_model_ref(ref) is None:
        check_model_folder(resolve_model(ref))


def ship_model_folder(folder: str | Path, origin: str) -> ShippedFolder:
    """`ship_folder` for a model folder, after `check_model_folder` on the driver."""
    check_model_folder(folder, origin)
    return ship_folder(folder, origin)


def local_folder(folder: str | Path | ShippedFolder) -> Path:
    """A folder a task can open: a local path as is, a shipped folder materialised."""
    return folder.materialize() if isinstance(folder, ShippedFolder) else Path(folder)


# ---------------------------------------------------------------- URIs on the driver


def open_checked(location: str | Path, what: str, *, must_exist: bool = False,
                 writable: bool = False) -> Any:
    """data_prep.storage.check_location, with its error as a TransferError (exit 2)."""
    from data_prep.storage import LocationError, check_location

    try:
        return check_location(location, what, must_exist=must_exist, writable=writable)
    except LocationError as exc:
        raise TransferError(str(exc)) from None


@contextlib.contextmanager
def local_file(location: str | Path, what: str) -> Iterator[Path]:
    """A local file with the contents of `location`: the path itself when local, else a
    temporary copy fetched through pyarrow.fs (removed on exit). Keeps the name's suffix
    (readers pick the format by it)."""
    from data_prep.storage import is_local

    if is_local(location):
        text = str(location)
        yield Path(text[len("file://"):] if text.startswith("file://") else text)
        return
    loc = open_checked(location, what, must_exist=True)
    if not loc.is_file():
        raise TransferError(f"{what} {loc.uri}: not a file (a folder of files must be local)")
    with tempfile.TemporaryDirectory(prefix="bertflow-fetch-") as tmp:
        dest = Path(tmp) / posixpath.basename(loc.path)
        with loc.fs.open_input_stream(loc.path) as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        yield dest


def publish_file(local: str | Path, location: str | Path, what: str = "--output") -> str:
    """Move finished local file `local` to `location` so that it appears whole: a rename
    locally, else an upload to a hidden temporary object beside the target and a move
    (server-side copy) onto it. Returns the location as printed."""
    from data_prep.storage import is_local

    local = Path(local)
    if is_local(location):
        text = str(location)
        dest = Path(text[len("file://"):] if text.startswith("file://") else text)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), dest)
        return str(dest)
    loc = open_checked(location, what, writable=True)
    tmp = posixpath.join(posixpath.dirname(loc.path),
                         f".{posixpath.basename(loc.path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with local.open("rb") as src, loc.fs.open_output_stream(tmp) as out:
            shutil.copyfileobj(src, out, 8 << 20)
        loc.fs.move(tmp, loc.path)
    except BaseException:
        with contextlib.suppress(Exception):
            loc.fs.delete_file(tmp)
        raise
    finally:
        local.unlink(missing_ok=True)
    return loc.uri


@contextlib.contextmanager
def staged_output(location: str | Path, what: str = "--output") -> Iterator[Path]:
    """A local file to write `location`'s contents into; it appears at `location` (a path
    or a URI) only when the block ends without an error, whole (`publish_file`)."""
    from data_prep.storage import is_local

    if is_local(location):
        text = str(location)
        out = Path(text[len("file://"):] if text.startswith("file://") else text)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    loc = open_checked(location, what, writable=True)
    with tempfile.TemporaryDirectory(prefix="bertflow-out-") as tmp_dir:
        tmp = Path(tmp_dir) / posixpath.basename(loc.path)
        yield tmp
        publish_file(tmp, loc.uri, what)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def local_model_dir(model_dir: Path | str) -> Iterator[Path]:
    """A training result's model folder as a local folder: itself when local, else a
    temporary download (removed on exit), e.g. to log it to MLflow."""
    from data_prep.storage import is_local, open_location

    if is_local(model_dir):
        yield Path(model_dir)
        return
    with tempfile.TemporaryDirectory(prefix="bertflow-final-model-") as tmp:
        yield download_dir(open_location(model_dir), Path(tmp) / "model")


def download_dir(location: Any, dest: str | Path) -> Path:
    """Copy the folder at `location` (a data_prep.storage.Location) into local `dest`."""
    import pyarrow.fs as pafs

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(location.path, str(dest), source_filesystem=location.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return dest
