"""The lease on a store: one `icl-study run` recovers, plans and writes a store at a time.

A run holds `<store>/.lock`, one line `host pid since token`, while it works; the file's (object's)
modification time is its heartbeat, renewed every HEARTBEAT_S seconds by a thread of the holder.
Another run is refused while the lease is live. It is stale, and the next run takes it over, when
its holder was a process of this host that no longer exists (seen at once), or when it has not been
renewed for STALE_S seconds: a run killed on another host, where there is no pid to probe, blocks
the store for at most that long. A holder that finds its lease taken over (it stalled for longer
than STALE_S) says so on stderr and stops renewing it.

Creating the lease, on each backend:
- a local or NFS directory: O_CREAT|O_EXCL, atomic; of two runs racing for a free store one wins.
- S3 with boto3 installed: PutObject with `If-None-Match: *`, and a stale lease is replaced with
  `If-Match: <its ETag>` (S3's conditional writes, 2024), so of two racing runs exactly one wins;
  likewise on a compatible server that implements them. pyarrow 26 cannot do this: its S3 output
  streams pass on only ACL, Cache-Control, Content-Type, Content-Language and Expires.
- S3 without boto3, GCS, any other pyarrow file system: check, write, wait SETTLE_S, read back.
  Of two runs that both saw no lease, the one whose write landed first reads the other's and
  backs off; both go ahead only if the later one took longer than SETTLE_S between its check and
  its write (a stalled client). Best effort.
Taking over a stale lease on a file system unlinks it and creates it again: two runs that take over
the same stale lease within the same moment can both succeed. Ages of remote leases compare the
local clock with the server's Last-Modified: keep hosts' clocks synchronised well within STALE_S.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipelines.location import Location, explain

HEARTBEAT_S = 30.0  # the holder renews the lease this often
STALE_S = 300.0  # a lease not renewed for this long was left by a dead run
SETTLE_S = 1.0  # best-effort backends: wait this long before reading a new lease back
_now = time.time  # the clock that ages leases (tests move it)


class LeaseError(OSError):
    """The store is in use by another run, or its lease cannot be read or written."""


class _NoConditions(Exception):
    """The S3-compatible server does not implement conditional writes."""


@dataclass
class Holder:
    """Who holds a lease, and how long ago it was renewed."""

    host: str
    pid: int
    since: str
    token: str
    age: float
    etag: str | None = None

    @classmethod
    def parse(cls, text: str, age: float, etag: str | None = None) -> "Holder":
        host, pid, since, token = (text.split() + ["?", "0", "?", ""])[:4]
        return cls(host, int(pid) if pid.isdigit() else 0, since, token, age, etag)

    def stale(self) -> bool:
        if self.host == socket.gethostname() and self.pid and not _alive(self.pid):
            return True  # left by a run that was killed on this host
        return self.age > STALE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """`acquire()` or raise LeaseError naming the holder; `release()` when done (see the module docstring)."""

    def __init__(self, loc: Location):
        self.loc, self.path = loc, loc.join(".lock")
        self.token = uuid.uuid4().hex
        self.line = f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {self.token}"
        client = _s3_client(loc)
        self.backend = _Local(self.path) if loc.local else _Conditional(client, loc) if client else _BestEffort(loc.fs, self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(4):  # a lost race looks again: the winner's lease is live, or it was stale
            holder = self.backend.read()
            if holder is not None and not holder.stale():
                where = self.path if self.loc.local else f"{self.loc.uri.split('?')[0]}/.lock"
                raise LeaseError(
                    f"store {self.loc.uri} is in use by a run on {holder.host} (pid {holder.pid}) since {holder.since}, "
                    f"its lease renewed {max(holder.age, 0):.0f}s ago (it lapses after {STALE_S:.0f}s without renewal); "
                    f"if no run is active there, delete {where}"
                )
            try:
                taken = self.backend.create(self.line) if holder is None else self.backend.replace(holder, self.line)
            except _NoConditions:  # an S3-compatible server without conditional writes
                self.backend, taken = _BestEffort(self.loc.fs, self.path), False
            if taken:
                break
        else:
            raise LeaseError(f"store {self.loc.uri}: other runs keep taking its lease {self.path}; try again")
        self._thread = threading.Thread(target=self._renew, name="icl-study-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.backend.delete_if_mine(self.token)
        except OSError:
            pass  # a lease left behind lapses after STALE_S

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                mine = self.backend.renew(self.token, self.line)
            except OSError:
                continue  # a network blip: the next beat tries again
            except _NoConditions:
                self.backend = _BestEffort(self.loc.fs, self.path)
                continue
            if not mine:
                print(
                    f"icl-study: warning: the lease on store {self.loc.uri} was taken over by another run (this one stalled for over "
                    f"{STALE_S:.0f}s); the two may now write the store at once",
                    file=sys.stderr,
                    flush=True,
                )
                return


class _Local:
    """A lock file on a local or network file system; the pid is probed on this host."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> Holder | None:
        try:
            with open(self.path) as f:
                text = f.read()
            age = _now() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        return Holder.parse(text, age)

    def create(self, line: str) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def replace(self, holder: Holder, line: str) -> bool:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        return self.create(line)

    def renew(self, token: str, line: str) -> bool:
        holder = self.read()
        if holder is None or holder.token != token:
            return False
        os.utime(self.path)
        return True

    def delete_if_mine(self, token: str) -> None:
        holder = self.read()
        if holder is not None and holder.token == token:
            os.unlink(self.path)


class _BestEffort:
    """Check, write, settle, read back: any pyarrow file system (see the module docstring for the race)."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path

    def read(self) -> Holder | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                text = f.read().decode()
            info = self.fs.get_file_info(self.path)
        except FileNotFoundError:
            return None
        if info.type == pafs.FileType.NotFound:
            return None
        return Holder.parse(text, _now() - info.mtime_ns / 1e9)

    def _write(self, line: str) -> None:
        with self.fs.open_output_stream(self.path) as out:
            out.write(line.encode())

    def create(self, line: str) -> bool:
        self._write(line)
        time.sleep(SETTLE_S)
        holder = self.read()
        return holder is not None and holder.token == line.split()[3]

    def replace(self, holder: Holder, line: str) -> bool:
        return self.create(line)  # last writer wins; the read-back tells who

    def renew(self, token: str, line: str) -> bool:
        holder = self.read()
        if holder is None or holder.token != token:
            return False
        self._write(line)
        return True

    def delete_if_mine(self, token: str) -> None:
        holder = self.read()
        if holder is not None and holder.token == token:
            self.fs.delete_file(self.path)


class _Conditional:
    """S3 conditional writes through boto3: If-None-Match to create, If-Match to replace or renew."""

    LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409")
    UNSUPPORTED = ("NotImplemented", "501")

    def __init__(self, client: Any, loc: Location):
        self.client, self.scheme = client, loc.scheme
        self.bucket, _, prefix = loc.path.partition("/")
        self.key = f"{prefix}/.lock" if prefix else ".lock"
        self.etag: str | None = None

    def _call(self, method: str, **kwargs: Any) -> Any:
        """The client's method; False where a condition failed, LeaseError for any other error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code in self.LOST:
                return False
            if code in self.UNSUPPORTED and ("IfNoneMatch" in kwargs or "IfMatch" in kwargs):
                raise _NoConditions() from None
            raise LeaseError(explain(err, self.scheme)) from None
        except BotoCoreError as err:
            raise LeaseError(explain(err, self.scheme)) from None

    def read(self) -> Holder | None:
        out = self._call("get_object")
        if out is False:
            return None
        text = out["Body"].read().decode()
        return Holder.parse(text, _now() - out["LastModified"].timestamp(), out["ETag"])

    def _put(self, line: str, **condition: str) -> bool:
        out = self._call("put_object", Body=line.encode(), **condition)
        if out is False:
            return False
        self.etag = out["ETag"]
        return True

    def create(self, line: str) -> bool:
        return self._put(line, IfNoneMatch="*")

    def replace(self, holder: Holder, line: str) -> bool:
        return self._put(line, IfMatch=holder.etag or "")

    def renew(self, token: str, line: str) -> bool:
        return self._put(line, IfMatch=self.etag or "")

    def delete_if_mine(self, token: str) -> None:
        holder = self.read()
        if holder is not None and holder.token == token:
            self._call("delete_object")


def _s3_client(loc: Location) -> Any:
    """A boto3 S3 client configured like the store's pyarrow file system, or None without boto3 or conditional writes."""
    if loc.scheme != "s3" or not isinstance(loc.fs, pafs.S3FileSystem):
        return None
    try:
        import boto3
    except ImportError:
        return None
    from urllib.parse import parse_qsl, urlsplit

    options = dict(parse_qsl(urlsplit(loc.uri).query))
    endpoint = options.get("endpoint_override")  # else boto3 reads AWS_ENDPOINT_URL(_S3) itself, as pyarrow does
    if endpoint and "://" not in endpoint:
        endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
    client = boto3.client("s3", region_name=loc.fs.region or None, endpoint_url=endpoint or None)
    if "IfNoneMatch" not in client.meta.service_model.operation_model("PutObject").input_shape.members:
        return None  # a botocore older than S3's conditional writes
    return client
