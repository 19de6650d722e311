"""Benchmark: the driver's memory over a sweep of 10,000 bundles, run in chunks of Tuner runs.

A trial here does no science: `execute` returns a zero summary at once, so the run measures what
the driver and Tune keep per trial, not what the science costs. The sweep is 10,000 gmm
configurations of one run each (`bundle_size: 1`, `--trial-seconds 0`: one trial per bundle).
A thread samples the driver's resident memory (/proc/self/status, Linux) every 0.2 s; the table gives the peak
during each chunk. Flat peaks across chunks mean the driver's memory does not grow with the
number of finished trials; `--chunk-trials 10000` shows what one Tuner run over everything does.

    .venv/bin/python benchmarks/driver_memory.py                       # 10 chunks of 1000
    .venv/bin/python benchmarks/driver_memory.py --bundles 2000 --chunk-trials 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from report import emit

from pipelines import sweep as sweeps
from pipelines.progress import Progress
from pipelines.runner import run_sweep
from pipelines.store import Store


def noop(payload, store, sweep, code, device):
    return {"runs": len(payload), "ok": len(payload), "diverged": 0, "rows": 0, "wall_s": 0.0}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=int, default=10_000)
    ap.add_argument("--chunk-trials", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=8, help="logical CPUs of the embedded Ray (a no-op trial asks for one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    n = args.bundles
    grid = {"N": list(range(5, 5 + n))}
    sw = sweeps.parse_sweep({"name": "driver-memory", "family": "gmm", "fixed": {"d": 2, "snr": 1.0, "B": 64, "steps": 1, "lr": 0.1, "M": [8], "n_eval": 8}, "grid": grid, "bundle_size": 1})
    bundles = sw.bundles(trial_s=0)
    assert len(bundles) == n, len(bundles)
    store = Store(tempfile.mkdtemp(prefix="icl-drivermem-"))

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_mib()))
            time.sleep(0.2)

    marks: list[float] = []

    class Marking(Progress):
        def finished(self, *a, **k):
            super().finished(*a, **k)
            if self.bundles % args.chunk_trials == 0 or self.bundles == self.total_bundles:
                marks.append(time.perf_counter())

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    progress = Marking(n, n, float(n), every=30.0)
    summary = run_sweep(sw, store, bundles, num_cpus=args.cpus, chunk_trials=args.chunk_trials, execute=noop, progress=progress)
    wall = time.perf_counter() - t0
    stop.set()
    assert summary.ok == n, summary

    rows, start = [], t0
    for k, end in enumerate(marks):
        peak = max((m for t, m in samples if start <= t <= end), default=float("nan"))
        rows.append({"chunk": k, "trials": min(args.chunk_trials, n - k * args.chunk_trials), "seconds": end - start, "peak_rss_mib": peak})
        start = end
    table = [f"{n} no-op trials in chunks of {args.chunk_trials}, embedded Ray with {args.cpus} logical CPUs: {wall:.0f} s wall, {wall / n * 1000:.0f} ms per trial", "",
             "| chunk | trials | seconds | driver peak RSS |", "|---:|---:|---:|---:|"]
    table += [f"| {r['chunk']} | {r['trials']} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} MiB |" for r in rows]
    return emit("driver_memory", {"bundles": n, "chunk_trials": args.chunk_trials, "cpus": args.cpus, "pid": os.getpid()}, {"wall_s": wall, "chunks": rows}, "\n".join(table), args.out)


if __name__ == "__main__":
    main()
