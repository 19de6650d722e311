"""Benchmark: GD steps and whole stacks on the GPU beside the CPU, in the same run.

For each case (a stack of runs of one shape, float64 as the sweeps use):

- `GD step`: one full-batch gradient step of the stack (`study.training.step`), timed over
  `--steps` steps after a warm-up; reported as run-steps per second (members x steps / s);
- `stack`: `study.trial.run_bundle` end to end (sampling, training, the optimum, evaluation).

The CPU runs with `--threads` torch threads (1: what one Ray trial gets by default). On a machine
without CUDA only the CPU column is printed, and the script says so. GPU times synchronise the
device before reading the clock.

    .venv/bin/python benchmarks/gpu.py                  # about a minute on a CPU-only machine
    .venv/bin/python benchmarks/gpu.py --out results/bench_gpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from report import emit

from study.config import Run, TrialConfig
from study.models import LSA
from study.training import init_params, step
from study.trial import _cov, run_bundle

GMM = dict(family="gmm", c=3, snr=1.0, N=100, lr=1.0, log_every=10, M=[16, 64, "inf"], n_eval=512, estimators=["bayes", "lda_plugin"])
CASES = {
    "gmm reduced d=4, B=16384, 24 runs (quickstart)": (dict(GMM, d=4, B=16384, steps=300), 24),
    "gmm reduced d=16, B=4096, 16 runs": (dict(GMM, d=16, B=4096, steps=100), 16),
    "gmm reduced d=32, B=4096, 16 runs": (dict(GMM, d=32, B=4096, steps=100), 16),
    "gmm full d=16, B=4096, 16 runs": (dict(GMM, d=16, B=4096, steps=50, param="full"), 16),
    "mor reduced d=4, B=8192, 12 runs (quickstart)": (
        dict(family="mor", d=4, K=2, snr=5.0, sigma=0.5, N=40, lr=0.5, B=8192, steps=300, log_every=5, M=[8, 32, 128, 512, "inf"], n_eval=512, estimators=["oracle", "ols", "ridge", "lsa_opt", "em"]),
        12,
    ),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(runs: list[Run], device: str, steps: int) -> float:
    """Run-steps per second of the stack's GD step."""
    prob, init = LSA.problem(runs, [_cov(r.config) for r in runs], device)
    params = init if init is not None else init_params(prob, "reduced")
    step(params, prob)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(params, prob)
    sync(device)
    return len(runs) * steps / (time.perf_counter() - t0)


def time_stack(runs: list[Run], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    run_bundle(runs, device)
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-stack", action="store_true", help="time the GD step only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name, (flat, n) in CASES.items():
        runs = [Run(TrialConfig.from_flat(flat), seed) for seed in range(n)]
        row = {"case": name}
        for dev in devices:
            row[f"{dev}_run_steps_s"] = time_steps(runs, dev, args.steps)
            if not args.no_stack:
                run_bundle(runs[:1], dev)  # warm-up of the whole path on this device
                row[f"{dev}_stack_s"] = time_stack(runs, dev)
        rows.append(row)
        print(row, flush=True)
    gpu = torch.cuda.get_device_name(0) if "cuda" in devices else None
    head = f"CPU {args.threads} thread(s)" + (f"; GPU {gpu}" if gpu else "; no CUDA device on this machine: CPU only")
    lines = [head, "", "| case | CPU run-steps/s | GPU run-steps/s | GPU/CPU | CPU stack | GPU stack |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r.get("cuda_run_steps_s")
        lines.append(
            f"| {r['case']} | {r['cpu_run_steps_s']:.0f} | {g:.0f} | {g / r['cpu_run_steps_s']:.1f}x |" if g else f"| {r['case']} | {r['cpu_run_steps_s']:.0f} | - | - |"
        )
        lines[-1] += "".join(f" {r[k]:.1f} s |" if k in r else " - |" for k in ("cpu_stack_s", "cuda_stack_s"))
    return emit("gpu", {"devices": devices, "gpu": gpu, "threads": args.threads}, rows, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
