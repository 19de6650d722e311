"""Benchmark: the analysis fits, as `icl-study fit` runs them, against their naive forms.

Synthetic groups of the quickstart's shape (S seeds x 6 levels of y = 2 x^-1 (1 - 25/x) (1 + noise));
in one run, on the same groups:

- `power law`: `analysis.fits.power_law_slope` (all 1000 bootstrap slopes in one matrix product)
  against the loop it replaced (`np.polyfit` on each resample's seed-averaged curve);
- `corrected`: `analysis.fits.exponent`, the leading exponent of y = A x^beta (1 + c/x) (the
  residual profiled over the correction for all 1000 resamples at once, refined by golden section)
  against a `scipy.optimize.least_squares` loop over the resamples with the same bound on c, on the
  first `--corrected-groups` groups (the loop takes about a second a group);
- with `--store DIR`: `analysis.verdicts.evaluate` on a real store, end to end (seconds; the fits
  table rows it produced).

Ratios are measured side by side in one run; the machine may be shared and noisy.

    .venv/bin/python benchmarks/fits.py
    .venv/bin/python benchmarks/fits.py --store results --out results/bench_fits.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from report import emit
from scipy import optimize

from analysis import fits, laws


def groups(n: int, seeds: int, levels: tuple[float, ...], rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
    out = []
    for _ in range(n):
        x = np.tile(np.array(levels), seeds)
        s = np.repeat(np.arange(seeds), len(levels))
        y = laws.corrected_power_law(x, np.log(2.0), -1.0, -25.0) * np.exp(0.05 * rng.standard_normal(len(x)))
        out.append((x, y, s))
    return out


def loop_power_law(x, y, seed) -> tuple[float, float]:
    """The replaced implementation: one np.polyfit per resample."""
    levels, table = fits._by_seed(x, y, seed)
    rng = np.random.default_rng(0)
    slope = lambda row: np.polyfit(np.log(levels), np.log(row), 1)[0]  # noqa: E731
    boot = np.array([slope(table[rng.integers(0, len(table), len(table))].mean(axis=0)) for _ in range(fits.BOOTSTRAP)])
    return fits._interval(slope(table.mean(axis=0)), boot, len(table))


def least_squares_corrected(x, y, seed) -> tuple[float, float]:
    """The naive form: `scipy.optimize.least_squares` on each resample's seed-averaged log curve,
    (log A, beta, u) with u = c / x_min bounded to [-0.99, 1] as in `fits`, started from the plain
    slope (iterative, local)."""
    levels, table = fits._by_seed(x, y, seed)
    s = levels[0] / levels

    def one(row):
        b0 = float(np.polyfit(np.log(levels), np.log(row), 1)[0])
        resid = lambda p: p[0] + p[1] * np.log(levels) + np.log1p(p[2] * s) - np.log(row)  # noqa: E731
        return optimize.least_squares(resid, x0=(np.log(row[0]) - b0 * np.log(levels[0]), b0, 0.0), bounds=([-np.inf, -10, fits.U_GRID[0]], [np.inf, 10, fits.U_GRID[-1]])).x[1]

    full = one(table.mean(axis=0))
    boot = np.array([one(row) for row in fits._resampled_means(table, np.random.default_rng(0), fits.BOOTSTRAP)])
    return fits._interval(float(full), boot, len(table))


def timed(fn, items) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [fn(*it) for it in items]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--store", type=Path, default=None, help="also time verdicts.evaluate on this store")
    ap.add_argument("--corrected-groups", type=int, default=10, help="groups for the corrected-law comparison (the least_squares loop is slow)")
    ap.add_argument("--quick", action="store_true", help="10 groups, 2 for the corrected-law comparison")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    n = 10 if args.quick else args.groups
    args.corrected_groups = 2 if args.quick else args.corrected_groups
    rng = np.random.default_rng(0)
    plain = groups(n, args.seeds, (50, 100, 200, 400, 800, 1600), rng)

    t_vec, vec = timed(lambda *a: fits.power_law_slope(*a), plain)
    t_loop, loop = timed(loop_power_law, plain)
    same = max(abs(v.ci_low - lo) + abs(v.ci_high - hi) for v, (lo, hi) in zip(vec, loop))
    nc = min(n, args.corrected_groups)
    t_prof, prof = timed(lambda *a: fits.exponent(*a), plain[:nc])
    t_ls, ls = timed(least_squares_corrected, plain[:nc])
    gap = max(abs(w.ci_low - lo) + abs(w.ci_high - hi) for w, (lo, hi) in zip(prof, ls))
    results = {
        "groups": n,
        "seeds": args.seeds,
        "power_law": {"vectorised_s": t_vec, "loop_s": t_loop, "speedup": t_loop / t_vec, "max_interval_difference": same},
        "corrected": {"groups": nc, "profiled_s": t_prof, "least_squares_s": t_ls, "speedup": t_ls / t_prof, "max_interval_difference": gap},
    }
    table = [
        f"analysis fits on {n} synthetic groups of {args.seeds} seeds x 6 levels",
        "",
        "| fit | this code | naive | speed-up |",
        "|---|---:|---:|---:|",
        f"| power law, {fits.BOOTSTRAP} resamples | {t_vec / n * 1e3:.2f} ms/group | {t_loop / n * 1e3:.2f} ms/group (loop) | {t_loop / t_vec:.0f}x |",
        f"| corrected power law (plain slope included), {fits.BOOTSTRAP} resamples | {t_prof / nc * 1e3:.1f} ms/group | {t_ls / nc * 1e3:.0f} ms/group (least_squares loop) | {t_ls / t_prof:.0f}x |",
        "",
        f"Interval ends: vectorised and loop agree to {same:.1e}; profiled and least_squares corrected fits to {gap:.1e} (summed over both ends).",
    ]
    if args.store:
        from analysis.load import load
        from analysis.verdicts import evaluate

        t0 = time.perf_counter()
        tables = load(args.store).tables
        t1 = time.perf_counter()
        rows, skipped = evaluate(tables)
        t2 = time.perf_counter()
        results["store"] = {"load_s": t1 - t0, "evaluate_s": t2 - t1, "fits": len(rows), "skipped": len(skipped)}
        table.append(f"\n`verdicts.evaluate` on {args.store}: load {t1 - t0:.2f} s, evaluate {t2 - t1:.2f} s ({len(rows)} fits, {len(skipped)} skips).")
    emit("fits", {**vars(args), "store": str(args.store), "out": str(args.out)}, results, "\n".join(table), args.out)


if __name__ == "__main__":
    main()
