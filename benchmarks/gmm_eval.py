"""Benchmark: the gmm evaluation pass and its logistic regression, before and after issue 10.

`study.classifiers.logreg` fits L2-regularised softmax regression with intercepts on every context
by Newton's method. Before issue 10 it ran one Newton iteration over all P prompts at once with a
[P, M, c(d+1)] temporary for the Hessian, until the worst prompt's step was below 1e-10; that
code is copied below verbatim as `logreg_before`, the in-run baseline. Now `logreg_fit` keeps the
products x_i x_j (i <= j) of each example once per context, forms each step's Hessian and gradient
with two small batched GEMMs over the examples with the weights p_a delta_ab - p_a p_b of the class
pairs a <= b < c-1 (the rows of diag p - p p^T sum to 0, so the other blocks follow) and p - y,
works in chunks of prompts, and stops each prompt at its own first step below 1e-10. Same
objective, same Newton iterates from w = 0, so the probabilities agree to rounding; this script
checks that (max abs difference, want <= 1e-12). Classes absent from a context tie exactly in the
new fit (their weights are set to their mean; the minimiser has them equal), where the old one
broke the tie by rounding noise, so the predicted class may differ there: counted as "argmax
changes", with the old probabilities' largest gap at such prompts in the JSON.

What is timed, at the sizes of the default study ("quickstart", pipelines/sweeps/quickstart.yaml:
n_eval = 1024 prompts, M in [4, 16, 32, 64, 128, 256, 1024, inf], diag covariance with kappa 2,
d in {2, 4}, c in {2, 3}, snr 1), for each (d, c):

- `logreg alone`: `logreg_before` and `logreg` called on the prompts of every finite M of one
  evaluation chunk (`study.evaluation.gmm_batches`, the contexts a real pass sees; data drawn
  once, untimed), seconds summed over the M;
- `gmm evaluation pass`: `FAMILIES["gmm"].evaluate` end to end (draw the prompts, every estimator
  of the study's default list: bayes, lsa_limit, lda_plugin, lda_pooled, logreg, plus `--members`
  members' trained-model estimators `i:lsa` and `i:lsa_projected`, metrics), once with
  `classifiers.logreg` (the registry entry of `logreg`) set to `logreg_before` ("old") and once as the study ships it
  ("new"). A quickstart stack of 24 runs (one d, c, snr: 6 values of N x 4 seeds) evaluates in 4
  passes of 6 runs each (the 6 N of one seed share their prompts), hence `--members 6`; the
  members' W are c'' Lam^-1 (1 + i / 20) instead of trained ones (training is not part of the pass, and the LSA's cost does not depend on W). The
  seconds spent inside logreg during the pass are reported beside the pass's total, and the
  `evals` rows of the two passes are compared (max abs difference of value and stderr).

Timing: float64 on the CPU with `--threads` torch threads (default 1, as in a Ray trial). Each
measurement is repeated `--repeats` times, old and new alternating (the order flips every
repeat), after an untimed warm-up; the median over repeats is reported, as wall seconds and as
this process's CPU seconds (user + system). On a shared machine the CPU seconds are the steadier
of the two; compare the ratios measured in one run, not absolute seconds across runs.
Speed-up = old / new (> 1: the new code is faster).

Run from the repository root:

    .venv/bin/python benchmarks/gmm_eval.py                # quickstart sizes, 3 repeats (~3 min on 1 thread)
    .venv/bin/python benchmarks/gmm_eval.py --quick        # tiny sizes, a few seconds
    .venv/bin/python benchmarks/gmm_eval.py --out results/bench_gmm_eval.json
    .venv/bin/python benchmarks/gmm_eval.py --d 4 --c 3 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import statistics
import time
from pathlib import Path

import torch
from report import emit, environment

from study import classifiers, estimators
from study.classifiers import LOGREG_ITERS, LOGREG_L2, bayes
from study.config import TrialConfig
from study.covariance import covariance
from study.evaluation import gmm_batches
from study.families import FAMILIES

QUICKSTART_M = [4, 16, 32, 64, 128, 256, 1024, math.inf]


def logreg_before(pr: classifiers.ClassificationPrompts) -> torch.Tensor:
    """`study.classifiers.logreg` as it was before issue 10 (verbatim): the in-run baseline."""
    ctx = pr.ctx
    if ctx.exact:
        return bayes(pr)
    x, y, c = ctx.x, ctx.y, pr.c
    P, M, d = x.shape
    xt = torch.cat([x, torch.ones(P, M, 1, dtype=x.dtype, device=x.device)], dim=-1)  # [P, M, d+1]
    Y = torch.nn.functional.one_hot(y, c).to(x.dtype)
    D = c * (d + 1)
    w = torch.zeros(P, c, d + 1, dtype=x.dtype, device=x.device)
    eye = torch.eye(D, dtype=x.dtype, device=x.device)
    for _ in range(LOGREG_ITERS):
        p = torch.softmax(torch.einsum("pmi,pki->pmk", xt, w), dim=-1)
        grad = torch.einsum("pmk,pmi->pki", p - Y, xt) + LOGREG_L2 * w
        # Hessian of the summed CE: sum_m (diag p - p p^T) kron x x^T, laid out as [(k,i), (l,j)]
        # Hessian of the summed CE: sum_m (diag p - p p^T) kron x x^T, as two batched GEMMs
        q = (p[..., None] * xt[:, :, None, :]).reshape(P, M, D)  # p kron x
        H = LOGREG_L2 * eye - q.transpose(1, 2) @ q
        blocks = (q.transpose(1, 2) @ xt).reshape(P, c, d + 1, d + 1)  # sum_m p_k x x^T
        H.view(P, c, d + 1, c, d + 1).diagonal(dim1=1, dim2=3).add_(blocks.permute(0, 2, 3, 1))
        step = torch.linalg.solve(H, grad.reshape(P, D, 1)).reshape(P, c, d + 1)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    xq = torch.cat([pr.xq, torch.ones(P, 1, dtype=x.dtype, device=x.device)], dim=-1)
    return torch.softmax(torch.einsum("pki,pi->pk", w, xq), dim=-1)


VARIANTS = {"old": logreg_before, "new": classifiers.logreg}


def cpu() -> float:
    """This process's user + system CPU seconds so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, cpu() - self.c0


@contextlib.contextmanager
def shipped_logreg(fn, spent: list[float]):
    """classifiers.logreg = fn (wrapped to add its CPU seconds to spent[0]) for the block: the
    estimator registry (study.estimators) resolves `study.classifiers:logreg` when a pass builds it."""
    saved = classifiers.logreg

    def timed(pr):
        c0 = cpu()
        try:
            return fn(pr)
        finally:
            spent[0] += cpu() - c0

    classifiers.logreg = timed
    try:
        yield
    finally:
        classifiers.logreg = saved


def config(d: int, c: int, snr: float, n_eval: int, M: list[float]) -> TrialConfig:
    """A quickstart gmm configuration (training fields do not matter to the evaluation)."""
    return TrialConfig.from_flat(
        dict(family="gmm", model="lsa", param="reduced", cov="diag", kappa=2, lr=3.0, steps=300, log_every=10,
             B=16384, N=100, d=d, c=c, snr=snr, M=M, n_eval=n_eval)
    )


def members(cfg: TrialConfig, cov, n: int) -> dict:
    """n members' model estimators (`i:lsa`, `i:lsa_projected`), as `run_bundle` builds them."""
    fam, scale = FAMILIES["gmm"], 2.0 if cfg.task.c == 2 else float(cfg.task.c)
    out = {}
    for i in range(n):
        W = {"W": scale * (1 + i / 20) * cov.inv}
        ests = {"lsa": fam.lsa_estimator(W), **estimators.per_run(cfg, cov, W)}
        out.update({f"{i}:{name}": e for name, e in ests.items()})
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_logreg(cfg: TrialConfig, cov, repeats: int) -> dict:
    """Both logreg variants on every finite M of the first evaluation chunk."""
    batches = [(M, pr) for M, pr in gmm_batches(cfg.task, cov, 0, cfg.eval, True, "cpu") if math.isfinite(M)]
    for f in VARIANTS.values():  # warm-up
        f(batches[0][1])
    wall = {k: [] for k in VARIANTS}
    cpus = {k: [] for k in VARIANTS}
    per_M = {k: [[] for _ in batches] for k in VARIANTS}
    outs = {}
    for r in range(repeats):
        for name in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            f, o, tw, tc = VARIANTS[name], [], 0.0, 0.0
            for j, (_, pr) in enumerate(batches):
                with Clock() as t:
                    o.append(f(pr))
                tw, tc = tw + t.wall, tc + t.cpu
                per_M[name][j].append(t.cpu)
            wall[name].append(tw)
            cpus[name].append(tc)
            outs[name] = o
    diff = max(float((a - b).abs().max()) for a, b in zip(outs["old"], outs["new"]))
    changed, gap = 0, 0.0  # prompts whose argmax differs, and the old probabilities' largest gap there
    for a, b in zip(outs["old"], outs["new"]):
        ia, ib = a.argmax(-1), b.argmax(-1)
        changed += int((ia != ib).sum())
        gap = max([gap] + (a.gather(1, ia[:, None]) - a.gather(1, ib[:, None]))[ia != ib].tolist())
    res = {
        "M": [M for M, _ in batches],
        "prompts": batches[0][1].xq.shape[0],
        "max_abs_prob_diff": diff,
        "argmax_changes": changed,
        "argmax_changes_old_prob_gap": gap,
        **{f"{k}_wall_s": median(v) for k, v in wall.items()},
        **{f"{k}_cpu_s": median(v) for k, v in cpus.items()},
        **{f"{k}_cpu_s_per_M": [median(v) for v in per_M[k]] for k in VARIANTS},
    }
    res["speedup_wall"] = res["old_wall_s"] / res["new_wall_s"]
    res["speedup_cpu"] = res["old_cpu_s"] / res["new_cpu_s"]
    return res


def bench_pass(cfg: TrialConfig, cov, n_members: int, repeats: int) -> dict:
    """FAMILIES["gmm"].evaluate end to end with either logreg."""
    fam = FAMILIES["gmm"]
    own = members(cfg, cov, n_members)
    small = config(cfg.task.d, cfg.task.c, cfg.task.snr, 64, [4, math.inf])
    for f in VARIANTS.values():  # warm-up
        with shipped_logreg(f, [0.0]):
            fam.evaluate(small, cov, 0, members(small, cov, 1), "cpu")
    wall = {k: [] for k in VARIANTS}
    cpus = {k: [] for k in VARIANTS}
    inside = {k: [] for k in VARIANTS}
    rows = {}
    for r in range(repeats):
        for name in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            spent = [0.0]
            with shipped_logreg(VARIANTS[name], spent), Clock() as t:
                rows[name] = fam.evaluate(cfg, cov, 0, own, "cpu")
            wall[name].append(t.wall)
            cpus[name].append(t.cpu)
            inside[name].append(spent[0])
    key = lambda r: (r["estimator"], r["M"], r["metric"])  # noqa: E731
    old, new = ({key(r): r for r in rows[k]} for k in VARIANTS)
    assert old.keys() == new.keys()
    res = {
        "rows": len(old),
        "estimators": sorted({k[0] for k in old}),
        "max_abs_value_diff": max(abs(old[k]["value"] - new[k]["value"]) for k in old),
        "max_abs_stderr_diff": max(abs(old[k]["stderr"] - new[k]["stderr"]) for k in old),
        **{f"{k}_wall_s": median(v) for k, v in wall.items()},
        **{f"{k}_cpu_s": median(v) for k, v in cpus.items()},
        **{f"{k}_logreg_cpu_s": median(v) for k, v in inside.items()},
    }
    res["speedup_wall"] = res["old_wall_s"] / res["new_wall_s"]
    res["speedup_cpu"] = res["old_cpu_s"] / res["new_cpu_s"]
    return res


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"gmm evaluation at quickstart sizes: n_eval = {meta['n_eval']}, M = {meta['M']}, snr = {meta['snr']}, "
        f"{meta['members']} members (float64, CPU, {meta['threads']} torch thread(s), median of {meta['repeats']} repeats)",
        "",
        "| d | c | logreg old s (cpu / wall) | logreg new s | **logreg speed-up** (cpu / wall) | max abs prob diff | argmax changes "
        "| pass old s (cpu / wall) | of which logreg | pass new s | of which logreg | **pass speed-up** (cpu / wall) | max abs evals diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lg, ps = r["logreg"], r["pass"]
        lines.append(
            f"| {r['d']} | {r['c']} | {lg['old_cpu_s']:.2f} / {lg['old_wall_s']:.2f} | {lg['new_cpu_s']:.2f} / {lg['new_wall_s']:.2f} "
            f"| **{lg['speedup_cpu']:.1f}x** / {lg['speedup_wall']:.1f}x | {lg['max_abs_prob_diff']:.1e} | {lg['argmax_changes']} "
            f"| {ps['old_cpu_s']:.2f} / {ps['old_wall_s']:.2f} | {ps['old_logreg_cpu_s']:.2f} | {ps['new_cpu_s']:.2f} / {ps['new_wall_s']:.2f} "
            f"| {ps['new_logreg_cpu_s']:.2f} | **{ps['speedup_cpu']:.1f}x** / {ps['speedup_wall']:.1f}x "
            f"| {max(ps['max_abs_value_diff'], ps['max_abs_stderr_diff']):.1e} |"
        )
    lo = sum(r["logreg"]["old_cpu_s"] for r in results) / sum(r["logreg"]["new_cpu_s"] for r in results)
    po = sum(r["pass"]["old_cpu_s"] for r in results) / sum(r["pass"]["new_cpu_s"] for r in results)
    lines += [
        "",
        f"Over all (d, c): logreg {lo:.1f}x, whole pass {po:.1f}x (CPU seconds, old / new). "
        "logreg: summed over the finite M of one chunk of prompts; pass: `FAMILIES['gmm'].evaluate`, of which logreg = "
        "CPU seconds inside the logreg estimator. Diffs: probabilities of old vs new logreg (all prompts, all M); "
        "argmax changes: prompts whose predicted class differs (expected only where classes unseen in a context "
        "tie: exactly in the new fit, up to rounding noise in the old); "
        "evals rows (value and stderr) of the old vs new pass. CPU s per M, old / new:",
        "",
    ]
    for r in results:
        lg = r["logreg"]
        per = ", ".join(f"{int(M)}: {o:.3f} / {n:.3f}" for M, o, n in zip(lg["M"], lg["old_cpu_s_per_M"], lg["new_cpu_s_per_M"]))
        lines.append(f"- d={r['d']} c={r['c']}: {per}")
    lines.append(f"\nPeak RSS {meta['max_rss_mb']:.0f} MB.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--c", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--n-eval", type=int, default=1024, help="evaluation prompts")
    ap.add_argument("--M", type=float, nargs="+", default=QUICKSTART_M, help="test lengths (inf allowed)")
    ap.add_argument("--members", type=int, default=6, help="runs sharing the evaluation pass (each adds lsa and lsa_projected)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Ray trial; 0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: d=2 c=3, n_eval=128, M=[4, 16, 64, inf], 2 members, 1 repeat")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.c, args.n_eval, args.M, args.members, args.repeats = [2], [3], 128, [4, 16, 64, math.inf], 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for d in args.d:
        for c in args.c:
            cfg = config(d, c, args.snr, args.n_eval, list(args.M))
            cov = covariance(cfg.task.cov, d, cfg.task.kappa, cfg.task.cov_seed)
            lg = bench_logreg(cfg, cov, args.repeats)
            ps = bench_pass(cfg, cov, args.members, args.repeats)
            results.append({"d": d, "c": c, "logreg": lg, "pass": ps})
            print(f"d={d} c={c}: logreg {lg['speedup_cpu']:.1f}x, pass {ps['speedup_cpu']:.1f}x (cpu)", flush=True)
    meta = {
        **environment(),
        "n_eval": args.n_eval, "M": [float(m) for m in args.M], "snr": args.snr, "members": args.members,
        "repeats": args.repeats, "cov": "diag", "kappa": 2, "seed": 0,
        "logreg": {"L2": LOGREG_L2, "iters": LOGREG_ITERS, "tol": classifiers.LOGREG_TOL, "chunk_elems": classifiers.LOGREG_CHUNK_ELEMS},
    }
    return emit("gmm_eval", meta, results, markdown(results, meta), args.out)


if __name__ == "__main__":
    main()
