"""The claims judged by the store: the rows of the `fits` table and the local slopes (analysis.fits_table
writes and reads them).

    from analysis.load import load
    from analysis.verdicts import evaluate
    rows, skipped = evaluate(load("results").tables)   # one row per claim and group

A group is one value of every configuration field but x and the seed: the claim's named fields
always label it, any other field that varies in the data (lr, steps, em_restarts, ...) is added,
so no fit ever mixes configurations; a claim's `ignore` lists the fields its metric does not depend
on. Every claim the store cannot fit is skipped with its reason and what a sweep must give.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from analysis import fits
from analysis.claims import CLAIMS, CONFIG, DERIVED, EXPONENT_LAWS, GROUPS, Claim

NOISE = 1e-12  # a loss gap below NOISE * max(1, |opt_loss|) is float noise: a rate window ends there
DIST_NOISE = 1e-10  # a parameter distance below DIST_NOISE * max(1, its start) likewise
EVALS_OWN = ("M", "shift")  # configuration columns of evals rows, absent from (or lists in) trials


def _plain(v: Any) -> Any:
    """A JSON-able scalar: numpy to Python, integral floats to int (2.0 and 2 label one group), NaN to None."""
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float):
        return None if np.isnan(v) else int(v) if v.is_integer() and abs(v) < 2**53 else v
    return list(v) if isinstance(v, tuple) else v


LISTY = (list, tuple, np.ndarray)


def _tuple(v: list | tuple | np.ndarray) -> tuple | None:
    """tuple(v); a 1-d object array (a list of strings) by way of tolist, the same objects, faster.
    An empty list (no `shifts`) is None: pandas cannot group on an empty tuple."""
    if len(v) == 0:
        return None
    return tuple(v.tolist()) if isinstance(v, np.ndarray) and v.dtype == object and v.ndim == 1 else tuple(v)


def _hashable(df: pd.DataFrame) -> pd.DataFrame:
    """List-valued columns (pi, the trials' M grid, estimators) as tuples, so that they can be grouped."""
    out = {}
    for c in df.columns:
        if df[c].dtype == object:
            values = df[c].to_numpy()
            if any(isinstance(v, LISTY) for v in values):
                out[c] = pd.Series([_tuple(v) if isinstance(v, LISTY) else v for v in values], index=df.index, dtype=object)
    return df.assign(**out) if out else df


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


class _Family:
    """The rows of one family of a table (the positions of `table[table.family == family]`) and
    their columns, each taken once, when first read (`cache` keeps them for the next claim)."""

    def __init__(self, table: pd.DataFrame, family: str):
        self.table = table
        self.at = np.flatnonzero((table["family"] == family).to_numpy(dtype=bool, na_value=False))
        self.columns: dict[str, pd.Series] = {}

    def __getitem__(self, column: str) -> pd.Series:
        if column not in self.columns:
            self.columns[column] = self.table[column].iloc[self.at]
        return self.columns[column]


def _family(tables: dict[str, pd.DataFrame], table: str, family: str, cache: dict | None) -> _Family:
    key = (table, family)
    if cache is None:
        return _Family(tables[table], family)
    if key not in cache:
        cache[key] = _Family(tables[table], family)
    return cache[key]


def _kept(mask: pd.Series) -> np.ndarray:
    """The positions where a filter's mask is true (a missing value is not)."""
    return np.flatnonzero(mask.to_numpy(dtype=bool, na_value=False))


# result and bookkeeping columns the evaluation of a claim reads (the configuration columns it reads all)
READ = ("run_id", "seed", "status", "estimator", "step", "opt_loss", "rho_theory", "subopt_theory")


def _per_run_columns(claim: Claim) -> tuple[str, ...]:
    """The columns a per-run claim (a rate, a curve) reads besides y: the curve, the run's optimum
    and predicted rate, and the fields that label the run."""
    return ("run_id", "step", "status", "opt_loss", "rho_theory", "subopt_theory", "seed", *GROUPS[claim.family], "N", "lr")


def _select(claim: Claim, tables: dict[str, pd.DataFrame], window: bool = True, cache: dict | None = None, narrow: bool = False) -> tuple[pd.DataFrame, str]:
    """The claim's rows in its regime (and window) with the metric as column `y`, or no rows and the reason.

    The filters run one after the other on the rows that passed the ones before (a test sees the
    rows it always saw), each on the column it reads; the selected rows are copied once, at the
    end. `cache` (a dict) keeps each table's family rows for the next claim. `narrow`: of the
    columns that are not configuration (`CONFIG`), only those `evaluate` reads (`READ`, y and
    the derived ones); for a per-run claim only the columns it reads (`_per_run_columns`).
    """
    df = tables.get(claim.table, pd.DataFrame())
    if df.empty or "family" not in df:
        return pd.DataFrame(), f"the store has no {claim.table} table"
    family = _family(tables, claim.table, claim.family, cache)
    if not len(family.at):
        return df.iloc[:0], f"the store has no {claim.family} runs"
    needed = [claim.x, "status", "seed", "run_id", *(c for c in claim.where if c not in DERIVED), *claim.group]
    needed += ["rho_theory", "opt_loss", "step"] if claim.law == "rate" else []
    needed += ["subopt_theory", "opt_loss"] if claim.law == "curve" else []
    needed += ["metric", "estimator", "value", *(["shift"] if claim.pair_by == "shift" else [])] if claim.table == "evals" else [claim.metric]
    needed += [claim.x_min] if isinstance(claim.x_min, str) else []
    missing = sorted({c for c in needed if c not in df})
    if missing:
        return pd.DataFrame(), f"the {claim.table} table has no column {', '.join(missing)}{_older(missing)}"
    rows = np.arange(len(family.at))  # positions among the family's rows of the rows still in
    if claim.table == "evals":
        whose = [claim.estimator] if claim.pair_by == "shift" else [claim.estimator, claim.baseline]
        rows = _kept((family["metric"] == claim.metric) & family["estimator"].isin(whose))
        if not len(rows):
            return df.iloc[:0], f"no {claim.estimator} rows of metric {claim.metric}"
    source = "value" if claim.table == "evals" else claim.metric
    derived = {}  # the derived columns (the [K] regime, M / d) the claim filters on, of the rows still in
    if any(c in claim.where and c not in df for c in DERIVED) and {"snr", "d", "M"} <= set(df.columns):
        inputs = pd.DataFrame({c: family[c].iloc[rows] for c in ("snr", "d", "M", "N") if c in df})
        derived = {c: f(inputs) for c, f in DERIVED.items() if c in claim.where and c not in df}
    for column, test in claim.where.items():
        if len(rows):
            keep = _kept(test(derived[column] if column in derived else family[column].iloc[rows]))
            rows = rows[keep]
            derived = {c: v.iloc[keep] for c, v in derived.items()}
    if not len(rows):
        return df.iloc[:0], f"no {claim.family} rows of {claim.table}.{claim.metric} in this claim's regime"
    if window:
        x = family[claim.x].iloc[rows]
        lo = family[claim.x_min].iloc[rows] if isinstance(claim.x_min, str) else claim.x_min
        keep = _kept((x >= lo) & (x <= claim.x_max))
        if not len(keep):
            return df.iloc[:0], f"no rows in the window {claim.window} (the data has {claim.x} = {_levels(x)})"
        rows = rows[keep]
        derived = {c: v.iloc[keep] for c, v in derived.items()}
    at = family.at[rows]
    if narrow and claim.law in ("rate", "curve"):
        keep = [c for c in df.columns if c in _per_run_columns(claim)]
    else:
        keep = [c for c in df.columns if not narrow or c in CONFIG or c in READ]
    out = (df[keep] if len(keep) < len(df.columns) else df).iloc[at]
    return _hashable(out.assign(y=df[source].iloc[at], **derived)), ""


SCHEMA_3 = {"opt_g", "opt_noise", "final_dist_theory", "subopt_theory"}


def _older(missing: list[str]) -> str:
    if SCHEMA_3 & set(missing):
        return " (a store written before schema 3: re-run the sweep into a new --store to fit this claim)"
    return ""


def varying(df: pd.DataFrame, skip: tuple[str, ...] | set[str] = ()) -> list[str]:
    """The configuration columns of df (not results, not `skip`) that take more than one value."""
    return [c for c in df.columns if c in CONFIG and c not in skip and _distinct_reprs(df[c]) > 1]


def _distinct_reprs(column: pd.Series) -> int:
    """`column.map(repr).nunique()`, counted without a repr per row where the dtype allows: integers
    and booleans (a repr per value), floats (a repr per bit pattern: -0.0 is not 0.0, every NaN is
    'nan'), strings (a repr per string, every missing value 'nan')."""
    kind = column.dtype.kind if isinstance(column.dtype, np.dtype) else None
    if kind in ("i", "u", "b"):
        return int(column.nunique(dropna=False))
    if kind == "f" and column.dtype.itemsize == 8:
        values = column.to_numpy()
        nan = np.isnan(values)
        return len(np.unique(values[~nan].view(np.int64))) + int(nan.any())
    if isinstance(column.dtype, pd.StringDtype) and column.dtype.na_value is not pd.NA:
        return int(column.nunique(dropna=False))
    return int(column.map(repr).nunique())


def _group_fields(claim: Claim, df: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[str]:
    """The named group fields, then every other configuration column that varies in df."""
    named = [g for g in claim.group if g in df]
    return [*named, *extra, *sorted(varying(df, {claim.x, *claim.ignore, *named, *extra}))]


def _scalar(v: Any) -> bool:
    """A group key's value that a dict finds as pandas' index finds it (not NaN, not a tuple)."""
    return isinstance(v, (str, bool, int, np.integer, np.bool_)) or (isinstance(v, (float, np.floating)) and v == v)


def _keyed(key: Any) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _excluded(claim: Claim, tables: dict[str, pd.DataFrame], group: list[str], used: pd.DataFrame, groups: list | None = None) -> dict[tuple, int]:
    """Runs of each group that gave no usable point: not `ok`, or a NaN, infinite or non-positive value.

    Counted from `trials` (a diverged run has no `lsa` rows at all) over the group fields that
    trials has; a group that also splits by test length counts its missing runs at every length.
    `groups`: `_groups(used, group)`, when the caller has it. Where every key is a plain value
    (no NaN, no tuple) the runs are counted from those positions and looked up in a dict: the
    numbers of the groupby and the index lookups, without them.
    """
    trials = tables.get("trials", pd.DataFrame())
    if trials.empty or not group:
        return {}
    keys = [g for g in group if g in trials and g not in EVALS_OWN]
    window = [claim.x, *([claim.x_min] if isinstance(claim.x_min, str) else [])] if claim.x not in EVALS_OWN else []
    read = [c for c in dict.fromkeys(["family", "run_id", *keys, *(w for w in claim.where if w not in (*EVALS_OWN, *DERIVED)), *window]) if c in trials]
    runs = _hashable(_in_regime(claim, trials[read], own_only=True))  # the columns these read: the same rows
    if claim.x not in EVALS_OWN:  # a window on a run's own field (N, B, c) also bounds the runs expected
        runs = _in_window(claim, runs)
    counts = _run_counts(runs, keys) if keys else None  # a dict, where it finds what the index finds
    expected = None

    def total(sub: Any) -> int:
        nonlocal expected
        if counts is not None and all(_scalar(v) for v in _keyed(sub)):
            return int(counts.get(sub, 0))
        if expected is None:
            expected = runs.groupby(keys, dropna=False)["run_id"].nunique() if keys else pd.Series({(): runs["run_id"].nunique()})
        return int(expected.get(sub, 0)) if keys else int(expected.iloc[0])

    if groups is not None and all(_scalar(v) for key, _ in groups for v in _keyed(key)):  # the distinct runs of each group, from its rows
        codes = pd.factorize(used["run_id"])[0]
        counted = [(key, len(np.unique(codes[at][codes[at] >= 0]))) for key, at in groups]
    else:
        counted = used[[*group, "run_id"]].groupby(group, dropna=False, sort=False)["run_id"].nunique().items()
    out = {}
    for key, n in counted:
        key = _keyed(key)
        sub = tuple(v for g, v in zip(group, key) if g in keys)
        sub = sub if len(sub) != 1 else sub[0]
        out[key] = max(0, total(sub) - int(n))
    return out


def _run_counts(rows: pd.DataFrame, keys: list[str]) -> dict | None:
    """`rows.groupby(keys, dropna=False)["run_id"].nunique()` as a dict, counted in Python (a few
    hundred runs); None where a key is not a plain value (NaN, a tuple: the groupby's index and a
    dict would not find the same keys)."""
    counts: dict = {}
    for *values, run in zip(*(rows[k].tolist() for k in keys), rows["run_id"].tolist()):
        if not all(_scalar(v) for v in values):
            return None
        runs = counts.setdefault(tuple(values) if len(keys) > 1 else values[0], set())
        if isinstance(run, str):  # nunique leaves out a missing run_id
            runs.add(run)
        elif not pd.isna(run):
            return None
    return {key: len(runs) for key, runs in counts.items()}


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


def _usable(df: pd.DataFrame, claim: Claim) -> pd.Series:
    """The rows a law is fitted to: runs that are ok, finite values, and positive ones unless the
    claim's metric may be negative (`signed`: not 0, its sign fitted out; `differences`: every
    value, the law needing a positive seed mean)."""
    y = df["y"].astype(float)
    keep = (df["status"] == "ok") & np.isfinite(y)
    return keep if claim.differences else keep & ((y != 0) if claim.signed else (y > 0))


def _evaluate_per_run(claim: Claim, df: pd.DataFrame, rows: list, skipped: list) -> None:
    """One row per training curve: a rate against its prediction (or against 1), or the curve
    against the predicted curve."""
    labels = [g for g in ("seed", *GROUPS[claim.family], "N", "lr") if g in df]
    columns = [c for c in dict.fromkeys([*_per_run_columns(claim), "y"]) if c in df]
    df = df[columns]  # the columns read below: the same rows, a narrow frame
    first = df.sort_values("step").groupby("run_id", sort=True).head(1).set_index("run_id")
    need = ["opt_loss"] + (["rho_theory"] if claim.law == "rate" and math.isnan(claim.theory) else [])
    good = (first["status"] == "ok") & np.isfinite(first[need].astype(float)).all(axis=1)
    too_fast = 0
    runs = df[df["run_id"].isin(first.index[good])]
    at = {rid: i for i, rid in enumerate(first.index)}
    run_values = {c: first[c].to_numpy(dtype=object) for c in first.columns}
    step, y = runs["step"].to_numpy(), runs["y"].to_numpy()
    predicted = runs["subopt_theory"].to_numpy() if claim.law == "curve" else None
    for rid, rows_of in _groups(runs, ["run_id"]):
        rid = rid[0] if isinstance(rid, tuple) else rid
        t = step[rows_of]
        if len(t) > 1 and not (np.diff(t) > 0).all():  # steps out of order or repeated: pandas' sort, its order of ties
            rows_of = runs.index.get_indexer(runs.iloc[rows_of].sort_values("step").index)
            t = step[rows_of]
        run = {c: v[at[rid]] for c, v in run_values.items()}
        try:
            if claim.law == "curve":
                fit = fits.curve_deviation(t, y[rows_of], predicted[rows_of], floor=NOISE * max(1.0, abs(float(run["opt_loss"]))))
            elif claim.metric == "subopt":
                fit = fits.rate(t, y[rows_of], floor=NOISE * max(1.0, abs(float(run["opt_loss"]))), squared=True)
            else:
                fit = fits.rate(t, y[rows_of], floor=DIST_NOISE * max(1.0, float(y[rows_of][0])))
        except fits.FitError:
            too_fast += 1
            continue
        theory = float(run["rho_theory"]) if math.isnan(claim.theory) else claim.theory
        rows.append(_row(claim, {"run_id": rid, **{g: _plain(run[g]) for g in labels}}, fit, theory, 0))
    if (~good).any():
        skipped.append((claim.name, f"{int((~good).sum())} runs excluded: not ok, or no predicted rate or optimum"))
    if too_fast:
        skipped.append((claim.name, f"{too_fast} curves: fewer than 3 logged points above the float-noise floor (GD converged too fast for the logging interval; log more often)"))


def _evaluate_compare(claim: Claim, df: pd.DataFrame, tables: dict[str, pd.DataFrame], rows: list, skipped: list) -> None:
    """One row per group and test length: log(seed mean of estimator's metric / baseline's), paired
    by seed. An excess may be negative for a seed (noise), so every finite value is kept.

    With `pair_by: shift`, the estimator's rows under its reference shift `baseline` (none) against
    its rows under each other shift, one row per group, test length and shift: log(seed mean under
    the reference / seed mean under the shift)."""
    if claim.pair_by == "shift":
        data = df[(df["status"] == "ok") & np.isfinite(df["y"].astype(float))]
        others = sorted(set(data["shift"]) - {claim.baseline})
        if claim.baseline not in set(data["shift"]) or not others:
            skipped.append((claim.name, f"needs {claim.estimator} rows under {claim.baseline} and under at least one shift"))
            return
        for shift in others:
            # the two shifts play the estimators' part: the shift column becomes the paired one
            part = data[data["shift"].isin([claim.baseline, shift])].drop(columns="estimator").rename(columns={"shift": "estimator"})
            _compare_pairs(dataclasses.replace(claim, ignore=(*claim.ignore, "shift")), part, tables, rows, skipped, shift, (claim.baseline, shift), claim)
        return
    _compare_pairs(claim, df[(df["status"] == "ok") & np.isfinite(df["y"].astype(float))], tables, rows, skipped, None, (claim.estimator, claim.baseline), claim)


def _compare_pairs(claim: Claim, data: pd.DataFrame, tables: dict[str, pd.DataFrame], rows: list, skipped: list, shift: str | None, sides: tuple[str, str], named: Claim) -> None:
    """`_evaluate_compare` on one pair of sides: the `estimator` column's values `sides` (model, baseline)."""
    group = _group_fields(claim, data, extra=(claim.x,))
    pairs = data[[*group, "seed", "estimator", "y"]].pivot_table(index=[*group, "seed"], columns="estimator", values="y", aggfunc="mean", dropna=False)
    first, second = sides
    if first not in pairs or second not in pairs:
        skipped.append((named.name, f"needs rows of both {first} and {second}"))
        return
    pairs = pairs[[first, second]].dropna().reset_index()
    claim = dataclasses.replace(claim, estimator=first, baseline=second)
    tail = f" {shift}" if shift else ""
    runs = data[data["estimator"] == claim.estimator]
    excluded = _excluded(claim, tables, group, runs)
    reasons: dict[str, int] = {}
    model, baseline, seed = (pairs[c].to_numpy() for c in (first, second, "seed"))
    for key, at in _groups(pairs, group):
        labels = _labels(group, key)
        try:
            fit = fits.log_ratio(model[at], baseline[at], seed[at])
        except fits.FitError as err:
            reasons[str(err)] = reasons.get(str(err), 0) + 1
            continue
        key = key if isinstance(key, tuple) else (key,)
        rows.append(_row(named, labels, fit, named.theory, excluded.get(key, 0), window=f"{claim.x}={labels[claim.x]:g}{tail}"))
    skipped.extend((named.name, f"{n} group(s): {reason}") for reason, n in reasons.items())
    if pairs.empty:
        skipped.append((named.name, f"no seed has usable rows of both {first} and {second}"))


def _points(claim: Claim, part: pd.DataFrame) -> pd.DataFrame:
    """One point per (seed, x), the metric's sign fitted out for a signed claim: EM's rows repeat
    for every training configuration of its data."""
    pts = part.groupby(["seed", claim.x], as_index=False)["y"].mean()
    if claim.signed:
        pts = pts.assign(y=pts["y"] * np.sign(pts["y"].mean()))
    return pts


def _groups(data: pd.DataFrame, group: list[str]) -> list[tuple[Any, np.ndarray]]:
    """(key, row positions) of each group of data by the fields `group`: the keys and the order of
    `data.groupby(group, dropna=False, sort=True)`, without a frame per group."""
    if not group:
        return [((), np.arange(len(data)))]
    by = data[group].groupby(group, dropna=False, sort=True)
    ids = by.ngroup().to_numpy()
    order = np.argsort(ids, kind="stable")
    edges = np.searchsorted(ids[order], np.arange(by.ngroups + 1))
    return [(key, order[edges[i] : edges[i + 1]]) for i, key in enumerate(by.size().index)]


def _all_points(claim: Claim, data: pd.DataFrame, groups: list[tuple[Any, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`_points` of every group, (seed, x, y) arrays, from one groupby: a group's mean of y at each
    (seed, x) is the mean of the same rows in the same order, so the same number."""
    ids = np.empty(len(data), dtype=np.int64)
    for i, (_, at) in enumerate(groups):
        ids[at] = i
    means = data[["seed", claim.x, "y"]].assign(_group=ids).groupby(["_group", "seed", claim.x], sort=True)["y"].mean()
    gid = means.index.get_level_values(0).to_numpy()
    seed, x, y = (means.index.get_level_values(1).to_numpy(), means.index.get_level_values(2).to_numpy(), means.to_numpy())
    edges = np.searchsorted(gid, np.arange(len(groups) + 1))
    out = []
    for i in range(len(groups)):
        part = slice(edges[i], edges[i + 1])
        py = y[part]
        if claim.signed:
            py = py * np.sign(pd.Series(py).mean())  # the sign of the group's mean, as `_points` takes it
        out.append((seed[part], x[part], py))
    return out


def _fit_group(claim: Claim, pts: pd.DataFrame | tuple[np.ndarray, np.ndarray, np.ndarray]) -> fits.Estimate:
    """The claim's law fitted to one group's points: a frame of seed, x, y (`_points`) or the three arrays."""
    fit = _fit_groups(claim, [pts])[0]
    if isinstance(fit, fits.FitError):
        raise fit
    return fit


def _fit_groups(claim: Claim, points: list) -> list[fits.Estimate | fits.FitError]:
    """`_fit_group` of every group's points, the FitError in place of a group that cannot be fitted;
    the exponents of all the groups together (`fits.exponents`: the same numbers, fewer passes)."""
    out: list = []
    requests, at = [], []
    for pts in points:
        if isinstance(pts, pd.DataFrame):
            pts = (pts["seed"].to_numpy(), pts[claim.x].to_numpy(), pts["y"].to_numpy())
        seed, x, y = (np.asarray(v) for v in pts)
        floor = None
        if claim.law == "excess":  # the floor of each seed is its value at x = inf
            at_inf = np.isinf(x.astype(float))
            if not at_inf.any():
                out.append(fits.FitError(f"needs {claim.x} = inf, the measured floor"))
                continue
            floors = dict(zip(seed[at_inf].tolist(), y[at_inf].tolist()))  # one point per (seed, x): one floor per seed
            keep = ~at_inf & np.isfinite(x.astype(float)) & np.isin(seed, seed[at_inf])
            seed, x, y = seed[keep], x[keep], y[keep]
            floor = np.array([floors[s] for s in seed.tolist()], dtype=float)
        elif claim.law == "monotone":
            try:
                out.append(fits.largest_increase(x, y, seed))
            except fits.FitError as err:
                out.append(err)
            continue
        at.append(len(out))
        requests.append((x, y, seed, claim.correction, floor))
        out.append(None)
    for i, fit in zip(at, fits.exponents(requests)):
        out[i] = fit
    return out


def _evaluate_law(claim: Claim, df: pd.DataFrame, tables: dict[str, pd.DataFrame], rows: list, skipped: list) -> None:
    """One row per group: the exponent (or the largest increase) of the metric against x, over the seeds."""
    data = df[_usable(df, claim)]
    if data.empty:
        skipped.append((claim.name, f"all {len(df)} rows excluded (runs not ok, or NaN or non-positive values)"))
        return
    group = _group_fields(claim, data)
    data = _complete(claim, data, group)
    groups = _groups(data, group)
    excluded = _excluded(claim, tables, group, data, groups if group else None)
    reasons: dict[str, list] = {}
    for (key, _), fit in zip(groups, _fit_groups(claim, _all_points(claim, data, groups))):
        labels = _labels(group, key)
        if isinstance(fit, fits.FitError):
            reasons.setdefault(str(fit), []).append(labels)
            continue
        key = key if isinstance(key, tuple) else (key,)
        rows.append(_row(claim, labels, fit, claim.theory, excluded.get(key, 0)))
    for reason, groups in reasons.items():
        skipped.append((claim.name, f"{len(groups)} group(s) against {claim.x} in the window {claim.window}: {reason} (e.g. {json.dumps(groups[0])}); needs {claim.needs}"))


def _complete(claim: Claim, data: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """The rows whose (group, seed, x) holds every combination of the fields the claim averages
    over (`ignore`) that its group has at that x. A seed's point at x is the mean over those
    fields: a seed that lacks one (a failed run) would average another mix of them, which moves its
    point wherever the metric depends on them (gmm-2-noise-vs-B averages over N, and a seed missing
    the small N sits low: 16 such seeds of 24 read B^-0.5 as steeper). Where the metric does not
    depend on them at that x (every seed's values equal across them: EM's rows, the same for every
    training configuration of its data), nothing is dropped."""
    averaged = [f for f in claim.ignore if f in data and _distinct_reprs(data[f]) > 1]
    if not averaged or data.empty:
        return data
    keys = [*group, claim.x]
    d = data[[*keys, "seed", "y"]].assign(_combo=data.groupby(averaged, dropna=False, sort=False).ngroup().to_numpy())
    per_seed = d.groupby([*keys, "seed"], dropna=False, sort=False)
    have = per_seed["_combo"].transform("nunique")
    full = d.groupby(keys, dropna=False, sort=False)["_combo"].transform("nunique")
    spread = per_seed["y"].transform("max") - per_seed["y"].transform("min")
    flat = spread.groupby([d[k] for k in keys], dropna=False, sort=False).transform("max") == 0
    return data[((have == full) | flat).to_numpy()]


def _with_model(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Tables without a `model` column (hand-made ones) hold LSA runs: the only model there was."""
    return {name: df if df.empty or "model" in df else df.assign(model="lsa") for name, df in tables.items()}


def evaluate(tables: dict[str, pd.DataFrame], claims: tuple[Claim, ...] = CLAIMS) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Rows of the `fits` table for every claim and group with data; (claim, reason) for the rest."""
    tables = _with_model(tables)
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    cache: dict = {}  # each table's family rows, filtered by every claim on them
    for claim in claims:
        df, why = _select(claim, tables, cache=cache, narrow=True)
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


def _seed_averaged_curves(claim: Claim, data: pd.DataFrame, group: list[str]) -> list[tuple[Any, pd.Series]]:
    """(group key, y averaged over seeds by x) of every group: `_points` per group and then the mean
    over seeds, for all groups in two groupbys (a groupby per group cost 3 ms each: seconds a store)."""
    pts = data.groupby([*group, "seed", claim.x], dropna=False, sort=True)["y"].mean().reset_index()
    if claim.signed:  # each group's sign (that of its points' mean) fitted out, as `_points` does
        pts["y"] = pts["y"] * np.sign(pts.groupby(group, dropna=False, sort=False)["y"].transform("mean") if group else pts["y"].mean())
    if claim.law == "excess":  # y - y(x = inf) per seed; seeds without the floor leave
        floor = pts[np.isinf(pts[claim.x])].set_index([*group, "seed"])["y"]
        at = pd.MultiIndex.from_frame(pts[[*group, "seed"]]) if group else pd.Index(pts["seed"])
        base = floor.reindex(at).to_numpy()
        pts = pts.assign(y=pts["y"] - base)[np.isfinite(pts[claim.x]).to_numpy() & ~np.isnan(base)]
    curves = pts.groupby([*group, claim.x], dropna=False, sort=True)["y"].mean()
    if not group:
        return [((), curves)]
    return [(key, curve.droplevel(list(range(len(group))))) for key, curve in curves.groupby(level=list(range(len(group))), dropna=False, sort=True)]


def local_slopes(tables: dict[str, pd.DataFrame], claims: tuple[Claim, ...] = CLAIMS) -> pd.DataFrame:
    """Every exponent claim's plain log-log slope of the seed-averaged curve on [x_k, x_max] for each
    start x_k that leaves 3 levels, over all the data in its regime (the window ignored): where the
    local slope settles is where the asymptote begins. Columns: claim, group, start, slope, theory,
    window_start (the claim's fixed start; NaN when relative to a field)."""
    tables = _with_model(tables)
    out = []
    cache: dict = {}
    for claim in claims:
        if claim.law not in EXPONENT_LAWS or isinstance(claim.x_min, str):
            continue
        df, _ = _select(claim, tables, window=False, cache=cache)
        if df.empty:
            continue
        data = df[_usable(df, claim) & (df[claim.x] <= claim.x_max)]
        group = _group_fields(claim, data)
        for key, curve in _seed_averaged_curves(claim, data, group):
            curve = curve[np.isfinite(curve.index) & (curve.index > 0)]
            levels = curve.index.to_numpy(dtype=float)
            for k in range(len(levels) - 2):
                c = curve.iloc[k:].to_numpy()
                if (c > 0).all():
                    slope = float(np.polyfit(np.log(levels[k:]), np.log(c), 1)[0])
                    out.append(dict(claim=claim.name, group=json.dumps(_labels(group, key), sort_keys=True), start=levels[k], slope=slope, theory=claim.theory, window_start=float(claim.x_min)))
    return pd.DataFrame(out, columns=["claim", "group", "start", "slope", "theory", "window_start"])
