"""Estimators of family `gmm`, all with one call signature: `estimator(prompts) -> probs [P, c]`.

Only `bayes` reads the hidden task; `lsa_projected` (the trained LSA's W projected on the line
of Lam^-1, its B -> inf limit), `lsa_limit`, `lda_plugin`, `lda_pooled` and `logreg` see the
context (and `lda_plugin` the true Lam, as theory.md defines it); the trained LSA is built by
`lsa_estimator` and called the same way, so evaluation never branches on the kind of model.
At M = inf every context statistic is its exact expectation: the plug-in and pooled LDA then
equal `bayes`, and so does `logreg`, whose population optimum is the true log-odds (the LDA model
is well specified for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from study import lsa
from study.covariance import Covariance
from study.gmm import Context, Tasks, label_embedding

LOGREG_L2 = 1.0  # ridge on all weights (intercepts too): a unit Gaussian prior
LOGREG_ITERS = 25


@dataclass
class Prompts:
    """Evaluation prompts of one test length: hidden tasks, queries, context, true covariance."""

    tasks: Tasks
    ctx: Context
    cov: Covariance
    c: int

    @property
    def xq(self) -> torch.Tensor:
        return self.tasks.xq


Estimator = Callable[[Prompts], torch.Tensor]


def _lda(means: torch.Tensor, prec: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """softmax_k(m_k^T S^-1 x - m_k^T S^-1 m_k / 2) with uniform priors.  prec: [d, d] or [P, d, d]."""
    pm = means @ prec  # [P, c, d]; prec is symmetric
    logits = torch.einsum("pkd,pd->pk", pm, xq) - 0.5 * (pm * means).sum(-1)
    return torch.softmax(logits, dim=-1)


def bayes(pr: Prompts) -> torch.Tensor:
    """The true posterior given the task's means and Lam."""
    return _lda(pr.tasks.means, pr.cov.inv, pr.xq)


def context_V(ctx: Context, c: int) -> torch.Tensor:
    """V = (1/M) sum_i ytil_i x_i^T from the class statistics.  Shapes: -> [P, c', d]."""
    E = label_embedding(c).to(ctx.means)
    return torch.einsum("pk,kj,pkd->pjd", ctx.frac, E, ctx.means)


def context_gram(ctx: Context, xq: torch.Tensor, c: int) -> torch.Tensor:
    """Z Z^T / M from the class statistics (the query column included).  Shapes: -> [P, D, D]."""
    E = label_embedding(c).to(ctx.means)
    d = xq.shape[1]
    xx = ctx.within + torch.einsum("pk,pki,pkj->pij", ctx.frac, ctx.means, ctx.means)
    V = context_V(ctx, c)
    yy = torch.einsum("pk,ki,kj->pij", ctx.frac, E, E)
    top = torch.cat([xx, V.transpose(1, 2)], dim=2)
    G = torch.cat([top, torch.cat([V, yy], dim=2)], dim=1)
    if not ctx.exact:
        G[:, :d, :d] += xq[:, :, None] * xq[:, None, :] / ctx.M
    return G


def lsa_estimator(params: dict[str, torch.Tensor]) -> Estimator:
    """The LSA with given parameters (`W`, or `W_PV` and `W_KQ` of the full form)."""

    def predict(pr: Prompts) -> torch.Tensor:
        xq = pr.xq
        if "W" in params:
            logits = lsa.reduced_logits(params["W"][None].to(xq), context_V(pr.ctx, pr.c)[None], xq[None])[0]
        else:
            d = xq.shape[1]
            P, K = params["W_PV"][None, d:, :].to(xq), params["W_KQ"][None, :, :d].to(xq)
            logits = lsa.full_logits(P, K, context_gram(pr.ctx, xq, pr.c)[None], xq[None])[0][0]
        return lsa.probabilities(logits)

    predict.needs_within = "W" not in params  # the full form reads the context's Gram matrix
    return predict


def projected_W(W: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """W projected on the line of Lam^-1: <W, Lam^-1> / ||Lam^-1||_F^2 Lam^-1 = c''(1 + g) Lam^-1.

    By the O(d) invariance of the whitened problem the population minimiser is exactly a multiple of
    Lam^-1 (theory.md section 5), so the projection keeps the trained model's G and drops its
    finite-B sampling noise off that line: the B -> inf limit of the trained LSA.  Shapes: [d, d].
    """
    inv = inv.to(W)
    return lsa.line_coefficient(W, inv) * inv


def lsa_limit(pr: Prompts) -> torch.Tensor:
    """The LSA at its theoretical limit W = 2 Lam^-1 (binary) or c Lam^-1."""
    scale = 2.0 if pr.c == 2 else float(pr.c)
    return lsa_estimator({"W": scale * pr.cov.inv})(pr)


def lda_plugin(pr: Prompts) -> torch.Tensor:
    """Class means from the context, the true Lam; an empty class has mean 0."""
    return _lda(pr.ctx.means, pr.cov.inv, pr.xq)


def pooled_covariance(ctx: Context, d: int) -> torch.Tensor:
    """The pooled within-class covariance of the context, shrunk towards a scaled identity.

    S = M / max(M - k, 1) * within with k the number of classes present; shrinkage weight
    a = d / (M + d) towards (tr S / d) I; S = I when tr S = 0 (no class seen twice); at M = inf
    S = Lam.  Shapes: -> [P, d, d].
    """
    if ctx.exact:
        return ctx.within
    present = (ctx.frac > 0).sum(-1).to(ctx.within.dtype)
    S = ctx.within * (ctx.M / (ctx.M - present).clamp(min=1.0))[:, None, None]
    a = d / (ctx.M + d)
    scale = torch.diagonal(S, dim1=1, dim2=2).mean(-1)[:, None, None]
    eye = torch.eye(d, dtype=S.dtype, device=S.device)
    return torch.where(scale > 0, (1 - a) * S + a * scale * eye, eye)


def lda_pooled(pr: Prompts) -> torch.Tensor:
    """Class means and the pooled, shrunk covariance from the context (`pooled_covariance`)."""
    return _lda(pr.ctx.means, torch.linalg.inv(pooled_covariance(pr.ctx, pr.xq.shape[1])), pr.xq)


lda_pooled.needs_within = True


def logreg(pr: Prompts) -> torch.Tensor:
    """L2-regularised softmax regression with intercepts, fitted on each context by Newton's method."""
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


def per_prompt(p: torch.Tensor, p_star: torch.Tensor, pr: Prompts) -> dict[str, torch.Tensor]:
    """Per-prompt metrics against the Bayes posterior p*: tv_error, accuracy, bayes_accuracy, excess_ce."""
    idx = pr.tasks.yq[:, None]
    ce = -p.gather(1, idx)[:, 0].clamp(min=1e-300).log()
    ce_star = -p_star.gather(1, idx)[:, 0].clamp(min=1e-300).log()
    return {
        "tv_error": 0.5 * (p - p_star).abs().sum(-1),
        "accuracy": (p.argmax(-1) == pr.tasks.yq).double(),
        "bayes_accuracy": (p_star.argmax(-1) == pr.tasks.yq).double(),
        "excess_ce": ce - ce_star,
    }


def versus_limit(p: torch.Tensor, p_inf: torch.Tensor) -> dict[str, torch.Tensor]:
    """`tv_limit`: 0.5 sum_k |p_M - p_inf| for one estimator on the same queries: the finite
    context's fluctuation alone, which [S] bounds by O(1/sqrt(M)) without the N-dependent bias."""
    return {"tv_limit": 0.5 * (p - p_inf).abs().sum(-1)}


ESTIMATORS: dict[str, Estimator] = {
    "bayes": bayes,
    "lsa_limit": lsa_limit,
    "lda_plugin": lda_plugin,
    "lda_pooled": lda_pooled,
    "logreg": logreg,
}


def get(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise KeyError(f"unknown estimator {name!r}; known: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]
