"""The `fits` table on disk: writing and reading what `icl-study fit` judged, and the verdict counts.

    <store>/fits/family=<f>/fits.parquet        one row per claim and group (analysis.verdicts.evaluate)
    <store>/fits_skipped/skipped.parquet         the claims skipped, and why: claim, reason

`fits/**/*.parquet` is one hive-partitioned table in pandas, pyarrow, DuckDB and polars alike.
Every file is replaced whole (pipelines.location.write_atomic).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.claims import CLAIMS
from analysis.load import Location, StoreReadError, list_files, open_store
from pipelines.location import is_temporary, parquet_bytes, write_atomic

VERDICTS = ("within", "violated", "consistent", "steeper", "shallower", "inconclusive")


def verdict_table(fits_table: pd.DataFrame) -> pd.DataFrame:
    """Per claim: kind, theory, tolerance, window, how many fits gave each verdict, how many violate
    the bound, and the median estimate."""
    described = {c.name: c for c in CLAIMS}
    out = []
    for name, rows in fits_table.groupby("claim", sort=False):
        claim = described.get(name)
        per_run = claim is not None and claim.law in ("rate", "curve")
        theory = "rho_theory per run" if claim is not None and claim.law == "rate" and math.isnan(claim.theory) else f"{rows['theory'].iloc[0]:.4g}"
        counts = rows["verdict"].value_counts()
        out.append(
            {
                "claim": name, "kind": rows["kind"].iloc[0], "metric vs x": f"{rows['metric'].iloc[0]} vs {rows['x'].iloc[0]}", "theory": theory,
                "tolerance": f"{rows['tolerance'].iloc[0]:g}", "window": claim.window if claim is not None and not per_run else "per run",
                "fits": len(rows), **{v: int(counts.get(v, 0)) for v in VERDICTS}, "against the bound": int(counts.get("violated", 0)),
                "median estimate": f"{rows['estimate'].median():.4g}",
            }
        )
    return pd.DataFrame(out)


SKIPPED = ("fits_skipped", "skipped.parquet")  # the claims `fit` skipped, and why: claim, reason


def write_fits(store: str | os.PathLike | Location, rows: pd.DataFrame, skipped: list[tuple[str, str]]) -> list[str]:
    """Replace the store's `fits` table (one file per family) and its list of skipped claims.

    Each file is written under a hidden name and moved into place (on an object store: uploaded
    whole to its key); a family with no fits now loses its old file once the new ones are in place.
    The skipped claims are a table of their own (`fits_skipped/skipped.parquet`), so that a glob of
    `fits/**/*.parquet` reads one schema, hive-partitioned, in every reader. Returns the paths.
    """
    loc = open_store(store)
    root = loc.join("fits")
    _sweep_temporaries(loc)
    written = []
    families = set(rows["family"]) if len(rows) else set()
    # one Arrow schema for every family's file (the union of the group columns, typed from all
    # rows), so that a dataset reader sees every column whichever file it opens first
    table = pa.Table.from_pandas(rows.drop(columns=["family"]), preserve_index=False) if len(rows) else None
    for family in sorted(families):
        part = table.filter(pa.array((rows["family"] == family).to_numpy()))
        written.append(_replace(loc, f"{root}/family={family}/fits.parquet", part))
    _replace(loc, loc.join(*SKIPPED), pd.DataFrame(skipped, columns=["claim", "reason"]))
    for old in _fits_files(loc):  # after the new files are in place
        if old.rsplit("/", 2)[-2].split("=", 1)[1] not in families:
            loc.fs.delete_file(old)
    legacy = loc.join("fits", "_skipped.parquet")  # where icl-study before 2026-11-27 kept them
    if loc.fs.get_file_info(legacy).type == pafs.FileType.File:
        loc.fs.delete_file(legacy)
    return written


ABANDONED_S = 600  # a temporary of the fits this much older than now was left by a fit that was killed


def _sweep_temporaries(loc: Location) -> list[str]:
    """Delete the hidden temporaries that killed `fit`s left in `fits/` and `fits_skipped/` (a directory
    store's; an object store's uploads leave none). Only stale ones: a fit writing now keeps its own."""
    if not loc.local:
        return []
    now, removed = time.time(), []
    for directory in ("fits", SKIPPED[0]):
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.join(directory), recursive=True, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.File and is_temporary(info.base_name) and now - info.mtime.timestamp() > ABANDONED_S:
                with contextlib.suppress(FileNotFoundError):
                    loc.fs.delete_file(info.path)
                removed.append(info.path)
    return removed


def _fits_files(loc: Location) -> list[str]:
    return [i.path for i in list_files(loc, "fits") if i.base_name == "fits.parquet"]


def _replace(loc: Location, path: str, data: pd.DataFrame | pa.Table) -> str:
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    return write_atomic(path, parquet_bytes(table), loc.fs, object_store=not loc.local)


def read_fits(store: str | os.PathLike | Location) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The `fits` table (with `family`) and the skipped claims, as `icl-study fit` last wrote them."""
    loc = open_store(store)
    skipped_path = loc.join(*SKIPPED)
    if loc.fs.get_file_info(skipped_path).type != pafs.FileType.File:
        raise StoreReadError(f"{loc.uri}: no fits yet; run `icl-study fit --store {loc.uri}` first")
    files = _fits_files(loc)
    frames = [pq.read_table(p, filesystem=loc.fs).to_pandas().assign(family=p.rsplit("/", 2)[-2].split("=", 1)[1]) for p in files]
    fits_table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(fits_table) and not {"kind", "tolerance"} <= set(fits_table.columns):
        raise StoreReadError(f"{loc.uri}: its fits were written by an earlier icl-study (verdicts without a kind of claim); run `icl-study fit --store {loc.uri}` again")
    skipped = pq.read_table(skipped_path, filesystem=loc.fs).to_pandas()
    return fits_table, list(zip(skipped["claim"], skipped["reason"]))
