"""Benchmark: the LSA trainer from sufficient statistics against the literal attention formula.

Both paths run full-batch GD (constant step `lr`, float64) on the same cross-entropy loss over
the same B binary Gaussian-mixture prompts, from the same initial point:

- `statistics`: `study.training.gd` on a `study.training.Problem` (S = 1 member) built from the
  per-prompt sufficient statistics V = (1/N) sum_i ytil_i x_i^T (param `reduced`) or the Gram
  matrix Z Z^T / N (param `full`). A step costs O(B d^2).
- `literal`: `study.lsa.embed` + `study.lsa.literal_prediction`, i.e. Z + W_PV Z (Z^T W_KQ Z) / N
  with its (N+1) x (N+1) attention matrix, gradients by torch autograd, the B prompts processed
  in chunks (gradients accumulated) so memory stays bounded. A step costs O(B N^2 d).

Reduced form: the trainable parameter is W, with W_PV = [[0,0],[0,1]] and W_KQ = [[W,0],[0,0]]
(W = 0 at the start). Full form: W_PV and W_KQ are trained whole from `study.lsa.block_init`.

Raw prompts are generated once (seeded, torch only; class means uniform on the sphere of
radius `--snr`, Lam = I); the statistics are built from those same raw prompts. Only the GD
steps are timed; building Z and the statistics is reported separately, for context. Per-step
training losses of the two paths are compared over the literal steps (they should agree to
~1e-12), as are the parameters after those steps.

The machine may be shared and noisy: compare the ratio column, measured in one run, rather than
absolute times across runs.

Run from the repository root:

    .venv/bin/python benchmarks/lsa_trainer.py                  # d=16, N=128, B=16384 (~2 min)
    .venv/bin/python benchmarks/lsa_trainer.py --quick          # tiny sizes, a few seconds
    .venv/bin/python benchmarks/lsa_trainer.py --out results/bench_lsa_trainer.json
    .venv/bin/python benchmarks/lsa_trainer.py --forms reduced --literal-steps 2 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import emit, environment

from study import lsa
from study.training import Problem, gd

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# data


def make_prompts(d: int, N: int, B: int, snr: float, seed: int) -> dict[str, torch.Tensor]:
    """B raw binary GMM prompts.  Shapes: x [B, N, d], ytil [B, N, 1], xq [B, d], yq [B]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, 2, d, generator=g, dtype=DTYPE)
    means = snr * u / u.norm(dim=-1, keepdim=True)  # Lam = I: ||mu_k|| = snr
    y = torch.randint(2, (B, N), generator=g)
    x = torch.gather(means, 1, y[..., None].expand(B, N, d)) + torch.randn(B, N, d, generator=g, dtype=DTYPE)
    yq = torch.randint(2, (B,), generator=g)
    xq = means[torch.arange(B), yq] + torch.randn(B, d, generator=g, dtype=DTYPE)
    ytil = (2.0 * y.to(DTYPE) - 1.0)[..., None]
    return {"x": x, "ytil": ytil, "xq": xq, "yq": yq}


def literal_chunks(data: dict[str, torch.Tensor], chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompt matrices Z [b, d+1, N+1] and query labels, chunk by chunk (built once)."""
    B = data["xq"].shape[0]
    return [
        (lsa.embed(data["x"][s : s + chunk], data["ytil"][s : s + chunk], data["xq"][s : s + chunk]), data["yq"][s : s + chunk])
        for s in range(0, B, chunk)
    ]


def statistics_problem(data: dict[str, torch.Tensor], Zs: list[tuple[torch.Tensor, torch.Tensor]], form: str, lr: float) -> Problem:
    """The S = 1 Problem from the same raw prompts: V (reduced) or also the Gram Z Z^T / N (full)."""
    x, ytil, xq, yq = data["x"], data["ytil"], data["xq"], data["yq"]
    B, N, d = x.shape
    V = torch.einsum("bnj,bnd->bjd", ytil, x) / N  # [B, 1, d]
    gram = None
    if form == "full":
        gram = torch.cat([Z @ Z.transpose(1, 2) for Z, _ in Zs]) / N  # query column included
    return Problem(
        V=V[None],
        xq=xq[None],
        yq=yq[None],
        gram=gram[None] if gram is not None else None,
        lr=torch.tensor([lr], dtype=DTYPE),
        target=torch.eye(d, dtype=DTYPE)[None],
        scale=2.0,
    )


# ----------------------------------------------------------------------------------------------
# the literal trainer (autograd through the attention formula)


def literal_matrices(form: str, leaves: dict[str, torch.Tensor], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    if form == "reduced":
        W_PV = torch.zeros(d + 1, d + 1, dtype=DTYPE)
        W_PV[d, d] = 1.0
        return W_PV, F.pad(leaves["W"], (0, 1, 0, 1))  # W_KQ = [[W, 0], [0, 0]]
    return leaves["W_PV"], leaves["W_KQ"]


def literal_loss_and_grad(form: str, leaves: dict[str, torch.Tensor], Zs, B: int, d: int) -> float:
    """Mean CE over all B prompts; gradients accumulated into the leaves' .grad, chunk by chunk."""
    for v in leaves.values():
        v.grad = None
    total = 0.0
    for Z, yq in Zs:
        W_PV, W_KQ = literal_matrices(form, leaves, d)
        logits = lsa.literal_prediction(W_PV, W_KQ, Z, n_label=1)  # [b, 1]
        part = F.binary_cross_entropy_with_logits(logits[:, 0], yq.to(logits.dtype), reduction="sum") / B
        part.backward()
        total += float(part.detach())
    return total


def literal_gd(form: str, init: dict[str, torch.Tensor], Zs, B: int, d: int, lr: float, steps: int, between=None):
    """`steps` GD steps; returns final leaves, losses before each step, and per-step seconds.

    `between()` (untimed) runs before every step and once after the last: the statistics path's
    timing repeats, interleaved so that both paths see the same bursts of machine noise.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
    losses, times = [], []
    for _ in range(steps):
        if between:
            between()
        t0 = time.perf_counter()
        losses.append(literal_loss_and_grad(form, leaves, Zs, B, d))
        with torch.no_grad():
            for v in leaves.values():
                v -= lr * v.grad
        times.append(time.perf_counter() - t0)
    if between:
        between()
    return {k: v.detach() for k, v in leaves.items()}, losses, times


# ----------------------------------------------------------------------------------------------
# the benchmark


def initial_params(form: str, d: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same initial point for both paths: (statistics params [S=1, ...], literal leaves)."""
    if form == "reduced":
        W = torch.zeros(1, d, d, dtype=DTYPE)
        return {"W": W}, {"W": W[0]}
    W_PV, W_KQ = lsa.block_init(d, 1, S=1, dtype=DTYPE)
    return {"W_PV": W_PV, "W_KQ": W_KQ}, {"W_PV": W_PV[0], "W_KQ": W_KQ[0]}


def time_statistics_gd(params, prob: Problem, steps: int, repeats: int) -> list[float]:
    """Seconds per GD step of `study.training.gd`, one value per repeat."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gd(params, prob, steps)
        out.append((time.perf_counter() - t0) / steps)  # gd also evaluates the loss after the last step
    return out


def run_form(form: str, data, Zs, args) -> dict:
    B, N, d = data["x"].shape
    t0 = time.perf_counter()
    prob = statistics_problem(data, Zs, form, args.lr)
    build_s = time.perf_counter() - t0
    p0, leaves0 = initial_params(form, d)

    # statistics path: throughput, timed in short repeats interleaved with the literal steps
    gd(p0, prob, 5)  # warm-up
    stat_times: list[float] = []
    between = lambda: stat_times.extend(time_statistics_gd(p0, prob, args.fast_steps, args.repeats))  # noqa: E731
    lit_leaves, lit_losses, lit_times = literal_gd(form, leaves0, Zs, B, d, args.lr, args.literal_steps, between)

    # the statistics path's loss curve over the literal steps, for the agreement check
    k = args.literal_steps
    params_k, diverged_at, log = gd(p0, prob, k, log_every=1)
    stat_losses = [float(loss[0]) for _, loss, _ in log][:k]
    loss_diff = max(abs(a - b) for a, b in zip(stat_losses, lit_losses))
    param_diff = max(float((params_k[name][0] - lit_leaves[name]).abs().max()) for name in lit_leaves)

    lit_s = statistics.median(lit_times)
    stat_s = statistics.median(stat_times)
    return {
        "form": form,
        "literal": {"steps": k, "s_per_step": lit_times, "median_s_per_step": lit_s, "steps_per_s": 1.0 / lit_s},
        "statistics": {
            "steps": args.fast_steps,
            "repeats": len(stat_times),
            "s_per_step": stat_times,
            "median_s_per_step": stat_s,
            "steps_per_s": 1.0 / stat_s,
            "build_s": build_s,
        },
        "speedup": lit_s / stat_s,  # medians
        "speedup_best": min(lit_times) / min(stat_times),  # best of each: least disturbed by noise
        "losses_literal": lit_losses,
        "losses_statistics": stat_losses,
        "max_abs_loss_diff": loss_diff,
        "max_abs_param_diff": param_diff,
        "diverged": bool((diverged_at >= 0).any()),
    }


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"LSA trainer, d={meta['d']} N={meta['N']} B={meta['B']} (binary, float64, lr={meta['lr']}, "
        f"{meta['threads']} torch threads, literal chunk {meta['chunk']})",
        "",
        "| form | path | steps timed | ms / step (median) | steps / s | speed-up (median; best-of) | max abs loss diff | max abs param diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lit, st = r["literal"], r["statistics"]
        lines.append(
            f"| {r['form']} | literal (autograd, {meta['B'] // meta['chunk'] or 1} chunks) | {lit['steps']} | "
            f"{1e3 * lit['median_s_per_step']:.1f} | {lit['steps_per_s']:.3g} | 1 | | |"
        )
        lines.append(
            f"| {r['form']} | statistics (`training.gd`) | {st['repeats']} x {st['steps']} | "
            f"{1e3 * st['median_s_per_step']:.3f} | {st['steps_per_s']:.4g} | **{r['speedup']:.0f}x**; "
            f"{r['speedup_best']:.0f}x | {r['max_abs_loss_diff']:.1e} | {r['max_abs_param_diff']:.1e} |"
        )
    lines += [
        "",
        "Loss/param diffs: over the literal steps, from the same init on the same prompts. One-time cost of "
        "building the statistics from the raw prompts: "
        + ", ".join(f"{r['form']} {r['statistics']['build_s']:.2f} s" for r in results)
        + f"; building Z once: {meta['embed_s']:.2f} s. Peak RSS {meta['max_rss_mb']:.0f} MB.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--N", type=int, default=128)
    ap.add_argument("--B", type=int, default=16384)
    ap.add_argument("--forms", nargs="+", choices=["reduced", "full"], default=["reduced", "full"])
    ap.add_argument("--literal-steps", type=int, default=3, help="timed GD steps of the literal path (also the steps compared)")
    ap.add_argument("--fast-steps", type=int, default=50, help="GD steps per timed repeat of the statistics path")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the statistics path before each literal step and after the last")
    ap.add_argument("--chunk", type=int, default=1024, help="prompts per autograd chunk of the literal path")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: d=4 N=16 B=256, 2 literal steps, 20 fast steps")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.N, args.B, args.literal_steps, args.fast_steps, args.repeats, args.chunk = 4, 16, 256, 2, 20, 2, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    args.chunk = min(args.chunk, args.B)

    data = make_prompts(args.d, args.N, args.B, args.snr, args.seed)
    t0 = time.perf_counter()
    Zs = literal_chunks(data, args.chunk)
    embed_s = time.perf_counter() - t0

    results = [run_form(form, data, Zs, args) for form in args.forms]
    meta = {
        **environment(),
        "d": args.d, "N": args.N, "B": args.B, "lr": args.lr, "snr": args.snr, "seed": args.seed, "chunk": args.chunk,
        "embed_s": embed_s,
    }
    return emit("lsa_trainer", meta, results, markdown(results, meta), args.out)


if __name__ == "__main__":
    main()
