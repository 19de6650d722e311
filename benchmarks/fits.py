"""Benchmark: the analysis fits, as `icl-study fit` runs them, against their naive forms.

Synthetic groups of the quickstart's shape (S seeds x L levels of y = 2 x^-1/2 (1 + noise) + floor);
in one run, on the same groups:

- `power law`: `analysis.fits.power_law_slope` (all 1000 bootstrap slopes in one matrix product)
  against the loop it replaced (`np.polyfit` on each resample's seed-averaged curve);
- `floor`: `analysis.fits.power_law_floor_slope` (the residual profiled over the exponent for all
  1000 resamples at once, refined by golden section) against the `scipy.optimize.curve_fit` loop it
  replaced, on the first `--floor-groups` groups (the loop takes about a second a group);
- with `--store DIR`: `analysis.claims.evaluate` on a real store, end to end (seconds; the fits
  table rows it produced).

Ratios are measured side by side in one run; the machine may be shared and noisy.

    .venv/bin/python benchmarks/fits.py
    .venv/bin/python benchmarks/fits.py --store results --out results/bench_fits.json
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import optimize

from analysis import fits, laws
from report import emit


def groups(n: int, seeds: int, levels: tuple[float, ...], rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
    out = []
    for _ in range(n):
        x = np.tile(np.array(levels), seeds)
        s = np.repeat(np.arange(seeds), len(levels))
        y = laws.power_law_floor(x, 2.0, -0.5, 0.01) * np.exp(0.05 * rng.standard_normal(len(x)))
        out.append((x, y, s))
    return out


def loop_power_law(x, y, seed) -> tuple[float, float]:
    """The replaced implementation: one np.polyfit per resample."""
    levels, table = fits._by_seed(x, y, seed)
    rng = np.random.default_rng(0)
    slope = lambda row: np.polyfit(np.log(levels), np.log(row), 1)[0]  # noqa: E731
    boot = np.array([slope(table[rng.integers(0, len(table), len(table))].mean(axis=0)) for _ in range(fits.BOOTSTRAP)])
    return fits._interval(slope(table.mean(axis=0)), boot, len(table))


def curve_fit_floor(x, y, seed) -> tuple[float, float]:
    """The replaced implementation: `scipy.optimize.curve_fit` on each resample's seed-averaged
    curve, started from its plain power law (iterative, local; about 1 ms a fit)."""
    levels, table = fits._by_seed(x, y, seed)

    def one(row):
        b0 = float(np.clip(np.polyfit(np.log(levels), np.log(row), 1)[0], -4.9, 4.9))
        p, _ = optimize.curve_fit(laws.power_law_floor, levels, row, p0=(row[0] / levels[0] ** b0, b0, 0.0), bounds=([0, -5, 0], [np.inf, 5, np.inf]), maxfev=20000)
        return p[1]

    boot = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = one(table.mean(axis=0))
        for row in fits._resampled_means(table, np.random.default_rng(0), fits.BOOTSTRAP):
            try:
                boot.append(one(row))
            except (ValueError, RuntimeError):
                pass
    return fits._interval(float(full), np.array(boot), len(table))


def timed(fn, items) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [fn(*it) for it in items]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--store", type=Path, default=None, help="also time claims.evaluate on this store")
    ap.add_argument("--floor-groups", type=int, default=10, help="groups for the floor comparison (the curve_fit loop is slow)")
    ap.add_argument("--quick", action="store_true", help="10 groups, 2 for the floor comparison")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    n = 10 if args.quick else args.groups
    args.floor_groups = 2 if args.quick else args.floor_groups
    rng = np.random.default_rng(0)
    plain = groups(n, args.seeds, (10, 20, 40, 80, 160, 320), rng)
    floored = groups(n, args.seeds, (16, 32, 64, 128, 256, 1024), rng)

    t_vec, vec = timed(lambda *a: fits.power_law_slope(*a), plain)
    t_loop, loop = timed(loop_power_law, plain)
    same = max(abs(v.ci_low - lo) + abs(v.ci_high - hi) for v, (lo, hi) in zip(vec, loop))
    nf = min(n, args.floor_groups)
    t_warm, warm = timed(lambda *a: fits.power_law_floor_slope(*a), floored[:nf])
    t_cold, cold = timed(curve_fit_floor, floored[:nf])
    gap = max(abs(w.ci_low - lo) + abs(w.ci_high - hi) for w, (lo, hi) in zip(warm, cold))
    results = {
        "groups": n,
        "seeds": args.seeds,
        "power_law": {"vectorised_s": t_vec, "loop_s": t_loop, "speedup": t_loop / t_vec, "max_interval_difference": same},
        "floor": {"groups": nf, "profiled_s": t_warm, "curve_fit_s": t_cold, "speedup": t_cold / t_warm, "max_interval_difference": gap},
    }
    table = [
        f"analysis fits on {n} synthetic groups of {args.seeds} seeds x 6 levels",
        "",
        "| fit | this code | naive | speed-up |",
        "|---|---:|---:|---:|",
        f"| power law, {fits.BOOTSTRAP} resamples | {t_vec / n * 1e3:.2f} ms/group | {t_loop / n * 1e3:.2f} ms/group (loop) | {t_loop / t_vec:.0f}x |",
        f"| power law with floor, {fits.BOOTSTRAP} resamples | {t_warm / nf * 1e3:.1f} ms/group | {t_cold / nf * 1e3:.0f} ms/group (curve_fit loop) | {t_cold / t_warm:.0f}x |",
        "",
        f"Interval ends: vectorised and loop agree to {same:.1e}; profiled and curve_fit floor fits to {gap:.1e} (summed over both ends).",
    ]
    if args.store:
        from analysis import claims
        from analysis.load import load

        t0 = time.perf_counter()
        tables = load(args.store).tables
        t1 = time.perf_counter()
        rows, skipped = claims.evaluate(tables)
        t2 = time.perf_counter()
        results["store"] = {"load_s": t1 - t0, "evaluate_s": t2 - t1, "fits": len(rows), "skipped": len(skipped)}
        table.append(f"\n`claims.evaluate` on {args.store}: load {t1 - t0:.2f} s, evaluate {t2 - t1:.2f} s ({len(rows)} fits, {len(skipped)} skips).")
    emit("fits", {**vars(args), "store": str(args.store), "out": str(args.out)}, results, "\n".join(table), args.out)


if __name__ == "__main__":
    main()
