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
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LocationError(ValueError):
    """A data location that cannot be used; the message names it and what to do."""


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

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole object. On object stores one PUT: readers see all or nothing."""
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self.path) as f:
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
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError
        raise LocationError(
            f"{text}: cannot open this location ({_short(e)}). Use a local path or a URI "
            f"pyarrow.fs resolves: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
            f"abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX, hdfs://HOST:PORT/PATH, "
            f"file:///ABSOLUTE/PATH") from e
    scheme = scheme_of(text)
    uri = f"{scheme}://{path.lstrip('/')}" if scheme not in ("file", "hdfs") else text
    return Location(fs, path.rstrip("/") or path, uri.rstrip("/"))


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
                    f"credentials cannot see it). Create it, or check {_env_hint(loc.uri)}.")
    except LocationError:
        raise
    except OSError as e:
        raise LocationError(f"{what} {loc.uri}: the store refused access ({_short(e)}). "
                            f"Check {_env_hint(loc.uri)}.") from e
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


def _env_hint(uri: str) -> str:
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
