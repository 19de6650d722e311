"""EM for a K-component mixture of linear regressions, fitted on each prompt's context alone.

Vectorised over prompts and restarts: every tensor carries [P, R, ...] and one batched E-step and
M-step serve thousands of prompts. Random initialisation (R restarts, each beta_k ~ N(0, s^2 I)
with s^2 = mean(y^2) / (d mean ||x||^2 / d), i.e. at the scale of the data), a fixed iteration
budget and a tolerance on the log-likelihood; the restart with the best final log-likelihood is
kept. sigma is known (the task's) or estimated. `gradient_em` replaces the M-step's regression
solve by T gradient steps on the expected complete-data loss (step 1 / lambda_max(X^T X / M)),
the algorithm the transformers of [J] emulate.

Speed without changing the numbers (issue 10; benchmarks/em.py times it against the previous
implementation): each prompt stops on its own, so prompts that have converged leave the working set
and late iterations cost less; the E-step fills reused buffers in place; and for K = 2 the
log-sum-exp over components takes one exp per pair (the larger term's is exactly 1). Every value is
computed by the same float operations in the same order as the plain formulas, so on one thread the
fits equal the previous implementation's bit for bit at the quickstart's sizes (K = 2, 4 restarts:
benchmarks/em.py). Where MKL's batched GEMM rounds a prompt differently in batches of other sizes
(seen with an odd number of rows R K, e.g. K = 3 with one restart) the two differ by rounding,
~1e-15, as the previous implementation's fit of a prompt alone already differed from its fit in a
chunk. That matters at ties: restarts that reach one optimum have log-likelihoods equal to ~1e-16
but betas ~1e-8 apart (the stopping tolerance), so rounding alone decides which is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from study import fused

SIGMA_FLOOR = 1e-6  # estimated sigma never collapses onto one example's exact fit
RIDGE = 1e-8  # keeps an M-step solvable when a component holds fewer than d examples
CHUNK_ELEMS = 1 << 20  # prompts per chunk: the largest temporary stays near 8 MiB (benchmarks/em.py)


@dataclass
class Fit:
    """Shapes: beta [P, K, d], pi [P, K], sigma [P], loglik [P], iterations (the budget used)."""

    beta: torch.Tensor
    pi: torch.Tensor
    sigma: torch.Tensor
    loglik: torch.Tensor
    iterations: int


def init_beta(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Random starts at the data's scale from standard normals z.  Shapes: x [P, M, d], y [P, M], z [P, R, K, d]."""
    scale = ((y * y).mean(-1) / (x * x).sum(-1).mean(-1).clamp(min=1e-12)).sqrt()  # ~ ||beta|| / sqrt(d)
    return z.to(x) * scale[:, None, None, None]


def _log_weights(x, y, beta, pi, sigma, out=None):
    """log pi_k + log N(y_i; beta_k^T x_i, sigma^2).  Shapes: -> [P, R, K, M].

    Examples last: the reductions over components then add contiguous rows (fast), where a
    reduction over a trailing dimension of size K would not be. `out` ([P, R*K, M], contiguous) is
    filled in place: the same float operations, without allocating (and page-faulting) a fresh
    tensor per operation.
    """
    P, M, _ = x.shape
    R, K, d = beta.shape[1:]
    g = torch.bmm(beta.reshape(P, R * K, d), x.transpose(1, 2), out=out)  # one GEMM
    resid = torch.sub(y[:, None, :], g, out=g).view(P, R, K, M)
    s2 = (sigma * sigma)[:, :, None, None]
    q = resid.mul_(resid)
    # log pi - q / (2 s2): addcdiv computes it as log pi + (-q) / (2 s2), the same float
    return torch.addcdiv(pi.log()[..., None], q, 2 * s2, value=-1, out=q).sub_(0.5 * torch.log(2 * math.pi * s2))


def _logsumexp(logw: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(logw, dim=2), bit for bit.  Shapes: [P, R, K, M] -> [P, R, M].

    For K = 2 one exp per pair instead of two: the larger term's exp(0) is exactly 1, so the sum
    is 1 + exp(min - max), as torch's max-shifted sum computes it.
    """
    if logw.shape[2] != 2:
        return torch.logsumexp(logw, dim=2)
    a, b = logw[:, :, 0], logw[:, :, 1]
    m = torch.maximum(a, b)
    return torch.minimum(a, b).sub_(m).exp_().add_(1.0).log_().add_(m)


def fit(
    x: torch.Tensor,
    y: torch.Tensor,
    beta0: torch.Tensor,
    sigma: float | None,
    iters: int,
    tol: float,
    grad_steps: int = 0,
) -> Fit:
    """EM (grad_steps = 0) or gradient EM (grad_steps = T) from the starts beta0 [P, R, K, d].

    sigma: the known noise std, or None to estimate it. Returns the best restart of every prompt.
    A prompt stops when none of its restarts' log-likelihoods moves by `tol`, and prompts are
    processed in cache-sized chunks, so every prompt's fit is the one it would get alone. On the
    CPU, where the fused C kernels are built (`study.fused`), EM runs one prompt after another in C
    (`fused.em_fit`; gradient EM stays here): the same iteration, its sums in another order.
    """
    P, M, d = x.shape
    R, K = beta0.shape[1], beta0.shape[2]
    if not grad_steps and fused.em_applies(x, K):
        return Fit(*fused.em_fit(x, y, beta0, sigma, iters, tol, RIDGE, SIGMA_FLOOR))
    step = max(1, CHUNK_ELEMS // (M * max(d * d, R * K)))
    parts = [_fit_chunk(x[s : s + step], y[s : s + step], beta0[s : s + step], sigma, iters, tol, grad_steps) for s in range(0, P, step)]
    return Fit(*(torch.cat([getattr(f, n) for f in parts]) for n in ("beta", "pi", "sigma", "loglik")), max(f.iterations for f in parts))


def _fit_chunk(x, y, beta0, sigma, iters, tol, grad_steps) -> Fit:
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
        aux = (1.0 / lam_max.clamp(min=1e-12))[:, None, None]  # step sizes eta
    else:
        aux = (x[..., :, None] * x[..., None, :]).reshape(P, M, d * d)  # x x^T once: each M-step is one GEMM
    buf = torch.empty(2, P, RK, M, dtype=x.dtype, device=x.device)  # reused by every iteration; a prefix serves fewer prompts
    # The working set: prompts still iterating (`live`) and prompts that have stopped but still sit
    # in it. Stopped prompts keep their estimates and leave once they are an eighth of the set.
    idx = torch.arange(P, device=x.device)
    live = torch.ones(P, dtype=torch.bool, device=x.device)
    xw, yw, auxw, bw, pw, sw = x, y, aux, beta.clone(), pi.clone(), sig.clone()
    prev = torch.full((P, R), -math.inf, dtype=x.dtype, device=x.device)
    it = 0
    for it in range(1, iters + 1):
        n = len(idx)
        logw = _log_weights(xw, yw, bw, pw, sw.clamp(min=SIGMA_FLOOR), out=buf[0, :n])
        lse = _logsumexp(logw)  # [n, R, M]
        loglik = lse.mean(-1)  # [n, R]
        r = logw.sub_(lse[:, :, None, :]).exp_()  # responsibilities [n, R, K, M]
        new_pi = (r.sum(-1) / M).clamp(min=1e-12)
        rt = r.view(n, RK, M)
        if grad_steps:
            new_beta = bw.reshape(n, RK, d)
            for _ in range(grad_steps):
                res = yw[:, None, :] - new_beta @ xw.transpose(1, 2)  # [n, RK, M]
                new_beta = new_beta + auxw * ((rt * res) @ xw) / M
            new_beta = new_beta.reshape(n, R, K, d)
        else:
            A = torch.bmm(rt, auxw).view(n, R, K, d, d).add_(RIDGE * eye)
            b = torch.bmm(torch.mul(rt, yw[:, None, :], out=buf[1, :n]), xw).view(n, R, K, d)
            new_beta = torch.linalg.solve(A, b[..., None])[..., 0]
        if not known:
            res = yw[:, None, :] - new_beta.reshape(n, RK, d) @ xw.transpose(1, 2)  # [n, RK, M]
            new_sig = ((rt * res * res).reshape(n, R, K, M).sum((2, 3)) / M).sqrt().clamp(min=SIGMA_FLOOR)
            sw = torch.where(live[:, None], new_sig, sw)
        bw = torch.where(live[:, None, None, None], new_beta, bw)
        pw = torch.where(live[:, None, None], new_pi, pw)
        live = live & ((loglik - prev[idx]).abs().amax(1) >= tol)  # a prompt stops once it has converged
        prev[idx] = loglik
        stopped = n - int(live.sum())
        if stopped == n:
            break
        if 8 * stopped >= n:  # compact: write the stopped prompts' estimates back, keep the others
            done = idx[~live]
            beta[done], pi[done], sig[done] = bw[~live], pw[~live], sw[~live]
            idx, bw, pw, sw = idx[live], bw[live], pw[live], sw[live]
            xw, yw, auxw = x[idx], y[idx], aux[idx]
            live = live[live]
    beta[idx], pi[idx], sig[idx] = bw, pw, sw
    loglik = _logsumexp(_log_weights(x, y, beta, pi, sig.clamp(min=SIGMA_FLOOR), out=buf[0])).mean(-1)
    best = loglik.argmax(1)  # the restart with the best final log-likelihood
    pick = lambda t: t[torch.arange(P), best]  # noqa: E731
    return Fit(pick(beta), pick(pi), pick(sig), pick(loglik), it)


def param_error(beta_hat: torch.Tensor, beta: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """min over label permutations (and a global sign when symmetric) of mean_k ||beta_hat_k - beta_k||.

    Shapes: [P, K, d] each -> [P].
    """
    import itertools

    K = beta.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(K))), device=beta.device)  # [K!, K]
    cand = beta_hat[:, perms]  # [P, K!, K, d]
    if symmetric:
        cand = torch.cat([cand, -cand], dim=1)
    return (cand - beta[:, None]).norm(dim=-1).mean(-1).amin(-1)
