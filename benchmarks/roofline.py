"""Benchmark: the machine's roofs and each hot kernel's speed as a fraction of the roof that binds it.

Roofs, measured in this run at the torch thread count benchmarked (`--threads`, default 1, what a
Ray trial uses), once before the kernels and once after them (the machine is shared and noisy;
both are reported):

- read bandwidth: `x.sum()` over a float64 tensor of `--bw-mib` MiB (256 by default, eight times
  the 32 MiB L3), bytes / s, the median of 9 repeats after a warm-up;
- float64 GEMM rate: `torch.matmul` of two n x n float64 matrices (n = `--gemm-n`, 1024), 2 n^3
  flops / s, the median of 7 repeats after a warm-up;
- float32 GEMM rate: the same in float32 (only the peer's literal attention, item 7, runs in
  float32).

The roof used for every fraction is the MAX of the before and after medians (the machine's
capability when least disturbed; a noisy phase can only lower a measured rate), so the fractions
are conservative.

Kernels: each is timed as the median over `--repeats` repeats (5; after two warm-up calls, or one
where a call lasts a second or more) of the seconds per call, every repeat running as many calls
as last at least `--min-time` seconds (0.3); a kernel whose repeats would take more than
`--budget` seconds (8) in all gets fewer repeats, never under 2 (logreg, EM at long contexts, the
evaluation passes: their seconds per call are then the mean of 2). The process CPU seconds per
call are reported beside the wall seconds (with 1 thread, CPU < wall means the machine's cores
were oversubscribed by other processes while it ran).
Each has an analytic count of the bytes it must read and the flops it must do; reported are the
time, the achieved GB/s and GFLOP/s, and

    fraction = max(bytes / bandwidth, flops / GEMM rate) / time,

naming the roof that binds (the larger term). Inputs are built with the study's public functions
and constructors, so the benchmark measures whatever the current implementation is:

1. reduced GD step, `study.training.step({"W": W}, prob)` with `prob = study.training.Problem(V
   [S,B,c',d], xq [S,B,d], yq [S,B], gram=None, lr [S], target [S,d,d], scale=2, loss)`, float64,
   random data (V, xq standard normal / sqrt(d), yq random class indices, W ~ 0.1 randn): the
   quickstart's gmm stacks S=24, B=16384, (d, c') in {(2,1), (2,3), (4,1), (4,3)}; binary d=16 and
   d=32 at S=16, B=4096; and the quickstart's mor step (loss "squared", c'=1, float targets) at d=4,
   S=12, B=8192. Bytes: the prompt statistics read twice per step (once for the logits, once for
   the gradient), 2 x 8 S B (c' d + d), plus yq once, 8 S B. Flops: 4 S B (d^2 + c' d). With
   cache-sized chunks the second read can come from cache, so the compulsory DRAM traffic is the
   statistics read ONCE; `fraction_once` (table column "if read once") is the fraction with that
   smaller count. The step as shipped runs the fused C kernel (study/fused.py) where it is built;
   the rows marked "[torch kernels]" time the same steps with it switched off (what runs where no
   C compiler is), in the same run. The byte count is the issue's, the same for both.
2. full GD step, `step({"W_PV": [S,D,D], "W_KQ": [S,D,D]}, prob)` with gram [S,B,D,D] = Z Z^T / n
   of random Z [S,B,D,n] (symmetric PSD), D = d + c': d=4 with c'=1 and c'=3 at S=24, B=16384, and
   binary d=16 at S=16, B=4096. Bytes: the Gram and xq read twice, 2 x 8 S B (D^2 + d), plus yq
   once. Flops: S B (4 D^2 + 4 D d + 4 c' D).
3. Newton optimum, `study.optimum.empirical_optimum(V [B,c',d], xq [B,d], y [B], W0=None,
   loss="ce")` on one member's training statistics from `study.gmm.sample_train` (quickstart task
   d=4, snr 2, diag kappa 2, N=100, B=16384) with c'=3 (c=3) and c'=1 (c=2), passed as
   `study.training.train` passes them: `prob.V[s], prob.xq[s], prob.yq[s]` of a Problem (S=1), so in
   the Problem's memory layout. Reported per call and per Newton iteration (`Optimum.iterations`).
   Flops per Hessian evaluation (iterations + 1 of them, the last at the optimum): the Hessian as
   ONE GEMM over the prompts of the Kronecker factors (V^T A V) (x) (x_q x_q^T), 2 B d^4, + 2 B
   (c'^2 + 1) d^2 to form the factors, + 6 B c' d^2 for the logits and gradient (the older form
   with c' GEMMs of the features, 2 B c' d^4 + 2 B d^4, does more work than it must; the count is
   the work the cheaper form needs, the same for every checkout); the line search's loss-only
   evaluations are not counted. Bytes: V and xq once per evaluation. GEMM-bound.
4. logreg, `study.classifiers.logreg(pr)` on every context of one chunk of
   `study.gmm.eval_chunks(task, cov, seed, n_eval=1024, lengths=[4,16,32,64,128,256,1024,inf],
   within=False)` (what one evaluation runs; quickstart task d=4, c=3, snr 2, diag kappa 2), the
   `study.classifiers.ClassificationPrompts` built as `study.evaluation.gmm_batches` builds them. The Newton
   steps are COUNTED in every timed call: the systems solved by the torch.linalg.solve calls made
   inside logreg (the batch's leading size: one system per prompt and step), i.e. the
   prompt-steps the implementation ran, reported per M as steps per prompt (if an implementation
   made no such call, LOGREG_ITERS steps for every prompt are assumed and the row says
   "estimated"). Work per prompt-step at context length M, in the form that exploits the symmetries
   (the U = c(c-1)/2 class pairs of diag p - p p^T, the d(d+1)/2 distinct x_i x_j; a form with
   the full [c(d+1)]^2 Hessian GEMM does about 4x more for c=3, d=4, and the count is the same for
   every checkout): flops 2 M U (d + 1 + d(d+1)/2) + 4 M (c-1)(d+1) (logits and gradient); bytes
   x and y read, 8 M (d + 1). GEMM-bound.
5. EM, `study.em.fit(x, y, em.init_beta(x, y, z), sigma=0.5, iters=50, tol=1e-8)` at the
   quickstart's mor evaluation: d=4, K=2, P=512 prompts of `study.mor.sample_prompts(..., stream=
   "eval")` (snr 5, sigma 0.5, fresh components), M in {8, 32, 128, 512}, R=4 restarts, z
   standard normal. The iterations are counted as for logreg: the prompts in the M-step's batched
   torch.linalg.solve, summed over its calls (an implementation that keeps converged prompts
   iterating counts them too); reported as iterations per prompt, beside `Fit.iterations` (the
   most any prompt used; the count if no solve call is seen, "estimated"). Per prompt-iteration:
   bytes 8 M (d + 1) (x and y read), flops 2 R K M d (E-step) + 2 R K M d^2 (M-step).
6. one evaluation pass, `study.families.FAMILIES[family].evaluate(cfg, cov, seed, {}, "cpu")` for
   one quickstart configuration of each family (`pipelines.sweep.load_sweep("quickstart")`, the shipped
   pipelines/sweeps/quickstart.yaml: the first gmm configuration with d=4, c=3, the costliest, and
   the first mor configuration; seed 0), the prompts' generation included. The roof stated is the
   sum of the counted parts' roofs: logreg (gmm) or EM (mor), wrapped in the pass (the module's
   `classifiers.logreg` or `em.fit` replaced by a counting wrapper for the duration)
   and counted as in items 4 and 5; the other estimators and the data generation are not counted,
   so the fraction is a lower bound. The seconds spent inside logreg / EM are reported as their
   share of the pass.
7. peer ratio: one full-batch GD step (forward, autograd backward, update) of a single-layer linear
   transformer with the attention matrix formed literally, float32, torch autograd, at d=16,
   N=128, B=4096, binary labels (+-1; the query's label 0), the logistic loss on the query's label
   output; two versions, both re-implemented here (not copied):
   - "Ahn-style": the single-layer forward of Ahn et al.'s linear_transformer.py
     (chengxiang/LinearTransformer) as it computes: tokens as the rows of Z [B, N+1, d+1], trainable
     d x d matrices P and Q embedded at every forward as P_full = [[P,0],[0,1]], Q_full =
     [[Q,0],[0,0]], the scores Z Q_full Z^T [B, N+1, N+1], a mask MATRIX (the identity with the
     query's entry 0) applied by a product, and every token's output Z + scores mask (Z P_full^T)
     / N, the products three-operand einsums as there (torch, without opt_einsum, contracts them
     left to right, so scores x mask costs 2 (N+1)^3 per prompt). This is the peer of the ratio.
   - "lean literal": f(Z) = Z + W_PV Z (Z^T W_KQ Z) / N with no mask product (the project's own
     definition, the query column included), W_PV and W_KQ [D, D] trained whole: a tighter literal
     baseline, reported beside it.
   Against them, on the same prompts (their statistics V, xq and Z Z^T / N, repeated for S=16
   members): the project's reduced step and full step, S=16 runs bundled in float64. The four are
   timed with their repeats alternating (at least 3), so that machine noise hits all of them.
   Ratio = project run-steps / s (S / seconds per bundled step) / peer steps / s, by wall time
   (medians; per repeat) and by process CPU time. The losses at the same parameters are compared
   (float32 literal against float64 statistics: well under 1e-4; the Ahn-style Q plays W^T). Flops,
   T = N + 1, D = d + 1: five batched products with the attention matrix (two forward, three
   backward), 10 B T^2 D, + 8 B T D^2 for the products with the D x D weights, + 4 B T^3 for the
   Ahn-style mask products (forward and backward); bytes: the attention matrix and its gradient
   written and read once each, 16 B T^2 (Ahn-style: twice that, the masked matrix too). Their
   roof is the float32 GEMM rate.

`--compare ROOT` runs this same script in a subprocess with PYTHONPATH=ROOT and cwd=ROOT (another
checkout, e.g. a `git worktree` of an older commit), after this checkout's run, and prints both
results side by side with the speed-up per kernel (ROOT's seconds / this checkout's seconds; > 1:
this checkout is faster; also by process CPU seconds, which an oversubscribed machine inflates
less); each side's roofs and fractions are its own. The JSON then holds both.
The machine may be shared and noisy: compare fractions and speed-ups measured in one run.

Run from the repository root (1 thread, on the shared 2-core machine of issue 10: about 2.5
minutes; --compare /tmp/base added about 3.3 more for the code before the issue; --quick ~10 s):

    .venv/bin/python benchmarks/roofline.py                        # threads 1
    .venv/bin/python benchmarks/roofline.py --threads 2
    .venv/bin/python benchmarks/roofline.py --compare /tmp/base    # before/after in one run
    .venv/bin/python benchmarks/roofline.py --quick                # tiny sizes, seconds (tests/test_roofline.py)
    .venv/bin/python benchmarks/roofline.py --out results/bench_roofline.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from report import emit

from study import classifiers, em, gmm, mor, training
from study.config import GMMTask, MORTask, TrialConfig
from study.covariance import covariance
from study.families import FAMILIES
from study.optimum import empirical_optimum

try:  # the fused C kernels (issue 10); absent from older checkouts (--compare), whose study/ may then
    from study import fused  # find this checkout's module through the editable install: not theirs

    fused = fused if Path(fused.__file__).parent == Path(training.__file__).parent else None
except ImportError:
    fused = None

F64, F32 = torch.float64, torch.float32
INF = math.inf

# quickstart shapes (pipelines/sweeps/quickstart.yaml); --quick shrinks them
SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "reduced": [("gmm", 2, 1, 24, 16384), ("gmm", 2, 3, 24, 16384), ("gmm", 4, 1, 24, 16384), ("gmm", 4, 3, 24, 16384),
                    ("gmm", 16, 1, 16, 4096), ("gmm", 32, 1, 16, 4096), ("mor", 4, 1, 12, 8192)],
        "full": [(4, 1, 24, 16384), (4, 3, 24, 16384), (16, 1, 16, 4096)],
        "newton": {"d": 4, "cp": [3, 1], "B": 16384, "N": 100},
        "logreg": {"d": 4, "c": 3, "n_eval": 1024, "M": [4, 16, 32, 64, 128, 256, 1024, INF]},
        "em": {"d": 4, "K": 2, "P": 512, "M": [8, 32, 128, 512], "R": 4, "iters": 50},
        "eval": None,  # the quickstart configurations as they are
        "peer": {"d": 16, "N": 128, "B": 4096, "S": 16},
    },
    "quick": {
        "reduced": [("gmm", 4, 1, 4, 2048), ("gmm", 4, 3, 4, 2048), ("mor", 4, 1, 4, 2048)],
        "full": [(4, 1, 4, 2048), (4, 3, 4, 2048)],
        "newton": {"d": 3, "cp": [3, 1], "B": 2048, "N": 20},
        "logreg": {"d": 3, "c": 3, "n_eval": 128, "M": [4, 16, 64, INF]},
        "em": {"d": 3, "K": 2, "P": 128, "M": [8, 32], "R": 2, "iters": 20},
        "eval": {"gmm": {"n_eval": 64, "M": [4, 16, 64, INF]}, "mor": {"n_eval": 64, "M": [8, 32, INF], "em_iters": 10}},
        "peer": {"d": 4, "N": 16, "B": 512, "S": 16},
    },
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# timing and roofs


LONG_CALL = 1.0  # seconds: a call this long is its own warm-up (no second one)


def plan(fn: Callable[[], Any], min_time: float, repeats: int, budget: float) -> tuple[int, int]:
    """Warm up fn and choose (calls per repeat, repeats).

    Two warm-up calls (one when the first lasts LONG_CALL or more); a repeat runs the calls that
    last at least min_time by the last warm-up's time; the repeats are at most `repeats`, fewer
    (never under 2) where they would take more than `budget` seconds in all.
    """
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    if t < LONG_CALL:
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
    n = max(1, math.ceil(min_time / max(t, 1e-7)))
    return n, max(2, min(repeats, int(budget / (n * max(t, 1e-7)))))


def run_calls(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """Wall and process-CPU seconds per call over n calls."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def summary(wall: list[float], cpu: list[float], n: int) -> dict[str, Any]:
    return {"s": statistics.median(wall), "s_repeats": wall, "cpu_s": statistics.median(cpu), "cpu_s_repeats": cpu, "calls_per_repeat": n}


def timed(fn: Callable[[], Any], a) -> dict[str, Any]:
    """Seconds per call of fn: warm-up (`plan`), then repeats of n calls (n: >= a.min_time each)."""
    n, reps = plan(fn, a.min_time, a.repeats, a.budget)
    wall, cpu = zip(*(run_calls(fn, n) for _ in range(reps)))
    return summary(list(wall), list(cpu), n)


def measure_roofs(bw_mib: int, gemm_n: int) -> dict[str, Any]:
    """Read bandwidth (bytes/s), float64 and float32 GEMM rates (flop/s): medians, and every repeat."""
    x = torch.ones(bw_mib * (1 << 20) // 8, dtype=F64)  # touched: its pages exist
    x.sum()
    bw = []
    for _ in range(9):
        t0 = time.perf_counter()
        x.sum()
        bw.append(x.numel() * 8 / (time.perf_counter() - t0))
    del x
    out = {"bandwidth": statistics.median(bw), "bandwidth_repeats": bw}
    g = torch.Generator().manual_seed(1)
    for name, dt in (("gemm64", F64), ("gemm32", F32)):
        a, b = torch.randn(gemm_n, gemm_n, generator=g, dtype=dt), torch.randn(gemm_n, gemm_n, generator=g, dtype=dt)
        c = torch.empty(gemm_n, gemm_n, dtype=dt)
        torch.matmul(a, b, out=c)
        rates = []
        for _ in range(7):
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            rates.append(2 * gemm_n**3 / (time.perf_counter() - t0))
        out[name], out[name + "_repeats"] = statistics.median(rates), rates
    return out


ROOF_NAMES = {"bandwidth": "bandwidth", "gemm64": "GEMM f64", "gemm32": "GEMM f32"}


def roof_seconds(bytes_: float, flops: float, gemm: str, roofs: dict[str, float]) -> tuple[float, str]:
    """The roof's time for a part and the roof that binds it."""
    tb, tf = bytes_ / roofs["bandwidth"], flops / roofs[gemm]
    return (tb, "bandwidth") if tb >= tf else (tf, gemm)


def finish(k: dict[str, Any], roofs: dict[str, float]) -> dict[str, Any]:
    """Achieved rates, the roof's time (summed over the kernel's parts) and the fraction."""
    parts = k["parts"]
    k["bytes"], k["flops"] = sum(p["bytes"] for p in parts), sum(p["flops"] for p in parts)
    k["gbps"], k["gflops"] = k["bytes"] / k["s"] / 1e9, k["flops"] / k["s"] / 1e9
    binds = []
    k["roof_s"] = 0.0
    for p in parts:
        t, b = roof_seconds(p["bytes"], p["flops"], p["gemm"], roofs)
        k["roof_s"] += t
        binds.append(b)
    k["binds"] = binds[0] if len(set(binds)) == 1 else "mixed"
    k["fraction"] = k["roof_s"] / k["s"]
    k["fraction_cpu"] = k["roof_s"] * torch.get_num_threads() / k["cpu_s"]  # by process CPU time (summed over threads)
    if "bytes_once" in k:
        t, _ = roof_seconds(k["bytes_once"], k["flops"], parts[0]["gemm"], roofs)
        k["fraction_once"] = t / k["s"]
    return k


def part(bytes_: float, flops: float, gemm: str = "gemm64") -> dict[str, Any]:
    return {"bytes": float(bytes_), "flops": float(flops), "gemm": gemm}


# ----------------------------------------------------------------------------------------------
# 1, 2: GD steps


def problem(S: int, B: int, d: int, cp: int, loss: str, full: bool, seed: int) -> training.Problem:
    """A random stack of S problems built with the public Problem constructor (the fields' shapes)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(S, B, cp, d, generator=g, dtype=F64) / math.sqrt(d)
    xq = torch.randn(S, B, d, generator=g, dtype=F64) / math.sqrt(d)
    yq = torch.randn(S, B, generator=g, dtype=F64) if loss == "squared" else torch.randint(2 if cp == 1 else cp, (S, B), generator=g)
    gram = None
    if full:
        D, n = d + cp, d + cp + 2
        Z = torch.randn(S, B, D, n, generator=g, dtype=F64)
        gram = Z @ Z.transpose(-1, -2) / n
        del Z
    return training.Problem(
        V=V, xq=xq, yq=yq, gram=gram, lr=torch.full((S,), 0.5, dtype=F64),
        target=torch.eye(d, dtype=F64).expand(S, d, d).contiguous(), scale=2.0 if loss == "ce" else 1.0, loss=loss,
    )


def reduced_kernel(family: str, d: int, cp: int, S: int, B: int, a, torch_kernels: bool = False) -> dict[str, Any]:
    """training.step as shipped (the fused C step where it is built), or with `torch_kernels` as it
    runs where it is not (fused.reduced_applies patched to False: lsa.reduced_loss_grad over chunks)."""
    loss = "squared" if family == "mor" else "ce"
    prob = problem(S, B, d, cp, loss, False, seed=1000 * d + cp)
    W = 0.1 * torch.randn(S, d, d, generator=torch.Generator().manual_seed(2), dtype=F64)
    with unittest.mock.patch.object(fused, "reduced_applies", lambda W, V: False) if torch_kernels else contextlib.nullcontext():
        t = timed(lambda: training.step({"W": W}, prob), a)
    stats = 8 * S * B * (cp * d + d)
    return {
        "group": "reduced step", "name": f"reduced {family} d={d} c'={cp} S={S} B={B}" + (" [torch kernels]" if torch_kernels else ""), **t,
        "parts": [part(2 * stats + 8 * S * B, 4 * S * B * (d * d + cp * d))], "bytes_once": stats + 8 * S * B,
        "shape": {"family": family, "d": d, "c'": cp, "S": S, "B": B, "loss": loss},
        "member_steps_per_s": S / t["s"],
    }


def full_flops(S: int, B: int, d: int, cp: int) -> int:
    D = d + cp
    return S * B * (4 * D * D + 4 * D * d + 4 * cp * D)


def full_kernel(d: int, cp: int, S: int, B: int, a) -> dict[str, Any]:
    prob = problem(S, B, d, cp, "ce", True, seed=2000 * d + cp)
    g = torch.Generator().manual_seed(3)
    D = d + cp
    params = {"W_PV": 0.1 * torch.randn(S, D, D, generator=g, dtype=F64), "W_KQ": 0.1 * torch.randn(S, D, D, generator=g, dtype=F64)}
    t = timed(lambda: training.step(params, prob), a)
    return {
        "group": "full step", "name": f"full gmm d={d} c'={cp} S={S} B={B}", **t,
        "parts": [part(2 * 8 * S * B * (D * D + d) + 8 * S * B, full_flops(S, B, d, cp))],
        "bytes_once": 8 * S * B * (D * D + d) + 8 * S * B,
        "shape": {"d": d, "c'": cp, "D": D, "S": S, "B": B}, "member_steps_per_s": S / t["s"],
    }


# ----------------------------------------------------------------------------------------------
# 3: Newton


def newton_kernel(d: int, cp: int, B: int, N: int, a) -> dict[str, Any]:
    c = 2 if cp == 1 else cp
    task = GMMTask(d=d, c=c, snr=2.0, cov="diag", kappa=2.0)
    cov = covariance("diag", d, 2.0)
    st = gmm.sample_train(task, cov, N, B, seed=0)
    # one member of a Problem, as study.training.train hands it over (in the Problem's memory layout)
    prob = training.Problem(V=st.V[None], xq=st.xq[None], yq=st.yq[None], gram=None, lr=torch.ones(1, dtype=F64),
                            target=cov.inv[None].clone(), scale=2.0 if c == 2 else float(c), loss="ce")
    out = {}

    def call():
        out["opt"] = empirical_optimum(prob.V[0], prob.xq[0], prob.yq[0], None, "ce")

    t = timed(call, a)
    it = int(out["opt"].iterations)
    evals = it + 1  # one Hessian per iteration, one more at the optimum
    per_eval = 2 * B * d**4 + 2 * B * (cp * cp + 1) * d * d + 6 * B * cp * d * d
    return {
        "group": "Newton optimum", "name": f"newton d={d} c'={cp} B={B}", **t,
        "parts": [part(evals * 8 * B * (cp * d + d), evals * per_eval)],
        "shape": {"d": d, "c'": cp, "B": B, "N": N}, "iterations": it, "s_per_iteration": t["s"] / it,
        "converged": bool(out["opt"].converged),
    }


# ----------------------------------------------------------------------------------------------
# 4: logreg (and the counting of its Newton iterations)


def logreg_cost(M: int, d: int, c: int, prompt_steps: int) -> dict[str, Any]:
    """Bytes and flops of `prompt_steps` Newton steps of logreg, each on one prompt of M examples.

    Per step, the form that exploits the symmetries (the U = c(c-1)/2 class pairs of diag p - p p^T,
    the d(d+1)/2 distinct x_i x_j): 2 M U (d + 1 + d(d+1)/2) for the Hessian's sums, 2 M (c-1)(d+1)
    each for the logits and the gradient; x and y read, 8 M (d + 1).
    """
    U = c * (c - 1) // 2
    per = 2 * M * (U * (d + 1 + d * (d + 1) // 2) + 2 * (c - 1) * (d + 1))
    return part(prompt_steps * 8 * M * (d + 1), prompt_steps * per)


def em_cost(M: int, d: int, R: int, K: int, prompt_iters: int) -> dict[str, Any]:
    """Bytes and flops of `prompt_iters` EM iterations, each on one prompt of M examples (R restarts):
    x and y read, 8 M (d + 1); E-step 2 R K M d, M-step 2 R K M d^2."""
    return part(prompt_iters * 8 * M * (d + 1), prompt_iters * (2 * R * K * M * d + 2 * R * K * M * d * d))


@contextlib.contextmanager
def counting_solves():
    """Count torch.linalg.solve calls and the systems they solve (the batch's leading size) meanwhile."""
    real = torch.linalg.solve
    tally = {"calls": 0, "rows": 0}

    def solve(A, *args, **kw):
        tally["calls"] += 1
        tally["rows"] += A.shape[0] if A.dim() > 2 else 1
        return real(A, *args, **kw)

    torch.linalg.solve = solve
    try:
        yield tally
    finally:
        torch.linalg.solve = real


class Probe:
    """Wraps logreg (`kind` "logreg") or em.fit ("em"): its wall time, and per call on a finite context
    the prompt-iterations it ran (the rows of its torch.linalg.solve calls: one system per prompt and
    Newton step, or per prompt and EM M-step) and their cost. Where the fused C kernels ran (no torch
    solves), the call is repeated once, untimed, with them switched off, to count the iterations of
    the same algorithm (each prompt stops by the same rule either way); the count is kept for the
    later passes (`reset` keeps it)."""

    def __init__(self, fn, kind: str):
        self.fn, self.kind, self.seconds, self.calls, self.counted = fn, kind, 0.0, [], {}

    def __call__(self, *args, **kw):
        with counting_solves() as tally:
            t0 = time.perf_counter()
            out = self.fn(*args, **kw)
            self.seconds += time.perf_counter() - t0
        if self.kind == "logreg" and args[0].ctx.exact:
            return out
        at = len(self.calls)
        if tally["rows"] == 0 and fused is not None and fused.library() is not None:
            if at not in self.counted:
                switch = "logreg_applies" if self.kind == "logreg" else "em_applies"
                with unittest.mock.patch.object(fused, switch, lambda *_: False), counting_solves() as torch_tally:
                    self.fn(*args, **kw)
                self.counted[at] = dict(torch_tally)
            tally = self.counted[at]
        if self.kind == "logreg":
            pr = args[0]
            P, M, d = pr.ctx.x.shape
            estimated = tally["rows"] == 0  # an implementation without torch.linalg.solve: the budget
            rows = classifiers.LOGREG_ITERS * P if estimated else tally["rows"]
            cost = logreg_cost(M, d, pr.c, rows)
        else:
            x, beta0 = args[0], args[2]
            P, M, d = x.shape
            R, K = beta0.shape[1], beta0.shape[2]
            estimated = tally["rows"] == 0
            rows = int(out.iterations) * P if estimated else tally["rows"]
            cost = em_cost(M, d, R, K, rows)
        self.calls.append({"M": M, "P": P, "prompt_iterations": rows, "mean_iterations": rows / P, "solve_calls": tally["calls"],
                           "estimated": estimated, **cost, **({"max_iterations": int(out.iterations)} if self.kind == "em" else {})})
        return out

    def reset(self):
        self.seconds, self.calls = 0.0, []


def logreg_kernel(d: int, c: int, n_eval: int, lengths: list[float], a) -> dict[str, Any]:
    task = GMMTask(d=d, c=c, snr=2.0, cov="diag", kappa=2.0)
    cov = covariance("diag", d, 2.0)
    chunk = next(gmm.eval_chunks(task, cov, 0, n_eval, lengths, within=False))
    prompts = [classifiers.ClassificationPrompts(chunk.tasks, ctx, cov, c) for ctx in chunk.contexts]
    probe = Probe(classifiers.logreg, "logreg")

    def call():
        probe.reset()
        for pr in prompts:
            probe(pr)

    t = timed(call, a)
    P = chunk.tasks.xq.shape[0]
    return {
        "group": "logreg", "name": f"logreg d={d} c={c} P={P} M={'/'.join(str(int(m)) for m in lengths if m < INF)}", **t,
        "parts": [part(x["bytes"], x["flops"]) for x in probe.calls],
        "shape": {"d": d, "c": c, "P": P, "M": [m for m in lengths]}, "per_M": probe.calls,
        "iterations": {x["M"]: round(x["mean_iterations"], 2) for x in probe.calls}, "iterations_estimated": any(x["estimated"] for x in probe.calls),
    }


# ----------------------------------------------------------------------------------------------
# 5: EM


def em_kernel(d: int, K: int, P: int, M: int, R: int, iters: int, a) -> dict[str, Any]:
    task = MORTask(d=d, K=K, snr=5.0, sigma=0.5, components="fresh")
    p = mor.sample_prompts(task, covariance("identity", d), M, P, seed=0, stream="eval")
    z = torch.randn(P, R, K, d, generator=torch.Generator().manual_seed(M), dtype=F64)
    probe = Probe(em.fit, "em")

    def call():
        probe.reset()
        probe(p.x, p.y, em.init_beta(p.x, p.y, z), 0.5, iters, 1e-8)

    t = timed(call, a)
    c = probe.calls[0]
    return {
        "group": "EM", "name": f"em d={d} K={K} P={P} M={M} R={R}", **t,
        "parts": [part(c["bytes"], c["flops"])], "shape": {"d": d, "K": K, "P": P, "M": M, "R": R, "iters": iters},
        "iterations": c["max_iterations"], "mean_iterations": c["mean_iterations"], "iterations_estimated": c["estimated"],
        "s_per_prompt_iteration": t["s"] / c["prompt_iterations"],
    }


# ----------------------------------------------------------------------------------------------
# 6: one evaluation pass


def quickstart_configs(override: dict[str, dict[str, Any]] | None) -> dict[str, TrialConfig]:
    """The first gmm configuration with d=4, c=3 and the first mor configuration of the quickstart
    (`override`: family -> fields replaced, for --quick)."""
    from pipelines.sweep import load_sweep

    sweep = load_sweep("quickstart")  # the shipped sweep of the checkout imported
    gmm_cfg = next(c for c in sweep.configs if c.task.family == "gmm" and c.task.d == 4 and c.task.c == 3)
    mor_cfg = next(c for c in sweep.configs if c.task.family == "mor")
    out = {"gmm": gmm_cfg, "mor": mor_cfg}
    if override:
        out = {k: TrialConfig.from_flat({**c.to_flat(), **override.get(k, {})}) for k, c in out.items()}
    return out


def eval_kernel(family: str, cfg: TrialConfig, a) -> dict[str, Any]:
    t = cfg.task
    cov = covariance(t.cov, t.d, t.kappa, t.cov_seed)
    if family == "gmm":
        probe, target, attr = Probe(classifiers.logreg, "logreg"), classifiers, "logreg"
    else:
        probe, target, attr = Probe(em.fit, "em"), em, "fit"
    shares: list[float] = []

    def call():
        probe.reset()
        t0 = time.perf_counter()
        FAMILIES[family].evaluate(cfg, cov, 0, {}, "cpu")
        shares.append(probe.seconds / (time.perf_counter() - t0))

    saved = getattr(target, attr)
    try:
        setattr(target, attr, probe)
        res = timed(call, a)
    finally:
        setattr(target, attr, saved)
    name = "logreg" if family == "gmm" else "EM"
    shape = {"d": t.d, "n_eval": cfg.eval.n_eval, "M": list(cfg.eval.M), "estimators": list(cfg.estimators)}
    shape.update({"c": t.c, "snr": t.snr} if family == "gmm" else {"K": t.K, "snr": t.snr, "em_restarts": cfg.eval.em_restarts})
    return {
        "group": "evaluation pass", "name": f"evaluate {family} quickstart d={t.d} " + (f"c={t.c}" if family == "gmm" else f"K={t.K}"), **res,
        "parts": [part(x["bytes"], x["flops"]) for x in probe.calls], "counted": name,
        "share": statistics.median(shares[-len(res["s_repeats"]) * res["calls_per_repeat"] :]),  # the timed calls "config": cfg.to_flat(), "shape": shape,
        "iterations": {x["M"]: round(x["mean_iterations"], 2) for x in probe.calls}, "iterations_estimated": any(x["estimated"] for x in probe.calls),
    }


# ----------------------------------------------------------------------------------------------
# 7: the peer (a literal linear transformer, float32, autograd) against the project's step


def peer_data(d: int, N: int, B: int, seed: int) -> dict[str, torch.Tensor]:
    """B binary GMM prompts (Lam = I, class means on the sphere of radius 2) as raw examples."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, 2, d, generator=g, dtype=F64)
    means = 2.0 * u / u.norm(dim=-1, keepdim=True)
    y = torch.randint(2, (B, N), generator=g)
    x = torch.gather(means, 1, y[..., None].expand(B, N, d)) + torch.randn(B, N, d, generator=g, dtype=F64)
    yq = torch.randint(2, (B,), generator=g)
    xq = means[torch.arange(B), yq] + torch.randn(B, d, generator=g, dtype=F64)
    ytil = 2.0 * y.to(F64) - 1.0
    tokens = torch.cat([torch.cat([x, ytil[..., None]], -1), torch.cat([xq, torch.zeros(B, 1, dtype=F64)], -1)[:, None]], 1)
    return {"tokens": tokens, "yq": yq, "x": x, "ytil": ytil, "xq": xq}  # tokens [B, N+1, d+1]: the query last, its label 0


def logistic(logit: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
    return F.softplus(-(2.0 * yq.to(logit.dtype) - 1.0) * logit).mean()


class PeerLSA(torch.nn.Module):
    """The single-layer forward of Ahn et al.'s linear_transformer.py, re-implemented.

    Tokens are the rows of Zt [B, N+1, d+1]. The trainable d x d matrices P and Q are embedded at
    every forward as P_full = [[P, 0], [0, 1]] and Q_full = [[Q, 0], [0, 0]]; the attention matrix
    Zt Q_full Zt^T [B, N+1, N+1] is formed literally, a mask matrix (the identity with the query's
    entry 0) keeps the query out of the keys, and every token's output is Zt + scores mask
    (Zt P_full^T) / N, the products written as einsums as there (torch contracts a three-operand
    einsum left to right without opt_einsum, so scores x mask is a [N+1, N+1] product per prompt).
    The prediction is the query's label coordinate. With Q = W^T it is the project's reduced V W x_q.
    """

    def __init__(self, d: int):
        super().__init__()
        self.P = torch.nn.Parameter(torch.zeros(d, d))
        self.Q = torch.nn.Parameter(torch.zeros(d, d))

    def forward(self, Zt: torch.Tensor) -> torch.Tensor:
        T, D = Zt.shape[1], Zt.shape[2]
        d, n = D - 1, T - 1
        P_full = torch.zeros(D, D, dtype=Zt.dtype)
        P_full[:d, :d] = self.P
        P_full[d, d] = 1.0
        Q_full = torch.zeros(D, D, dtype=Zt.dtype)
        Q_full[:d, :d] = self.Q
        mask = torch.eye(T, dtype=Zt.dtype)
        mask[n, n] = 0.0
        scores = torch.einsum("bti,ij,bsj->bts", Zt, Q_full, Zt)
        values = torch.einsum("ij,bsj->bsi", P_full, Zt)
        return Zt + torch.einsum("bts,su,bui->bti", scores, mask, values) / n

    def loss(self, Zt: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        return logistic(self.forward(Zt)[:, -1, -1], yq)


class LeanLSA(torch.nn.Module):
    """The literal LSA without the peer's mask product: f(Z) = Z + W_PV Z (Z^T W_KQ Z) / N with
    Z [B, d+1, N+1] (columns are tokens), W_PV and W_KQ trained whole (the project's full form,
    whose Gram matrix includes the query column), every token's output formed."""

    def __init__(self, D: int):
        super().__init__()
        self.W_PV = torch.nn.Parameter(torch.zeros(D, D))
        self.W_KQ = torch.nn.Parameter(torch.zeros(D, D))

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        n = Z.shape[-1] - 1
        scores = Z.transpose(1, 2) @ (self.W_KQ @ Z)  # [B, N+1, N+1]: every token against every token
        return Z + (self.W_PV @ Z) @ scores / n

    def loss(self, Z: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        return logistic(self.forward(Z)[:, -1, -1], yq)


def gd_step(model: torch.nn.Module, Z: torch.Tensor, yq: torch.Tensor, lr: float) -> torch.Tensor:
    """One full-batch GD step by autograd: forward, backward, update."""
    loss = model.loss(Z, yq)
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return loss.detach()


def peer_kernels(d: int, N: int, B: int, S: int, a) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = peer_data(d, N, B, seed=7)
    tokens, yq = data["tokens"], data["yq"]
    D, T = d + 1, N + 1
    # the project's statistics of the same prompts, repeated for S members (each its own copy)
    V = torch.einsum("bn,bnd->bd", data["ytil"], data["x"])[:, None, :] / N  # [B, 1, d]
    gram = tokens.transpose(1, 2) @ tokens / N  # [B, D, D], the query column included
    rep = lambda t: t[None].repeat(S, *([1] * t.dim()))  # noqa: E731
    prob = training.Problem(
        V=rep(V), xq=rep(data["xq"]), yq=rep(yq), gram=rep(gram), lr=torch.full((S,), 0.5, dtype=F64),
        target=torch.eye(d, dtype=F64).expand(S, d, d).contiguous(), scale=2.0, loss="ce",
    )
    g = torch.Generator().manual_seed(5)
    W_PV0, W_KQ0 = 0.1 * torch.randn(D, D, generator=g, dtype=F64), 0.1 * torch.randn(D, D, generator=g, dtype=F64)
    W0, P0 = W_KQ0[:d, :d], W_PV0[:d, :d]
    reduced_params = {"W": W0.expand(S, d, d).contiguous()}
    full_params = {"W_PV": W_PV0.expand(S, D, D).contiguous(), "W_KQ": W_KQ0.expand(S, D, D).contiguous()}
    Zt = tokens.to(F32).contiguous()  # the peer's layout: tokens as rows
    Z = tokens.transpose(1, 2).to(F32).contiguous()  # the lean layout: tokens as columns

    peer, lean = PeerLSA(d), LeanLSA(D)
    W_PVr = torch.zeros(D, D, dtype=F64)
    W_PVr[d, d] = 1.0
    check = {}  # the same losses at the same parameters (float32 literal against float64 statistics)
    with torch.no_grad():
        reduced_loss, full_loss = training.step(reduced_params, prob)[0], training.step(full_params, prob)[0]
        peer.P.copy_(P0.to(F32))
        peer.Q.copy_(W0.T.to(F32))  # the peer's Q plays W^T
        check["peer_vs_reduced"] = float((reduced_loss - float(peer.loss(Zt, yq))).abs().max())
        lean.W_PV.copy_(W_PVr.to(F32))
        lean.W_KQ.copy_(torch.block_diag(W0, torch.zeros(1, 1, dtype=F64)).to(F32))
        check["lean_vs_reduced"] = float((reduced_loss - float(lean.loss(Z, yq))).abs().max())
        lean.W_PV.copy_(W_PV0.to(F32))
        lean.W_KQ.copy_(W_KQ0.to(F32))
        check["lean_vs_full"] = float((full_loss - float(lean.loss(Z, yq))).abs().max())

    variants = {
        "peer": lambda: gd_step(peer, Zt, yq, 1e-3),
        "lean": lambda: gd_step(lean, Z, yq, 1e-3),
        "reduced": lambda: training.step(reduced_params, prob),
        "full": lambda: training.step(full_params, prob),
    }
    plans = {name: plan(fn, a.min_time, a.repeats, a.budget) for name, fn in variants.items()}  # warm-up
    calls = {name: n for name, (n, _) in plans.items()}
    reps = max(min(3, a.repeats), plans["peer"][1])  # the peer is the longest: its budget, at least 3 repeats
    secs: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):  # the four alternate: machine noise hits all of them
        for name, fn in variants.items():
            w, c = run_calls(fn, calls[name])
            secs[name].append(w)
            cpus[name].append(c)
    med = {k: statistics.median(v) for k, v in secs.items()}
    t = {k: summary(secs[k], cpus[k], calls[k]) for k in variants}
    shape = {"d": d, "N": N, "B": B}
    stats = 8 * S * B * (d + d)
    big, small = 2 * B * T * T * D, 2 * B * T * D * D  # flops of one product with the attention matrix / with a D x D weight
    rows = [
        {"group": "peer", "name": f"peer LSA (Ahn-style einsum forward) f32 d={d} N={N} B={B}", **t["peer"],
         "parts": [part(32 * B * T * T, 2 * 2 * B * T**3 + 5 * big + 4 * small, "gemm32")], "shape": shape},
        {"group": "peer", "name": f"peer LSA, lean literal f32 d={d} N={N} B={B}", **t["lean"],
         "parts": [part(16 * B * T * T, 5 * big + 4 * small, "gemm32")], "shape": shape},
        {"group": "peer", "name": f"peer: project reduced d={d} S={S} B={B}", **t["reduced"],
         "parts": [part(2 * stats + 8 * S * B, 4 * S * B * (d * d + d))], "bytes_once": stats + 8 * S * B, "shape": {**shape, "S": S}, "member_steps_per_s": S / med["reduced"]},
        {"group": "peer", "name": f"peer: project full d={d} S={S} B={B}", **t["full"],
         "parts": [part(2 * 8 * S * B * (D * D + d) + 8 * S * B, full_flops(S, B, d, 1))], "bytes_once": 8 * S * B * (D * D + d) + 8 * S * B,
         "shape": {**shape, "S": S}, "member_steps_per_s": S / med["full"]},
    ]
    out: dict[str, Any] = {
        "S": S, **shape, "loss_diff_vs_literal": check, "repeats": reps,
        "peer_steps_per_s": 1 / med["peer"], "lean_steps_per_s": 1 / med["lean"],
        "reduced_run_steps_per_s": S / med["reduced"], "full_run_steps_per_s": S / med["full"],
    }
    for base in ("peer", "lean"):
        for form in ("reduced", "full"):
            key = f"ratio_{form}" if base == "peer" else f"ratio_{form}_vs_lean"
            out[key] = S * med[base] / med[form]
            out[key + "_repeats"] = [S * p / r for p, r in zip(secs[base], secs[form])]
            out[key + "_cpu"] = S * t[base]["cpu_s"] / t[form]["cpu_s"]
    return rows, out


# ----------------------------------------------------------------------------------------------
# driver


def git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""

    dirty = [line for line in git("status", "--porcelain", "--", "study").splitlines() if line]
    return {"root": str(root), "commit": git("rev-parse", "--short", "HEAD"), "study_uncommitted": dirty}


def bench(a) -> dict[str, Any]:
    sz = SIZES["quick" if a.quick else "default"]
    roofs_before = measure_roofs(a.bw_mib, a.gemm_n)
    log(f"roofs before: {roofs_before['bandwidth'] / 1e9:.1f} GB/s, GEMM f64 {roofs_before['gemm64'] / 1e9:.1f} GFLOP/s, f32 {roofs_before['gemm32'] / 1e9:.1f}")
    kernels: list[dict[str, Any]] = []

    def add(k: dict[str, Any]) -> None:
        kernels.append(k)
        log(f"  {k['name']:48s} {1e3 * k['s']:10.2f} ms")

    for fam, d, cp, S, B in sz["reduced"]:
        add(reduced_kernel(fam, d, cp, S, B, a))
    if fused is not None and fused.library() is not None:  # the same steps where no C compiler is
        for fam, d, cp, S, B in sz["reduced"]:
            add(reduced_kernel(fam, d, cp, S, B, a, torch_kernels=True))
    for d, cp, S, B in sz["full"]:
        add(full_kernel(d, cp, S, B, a))
    nw = sz["newton"]
    for cp in nw["cp"]:
        add(newton_kernel(nw["d"], cp, nw["B"], nw["N"], a))
    lg = sz["logreg"]
    add(logreg_kernel(lg["d"], lg["c"], lg["n_eval"], lg["M"], a))
    e = sz["em"]
    for M in e["M"]:
        add(em_kernel(e["d"], e["K"], e["P"], M, e["R"], e["iters"], a))
    for fam, cfg in quickstart_configs(sz["eval"]).items():
        add(eval_kernel(fam, cfg, a))
    pr = sz["peer"]
    rows, peer = peer_kernels(pr["d"], pr["N"], pr["B"], pr["S"], a)
    for r in rows:
        add(r)
    roofs_after = measure_roofs(a.bw_mib, a.gemm_n)
    log(f"roofs after:  {roofs_after['bandwidth'] / 1e9:.1f} GB/s, GEMM f64 {roofs_after['gemm64'] / 1e9:.1f} GFLOP/s, f32 {roofs_after['gemm32'] / 1e9:.1f}")
    used = {k: max(roofs_before[k], roofs_after[k]) for k in ROOF_NAMES}
    for k in kernels:
        finish(k, used)
    return {"roofs": {"before": roofs_before, "after": roofs_after, "used": used, "rule": "max of before and after"}, "kernels": kernels, "peer": peer}


def fmt_bytes_rate(v: float) -> str:
    return f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def notes(k: dict[str, Any]) -> str:
    out = []
    if k["group"] == "Newton optimum":
        out.append(f"{k['iterations']} it., {1e3 * k['s_per_iteration']:.2f} ms/it.")
    if k["group"] == "EM":
        how = "estimated: the budget used" if k["iterations_estimated"] else "counted"
        out.append(f"{k['mean_iterations']:.1f} it. per prompt ({how}; at most {k['iterations']}), {1e6 * k['s_per_prompt_iteration']:.1f} µs per prompt-it.")
    if k["group"] == "logreg":
        its = k["iterations"]
        out.append("Newton steps per prompt, by M: " + ", ".join(f"{m}:{n:.1f}" for m, n in its.items()) + (" (estimated)" if k["iterations_estimated"] else " (counted)"))
    if k["group"] == "evaluation pass":
        out.append(f"{k['counted']} {k['share']:.0%} of the pass; roof: {k['counted']} only (a lower bound)")
    if "member_steps_per_s" in k:
        out.append(f"{k['member_steps_per_s']:.0f} member-steps/s")
    return "; ".join(out)


def markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    ro = r["roofs"]
    lines = [
        f"Roofs ({meta['threads']} torch thread(s); the max of before and after is used):",
        "",
        "| roof | before | after | used |",
        "|---|---:|---:|---:|",
        f"| read bandwidth, x.sum() over {meta['bw_mib']} MiB float64 (GB/s) "
        f"| {ro['before']['bandwidth'] / 1e9:.2f} | {ro['after']['bandwidth'] / 1e9:.2f} | **{ro['used']['bandwidth'] / 1e9:.2f}** |",
        f"| GEMM float64, {meta['gemm_n']}^3 torch.matmul (GFLOP/s) | {ro['before']['gemm64'] / 1e9:.2f} | {ro['after']['gemm64'] / 1e9:.2f} | **{ro['used']['gemm64'] / 1e9:.2f}** |",
        f"| GEMM float32, {meta['gemm_n']}^3 torch.matmul (GFLOP/s) | {ro['before']['gemm32'] / 1e9:.2f} | {ro['after']['gemm32'] / 1e9:.2f} | **{ro['used']['gemm32'] / 1e9:.2f}** |",
        "",
        "| kernel | ms / call | CPU ms / call | GB/s | GFLOP/s | binds | roof ms | fraction | if read once | notes |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for k in r["kernels"]:
        once = f"{k['fraction_once']:.1%}" if "fraction_once" in k else ""
        binds = ROOF_NAMES.get(k["binds"], k["binds"])
        lines.append(
            f"| {k['name']} | {1e3 * k['s']:.3g} | {1e3 * k['cpu_s']:.3g} | {fmt_bytes_rate(k['gbps'])} | {k['gflops']:.2f} | {binds} "
            f"| {1e3 * k['roof_s']:.3g} | **{k['fraction']:.1%}** | {once} | {notes(k)} |"
        )
    p = r["peer"]
    lines += [
        "",
        f"Peer (d={p['d']}, N={p['N']}, B={p['B']}, {p['repeats']} alternating repeats): the Ahn-style literal LSA "
        f"{p['peer_steps_per_s']:.3g} steps/s, the lean literal LSA {p['lean_steps_per_s']:.3g} steps/s (float32, autograd); "
        f"the project's reduced step {p['reduced_run_steps_per_s']:.4g} run-steps/s, full step {p['full_run_steps_per_s']:.4g} run-steps/s "
        f"(S={p['S']} bundled, float64).",
        "",
        "| project ÷ peer (run-steps/s ÷ steps/s) | by wall time (median) | per repeat | by CPU time |",
        "|---|---:|---|---:|",
    ]
    for base, label in (("", "Ahn-style peer"), ("_vs_lean", "lean literal")):
        for form in ("reduced", "full"):
            key = f"ratio_{form}{base}"
            bold = "**" if key == "ratio_reduced" else ""
            lines.append(f"| {form} ÷ {label} | {bold}{p[key]:.0f}x{bold} | {', '.join(f'{x:.0f}' for x in p[key + '_repeats'])} | {p[key + '_cpu']:.0f}x |")
    c = p["loss_diff_vs_literal"]
    lines += [
        "",
        f"Loss at the same parameters, float64 statistics vs float32 literal: max abs diff {c['peer_vs_reduced']:.1e} (reduced vs Ahn-style), "
        f"{c['lean_vs_reduced']:.1e} (reduced vs lean), {c['lean_vs_full']:.1e} (full vs lean).",
    ]
    return "\n".join(lines)


def compare_markdown(this: dict[str, Any], base: dict[str, Any], base_root: str) -> str:
    b = {k["name"]: k for k in base["kernels"]}
    ro, rb = this["roofs"]["used"], base["roofs"]["used"]
    lines = [
        f"Before/after: ROOT = {base_root} (before), this checkout (after); speed-up = before s / after s.",
        "",
        "| roof | before | after |",
        "|---|---:|---:|",
        f"| read bandwidth (GB/s) | {rb['bandwidth'] / 1e9:.2f} | {ro['bandwidth'] / 1e9:.2f} |",
        f"| GEMM float64 (GFLOP/s) | {rb['gemm64'] / 1e9:.2f} | {ro['gemm64'] / 1e9:.2f} |",
        f"| GEMM float32 (GFLOP/s) | {rb['gemm32'] / 1e9:.2f} | {ro['gemm32'] / 1e9:.2f} |",
        "",
        "| kernel | before ms | after ms | speed-up | speed-up by CPU time | fraction before | fraction after | binds (after) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in this["kernels"]:
        o = b.get(k["name"])
        if o is None:
            lines.append(f"| {k['name']} | | {1e3 * k['s']:.3g} | | | | {k['fraction']:.1%} | {ROOF_NAMES.get(k['binds'], k['binds'])} |")
            continue
        lines.append(
            f"| {k['name']} | {1e3 * o['s']:.3g} | {1e3 * k['s']:.3g} | **{o['s'] / k['s']:.2f}x** | {o['cpu_s'] / k['cpu_s']:.2f}x "
            f"| {o['fraction']:.1%} | {k['fraction']:.1%} | {ROOF_NAMES.get(k['binds'], k['binds'])} |"
        )
    pb, pa = base["peer"], this["peer"]
    lines += ["", f"Peer ratio, project ÷ Ahn-style peer (wall; CPU): reduced before {pb['ratio_reduced']:.0f}x; {pb['ratio_reduced_cpu']:.0f}x, "
              f"after {pa['ratio_reduced']:.0f}x; {pa['ratio_reduced_cpu']:.0f}x; full before {pb['ratio_full']:.0f}x; {pb['ratio_full_cpu']:.0f}x, "
              f"after {pa['ratio_full']:.0f}x; {pa['ratio_full_cpu']:.0f}x. Against the lean literal LSA: reduced before "
              f"{pb['ratio_reduced_vs_lean']:.0f}x, after {pa['ratio_reduced_vs_lean']:.0f}x."]
    return "\n".join(lines)


def speedups(this: dict[str, Any], base: dict[str, Any]) -> dict[str, dict[str, float]]:
    b = {k["name"]: k for k in base["kernels"]}
    return {k["name"]: {"wall": b[k["name"]]["s"] / k["s"], "cpu": b[k["name"]]["cpu_s"] / k["cpu_s"]} for k in this["kernels"] if k["name"] in b}


def run_other(root: Path, a) -> dict[str, Any]:
    """This script in a subprocess on another checkout (PYTHONPATH=ROOT, cwd=ROOT); its JSON record."""
    with tempfile.TemporaryDirectory(prefix="icl-roofline-") as tmp:
        out = Path(tmp) / "other.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(a.threads), "--min-time", str(a.min_time),
               "--repeats", str(a.repeats), "--budget", str(a.budget), "--bw-mib", str(a.bw_mib), "--gemm-n", str(a.gemm_n), "--out", str(out)]
        if a.quick:
            cmd.append("--quick")
        log(f"--compare: running {root} ...")
        env = {**os.environ, "PYTHONPATH": str(root)}
        p = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"--compare {root}: exit status {p.returncode}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the roofs and the kernels (default 1, as a Ray trial)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per timed repeat (default 0.3; --quick 0.02)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per kernel (default 5; --quick 2)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per kernel: long kernels get fewer repeats, never under 2 (default 8; --quick 0.5)")
    ap.add_argument("--bw-mib", type=int, default=None, help="MiB of the bandwidth roof's tensor (default 256; --quick 64)")
    ap.add_argument("--gemm-n", type=int, default=None, help="n of the GEMM roofs (default 1024; --quick 256)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (for tests)")
    ap.add_argument("--compare", type=Path, default=None, metavar="ROOT", help="also run this benchmark on another checkout and print both side by side")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    a = ap.parse_args(argv)
    q = a.quick
    a.min_time = a.min_time if a.min_time is not None else (0.02 if q else 0.3)
    a.repeats = a.repeats if a.repeats is not None else (2 if q else 5)
    a.budget = a.budget if a.budget is not None else (0.5 if q else 8.0)
    a.bw_mib = a.bw_mib if a.bw_mib is not None else (64 if q else 256)
    a.gemm_n = a.gemm_n if a.gemm_n is not None else (256 if q else 1024)
    if a.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    results = bench(a)
    meta = {
        "quick": q, "min_time": a.min_time, "repeats": a.repeats, "budget_s": a.budget, "bw_mib": a.bw_mib, "gemm_n": a.gemm_n,
        "code": git_state(Path(training.__file__).resolve().parent.parent), "study_path": str(Path(training.__file__).resolve().parent),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "PYTHONPATH")},
        "total_s": time.perf_counter() - t0,
    }
    table = markdown(results, {**meta, "threads": a.threads})
    if a.compare is None:
        return emit("roofline", meta, results, table, a.out)
    root = a.compare.resolve()
    other = run_other(root, a)
    record = {"this": results, "compare": {"root": str(root), "meta": other["meta"], "results": other["results"]},
              "speedups": speedups(results, other["results"])}
    meta["total_s"] = time.perf_counter() - t0
    table += "\n\n" + compare_markdown(results, other["results"], str(root))
    return emit("roofline", meta, record, table, a.out)


if __name__ == "__main__":
    main()
