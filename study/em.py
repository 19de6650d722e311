"""EM for a K-component mixture of linear regressions, fitted on each prompt's context alone.

Vectorised over prompts and restarts: every tensor carries [P, R, ...] and one batched E-step and
M-step serve thousands of prompts. Random initialisation (R restarts, each beta_k ~ N(0, s^2 I)
with s^2 = mean(y^2) / (d mean ||x||^2 / d), i.e. at the scale of the data), a fixed iteration
budget and a tolerance on the log-likelihood; the restart with the best final log-likelihood is
kept. sigma is known (the task's) or estimated. `gradient_em` replaces the M-step's regression
solve by T gradient steps on the expected complete-data loss (step 1 / lambda_max(X^T X / M)),
the algorithm the transformers of [J] emulate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def _log_weights(x, y, beta, pi, sigma):
    """log pi_k + log N(y_i; beta_k^T x_i, sigma^2).  Shapes: -> [P, R, K, M].

    Examples last: the reductions over components then add contiguous rows (fast), where a
    reduction over a trailing dimension of size K would not be.
    """
    P, M, _ = x.shape
    R, K, d = beta.shape[1:]
    resid = y[:, None, None, :] - (beta.reshape(P, R * K, d) @ x.transpose(1, 2)).reshape(P, R, K, M)  # one GEMM
    s2 = (sigma * sigma)[:, :, None, None]
    return pi.log()[..., None] - resid * resid / (2 * s2) - 0.5 * torch.log(2 * math.pi * s2)


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
    processed in cache-sized chunks, so every prompt's fit is the one it would get alone.
    """
    P, M, d = x.shape
    R, K = beta0.shape[1], beta0.shape[2]
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
        eta = (1.0 / lam_max.clamp(min=1e-12))[:, None, None]
    else:
        xx = (x[..., :, None] * x[..., None, :]).reshape(P, M, d * d)  # x x^T once: each M-step is one GEMM
    prev = torch.full((P, R), -math.inf, dtype=x.dtype, device=x.device)
    active = torch.ones(P, dtype=torch.bool, device=x.device)
    it = 0
    for it in range(1, iters + 1):
        logw = _log_weights(x, y, beta, pi, sig.clamp(min=SIGMA_FLOOR))
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
    logw = _log_weights(x, y, beta, pi, sig.clamp(min=SIGMA_FLOOR))
    loglik = torch.logsumexp(logw, dim=2).mean(-1)
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
