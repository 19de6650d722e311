"""Benchmark: how much of this machine's float64 GEMM peak a bundled reduced-LSA GD step uses.

A bundle trains S members (configurations x seeds) as one stack with `study.training.gd`. For the
binary reduced LSA a step's useful floating-point work is 4 B d^2 flops per member: 2 B d^2 for
the logits' GEMM u = x_q W^T and 2 B d^2 for the gradient's GEMM (g v)^T x_q; everything else is
O(B d). This script times `gd` on random problems (V [S,B,1,d], x_q [S,B,d], y_q [S,B] in {0,1},
lr [S], target [S,d,d], scale 2, gram None) for several bundle sizes S and dimensions d, and
divides the achieved GFLOP/s by the machine's own float64 GEMM rate, measured with
torch.matmul on square n x n matrices (2 n^3 flops) at the same torch thread count, just before
and just after each configuration is timed, so the two numbers see the same machine load.

In-run baseline: `study.training.step` runs over the B prompts in chunks of about
`study.training.CHUNK_BYTES` (1 MiB) of [S, b, d] float64 per temporary on the CPU. Each
configuration is timed twice, with the study's default chunking ("chunked") and with chunking
disabled ("unchunked": `study.training.CHUNK_BYTES` set to 2^62 for the duration, then restored,
so each step is one pass over all B prompts); the repeats of the two alternate, so that both see
the same bursts of machine noise. The speed-up column is unchunked / chunked seconds per step
(medians; > 1: chunking is faster). The two variants' losses and gradients at a random W are
also compared (they differ only by the order of the sums: ~1e-15).

Timing: gd(steps=n) runs n + 1 loop iterations (each a loss + gradient evaluation; all but the
last also update), so a "step" here is one iteration: seconds / (n + 1). n is chosen so that a
repeat lasts about `--min-time` seconds; the median over `--repeats` repeats (after a warm-up)
is reported, with the GEMM rate's median beside it. The machine may be shared and noisy: the
fractions and speed-ups are ratios measured side by side, not absolute speeds.

Run from the repository root:

    .venv/bin/python benchmarks/bundled_seeds.py                 # d in {8,16,32}, S in {1,4,16,64}, B=16384, threads default and 1
    .venv/bin/python benchmarks/bundled_seeds.py --quick         # small sizes, a few seconds
    .venv/bin/python benchmarks/bundled_seeds.py --out results/bench_bundled_seeds.json
    .venv/bin/python benchmarks/bundled_seeds.py --d 16 --S 1 16 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from report import emit

from study import training
from study.training import Problem, gd, step

DTYPE = torch.float64
NO_CHUNKING = 1 << 62  # CHUNK_BYTES so large that every step is one chunk of all B prompts
VARIANTS = {"chunked": None, "unchunked": NO_CHUNKING}  # name -> CHUNK_BYTES override (None: the study's default)


@contextlib.contextmanager
def chunk_bytes(value: int | None):
    """Temporarily set study.training.CHUNK_BYTES (None: leave the study's default)."""
    saved = training.CHUNK_BYTES
    if value is not None:
        training.CHUNK_BYTES = value
    try:
        yield
    finally:
        training.CHUNK_BYTES = saved


def gemm_gflops(n: int, reps: int) -> list[float]:
    """float64 GFLOP/s of torch.matmul on n x n matrices, one value per repeat."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=g, dtype=DTYPE), torch.randn(n, n, generator=g, dtype=DTYPE)
    out = torch.empty(n, n, dtype=DTYPE)
    torch.matmul(a, b, out=out)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def random_problem(S: int, B: int, d: int, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    return Problem(
        V=0.5 * torch.randn(S, B, 1, d, generator=g, dtype=DTYPE) / math.sqrt(d),
        xq=torch.randn(S, B, d, generator=g, dtype=DTYPE),
        yq=torch.randint(2, (S, B), generator=g),
        gram=None,
        lr=torch.full((S,), 0.5, dtype=DTYPE),
        target=torch.eye(d, dtype=DTYPE).expand(S, d, d).contiguous(),
        scale=2.0,
    )


def chunking_diff(prob: Problem) -> float:
    """Max abs difference of loss and gradient between the chunked and unchunked step, at a random W."""
    W = 0.1 * torch.randn(prob.S, prob.d, prob.d, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    out = {}
    for name, value in VARIANTS.items():
        with chunk_bytes(value):
            out[name] = step({"W": W}, prob)
    (l0, g0), (l1, g1) = out["chunked"], out["unchunked"]
    return max(float((l0 - l1).abs().max()), float((g0["W"] - g1["W"]).abs().max()))


def time_variants(prob: Problem, min_time: float, repeats: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per gd iteration for each variant, one per repeat, the variants' repeats alternating."""
    p0 = {"W": torch.zeros(prob.S, prob.d, prob.d, dtype=DTYPE)}
    n = {}
    for name, value in VARIANTS.items():
        with chunk_bytes(value):
            t0 = time.perf_counter()
            gd(p0, prob, 2)  # warm-up, and a first estimate
            n[name] = max(3, math.ceil(min_time / ((time.perf_counter() - t0) / 3)) - 1)
    out: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, value in VARIANTS.items():
            with chunk_bytes(value):
                t0 = time.perf_counter()
                _, diverged_at, _ = gd(p0, prob, n[name])
                out[name].append((time.perf_counter() - t0) / (n[name] + 1))
            if bool((diverged_at >= 0).any()):
                raise RuntimeError("a member diverged: the timing would not be representative")
    return out, n


def bench(args, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for d in args.d:
        for S in args.S:
            prob = random_problem(S, args.B, d, seed=S * 1000 + d)
            flops = 4 * args.B * d * d * S
            with chunk_bytes(None):
                chunk = min(args.B, training._chunk(prob, prob.V.shape[2] * d))
            gemm = gemm_gflops(args.gemm_n, args.gemm_reps)  # side by side with the step timing
            secs, n = time_variants(prob, args.min_time, args.repeats)
            gemm += gemm_gflops(args.gemm_n, args.gemm_reps)
            diff = chunking_diff(prob)
            gemm_med, gemm_best = statistics.median(gemm), max(gemm)
            meds = {name: statistics.median(s) for name, s in secs.items()}
            for name in VARIANTS:
                med, best = meds[name], min(secs[name])
                row = {
                    "threads": threads, "d": d, "S": S, "B": args.B, "variant": name,
                    "prompts_per_chunk": chunk if name == "chunked" else args.B, "steps_per_repeat": n[name],
                    "s_per_step": secs[name], "median_s_per_step": med, "steps_per_s": 1.0 / med,
                    "member_steps_per_s": S / med, "useful_flops_per_step": flops,
                    "gflops": flops / med / 1e9, "gflops_best": flops / best / 1e9,
                    "gemm_gflops": gemm, "gemm_gflops_median": gemm_med, "gemm_gflops_best": gemm_best,
                    "max_abs_diff_chunked_vs_unchunked": diff,
                }
                row["frac_peak"] = row["gflops"] / gemm_med
                row["frac_peak_best"] = row["gflops_best"] / gemm_best
                if name == "chunked":
                    row["speedup_vs_unchunked"] = meds["unchunked"] / med
                    row["speedup_vs_unchunked_best"] = min(secs["unchunked"]) / best
                rows.append(row)
                print(
                    f"  threads={threads} d={d:3d} S={S:3d} {name:9s} {1e3 * med:9.2f} ms/step  "
                    f"{row['gflops']:6.2f} GF/s  peak {gemm_med:6.1f}  frac {row['frac_peak']:.1%}"
                    + (f"  speed-up {row['speedup_vs_unchunked']:.2f}x" if name == "chunked" else ""),
                    file=sys.stderr,
                    flush=True,
                )
            del prob
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Reduced-LSA GD step (binary, float64, B={meta['B']}; useful work 4·B·d² flops per member) "
        f"vs float64 GEMM ({meta['gemm_n']}x{meta['gemm_n']} torch.matmul, same threads, measured beside each row); "
        f"chunked: study.training.CHUNK_BYTES={meta['chunk_bytes']} (the default), unchunked: one pass over all B prompts; "
        f"OMP_WAIT_POLICY={meta['env']['OMP_WAIT_POLICY'] or 'unset'}",
        "",
        "| threads | d | S | variant | prompts / chunk | ms / step | member-steps / s | GFLOP/s | GEMM GFLOP/s | fraction of GEMM (median; best-of) | speed-up vs unchunked (median; best-of) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = f"**{r['speedup_vs_unchunked']:.2f}x**; {r['speedup_vs_unchunked_best']:.2f}x" if "speedup_vs_unchunked" in r else "1"
        lines.append(
            f"| {r['threads']} | {r['d']} | {r['S']} | {r['variant']} | {r['prompts_per_chunk']} | {1e3 * r['median_s_per_step']:.2f} | "
            f"{r['member_steps_per_s']:.0f} | {r['gflops']:.2f} | {r['gemm_gflops_median']:.1f} | "
            f"**{r['frac_peak']:.1%}**; {r['frac_peak_best']:.1%} | {speedup} |"
        )
    diff = max(r["max_abs_diff_chunked_vs_unchunked"] for r in rows)
    lines += ["", f"Max abs difference of loss/gradient, chunked vs unchunked step: {diff:.1e}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--S", type=int, nargs="+", default=[1, 4, 16, 64], help="members per bundle")
    ap.add_argument("--B", type=int, default=16384, help="training prompts per member")
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="torch thread counts to run (0: torch's default)")
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds per timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gemm-n", type=int, default=1024)
    ap.add_argument("--gemm-reps", type=int, default=3, help="GEMM repeats before and after each configuration")
    ap.add_argument("--quick", action="store_true", help="small sizes: d in {4, 8}, S in {1, 16}, B=4096 (S=16 is chunked), GEMM 256")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.S, args.B, args.gemm_n, args.min_time, args.repeats = [4, 8], [1, 16], 4096, 256, 0.02, 2
    default_threads = torch.get_num_threads()
    thread_counts = list(dict.fromkeys(t or default_threads for t in args.threads))

    t0 = time.perf_counter()
    rows = []
    try:
        for th in thread_counts:
            rows += bench(args, th)
    finally:
        torch.set_num_threads(default_threads)
    meta = {
        "B": args.B, "gemm_n": args.gemm_n, "chunk_bytes": training.CHUNK_BYTES, "default_threads": default_threads,
        "total_s": time.perf_counter() - t0,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")},
    }
    return emit("bundled_seeds", meta, rows, markdown(rows, meta), args.out)


if __name__ == "__main__":
    main()
