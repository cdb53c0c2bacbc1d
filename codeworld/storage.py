"""One storage abstraction over a local folder or an s3:// prefix (fsspec / s3fs).

Every write is atomic: a local file is written beside its target and renamed over it; an S3
object only becomes visible when its upload completes, so a reader never sees a partial object.

Transient S3 errors (500s, 503 SlowDown, dropped connections, an answer cut off mid-body) are
retried with backoff below this layer: botocore retries every request (5 attempts by default;
AWS_MAX_ATTEMPTS, AWS_RETRY_MODE), and s3fs retries connection failures and SlowDown again and
resumes a download from where it was cut off (tested through a fault-injecting proxy,
tests/test_s3_training.py). Another retry loop here would only multiply the attempts of a
request that keeps failing; what this layer adds is the final error, a StorageError that names
the path whatever the transport raised.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec


# Failures that are properties of a path, the same on a retry: missing, not permitted, a folder
# where a file belongs, a read-only file system.
BAD_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                    FileExistsError)
_BAD_PATH_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM,
                    errno.EEXIST, errno.EROFS, errno.ENAMETOOLONG}


class StorageError(OSError):
    """A storage operation failed; the message names the path. `transient`: whether a retry
    may pass (the CLI exits 75 then, else 2). It is decided where the error is made, from what
    the storage layer raised, and kept as an attribute: the cause itself does not survive a
    worker process (ProcessPoolExecutor replaces __cause__ with the remote traceback) or a
    Dask worker (pickled without it)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)   # args stay (message,): unpickling calls StorageError(message)
        self.transient = transient  # restored from __dict__ when unpickled


def is_transient(cause: BaseException) -> bool:
    """Whether a failure the storage layer saw may pass on a retry: a dropped connection, an S3
    5xx or a timeout after botocore's and s3fs's retries may; a wrong path, or credentials
    missing from this machine, do not."""
    return not (isinstance(cause, (*BAD_PATH_ERRORS, *_credential_errors()))
                or getattr(cause, "errno", None) in _BAD_PATH_ERRNOS)


@functools.cache
def _credential_errors() -> tuple[type[BaseException], ...]:
    """botocore's "no credentials" errors, raised before any request (s3fs turns a refused
    key into PermissionError itself)."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return ()
    return NoCredentialsError, PartialCredentialsError


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """What s3fs lets through once its and botocore's retries are spent: mostly OSError, but a
    connection that keeps dropping ends in botocore's or aiohttp's own exception types."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError
        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as HTTPError
        errors.append(HTTPError)
    except ImportError:
        pass
    return tuple(errors)


# Failures that are properties of a path, the same on a retry: it is missing, not permitted,
# a folder where a file belongs. Anything else (an S3 5xx after the retries, a dropped
# connection, an I/O error) may pass on a retry.
UNREADABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def read_url(url: str, endpoint_url: str | None = None,
             fs: fsspec.AbstractFileSystem | None = None) -> bytes:
    """The bytes of a local file or an s3:// object. UNREADABLE errors stay what they are (the
    caller may count such a file); any other failure is a StorageError naming `url`."""
    with _named(url, "read", passes=UNREADABLE):
        if "://" not in url:
            with open(url, "rb") as fh:
                return fh.read()
        return (fs or filesystem(url, endpoint_url)).cat_file(url)


@contextmanager
def _named(path: str, what: str, missing_is_state: bool = True,
           passes: tuple[type[BaseException], ...] = ()):
    """Re-raise a failed operation on `path` as a StorageError naming it. A missing path stays
    FileNotFoundError where callers treat absence as a state (reads); for a write it is a
    failure like any other (a bucket that does not exist). Errors in `passes` stay what they
    are (a caller that counts an unreadable file)."""
    try:
        yield
    except (StorageError, *passes):
        raise
    except FileNotFoundError:
        if missing_is_state:
            raise
        # not transient: a retry finds no bucket either
        raise StorageError(f"{path}: cannot {what}: no such bucket or folder") from None
    except transport_errors() as err:
        raise StorageError(f"{path}: cannot {what}: {type(err).__name__}: {err}",
                           transient=is_transient(err)) from err


def storage_root(root: str) -> str:
    """`root` as Storage uses it: a local path or s3://BUCKET[/prefix]. ValueError says why
    another form cannot be one. A file:// URL is its local path (fsspec would take it, but
    os-level writes would make a folder named `file:`). memory:// is refused: its files live
    in one process's memory, so the shards a stage's worker processes write there are lost
    with them, and a rerun's process finds nothing to resume."""
    if root.startswith("file://"):
        path = root[len("file://"):]
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
        if not path.startswith("/"):
            raise ValueError(f"{root!r}: a file:// URL needs an absolute path (file:///abs/path)")
        return path
    if root.startswith("s3://"):
        if not root[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"{root!r}: an s3:// URL needs a bucket (s3://BUCKET/prefix)")
        return root
    if root.startswith("memory://"):
        raise ValueError(f"{root!r}: memory:// is not a storage root: each worker process has "
                         "its own memory, so their shards would be lost (use a local folder)")
    return root


@dataclass(frozen=True)
class Storage:
    root: str
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        try:
            root = storage_root(self.root)
        except ValueError as err:
            raise StorageError(str(err)) from None
        object.__setattr__(self, "root", root)   # frozen: set once, here

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem(self.root, self.endpoint_url)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if self.is_s3 else os.path.join(self.root, *parts)

    def sub(self, *parts: str) -> "Storage":
        return Storage(self.path(*parts), self.endpoint_url)

    def exists(self, rel: str) -> bool:
        with _named(self.path(rel), "check"):
            return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        full = self.path(rel)
        with _named(full, "read"):
            return self.fs.cat_file(full)

    def sha256(self, rel: str) -> str:
        """sha256 of an object or file, streamed (nothing is stored locally)."""
        full = self.path(rel)
        h = hashlib.sha256()
        with _named(full, "read"), self.fs.open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    def upload(self, src: str | os.PathLike, rel: str) -> None:
        """Copy the local file src to rel: the whole file becomes visible at once, or nothing."""
        full = self.path(rel)
        with _named(full, f"upload {src}", missing_is_state=False):
            if _is_local(self.fs):
                parent = os.path.dirname(full) or "."
                os.makedirs(parent, exist_ok=True)
                tmp = os.path.join(parent, f".{os.path.basename(full)}.tmp-{uuid.uuid4().hex[:8]}")
                try:
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, full)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                # one PUT, or a multipart upload completed at its end (aborted on failure)
                self.fs.put_file(os.fspath(src), full)

    def download(self, rel: str, dest: str | os.PathLike, sha256: str | None = None) -> None:
        """Copy rel to the local file dest: into a temp file beside it, checked against sha256
        when given, then renamed over dest, so dest is never a partial or unverified copy."""
        full, dest = self.path(rel), Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with _named(full, "download"):
                self.fs.get_file(full, os.fspath(tmp))
            if sha256 is not None and (got := file_sha256(tmp)) != sha256:
                raise StorageError(f"{full}: sha256 {got[:12]}... differs from the expected "
                                   f"{sha256[:12]}...: the object is corrupt or was replaced")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_atomic(self.fs, self.path(rel), data)

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under rel; empty when it does not exist."""
        full = self.path(rel) if rel else self.root
        try:
            with _named(full, "list"):
                entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def remove(self, rel: str) -> None:
        full = self.path(rel)
        with _named(full, "remove"):
            if self.fs.exists(full):
                self.fs.rm(full, recursive=True)


def endpoint_problem(url: str) -> str | None:
    """Why botocore could not use `url` as an S3 endpoint (it would raise `Invalid endpoint`
    at the first request, deep in a stage), else None."""
    from urllib.parse import urlsplit

    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    if urlsplit(url).scheme in ("http", "https") and (
            is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url)):
        return None
    return f"{url!r} is not an S3 endpoint: use http://HOST:PORT or https://HOST"


def filesystem(url: str, endpoint_url: str | None = None) -> fsspec.AbstractFileSystem:
    if url.startswith("s3://"):
        opts: dict = {}
        endpoint = endpoint_url
        if not endpoint:   # (storage.s3_endpoint_url is checked with the params)
            for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
                if endpoint := os.environ.get(var):
                    if problem := endpoint_problem(endpoint):
                        raise StorageError(f"{url}: environment variable {var}: {problem}")
                    break
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        # fsspec caches one instance per distinct options (so per endpoint): creating a client
        # costs ~0.3 s, reusing it ~0.02 s per call. That instance would also keep every
        # folder listing for the life of the process (s3fs's dircache), and answer exists,
        # reads and lists from it: objects other processes (a stage's workers, a long-lived
        # Dask worker, another node) wrote or deleted since were missing or still there.
        return fsspec.filesystem("s3", use_listings_cache=False, **opts)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return fsspec.filesystem(protocol)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with _named(path, "write", missing_is_state=False):
        if _is_local(fs):
            parent = os.path.dirname(path) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # S3 PUT / completed multipart upload: the object appears whole or not at all.
            fs.pipe_file(path, data)


def write_file_atomic(path: str | os.PathLike, data: bytes,
                      endpoint_url: str | None = None) -> None:
    """`data` to the local file or the s3:// object `path` (write_atomic on the filesystem its
    scheme names): a reader sees the old bytes or the new, never part of them."""
    path = os.fspath(path)
    write_atomic(filesystem(path, endpoint_url), path, data)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
