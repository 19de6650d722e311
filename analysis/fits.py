"""Fits of the laws with uncertainty (theory.md section 5); numpy and scipy only.

- `power_law_slope`: least squares of log y on log x on the seed-averaged curve; the interval is
  estimate +- t_{S-1} se, se from a bootstrap that resamples seeds (the independent unit) and refits
  the seed-averaged curve (see `_interval` for why not the percentile interval).
- `power_law_floor_slope`: y = a x^b + f by least squares (profiled over b, global on [-5, 5]),
  the same bootstrap.
- `power_law_excess_slope`: the slope of y - f with the floor f measured (per seed), not fitted.
- `rate`: log y_t = a + t log rho on the window where the curve is above its noise floor; the
  interval is the t-interval of the slope, widened to take in the slope of the window's later half
  (a curve whose local rate is still drifting is not given a falsely tight interval); the window
  and R^2 are part of the result.
- `log_ratio`: a model's error against a baseline's on the same prompts (paired by seed), as the
  mean log ratio with its t-interval; `verdict_compare` reads it.
- `verdict`: the theory exponent against the interval; `rate_verdict` the same for a rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from analysis import laws

BOOTSTRAP = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A fitted exponent or rate with its interval; `window` is the x (or step) range used."""

    estimate: float
    ci_low: float
    ci_high: float
    n_points: int
    window: tuple[float, float]
    method: str
    r2: float = float("nan")


class FitError(ValueError):
    """Too little data for a fit; the message says why (no estimate is made up)."""


def _by_seed(x: np.ndarray, y: np.ndarray, seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The x levels and a seeds x levels table of y over the seeds that have every level.

    A seed that lacks a level (its value was excluded) is left out whole, so that every resample
    of seeds averages the same levels.
    """
    levels, seeds = np.unique(x), np.unique(seed)
    table = np.full((len(seeds), len(levels)), np.nan)
    table[np.searchsorted(seeds, seed), np.searchsorted(levels, x)] = y
    table = table[np.isfinite(table).all(axis=1)]
    if len(table) < 2:
        raise FitError(f"needs at least 2 seeds with a value at every x level, got {len(table)} of {len(seeds)}")
    return levels, table


def _resampled_means(table: np.ndarray, rng: np.random.Generator, reps: int) -> np.ndarray:
    """The seed-averaged curve of `reps` resamples of the seeds (rows) with replacement: [reps, levels]."""
    n = table.shape[0]
    return table[rng.integers(0, n, size=(reps, n))].mean(axis=1)


def _finite(boot: np.ndarray) -> np.ndarray:
    """The resamples whose fit succeeded; too many failures is a FitError, not a narrow interval."""
    failed = int((~np.isfinite(boot)).sum())
    if failed > 0.1 * len(boot):
        raise FitError(f"the fit failed on {failed} of {len(boot)} bootstrap resamples")
    return boot[np.isfinite(boot)]


def _loglog_slopes(levels: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Least-squares slope of log curve against log levels, for every row of curves at once (NaN
    where a row is not positive)."""
    lx = np.log(levels) - np.log(levels).mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        ly = np.log(np.where(curves > 0, curves, np.nan))
    return (ly - ly.mean(axis=-1, keepdims=True)) @ lx / (lx @ lx)


def _interval(estimate: float, boot: np.ndarray, seeds: int) -> tuple[float, float]:
    """estimate +- t_{S-1} se, se the bootstrap's standard deviation scaled by sqrt(S / (S - 1)).

    A percentile interval from a bootstrap over S = 2-4 seeds is far too narrow (coverage about
    50-80%); with the t quantile and the small-sample correction the coverage is near nominal for
    every S (tests/test_fits.py measures it).
    """
    se = float(np.std(boot, ddof=1)) * np.sqrt(seeds / (seeds - 1))
    half = stats.t.ppf((1 + LEVEL) / 2, seeds - 1) * se
    if not np.isfinite(half):
        raise FitError("no finite interval")
    return estimate - half, estimate + half


def _check(x: np.ndarray, seed: np.ndarray, need: int) -> None:
    if len(np.unique(x)) < need:
        raise FitError(f"needs at least {need} distinct x values, got {len(np.unique(x))}")
    if len(np.unique(seed)) < 2:
        raise FitError("needs at least 2 seeds for a bootstrap interval")
    if np.any(x <= 0):
        raise FitError("a log-log fit needs x > 0")


def _loglog(levels: np.ndarray, table: np.ndarray, rng: np.random.Generator | None, method: str) -> Estimate:
    """The slope of the seed-averaged curve of table [seeds, levels] and its seed-bootstrap t interval."""
    estimate = float(_loglog_slopes(levels, table.mean(axis=0)))
    boot = _finite(_loglog_slopes(levels, _resampled_means(table, rng or np.random.default_rng(0), BOOTSTRAP)))
    lo, hi = _interval(estimate, boot, len(table))
    return Estimate(estimate, lo, hi, len(levels), (float(levels[0]), float(levels[-1])), method)


def power_law_slope(x, y, seed, rng: np.random.Generator | None = None) -> Estimate:
    """Slope b of log y = a + b log x on the seed-averaged curve, with a seed-bootstrap CI."""
    x, y, seed = (np.asarray(v, dtype=float) for v in (x, y, seed))
    _check(x, seed, 3)
    if np.any(y <= 0):
        raise FitError("a log-log fit needs y > 0")
    return _loglog(*_by_seed(x, y, seed), rng, "loglog-ols+seed-bootstrap-t")


def power_law_excess_slope(x, y, floor, seed, rng: np.random.Generator | None = None) -> Estimate:
    """Slope b of log(y - floor) = a + b log x, floor measured per seed (e.g. the error at M = inf),
    on the seed-averaged excess, with the interval of `power_law_slope`.

    Where the floor is known, this is sharper than fitting it: a free floor is poorly identified on
    a few x levels and tends to come out near 0, flattening b.
    """
    x, y, floor, seed = (np.asarray(v, dtype=float) for v in (x, y, floor, seed))
    _check(x, seed, 3)
    levels, table = _by_seed(x, y - floor, seed)
    if np.any(table.mean(axis=0) <= 0):
        raise FitError("the mean excess over the floor is not positive at every x")
    return _loglog(levels, table, rng, "loglog-ols-of-excess+seed-bootstrap-t")


B_GRID = np.linspace(-5.0, 5.0, 401)  # exponents scanned by the floor fit, then refined by golden section
GOLDEN = 30  # golden-section steps: the bracket of one grid step shrinks by 0.618^30, to ~1e-8


def _profile_rss(levels: np.ndarray, y: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min over a, f >= 0 of ||a x^b + f - y||^2, for curves y [R, L] and exponents b [R, K]: [R, K].

    A two-variable nonnegative least squares in closed form: the unconstrained solution when it is
    feasible, else the better edge (f = 0, or a = 0 where the fit is flat at the mean).
    """
    X = laws.power_law(levels, 0.0, b[..., None])  # [R, K, L]: x^b
    yy = y[:, None, :]
    ym, Xm = yy.mean(-1), X.mean(-1)
    yc, Xc = yy - ym[..., None], X - Xm[..., None]
    syy, sxy, sxx = (yc**2).sum(-1), (yc * Xc).sum(-1), (Xc**2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = sxy / sxx
        free = syy - sxy**2 / sxx
        xy, xx = (yy * X).sum(-1), (X**2).sum(-1)
        edge = np.where(xy >= 0, (yy**2).sum(-1) - xy**2 / xx, np.inf)
    rss = np.where((a >= 0) & (ym - a * Xm >= 0), free, np.minimum(edge, syy))
    return np.where(np.isfinite(rss), rss, np.inf)


def _floor_fits(levels: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """The exponent b of y = a x^b + f (a, f >= 0) fitted to each row of curves [R, L]: [R].

    Variable projection: for fixed b the best (a, f) is in closed form (`_profile_rss`), so the
    residual is scanned over b on `B_GRID` for every curve at once and the best grid step refined
    by golden-section search. Global over [-5, 5], no starting point. A row whose best fit is flat
    (a = 0, b unidentified) gives NaN.
    """
    if len(curves) > 200:  # bounded temporaries: [rows, grid, levels]
        return np.concatenate([_floor_fits(levels, curves[i : i + 200]) for i in range(0, len(curves), 200)])
    y = curves
    scan = _profile_rss(levels, y, np.broadcast_to(B_GRID, (len(y), len(B_GRID))))
    g = np.argmin(scan, axis=1)
    step = B_GRID[1] - B_GRID[0]
    lo, hi = np.maximum(B_GRID[g] - step, B_GRID[0]), np.minimum(B_GRID[g] + step, B_GRID[-1])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(GOLDEN):
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fc, fd = _profile_rss(levels, y, np.stack([c, d], axis=1)).T
        hi, lo = np.where(fc < fd, d, hi), np.where(fc < fd, lo, c)
    best = (lo + hi) / 2
    rss = _profile_rss(levels, y, best[:, None])[:, 0]
    flat = rss >= ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) * (1 - 1e-12)
    return np.where(flat, np.nan, best)


def power_law_floor_slope(x, y, seed, rng: np.random.Generator | None = None) -> Estimate:
    """Exponent b of y = a x^b + f (f >= 0) on the seed-averaged curve, with a seed-bootstrap CI."""
    x, y, seed = (np.asarray(v, dtype=float) for v in (x, y, seed))
    _check(x, seed, 4)
    if np.any(y <= 0):
        raise FitError("a power law with a floor needs y > 0")
    levels, table = _by_seed(x, y, seed)
    estimate = float(_floor_fits(levels, table.mean(axis=0)[None])[0])
    if not np.isfinite(estimate):
        raise FitError("the power law with a floor does not fit: the best fit is flat")
    boot = _finite(_floor_fits(levels, _resampled_means(table, rng or np.random.default_rng(0), BOOTSTRAP)))
    lo, hi = _interval(estimate, boot, len(table))
    return Estimate(estimate, lo, hi, len(levels), (float(levels[0]), float(levels[-1])), "power-law+floor+seed-bootstrap-t")


def rate(steps, values, floor: float = 1e-13, start: float | None = None, squared: bool = False) -> Estimate:
    """Per-step contraction rho of a geometric curve, fitted on the window above `floor`.

    The window starts at `start` (default: the middle of the curve's span above the floor, the
    tail where the local rate dominates) and ends before the curve first falls below `floor`.
    `squared`: the values contract by rho^2 per step (a loss gap), so rho = sqrt of the fit.
    """
    t, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(v) & (v > floor)
    end = np.argmin(ok) if not ok.all() else len(v)  # first point at or below the floor
    t, v = t[:end], v[:end]
    if start is None and len(t):
        start = t[0] + (t[-1] - t[0]) / 2
    keep = t >= (start if start is not None else -np.inf)
    t, v = t[keep], v[keep]
    if len(t) < 3:
        raise FitError(f"needs at least 3 points above the floor {floor:g} in the window, got {len(t)}")
    res = stats.linregress(t, np.log(v))
    q = stats.t.ppf((1 + LEVEL) / 2, len(t) - 2)
    lo, hi = res.slope - q * res.stderr, res.slope + q * res.stderr
    late = t >= t[len(t) // 2]  # at least 2 of the >= 3 points
    s_late = float(np.polyfit(t[late], np.log(v[late]), 1)[0])  # a curve whose local rate still drifts widens the interval
    lo, hi = min(lo, s_late), max(hi, s_late)
    power = 0.5 if squared else 1.0
    rho = lambda s: float(np.exp(power * s))  # noqa: E731
    return Estimate(rho(res.slope), rho(lo), rho(hi), len(t), (float(t[0]), float(t[-1])), "log-linear-ols+late-half", float(res.rvalue**2))


def log_ratio(a, b, seed) -> Estimate:
    """Mean over seeds of log(a / b) for paired values (same seed, same prompts), with the
    t-interval of a mean (the seeds are independent)."""
    a, b, seed = (np.asarray(v, dtype=float) for v in (a, b, seed))
    if len(np.unique(seed)) < 2:
        raise FitError("needs at least 2 seeds for a bootstrap interval")
    if np.any(a <= 0) or np.any(b <= 0):
        raise FitError("a log ratio needs positive values")
    r = np.log(a / b)
    half = stats.t.ppf((1 + LEVEL) / 2, len(r) - 1) * r.std(ddof=1) / np.sqrt(len(r))
    return Estimate(float(r.mean()), float(r.mean() - half), float(r.mean() + half), len(r), (float("nan"), float("nan")), "paired-log-ratio+t")


def verdict_compare(ci_low: float) -> str:
    """A model against a baseline (log ratio of errors): `consistent` when it matches or beats the
    baseline (the CI reaches 0 or below), `worse` when its error is larger beyond the CI."""
    return "consistent" if ci_low <= 0 else "worse"


TOLERANCE = 1e-9  # relative: an exact power law's slope is -0.9999999999999988, not "shallower"


def rate_verdict(theory: float, ci_low: float, ci_high: float) -> str:
    """A fitted rate rho against the predicted one: `steeper` (faster: the interval below it),
    `shallower` (slower), or `consistent`."""
    tol = TOLERANCE * max(1.0, abs(theory))
    return "steeper" if ci_high < theory - tol else "shallower" if ci_low > theory + tol else "consistent"


def verdict(theory: float, ci_low: float, ci_high: float) -> str:
    """`consistent` (theory inside the CI), `steeper` (the CI lies beyond it, away from 0), or `shallower`."""
    tol = TOLERANCE * max(1.0, abs(theory))
    if ci_low - tol <= theory <= ci_high + tol:
        return "consistent"
    beyond = ci_high < theory if theory < 0 else ci_low > theory
    return "steeper" if beyond else "shallower"
