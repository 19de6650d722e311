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
    """log pi_k + log N(y_i; beta_k^T x_i, sigma^2).  Shapes: -> [P, R, M, K]."""
    resid = y[:, None, :, None] - torch.einsum("pmd,prkd->prmk", x, beta)
    s2 = (sigma * sigma)[..., None, None]
    return pi.log()[:, :, None, :] - resid * resid / (2 * s2) - 0.5 * torch.log(2 * math.pi * s2), resid


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
    """
    P, M, d = x.shape
    R, K = beta0.shape[1], beta0.shape[2]
    beta = beta0.clone()
    pi = torch.full((P, R, K), 1.0 / K, dtype=x.dtype, device=x.device)
    known = sigma is not None
    sig = torch.full((P, R), sigma, dtype=x.dtype, device=x.device) if known else y.std(-1).clamp(min=SIGMA_FLOOR)[:, None].expand(P, R).clone()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    if grad_steps:
        lam_max = torch.linalg.eigvalsh(x.transpose(1, 2) @ x / M)[:, -1]  # [P]
        eta = (1.0 / lam_max.clamp(min=1e-12))[:, None, None, None]
    prev = torch.full((P, R), -math.inf, dtype=x.dtype, device=x.device)
    it = 0
    for it in range(1, iters + 1):
        logw, resid = _log_weights(x, y, beta, pi, sig.clamp(min=SIGMA_FLOOR))
        lse = torch.logsumexp(logw, dim=-1)  # [P, R, M]
        loglik = lse.mean(-1)
        r = (logw - lse[..., None]).exp()  # responsibilities [P, R, M, K]
        nk = r.sum(2)  # [P, R, K]
        pi = (nk / M).clamp(min=1e-12)
        if grad_steps:
            for _ in range(grad_steps):
                res = y[:, None, :, None] - torch.einsum("pmd,prkd->prmk", x, beta)
                beta = beta + eta * torch.einsum("prmk,pmd->prkd", r * res, x) / M
        else:
            xr = torch.einsum("prmk,pmd->prkmd", r, x)
            A = xr.transpose(-1, -2) @ x[:, None, None] + RIDGE * eye
            b = torch.einsum("prmk,pm,pmd->prkd", r, y, x)
            beta = torch.linalg.solve(A, b[..., None])[..., 0]
        if not known:
            res = y[:, None, :, None] - torch.einsum("pmd,prkd->prmk", x, beta)
            sig = ((r * res * res).sum((2, 3)) / M).sqrt().clamp(min=SIGMA_FLOOR)
        if float((loglik - prev).abs().max()) < tol:
            break
        prev = loglik
    logw, _ = _log_weights(x, y, beta, pi, sig.clamp(min=SIGMA_FLOOR))
    loglik = torch.logsumexp(logw, dim=-1).mean(-1)
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
