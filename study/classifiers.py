"""Estimators of family `gmm`, all with one call signature: `estimator(prompts) -> probs [P, c]`.

Only `bayes` reads the hidden task; `lsa_projected` (the trained LSA's W projected on the line
of Lam^-1, its B -> inf limit), `lsa_limit`, `lda_plugin`, `lda_pooled` and `logreg` see the
context (and `lda_plugin` the true Lam, as theory.md defines it); the trained LSA is built by
`lsa_classifier` and called the same way, so evaluation never branches on the kind of model.
At M = inf every context statistic is its exact expectation: the plug-in and pooled LDA then
equal `bayes`, and so does `logreg`, whose population optimum is the true log-odds (the LDA model
is well specified for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from study import fused, lsa
from study.config import TrialConfig
from study.covariance import Covariance
from study.estimators import Estimator
from study.gmm import Context, Tasks, label_embedding

LOGREG_L2 = 1.0  # ridge on all weights (intercepts too): a unit Gaussian prior
LOGREG_ITERS = 25  # Newton steps at most, per prompt
LOGREG_TOL = 1e-10  # a prompt stops after its first step with max |step| below this
LOGREG_CHUNK_ELEMS = 1 << 20  # prompts per chunk of logreg_fit: about this many elements of [x; 1] and x_i x_j (8 MiB)


@dataclass
class ClassificationPrompts:
    """Evaluation prompts of one test length: hidden tasks, queries, context, true covariance."""

    tasks: Tasks
    ctx: Context
    cov: Covariance  # the test distribution's (shifted or not)
    c: int
    train_cov: Covariance | None = None  # the training distribution's (default: cov)
    log_prior: torch.Tensor | None = None  # [c] under a prior shift; None: uniform

    @property
    def xq(self) -> torch.Tensor:
        return self.tasks.xq



def _lda(means: torch.Tensor, prec: torch.Tensor, xq: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """softmax_k(m_k^T S^-1 x - m_k^T S^-1 m_k / 2 + log pi_k) (uniform pi by default).  prec: [d, d] or [P, d, d]."""
    pm = means @ prec  # [P, c, d]; prec is symmetric
    logits = torch.einsum("pkd,pd->pk", pm, xq) - 0.5 * (pm * means).sum(-1)
    if log_prior is not None:
        logits = logits + log_prior
    return torch.softmax(logits, dim=-1)


def bayes(pr: ClassificationPrompts) -> torch.Tensor:
    """The true posterior given the task's means, the test Lam and the class prior."""
    return _lda(pr.tasks.means, pr.cov.inv, pr.xq, pr.log_prior)


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


def lsa_classifier(params: dict[str, torch.Tensor]) -> Estimator:
    """The LSA with given parameters (`W`, or `W_PV` and `W_KQ` of the full form): `lsa.estimator`
    on the context's class statistics, class probabilities out."""
    return lsa.estimator(params, lambda pr, full: context_gram(pr.ctx, pr.xq, pr.c) if full else context_V(pr.ctx, pr.c), lsa.probabilities, needs_within=True)


def projected_W(W: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """W projected on the line of Lam^-1: <W, Lam^-1> / ||Lam^-1||_F^2 Lam^-1 = c''(1 + g) Lam^-1.

    By the O(d) invariance of the whitened problem the population minimiser is exactly a multiple of
    Lam^-1 (theory.md section 5), so the projection keeps the trained model's G and drops its
    finite-B sampling noise off that line: the B -> inf limit of the trained LSA.  Shapes: [d, d].
    """
    inv = inv.to(W)
    return lsa.line_coefficient(W, inv) * inv


def projected_lsa(cfg: TrialConfig, cov: Covariance, params: dict[str, torch.Tensor] | None) -> Estimator | None:
    """`lsa_projected` of one run: its trained reduced W projected on the line of Lam^-1 (None for
    a run without a reduced W: the full form, a transformer)."""
    if params is None or "W" not in params:
        return None
    return lsa_classifier({"W": projected_W(params["W"], cov.inv)})


def lsa_limit(pr: ClassificationPrompts) -> torch.Tensor:
    """The LSA at its theoretical limit W = 2 Lam^-1 (binary) or c Lam^-1, Lam the training covariance."""
    scale = 2.0 if pr.c == 2 else float(pr.c)
    return lsa_classifier({"W": scale * (pr.train_cov or pr.cov).inv})(pr)


def lda_plugin(pr: ClassificationPrompts) -> torch.Tensor:
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


def lda_pooled(pr: ClassificationPrompts) -> torch.Tensor:
    """Class means and the pooled, shrunk covariance from the context (`pooled_covariance`)."""
    return _lda(pr.ctx.means, torch.linalg.inv(pooled_covariance(pr.ctx, pr.xq.shape[1])), pr.xq)


lda_pooled.needs_within = True


def logreg(pr: ClassificationPrompts) -> torch.Tensor:
    """L2-regularised softmax regression with intercepts, fitted on each context by Newton's method.

    Per prompt: minimise sum_m CE(softmax(w [x_m; 1]), y_m) + LOGREG_L2 / 2 ||w||^2 over w [c, d+1]
    (every column regularised, intercepts too), by undamped Newton steps from w = 0, until the
    prompt's own step has max |.| < LOGREG_TOL or after LOGREG_ITERS steps (`logreg_fit`).
    """
    ctx = pr.ctx
    if ctx.exact:
        return bayes(pr)
    w = logreg_fit(ctx.x, ctx.y, pr.c)
    xq = torch.cat([pr.xq, torch.ones_like(pr.xq[:, :1])], dim=-1)
    return torch.softmax(torch.einsum("pki,pi->pk", w, xq), dim=-1)


def _logreg_layout(c: int, d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Constants of `logreg_fit` for c classes in dimension d; features [x; 1], intercept last.

    Returns Q [c, c-1] (class k < c-1 as itself, class c-1 as minus their sum), K [c*c, U] (the U
    class pairs a <= b < c-1 to all c x c pairs: rows and columns of diag p - p p^T sum to 0),
    gidx (gathers the [(k,i), (l,j)] Hessian, laid out as w [c, d+1], from K's output over the
    columns [x_0 .. x_{d-1}, 1, x_i x_j for i <= j < d]) and the pairs.
    """
    e = d + 1
    T = e + d * (d + 1) // 2  # sums of weight x_i, weight, weight x_i x_j (i <= j)
    col = torch.empty(e, e, dtype=torch.long)  # column of the product [x; 1]_i [x; 1]_j
    col[:, d] = col[d, :] = torch.arange(e)
    iu, ju = torch.triu_indices(d, d)
    col[iu, ju] = col[ju, iu] = e + torch.arange(iu.numel())
    Q = torch.cat([torch.eye(c - 1), -torch.ones(1, c - 1)]).double()
    ka, kb = torch.triu_indices(c - 1, c - 1)
    U = ka.numel()
    S = torch.zeros((c - 1) ** 2, U, dtype=torch.float64)  # symmetric pairs -> all (a, b)
    S[ka * (c - 1) + kb, torch.arange(U)] = 1.0
    S[kb * (c - 1) + ka, torch.arange(U)] = 1.0
    k, i = torch.arange(c)[:, None, None, None], torch.arange(e)[None, :, None, None]
    k2, j = torch.arange(c)[None, None, :, None], torch.arange(e)[None, None, None, :]
    gidx = ((k * c + k2) * T + col[i, j]).reshape(-1)
    dev, dt = like.device, like.dtype
    return Q.to(dev, dt), (torch.kron(Q, Q) @ S).to(dev, dt), gidx.to(dev), list(zip(ka.tolist(), kb.tolist()))


def logreg_fit(x: torch.Tensor, y: torch.Tensor, c: int, chunk_elems: int | None = None) -> torch.Tensor:
    """The weights of `logreg` on every context.  x [P, M, d], y [P, M] -> w [P, c, d+1] (intercept last).

    Each prompt runs its own Newton iteration w <- w - H^-1 g from w = 0 and stops at the first step
    with max |step| < LOGREG_TOL (that step applied) or after LOGREG_ITERS steps: by quadratic
    convergence the result is the unique minimiser to rounding, and it does not depend on which
    prompts are fitted beside it.  Classes absent from a context have equal weights at the minimiser
    (the objective is symmetric in them); they are set to their mean, so that they tie exactly.

    The work per step and example is two small GEMMs over the examples, O((c-1)^2 d^2 / 4 + c d):

    - H = L2 I + sum_m (diag p_m - p_m p_m^T) (x) [x_m; 1][x_m; 1]^T.  The rows and columns of
      diag p - p p^T sum to 0, so its c x c blocks follow from the U = (c-1)c/2 pairs a <= b < c-1
      (weights p_a delta_ab - p_a p_b); x x^T is symmetric, so a context keeps its d(d+1)/2
      products x_i x_j (i <= j), computed once.  GEMMs: [U + c-1, M] @ [M, d+1] with [x; 1] gives
      the pairs' sums of weight x_i and weight and the gradient's sum_m (p_a - y_a) [x_m; 1];
      [U, M] @ [M, d(d+1)/2] the pairs' sums of weight x_i x_j.  A constant matrix (K) and a
      gather expand them to the [c(d+1), c(d+1)] Hessian, Q to the [c, d+1] gradient.
    - For c = 2 the probability of class 0 is sigmoid((w_0 - w_1) [x; 1]), the softmax's.
    - ClassificationPrompts go in chunks of about `chunk_elems` elements of the products (default
      LOGREG_CHUNK_ELEMS); a chunk drops its converged prompts once they are half of it.

    On the CPU, where the fused C kernels are built (`study.fused`), the same iteration runs one
    context after another in C (`fused.logreg_newton`); `chunk_elems` then does not apply.
    """
    if fused.logreg_applies(x, c):
        out = fused.logreg_newton(x, y, c, LOGREG_L2, LOGREG_TOL, LOGREG_ITERS)
    else:
        out = _newton(x, y, c, chunk_elems)
    unseen = torch.ones(*out.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, y, False)
    tied = unseen & (unseen.sum(1, keepdim=True) > 1)
    if bool(tied.any()):
        mean = (out * tied[..., None]).sum(1, keepdim=True) / tied.sum(1)[:, None, None].clamp(min=1)
        out = torch.where(tied[..., None], mean, out)
    return out


def _newton(x: torch.Tensor, y: torch.Tensor, c: int, chunk_elems: int | None) -> torch.Tensor:
    """`logreg_fit`'s Newton iterations in torch, batched over chunks of prompts.  x [P, M, d], y [P, M] -> w [P, c, d+1]."""
    P, M, d = x.shape
    e, D = d + 1, c * (d + 1)
    T2 = d * (d + 1) // 2
    Q, K, gidx, pairs = _logreg_layout(c, d, x)
    U = len(pairs)
    opts = dict(dtype=x.dtype, device=x.device)
    classes = torch.arange(c - 1, device=x.device)[None, :, None]
    out = torch.zeros(P, c, e, **opts)
    per = max(1, (chunk_elems or LOGREG_CHUNK_ELEMS) // max(M * (e + T2), 1))
    for s in range(0, P, per):
        idx = torch.arange(s, min(P, s + per), device=x.device)
        n = idx.numel()
        xT = torch.empty(n, e, M, **opts)  # [x; 1] of every example, examples last
        xT[:, :d] = x[s : s + n].transpose(1, 2)
        xT[:, d] = 1.0
        xx = torch.empty(n, T2, M, **opts)  # x_i x_j, i <= j < d
        t = 0
        for i in range(d):
            torch.mul(xT[:, i : i + 1], xT[:, i:d], out=xx[:, t : t + d - i])
            t += d - i
        Y = (y[s : s + n, None, :] == classes).to(x.dtype)  # [n, c-1, M] one-hot, last class left out
        w = torch.zeros(n, c, e, **opts)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        for _ in range(LOGREG_ITERS):
            if c == 2:
                p = torch.sigmoid((w[:, :1] - w[:, 1:]) @ xT)
            else:
                p = torch.softmax(w @ xT, 1)[:, : c - 1]
            wts = torch.empty(n, U + c - 1, M, **opts)  # pair weights, then p - y
            for r, (a, b) in enumerate(pairs):
                if a == b:
                    torch.mul(p[:, a], 1.0 - p[:, a], out=wts[:, r])
                else:
                    torch.mul(p[:, a], p[:, b], out=wts[:, r]).neg_()
            torch.sub(p, Y, out=wts[:, U:])
            R1 = wts @ xT.transpose(1, 2)  # [n, U + c-1, d+1]
            R = torch.cat([R1[:, :U], wts[:, :U] @ xx.transpose(1, 2)], dim=2)  # [n, U, d+1 + T2]
            H = (K @ R).reshape(n, -1)[:, gidx].reshape(n, D, D)
            H.diagonal(dim1=1, dim2=2).add_(LOGREG_L2)
            grad = (Q @ R1[:, U:]).add_(w, alpha=LOGREG_L2)
            step = torch.linalg.solve(H, grad.reshape(n, D, 1)).reshape(n, c, e)
            step.mul_(active[:, None, None])  # converged prompts stay where they stopped
            w = w - step
            active &= step.abs().amax((1, 2)) >= LOGREG_TOL
            left = int(active.sum())
            if left == 0:
                break
            if 2 * left <= n:  # drop the converged half of the chunk
                out[idx[~active]] = w[~active]
                idx, xT, xx, Y, w = idx[active], xT[active], xx[active], Y[active], w[active]
                n = left
                active = torch.ones(n, dtype=torch.bool, device=x.device)
        out[idx] = w
    return out


def per_prompt(p: torch.Tensor, p_star: torch.Tensor, pr: ClassificationPrompts) -> dict[str, torch.Tensor]:
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

