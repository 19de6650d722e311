"""Loading the Parquet store into pandas: filters pushed down to Parquet, unreadable files skipped.

    from analysis.load import load
    tables = load("results", filters={"family": "gmm"})   # or load("s3://bucket/prefix")
    tables["evals"]  # each row joined to its run's configuration (d, c, snr, N, seed, ...)

A store is a local path or an object-store URI (pipelines.location: pyarrow file systems, no torch).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.location import Location, LocationError, check_bucket, explain, locate
from pipelines.store import READERS, SCHEMA_VERSION, TABLES  # pyarrow and the configs only: no torch

READABLE = (2, 3)  # schema 2 lacks trials.opt_g, opt_noise, final_dist_theory and curves.subopt_theory
REQUIRED = ("run_id", "status", "seed", "sweep", "code_version", "schema_version")  # trials columns the analysis cannot do without


class StoreReadError(ValueError):
    """The store cannot be analysed (missing, empty, or of another schema version)."""


@dataclass
class Loaded:
    """Tables as DataFrames, and the files that could not be read (skipped, by name)."""

    tables: dict[str, pd.DataFrame]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. an older schema: what it cannot support

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def _filter(filters: dict[str, Any] | None, names: list[str]):
    expr = None
    for key, value in (filters or {}).items():
        if key not in names:
            continue
        values = value if isinstance(value, (list, tuple, set)) else [value]
        term = ds.field(key).isin(list(values))
        expr = term if expr is None else expr & term
    return expr


def open_store(store: str | os.PathLike | Location) -> Location:
    """A store's file system and path; StoreReadError for an unknown scheme, a missing bucket or no access."""
    if isinstance(store, Location):
        return store
    try:
        loc = locate(store)
        check_bucket(loc)
    except LocationError as err:
        raise StoreReadError(str(err)) from None
    return loc


def list_files(loc: Location, directory: str) -> list[pafs.FileInfo]:
    """The Parquet files of `<directory>/family=*/` (hidden and `_` files left out), by path."""
    base = loc.join(directory)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as err:
        raise StoreReadError(f"store {loc.uri}: cannot list {directory}: {explain(err, loc.scheme)}") from None
    keep = []
    for info in infos:
        rel = info.path[len(base) + 1 :].split("/")
        name = rel[-1]
        if info.type == pafs.FileType.File and len(rel) == 2 and rel[0].startswith("family=") and name.endswith(".parquet") and not name.startswith((".", "_")):
            keep.append(info)
    return sorted(keep, key=lambda i: i.path)


def _read(loc: Location, table: str, filters: dict[str, Any] | None, skipped: list[str]) -> pd.DataFrame:
    wanted = None
    if filters and "family" in filters:
        wanted = set(filters["family"] if isinstance(filters["family"], (list, tuple, set)) else [filters["family"]])
    paths = [i.path for i in list_files(loc, table)]
    paths = [p for p in paths if wanted is None or p.rsplit("/", 2)[-2].split("=", 1)[1] in wanted]

    def one(path: str) -> tuple[str, pa.Table] | str:
        family = path.rsplit("/", 2)[-2].split("=", 1)[1]
        if not filters:  # the whole file: one read, without a dataset's discovery and scan
            try:
                return family, pq.ParquetFile(path, filesystem=loc.fs).read()
            except (OSError, ValueError):
                pass  # read again below, for the dataset reader's own message
        try:
            data = ds.dataset(path, format="parquet", filesystem=loc.fs)
        except (OSError, ValueError) as err:
            return f"{path}: {err}"
        expr = _filter(filters, data.schema.names)
        try:
            return family, data.to_table(filter=expr)
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise ValueError(f"filters {filters}: {err}") from None  # the caller's filter, not the file
        except (OSError, ValueError) as err:
            return f"{path}: {err}"

    with ThreadPoolExecutor(READERS) as pool:
        results = list(pool.map(one, paths))
    skipped += [r for r in results if isinstance(r, str)]
    read = [(path, *r) for path, r in zip(paths, results) if not isinstance(r, str)]
    if _concatenable([t for _, _, t in read]):  # one conversion to pandas for all the files
        try:
            frame = pa.concat_tables([t for _, _, t in read]).to_pandas()
        except (OSError, ValueError, pa.ArrowException):
            frame = None
        if frame is not None:
            frame["family"] = _labels([f for _, f, _ in read], [t.num_rows for _, _, t in read])
            return frame
    frames = []
    for path, family, t in read:
        try:
            frame = t.to_pandas()
        except (OSError, ValueError) as err:
            skipped.append(f"{path}: {err}")
            continue
        frame["family"] = family  # the frame is this reader's own: no copy (assign copied every column)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _plain_type(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_timestamp(t) or pa.types.is_null(t)


def _concatenable(tables: list[pa.Table]) -> bool:
    """Whether the files' tables, concatenated and converted once, give the frame that converting
    each and concatenating the frames gives: one schema (no pandas metadata, no dictionaries or
    other types whose conversion depends on the file) and no empty file (pandas drops an empty
    frame's dtypes from the concatenation)."""
    if len(tables) < 2:
        return False
    schema = tables[0].schema
    return (
        not (schema.metadata or {}).get(b"pandas")
        and all(_plain_type(f.type) for f in schema)
        and all(t.num_rows > 0 and t.schema.equals(schema, check_metadata=True) for t in tables)
    )


def _labels(families: list[str], rows: list[int]) -> pd.api.extensions.ExtensionArray:
    """The `family` column of files concatenated: each file's family, of the dtype a frame gives a
    column set to one string."""
    probe = pd.DataFrame(index=pd.RangeIndex(1))
    probe["family"] = families[0]
    return pd.array(np.repeat(np.array(families, dtype=object), rows), dtype=probe["family"].dtype)


def load(store: str | os.PathLike | Location, tables: tuple[str, ...] = TABLES, filters: dict[str, Any] | None = None) -> Loaded:
    """The tables of a store; curves, evals and params joined to their run's `trials` row.

    `filters` maps a column to a value or a list of allowed values; it is applied to every table
    that has the column (`family` prunes whole partitions) and, through the join, to the runs.
    """
    loc = open_store(store)
    root = loc.uri
    try:
        is_store = loc.fs.get_file_info(loc.join("trials")).type == pafs.FileType.Directory
    except OSError as err:
        raise StoreReadError(f"store {root}: {explain(err, loc.scheme)}") from None
    if not is_store:
        raise StoreReadError(f"{root}: not a store (no trials table); run a sweep first")
    skipped: list[str] = []
    trials = _read(loc, "trials", filters, skipped)
    if trials.empty:
        raise StoreReadError(f"{root}: the store has no readable runs" + (f" ({len(skipped)} files skipped)" if skipped else ""))
    missing = [c for c in REQUIRED if c not in trials]
    if missing:
        raise StoreReadError(f"{root}: the trials table has no column {', '.join(missing)}: not a store of icl-study schema {SCHEMA_VERSION}")
    versions = set(trials["schema_version"].dropna().astype(int))
    if not versions <= set(READABLE):
        raise StoreReadError(f"{root}: schema version {sorted(versions)}, this analysis reads versions {', '.join(map(str, READABLE))}")
    notes = []
    if versions != {SCHEMA_VERSION}:
        notes.append(
            f"runs of schema version {', '.join(str(v) for v in sorted(versions - {SCHEMA_VERSION}))}: the claims that need the columns "
            f"of schema {SCHEMA_VERSION} (trials.opt_g, opt_noise, final_dist_theory; curves.subopt_theory) are skipped; "
            "re-fit with this version for the other claims' new verdicts, re-run the sweeps into a new --store for all of them"
        )
    out = {"trials": trials}
    for name in tables:
        if name == "trials":
            continue
        frame = _read(loc, name, filters, skipped)
        if not frame.empty:  # the table's own columns win (evals.M is one test length, trials.M the list)
            keys = trials.drop(columns=[c for c in trials.columns if c in frame.columns and c != "run_id"])
            frame = frame.merge(keys, on="run_id", how="inner")  # rows of uncommitted bundles drop out
        out[name] = frame
    return Loaded(out, skipped, notes)
