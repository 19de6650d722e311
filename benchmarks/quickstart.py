"""Benchmark: the shipped default study (`icl-study run quickstart`) end to end, as a user runs it.

Runs, each as a fresh process with this interpreter (`python -c "from pipelines.cli import app;
app()" ...`, which is what the `icl-study` entry point does) and a fresh temporary store:

1. `run quickstart --store TMP`: the whole sweep on the embedded local Ray (all cores, one
   trial per bundle, one torch thread per trial), timed from process start to exit (wall);
2. `fit --store TMP` and `report --store TMP`, each timed the same way: with (1) they are the
   study part of the README's main command (run + fit + report; the set-up is the install);
3. `plan quickstart --store TMP` on the now complete store (import, sweep validation, store
   scan; it calibrates only if the cache has no calibration for this code version);
4. `run quickstart --store TMP` again: "nothing to run" (import, validation, store scan).

(3) and (4) are the fixed cost of the CLI and the store scan. `--root ROOT` runs another
checkout's CLI (`PYTHONPATH=ROOT`, e.g. an older commit in a `git worktree`), so that running the
script twice back to back gives a before/after on the same machine state. Then the store's `trials` table is
read with pandas: its `wall_s` is each run's equal share of its bundle's wall time (training,
optimum, evaluation; not the Parquet write), so the sum over runs is the trial compute. With
cpus = os.cpu_count() cores (the embedded Ray's default), ideal wall = compute / cpus, and the
overhead share 1 - ideal / wall is what Ray start-up and scheduling, worker processes and their
imports, Parquet I/O and load imbalance at the end cost. The longest bundle is a lower bound on
the wall whatever the scheduling. The machine may be shared and noisy: the shares are ratios
measured in one run, the seconds are not comparable across runs.

Run from the repository root (about 3 minutes on 2 cores):

    .venv/bin/python benchmarks/quickstart.py
    .venv/bin/python benchmarks/quickstart.py --out results/bench_quickstart.json
    .venv/bin/python benchmarks/quickstart.py --keep results/quickstart-bench   # keep the store there
    .venv/bin/python benchmarks/quickstart.py --root /tmp/before                # another checkout's code
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

from report import emit

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from pipelines.cli import app; app()"]


def cli(*args: str, root: Path = ROOT) -> tuple[float, str]:
    """Run `icl-study ARGS` of the checkout `root` in a fresh process; returns (wall seconds, stdout). Fails loudly."""
    t0 = time.perf_counter()
    p = subprocess.run([*CLI, *args], cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"icl-study {' '.join(args)}: exit status {p.returncode}")
    return wall, p.stdout


def trial_stats(store: Path) -> dict:
    """Counts and compute from the store's trials table (pandas)."""
    from pipelines.store import Store

    trials = Store(store).read("trials", ["run_id", "bundle_id", "status", "wall_s"]).to_pandas()
    bundles = trials.groupby("bundle_id")["wall_s"].sum()  # each run holds an equal share of its bundle's wall
    return {
        "runs": len(trials),
        "status": {k: int(v) for k, v in trials["status"].value_counts().items()},
        "bundles": int(bundles.size),
        "compute_s": float(trials["wall_s"].sum()),
        "bundle_s_mean": float(bundles.mean()),
        "bundle_s_max": float(bundles.max()),
        "bundle_s_min": float(bundles.min()),
    }


def markdown(r: dict) -> str:
    t = r["trials"]
    lines = [
        f"`icl-study run quickstart` end to end: {t['runs']} runs in {t['bundles']} bundles "
        f"({', '.join(f'{v} {k}' for k, v in t['status'].items())}), embedded Ray on {r['cpus']} CPUs, fresh store",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| wall time, `run quickstart` (process start to exit) | {r['wall_s']:.1f} s |",
        f"| trial compute (sum of `trials.wall_s`) | {t['compute_s']:.1f} s |",
        f"| CPUs (os.cpu_count()) | {r['cpus']} |",
        f"| ideal wall = compute / CPUs | {r['ideal_wall_s']:.1f} s |",
        f"| **overhead share = 1 - ideal / wall** | **{r['overhead_share']:.0%}** |",
        f"| bundle wall: mean; min-max | {t['bundle_s_mean']:.1f} s; {t['bundle_s_min']:.1f}-{t['bundle_s_max']:.1f} s |",
        f"| `fit` on the complete store | {r['fit_s']:.1f} s |",
        f"| `report` on the fitted store | {r['report_s']:.1f} s |",
        f"| **the study part of the README's command: run + fit + report** | **{r['wall_s'] + r['fit_s'] + r['report_s']:.1f} s** |",
        f"| `plan quickstart` on the complete store | {r['plan_s']:.1f} s |",
        f"| no-op rerun (`run quickstart`: nothing to run) | {r['noop_s']:.1f} s |",
    ]
    if r.get("cli_done_line"):
        lines += ["", f"The CLI's own summary: `{r['cli_done_line']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="quickstart", help="shipped sweep name or sweep file")
    ap.add_argument("--keep", type=Path, default=None, help="use this (new or empty) store directory and keep it")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    ap.add_argument("--root", type=Path, default=ROOT, help="run another checkout's CLI (e.g. an older commit in a `git worktree`) for a before/after")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        raise SystemExit(f"--keep {args.keep}: not empty; the benchmark needs a fresh store")
    tmp = Path(tempfile.mkdtemp(prefix="icl-bench-")) if args.keep is None else args.keep.absolute()
    try:
        store = str(tmp / "store") if args.keep is None else str(tmp)
        print(f"running icl-study run {args.sweep} --store {store} ...", file=sys.stderr, flush=True)
        wall, out = cli("run", args.sweep, "--store", store, root=root)
        done = [line for line in out.splitlines() if line.startswith("done:")]
        fit_s, _ = cli("fit", "--store", store, root=root)
        report_s, _ = cli("report", "--store", store, root=root)
        plan_s, _ = cli("plan", args.sweep, "--store", store, root=root)
        noop_s, noop_out = cli("run", args.sweep, "--store", store, root=root)
        if "nothing to run" not in noop_out:
            raise SystemExit(f"the rerun found work to do:\n{noop_out}")
        stats = trial_stats(Path(store))
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    cpus = os.cpu_count() or 1
    ideal = stats["compute_s"] / cpus
    res = {
        "sweep": args.sweep, "wall_s": wall, "cpus": cpus, "ideal_wall_s": ideal, "overhead_share": 1 - ideal / wall,
        "fit_s": fit_s, "report_s": report_s, "plan_s": plan_s, "noop_s": noop_s, "trials": stats,
        "cli_done_line": done[-1] if done else None, "root": str(root),
    }
    meta = {"root": str(root), "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    return emit("quickstart", meta, res, markdown(res), args.out)


if __name__ == "__main__":
    main()
