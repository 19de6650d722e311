"""Fits of the laws with uncertainty, and the verdicts (theory.md section 5); numpy, and scipy.special
for the t quantile (imported when first needed).

Estimates, each with a 95% interval: estimate +- t_{S-1} se over S seeds, se the standard deviation
of a bootstrap that resamples seeds (the independent unit) times sqrt(S / (S - 1)) (`_interval`);
`rate` and `curve_deviation` say their own:
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
from functools import lru_cache

import numpy as np

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
    """The seed-averaged curve of `reps` resamples of the seeds (rows) with replacement: [reps, levels].

    With 2 or more levels and fewer than 8 seeds, numpy's `table[draws].mean(axis=1)` adds the drawn
    rows one after the other (the levels are its inner loop; a pairwise sum of fewer than 8 is that
    sum too) and divides by the number of seeds: the same sum of the drawn rows, without the [reps,
    seeds, levels] array, is the same number (tests/test_fits.py checks it against `mean(axis=1)`).
    """
    n = table.shape[0]
    draws = rng.integers(0, n, size=(reps, n))
    if table.ndim != 2 or table.shape[1] < 2 or n >= 8:
        return table[draws].mean(axis=1)
    total = table[draws[:, 0]]
    for i in range(1, n):
        total += table[draws[:, i]]
    return total / n


def _finite(boot: np.ndarray) -> np.ndarray:
    """The resamples whose fit succeeded; too many failures is a FitError, not a narrow interval."""
    return _finite_rows(boot[:, None])[:, 0]


def _finite_rows(boot: np.ndarray) -> np.ndarray:
    """`_finite` for resamples of several values each ([reps, k]): a resample fails as a whole."""
    ok = np.isfinite(boot).all(axis=1)
    if (~ok).sum() > FAILED_SHARE * len(boot):
        raise FitError(f"the fit failed on {int((~ok).sum())} of {len(boot)} bootstrap resamples (a mean at or below 0)")
    return boot[ok]


def _interval(estimate: float, boot: np.ndarray, seeds: int) -> tuple[float, float]:
    """estimate +- t_{S-1} se, se the bootstrap's standard deviation scaled by sqrt(S / (S - 1)).

    A percentile interval from a bootstrap over S = 2-4 seeds is far too narrow (coverage about
    50-80%); with the t quantile and the small-sample correction the coverage is near nominal for
    every S (tests/test_fits.py measures it).
    """
    se = float(np.std(boot, ddof=1)) * np.sqrt(seeds / (seeds - 1))
    half = t_quantile(seeds - 1) * se
    if not np.isfinite(half):
        raise FitError("no finite interval")
    return estimate - half, estimate + half


# scipy.stats.t.ppf(0.975, df) for df = 1..100, as scipy computes it (scipy.special.stdtrit, bit for
# bit: tests/test_fits.py checks every one against scipy): the intervals need no scipy import (half a
# second, more than all the fits of a small store)
T_975 = (
    12.706204736174694, 4.302652729749462, 3.1824463052837078, 2.7764451051977934, 2.5705818356363146,
    2.4469118511449786, 2.364624251592784, 2.306004135204166, 2.262157162798205, 2.228138851986274,
    2.200985160091639, 2.1788128296672284, 2.1603686564627913, 2.144786687917804, 2.131449545559776,
    2.1199052992212546, 2.1098155778333156, 2.1009220402410382, 2.0930240544083087, 2.085963447265864,
    2.0796138447276795, 2.0738730679040254, 2.0686576104190486, 2.0638985616280245, 2.0595385527532972,
    2.0555294386428735, 2.0518305164802846, 2.0484071417952454, 2.045229642132703, 2.0422724563012378,
    2.039513446396408, 2.0369333434601016, 2.0345152974493383, 2.0322445093177186, 2.030107928250343,
    2.0280940009804502, 2.0261924630291093, 2.0243941639119694, 2.022690920036761, 2.021075390306273,
    2.019540970441376, 2.0180817028184443, 2.016692199227824, 2.0153675744437636, 2.014103388880846,
    2.012895598919429, 2.0117405137297655, 2.010634757624232, 2.0095752371292392, 2.008559112100761,
    2.007583770315836, 2.006646805061688, 2.0057459953178687, 2.0048792881880564, 2.0040447832891455,
    2.003240718847872, 2.002465459291007, 2.0017174841452356, 2.000995378088267, 2.0002978220142604,
    1.999623584994939, 1.9989715170333788, 1.998340542520741, 1.997729654317693, 1.9971379083920038,
    1.9965644189523117, 1.996008354025296, 1.9954689314298435, 1.9949454151072374, 1.994437111771186,
    1.9939433678456255, 1.9934635666618719, 1.992997125889855, 1.992543495180932, 1.9921021540022417,
    1.9916726096446642, 1.9912543953883846, 1.9908470688116906, 1.9904502102301285, 1.990063421254446,
    1.9896863234569029, 1.989318557136572, 1.9889597801751624, 1.9886096669757083, 1.9882679074772216,
    1.98793420623902, 1.9876082815890708, 1.9872898648311692, 1.986978699506281, 1.9866745407037683,
    1.9863771544186177, 1.98608631695113, 1.9858018143458227, 1.985523441866604, 1.9852510035054978,
    1.984984311522457, 1.9847231860139845, 1.9844674545084815, 1.9842169515864174, 1.9839715185235518,
)


@lru_cache(maxsize=None)
def t_quantile(df: int, level: float = LEVEL) -> np.float64:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom: scipy.stats'
    `t.ppf((1 + level) / 2, df)`, the same number, from `T_975` or else scipy.special.stdtrit (what
    t.ppf calls), imported only then; NaN unless df > 0, as t.ppf."""
    if not df > 0:
        return np.float64(np.nan)
    if level == LEVEL and df == int(df) and df <= len(T_975):
        return np.float64(T_975[int(df) - 1])
    from scipy.special import stdtrit

    return np.float64(stdtrit(df, (1 + level) / 2))


def _linregress(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """slope, its standard error and r of the least-squares line, as scipy.stats.linregress
    computes them (the same operations: np.cov with bias=1, r clipped to [-1, 1]), except for a
    flat y: there scipy's r and standard error are NaN, here the standard error is 0 (the line fits
    exactly: a stalled GD curve is a rate of exactly 1, not an unknown one)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.size == 0 or y.size == 0:
        raise ValueError("Inputs must not be empty.")
    if np.amax(x) == np.amin(x) and len(x) > 1:
        raise ValueError("Cannot calculate a linear regression if all x values are identical")
    n = len(x)
    ssxm, ssxym, _, ssym = np.cov(x, y, bias=1).flat
    if ssxm == 0.0 or ssym == 0.0:
        r = np.asarray(np.nan if ssxym == 0 else 0.0)[()]
    else:
        r = ssxym / np.sqrt(ssxm * ssym)
        if r > 1.0:
            r = 1.0
        elif r < -1.0:
            r = -1.0
    slope = ssxym / ssxm
    stderr = 0.0 if n == 2 or ssym == 0.0 else np.sqrt((1 - r**2) * ssym / ssxm / (n - 2))
    return slope, stderr, r


def _bootstrapped(statistic, table: np.ndarray, rng: np.random.Generator | None) -> tuple[float, float, float]:
    """A statistic of the seed-averaged curve (rows -> values) with its seed-bootstrap t interval."""
    estimate = _checked(statistic(table.mean(axis=0)[None])[0])
    return _with_interval(estimate, statistic(_resampled_means(table, rng or np.random.default_rng(0), BOOTSTRAP)), len(table))


def _checked(estimate) -> float:
    estimate = float(estimate)
    if not np.isfinite(estimate):
        raise FitError("the fit fails on the seed-averaged curve (a mean at or below 0)")
    return estimate


def _with_interval(estimate: float, boot: np.ndarray, seeds: int) -> tuple[float, float, float]:
    return (estimate, *_interval(estimate, _finite(boot), seeds))


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
    """(beta, u) of y = A x^beta (1 + u (x_min / x)^gamma), |u| <= 1, fitted to each row of curves
    [R, L]: [R, 2].

    Variable projection: for fixed u the law is linear in (log A, beta), so the residual is scanned
    over u on `U_GRID` for every row at once and the best grid step refined by golden section.
    Global over u, no starting point. NaN where a row is not positive.

    Each row's fit is its own (elementwise arithmetic, reductions along a row's levels, one matrix-
    vector product per row of the same shape whatever the number of rows), so a row that repeats
    (a bootstrap over a few seeds draws the same resample many times) is fitted once, and the rows
    are fitted together in blocks of `BLOCK`; the answer is the same, bit for bit, as a row alone.
    """
    curves = np.asarray(curves, dtype=float)
    if curves.ndim != 2 or len(curves) < 2:
        return _corrected_block(levels, curves, gamma)
    keys = np.ascontiguousarray(curves).view(np.dtype((np.void, curves.itemsize * curves.shape[1])))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    unique = curves[first]
    fitted = np.concatenate([_corrected_block(levels, unique[i : i + BLOCK], gamma) for i in range(0, len(unique), BLOCK)])
    return fitted[inverse.reshape(-1)]


BLOCK = 512  # rows fitted at once: bounded temporaries, [rows, grid, levels]


def _corrected_block(levels: np.ndarray, curves: np.ndarray, gamma: float) -> np.ndarray:
    lx = np.log(levels) - np.log(levels).mean()
    sxx = lx @ lx
    ly = _log(curves)
    s = (levels[0] / levels) ** gamma

    def fit(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # u [R, K] -> beta, rss [R, K]
        return _projected(ly[:, None, :] - np.log1p(u[..., None] * s))

    def _projected(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = z - z.mean(axis=-1, keepdims=True)
        b = z @ lx / sxx
        return b, (z * z).sum(-1) - b * b * sxx

    # the scan's log1p(u s) is the same for every row: once per grid point, not once per row
    g = _scan_argmin(ly, np.log1p(U_GRID[:, None] * s), lx, sxx, _projected)
    step = U_GRID[1] - U_GRID[0]
    lo, hi = np.maximum(U_GRID[g] - step, U_GRID[0]), np.minimum(U_GRID[g] + step, U_GRID[-1])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(GOLDEN):
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fc, fd = fit(np.stack([c, d], axis=1))[1].T
        hi, lo = np.where(fc < fd, d, hi), np.where(fc < fd, lo, c)
    u = (lo + hi) / 2
    beta, _ = fit(u[:, None])
    return np.stack([np.where(np.isfinite(ly).all(axis=1), beta[:, 0], np.nan), u], axis=1)


def _pinned(u: np.ndarray) -> np.ndarray:
    """Whether a fitted correction u sits at an end of its range (within a grid step): there the
    correction would be larger than the leading term at the window's start (or y there near 0), so
    the window is not asymptotic and beta is biased by the bound, every resample at the same bound
    (a narrow, wrong interval)."""
    step = U_GRID[1] - U_GRID[0]
    return (u <= U_GRID[0] + step) | (u >= U_GRID[-1] - step)


SCAN_SLACK = 1e-10  # relative to L^2 (1 + Z^2): the bound used on |approximate - computed residual|


def _scan_argmin(ly: np.ndarray, table: np.ndarray, lx: np.ndarray, sxx: float, projected) -> np.ndarray:
    """The grid step of least residual for each row: `np.argmin` of the residuals
    `projected(ly[:, None, :] - table)[1]` (non-finite ones as inf), without computing them all.

    The residual at grid step g is |c|^2 - (c . lx)^2 / sxx with c = a - t_g, a and t_g the centred
    rows of ly and of the table: expanded, it is a matrix product for all rows and steps at once.
    In floating point the expansion and the direct computation each stay within a few tens of
    L^2 eps Z^2 of the exact residual (Z = max |ly| + max |table|, eps = 2^-53; measured: below
    0.2 L^2 eps Z^2), and `SCAN_SLACK` L^2 (1 + Z^2) is about 10^6 L^2 eps Z^2. A row whose
    approximate minimum is below every other step's by more than twice that has its argmin there,
    the same as the direct computation's; the other rows (near-ties, non-finite values) get the
    direct computation. The argmin is the same as scanning every row directly.
    """
    L = ly.shape[1]
    with np.errstate(invalid="ignore", over="ignore"):
        a = ly - ly.mean(axis=1, keepdims=True)
        t = table - table.mean(axis=1, keepdims=True)
        approx = (a * a).sum(axis=1)[:, None] - 2 * (a @ t.T) + (t * t).sum(axis=1) - ((a @ lx)[:, None] - t @ lx) ** 2 / sxx
        slack = SCAN_SLACK * L * L * (1 + (np.abs(ly).max(axis=1) + np.abs(table).max()) ** 2)
        best = np.argmin(approx, axis=1)
        near = (approx <= (approx[np.arange(len(ly)), best] + 2 * slack)[:, None]).sum(axis=1)
    direct = np.flatnonzero(~(np.isfinite(approx).all(axis=1) & np.isfinite(ly).all(axis=1) & (near == 1)))
    if len(direct):
        _, scan = projected(ly[direct, None, :] - table)
        best[direct] = np.argmin(np.where(np.isfinite(scan), scan, np.inf), axis=1)
    return best


def _check(x: np.ndarray, seed: np.ndarray, need: int) -> None:
    if len(np.unique(x)) < need:
        raise FitError(f"needs at least {need} distinct x values, got {len(np.unique(x))}")
    if len(np.unique(seed)) < 2:
        raise FitError("needs at least 2 seeds for a bootstrap interval")
    if np.any(x <= 0):
        raise FitError("a log-log fit needs x > 0")


def power_law_slope(x, y, seed, rng: np.random.Generator | None = None) -> Estimate:
    """Slope b of log y = a + b log x on the seed-averaged curve, with its seed-bootstrap t interval."""
    x, y, seed = (np.asarray(v, dtype=float) for v in (x, y, seed))
    _check(x, seed, 3)
    levels, table = _by_seed(x, y, seed)
    if np.any(table.mean(axis=0) <= 0):
        raise FitError("a log-log fit needs a positive mean at every x")
    est, lo, hi = _bootstrapped(lambda c: _loglog_slopes(levels, c), table, rng)
    return Estimate(est, lo, hi, len(levels), (float(levels[0]), float(levels[-1])), "loglog-ols+seed-bootstrap-t", plain=est)


def exponent(x, y, seed, correction: float | None = 1.0, floor=None, rng: np.random.Generator | None = None) -> Estimate:
    """The leading exponent beta of y = A x^beta (1 + c x^-correction) on the seed-averaged curve,
    with its seed-bootstrap t interval, and the plain log-log slope beside it (`plain`).

    `correction` None fits the plain slope alone (an equality on a window where the corrections are
    small, or an x with too few levels by design).
    With fewer than `MIN_CORRECTED` levels the estimate is NaN (no verdict can rest on it) and the
    note says so. `floor` (per point, e.g. each seed's value at x = inf) is subtracted first.
    """
    fit = exponents([(x, y, seed, correction, floor)], rng)[0]
    if isinstance(fit, FitError):
        raise fit
    return fit


def _exponent_start(x, y, seed, correction: float | None, floor, rng: np.random.Generator | None) -> Estimate | tuple:
    """`exponent` up to the corrected law's bootstrap: the Estimate when there is no corrected law
    to fit, else (levels, seeds x levels table, plain slope, the generator, its next draws the
    corrected law's resamples)."""
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
    return levels, table, (plain, plo, phi), rng


FAILED_SHARE = 0.1  # of the bootstrap resamples whose fit may fail before the interval is not trusted


def _corrected_estimate(levels: np.ndarray, correction: float, plain: tuple[float, float, float], fitted: np.ndarray, seeds: int) -> Estimate:
    """The corrected law's Estimate from its fits (beta, u) to the seed-averaged curve (fitted[0])
    and to the resamples; NaN with a note where the correction sits at its bound (`_pinned`) on that
    curve or on more than `FAILED_SHARE` of the resamples (the interval uses every resample's beta)."""
    window = (float(levels[0]), float(levels[-1]))
    method = f"corrected-power-law(x^-{correction:g})+seed-bootstrap-t"
    at_bound = _pinned(fitted[:, 1])
    n = int(at_bound[1:].sum())
    if at_bound[0] or n > FAILED_SHARE * (len(fitted) - 1):
        where = "on the seed-averaged curve" if at_bound[0] else f"on {n} of {len(fitted) - 1} bootstrap resamples"
        note = (
            f"the corrected law's correction sits at its bound {where}: at x = {window[0]:g} it would exceed the leading term, "
            f"so the window is not asymptotic; the plain slope is {plain[0]:.3f} [{plain[1]:.3f}, {plain[2]:.3f}]"
        )
        return Estimate(np.nan, np.nan, np.nan, len(levels), window, method, plain=plain[0], note=note)
    est, lo, hi = _with_interval(_checked(fitted[0, 0]), fitted[1:, 0], seeds)
    return Estimate(est, lo, hi, len(levels), window, method, plain=plain[0])


def exponents(requests: list[tuple], rng: np.random.Generator | None = None) -> list[Estimate | FitError]:
    """`exponent(x, y, seed, correction, floor)` of each request (each with its own generator,
    default_rng(0), or `rng` for all: `exponent` passes its own), the Estimate or the FitError in
    its place.

    The same numbers as one call per request: the corrected law is fitted to the seed-averaged
    curve and the resamples of every request with the same levels and correction in one
    `_corrected_fits` (a row's fit is its own, whatever the rows beside it), which saves the fixed
    cost of a fit (the grid scan and golden-section steps) per request.
    """
    out: list[Estimate | FitError | None] = []
    pending: dict[tuple, list] = {}
    for x, y, seed, correction, floor in requests:
        try:
            start = _exponent_start(x, y, seed, correction, floor, rng)
        except FitError as err:
            out.append(err)
            continue
        if isinstance(start, Estimate):
            out.append(start)
            continue
        levels, table, plain, own = start
        rows = np.concatenate([table.mean(axis=0)[None], _resampled_means(table, own, BOOTSTRAP)])
        pending.setdefault((levels.tobytes(), float(correction)), []).append((len(out), levels, correction, plain, len(table), rows))
        out.append(None)
    for batch in pending.values():
        levels, correction = batch[0][1], batch[0][2]
        beta = _corrected_fits(levels, np.concatenate([b[-1] for b in batch]), correction)
        at = 0
        for i, levels, correction, plain, seeds, rows in batch:
            fitted, at = beta[at : at + len(rows)], at + len(rows)
            try:
                out[i] = _corrected_estimate(levels, correction, plain, fitted, seeds)
            except FitError as err:
                out[i] = err
    return out


def largest_increase(x, y, seed, rng: np.random.Generator | None = None) -> Estimate:
    """The largest step-to-step increase of log y along x on the seed-averaged curve (<= 0 for a
    non-increasing curve), with a simultaneous interval: every step's increase gets its
    seed-bootstrap t interval at level 1 - (1 - LEVEL) / steps (Bonferroni), and the largest true
    increase lies in [the largest lower end, the largest upper end] with probability LEVEL, whichever
    step it is. (A bootstrap-t interval about the largest observed increase, as before, is centred
    on a maximum of noisy steps, biased up: a flat curve was never `within` a bound of 0 and was
    `violated` in 2-5% of draws.)"""
    x, y, seed = (np.asarray(v, dtype=float) for v in (x, y, seed))
    _check(x, seed, 3)
    levels, table = _by_seed(x, y, seed)
    if np.any(table.mean(axis=0) <= 0):
        raise FitError("needs a positive mean at every x")
    steps = np.diff(_log(table.mean(axis=0)), axis=-1)
    boot = np.diff(_log(_resampled_means(table, rng or np.random.default_rng(0), BOOTSTRAP)), axis=-1)
    boot = _finite_rows(boot)
    S = len(table)
    se = np.std(boot, axis=0, ddof=1) * np.sqrt(S / (S - 1))
    half = t_quantile(S - 1, 1 - (1 - LEVEL) / len(steps)) * se
    if not np.isfinite(half).all():
        raise FitError("no finite interval")
    window = (float(levels[0]), float(levels[-1]))
    return Estimate(float(steps.max()), float((steps - half).max()), float((steps + half).max()), len(levels), window, "max-log-increase+bonferroni-seed-bootstrap-t")


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
    slope, stderr, r = _linregress(t, np.log(v))
    q = t_quantile(len(t) - 2)
    lo, hi = slope - q * stderr, slope + q * stderr
    late = t >= t[len(t) // 2]  # at least 2 of the >= 3 points
    s_late = float(np.polyfit(t[late], np.log(v[late]), 1)[0])
    lo, hi = min(lo, s_late), max(hi, s_late)
    power = 0.5 if squared else 1.0
    rho = lambda s: float(np.exp(power * s))  # noqa: E731
    return Estimate(rho(slope), rho(lo), rho(hi), len(t), (float(t[0]), float(t[-1])), "log-linear-ols+late-half", float(r**2))


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
