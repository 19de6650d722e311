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

GMM_TASK = ("d", "c", "snr", "cov", "kappa", "symmetric", "B", "param")
MOR_TASK = ("d", "K", "snr", "sigma", "components", "assignment", "cov", "kappa")


@dataclass(frozen=True)
class Claim:
    name: str
    family: str
    description: str
    table: str  # trials or evals
    metric: str  # a trials column, or an evals metric
    x: str
    theory: float
    group: tuple[str, ...]
    estimator: str | None = None  # evals: whose rows
    where: dict[str, Callable[[pd.Series], pd.Series]] = field(default_factory=dict)
    x_min: float = 0.0
    law: str = "power"  # power | floor


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "gmm-2-optimum-vs-N", "gmm", "W*/c'' - Lam^-1 shrinks like 1/N (asymptotic window N >= 50)",
        "trials", "opt_dist_theory", "N", -1.0, GMM_TASK, where={"opt_converged": lambda s: s.astype(bool)}, x_min=50,
    ),
    Claim(
        "gmm-3-error-vs-N", "gmm", "tv_error of the trained LSA at M = inf falls like 1/N",
        "evals", "tv_error", "N", -1.0, GMM_TASK, estimator="lsa", where={"M": lambda s: np.isinf(s)},
    ),
    Claim(
        "gmm-3-error-vs-M", "gmm", "tv_error of the trained LSA falls like 1/sqrt(M) towards a floor (fixed N)",
        "evals", "tv_error", "M", -0.5, (*GMM_TASK, "N"), estimator="lsa", where={"M": lambda s: np.isfinite(s)}, law="floor",
    ),
    Claim(
        "mor-1-em-vs-M-high-snr", "mor", "EM's parameter error falls like sqrt(d/M) at high SNR (snr >= 2)",
        "evals", "param_error", "M", -0.5, MOR_TASK, estimator="em", where={"snr": lambda s: s >= 2, "M": lambda s: np.isfinite(s)}, x_min=32,
    ),
    Claim(
        "mor-1-em-vs-M-low-snr", "mor", "EM's parameter error falls like (d/M)^(1/4) at low SNR (snr < 2)",
        "evals", "param_error", "M", -0.25, MOR_TASK, estimator="em", where={"snr": lambda s: s < 2, "M": lambda s: np.isfinite(s)}, x_min=32,
    ),
)


def _rows(claim: Claim, tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """The claim's data points (value, x, seed, group fields), and how many were excluded."""
    df = tables.get(claim.table, pd.DataFrame())
    if df.empty or "family" not in df:
        return pd.DataFrame(), 0
    df = df[df["family"] == claim.family]
    if claim.table == "evals":
        df = df[(df["metric"] == claim.metric) & (df["estimator"] == claim.estimator)]
        df = df.assign(y=df["value"])
    elif claim.metric in df:
        df = df.assign(y=df[claim.metric])
    else:
        return pd.DataFrame(), 0
    for column, test in claim.where.items():
        if column in df and len(df):
            df = df[test(df[column]).to_numpy()]
    df = df[df[claim.x] >= claim.x_min] if len(df) else df
    ok = (df["status"] == "ok") & np.isfinite(df["y"].astype(float)) & (df["y"] > 0) if len(df) else pd.Series(dtype=bool)
    return df[ok], int((~ok).sum())


def evaluate(tables: dict[str, pd.DataFrame], claims: tuple[Claim, ...] = CLAIMS) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Rows of the `fits` table for every claim and group with data; (claim, reason) for the rest."""
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for claim in claims:
        data, excluded = _rows(claim, tables)
        if data.empty:
            skipped.append((claim.name, f"no {claim.family} rows of {claim.table}.{claim.metric}" + (f" for {claim.estimator}" if claim.estimator else "") + " in this regime"))
            continue
        group = [g for g in claim.group if g in data and data[g].notna().any()]
        fitted = 0
        for key, part in data.groupby(group, dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            labels = {g: (v.item() if hasattr(v, "item") else v) for g, v in zip(group, key)}
            # one point per (seed, x): runs that differ only outside the group (EM's rows repeat
            # for every training N of a data configuration) are averaged
            pts = part.groupby(["seed", claim.x], as_index=False)["y"].mean()
            try:
                fit = (fits.power_law_floor_slope if claim.law == "floor" else fits.power_law_slope)(pts[claim.x], pts["y"], pts["seed"])
            except fits.FitError as err:
                skipped.append((claim.name, f"{json.dumps(labels, default=str)}: {err}"))
                continue
            fitted += 1
            rows.append(
                dict(
                    family=claim.family, claim=claim.name, x=claim.x, metric=claim.metric, group=json.dumps(labels, default=str, sort_keys=True),
                    estimate=fit.estimate, ci_low=fit.ci_low, ci_high=fit.ci_high, theory=claim.theory,
                    verdict=fits.verdict(claim.theory, fit.ci_low, fit.ci_high), window=f"{fit.window[0]:g}..{fit.window[1]:g}",
                    n_points=fit.n_points, method=fit.method, excluded=excluded,
                )
            )
        if not fitted and not any(name == claim.name for name, _ in skipped):
            skipped.append((claim.name, "no group had enough data"))
    return pd.DataFrame(rows), skipped


def write_fits(store: str | os.PathLike, rows: pd.DataFrame) -> list[Path]:
    """Replace the store's `fits` table (one file per family), each file written atomically."""
    written = []
    for family, part in rows.groupby("family"):
        directory = Path(store) / "fits" / f"family={family}"
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / "fits.parquet"
        tmp = directory / f".tmp-{os.getpid()}-fits.parquet"
        part.drop(columns=["family"]).to_parquet(tmp, index=False)
        os.replace(tmp, final)
        written.append(final)
    return written
