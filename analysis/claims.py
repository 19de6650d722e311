"""The claims of theory.md as data, and their evaluation into rows of the `fits` table.

Each claim names its family, the table and metric, the variable, the regime (a filter), the
fields that define a group, the theory exponent and the law. `evaluate` fits every group the
store has data for and says why it skips a claim it has no data for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from analysis import fits
from analysis.load import StoreReadError

GMM_TASK = ("d", "c", "snr", "cov", "kappa", "symmetric", "B", "param")
MOR_TASK = ("d", "K", "snr", "sigma", "components", "assignment", "cov", "kappa")
GROUPS = {"gmm": GMM_TASK, "mor": MOR_TASK}


@dataclass(frozen=True)
class Claim:
    """One testable claim: `metric` of `table` against `x`, per group, in the regime `where`.

    law: `power` (log-log slope), `floor` (power law with a floor), `rate` (the per-run linear
    rate of a training curve against the run's `rho_theory`; `theory` is then NaN: it is a column)
    or `compare` (log of `estimator`'s metric over `baseline`'s, per test length; theory 0).
    Verdicts compare exponents; a rate is compared as log rho, so `steeper` means faster; a
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
    law: str = "power"  # power | floor | rate | compare
    baseline: str | None = None  # compare: the estimator `estimator` is set against


_inf = {"M": lambda s: np.isinf(s)}
_finite = {"M": lambda s: np.isfinite(s)}
_high, _low = (lambda s: s >= 2), (lambda s: s < 2)
_reduced = {"param": lambda s: s == "reduced"}

CLAIMS: tuple[Claim, ...] = (
    # gmm [S], theory.md section 2
    Claim(
        "gmm-1-rate", "gmm", "GD converges linearly: log subopt falls like 2 t log rho, rho = max|1 - lr lambda(H)| at the optimum",
        "curves", "subopt", "step", float("nan"), (), law="rate",
    ),
    Claim(
        "gmm-2-optimum-vs-N", "gmm", "W*/c'' - Lam^-1 shrinks like 1/N (asymptotic window N >= 50)",
        "trials", "opt_dist_theory", "N", -1.0, GMM_TASK, where={"opt_converged": lambda s: s.astype(bool)}, x_min=50,
    ),
    Claim(
        "gmm-2-optimum-vs-c", "gmm", "||G|| = O(c/N): W*/c - Lam^-1 grows at most like c at fixed N",
        "trials", "opt_dist_theory", "c", 1.0, tuple(g for g in (*GMM_TASK, "N") if g != "c"), where={"opt_converged": lambda s: s.astype(bool)},
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
        "gmm-3-error-vs-c", "gmm", "tv_error at M = inf is O(c^2/N): grows at most like c^2 at fixed N",
        "evals", "tv_error", "c", 2.0, tuple(g for g in (*GMM_TASK, "N") if g != "c"), estimator="lsa", where=_inf,
    ),
    # mor [J], theory.md section 3
    Claim(
        "mor-1-em-vs-M-high-snr", "mor", "EM's parameter error falls like sqrt(d/M) at high SNR (snr >= 2)",
        "evals", "param_error", "M", -0.5, MOR_TASK, estimator="em", where={"snr": _high, **_finite}, x_min=32,
    ),
    Claim(
        "mor-1-em-vs-M-low-snr", "mor", "EM's parameter error falls like (d/M)^(1/4) at low SNR (snr < 2)",
        "evals", "param_error", "M", -0.25, MOR_TASK, estimator="em", where={"snr": _low, **_finite}, x_min=32,
    ),
    Claim(
        "mor-1-em-vs-d-high-snr", "mor", "EM's parameter error grows like sqrt(d) at fixed M, high SNR",
        "evals", "param_error", "d", 0.5, (*(g for g in MOR_TASK if g != "d"), "M"), estimator="em", where={"snr": _high, **_finite},
    ),
    Claim(
        "mor-1-em-vs-d-low-snr", "mor", "EM's parameter error grows like d^(1/4) at fixed M, low SNR",
        "evals", "param_error", "d", 0.25, (*(g for g in MOR_TASK if g != "d"), "M"), estimator="em", where={"snr": _low, **_finite},
    ),
    Claim(
        "mor-2-excess-risk-vs-B", "mor", "the ERM-trained LSA's population excess risk over Gamma* is O(1/sqrt(B)) (an upper bound)",
        "trials", "excess_risk", "B", -0.5, (*MOR_TASK, "N"), where=_reduced,
    ),
    Claim(
        "mor-3-rate", "mor", "GD on the quadratic LSA loss converges linearly to the global optimum at rho = max|1 - lr lambda(H)|",
        "curves", "subopt", "step", float("nan"), (), law="rate",
    ),
    Claim(
        "mor-3-optimum-vs-B", "mor", "the empirical optimum approaches Gamma* like 1/sqrt(B)",
        "trials", "opt_dist_theory", "B", -0.5, (*MOR_TASK, "N"), where={"opt_converged": lambda s: s.astype(bool), **_reduced},
    ),
    Claim(
        "mor-4-lsa-vs-em", "mor", "the trained model matches or beats EM (mse, paired prompts), most of all at small M and low SNR",
        "evals", "mse", "M", 0.0, (*MOR_TASK, "N", "B", "param"), estimator="lsa", baseline="em", where=_finite, law="compare",
    ),
)

NOISE = 1e-12  # subopt below NOISE * max(1, |opt_loss|) is float noise: the rate window ends there


def _select(claim: Claim, tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, str]:
    """The claim's rows in its regime with the metric as column `y`, or no rows and the reason."""
    df = tables.get(claim.table, pd.DataFrame())
    if df.empty or "family" not in df:
        return pd.DataFrame(), f"the store has no {claim.table} table"
    needed = [claim.x, "status", "seed", *(("rho_theory", "opt_loss", "run_id", "step") if claim.law == "rate" else ())]
    needed += ["metric", "estimator", "value"] if claim.table == "evals" else [claim.metric]
    missing = [c for c in needed if c not in df]
    if missing:
        return pd.DataFrame(), f"the {claim.table} table has no column {', '.join(missing)}"
    df = df[df["family"] == claim.family]
    if claim.table == "evals":
        df = df[(df["metric"] == claim.metric) & df["estimator"].isin([claim.estimator, claim.baseline])]
        df = df.assign(y=df["value"])
    else:
        df = df.assign(y=df[claim.metric])
    for column, test in claim.where.items():
        if column in df and len(df):
            df = df[test(df[column]).to_numpy()]
    df = df[df[claim.x] >= claim.x_min] if len(df) else df
    where = f" for {claim.estimator}" if claim.estimator else ""
    return df, "" if len(df) else f"no {claim.family} rows of {claim.table}.{claim.metric}{where} in this regime"


def _rows(claim: Claim, tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, int, str]:
    """The claim's data points (value, x, seed, group fields), how many were excluded (runs not
    `ok`, NaN, infinite or non-positive values), and why there are none when there are none."""
    df, why = _select(claim, tables)
    if df.empty:
        return df, 0, why
    ok = (df["status"] == "ok") & np.isfinite(df["y"].astype(float)) & (df["y"] > 0)
    excluded = int((~ok).sum())
    return df[ok], excluded, "" if ok.any() else f"all {excluded} rows excluded (runs not ok, or NaN or non-positive values)"


def _verdict(claim: Claim, fit: fits.Estimate, theory: float) -> str:
    if claim.law == "compare":
        return fits.verdict_compare(fit.ci_low)
    if claim.law == "rate":
        return fits.rate_verdict(theory, fit.ci_low, fit.ci_high)
    return fits.verdict(theory, fit.ci_low, fit.ci_high)


def _evaluate_compare(claim: Claim, data: pd.DataFrame, excluded: int, rows: list, skipped: list) -> None:
    """One row per group and test length: log(metric of estimator / metric of baseline), paired by seed."""
    group = [g for g in (*claim.group, claim.x) if g in data and data[g].notna().any()]
    pairs = data.pivot_table(index=[*group, "seed"], columns="estimator", values="y", aggfunc="mean", dropna=False)
    if claim.estimator not in pairs or claim.baseline not in pairs:
        skipped.append((claim.name, f"needs rows of both {claim.estimator} and {claim.baseline}"))
        return
    pairs = pairs[[claim.estimator, claim.baseline]].dropna().reset_index()
    reasons: dict[str, int] = {}
    for key, part in pairs.groupby(group, sort=True):
        labels = {g: (v.item() if hasattr(v, "item") else v) for g, v in zip(group, key)}
        try:
            fit = fits.log_ratio(part[claim.estimator], part[claim.baseline], part["seed"])
        except fits.FitError as err:
            reasons[str(err)] = reasons.get(str(err), 0) + 1
            continue
        row = _row(claim, labels, fit, claim.theory, excluded)
        rows.append({**row, "window": f"{claim.x}={labels[claim.x]:g}"})
    skipped.extend((claim.name, f"{n} group(s): {reason}") for reason, n in reasons.items())
    if not pairs.size:
        skipped.append((claim.name, f"no seed has both {claim.estimator} and {claim.baseline} rows"))


def _row(claim: Claim, labels: dict[str, Any], fit: fits.Estimate, theory: float, excluded: int) -> dict[str, Any]:
    return dict(
        family=claim.family, claim=claim.name, x=claim.x, metric=claim.metric, group=json.dumps(labels, default=str, sort_keys=True),
        estimate=fit.estimate, ci_low=fit.ci_low, ci_high=fit.ci_high, theory=theory,
        verdict=_verdict(claim, fit, theory),
        window=f"{fit.window[0]:g}..{fit.window[1]:g}",
        n_points=fit.n_points, method=fit.method, excluded=excluded, r2=fit.r2,
    )


def _evaluate_rate(claim: Claim, tables: dict[str, pd.DataFrame], rows: list, skipped: list) -> None:
    """One row per training curve: the fitted rho beside the run's own `rho_theory`."""
    df, why = _select(claim, tables)
    if df.empty:
        skipped.append((claim.name, why))
        return
    runs = df.groupby("run_id", sort=True)
    bad = {rid for rid, part in runs if not (part["status"].iloc[0] == "ok" and np.isfinite(part["rho_theory"].iloc[0]) and np.isfinite(part["opt_loss"].iloc[0]))}
    too_fast = 0
    for rid, part in runs:
        if rid in bad:
            continue
        part = part.sort_values("step")
        first = part.iloc[0]
        try:
            fit = fits.rate(part["step"], part["y"], floor=NOISE * max(1.0, abs(float(first["opt_loss"]))), squared=True)
        except fits.FitError:
            too_fast += 1
            continue
        labels = {g: (first[g].item() if hasattr(first[g], "item") else first[g]) for g in ("run_id", "seed", *GROUPS[claim.family], "N", "lr") if g in first}
        rows.append(_row(claim, labels, fit, float(first["rho_theory"]), len(bad)))
    if too_fast:
        skipped.append((claim.name, f"{too_fast} curves: fewer than 3 logged points above the float-noise floor (GD converged too fast for the logging interval; log more often)"))
    if not any(r["claim"] == claim.name for r in rows) and not too_fast:
        skipped.append((claim.name, f"no usable curves ({len(bad)} runs not ok or without a predicted rate)"))


def evaluate(tables: dict[str, pd.DataFrame], claims: tuple[Claim, ...] = CLAIMS) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Rows of the `fits` table for every claim and group with data; (claim, reason) for the rest."""
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for claim in claims:
        if claim.law == "rate":
            _evaluate_rate(claim, tables, rows, skipped)
            continue
        data, excluded, why = _rows(claim, tables)
        if data.empty:
            skipped.append((claim.name, why))
            continue
        if claim.law == "compare":
            _evaluate_compare(claim, data, excluded, rows, skipped)
            continue
        group = [g for g in claim.group if g in data and data[g].notna().any()]
        fitted, reasons = 0, {}
        for key, part in data.groupby(group, dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            labels = {g: (v.item() if hasattr(v, "item") else v) for g, v in zip(group, key)}
            # one point per (seed, x): runs that differ only outside the group (EM's rows repeat
            # for every training N of a data configuration) are averaged
            pts = part.groupby(["seed", claim.x], as_index=False)["y"].mean()
            try:
                fit = (fits.power_law_floor_slope if claim.law == "floor" else fits.power_law_slope)(pts[claim.x], pts["y"], pts["seed"])
            except fits.FitError as err:
                reasons.setdefault(str(err), []).append(labels)
                continue
            fitted += 1
            rows.append(_row(claim, labels, fit, claim.theory, excluded))
        for reason, groups in reasons.items():
            example = json.dumps(groups[0], default=str)
            skipped.append((claim.name, f"{len(groups)} group(s) against {claim.x}: {reason} (e.g. {example})"))
    return pd.DataFrame(rows), skipped


def write_fits(store: str | os.PathLike, rows: pd.DataFrame, skipped: list[tuple[str, str]]) -> list[Path]:
    """Replace the store's `fits` table (one file per family) and its list of skipped claims.

    Each file is written under a hidden name and moved into place; a family with no fits now loses
    its old file. `fits/_skipped.parquet` is invisible to Parquet dataset readers (leading `_`).
    """
    root = Path(store) / "fits"
    root.mkdir(parents=True, exist_ok=True)
    written = []
    families = set(rows["family"]) if len(rows) else set()
    for old in root.glob("family=*/fits.parquet"):
        if old.parent.name.split("=", 1)[1] not in families:
            old.unlink()
    for family, part in rows.groupby("family") if len(rows) else []:
        directory = root / f"family={family}"
        directory.mkdir(exist_ok=True)
        written.append(_replace(directory / "fits.parquet", part.drop(columns=["family"])))
    _replace(root / "_skipped.parquet", pd.DataFrame(skipped, columns=["claim", "reason"]))
    return written


def _replace(path: Path, frame: pd.DataFrame) -> Path:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    frame.to_parquet(tmp, index=False)
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
