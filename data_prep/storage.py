"""Where data lives: a local path or a URI that `pyarrow.fs` resolves (s3://, gs://,
abfs://, hdfs://, file://), behind one small interface.

Every location the CLI accepts goes through `open_location`, so local folders and object
stores behave the same. Credentials and endpoints come from the standard environment
variables of each store (for S3: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_PROFILE`), never from
bertflow flags, and they are never logged.

`check_location` is the early check: a scheme pyarrow cannot resolve, a bucket that does
not exist, credentials that are missing or refused all fail here, naming the location and
what to set, before any Ray work starts.

Ray workers open locations themselves (nothing a worker reads may exist only on the
driver); they get the driver's credential variables through the runtime environment
(`data_prep.ray_env`). A location is printed and stored (manifests, tags) as
`Location.uri`, which never carries a `user:password@` part (`public_uri`); a URI with a
query string is refused, since options and credentials come from the environment only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_core.config_io import BertflowError


class LocationError(BertflowError, ValueError):
    """A data location that cannot be used; the message names it and what to do (the CLI
    prints it and exits with 2)."""


# Environment variables that carry a store's endpoint or credentials. They are passed to
# Ray workers through the runtime environment and never appear in logs, params or tags.
CREDENTIAL_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations (file:// included), False for plain paths."""
    return "://" in str(location)


def scheme_of(location: str | Path) -> str:
    """'s3', 'gs', 'file', ... or '' for a plain local path."""
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_local(location: str | Path) -> bool:
    """A plain path or a file:// URI: the local filesystem of whichever node opens it."""
    return scheme_of(location) in ("", "file")


class NotRegularFile(LocationError):
    """A local path that is a symbolic link, a folder, a FIFO or a device where a regular
    file is read (`open_regular`)."""


def open_regular(path: str | Path) -> Any:
    """A local regular file opened for reading in one step: the last component is not
    followed if it is a link (O_NOFOLLOW), a FIFO cannot block the open (O_NONBLOCK), and
    the descriptor itself is checked (fstat) -- so a link or FIFO swapped in after a
    listing checked the path is refused, never read. NotRegularFile otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise NotRegularFile(f"{path}: a symbolic link; only regular files are read "
                                 "(pass the file it points to)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path}: not a regular file (a folder, FIFO or device)")
        if flags & getattr(os, "O_NONBLOCK", 0):  # reads of the regular file may block
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_FILESYSTEMS: dict[tuple[str, ...], Any] = {}


@dataclass(frozen=True)
class Location:
    """A resolved location: the filesystem, the path inside it, and how to print it."""

    fs: Any  # pyarrow.fs.FileSystem
    path: str
    uri: str  # the user's form, normalised: an absolute path, or scheme://path

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts) if is_uri(self.uri) else str(Path(self.uri, *parts))
        return Location(self.fs, path, uri)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def local(self) -> bool:
        return is_local(self.uri)

    def with_path(self, path: str) -> "Location":
        """Another path on the same filesystem (e.g. one a listing returned)."""
        if self.local:
            return Location(self.fs, path, path)
        prefix = self.uri[:-len(self.path)] if self.path and self.uri.endswith(self.path) \
            else f"{scheme_of(self.uri)}://"
        return Location(self.fs, path, prefix + path.lstrip("/") if prefix.endswith("//")
                        else prefix + path)

    def size(self) -> int | None:
        """The file's size in bytes, or None when it is not a file."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        return info.size if info.type == pafs.FileType.File else None

    def list_files(self) -> list["Location"]:
        """Every file under this folder/prefix (recursive), sorted by path; [] when none."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [self.with_path(i.path) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File]

    def has_content(self) -> bool:
        """True for a file, or a folder/prefix holding at least one file. (An object
        store may keep an empty "folder" marker after deletes: that is not content.)"""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            return True
        if info.type == pafs.FileType.NotFound:
            return False
        if self.local:
            return any(os.scandir(self.path))
        return bool(self.list_files())

    def open_input_file(self) -> Any:
        """A random-access file (`read_at`); one ranged GET per read on object stores."""
        return self.fs.open_input_file(self.path)

    def open_input_stream(self) -> Any:
        """A sequential stream of the raw bytes (no automatic decompression)."""
        return self.fs.open_input_stream(self.path, compression=None)

    def open_output_stream(self) -> Any:
        """Write the whole object (on object stores it appears when the stream closes)."""
        parent = posixpath.dirname(self.path)
        if parent and self.local:
            self.fs.create_dir(parent, recursive=True)
        return self.fs.open_output_stream(self.path, compression=None)

    def delete(self) -> None:
        """Delete this file or folder/prefix if it exists (no error when it does not)."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)

    def sha256(self, chunk_size: int = 1 << 20) -> str:
        """sha256 of the file's bytes, streamed (any size)."""
        h = hashlib.sha256()
        with self.open_input_stream() as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
        return h.hexdigest()

    def read_bytes(self) -> bytes:
        with self.open_input_stream() as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole object. On object stores one PUT: readers see all or nothing."""
        with self.open_output_stream() as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def __str__(self) -> str:
        return self.uri


def open_location(location: str | Path) -> Location:
    """Resolve a local path or URI. Raises LocationError for a scheme pyarrow cannot
    resolve (naming the schemes that work)."""
    import pyarrow.fs as pafs

    text = str(location)
    if not is_uri(text):
        path = str(Path(text).expanduser().absolute())
        return Location(pafs.LocalFileSystem(), path, path)
    if scheme_of(text) == "file":
        path = text.split("://", 1)[1].split("?", 1)[0]
        if not path.startswith("/"):
            raise LocationError(f"{text}: a file:// URI needs an absolute path "
                                "(file:///ABSOLUTE/PATH)")
        path = str(Path(path).absolute())
        return Location(pafs.LocalFileSystem(), path, path)
    if "?" in text.split("://", 1)[1]:
        raise LocationError(
            f"{public_uri(text)}: a query string (?...) is not accepted in a location: it "
            f"would end up in manifests and logs, and Ray workers would not get it. Set the "
            f"store's options and credentials through its environment variables instead "
            f"({env_hint(text)}).")
    try:
        fs, path = _from_uri(text)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError
        raise LocationError(
            f"{public_uri(text)}: cannot open this location ({_short(e)}). Use a local path or a URI "
            f"pyarrow.fs resolves: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
            f"abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX, hdfs://HOST:PORT/PATH, "
            f"file:///ABSOLUTE/PATH") from e
    scheme = scheme_of(text)
    path = path.rstrip("/") or path
    uri = f"{scheme}://{path.lstrip('/')}" if scheme != "hdfs" else public_uri(text)
    return Location(fs, path, uri.rstrip("/"))


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Query parameters whose value is a secret (password=, token=, api_key=, X-Amz-Signature=...).
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][^=&#\s]*(?:pass|pwd|token|secret|key|sig|credential|auth)[^=&#\s]*=)"
    r"(?P<value>[^&#\s]+)", re.IGNORECASE)
_PORT = re.compile(r"\d*")


_HOST_END = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::\d*)?(?=[/?#]|$)")


def _userinfo_end(text: str, start: int) -> int:
    """Index of the `@` that ends the userinfo of the URI whose authority starts at
    `start`, or -1. Everything up to the LAST `@` of the authority is userinfo, and a
    password may hold `@`, `/` or a space: `u:p@ss@db`, `user@corp:pw@db`, `u:pa/ss@db`,
    `u:@/0000@db` and `u:pa ss@db` all end at the `@` before `db`. (With a password, an
    `@` later in the path is taken for the end of the userinfo too: hiding too much is
    the safe side.)"""
    line_end = min((i for i in (text.find("\n", start), len(text)) if i >= 0))
    nxt = _SCHEME.search(text, start, line_end)
    limit = nxt.start() if nxt else line_end
    word_end = start
    while word_end < limit and not text[word_end].isspace():
        word_end += 1
    word = text[start:word_end]
    authority = re.split(r"[/?#]", word, maxsplit=1)[0]
    user, colon, password = authority.partition("@")[0].partition(":")
    if not colon:
        return start + authority.rindex("@") if "@" in authority else -1
    if "@" not in word and _PORT.fullmatch(password):
        return -1  # host:port, no userinfo
    # A password: the userinfo ends at the last `@` of this word that a host ends ...
    for at in reversed([i for i, ch in enumerate(word) if ch == "@"]):
        if _HOST_END.match(word, at + 1):
            return start + at
    if "@" in word:
        return start + word.rindex("@")
    # ... or, after a space in the password, at the first `@` further on this line (the
    # last `@` of that host part).
    at = text.find("@", word_end, limit)
    if at < 0:
        return -1
    stop = at
    while stop < limit and not text[stop].isspace() and text[stop] not in "/?#":
        stop += 1
    return text.rindex("@", at, stop)


def redact(text: str) -> str:
    """`text` with the secrets of every URI in it hidden (what may be printed, logged, or
    stored as an MLflow param or tag). Everything up to the last `@` of an authority is
    userinfo: `user:password@` becomes `user:***@` (the user is what comes before the
    first `:`); a bare `TOKEN@` of an http(s) URI becomes `***@` (elsewhere a bare name is
    a user or an abfs container, kept). Query values that look secret (`password=`,
    `token=`, `secret=`, `key=`, `sig=`, ...) become `***`."""
    out, pos = [], 0
    for m in _SCHEME.finditer(text):
        if m.start() < pos:
            continue  # inside the userinfo of the previous URI
        at = _userinfo_end(text, m.end())
        if at < 0:
            continue
        userinfo = text[m.end():at]
        user, colon, _ = userinfo.partition(":")
        if colon:
            shown = f"{user}:***"
        elif m[0].lower() in ("http://", "https://"):
            shown = "***"
        else:
            continue
        out.append(text[pos:m.end()] + shown)
        pos = at
    text = "".join(out) + text[pos:]
    return _SECRET_QUERY.sub(lambda q: f"{q['name']}***", text)


def public_uri(location: str | Path) -> str:
    """The location without a query string or `user:password@` (what may be printed,
    logged or stored in a manifest)."""
    text = str(location)
    if not is_uri(text):
        return text
    scheme, rest = text.split("://", 1)
    at = _userinfo_end(text, len(scheme) + 3)
    if at >= 0 and scheme_of(text) not in ("abfs", "abfss", "az"):
        rest = text[at + 1:]  # abfs://CONTAINER@ACCOUNT is a name, not a secret
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{rest}"


def _from_uri(text: str) -> tuple[Any, str]:
    """pyarrow's `FileSystem.from_uri`; for bucket stores the filesystem object is reused
    per (scheme, bucket, options, credentials): building an S3 client costs about 0.1 s
    and a task opens many files."""
    import pyarrow.fs as pafs

    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme not in ("s3", "gs", "gcs"):
        return pafs.FileSystem.from_uri(text)
    where, _, query = rest.partition("?")
    bucket = where.split("/", 1)[0]
    key = (scheme, bucket, query,
           hashlib.sha256(repr(sorted(credential_env().items())).encode()).hexdigest())
    if key not in _FILESYSTEMS:
        if len(_FILESYSTEMS) >= 64:
            _FILESYSTEMS.clear()
        _FILESYSTEMS[key] = pafs.FileSystem.from_uri(text)[0]
    return _FILESYSTEMS[key], where.rstrip("/")


def check_location(location: str | Path, what: str, *, must_exist: bool,
                   writable: bool = False) -> Location:
    """Open `location` and prove it usable now, before any Ray work: it exists when
    `must_exist`; for object stores the bucket exists and the credentials are accepted.
    `what` names the flag or field in errors (e.g. '--data')."""
    import pyarrow.fs as pafs

    loc = open_location(location)
    try:
        info = loc.fs.get_file_info(loc.path)
        if not is_local(loc.uri):
            bucket = loc.path.split("/", 1)[0]
            if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise LocationError(
                    f"{what} {loc.uri}: bucket {bucket!r} does not exist (or these "
                    f"credentials cannot see it). Create it, or check {env_hint(loc.uri)}.")
    except LocationError:
        raise
    except OSError as e:
        text = str(e)
        unreachable = any(m in text for m in ("NETWORK_CONNECTION", "Could not connect",
                                               "Couldn't resolve", "Timeout", "timed out"))
        problem = "the store cannot be reached" if unreachable else "the store refused access"
        raise LocationError(f"{what} {loc.uri}: {problem} ({_short(e)}). "
                            f"Check {env_hint(loc.uri)}.") from e
    if must_exist and info.type == pafs.FileType.NotFound:
        raise LocationError(f"{what} {loc.uri}: not found.")
    if writable and is_local(loc.uri):
        parent = Path(loc.path)
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        import os

        if not os.access(parent, os.W_OK):
            raise LocationError(f"{what} {loc.uri}: {parent} is not writable.")
    return loc


def env_hint(uri: str) -> str:
    """The environment variables that configure the store of `uri` (for messages)."""
    scheme = scheme_of(uri)
    if scheme in ("s3", "s3a"):
        return ("AWS_ENDPOINT_URL (for a non-AWS store), AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and AWS_REGION")
    if scheme in ("gs", "gcs"):
        return "GOOGLE_APPLICATION_CREDENTIALS"
    if scheme in ("abfs", "abfss", "az"):
        return "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY"
    return "the store's credentials"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def credential_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The store credential variables set in `environ` (default: this process), for a Ray
    runtime environment. Never log the values."""
    import os

    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in CREDENTIAL_ENV_VARS if environ.get(k)}


class BlockCache:
    """Positioned reads of one file through an LRU of fixed-size blocks.

    On an object store every `read_at` is a ranged GET (milliseconds); reads that fall in a
    block already fetched cost nothing. NSP's random-next draws read a few hundred bytes
    at a time from anywhere in a split, so one GET per draw would dominate prep; with
    blocks, neighbouring and repeated reads share GETs. Memory: `max_blocks x block_size`.
    """

    def __init__(self, file: Any, size: int, block_size: int = 1 << 20,
                 max_blocks: int = 16) -> None:
        self.file, self.size = file, size
        self.block_size, self.max_blocks = block_size, max_blocks
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self.fetches = 0  # blocks read from the store (for tests and benchmarks)

    def _block(self, k: int) -> bytes:
        block = self._blocks.get(k)
        if block is None:
            start = k * self.block_size
            block = self.file.read_at(min(self.block_size, self.size - start), start)
            self.fetches += 1
            self._blocks[k] = block
            if len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(k)
        return block

    def read_at(self, nbytes: int, offset: int) -> bytes:
        """`nbytes` bytes from `offset` (fewer at the end of the file)."""
        end = min(offset + nbytes, self.size)
        if end <= offset:
            return b""
        first, last = offset // self.block_size, (end - 1) // self.block_size
        if first == last:
            base = first * self.block_size
            return self._block(first)[offset - base:end - base]
        pieces = [self._block(k) for k in range(first, last + 1)]
        joined = b"".join(pieces)
        base = first * self.block_size
        return joined[offset - base:end - base]

    def close(self) -> None:
        self._blocks.clear()
        self.file.close()
