"""The claims of theory.md as data, and their evaluation into rows of the `fits` table.

Each claim names its family, the table and metric, the variable, the regime (a filter), the
fields that name a group, the theory exponent and the law. A group is one value of every
configuration field but x and the seed: the named fields always label it, any other field that
varies in the data (lr, steps, em_iters, ...) is added, so no fit ever mixes configurations;
`ignore` lists the fields a claim's metric does not depend on (EM's error does not depend on the
training fields). `evaluate` fits every group the store has data for and says why it skips a claim
it has no data for.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis import fits
from analysis.load import StoreReadError

GMM_TASK = ("d", "c", "snr", "cov", "kappa", "symmetric", "B", "param")
MOR_TASK = ("d", "K", "snr", "sigma", "components", "assignment", "cov", "kappa")
GROUPS = {"gmm": GMM_TASK, "mor": MOR_TASK}
TRAIN_FIELDS = ("model", "param", "init_scale", "N", "B", "lr", "steps", "log_every", "dtype")
EVAL_FIELDS = ("M", "n_eval", "estimators", "em_iters", "em_restarts", "em_tol", "em_sigma", "gem_steps")
# columns that are results or bookkeeping, not configuration (evals' own M and shift are configuration)
NOT_CONFIG = frozenset(
    "run_id config_id bundle_id sweep seed status steps_done final_train_loss opt_loss opt_converged opt_dist_theory rho_theory "
    "excess_risk error wall_s device created_at code_version schema_version family estimator metric value n_prompts stderr y "
    "step train_loss subopt dist_opt dist_theory name shape values".split()
)


@dataclass(frozen=True)
class Claim:
    """One testable claim: `metric` of `table` against `x`, per group, in the regime `where`.

    law: `power` (log-log slope), `floor` (power law with a floor), `excess` (log-log slope of the
    excess over the value at x = inf, the floor measured per seed), `rate` (the per-run linear
    rate of a training curve against the run's `rho_theory`; `theory` is then NaN: it is a column)
    or `compare` (log of `estimator`'s metric over `baseline`'s, per test length; theory 0).
    Verdicts compare exponents; for a rate `steeper` means faster (`fits.rate_verdict`); a
    comparison is `consistent` or `worse` (`fits.verdict_compare`).
    """

    name: str
    family: str
    description: str
    table: str  # trials, evals or curves
    metric: str  # a column of trials or curves, or an evals metric
    x: str
    theory: float
    group: tuple[str, ...]
    estimator: str | None = None  # evals: whose rows
    where: dict[str, Callable[[pd.Series], pd.Series]] = field(default_factory=dict)
    x_min: float = 0.0
    law: str = "power"  # power | floor | excess | rate | compare
    baseline: str | None = None  # compare: the estimator `estimator` is set against
    ignore: tuple[str, ...] = ()  # configuration fields averaged over rather than grouped by


_inf = {"M": lambda s: np.isinf(s)}
_finite = {"M": lambda s: np.isfinite(s)}
_high, _low = (lambda s: s >= 2), (lambda s: s < 2)
_reduced = {"param": lambda s: s == "reduced"}

CLAIMS: tuple[Claim, ...] = (
    # gmm [S], theory.md section 2
    Claim(
        "gmm-1-rate", "gmm", "GD converges linearly: log subopt falls like 2 t log rho, rho = max|1 - lr lambda(H)| at the optimum",
        "curves", "subopt", "step", float("nan"), (), law="rate", ignore=EVAL_FIELDS,
    ),
    Claim(
        "gmm-2-optimum-vs-N", "gmm", "W*/c'' - Lam^-1 shrinks like 1/N (asymptotic window N >= 50)",
        "trials", "opt_dist_theory", "N", -1.0, GMM_TASK, where={"opt_converged": lambda s: s.astype(bool)}, x_min=50, ignore=EVAL_FIELDS,
    ),
    Claim(
        "gmm-2-optimum-vs-c", "gmm", "||G|| = O(c/N): W*/c - Lam^-1 grows at most like c at fixed N",
        "trials", "opt_dist_theory", "c", 1.0, tuple(g for g in (*GMM_TASK, "N") if g != "c"), where={"opt_converged": lambda s: s.astype(bool)}, ignore=EVAL_FIELDS,
    ),
    Claim(
        "gmm-3-error-vs-N", "gmm", "tv_error of the trained LSA at M = inf falls like 1/N",
        "evals", "tv_error", "N", -1.0, GMM_TASK, estimator="lsa", where=_inf,
    ),
    Claim(
        "gmm-3-error-vs-M", "gmm", "tv_error of the trained LSA falls like 1/sqrt(M) towards a floor at fixed large N (asymptotic window N >= 50, M >= 16)",
        "evals", "tv_error", "M", -0.5, (*GMM_TASK, "N"), estimator="lsa", where={"N": lambda s: s >= 50, **_finite}, x_min=16, law="floor",
    ),
    Claim(
        "gmm-3-excess-vs-M", "gmm", "tv_error(M) - tv_error(inf) of the trained LSA falls like 1/sqrt(M) at fixed large N (the floor measured at M = inf, not fitted; N >= 50, M >= 16)",
        "evals", "tv_error", "M", -0.5, (*GMM_TASK, "N"), estimator="lsa", where={"N": lambda s: s >= 50}, x_min=16, law="excess",
    ),
    Claim(
        "gmm-3-fluctuation-vs-M", "gmm", "tv_limit (the trained LSA at M against itself at M = inf: the context's fluctuation, no bias) falls like 1/sqrt(M) (asymptotic window M >= 64)",
        "evals", "tv_limit", "M", -0.5, (*GMM_TASK, "N"), estimator="lsa", where=_finite, x_min=64,
    ),
    Claim(
        "gmm-3-error-vs-c", "gmm", "tv_error at M = inf is O(c^2/N): grows at most like c^2 at fixed N",
        "evals", "tv_error", "c", 2.0, tuple(g for g in (*GMM_TASK, "N") if g != "c"), estimator="lsa", where=_inf,
    ),
    # mor [J], theory.md section 3
    Claim(
        "mor-1-em-vs-M-high-snr", "mor", "EM's parameter error falls like sqrt(d/M) at high SNR (snr >= 2)",
        "evals", "param_error", "M", -0.5, MOR_TASK, estimator="em", where={"snr": _high, **_finite}, x_min=32, ignore=TRAIN_FIELDS,
    ),
    Claim(
        "mor-1-em-vs-M-low-snr", "mor", "EM's parameter error falls like (d/M)^(1/4) at low SNR (snr < 2)",
        "evals", "param_error", "M", -0.25, MOR_TASK, estimator="em", where={"snr": _low, **_finite}, x_min=32, ignore=TRAIN_FIELDS,
    ),
    Claim(
        "mor-1-em-vs-d-high-snr", "mor", "EM's parameter error grows like sqrt(d) at fixed M, high SNR",
        "evals", "param_error", "d", 0.5, (*(g for g in MOR_TASK if g != "d"), "M"), estimator="em", where={"snr": _high, **_finite}, ignore=TRAIN_FIELDS,
    ),
    Claim(
        "mor-1-em-vs-d-low-snr", "mor", "EM's parameter error grows like d^(1/4) at fixed M, low SNR",
        "evals", "param_error", "d", 0.25, (*(g for g in MOR_TASK if g != "d"), "M"), estimator="em", where={"snr": _low, **_finite}, ignore=TRAIN_FIELDS,
    ),
    Claim(
        "mor-2-excess-risk-vs-B", "mor", "the ERM-trained LSA's population excess risk over Gamma* is O(1/sqrt(B)) (an upper bound)",
        "trials", "excess_risk", "B", -0.5, (*MOR_TASK, "N"), where=_reduced, ignore=EVAL_FIELDS,
    ),
    Claim(
        "mor-3-rate", "mor", "GD on the quadratic LSA loss converges linearly to the global optimum at rho = max|1 - lr lambda(H)|",
        "curves", "subopt", "step", float("nan"), (), law="rate", ignore=EVAL_FIELDS,
    ),
    Claim(
        "mor-3-optimum-vs-B", "mor", "the empirical optimum approaches Gamma* like 1/sqrt(B)",
        "trials", "opt_dist_theory", "B", -0.5, (*MOR_TASK, "N"), where={"opt_converged": lambda s: s.astype(bool), **_reduced}, ignore=EVAL_FIELDS,
    ),
    Claim(
        "mor-4-lsa-vs-em", "mor", "the trained model matches or beats EM (mse, paired prompts), most of all at small M and low SNR",
        "evals", "mse", "M", 0.0, (*MOR_TASK, "N", "B", "param"), estimator="lsa", baseline="em", where=_finite, law="compare",
    ),
)

NOISE = 1e-12  # subopt below NOISE * max(1, |opt_loss|) is float noise: the rate window ends there
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


def _regime(claim: Claim, df: pd.DataFrame, own_only: bool = False) -> pd.DataFrame:
    """df restricted to the claim's family and regime (`own_only`: skip the filters on evals' own columns)."""
    df = df[df["family"] == claim.family]
    for column, test in claim.where.items():
        if own_only and column in EVALS_OWN:
            continue
        if len(df):
            df = df[test(df[column]).to_numpy()]
    if claim.x in df and not (own_only and claim.x in EVALS_OWN) and len(df):
        df = df[df[claim.x] >= claim.x_min]
    return df


def _select(claim: Claim, tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, str]:
    """The claim's rows in its regime with the metric as column `y`, or no rows and the reason."""
    df = tables.get(claim.table, pd.DataFrame())
    if df.empty or "family" not in df:
        return pd.DataFrame(), f"the store has no {claim.table} table"
    needed = [claim.x, "status", "seed", "run_id", *claim.where, *claim.group]
    needed += ["rho_theory", "opt_loss", "step"] if claim.law == "rate" else []
    needed += ["metric", "estimator", "value"] if claim.table == "evals" else [claim.metric]
    missing = sorted({c for c in needed if c not in df})
    if missing:
        return pd.DataFrame(), f"the {claim.table} table has no column {', '.join(missing)}"
    if claim.table == "evals":
        df = df[(df["metric"] == claim.metric) & df["estimator"].isin([claim.estimator, claim.baseline])]
        df = df.assign(y=df["value"])
    else:
        df = df.assign(y=df[claim.metric])
    df = _hashable(_regime(claim, df))
    where = f" for {claim.estimator}" if claim.estimator else ""
    return df, "" if len(df) else f"no {claim.family} rows of {claim.table}.{claim.metric}{where} in this regime"


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
    if trials.empty:
        return {}
    keys = [g for g in group if g in trials and g not in EVALS_OWN]
    expected = _hashable(_regime(claim, trials, own_only=True))
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


def _verdict(claim: Claim, fit: fits.Estimate, theory: float) -> str:
    if claim.law == "compare":
        return fits.verdict_compare(fit.ci_low)
    if claim.law == "rate":
        return fits.rate_verdict(theory, fit.ci_low, fit.ci_high)
    return fits.verdict(theory, fit.ci_low, fit.ci_high)


def _row(claim: Claim, labels: dict[str, Any], fit: fits.Estimate, theory: float, excluded: int, window: str | None = None) -> dict[str, Any]:
    return dict(
        family=claim.family, claim=claim.name, x=claim.x, metric=claim.metric, group=json.dumps(labels, sort_keys=True),
        estimate=fit.estimate, ci_low=fit.ci_low, ci_high=fit.ci_high, theory=theory, verdict=_verdict(claim, fit, theory),
        window=window or f"{fit.window[0]:g}..{fit.window[1]:g}", n_points=fit.n_points, method=fit.method, excluded=excluded, r2=fit.r2,
    )


def _usable(df: pd.DataFrame) -> pd.Series:
    return (df["status"] == "ok") & np.isfinite(df["y"].astype(float)) & (df["y"] > 0)


def _evaluate_rate(claim: Claim, df: pd.DataFrame, rows: list, skipped: list) -> None:
    """One row per training curve: the fitted rho beside the run's own `rho_theory`."""
    first = df.sort_values("step").groupby("run_id", sort=True).head(1).set_index("run_id")
    good = (first["status"] == "ok") & np.isfinite(first["rho_theory"]) & np.isfinite(first["opt_loss"])
    too_fast = 0
    for rid, part in df[df["run_id"].isin(first.index[good])].groupby("run_id", sort=True):
        part = part.sort_values("step")
        run = first.loc[rid]
        try:
            fit = fits.rate(part["step"], part["y"], floor=NOISE * max(1.0, abs(float(run["opt_loss"]))), squared=True)
        except fits.FitError:
            too_fast += 1
            continue
        labels = {"run_id": rid, **{g: _plain(run[g]) for g in ("seed", *GROUPS[claim.family], "N", "lr") if g in run}}
        rows.append(_row(claim, labels, fit, float(run["rho_theory"]), 0))
    if (~good).any():
        skipped.append((claim.name, f"{int((~good).sum())} runs excluded: not ok, or no predicted rate or optimum"))
    if too_fast:
        skipped.append((claim.name, f"{too_fast} curves: fewer than 3 logged points above the float-noise floor (GD converged too fast for the logging interval; log more often)"))


def _evaluate_compare(claim: Claim, df: pd.DataFrame, tables: dict[str, pd.DataFrame], rows: list, skipped: list) -> None:
    """One row per group and test length: log(metric of estimator / metric of baseline), paired by seed."""
    data = df[_usable(df)]
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


def _evaluate_law(claim: Claim, df: pd.DataFrame, tables: dict[str, pd.DataFrame], rows: list, skipped: list) -> None:
    """One row per group: the exponent of `claim.law` against x, over the seeds."""
    data = df[_usable(df)]
    if data.empty:
        skipped.append((claim.name, f"all {len(df)} rows excluded (runs not ok, or NaN or non-positive values)"))
        return
    group = _group_fields(claim, data)
    excluded = _excluded(claim, tables, group, data) if group else {}
    fit_law = fits.power_law_floor_slope if claim.law == "floor" else fits.power_law_slope
    reasons: dict[str, list] = {}
    for key, part in data.groupby(group, dropna=False, sort=True) if group else [((), data)]:
        labels = _labels(group, key)
        # one point per (seed, x): EM's rows repeat for every training configuration of its data
        pts = part.groupby(["seed", claim.x], as_index=False)["y"].mean()
        try:
            if claim.law == "excess":  # the floor of each seed is its value at x = inf
                floor = pts[np.isinf(pts[claim.x])].set_index("seed")["y"]
                pts = pts[np.isfinite(pts[claim.x]) & pts["seed"].isin(floor.index)]
                fit = fits.power_law_excess_slope(pts[claim.x], pts["y"], pts["seed"].map(floor), pts["seed"])
            else:
                fit = fit_law(pts[claim.x], pts["y"], pts["seed"])
        except fits.FitError as err:
            reasons.setdefault(str(err), []).append(labels)
            continue
        key = key if isinstance(key, tuple) else (key,)
        rows.append(_row(claim, labels, fit, claim.theory, excluded.get(key, 0)))
    for reason, groups in reasons.items():
        skipped.append((claim.name, f"{len(groups)} group(s) against {claim.x}: {reason} (e.g. {json.dumps(groups[0])})"))


def evaluate(tables: dict[str, pd.DataFrame], claims: tuple[Claim, ...] = CLAIMS) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Rows of the `fits` table for every claim and group with data; (claim, reason) for the rest."""
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for claim in claims:
        df, why = _select(claim, tables)
        if df.empty:
            skipped.append((claim.name, why))
        elif claim.law == "rate":
            _evaluate_rate(claim, df, rows, skipped)
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


VERDICTS = ("consistent", "steeper", "shallower", "worse")


def contradicts(law: str, theory: float) -> str:
    """The verdict that would contradict an O() upper bound (or a predicted rate, or 'matches or beats')."""
    if law == "compare":
        return "worse"
    if law == "rate":
        return "shallower"
    return "shallower" if theory < 0 else "steeper"


def verdict_table(fits: pd.DataFrame) -> pd.DataFrame:
    """Per claim: the theory, how many fits gave each verdict, how many contradict the theory's
    bound, and the median estimate."""
    described = {c.name: c for c in CLAIMS}
    out = []
    for name, rows in fits.groupby("claim", sort=False):
        claim = described.get(name)
        law = claim.law if claim is not None else "power"
        theory = {"rate": "rho_theory per run", "compare": "log ratio <= 0"}.get(law, f"{rows['theory'].iloc[0]:.4g}")
        counts = rows["verdict"].value_counts()
        against = int((rows["verdict"] == rows["theory"].map(lambda t: contradicts(law, t))).sum())
        out.append(
            {
                "claim": name, "metric vs x": f"{rows['metric'].iloc[0]} vs {rows['x'].iloc[0]}", "theory": theory, "fits": len(rows),
                **{v: int(counts.get(v, 0)) for v in VERDICTS}, "against the bound": against, "median estimate": f"{rows['estimate'].median():.4g}",
            }
        )
    return pd.DataFrame(out)


def write_fits(store: str | os.PathLike, rows: pd.DataFrame, skipped: list[tuple[str, str]]) -> list[Path]:
    """Replace the store's `fits` table (one file per family) and its list of skipped claims.

    Each file is written under a hidden name and moved into place; a family with no fits now loses
    its old file once the new ones are in place. `fits/_skipped.parquet` is invisible to Parquet dataset readers (leading `_`).
    """
    root = Path(store) / "fits"
    root.mkdir(parents=True, exist_ok=True)
    written = []
    families = set(rows["family"]) if len(rows) else set()
    # one Arrow schema for every family's file (the union of the group columns, typed from all
    # rows), so that a dataset reader sees every column whichever file it opens first
    table = pa.Table.from_pandas(rows.drop(columns=["family"]), preserve_index=False) if len(rows) else None
    for family in sorted(families):
        directory = root / f"family={family}"
        directory.mkdir(exist_ok=True)
        part = table.filter(pa.array((rows["family"] == family).to_numpy()))
        written.append(_replace(directory / "fits.parquet", part))
    _replace(root / "_skipped.parquet", pd.DataFrame(skipped, columns=["claim", "reason"]))
    for old in root.glob("family=*/fits.parquet"):  # after the new files are in place
        if old.parent.name.split("=", 1)[1] not in families:
            old.unlink()
    return written


def _replace(path: Path, data: pd.DataFrame | pa.Table) -> Path:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    pq.write_table(data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False), tmp)
    os.replace(tmp, path)
    return path


def read_fits(store: str | os.PathLike) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The `fits` table (with `family`) and the skipped claims, as `icl-study fit` last wrote them."""
    root = Path(store) / "fits"
    if not (root / "_skipped.parquet").is_file():
        raise StoreReadError(f"{store}: no fits yet; run `icl-study fit --store {store}` first")
    files = sorted(root.glob("family=*/fits.parquet"))
    fits_table = pd.concat([pd.read_parquet(p).assign(family=p.parent.name.split("=", 1)[1]) for p in files], ignore_index=True) if files else pd.DataFrame()
    skipped = pd.read_parquet(root / "_skipped.parquet")
    return fits_table, list(zip(skipped["claim"], skipped["reason"]))
