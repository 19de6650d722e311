"""The Parquet store: one hive-partitioned dataset per table, one file per bundle, atomic writes,
in a local or network directory or under an object-store prefix (S3, GCS).

    <store>/
      trials/family=gmm/part-<bundle_id>.parquet     one row per run (the commit record)
      curves/family=gmm/part-<bundle_id>.parquet     the training curve of each run
      evals/family=gmm/part-<bundle_id>.parquet      metrics per estimator, test length and metric
      params/family=gmm/part-<bundle_id>.parquet     final (and optimal) parameters of each run
      trials/family=gmm/failed-<bundle_id>.parquet   runs whose bundle raised; retried by `run`
      _tune/                                         Ray Tune's own experiment state
      .lock                                          the lease of the run writing the store

A store is a path (`results`, `/mnt/nfs/results`) or `s3://bucket/prefix` (`gs://bucket/prefix`),
resolved by pipelines.location to a pyarrow file system; S3 takes the standard AWS variables.

A run exists when its `trials` row does; a bundle's `trials` file is written last, and no reader
ever sees a half-written file:
- in a directory, each file is written under a hidden temporary name, fsynced, and moved into place
  with `os.replace` (atomic on POSIX and within one NFS directory);
- on an object store, each file goes straight to its final key in one upload: a single-object PUT
  (a multipart upload past 5 MB) is atomic on S3 and GCS, the object appears whole or not at all.
  The file is serialised in memory first, so no error can cut an upload short.
An interrupted bundle leaves at most hidden temporaries (ignored by every Parquet reader) or complete
files of other tables without their `trials` file; `Store.recover` deletes both, so a rerun
recomputes exactly the runs that have no `trials` row. `pandas.read_parquet("<store>/evals")` works
with no project code (docs/store.md: object stores). `Store.lock` keeps a second run out.
"""

from __future__ import annotations

import contextlib
import os
import types
import typing
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.lease import Lease, LeaseError
from pipelines.location import LocationError, check_bucket, commit, explain, is_temporary, locate, parquet_bytes, stage, write_atomic
from study.config import MODEL_CONFIGS, TASK_CONFIGS, Eval, Train

SCHEMA_VERSION = 3  # 3: trials.final_dist_theory, opt_g, opt_noise; curves.subopt_theory
TABLES = ("trials", "curves", "evals", "params")
DONE = ("ok", "diverged")
READERS = 16  # files read at once where a store is listed file by file


class StoreError(OSError):
    """The store cannot be read or written."""


def _arrow_type(annotation: Any) -> pa.DataType:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is typing.Annotated:
        return _arrow_type(args[0])
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _arrow_type(inner)
    if origin is Literal:
        return pa.string()
    if origin in (list, tuple):
        return pa.list_(_arrow_type(args[0]))
    return {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}[annotation]


def config_fields() -> list[pa.Field]:
    """One column per config field of every family and model (null where a field does not apply)."""
    fields: dict[str, pa.DataType] = {}
    for cls in [*TASK_CONFIGS.values(), *MODEL_CONFIGS.values(), Train, Eval]:
        for name, info in cls.model_fields.items():
            if name != "family":
                fields.setdefault(name, _arrow_type(info.annotation))
    fields["estimators"] = pa.list_(pa.string())
    return [pa.field(k, v) for k, v in fields.items()]


SCHEMAS: dict[str, pa.Schema] = {
    # `family` is the partition key: it lives in the directory name, not in the files
    "trials": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("config_id", pa.string()),
            pa.field("bundle_id", pa.string()),
            pa.field("sweep", pa.string()),
            *config_fields(),
            pa.field("seed", pa.int64()),
            pa.field("status", pa.string()),
            pa.field("steps_done", pa.int64()),
            pa.field("final_train_loss", pa.float64()),
            pa.field("final_dist_theory", pa.float64()),
            pa.field("opt_loss", pa.float64()),
            pa.field("opt_converged", pa.bool_()),
            pa.field("opt_dist_theory", pa.float64()),
            pa.field("opt_g", pa.float64()),
            pa.field("opt_noise", pa.float64()),
            pa.field("rho_theory", pa.float64()),
            pa.field("excess_risk", pa.float64()),
            pa.field("error", pa.string()),
            pa.field("wall_s", pa.float64()),
            pa.field("device", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
            pa.field("code_version", pa.string()),
            pa.field("schema_version", pa.int64()),
        ]
    ),
    "curves": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("step", pa.int64()),
            pa.field("train_loss", pa.float64()),
            pa.field("subopt", pa.float64()),
            pa.field("dist_opt", pa.float64()),
            pa.field("dist_theory", pa.float64()),
            pa.field("subopt_theory", pa.float64()),
        ]
    ),
    "evals": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("estimator", pa.string()),
            pa.field("M", pa.float64()),
            pa.field("shift", pa.string()),
            pa.field("metric", pa.string()),
            pa.field("value", pa.float64()),
            pa.field("n_prompts", pa.int64()),
            pa.field("stderr", pa.float64()),
        ]
    ),
    "params": pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("name", pa.string()),
            pa.field("shape", pa.list_(pa.int64())),
            pa.field("values", pa.list_(pa.float64())),
        ]
    ),
}


def to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows to an Arrow table of the table's schema; missing columns are null, extra ones an error."""
    schema = SCHEMAS[name]
    extra = {k for r in rows for k in r} - set(schema.names) - {"family"}
    if extra:
        raise ValueError(f"table {name}: columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)


class Store:
    """The Parquet tables of a store at a local path or an object-store prefix (see the module docstring).

    `Store("results")`, `Store("/mnt/nfs/results")`, `Store("s3://bucket/prefix")`; `filesystem`
    replaces the pyarrow file system the address implies (tests inject write faults so). An unknown
    scheme raises StoreError naming the allowed ones.
    """

    def __init__(self, uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
        try:
            self.loc = locate(uri, filesystem)
        except LocationError as err:
            raise StoreError(str(err)) from None
        self.fs, self.local = self.loc.fs, self.loc.local
        self._bucket_checked = False

    @property
    def uri(self) -> str:
        """The store's address as workers receive it: an absolute local path, or `s3://bucket/prefix`."""
        return self.loc.uri

    @property
    def root(self) -> Path | str:
        """The store's directory for a local store; for an object store its URI (for messages only)."""
        return Path(self.loc.path) if self.local else self.loc.uri

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def tune_storage(self) -> tuple[str, Any]:
        """Ray Tune's `storage_path` and `storage_filesystem` for this store (its `_tune` folder)."""
        if self.local:
            return str(Path(self.loc.path) / "_tune"), None
        return self.loc.join("_tune"), self.fs

    def _path(self, table: str, family: str, name: str) -> str:
        return self.loc.join(table, f"family={family}", name)

    def check_bucket(self) -> None:
        """An object store's bucket exists and answers with these credentials (StoreError if not); once per Store."""
        if not self._bucket_checked:
            try:
                check_bucket(self.loc)
            except LocationError as err:
                raise StoreError(str(err)) from None
            self._bucket_checked = True

    def _error(self, err: OSError, doing: str) -> StoreError:
        if self.local:
            return StoreError(f"store {self.uri}: {doing}: {err.strerror or err}")
        return StoreError(f"store {self.uri}: {doing}: {explain(err, self.loc.scheme)}")

    def exists(self) -> bool:
        """Whether the store's directory (an object store: any object under its prefix) exists."""
        self.check_bucket()
        try:
            return self.fs.get_file_info(self.loc.path).type == pafs.FileType.Directory
        except OSError as err:
            raise self._error(err, "cannot look it up") from None

    def check_writable(self) -> None:
        """Create the store if needed and prove that a file can be written and removed there.

        On an object store: the bucket exists and the credentials may PUT and DELETE under the prefix.
        """
        probe = self.loc.join(f".probe-{uuid.uuid4().hex}")
        try:
            if self.local:
                Path(self.loc.path).mkdir(parents=True, exist_ok=True)
            else:
                self.check_bucket()
            with self.fs.open_output_stream(probe) as out:
                out.write(b"")
            self.fs.delete_file(probe)
        except StoreError:
            raise
        except OSError as err:
            raise StoreError(f"store {self.uri} is not writable: {(err.strerror or err) if self.local else explain(err, self.loc.scheme)}") from None
        if self.local and not Path(self.loc.path).is_dir():
            raise StoreError(f"store {self.uri} is not a directory")

    # ------------------------------------------------------------------------------------------
    # writing

    def _write(self, path: str, table: pa.Table) -> None:
        """One file, whole or not at all, on disk before it is visible (pipelines.location.write_atomic)."""
        write_atomic(path, parquet_bytes(table), self.fs, object_store=not self.local, durable=True)

    def write_bundle(self, family: str, bundle_id: str, tables: dict[str, pa.Table]) -> int:
        """Write a bundle's tables atomically, `trials` last; returns the number of rows written.

        In a directory every table is first staged (written and fsynced under a hidden temporary
        name), then each is renamed into place, `trials` last: a failed write (a full disk) leaves
        no visible file and no temporary. On an object store each table is one upload, `trials`
        last; a failure there leaves complete files of other tables without their `trials` file,
        which `recover` deletes (they may also belong to an earlier attempt that committed).
        """
        order = [t for t in TABLES if t != "trials" and t in tables] + ["trials"]
        finals = [self._path(t, family, f"part-{bundle_id}.parquet") for t in order]
        if not self.local:
            for t, path in zip(order, finals):
                self._write(path, tables[t])
            return sum(tables[t].num_rows for t in order)
        staged: list[str] = []
        try:
            for t, path in zip(order, finals):
                staged.append(stage(path, parquet_bytes(tables[t]), self.fs, durable=True))
        except BaseException:
            for tmp in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        for tmp, path in zip(staged, finals):
            commit(tmp, path, durable=True)
        return sum(tables[t].num_rows for t in order)

    def write_failed(self, family: str, bundle_id: str, trials: pa.Table) -> None:
        """Record the runs of a bundle that raised; `forget_failed` lets a rerun retry them."""
        self._write(self._path("trials", family, f"failed-{bundle_id}.parquet"), trials)

    # ------------------------------------------------------------------------------------------
    # housekeeping

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the store for one `run`: recovery and writes must not race another run.

        A lease, `<store>/.lock`, renewed by a heartbeat (pipelines.lease): a second run is refused
        with StoreError while the holder lives; a lease left by a killed run is taken over at once on
        the same host (its pid is gone) and after `lease.STALE_S` seconds without renewal from any
        host. Creation is atomic on a file system (O_EXCL) and on S3 with boto3 installed
        (If-None-Match); elsewhere it is check, write, read back (best effort, see pipelines.lease).
        """
        lease = Lease(self.loc)
        try:
            lease.acquire()
        except OSError as err:
            raise StoreError(str(err) if isinstance(err, LeaseError) else str(self._error(err, "cannot take its lease"))) from None
        try:
            yield
        finally:
            lease.release()

    def _listing(self, table: str) -> list[pafs.FileInfo]:
        """Every file of a table's partitions (`<table>/family=*/<name>`), hidden ones included."""
        self.check_bucket()
        base = self.loc.join(table)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as err:
            raise self._error(err, f"cannot list table {table}") from None
        out = []
        for info in infos:
            rel = info.path[len(base) + 1 :].split("/")
            if info.type == pafs.FileType.File and len(rel) == 2 and rel[0].startswith("family="):
                out.append(info)
        return out

    def _files(self, table: str, listing: list[pafs.FileInfo] | None = None) -> list[str]:
        """The table's visible Parquet files (what readers see), sorted."""
        infos = self._listing(table) if listing is None else listing
        return sorted(i.path for i in infos if i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_")))

    def recover(self) -> list[str]:
        """Delete what an interrupted write left: temporaries, and files whose bundle never committed."""
        listed = {t: self._listing(t) for t in TABLES}
        removed = [i.path for t in TABLES for i in listed[t] if is_temporary(i.base_name)]
        bundle = lambda p: tuple(p.rsplit("/", 2)[-2:])  # noqa: E731  (family=..., part-<bundle_id>.parquet)
        committed = {bundle(p) for p in self._files("trials", listed["trials"]) if p.rsplit("/", 1)[-1].startswith("part-")}
        for t in TABLES[1:]:
            removed += [p for p in self._files(t, listed[t]) if bundle(p) not in committed]
        for p in removed:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(p)
        return removed

    def forget_failed(self) -> int:
        """Delete the records of failed runs so that the next run retries them; returns how many files."""
        files = [p for p in self._files("trials") if p.rsplit("/", 1)[-1].startswith("failed-")]
        for p in files:
            self.fs.delete_file(p)
        return len(files)

    # ------------------------------------------------------------------------------------------
    # reading

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """One table as Arrow, with the partition column `family` (empty when the store has none)."""
        schema = SCHEMAS[table].append(pa.field("family", pa.string()))
        if not self._files(table):
            out = schema.empty_table()
        else:
            part = ds.partitioning(pa.schema([pa.field("family", pa.string())]), flavor="hive")
            try:
                out = ds.dataset(self.loc.join(table), filesystem=self.fs, format="parquet", partitioning=part, schema=schema).to_table()
            except (OSError, pa.ArrowInvalid) as err:
                raise StoreError(f"store {self.uri}: cannot read table {table}: {err}") from None
        return out.select(columns) if columns else out

    def _read_trials(self, path: str) -> pa.Table:
        try:
            return pq.read_table(path, columns=["run_id", "status", "schema_version"], filesystem=self.fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise StoreError(f"store {self.uri}: unreadable file {path} ({err}); move it out of the store and rerun: its runs will be recomputed") from None

    def done_runs(self) -> set[str]:
        """Run ids with a committed `ok` or `diverged` row; a store of another schema version is an error."""
        files = [p for p in self._files("trials") if p.rsplit("/", 1)[-1].startswith("part-")]
        done: set[str] = set()
        with ThreadPoolExecutor(READERS) as pool:  # an object store answers each file in tens of ms
            for p, t in zip(files, pool.map(self._read_trials, files)):
                versions = set(t["schema_version"].to_pylist())
                if versions != {SCHEMA_VERSION}:
                    raise StoreError(
                        f"store {self.uri}: {p.rsplit('/', 1)[-1]} has schema version {sorted(versions)}, this code writes version {SCHEMA_VERSION}; "
                        "run the sweep into a new --store (the analysis still reads the old one: `icl-study fit` re-fits it, "
                        "skipping the claims whose columns it lacks)"
                    )
                done.update(r for r, s in zip(t["run_id"].to_pylist(), t["status"].to_pylist()) if s in DONE)
        return done
