"""Where a store lives: a local path (an NFS mount is one) or an object-store prefix, as a pyarrow file system.

    loc = locate("s3://bucket/prefix")   # fs: S3FileSystem, path: "bucket/prefix", uri: "s3://bucket/prefix"
    loc = locate("results")              # fs: LocalFileSystem, path: "/abs/results", uri: "/abs/results"

S3 is configured by the standard AWS variables, read by pyarrow (`FileSystem.from_uri`) itself:
credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and the
config files, or the node's instance role; AWS_DEFAULT_REGION (else the bucket's region is looked up);
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible server. GCS (`gs://`) takes
GOOGLE_APPLICATION_CREDENTIALS or the node's service account. The store and the analysis both use
this module; it imports nothing of the project.

`write_atomic` is the one way the project writes a file that a reader may see: a store's bundle
files, the `fits` tables, the report and the calibration cache.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMES = {"s3": "s3://bucket/prefix", "gs": "gs://bucket/prefix", "gcs": "gcs://bucket/prefix", "file": "file:///path"}
ALLOWED = "a local path (an NFS mount is one), file:///path, s3://bucket/prefix or gs://bucket/prefix"


class LocationError(ValueError):
    """A store address that names no usable place: an unknown scheme, no bucket, a bucket that does not exist."""


@dataclass(frozen=True)
class Location:
    """A store's file system, its path there (`bucket/prefix` on an object store) and its normalised URI."""

    fs: pafs.FileSystem
    path: str
    uri: str  # an absolute local path, or scheme://bucket/prefix[?options]
    scheme: str  # "" for a local path

    @property
    def local(self) -> bool:
        return self.scheme == ""

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def join(self, *parts: str) -> str:
        """A path on `fs` below the store."""
        return "/".join([self.path.rstrip("/"), *parts])


TEMPORARY = ".tmp"  # the suffix of a file being written, named ".<name>.<id>.tmp": hidden (pandas and pyarrow skip it) and
# not "*.parquet" (so DuckDB's and polars' globs skip it too); `Store.recover` deletes these


def is_temporary(name: str) -> bool:
    """A file `write_atomic` was writing (or, from icl-study before 2026-11-28, ".tmp-<id>-<name>")."""
    return name.startswith(".") and (name.endswith(TEMPORARY) or name.startswith(".tmp-"))


def write_atomic(path: str | os.PathLike, data: bytes | str, fs: pafs.FileSystem | None = None, *, object_store: bool = False, durable: bool = False) -> str:
    """Write `data` to `path` whole or not at all; returns the path.

    In a directory (local or NFS), `data` goes to a hidden temporary beside `path`
    (".<name>.<random id>.tmp", `stage`), which `os.replace` moves into place (`commit`): atomic on
    POSIX and within one NFS directory. With `durable` the file is fsynced before the rename and its
    directory after it, so a rename that happened survives a crash of the machine. On an object
    store (`object_store`, `fs` its file system) it is one upload of the whole object to its key,
    which appears complete or not at all. `fs` (default: the local file system) is what a directory's
    bytes are written through; tests pass one that fails. Missing parent directories are made. A
    failure removes its temporary; a kill can leave one, which every reader and glob skips (and
    `Store.recover` deletes in a store's tables).
    """
    path = os.fspath(path)
    if object_store:
        if fs is None:
            raise ValueError("write_atomic: an object store needs its file system (fs)")
        with fs.open_output_stream(path) as out:
            out.write(data.encode() if isinstance(data, str) else data)
        return path
    commit(stage(path, data, fs, durable), path, durable)
    return path


def stage(path: str, data: bytes | str, fs: pafs.FileSystem | None = None, durable: bool = False) -> str:
    """Write `data` to a hidden temporary beside `path` (fsynced with `durable`); returns its path.
    A failure removes the temporary and raises."""
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}{TEMPORARY}")
    try:
        with (fs or pafs.LocalFileSystem()).open_output_stream(tmp) as out:
            out.write(data.encode() if isinstance(data, str) else data)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def commit(tmp: str, path: str, durable: bool = False) -> None:
    """Move a staged temporary into place (and with `durable`, fsync its directory)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file (serialised in memory, so no error cuts a write short)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def locate(store: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> Location:
    """Resolve a store address; `filesystem` replaces the one the address implies (tests inject faults so)."""
    text = os.fspath(store)
    parts = urlsplit(text) if "://" in text else None
    scheme = parts.scheme.lower() if parts else ""
    if scheme in ("", "file"):
        root = Path(parts.path if parts else text).absolute()
        return Location(filesystem or pafs.LocalFileSystem(), root.as_posix(), str(root), "")
    if scheme not in SCHEMES:
        raise LocationError(f"store {text}: unknown scheme '{scheme}://'; a store is {ALLOWED}")
    if parts.username or parts.password:
        raise LocationError(f"store {scheme}://...@{parts.hostname}: credentials do not belong in the address (it is logged and sent to every worker); use the environment (docs/store.md)")
    if not parts.netloc:
        raise LocationError(f"store {text}: no bucket; write {SCHEMES[scheme]}")
    path = "/".join(p for p in (parts.netloc, parts.path.strip("/")) if p)
    uri = f"{scheme}://{path}" + (f"?{parts.query}" if parts.query else "")
    if filesystem is None:
        # small files then go up in one PUT instead of a three-request multipart upload; both are atomic
        query = "&".join(q for q in (parts.query, "allow_delayed_open=true" if scheme == "s3" else "") if q)
        try:
            filesystem, _ = pafs.FileSystem.from_uri(f"{scheme}://{path}" + (f"?{query}" if query else ""))
        except (OSError, pa.ArrowInvalid) as err:
            raise LocationError(f"store {uri}: {explain(err, scheme)}") from None
    return Location(filesystem, path, uri, scheme)


def check_bucket(loc: Location) -> None:
    """Raise LocationError unless an object store's bucket exists and can be reached (a no-op locally)."""
    if loc.local:
        return
    try:
        info = loc.fs.get_file_info(loc.bucket)
    except OSError as err:
        raise LocationError(f"store {loc.uri}: {explain(err, loc.scheme)}") from None
    if info.type == pafs.FileType.NotFound:
        raise LocationError(f"store {loc.uri}: bucket '{loc.bucket}' does not exist (create it first: icl-study never creates buckets)")


def explain(err: BaseException, scheme: str) -> str:
    """An object-store error as one line, with what to set when it is about access or the endpoint."""
    text = " ".join(str(err).split())
    low = text.lower()
    if scheme == "s3":
        if "no_such_bucket" in low or "nosuchbucket" in low or ("bucket" in low and "not found" in low):
            return f"the bucket does not exist ({text}); create it first: icl-study never creates buckets"
        if any(k in low for k in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken", "forbidden", "http response code 403")):
            return f"access denied ({text}); {_aws_credentials_hint()}"
        if any(k in low for k in ("network_connection", "curlcode", "could not resolve", "couldn't connect", "connection refused")):
            return f"cannot reach the object store ({text}); check AWS_ENDPOINT_URL (an S3-compatible server) or AWS_DEFAULT_REGION"
    if scheme in ("gs", "gcs") and any(k in low for k in ("permission", "unauthenticated", "credentials", "401", "403")):
        return f"access denied ({text}); set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run where the node's service account may use the bucket"
    return text


def _aws_credentials_hint() -> str:
    sources = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") if os.environ.get(v)]
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    sources += [f for f in files if Path(f).expanduser().is_file()]
    if not sources:
        return (
            "no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones) "
            "or AWS_PROFILE, or run on a node whose instance role may use the bucket"
        )
    return f"check the credentials found ({', '.join(sources)}), AWS_DEFAULT_REGION, and that they may read, write and delete under the prefix"
