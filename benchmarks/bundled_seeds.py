"""Benchmark: how much of this machine's float64 GEMM peak a bundled reduced-LSA GD step uses.

A bundle trains S members (configurations x seeds) as one stack with `study.training.gd`. For the
binary reduced LSA a step's useful floating-point work is 4 B d^2 flops per member: 2 B d^2 for
the logits' GEMM u = x_q W^T and 2 B d^2 for the gradient's GEMM (g v)^T x_q; everything else is
O(B d). This script times `gd` on random problems (V [S,B,1,d], x_q [S,B,d], y_q [S,B] in {0,1},
lr [S], lam_inv [S,d,d], scale 2, gram None) for several bundle sizes S and dimensions d, and
divides the achieved GFLOP/s by the machine's own float64 GEMM rate, measured with
torch.matmul on square n x n matrices (2 n^3 flops) at the same torch thread count, just before
each configuration is timed, so the two numbers see the same machine load.

Timing: gd(steps=n) runs n + 1 loop iterations (each a loss + gradient evaluation; all but the
last also update), so a "step" here is one iteration: seconds / (n + 1). n is chosen so that a
repeat lasts about `--min-time` seconds; the median over `--repeats` repeats (after a warm-up)
is reported, with the GEMM rate's median beside it. The machine may be shared and noisy: the
fractions are ratios measured side by side, not absolute speeds.

`--experiment` also times a PRIVATE EXPERIMENT, not part of the study code: a copy of the
reduced step that processes the B prompts in cache-sized chunks and replaces the two einsums by
elementwise products (same losses and gradients to ~1e-15, checked here). It exists only to
measure what such a change to study/lsa.py + study/training.py would buy.

Run from the repository root:

    .venv/bin/python benchmarks/bundled_seeds.py                 # d in {8,16,32}, S in {1,4,16,64}, B=16384
    .venv/bin/python benchmarks/bundled_seeds.py --quick         # tiny sizes, a few seconds
    .venv/bin/python benchmarks/bundled_seeds.py --experiment --out results/bench_bundled_seeds.json
    .venv/bin/python benchmarks/bundled_seeds.py --d 16 --S 1 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from study.training import Problem, gd, step

DTYPE = torch.float64


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
        lam_inv=torch.eye(d, dtype=DTYPE).expand(S, d, d).contiguous(),
        scale=2.0,
    )


# ----------------------------------------------------------------------------------------------
# PRIVATE EXPERIMENT: a chunked copy of the reduced step (not used by the study)


def experimental_step(params: dict[str, torch.Tensor], prob: Problem, chunk_bytes: int = 1 << 19):
    """Reduced step over B in chunks whose [S, b, d] intermediates stay in cache (~chunk_bytes).

    Same maths as study.training.step for `W` with c' = 1: logits = rowdot(V, x_q W^T); gradient
    (1/B) sum_b g_b v_b x_b^T accumulated chunk by chunk with baddbmm_. No einsum; no [S, B, d]
    temporaries, so no page faults on fresh allocations and no trips to DRAM for them.
    """
    W = params["W"]
    S, B, _, d = prob.V.shape
    b = max(64, chunk_bytes // (S * d * W.element_size()))
    Wt = W.transpose(1, 2)
    grad = torch.zeros_like(W)
    loss = torch.zeros(S, dtype=W.dtype, device=W.device)
    for s in range(0, B, b):
        v, x, y = prob.V[:, s : s + b, 0], prob.xq[:, s : s + b], prob.yq[:, s : s + b]
        logit = torch.linalg.vecdot(v, torch.bmm(x, Wt))  # [S, b]
        ytil = 2.0 * y.to(W.dtype) - 1.0
        loss += F.softplus(-ytil * logit).sum(1)
        g = torch.sigmoid(logit) - (ytil + 1.0) / 2.0
        grad.baddbmm_((v * g[..., None]).transpose(1, 2), x)
    return loss / B, {"W": grad / B}


def experimental_gd(params: dict[str, torch.Tensor], prob: Problem, steps: int):
    """study.training.gd's loop (divergence bookkeeping included, no log) around experimental_step."""
    lr = prob.lr[:, None, None]
    diverged_at = torch.full((prob.S,), -1, dtype=torch.long)
    for t in range(steps + 1):
        loss, grad = experimental_step(params, prob)
        newly = (~torch.isfinite(loss)) & (diverged_at < 0)
        diverged_at = torch.where(newly, torch.full_like(diverged_at, t), diverged_at)
        if t < steps:
            params = {k: v - lr * grad[k] for k, v in params.items()}
    return params, diverged_at, []


def check_experiment(prob: Problem) -> float:
    """Max abs difference of loss and gradient between study's step and the experimental copy."""
    W = 0.1 * torch.randn(prob.S, prob.d, prob.d, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    l0, g0 = step({"W": W}, prob)
    l1, g1 = experimental_step({"W": W}, prob)
    return max(float((l0 - l1).abs().max()), float((g0["W"] - g1["W"]).abs().max()))


# ----------------------------------------------------------------------------------------------
# timing


def time_gd(run, prob: Problem, min_time: float, repeats: int) -> tuple[list[float], int]:
    """Seconds per gd iteration, one per repeat, with n chosen so a repeat lasts ~min_time."""
    p0 = {"W": torch.zeros(prob.S, prob.d, prob.d, dtype=DTYPE)}
    t0 = time.perf_counter()
    run(p0, prob, 2)  # warm-up, and a first estimate
    per = (time.perf_counter() - t0) / 3
    n = max(3, math.ceil(min_time / per) - 1)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, diverged_at, _ = run(p0, prob, n)
        out.append((time.perf_counter() - t0) / (n + 1))
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
            variants = [("study gd", gd)] + ([("EXPERIMENT chunked", experimental_gd)] if args.experiment else [])
            for name, run in variants:
                gemm = gemm_gflops(args.gemm_n, args.gemm_reps)  # side by side with the step timing
                secs, n = time_gd(run, prob, args.min_time, args.repeats)
                gemm += gemm_gflops(args.gemm_n, args.gemm_reps)
                med, best = statistics.median(secs), min(secs)
                row = {
                    "threads": threads, "d": d, "S": S, "B": args.B, "variant": name, "steps_per_repeat": n,
                    "s_per_step": secs, "median_s_per_step": med, "steps_per_s": 1.0 / med,
                    "member_steps_per_s": S / med, "useful_flops_per_step": flops,
                    "gflops": flops / med / 1e9, "gflops_best": flops / best / 1e9,
                    "gemm_gflops": gemm, "gemm_gflops_median": statistics.median(gemm), "gemm_gflops_best": max(gemm),
                }
                row["frac_peak"] = row["gflops"] / row["gemm_gflops_median"]
                row["frac_peak_best"] = row["gflops_best"] / row["gemm_gflops_best"]
                if name != "study gd":
                    row["max_abs_diff_vs_study_step"] = check_experiment(prob)
                rows.append(row)
                print(
                    f"  threads={threads} d={d:3d} S={S:3d} {name:18s} {1e3 * med:9.2f} ms/step  "
                    f"{row['gflops']:6.2f} GF/s  peak {row['gemm_gflops_median']:6.1f}  frac {row['frac_peak']:.1%}",
                    file=sys.stderr,
                    flush=True,
                )
            del prob
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Reduced-LSA GD step (binary, float64, B={meta['B']}; useful work 4·B·d² flops per member) "
        f"vs float64 GEMM ({meta['gemm_n']}x{meta['gemm_n']} torch.matmul, same threads, measured beside each row); "
        f"OMP_WAIT_POLICY={meta['env']['OMP_WAIT_POLICY'] or 'unset'}",
        "",
        "| threads | d | S | variant | ms / step | steps / s | member-steps / s | GFLOP/s | GEMM GFLOP/s | fraction of GEMM (median; best-of) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['d']} | {r['S']} | {r['variant']} | {1e3 * r['median_s_per_step']:.2f} | {r['steps_per_s']:.1f} | "
            f"{r['member_steps_per_s']:.0f} | {r['gflops']:.2f} | {r['gemm_gflops_median']:.1f} | "
            f"**{r['frac_peak']:.1%}**; {r['frac_peak_best']:.1%} |"
        )
    diffs = [r["max_abs_diff_vs_study_step"] for r in rows if "max_abs_diff_vs_study_step" in r]
    if diffs:
        lines += ["", f"EXPERIMENT rows: a private chunked copy of the step (see --help); max abs diff of loss/gradient vs study's step: {max(diffs):.1e}."]
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
    ap.add_argument("--gemm-reps", type=int, default=3, help="GEMM repeats before and after each row")
    ap.add_argument("--experiment", action="store_true", help="also time the PRIVATE chunked copy of the step")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: d in {4, 8}, S in {1, 4}, B=512, GEMM 256")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.S, args.B, args.gemm_n, args.min_time, args.repeats = [4, 8], [1, 4], 512, 256, 0.02, 2
    default_threads = torch.get_num_threads()
    thread_counts = list(dict.fromkeys(t or default_threads for t in args.threads))

    rows = []
    for th in thread_counts:
        rows += bench(args, th)
    torch.set_num_threads(default_threads)
    meta = {
        "B": args.B, "gemm_n": args.gemm_n, "default_threads": default_threads, "torch": torch.__version__,
        "python": sys.version.split()[0], "machine": platform.processor() or platform.machine(), "argv": sys.argv,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")},
    }
    print(markdown(rows, meta))
    out = {"benchmark": "bundled_seeds", "meta": meta, "results": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
