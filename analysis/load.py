"""Loading the Parquet store into pandas: filters pushed down to Parquet, unreadable files skipped.

    from analysis.load import load
    tables = load("results", filters={"family": "gmm"})
    tables["evals"]  # each row joined to its run's configuration (d, c, snr, N, seed, ...)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

SCHEMA_VERSION = 3  # the store schema this analysis is written for (pipelines.store.SCHEMA_VERSION)
READABLE = (2, 3)  # schema 2 lacks trials.opt_g, opt_noise, final_dist_theory and curves.subopt_theory
TABLES = ("trials", "curves", "evals", "params")
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


def _read(root: Path, table: str, filters: dict[str, Any] | None, skipped: list[str]) -> pd.DataFrame:
    frames = []
    for path in sorted((root / table).glob("family=*/*.parquet")):
        if path.name.startswith((".", "_")):
            continue
        family = path.parent.name.split("=", 1)[1]
        if filters and "family" in filters and family not in (filters["family"] if isinstance(filters["family"], (list, tuple, set)) else [filters["family"]]):
            continue
        try:
            data = ds.dataset(path, format="parquet")
        except (OSError, ValueError) as err:
            skipped.append(f"{path}: {err}")
            continue
        expr = _filter(filters, data.schema.names)
        try:
            frame = data.to_table(filter=expr).to_pandas()
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise ValueError(f"filters {filters}: {err}") from None  # the caller's filter, not the file
        except (OSError, ValueError) as err:
            skipped.append(f"{path}: {err}")
            continue
        frames.append(frame.assign(family=family))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load(store: str | os.PathLike, tables: tuple[str, ...] = TABLES, filters: dict[str, Any] | None = None) -> Loaded:
    """The tables of a store; curves, evals and params joined to their run's `trials` row.

    `filters` maps a column to a value or a list of allowed values; it is applied to every table
    that has the column (`family` prunes whole partitions) and, through the join, to the runs.
    """
    root = Path(store)
    if not (root / "trials").is_dir():
        raise StoreReadError(f"{root}: not a store (no trials table); run a sweep first")
    skipped: list[str] = []
    trials = _read(root, "trials", filters, skipped)
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
        frame = _read(root, name, filters, skipped)
        if not frame.empty:  # the table's own columns win (evals.M is one test length, trials.M the list)
            keys = trials.drop(columns=[c for c in trials.columns if c in frame.columns and c != "run_id"])
            frame = frame.merge(keys, on="run_id", how="inner")  # rows of uncommitted bundles drop out
        out[name] = frame
    return Loaded(out, skipped, notes)
