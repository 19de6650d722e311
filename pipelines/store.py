"""The Parquet store: one hive-partitioned dataset per table, one file per bundle, atomic writes.

    store/
      trials/family=gmm/part-<bundle_id>.parquet     one row per run (the commit record)
      curves/family=gmm/part-<bundle_id>.parquet     the training curve of each run
      evals/family=gmm/part-<bundle_id>.parquet      metrics per estimator, test length and metric
      params/family=gmm/part-<bundle_id>.parquet     final (and optimal) parameters of each run
      trials/family=gmm/failed-<bundle_id>.parquet   runs whose bundle raised; retried by `run`

A bundle's files are written under hidden temporary names, then moved into place with
`os.replace`, its `trials` file last: a run exists when its `trials` row does. An interrupted
bundle leaves at most hidden temporaries (ignored by every Parquet reader) or complete files of
other tables without their `trials` file; `Store.recover` deletes both, so a rerun recomputes
exactly the runs that have no `trials` row. `pandas.read_parquet(store / "evals")` works with no
project code.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import types
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from study.config import FAMILIES, MODELS, Eval, Train

SCHEMA_VERSION = 3  # 3: trials.final_dist_theory, opt_g, opt_noise; curves.subopt_theory
TABLES = ("trials", "curves", "evals", "params")
DONE = ("ok", "diverged")


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
    for cls in [*FAMILIES.values(), *MODELS.values(), Train, Eval]:
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows to an Arrow table of the table's schema; missing columns are null, extra ones an error."""
    schema = SCHEMAS[name]
    extra = {k for r in rows for k in r} - set(schema.names) - {"family"}
    if extra:
        raise ValueError(f"table {name}: columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)


class Store:
    """A directory of Parquet tables (see the module docstring for the layout and protocol)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    @property
    def uri(self) -> str:
        """The store's address as workers receive it (a local absolute path here)."""
        return str(self.root)

    def tune_storage(self) -> tuple[str, Any]:
        """Ray Tune's `storage_path` and `storage_filesystem` for this store (its `_tune` folder)."""
        return str(self.root / "_tune"), None

    def table_dir(self, table: str, family: str) -> Path:
        return self.root / table / f"family={family}"

    def check_writable(self) -> None:
        """Create the store if needed and prove that a file can be written and removed there."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StoreError(f"store {self.root} is not writable: {err.strerror or err}") from None
        if not self.root.is_dir():
            raise StoreError(f"store {self.root} is not a directory")

    # ------------------------------------------------------------------------------------------
    # writing

    def _write(self, path: Path, table: pa.Table) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:  # on disk before it can be renamed into place
            os.fsync(f.fileno())
        return tmp

    @staticmethod
    def _sync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_bundle(self, family: str, bundle_id: str, tables: dict[str, pa.Table]) -> int:
        """Write a bundle's tables atomically, `trials` last; returns the number of rows written."""
        order = [t for t in TABLES if t != "trials" and t in tables] + ["trials"]
        staged = [(self._write(self.table_dir(t, family) / f"part-{bundle_id}.parquet", tables[t]), t) for t in order]
        for tmp, t in staged:
            os.replace(tmp, self.table_dir(t, family) / f"part-{bundle_id}.parquet")
            self._sync_dir(tmp.parent)
        return sum(tables[t].num_rows for t in order)

    def write_failed(self, family: str, bundle_id: str, trials: pa.Table) -> None:
        """Record the runs of a bundle that raised; `forget_failed` lets a rerun retry them."""
        path = self.table_dir("trials", family) / f"failed-{bundle_id}.parquet"
        os.replace(self._write(path, trials), path)

    # ------------------------------------------------------------------------------------------
    # housekeeping

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the store for one `run`: recovery and writes must not race another run."""
        path = self.root / ".lock"
        me = f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                host, pid, since = (path.read_text().split() + ["?", "0", "?"])[:3]
                if host == socket.gethostname() and not _alive(int(pid)):
                    path.unlink(missing_ok=True)  # left by a run that was killed on this host
                    continue
                raise StoreError(f"store {self.root} is in use by a run on {host} (pid {pid}) since {since}; if no run is active there, delete {path}") from None
        os.write(fd, me.encode())
        os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def _files(self, table: str) -> list[Path]:
        base = self.root / table
        return sorted(p for p in base.glob("family=*/*.parquet") if not p.name.startswith((".", "_"))) if base.is_dir() else []

    def recover(self) -> list[Path]:
        """Delete what an interrupted write left: temporaries, and files whose bundle never committed."""
        removed = [p for t in TABLES for p in (self.root / t).glob("family=*/.tmp-*")] if self.root.is_dir() else []
        committed = {(p.parent.name, p.name) for p in self._files("trials") if p.name.startswith("part-")}
        for t in TABLES[1:]:
            removed += [p for p in self._files(t) if (p.parent.name, p.name) not in committed]
        for p in removed:
            p.unlink(missing_ok=True)
        return removed

    def forget_failed(self) -> int:
        """Delete the records of failed runs so that the next run retries them; returns how many files."""
        files = [p for p in self._files("trials") if p.name.startswith("failed-")]
        for p in files:
            p.unlink()
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
                out = ds.dataset(self.root / table, format="parquet", partitioning=part, schema=schema).to_table()
            except (OSError, pa.ArrowInvalid) as err:
                raise StoreError(f"store {self.root}: cannot read table {table}: {err}") from None
        return out.select(columns) if columns else out

    def done_runs(self) -> set[str]:
        """Run ids with a committed `ok` or `diverged` row; a store of another schema version is an error."""
        files = [p for p in self._files("trials") if p.name.startswith("part-")]
        done: set[str] = set()
        for p in files:
            try:
                t = pq.read_table(p, columns=["run_id", "status", "schema_version"])
            except (OSError, pa.ArrowInvalid) as err:
                raise StoreError(f"store {self.root}: unreadable file {p} ({err}); move it out of the store and rerun: its runs will be recomputed") from None
            versions = set(t["schema_version"].to_pylist())
            if versions != {SCHEMA_VERSION}:
                raise StoreError(
                    f"store {self.root}: {p.name} has schema version {sorted(versions)}, this code writes version {SCHEMA_VERSION}; "
                    "run the sweep into a new --store (the analysis still reads the old one: `icl-study fit` re-fits it, "
                    "skipping the claims whose columns it lacks)"
                )
            done.update(r for r, s in zip(t["run_id"].to_pylist(), t["status"].to_pylist()) if s in DONE)
        return done
