"""Compare two stores' `fits` tables: the before/after check of a change that must not move the science.

Both stores hold the same sweep, run and fitted by two checkouts (e.g. `benchmarks/quickstart.py
--keep DIR --root ROOT` for each, which also runs `icl-study fit`). The fits are matched on
(family, claim, group, x, metric, run_id, M); the script reports whether the two tables have the
same rows, verdicts, point counts and exclusions, whether the skipped claims are the same, and per
claim the largest absolute difference of `estimate`, `ci_low` and `ci_high`. Exit status 1 if the
rows, verdicts or skips differ, or an estimate differs by more than `--tol` (default 1e-9), else 0.

    .venv/bin/python benchmarks/compare_fits.py STORE_BEFORE STORE_AFTER [--tol 1e-9]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

KEYS = ["family", "claim", "group", "x", "metric", "run_id", "M"]


def load(store: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fits (family from the partition directory) and the skipped claims of a local store."""
    parts = [p for p in sorted((store / "fits").glob("family=*/**/*.parquet"))]
    fits = pd.concat([pd.read_parquet(p).assign(family=p.relative_to(store / "fits").parts[0].split("=", 1)[1]) for p in parts])
    skipped = sorted((store / "fits").glob("_skipped*.parquet")) + sorted((store / "fits").glob("_skipped/**/*.parquet"))
    return fits.set_index([k for k in KEYS if k in fits.columns]).sort_index(), pd.concat([pd.read_parquet(p) for p in skipped]) if skipped else pd.DataFrame()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--tol", type=float, default=1e-9, help="largest allowed absolute difference of an estimate")
    a = ap.parse_args(argv)
    (fa, sa), (fb, sb) = load(a.before), load(a.after)
    same_rows = fa.index.equals(fb.index)
    print(f"fits: {len(fa)} before, {len(fb)} after; same rows: {same_rows}")
    if not same_rows:
        return 1
    same = {c: bool((fa[c].astype(str).values == fb[c].astype(str).values).all()) for c in ("verdict", "n_points", "excluded", "window")}
    print("same " + ", ".join(f"{c}: {v}" for c, v in same.items()))
    norm = lambda t: t.astype(str).sort_values(list(t.columns)).reset_index(drop=True)  # noqa: E731
    same_skips = norm(sa).equals(norm(sb))
    print(f"same skipped claims: {same_skips}")
    diff = pd.DataFrame({c: (fa[c].astype(float) - fb[c].astype(float)).abs() for c in ("estimate", "ci_low", "ci_high")})
    per_claim = diff.groupby(level="claim").max().sort_values("estimate", ascending=False)
    print("largest absolute differences per claim:")
    print(per_claim.to_string(float_format=lambda v: f"{v:.2e}"))
    worst = float(diff["estimate"].max())
    ok = all(same.values()) and same_skips and not worst > a.tol
    print(f"largest estimate difference {worst:.2e} against tol {a.tol:.0e}: {'ok' if ok else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
