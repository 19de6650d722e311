"""The claims judged by the store: rows of the `fits` table, the verdict table, local slopes.

    from analysis.load import load
    from analysis.verdicts import evaluate
    rows, skipped = evaluate(load("results").tables)   # one row per claim and group

A group is one value of every configuration field but x and the seed: the claim's named fields
always label it, any other field that varies in the data (lr, steps, em_restarts, ...) is added,
so no fit ever mixes configurations; a claim's `ignore` lists the fields its metric does not depend
on. Every claim the store cannot fit is skipped with its reason and what a sweep must give.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis import fits
from analysis.claims import CLAIMS, DERIVED, EXPONENT_LAWS, GROUPS, NOT_CONFIG, Claim
from analysis.load import Location, StoreReadError, list_files, open_store

NOISE = 1e-12  # a loss gap below NOISE * max(1, |opt_loss|) is float noise: a rate window ends there
DIST_NOISE = 1e-10  # a parameter distance below DIST_NOISE * max(1, its start) likewise
EVALS_OWN = ("M", "shift")  # configuration columns of evals rows, absent from (or lists in) trials


def _plain(v: Any) -> Any:
    """A JSON-able scalar: numpy to Python, integral floats to int (2.0 and 2 label one group), NaN to None."""
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float):
        return None if np.isnan(v) else int(v) if v.is_integer() and abs(v) < 2**53 else v
    return list(v) if isinstance(v, tuple) else v


def _hashable(df: pd.DataFrame) -> pd.DataFrame:
    """List-valued columns (pi, the trials' M grid, estimators) as tuples, so that they can be grouped."""
    listy = lambda v: isinstance(v, (list, tuple, np.ndarray))  # noqa: E731
    out = {c: df[c].map(lambda v: tuple(v) if listy(v) else v) for c in df.columns if df[c].dtype == object and df[c].map(listy).any()}
    return df.assign(**out) if out else df


def _derive(claim: Claim, df: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns (the [K] regime, M / d) the claim filters on."""
    wanted = {c: f for c, f in DERIVED.items() if c in claim.where and c not in df}
    if not wanted or df.empty or not {"snr", "d", "M"} <= set(df.columns):
        return df
    return df.assign(**{c: f(df) for c, f in wanted.items()})


def _in_regime(claim: Claim, df: pd.DataFrame, own_only: bool = False) -> pd.DataFrame:
    """df restricted to the claim's family and regime (`own_only`: skip the filters on evals' own columns)."""
    df = df[df["family"] == claim.family]
    for column, test in claim.where.items():
        if own_only and column in (*EVALS_OWN, *DERIVED):
            continue
        if len(df):
            df = df[test(df[column]).to_numpy()]
    return df


def _in_window(claim: Claim, df: pd.DataFrame) -> pd.DataFrame:
    if claim.x not in df or df.empty:
        return df
    lo = df[claim.x_min] if isinstance(claim.x_min, str) else claim.x_min
    return df[(df[claim.x] >= lo) & (df[claim.x] <= claim.x_max)]


def _levels(values: pd.Series) -> str:
    v = sorted(set(values.dropna()))
    show = lambda a: f"{a:g}" if isinstance(a, float) else str(a)  # noqa: E731
    return ", ".join(map(show, v)) if len(v) <= 8 else f"{show(v[0])} .. {show(v[-1])} ({len(v)} values)"


def _select(claim: Claim, tables: dict[str, pd.DataFrame], window: bool = True) -> tuple[pd.DataFrame, str]:
    """The claim's rows in its regime (and window) with the metric as column `y`, or no rows and the reason."""
    df = tables.get(claim.table, pd.DataFrame())
    if df.empty or "family" not in df:
        return pd.DataFrame(), f"the store has no {claim.table} table"
    df = df[df["family"] == claim.family]
    if df.empty:
        return df, f"the store has no {claim.family} runs"
    needed = [claim.x, "status", "seed", "run_id", *(c for c in claim.where if c not in DERIVED), *claim.group]
    needed += ["rho_theory", "opt_loss", "step"] if claim.law == "rate" else []
    needed += ["subopt_theory", "opt_loss"] if claim.law == "curve" else []
    needed += ["metric", "estimator", "value"] if claim.table == "evals" else [claim.metric]
    needed += [claim.x_min] if isinstance(claim.x_min, str) else []
    missing = sorted({c for c in needed if c not in df})
    if missing:
        return pd.DataFrame(), f"the {claim.table} table has no column {', '.join(missing)}{_older(missing)}"
    if claim.table == "evals":
        df = df[(df["metric"] == claim.metric) & df["estimator"].isin([claim.estimator, claim.baseline])]
        if df.empty:
            return df, f"no {claim.estimator} rows of metric {claim.metric}"
        df = df.assign(y=df["value"])
    else:
        df = df.assign(y=df[claim.metric])
    df = _in_regime(claim, _derive(claim, df))
    if df.empty:
        return df, f"no {claim.family} rows of {claim.table}.{claim.metric} in this claim's regime"
    if window:
        inside = _in_window(claim, df)
        if inside.empty:
            return inside, f"no rows in the window {claim.window} (the data has {claim.x} = {_levels(df[claim.x])})"
        df = inside
    return _hashable(df), ""


SCHEMA_3 = {"opt_g", "opt_noise", "final_dist_theory", "subopt_theory"}


def _older(missing: list[str]) -> str:
    if SCHEMA_3 & set(missing):
        return " (a store written before schema 3: re-run the sweep into a new --store to fit this claim)"
    return ""


def varying(df: pd.DataFrame, skip: tuple[str, ...] | set[str] = ()) -> list[str]:
    """The configuration columns of df (not results, not `skip`) that take more than one value."""
    return [c for c in df.columns if c not in NOT_CONFIG and c not in skip and df[c].map(repr).nunique() > 1]


def _group_fields(claim: Claim, df: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[str]:
    """The named group fields, then every other configuration column that varies in df."""
    named = [g for g in claim.group if g in df]
    return [*named, *extra, *sorted(varying(df, {claim.x, *claim.ignore, *named, *extra}))]


def _excluded(claim: Claim, tables: dict[str, pd.DataFrame], group: list[str], used: pd.DataFrame) -> dict[tuple, int]:
    """Runs of each group that gave no usable point: not `ok`, or a NaN, infinite or non-positive value.

    Counted from `trials` (a diverged run has no `lsa` rows at all) over the group fields that
    trials has; a group that also splits by test length counts its missing runs at every length.
    """
    trials = tables.get("trials", pd.DataFrame())
    if trials.empty or not group:
        return {}
    keys = [g for g in group if g in trials and g not in EVALS_OWN]
    expected = _hashable(_in_regime(claim, trials, own_only=True))
    if claim.x not in EVALS_OWN:  # a window on a run's own field (N, B, c) also bounds the runs expected
        expected = _in_window(claim, expected)
    expected = expected.groupby(keys, dropna=False)["run_id"].nunique() if keys else pd.Series({(): expected["run_id"].nunique()})
    out = {}
    for key, part in used.groupby(group, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        sub = tuple(v for g, v in zip(group, key) if g in keys)
        sub = sub if len(sub) != 1 else sub[0]
        total = int(expected.get(sub, 0)) if keys else int(expected.iloc[0])
        out[key] = max(0, total - part["run_id"].nunique())
    return out


def _labels(group: list[str], key: Any) -> dict[str, Any]:
    key = key if isinstance(key, tuple) else (key,)
    return {g: _plain(v) for g, v in zip(group, key)}


def verdict(claim: Claim, theory: float, fit: fits.Estimate) -> str:
    """The verdict of one fit by the claim's kind and law."""
    args = (fit.estimate, fit.ci_low, fit.ci_high, claim.tolerance, claim.limit)
    if claim.law == "rate" and math.isnan(claim.theory):
        return fits.rate_verdict(theory, *args)
    return (fits.bound_verdict if claim.kind == "bound" else fits.equality_verdict)(theory, *args)


def _row(claim: Claim, labels: dict[str, Any], fit: fits.Estimate, theory: float, excluded: int, window: str | None = None) -> dict[str, Any]:
    return dict(
        family=claim.family, claim=claim.name, kind=claim.kind, x=claim.x, metric=claim.metric, group=json.dumps(labels, sort_keys=True),
        estimate=fit.estimate, ci_low=fit.ci_low, ci_high=fit.ci_high, theory=theory, tolerance=claim.tolerance,
        verdict=verdict(claim, theory, fit), window=window or f"{fit.window[0]:g}..{fit.window[1]:g}", n_points=fit.n_points,
        method=fit.method, excluded=excluded, r2=fit.r2, plain_slope=fit.plain, note=fit.note,
    )


def _usable(df: pd.DataFrame, signed: bool = False) -> pd.Series:
    y = df["y"].astype(float)
    return (df["status"] == "ok") & np.isfinite(y) & ((y != 0) if signed else (y > 0))


def _evaluate_per_run(claim: Claim, df: pd.DataFrame, rows: list, skipped: list) -> None:
    """One row per training curve: a rate against its prediction (or against 1), or the curve
    against the predicted curve."""
    first = df.sort_values("step").groupby("run_id", sort=True).head(1).set_index("run_id")
    need = ["opt_loss"] + (["rho_theory"] if claim.law == "rate" and math.isnan(claim.theory) else [])
    good = (first["status"] == "ok") & np.isfinite(first[need].astype(float)).all(axis=1)
    too_fast = 0
    for rid, part in df[df["run_id"].isin(first.index[good])].groupby("run_id", sort=True):
        part = part.sort_values("step")
        run = first.loc[rid]
        try:
            if claim.law == "curve":
                fit = fits.curve_deviation(part["step"], part["y"], part["subopt_theory"], floor=NOISE * max(1.0, abs(float(run["opt_loss"]))))
            elif claim.metric == "subopt":
                fit = fits.rate(part["step"], part["y"], floor=NOISE * max(1.0, abs(float(run["opt_loss"]))), squared=True)
            else:
                fit = fits.rate(part["step"], part["y"], floor=DIST_NOISE * max(1.0, float(part["y"].iloc[0])))
        except fits.FitError:
            too_fast += 1
            continue
        theory = float(run["rho_theory"]) if math.isnan(claim.theory) else claim.theory
        labels = {"run_id": rid, **{g: _plain(run[g]) for g in ("seed", *GROUPS[claim.family], "N", "lr") if g in run}}
        rows.append(_row(claim, labels, fit, theory, 0))
    if (~good).any():
        skipped.append((claim.name, f"{int((~good).sum())} runs excluded: not ok, or no predicted rate or optimum"))
    if too_fast:
        skipped.append((claim.name, f"{too_fast} curves: fewer than 3 logged points above the float-noise floor (GD converged too fast for the logging interval; log more often)"))


def _evaluate_compare(claim: Claim, df: pd.DataFrame, tables: dict[str, pd.DataFrame], rows: list, skipped: list) -> None:
    """One row per group and test length: log(seed mean of estimator's metric / baseline's), paired
    by seed. An excess may be negative for a seed (noise), so every finite value is kept."""
    data = df[(df["status"] == "ok") & np.isfinite(df["y"].astype(float))]
    group = _group_fields(claim, data, extra=(claim.x,))
    pairs = data.pivot_table(index=[*group, "seed"], columns="estimator", values="y", aggfunc="mean", dropna=False)
    if claim.estimator not in pairs or claim.baseline not in pairs:
        skipped.append((claim.name, f"needs rows of both {claim.estimator} and {claim.baseline}"))
        return
    pairs = pairs[[claim.estimator, claim.baseline]].dropna().reset_index()
    runs = data[data["estimator"] == claim.estimator]
    excluded = _excluded(claim, tables, group, runs)
    reasons: dict[str, int] = {}
    for key, part in pairs.groupby(group, sort=True, dropna=False):
        labels = _labels(group, key)
        try:
            fit = fits.log_ratio(part[claim.estimator], part[claim.baseline], part["seed"])
        except fits.FitError as err:
            reasons[str(err)] = reasons.get(str(err), 0) + 1
            continue
        key = key if isinstance(key, tuple) else (key,)
        rows.append(_row(claim, labels, fit, claim.theory, excluded.get(key, 0), window=f"{claim.x}={labels[claim.x]:g}"))
    skipped.extend((claim.name, f"{n} group(s): {reason}") for reason, n in reasons.items())
    if pairs.empty:
        skipped.append((claim.name, f"no seed has usable rows of both {claim.estimator} and {claim.baseline}"))


def _points(claim: Claim, part: pd.DataFrame) -> pd.DataFrame:
    """One point per (seed, x), the metric's sign fitted out for a signed claim: EM's rows repeat
    for every training configuration of its data."""
    pts = part.groupby(["seed", claim.x], as_index=False)["y"].mean()
    if claim.signed:
        pts = pts.assign(y=pts["y"] * np.sign(pts["y"].mean()))
    return pts


def _fit_group(claim: Claim, pts: pd.DataFrame) -> fits.Estimate:
    if claim.law == "excess":  # the floor of each seed is its value at x = inf
        floor = pts[np.isinf(pts[claim.x])].set_index("seed")["y"]
        if floor.empty:
            raise fits.FitError(f"needs {claim.x} = inf, the measured floor")
        pts = pts[np.isfinite(pts[claim.x]) & pts["seed"].isin(floor.index)]
        return fits.exponent(pts[claim.x], pts["y"], pts["seed"], claim.correction, floor=pts["seed"].map(floor))
    if claim.law == "monotone":
        return fits.largest_increase(pts[claim.x], pts["y"], pts["seed"])
    return fits.exponent(pts[claim.x], pts["y"], pts["seed"], claim.correction)


def _evaluate_law(claim: Claim, df: pd.DataFrame, tables: dict[str, pd.DataFrame], rows: list, skipped: list) -> None:
    """One row per group: the exponent (or the largest increase) of the metric against x, over the seeds."""
    data = df[_usable(df, claim.signed)]
    if data.empty:
        skipped.append((claim.name, f"all {len(df)} rows excluded (runs not ok, or NaN or non-positive values)"))
        return
    group = _group_fields(claim, data)
    excluded = _excluded(claim, tables, group, data)
    reasons: dict[str, list] = {}
    for key, part in data.groupby(group, dropna=False, sort=True) if group else [((), data)]:
        labels = _labels(group, key)
        try:
            fit = _fit_group(claim, _points(claim, part))
        except fits.FitError as err:
            reasons.setdefault(str(err), []).append(labels)
            continue
        key = key if isinstance(key, tuple) else (key,)
        rows.append(_row(claim, labels, fit, claim.theory, excluded.get(key, 0)))
    for reason, groups in reasons.items():
        skipped.append((claim.name, f"{len(groups)} group(s) against {claim.x} in the window {claim.window}: {reason} (e.g. {json.dumps(groups[0])}); needs {claim.needs}"))


def evaluate(tables: dict[str, pd.DataFrame], claims: tuple[Claim, ...] = CLAIMS) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Rows of the `fits` table for every claim and group with data; (claim, reason) for the rest."""
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for claim in claims:
        df, why = _select(claim, tables)
        if df.empty:
            skipped.append((claim.name, f"{why}; needs {claim.needs}" if claim.needs else why))
        elif claim.law in ("rate", "curve"):
            _evaluate_per_run(claim, df, rows, skipped)
        elif claim.law == "compare":
            _evaluate_compare(claim, df, tables, rows, skipped)
        else:
            _evaluate_law(claim, df, tables, rows, skipped)
    return with_group_columns(pd.DataFrame(rows)), skipped


def with_group_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """The fits rows with each group field also as a column of its own (null where a row's group
    lacks it), after `group`: `fits[fits.d == 4]` works without parsing JSON."""
    if rows.empty:
        return rows
    fields = pd.DataFrame([json.loads(g) for g in rows["group"]], index=rows.index)
    fields = fields[[c for c in fields.columns if c not in rows.columns]]
    at = list(rows.columns).index("group") + 1
    return pd.concat([rows.iloc[:, :at], fields, rows.iloc[:, at:]], axis=1)


def local_slopes(tables: dict[str, pd.DataFrame], claims: tuple[Claim, ...] = CLAIMS) -> pd.DataFrame:
    """Every exponent claim's plain log-log slope of the seed-averaged curve on [x_k, x_max] for each
    start x_k that leaves 3 levels, over all the data in its regime (the window ignored): where the
    local slope settles is where the asymptote begins. Columns: claim, group, start, slope, theory,
    window_start (the claim's fixed start; NaN when relative to a field)."""
    out = []
    for claim in claims:
        if claim.law not in EXPONENT_LAWS or isinstance(claim.x_min, str):
            continue
        df, _ = _select(claim, tables, window=False)
        if df.empty:
            continue
        data = df[_usable(df, claim.signed) & (df[claim.x] <= claim.x_max)]
        group = _group_fields(claim, data)
        for key, part in data.groupby(group, dropna=False, sort=True) if group else [((), data)]:
            pts = _points(claim, part)
            if claim.law == "excess":
                floor = pts[np.isinf(pts[claim.x])].set_index("seed")["y"]
                pts = pts[np.isfinite(pts[claim.x]) & pts["seed"].isin(floor.index)]
                pts = pts.assign(y=pts["y"] - pts["seed"].map(floor))
            curve = pts.groupby(claim.x)["y"].mean()
            curve = curve[np.isfinite(curve.index) & (curve.index > 0)]
            levels = curve.index.to_numpy(dtype=float)
            for k in range(len(levels) - 2):
                c = curve.iloc[k:].to_numpy()
                if (c > 0).all():
                    slope = float(np.polyfit(np.log(levels[k:]), np.log(c), 1)[0])
                    out.append(dict(claim=claim.name, group=json.dumps(_labels(group, key), sort_keys=True), start=levels[k], slope=slope, theory=claim.theory, window_start=float(claim.x_min)))
    return pd.DataFrame(out, columns=["claim", "group", "start", "slope", "theory", "window_start"])


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


def write_fits(store: str | os.PathLike | Location, rows: pd.DataFrame, skipped: list[tuple[str, str]]) -> list[str]:
    """Replace the store's `fits` table (one file per family) and its list of skipped claims.

    Each file is written under a hidden name and moved into place (on an object store: uploaded
    whole to its key); a family with no fits now loses its old file once the new ones are in place.
    `fits/_skipped.parquet` is invisible to Parquet dataset readers (leading `_`). Returns the paths.
    """
    loc = open_store(store)
    root = loc.join("fits")
    written = []
    families = set(rows["family"]) if len(rows) else set()
    # one Arrow schema for every family's file (the union of the group columns, typed from all
    # rows), so that a dataset reader sees every column whichever file it opens first
    table = pa.Table.from_pandas(rows.drop(columns=["family"]), preserve_index=False) if len(rows) else None
    for family in sorted(families):
        part = table.filter(pa.array((rows["family"] == family).to_numpy()))
        written.append(_replace(loc, f"{root}/family={family}/fits.parquet", part))
    _replace(loc, f"{root}/_skipped.parquet", pd.DataFrame(skipped, columns=["claim", "reason"]))
    for old in _fits_files(loc):  # after the new files are in place
        if old.rsplit("/", 2)[-2].split("=", 1)[1] not in families:
            loc.fs.delete_file(old)
    return written


def _fits_files(loc: Location) -> list[str]:
    return [i.path for i in list_files(loc, "fits") if i.base_name == "fits.parquet"]


def _replace(loc: Location, path: str, data: pd.DataFrame | pa.Table) -> str:
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    if not loc.local:  # one upload of the whole file: the object appears complete or not at all
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        with loc.fs.open_output_stream(path) as out:
            out.write(sink.getvalue())
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}-{os.path.basename(path)}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_fits(store: str | os.PathLike | Location) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The `fits` table (with `family`) and the skipped claims, as `icl-study fit` last wrote them."""
    loc = open_store(store)
    skipped_path = loc.join("fits", "_skipped.parquet")
    if loc.fs.get_file_info(skipped_path).type != pafs.FileType.File:
        raise StoreReadError(f"{loc.uri}: no fits yet; run `icl-study fit --store {loc.uri}` first")
    files = _fits_files(loc)
    frames = [pq.read_table(p, filesystem=loc.fs).to_pandas().assign(family=p.rsplit("/", 2)[-2].split("=", 1)[1]) for p in files]
    fits_table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(fits_table) and not {"kind", "tolerance"} <= set(fits_table.columns):
        raise StoreReadError(f"{loc.uri}: its fits were written by an earlier icl-study (verdicts without a kind of claim); run `icl-study fit --store {loc.uri}` again")
    skipped = pq.read_table(skipped_path, filesystem=loc.fs).to_pandas()
    return fits_table, list(zip(skipped["claim"], skipped["reason"]))
