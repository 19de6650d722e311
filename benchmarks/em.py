"""Benchmark: EM for mixtures of linear regressions, vectorised over prompts against a per-prompt loop.

`study.em.fit` carries every tensor as [P, R, ...] (P prompts, R restarts), so one batched E-step
and M-step serve all prompts. This script times, on the same prompts and the same random starts:

- `vectorised`: `em.init_beta` + `em.fit` called once on all P prompts (`em.fit` processes them in
  cache-sized chunks of `em.CHUNK_ELEMS` elements, what an evaluation runs);
- `vectorised, unchunked` (with `--unchunked`): the same with `em.CHUNK_ELEMS` set huge, so every
  temporary spans all P prompts (the in-run baseline for the chunking; slow: about 2 minutes);
- `loop`: the same algorithm one prompt at a time (`em.fit` with P = 1) over a random subset of
  `--loop-prompts` prompts; its seconds per prompt times P is reported as the EXTRAPOLATED loop
  time over all P prompts (the full loop is not run);
- `gradient EM, vectorised` (`grad_steps=1`), once on all P prompts, for reference.

Data: `MORTask(d, K, snr=3, sigma=0.5, components="fresh")`, identity covariance, P prompts of N
context examples from `study.mor.sample_prompts(..., stream="eval")`; starts z ~ N(0, 1) of shape
[P, R, K, d] from a fixed `torch.Generator`, scaled by `em.init_beta`; sigma known (the task's).
tol = 0, so every path runs exactly `--iters` iterations and the estimates are the same up to
rounding: the max abs difference of beta between the loop and the vectorised fit on the loop's
prompts (and between the unchunked and the chunked fit on all prompts) is reported; it should be
~1e-12 or smaller.

Timing: float64 on the CPU with `--threads` torch threads (default 1, as in a Ray trial). The loop
subset is timed in two halves, one before and one after the vectorised runs, so that a burst of
machine noise shows up as a gap between the halves; the per-prompt time is over both. Speed-up =
extrapolated loop seconds / vectorised seconds (< 1: the loop is faster). The machine may be shared
and noisy: compare the ratios measured in one run, not absolute seconds across runs.

Run from the repository root:

    .venv/bin/python benchmarks/em.py                  # d=8 K=3 N=256 P=4096, 50 iters, 4 restarts (~4 min on 1 thread)
    .venv/bin/python benchmarks/em.py --quick          # tiny sizes, a few seconds
    .venv/bin/python benchmarks/em.py --out results/bench_em.json
    .venv/bin/python benchmarks/em.py --unchunked      # also time the unchunked baseline
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from report import emit, environment

from study import em
from study.config import MORTask
from study.covariance import covariance
from study.mor import sample_prompts



def cpu() -> tuple[float, float]:
    """This process's (user, system) CPU seconds so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def fit_all(x, y, z, sigma, iters, grad_steps=0, unchunked=False):
    """init_beta + fit over all prompts in one call; (beta, loglik, seconds, cpu)."""
    saved = em.CHUNK_ELEMS
    if unchunked:
        em.CHUNK_ELEMS = 1 << 62
    try:
        c0 = cpu()
        t0 = time.perf_counter()
        f = em.fit(x, y, em.init_beta(x, y, z), sigma, iters, 0.0, grad_steps)
        seconds = time.perf_counter() - t0
    finally:
        em.CHUNK_ELEMS = saved
    return f.beta, f.loglik, seconds, [b - a for a, b in zip(c0, cpu())]


def fit_loop(x, y, z, sigma, iters, idx):
    """The same algorithm one prompt at a time (P = 1 per call); (beta [len(idx)], loglik, seconds, cpu)."""
    betas, logliks = [], []
    c0 = cpu()
    t0 = time.perf_counter()
    for i in idx.tolist():
        xi, yi = x[i : i + 1], y[i : i + 1]
        f = em.fit(xi, yi, em.init_beta(xi, yi, z[i : i + 1]), sigma, iters, 0.0)
        betas.append(f.beta)
        logliks.append(f.loglik)
    seconds = time.perf_counter() - t0
    return torch.cat(betas), torch.cat(logliks), seconds, [b - a for a, b in zip(c0, cpu())]


def cpu_share(entry: dict) -> str:
    user, system = entry["cpu_user_s"], entry["cpu_sys_s"]
    return f"{100 * system / max(user + system, 1e-12):.0f}%"


def markdown(r: dict, meta: dict) -> str:
    P, n = meta["P"], r["loop"]["prompts"]
    vec = r["vectorised"]["s"]
    lines = [
        f"EM, d={meta['d']} K={meta['K']} N={meta['N']} P={P}, {meta['iters']} iterations (tol 0), "
        f"{meta['restarts']} restarts, sigma known (float64, CPU, {meta['threads']} torch thread(s))",
        "",
        "| path | calls | s (all P prompts) | ms / prompt | speed-up vs loop | system CPU share | max abs beta diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| loop (`em.fit`, P = 1), {n} random prompts | {n} | **{r['loop']['extrapolated_s']:.3g} (extrapolated)** "
        f"| {1e3 * r['loop']['s_per_prompt']:.2f} | 1 | {cpu_share(r['loop'])} | (reference) |",
        f"| vectorised (`em.fit` once) | 1 | {vec:.3g} | {1e3 * vec / P:.2f} | **{r['speedup']:.2f}x** "
        f"| {cpu_share(r['vectorised'])} | {r['max_abs_beta_diff_loop']:.1e} (vs loop, {n} prompts) |",
    ]
    if "unchunked" in r:
        c = r["unchunked"]
        lines.append(
            f"| vectorised, unchunked (`CHUNK_ELEMS` off) | 1 | {c['s']:.3g} "
            f"| {1e3 * c['s'] / P:.2f} | {r['speedup_unchunked']:.2f}x | {cpu_share(c)} | {r['max_abs_beta_diff_unchunked']:.1e} (vs chunked, {P} prompts) |"
        )
    g = r["gradient_em"]
    lines.append(f"| gradient EM (`grad_steps=1`), vectorised | 1 | {g['s']:.3g} | {1e3 * g['s'] / P:.2f} | | {cpu_share(g)} | (other algorithm) |")
    h = r["loop"]["halves_s_per_prompt"]
    lines += [
        "",
        f"Speed-up = extrapolated loop s / vectorised s (< 1: the loop is faster). System CPU share = "
        f"kernel time / (user + kernel) CPU time of the process over that path (page faults of large temporaries). Loop: {n} of {P} prompts "
        f"timed ({r['loop']['s']:.3g} s), ms / prompt in its two halves (before / after the vectorised runs): "
        f"{1e3 * h[0]:.2f} / {1e3 * h[1]:.2f}; extrapolated = ms / prompt x {P}. "
        f"Max abs loglik diff loop vs vectorised: {r['max_abs_loglik_diff_loop']:.1e}. "
        f"Data generation {meta['data_s']:.1f} s (untimed). Peak RSS {meta['max_rss_mb']:.0f} MB.",
    ]
    return "\n".join(lines)


def times(c: list[float]) -> dict[str, float]:
    return {"cpu_user_s": c[0], "cpu_sys_s": c[1]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--N", type=int, default=256, help="context examples per prompt")
    ap.add_argument("--P", type=int, default=4096, help="prompts")
    ap.add_argument("--iters", type=int, default=50, help="EM iterations (tol 0: always all of them)")
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--loop-prompts", type=int, default=256, help="random prompts timed one at a time (extrapolated to P)")
    ap.add_argument("--unchunked", action="store_true", help="also time the fit with em.CHUNK_ELEMS off (slow)")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed; starts and the loop subset use fixed generators from it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Ray trial; 0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: d=4 K=2 N=32 P=128, 10 iters, 2 restarts, 32 loop prompts")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.K, args.N, args.P, args.iters, args.restarts, args.loop_prompts = 4, 2, 32, 128, 10, 2, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    args.loop_prompts = max(2, min(args.loop_prompts, args.P))

    task = MORTask(d=args.d, K=args.K, snr=3.0, sigma=0.5, components="fresh")
    t0 = time.perf_counter()
    p = sample_prompts(task, covariance("identity", args.d), args.N, args.P, args.seed, stream="eval")
    z = torch.randn(args.P, args.restarts, args.K, args.d, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    idx = torch.randperm(args.P, generator=torch.Generator().manual_seed(args.seed + 1))[: args.loop_prompts]
    data_s = time.perf_counter() - t0
    x, y, sigma = p.x, p.y, task.sigma

    # warm-up (first-call costs of the kernels), untimed
    fit_all(x[:2], y[:2], z[:2], sigma, 2)
    fit_all(x[:2], y[:2], z[:2], sigma, 2, grad_steps=1)

    half = args.loop_prompts // 2
    lb1, ll1, ls1, lc1 = fit_loop(x, y, z, sigma, args.iters, idx[:half])
    vb, vl, vs, vc = fit_all(x, y, z, sigma, args.iters)
    results: dict = {"vectorised": {"s": vs, "chunk_elems": em.CHUNK_ELEMS, **times(vc)}}
    if args.unchunked:
        cb, _, cs, cc = fit_all(x, y, z, sigma, args.iters, unchunked=True)
        results["unchunked"] = {"s": cs, **times(cc)}
        results["max_abs_beta_diff_unchunked"] = float((cb - vb).abs().max())
    _, _, gs, gc = fit_all(x, y, z, sigma, args.iters, grad_steps=1)
    results["gradient_em"] = {"s": gs, "grad_steps": 1, **times(gc)}
    lb2, ll2, ls2, lc2 = fit_loop(x, y, z, sigma, args.iters, idx[half:])

    n = args.loop_prompts
    loop_s = ls1 + ls2
    per_prompt = loop_s / n
    results["loop"] = {
        "prompts": n,
        "s": loop_s,
        "s_per_prompt": per_prompt,
        "halves_s_per_prompt": [ls1 / half, ls2 / (n - half)],
        "extrapolated_s": per_prompt * args.P,
        **times([a + b for a, b in zip(lc1, lc2)]),
        "indices": idx.tolist(),
    }
    results["speedup"] = per_prompt * args.P / vs
    if "unchunked" in results:
        results["speedup_unchunked"] = per_prompt * args.P / results["unchunked"]["s"]
    lb, ll = torch.cat([lb1, lb2]), torch.cat([ll1, ll2])
    results["max_abs_beta_diff_loop"] = float((lb - vb[idx]).abs().max())
    results["max_abs_loglik_diff_loop"] = float((ll - vl[idx]).abs().max())

    meta = {
        **environment(),
        "d": args.d, "K": args.K, "N": args.N, "P": args.P, "iters": args.iters, "restarts": args.restarts, "tol": 0.0,
        "task": task.model_dump(), "cov": "identity", "seed": args.seed, "sigma": "known",
        "data_s": data_s,
    }
    return emit("em", meta, results, markdown(results, meta), args.out)


if __name__ == "__main__":
    main()
