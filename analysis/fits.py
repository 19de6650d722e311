"""Fits of the laws with uncertainty, and the verdicts (theory.md section 5); numpy and scipy only.

Estimates (each with a 95% interval from a bootstrap that resamples seeds, the independent unit):
- `exponent`: the leading exponent beta of y = A x^beta (1 + c x^-gamma), the law with its first
  correction, fitted to the seed-averaged curve; the plain log-log slope is reported beside it. A
  curve that obeys a bound can bend on a finite window (C/N (1 - a/N) has local slope -0.85 at small
  N): the correction absorbs the bend, the plain slope does not. `floor` subtracts a measured floor.
- `largest_increase`: the largest step-to-step log increase of the seed-averaged curve (a curve
  that should not rise).
- `rate`: log y_t = a + t log rho on the window where the curve is above its noise floor.
- `curve_deviation`: a measured training curve against its prediction, point by point.
- `log_ratio`: a model's error against a baseline's on the same prompts (paired by seed), as the
  log ratio of their seed means.

Verdicts by kind of claim: a bound (`within | violated | inconclusive`) or an equality
(`consistent | steeper | shallower | inconclusive`), each with a stated tolerance and an
inconclusive limit on the interval's half-width (`bound_verdict`, `equality_verdict`,
`rate_verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP = 1000
LEVEL = 0.95
MIN_CORRECTED = 4  # levels the corrected law (3 parameters) needs; with fewer only the plain slope is reported


@dataclass(frozen=True)
class Estimate:
    """A fitted quantity with its interval; `window` is the x (or step) range used, `plain` the
    plain log-log slope beside a corrected exponent, `note` what the reader must know."""

    estimate: float
    ci_low: float
    ci_high: float
    n_points: int
    window: tuple[float, float]
    method: str
    r2: float = float("nan")
    plain: float = float("nan")
    note: str = ""


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
        raise FitError(f"the fit failed on {failed} of {len(boot)} bootstrap resamples (a mean at or below 0)")
    return boot[np.isfinite(boot)]


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


def _bootstrapped(statistic, table: np.ndarray, rng: np.random.Generator | None) -> tuple[float, float, float]:
    """A statistic of the seed-averaged curve (rows -> values) with its seed-bootstrap t interval."""
    estimate = float(statistic(table.mean(axis=0)[None])[0])
    if not np.isfinite(estimate):
        raise FitError("the fit fails on the seed-averaged curve (a mean at or below 0)")
    boot = _finite(statistic(_resampled_means(table, rng or np.random.default_rng(0), BOOTSTRAP)))
    return (estimate, *_interval(estimate, boot, len(table)))


def _log(curves: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log(np.where(curves > 0, curves, np.nan))


def _loglog_slopes(levels: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Least-squares slope of log curve against log levels, for every row of curves at once (NaN
    where a row is not positive)."""
    lx = np.log(levels) - np.log(levels).mean()
    ly = _log(curves)
    return (ly - ly.mean(axis=-1, keepdims=True)) @ lx / (lx @ lx)


# the correction at the window's start, u = c x_min^-gamma, is at most the leading term (|u| <= 1, and
# 1 + u > 0): a first correction, not a second law. The bound keeps beta identified: with c free, the
# limit c -> inf would turn A x^beta (c / x^gamma) into a power law of exponent beta - gamma.
U_GRID = np.linspace(-0.99, 1.0, 200)
GOLDEN = 30  # golden-section steps: the bracket of one grid step shrinks by 0.618^30, to ~1e-8


def _corrected_fits(levels: np.ndarray, curves: np.ndarray, gamma: float) -> np.ndarray:
    """beta of y = A x^beta (1 + u (x_min / x)^gamma), |u| <= 1, fitted to each row of curves [R, L].

    Variable projection: for fixed u the law is linear in (log A, beta), so the residual is scanned
    over u on `U_GRID` for every row at once and the best grid step refined by golden section.
    Global over u, no starting point. NaN where a row is not positive.
    """
    if len(curves) > 200:  # bounded temporaries: [rows, grid, levels]
        return np.concatenate([_corrected_fits(levels, curves[i : i + 200], gamma) for i in range(0, len(curves), 200)])
    lx = np.log(levels) - np.log(levels).mean()
    sxx = lx @ lx
    ly = _log(curves)
    s = (levels[0] / levels) ** gamma

    def fit(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # u [R, K] -> beta, rss [R, K]
        z = ly[:, None, :] - np.log1p(u[..., None] * s)
        z = z - z.mean(axis=-1, keepdims=True)
        b = z @ lx / sxx
        return b, (z * z).sum(-1) - b * b * sxx

    _, scan = fit(np.broadcast_to(U_GRID, (len(ly), len(U_GRID))))
    g = np.argmin(np.where(np.isfinite(scan), scan, np.inf), axis=1)
    step = U_GRID[1] - U_GRID[0]
    lo, hi = np.maximum(U_GRID[g] - step, U_GRID[0]), np.minimum(U_GRID[g] + step, U_GRID[-1])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(GOLDEN):
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fc, fd = fit(np.stack([c, d], axis=1))[1].T
        hi, lo = np.where(fc < fd, d, hi), np.where(fc < fd, lo, c)
    beta, _ = fit(((lo + hi) / 2)[:, None])
    return np.where(np.isfinite(ly).all(axis=1), beta[:, 0], np.nan)


def _check(x: np.ndarray, seed: np.ndarray, need: int) -> None:
    if len(np.unique(x)) < need:
        raise FitError(f"needs at least {need} distinct x values, got {len(np.unique(x))}")
    if len(np.unique(seed)) < 2:
        raise FitError("needs at least 2 seeds for a bootstrap interval")
    if np.any(x <= 0):
        raise FitError("a log-log fit needs x > 0")


def power_law_slope(x, y, seed, rng: np.random.Generator | None = None) -> Estimate:
    """Slope b of log y = a + b log x on the seed-averaged curve, with a seed-bootstrap CI."""
    x, y, seed = (np.asarray(v, dtype=float) for v in (x, y, seed))
    _check(x, seed, 3)
    levels, table = _by_seed(x, y, seed)
    if np.any(table.mean(axis=0) <= 0):
        raise FitError("a log-log fit needs a positive mean at every x")
    est, lo, hi = _bootstrapped(lambda c: _loglog_slopes(levels, c), table, rng)
    return Estimate(est, lo, hi, len(levels), (float(levels[0]), float(levels[-1])), "loglog-ols+seed-bootstrap-t", plain=est)


def exponent(x, y, seed, correction: float | None = 1.0, floor=None, rng: np.random.Generator | None = None) -> Estimate:
    """The leading exponent beta of y = A x^beta (1 + c x^-correction) on the seed-averaged curve,
    with a seed-bootstrap CI, and the plain log-log slope beside it (`plain`).

    `correction` None fits the plain slope alone (an equality on a window where the corrections are
    small, or an x with too few levels by design).
    With fewer than `MIN_CORRECTED` levels the estimate is NaN (no verdict can rest on it) and the
    note says so. `floor` (per point, e.g. each seed's value at x = inf) is subtracted first.
    """
    x, y, seed = (np.asarray(v, dtype=float) for v in (x, y, seed))
    _check(x, seed, 3)
    if floor is not None:
        y = y - np.asarray(floor, dtype=float)
    levels, table = _by_seed(x, y, seed)
    if np.any(table.mean(axis=0) <= 0):
        what = "the mean excess over the floor" if floor is not None else "the mean"
        raise FitError(f"{what} is not positive at every x")
    rng = rng or np.random.default_rng(0)
    plain, plo, phi = _bootstrapped(lambda c: _loglog_slopes(levels, c), table, rng)
    window = (float(levels[0]), float(levels[-1]))
    if correction is None:
        return Estimate(plain, plo, phi, len(levels), window, "loglog-ols+seed-bootstrap-t", plain=plain)
    if len(levels) < MIN_CORRECTED:
        note = f"{len(levels)} levels: the corrected law needs {MIN_CORRECTED}; the plain slope is {plain:.3f} [{plo:.3f}, {phi:.3f}]"
        return Estimate(np.nan, np.nan, np.nan, len(levels), window, "corrected-power-law+seed-bootstrap-t", plain=plain, note=note)
    est, lo, hi = _bootstrapped(lambda c: _corrected_fits(levels, c, correction), table, rng)
    return Estimate(est, lo, hi, len(levels), window, f"corrected-power-law(x^-{correction:g})+seed-bootstrap-t", plain=plain)


def _largest_log_increase(curves: np.ndarray) -> np.ndarray:
    return np.diff(_log(curves), axis=-1).max(axis=-1)


def largest_increase(x, y, seed, rng: np.random.Generator | None = None) -> Estimate:
    """The largest step-to-step increase of log y along x on the seed-averaged curve (<= 0 for a
    non-increasing curve), with a seed-bootstrap CI."""
    x, y, seed = (np.asarray(v, dtype=float) for v in (x, y, seed))
    _check(x, seed, 3)
    levels, table = _by_seed(x, y, seed)
    if np.any(table.mean(axis=0) <= 0):
        raise FitError("needs a positive mean at every x")
    est, lo, hi = _bootstrapped(_largest_log_increase, table, rng)
    return Estimate(est, lo, hi, len(levels), (float(levels[0]), float(levels[-1])), "max-log-increase+seed-bootstrap-t")


def rate(steps, values, floor: float = 1e-13, start: float | None = None, squared: bool = False) -> Estimate:
    """Per-step contraction rho of a geometric curve, fitted on the window above `floor`.

    The window starts at `start` (default: the middle of the curve's span above the floor, the
    tail where the local rate dominates) and ends before the curve first falls below `floor`. The
    interval is the t-interval of the slope, widened to take in the slope of the window's later half
    (a curve whose local rate still drifts is not given a falsely tight interval).
    `squared`: the values contract by rho^2 per step (a loss gap), so rho = sqrt of the fit.
    """
    t, v = _above(steps, values, floor)
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
    s_late = float(np.polyfit(t[late], np.log(v[late]), 1)[0])
    lo, hi = min(lo, s_late), max(hi, s_late)
    power = 0.5 if squared else 1.0
    rho = lambda s: float(np.exp(power * s))  # noqa: E731
    return Estimate(rho(res.slope), rho(lo), rho(hi), len(t), (float(t[0]), float(t[-1])), "log-linear-ols+late-half", float(res.rvalue**2))


def _above(steps, values, floor: float, *others) -> tuple[np.ndarray, ...]:
    """The leading part of a curve above `floor` (it ends where the curve first falls below)."""
    t, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(v) & (v > floor)
    end = np.argmin(ok) if not ok.all() else len(v)
    return (t[:end], v[:end], *(np.asarray(o, dtype=float)[:end] for o in others))


def curve_deviation(steps, measured, predicted, floor: float = 1e-13) -> Estimate:
    """log(measured / predicted) along a curve while it is above `floor`: the estimate is the
    largest deviation in absolute value, the interval [min, max] of the deviations (no sampling
    here: GD on given data is deterministic)."""
    t, m, p = _above(steps, measured, floor, predicted)
    ok = np.isfinite(p) & (p > 0)
    t, m, p = t[ok], m[ok], p[ok]
    if len(t) < 3:
        raise FitError(f"needs at least 3 points above the floor {floor:g} with a prediction, got {len(t)}")
    r = np.log(m / p)
    return Estimate(float(r[np.argmax(np.abs(r))]), float(r.min()), float(r.max()), len(t), (float(t[0]), float(t[-1])), "log-ratio-to-prediction")


def log_ratio(a, b, seed, rng: np.random.Generator | None = None) -> Estimate:
    """log(mean a / mean b) over the seeds for paired values (same seed, same prompts), with the
    seed-bootstrap t interval (the pairs resampled together).

    The ratio of means, not the mean of per-seed ratios: an excess error near 0 (EM at large M,
    close to the oracle) is noisy and may be negative for a seed, where a per-seed log ratio would
    explode or be undefined; a resample whose mean is not positive counts as a failed resample.
    """
    a, b, seed = (np.asarray(v, dtype=float) for v in (a, b, seed))
    if len(np.unique(seed)) < 2:
        raise FitError("needs at least 2 seeds for an interval")
    table = np.stack([a, b], axis=1)  # [seeds, 2]: the pair stays together in every resample
    ratio = lambda means: _log(means[:, 0]) - _log(means[:, 1])  # noqa: E731
    est, lo, hi = _bootstrapped(ratio, table, rng)
    return Estimate(est, lo, hi, len(table), (float("nan"), float("nan")), "log-ratio-of-seed-means+seed-bootstrap-t")


# ----------------------------------------------------------------------------------------------
# verdicts

ROUNDING = 1e-9  # relative: an exact power law's slope is -0.9999999999999988, not a departure

BOUND_VERDICTS = ("within", "violated", "inconclusive")
EQUALITY_VERDICTS = ("consistent", "steeper", "shallower", "inconclusive")


def _wide(estimate: float, ci_low: float, ci_high: float, limit: float) -> bool:
    return not np.isfinite([estimate, ci_low, ci_high]).all() or (ci_high - ci_low) / 2 > limit


def bound_verdict(theory: float, estimate: float, ci_low: float, ci_high: float, tolerance: float, limit: float) -> str:
    """An upper bound on the exponent: `within` when the whole interval is at or below theory +
    tolerance, `violated` when the whole interval is above it, `inconclusive` when it straddles it
    or its half-width exceeds `limit` (or there is no estimate)."""
    if _wide(estimate, ci_low, ci_high, limit):
        return "inconclusive"
    edge = theory + tolerance + ROUNDING * max(1.0, abs(theory))
    return "within" if ci_high <= edge else "violated" if ci_low > edge else "inconclusive"


def equality_verdict(theory: float, estimate: float, ci_low: float, ci_high: float, tolerance: float, limit: float) -> str:
    """A predicted value: `consistent` when the whole interval lies within theory +- tolerance,
    `steeper` (further from 0 than predicted; for theory <= 0, below it) or `shallower` when the
    whole interval lies beyond one side, `inconclusive` otherwise or when its half-width exceeds
    `limit`. An equivalence test: a wide interval that contains the theory is not evidence for it."""
    if _wide(estimate, ci_low, ci_high, limit):
        return "inconclusive"
    tol = tolerance + ROUNDING * max(1.0, abs(theory))
    if theory - tol <= ci_low and ci_high <= theory + tol:
        return "consistent"
    below, above = ci_high < theory - tol, ci_low > theory + tol
    if below or above:
        return "steeper" if below == (theory <= 0) else "shallower"
    return "inconclusive"


def rate_ratio(theory: float, ci_low: float, ci_high: float) -> tuple[float, float]:
    """The interval of log rho / log rho_theory for a rate interval (1 = the predicted rate, > 1 faster)."""
    if not 0 < theory < 1:
        return float("nan"), float("nan")
    return float(np.log(ci_high) / np.log(theory)), float(np.log(ci_low) / np.log(theory))


def rate_verdict(theory: float, estimate: float, ci_low: float, ci_high: float, tolerance: float, limit: float) -> str:
    """A fitted rate against the predicted one, on the ratio r = log rho / log rho_theory:
    `consistent` when |r - 1| <= tolerance over the whole interval, `steeper` (faster) or
    `shallower` (slower) when the whole interval lies beyond, `inconclusive` otherwise, when the
    interval of r is wider than +-limit, or when the prediction is not a contraction."""
    lo, hi = rate_ratio(theory, ci_low, ci_high)
    middle = float(np.log(estimate) / np.log(theory)) if 0 < theory < 1 and estimate > 0 else float("nan")
    if _wide(middle, lo, hi, limit):
        return "inconclusive"
    tol = tolerance + ROUNDING
    if 1 - tol <= lo and hi <= 1 + tol:
        return "consistent"
    return "steeper" if lo > 1 + tol else "shallower" if hi < 1 - tol else "inconclusive"
