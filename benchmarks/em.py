"""Benchmark: EM for mixtures of linear regressions: the current `em.fit` against the previous
implementation (part `before-after`), and vectorised over prompts against a per-prompt loop (part `loop`).

Part `before-after` (issue 10), at the quickstart's sizes (pipelines/sweeps/quickstart.yaml, part
mor: d = 4, K = 2, sigma 0.5 known, n_eval = 512 prompts, M in [8, 32, 128, 512, inf], 4 restarts,
50 iterations, tol 1e-8), for the first stack of each snr (1 and 5), seed 0, as
`study.trial.run_bundle` groups it (the runs sharing the evaluation prompts: N in {10, 40, 160},
each with its own `lsa_opt`):

- the EM calls of one evaluation pass are recorded (their exact arguments: the evaluation's prompts,
  sliced at each M, and the starts `regressors.em_estimator` draws), then each is timed with
  `fit_before` (the implementation before issue 10, copied below verbatim apart from an optional
  trace of the stopped prompts, off when timed), with `em.fit`'s torch code (the fused C kernels
  switched off: what runs where no C compiler is) and with `em.fit` as shipped (the C kernel
  `fused.em_fit` where it is built), in turn, `--repeats` times, best of each. The torch code's fits
  are compared with the old ones field by field (`bit-identical`: beta, pi, sigma and loglik equal
  bit for bit, and the same iteration count). The shipped fits sum in another order, so they are
  compared to rounding: the max abs difference of the log-likelihoods and of beta up to the
  components' order (restarts that reach one optimum tie to ~1e-16, and rounding picks which is
  kept; at M = 8, near-flat directions let rounding move a stopping point, with the same
  likelihood);
- the whole evaluation pass, `study.families.FAMILIES["mor"].evaluate` (prompt generation, oracle,
  ols, ridge, lsa_opt x 3, em), timed with `study.em.fit` as it is and with `study.em.fit`
  replaced by `fit_before`, alternating; its rows are compared (`identical`: every value equal) and
  the seconds inside EM are reported as its share of the pass;
- roofs measured in the same run (before and after the timings; the larger of each is used): read
  bandwidth (`x.sum()` over 256 MiB) and the float64 GEMM rate (1024 x 1024 matmul). EM's roof time
  counts the work the algorithm must do, each prompt's own iterations (traced by `fit_before`) plus
  the final E-step: flops 2 R K M d (E-step GEMM) + 2 R K M (d^2 + d) (M-step GEMMs) per prompt and
  iteration, bytes 8 M (d + 1) (x and y read once); roof = max(bytes / bandwidth, flops / GEMM
  rate), fraction = roof / measured seconds. Exps and logs (3 R K M per iteration) are not in it.

Part `loop` (the script's earlier content): `em.fit` once on P prompts against the same algorithm one
prompt at a time, at d = 8, K = 3, N = 256, P = 4096 by default:

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

Timing: float64 on the CPU with `--threads` torch threads (default 1, as in a Ray trial). Wall and
process CPU seconds are both reported; with 1 thread, CPU < wall means other processes held the
cores. The loop subset is timed in two halves, one before and one after the vectorised runs, so
that a burst of machine noise shows up as a gap between the halves; the per-prompt time is over
both. Speed-up = extrapolated loop seconds / vectorised seconds (< 1: the loop is faster). The
machine may be shared and noisy: compare the ratios measured in one run, not absolute seconds
across runs.

Run from the repository root:

    .venv/bin/python benchmarks/em.py                          # both parts (~4 + ~4 min on 1 thread)
    .venv/bin/python benchmarks/em.py --part before-after      # issue 10's comparison only
    .venv/bin/python benchmarks/em.py --part loop --unchunked  # the loop part, with the unchunked baseline
    .venv/bin/python benchmarks/em.py --quick                  # tiny sizes, a few seconds
    .venv/bin/python benchmarks/em.py --out results/bench_em.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import resource
import time
import unittest.mock
from pathlib import Path

import roofline
import torch
from report import emit, environment

from study import em, estimators, fused
from study.config import MORTask, canonical_json
from study.covariance import covariance
from study.mor import sample_prompts

# ----------------------------------------------------------------------------------------------
# The implementation before issue 10 (study/em.py at commit 380d092), the in-run baseline: its
# code verbatim (docstrings left out), apart from `trace` (a list that receives each iteration's
# mask of still-active prompts; None when timed).

SIGMA_FLOOR, RIDGE = em.SIGMA_FLOOR, em.RIDGE
CHUNK_ELEMS_BEFORE = 1 << 20


def _log_weights_before(x, y, beta, pi, sigma):
    P, M, _ = x.shape
    R, K, d = beta.shape[1:]
    resid = y[:, None, None, :] - (beta.reshape(P, R * K, d) @ x.transpose(1, 2)).reshape(P, R, K, M)  # one GEMM
    s2 = (sigma * sigma)[:, :, None, None]
    return pi.log()[..., None] - resid * resid / (2 * s2) - 0.5 * torch.log(2 * math.pi * s2)


def fit_before(x, y, beta0, sigma, iters, tol, grad_steps=0, trace=None) -> em.Fit:
    P, M, d = x.shape
    R, K = beta0.shape[1], beta0.shape[2]
    step = max(1, CHUNK_ELEMS_BEFORE // (M * max(d * d, R * K)))
    parts = [_fit_chunk_before(x[s : s + step], y[s : s + step], beta0[s : s + step], sigma, iters, tol, grad_steps, trace) for s in range(0, P, step)]
    return em.Fit(*(torch.cat([getattr(f, n) for f in parts]) for n in ("beta", "pi", "sigma", "loglik")), max(f.iterations for f in parts))


def _fit_chunk_before(x, y, beta0, sigma, iters, tol, grad_steps, trace=None) -> em.Fit:
    P, M, d = x.shape
    R, K = beta0.shape[1], beta0.shape[2]
    RK = R * K
    beta = beta0.clone()
    pi = torch.full((P, R, K), 1.0 / K, dtype=x.dtype, device=x.device)
    known = sigma is not None
    sig = torch.full((P, R), sigma, dtype=x.dtype, device=x.device) if known else y.std(-1).clamp(min=SIGMA_FLOOR)[:, None].expand(P, R).clone()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    if grad_steps:
        lam_max = torch.linalg.eigvalsh(x.transpose(1, 2) @ x / M)[:, -1]  # [P]
        eta = (1.0 / lam_max.clamp(min=1e-12))[:, None, None]
    else:
        xx = (x[..., :, None] * x[..., None, :]).reshape(P, M, d * d)  # x x^T once: each M-step is one GEMM
    prev = torch.full((P, R), -math.inf, dtype=x.dtype, device=x.device)
    active = torch.ones(P, dtype=torch.bool, device=x.device)
    it = 0
    for it in range(1, iters + 1):
        if trace is not None:
            trace.append(active.clone())
        logw = _log_weights_before(x, y, beta, pi, sig.clamp(min=SIGMA_FLOOR))
        lse = torch.logsumexp(logw, dim=2)  # [P, R, M]
        loglik = lse.mean(-1)  # [P, R]
        r = (logw - lse[:, :, None, :]).exp()  # responsibilities [P, R, K, M]
        new_pi = (r.sum(-1) / M).clamp(min=1e-12)
        rt = r.reshape(P, RK, M)
        if grad_steps:
            new_beta = beta.reshape(P, RK, d)
            for _ in range(grad_steps):
                res = y[:, None, :] - new_beta @ x.transpose(1, 2)  # [P, RK, M]
                new_beta = new_beta + eta * ((rt * res) @ x) / M
            new_beta = new_beta.reshape(P, R, K, d)
        else:
            A = (rt @ xx).reshape(P, R, K, d, d) + RIDGE * eye
            b = ((rt * y[:, None, :]) @ x).reshape(P, R, K, d)
            new_beta = torch.linalg.solve(A, b[..., None])[..., 0]
        if not known:
            res = y[:, None, :] - new_beta.reshape(P, RK, d) @ x.transpose(1, 2)  # [P, RK, M]
            new_sig = ((rt * res * res).reshape(P, R, K, M).sum((2, 3)) / M).sqrt().clamp(min=SIGMA_FLOOR)
            sig = torch.where(active[:, None], new_sig, sig)
        beta = torch.where(active[:, None, None, None], new_beta, beta)
        pi = torch.where(active[:, None, None], new_pi, pi)
        active = active & ((loglik - prev).abs().amax(1) >= tol)  # a prompt stops once it has converged
        prev = loglik
        if not bool(active.any()):
            break
    logw = _log_weights_before(x, y, beta, pi, sig.clamp(min=SIGMA_FLOOR))
    loglik = torch.logsumexp(logw, dim=2).mean(-1)
    best = loglik.argmax(1)  # the restart with the best final log-likelihood
    pick = lambda t: t[torch.arange(P), best]  # noqa: E731
    return em.Fit(pick(beta), pick(pi), pick(sig), pick(loglik), it)


# ----------------------------------------------------------------------------------------------
# part `before-after`


def prompt_iterations(x, y, beta0, sigma, iters, tol, grad_steps=0) -> int:
    """The iterations every prompt needs (until it stops), summed over prompts (fit_before's trace)."""
    P, M, d = x.shape
    R, K = beta0.shape[1], beta0.shape[2]
    step = max(1, CHUNK_ELEMS_BEFORE // (M * max(d * d, R * K)))
    total = 0
    for s in range(0, P, step):
        trace: list[torch.Tensor] = []
        _fit_chunk_before(x[s : s + step], y[s : s + step], beta0[s : s + step], sigma, iters, tol, grad_steps, trace)
        total += int(torch.stack(trace).sum())  # active at the start of an iteration: it runs for that prompt
    return total


def measure_roofs(bw_mib: int = 256, gemm_n: int = 1024) -> dict[str, float]:
    """Read bandwidth (bytes/s) and float64 GEMM rate (flop/s), as `benchmarks/roofline.py` measures them."""
    roofs = roofline.measure_roofs(bw_mib, gemm_n)
    return {"bandwidth": roofs["bandwidth"], "gemm64": roofs["gemm64"]}


def clock(fn) -> tuple[float, float, object]:
    """(wall s, process CPU s, result) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def alternate(fns: dict[str, object], repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, object]]:
    """Each fn called `repeats` times, in turn; best wall and best CPU seconds of each, and one result each."""
    best: dict[str, dict[str, float]] = {k: {"s": math.inf, "cpu_s": math.inf} for k in fns}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            wall, cpu_s, outs[k] = clock(fn)
            best[k] = {"s": min(best[k]["s"], wall), "cpu_s": min(best[k]["cpu_s"], cpu_s)}
    return best, outs


def same_fit(a: em.Fit, b: em.Fit) -> tuple[bool, float, float]:
    """(identical bit for bit with the same iteration count, max abs beta diff up to the components'
    order, max abs loglik diff). The order: restarts that reach one optimum tie in log-likelihood to
    ~1e-16, so rounding decides which restart is kept, and with it the labels of the components."""
    fields = ("beta", "pi", "sigma", "loglik")
    ident = a.iterations == b.iterations and all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)
    K = a.beta.shape[1]
    dbeta = torch.stack([(a.beta[:, list(p)] - b.beta).abs().amax((1, 2)) for p in itertools.permutations(range(K))]).amin(0)  # per prompt
    return ident, float(dbeta.max()), float((a.loglik - b.loglik).abs().max())


def torch_only(fn):
    """fn with the fused C kernels switched off: the torch code, what runs where no C compiler is."""

    def call(*args, **kwargs):
        with unittest.mock.patch.object(fused, "library", lambda: None):
            return fn(*args, **kwargs)

    return call


def quickstart_group(snr: float, quick: bool):
    """The first quickstart mor stack with this snr, its seed-0 runs sharing one evaluation (as run_bundle groups them)."""
    from pipelines import sweep
    from study.config import Run, TrialConfig

    stack = next(s for s in sweep.load_sweep("quickstart").stacks() if s[0].config.task.family == "mor" and s[0].config.task.snr == snr)
    runs = [r for r in stack if r.seed == 0]
    if quick:  # tiny sizes: fewer prompts, shorter contexts, fewer iterations
        runs = [Run(TrialConfig.from_flat({**r.config.to_flat(), "n_eval": 64, "M": [8, 32, "inf"], "em_iters": 10}), r.seed) for r in runs]
    keys = {canonical_json([r.config.task.data_key(), r.seed, r.config.eval.model_dump(), list(r.config.estimators)]) for r in runs}
    assert len(keys) == 1, "the runs of a group share their evaluation prompts"
    return runs


def eval_pass(runs) -> list[dict]:
    """One evaluation pass of a group of runs, as study.trial.run_bundle makes it (untrained: lsa_opt only)."""
    from study.families import FAMILIES
    from study.trial import _cov

    family = FAMILIES["mor"]
    own = {}
    for i, r in enumerate(runs):
        own.update({f"{i}:{name}": e for name, e in estimators.per_run(r.config, _cov(r.config), None).items()})
    r0 = runs[0]
    return family.evaluate(r0.config, _cov(r0.config), r0.seed, own, "cpu")


class Recorder:
    """Stands in for study.em.fit: calls `impl`, records each call's arguments and seconds."""

    def __init__(self, impl):
        self.impl, self.calls, self.seconds = impl, [], 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.impl(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls.append((args, kwargs))
        return out


def with_fit(impl, fn):
    """fn() with study.em.fit replaced by a Recorder around impl; (fn's result, the recorder)."""
    saved = em.fit
    rec = Recorder(impl)
    em.fit = rec
    try:
        return fn(), rec
    finally:
        em.fit = saved


def before_after(args) -> tuple[dict, str]:
    roofs0 = measure_roofs()
    res: dict = {"em": [], "pass": []}
    current = em.fit
    for snr in (1.0, 5.0):
        runs = quickstart_group(snr, args.quick)
        cfg = runs[0].config
        # the EM calls of one pass, recorded
        _, rec = with_fit(current, lambda: eval_pass(runs))
        for (a, kw) in rec.calls:
            x, y, beta0, sigma, iters, tol = a[:6]
            P, M, d = x.shape
            R, K = beta0.shape[1], beta0.shape[2]
            t, outs = alternate({"before": lambda: fit_before(*a, **kw), "torch": lambda: torch_only(current)(*a, **kw), "after": lambda: current(*a, **kw)}, args.repeats)
            ident, _, _ = same_fit(outs["before"], outs["torch"])
            _, dbeta, dll = same_fit(outs["before"], outs["after"])
            pit = prompt_iterations(*a, **kw)
            flops = 2 * R * K * M * (2 * d + d * d) * pit + 2 * R * K * M * d * P
            bytes_ = 8 * M * (d + 1) * (pit + P)
            res["em"].append({"snr": snr, "M": M, "P": P, "R": R, "K": K, "d": d, "iters": iters, "tol": tol, "before": t["before"], "after": t["after"], "torch": t["torch"],
                              "speedup": t["before"]["s"] / t["after"]["s"], "speedup_cpu": t["before"]["cpu_s"] / t["after"]["cpu_s"],
                              "speedup_torch": t["before"]["s"] / t["torch"]["s"], "torch_identical": ident,
                              "max_abs_beta_diff": dbeta, "max_abs_loglik_diff": dll, "iterations": outs["after"].iterations,
                              "prompt_iterations": pit, "flops": flops, "bytes": bytes_})
        # the whole pass, old and new alternating; the seconds inside EM from the recorders
        best = {k: {"s": math.inf, "cpu_s": math.inf, "em_s": math.inf} for k in ("before", "after")}
        rows = {}
        for _ in range(args.repeats):
            for k, impl in (("before", fit_before), ("after", current)):
                wall, cpu_s, (rows[k], r) = clock(lambda: with_fit(impl, lambda: eval_pass(runs)))
                b = best[k]
                if wall < b["s"]:
                    b["em_s"] = r.seconds
                b["s"], b["cpu_s"] = min(b["s"], wall), min(b["cpu_s"], cpu_s)
        va = {(r["estimator"], r["M"], r["metric"]): r["value"] for r in rows["after"]}
        vb = {(r["estimator"], r["M"], r["metric"]): r["value"] for r in rows["before"]}
        diff = max((abs(va[k] - vb[k]) for k in vb if k in va and not (math.isnan(va[k]) and math.isnan(vb[k]))), default=0.0)
        res["pass"].append({"snr": snr, "config": cfg.config_id, "N": [r.config.train.N for r in runs], "n_eval": cfg.eval.n_eval, "M": list(cfg.eval.M),
                            "before": best["before"], "after": best["after"], "speedup": best["before"]["s"] / best["after"]["s"],
                            "speedup_cpu": best["before"]["cpu_s"] / best["after"]["cpu_s"], "rows": len(rows["after"]),
                            "identical": va.keys() == vb.keys() and diff == 0.0, "max_abs_value_diff": diff})
    roofs1 = measure_roofs()
    roofs = {k: max(roofs0[k], roofs1[k]) for k in roofs0}
    res["roofs"] = {"before": roofs0, "after": roofs1, "used": roofs}
    for e in res["em"]:
        e["roof_s"] = max(e["bytes"] / roofs["bandwidth"], e["flops"] / roofs["gemm64"])
        e["roof_bound"] = "bandwidth" if e["bytes"] / roofs["bandwidth"] > e["flops"] / roofs["gemm64"] else "GEMM"
        e["fraction_before"], e["fraction_after"] = e["roof_s"] / e["before"]["s"], e["roof_s"] / e["after"]["s"]
    tb = {k: sum(e[k]["s"] for e in res["em"]) for k in ("before", "torch", "after")}
    res["em_total"] = {**tb, "speedup": tb["before"] / tb["after"], "speedup_torch": tb["before"] / tb["torch"], "roof_s": sum(e["roof_s"] for e in res["em"]),
                       "torch_identical": all(e["torch_identical"] for e in res["em"])}
    return res, before_after_markdown(res)


def before_after_markdown(r: dict) -> str:
    e0 = r["em"][0]
    rf = r["roofs"]["used"]
    lines = [
        f"EM before/after issue 10 at the quickstart's sizes: d={e0['d']} K={e0['K']} P={e0['P']} prompts, R={e0['R']} restarts, "
        f"{e0['iters']} iterations, tol {e0['tol']:g}, sigma known; float64, CPU, {torch.get_num_threads()} torch thread(s). "
        f"Roofs: read {rf['bandwidth'] / 1e9:.1f} GB/s, float64 GEMM {rf['gemm64'] / 1e9:.1f} GFLOP/s.",
        "",
        "| snr | M | before s (CPU s) | torch code s | after s (CPU s) | speed-up (CPU) | torch code: speed-up, bit-identical | after: max abs beta diff (up to order), loglik diff "
        "| iterations | prompt-iterations | roof s (bound) | of roof before / after |",
        "|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for e in r["em"]:
        lines.append(
            f"| {e['snr']:g} | {e['M']} | {e['before']['s']:.3f} ({e['before']['cpu_s']:.3f}) | {e['torch']['s']:.3f} | {e['after']['s']:.3f} ({e['after']['cpu_s']:.3f}) "
            f"| **{e['speedup']:.2f}x** ({e['speedup_cpu']:.2f}x) | {e['speedup_torch']:.2f}x, {'yes' if e['torch_identical'] else 'NO'} "
            f"| {e['max_abs_beta_diff']:.1e}, {e['max_abs_loglik_diff']:.1e} | {e['iterations']} "
            f"| {e['prompt_iterations']} of {e['P'] * e['iters']} | {e['roof_s']:.3f} ({e['roof_bound']}) | {100 * e['fraction_before']:.1f}% / {100 * e['fraction_after']:.1f}% |"
        )
    t = r["em_total"]
    same = "yes" if t["torch_identical"] else "NO"
    lines.append(f"| all | | {t['before']:.2f} | {t['torch']:.2f} | {t['after']:.2f} | **{t['speedup']:.2f}x** | {t['speedup_torch']:.2f}x, {same} | | | | {t['roof_s']:.3f} | |")
    lines += [
        "",
        "Whole mor evaluation pass (`FAMILIES['mor'].evaluate`, one group of runs sharing prompts, as run_bundle makes it):",
        "",
        "| snr | N of the runs | before s (CPU s) | after s (CPU s) | speed-up (CPU) | EM share before / after | rows identical |",
        "|---:|---|---:|---:|---:|---:|:---:|",
    ]
    for p in r["pass"]:
        lines.append(
            f"| {p['snr']:g} | {p['N']} | {p['before']['s']:.2f} ({p['before']['cpu_s']:.2f}) | {p['after']['s']:.2f} ({p['after']['cpu_s']:.2f}) "
            f"| **{p['speedup']:.2f}x** ({p['speedup_cpu']:.2f}x) | {100 * p['before']['em_s'] / p['before']['s']:.0f}% / {100 * p['after']['em_s'] / p['after']['s']:.0f}% "
            f"| {'yes' if p['identical'] else 'NO, max diff %.1e' % p['max_abs_value_diff']} ({p['rows']} rows) |"
        )
    lines += [
        "",
        "Best of the repeats, before and after alternating. Prompt-iterations: the iterations each prompt needs "
        "until it stops, summed (before: every prompt of a chunk runs until the chunk's last one stops). "
        "Roof s: that work at the roofs (flops / GEMM rate or bytes / bandwidth, the larger); exps and logs are not counted.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# part `loop`


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


def loop_markdown(r: dict, meta: dict) -> str:
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


def loop_part(args) -> tuple[dict, dict, str]:
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
        "d": args.d, "K": args.K, "N": args.N, "P": args.P, "iters": args.iters, "restarts": args.restarts, "tol": 0.0,
        "task": task.model_dump(), "cov": "identity", "seed": args.seed, "sigma": "known",
        "data_s": data_s,
    }
    return results, meta, loop_markdown(results, {**environment(), **meta})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "before-after", "loop"], default="all", help="which part to run (default: both)")
    ap.add_argument("--repeats", type=int, default=3, help="before-after: timed calls of each implementation, alternating (best kept)")
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
    ap.add_argument("--quick", action="store_true", help="tiny sizes: loop d=4 K=2 N=32 P=128, 10 iters, 2 restarts, 32 loop prompts; "
                    "before-after 64 prompts, M in [8, 32, inf], 10 iterations, 1 repeat")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.K, args.N, args.P, args.iters, args.restarts, args.loop_prompts = 4, 2, 32, 128, 10, 2, 32
        args.repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.loop_prompts = max(2, min(args.loop_prompts, args.P))

    results: dict = {}
    meta: dict = {"threads": torch.get_num_threads()}
    tables = []
    if args.part in ("all", "before-after"):
        results["before_after"], table = before_after(args)
        tables.append(table)
    if args.part in ("all", "loop"):
        results["loop"], meta["loop"], table = loop_part(args)
        tables.append(table)
    return emit("em", meta, results, "\n\n".join(tables), args.out)


if __name__ == "__main__":
    main()
