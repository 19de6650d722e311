"""Benchmark: what a sweep of many small configurations spends outside trial compute.

The sweep is issue 9's: 2,000 gmm configurations (d 2-6, c 2-3, 5 snr, 10 N, 4 lr), B = 4096,
300 steps, M {16, 64, inf}, n_eval 512, estimators [bayes, lda_plugin], one seed. It runs as a
user runs it, `icl-study run SWEEP --store TMP` in a fresh process on the embedded local Ray, in
one or more modes:

- `packed`: the defaults (stacks of at most 32 runs, packed into trials of ~10 s of estimated
  compute, at least 32 trials, workers reused);
- `per-config`: one trial per configuration (`bundle_size: 1`, `--trial-seconds 0`), the way
  that gives Ray the most parallel work and pays Tune's per-trial cost the most often.

For each: the process's wall time; the summed trial compute (`trials.wall_s`: training, optimum
and evaluation of every run, not the Parquet write); the share of the machine's time outside trial
compute, 1 - compute / (wall x CPUs); and the worker time per trial beyond its compute,
(wall x CPUs - compute) / trials. `--root` runs another checkout's CLI (e.g. an older commit in a
`git worktree`) with the same sweep, for a before/after in one run. `--grid small` keeps one lr
(500 configurations) for a quicker look.

    .venv/bin/python benchmarks/overhead.py                          # packed, ~4 min on 2 cores
    .venv/bin/python benchmarks/overhead.py --modes packed per-config --grid small
    .venv/bin/python benchmarks/overhead.py --root /tmp/old --modes default --out old.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from report import emit

ROOT = Path(__file__).resolve().parent.parent

GRID = {"d": [2, 3, 4, 5, 6], "c": [2, 3], "snr": [0.5, 1.0, 1.5, 2.0, 3.0], "N": [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560], "lr": [0.1, 0.3, 1.0, 3.0]}
FIXED = {"model": "lsa", "param": "reduced", "B": 4096, "steps": 300, "log_every": 10, "M": [16, 64, "inf"], "n_eval": 512, "estimators": ["bayes", "lda_plugin"]}
MODES = {"packed": ({}, []), "per-config": ({"bundle_size": 1}, ["--trial-seconds", "0"]), "default": ({}, [])}


def sweep_doc(grid: str, mode: str) -> dict:
    g = dict(GRID) if grid == "full" else {**GRID, "lr": [1.0]}
    return {"name": f"overhead-{mode}", "family": "gmm", "fixed": FIXED, "grid": g, "seeds": 1, **MODES[mode][0]}


def measure(root: Path, grid: str, mode: str, tmp: Path) -> dict:
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(sweep_doc(grid, mode)))
    store = tmp / f"store-{mode}"
    cmd = [sys.executable, "-c", "from pipelines.cli import app; app()", "run", str(path), "--store", str(store), *MODES[mode][1]]
    print(f"{mode}: icl-study run ... ({root})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"{mode}: exit status {p.returncode}")
    import pandas as pd

    trials = pd.read_parquet(store / "trials", columns=["run_id", "bundle_id", "wall_s", "status"])
    cpus = os.cpu_count() or 1
    compute = float(trials.wall_s.sum())
    n = int(trials.bundle_id.nunique())
    return {
        "mode": mode, "configurations": len(trials), "trials": n, "wall_s": wall, "compute_s": compute, "cpus": cpus,
        "outside_share": 1 - compute / (wall * cpus), "worker_s_per_trial": (wall * cpus - compute) / n,
        "status": trials.status.value_counts().to_dict(),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | configurations | trials | wall | trial compute | outside trial compute | worker time per trial beyond compute |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['configurations']} | {r['trials']} | {r['wall_s']:.0f} s | {r['compute_s']:.0f} s | **{r['outside_share']:.0%}** | {r['worker_s_per_trial']:.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["packed"], choices=list(MODES))
    ap.add_argument("--grid", default="full", choices=["full", "small"])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose CLI to run (default: this one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="icl-overhead-"))
    try:
        rows = [measure(args.root.absolute(), args.grid, m, tmp) for m in args.modes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return emit("overhead", {"grid": args.grid, "root": str(args.root)}, rows, markdown(rows), args.out)


if __name__ == "__main__":
    main()
