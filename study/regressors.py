"""Estimators of family `mor`, all with one call signature: `estimator(prompts) -> y_hat [P]`.

Only `oracle` reads the hidden regressors; `ols`, `ridge` and `em` (study/em.py) see the context
alone, `lsa_opt` the context and the population optimum Gamma*. An estimator that cannot run at
this context length (ols with M < d) returns None and its rows are left out of the store.
At M = inf the context is its exact expectation: h = E[y x | task], and an estimator fitted on an
infinite context returns the population regression of y on x (the mean regressor for
`assignment: sample`, the prompt's own regressor for `assignment: prompt`), which is also the
oracle's prediction there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from study import em, lsa
from study.config import Eval, MORTask, TrialConfig
from study.covariance import Covariance
from study.estimators import Estimator
from study.rng import EVAL_BLOCK, generator
from study.theory import gamma_star


@dataclass
class RegressionPrompts:
    """Evaluation prompts of one test length M (x, y None when M = inf).

    Shapes: x [P, M, d], y [P, M], xq [P, d], yq [P], betas [P, K, d], zq [P].
    """

    M: float
    x: torch.Tensor | None
    y: torch.Tensor | None
    xq: torch.Tensor
    yq: torch.Tensor
    betas: torch.Tensor
    zq: torch.Tensor
    task: MORTask
    cov: Covariance
    seed: int = 0
    first_block: int = 0  # index of the first prompt's random block (EM draws its starts per block)

    @property
    def exact(self) -> bool:
        return math.isinf(self.M)

    def population_beta(self) -> torch.Tensor:
        """The population regression of y on x given the task.  Shapes: [P, d]."""
        if self.task.assignment == "prompt":
            return self.betas[torch.arange(len(self.zq)), self.zq]
        pi = torch.tensor(self.task.weights, dtype=self.betas.dtype, device=self.betas.device)
        return torch.einsum("k,pkd->pd", pi, self.betas)

    def h(self) -> torch.Tensor:
        """(1/M) sum_i y_i x_i, or its expectation Sx beta_pop at M = inf.  Shapes: [P, d]."""
        if self.exact:
            return self.population_beta() @ self.cov.lam
        return torch.einsum("pm,pmd->pd", self.y, self.x) / self.M

    def gram(self) -> torch.Tensor:
        """Z Z^T / M with label row y (query column included), or its expectation.  Shapes: [P, d+1, d+1]."""
        if self.exact:
            S = self.cov.lam
            h = self.h()
            pi = torch.tensor(self.task.weights, dtype=S.dtype, device=S.device)
            if self.task.assignment == "prompt":
                b = self.population_beta()
                yy = torch.einsum("pd,de,pe->p", b, S, b)
            else:
                yy = torch.einsum("k,pkd,de,pke->p", pi, self.betas, S, self.betas)
            yy = yy + self.task.sigma**2
            top = torch.cat([S.expand(len(h), -1, -1), h[:, :, None]], dim=2)
            return torch.cat([top, torch.cat([h, yy[:, None]], dim=1)[:, None, :]], dim=1)
        z = torch.cat([self.x, self.y[..., None]], dim=-1)
        G = z.transpose(1, 2) @ z
        d = self.xq.shape[1]
        G[:, :d, :d] += self.xq[:, :, None] * self.xq[:, None, :]
        return G / self.M



def _predict(beta: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return (beta * xq).sum(-1)


def oracle(pr: RegressionPrompts) -> torch.Tensor:
    """Knows beta_k, pi, sigma: the posterior mean of y_q given the context."""
    if pr.task.assignment == "sample" or pr.exact:
        return _predict(pr.population_beta(), pr.xq)  # sample: z_q is independent of the context
    resid = pr.y[:, None, :] - torch.einsum("pkd,pmd->pkm", pr.betas, pr.x)  # [P, K, M]
    sse = (resid * resid).sum(-1)
    logpi = torch.tensor(pr.task.weights, dtype=sse.dtype, device=sse.device).log()
    if pr.task.sigma > 0:
        w = torch.softmax(logpi - sse / (2 * pr.task.sigma**2), dim=-1)  # log space: no overflow as sigma -> 0
    else:  # the sigma -> 0 limit: the component that fits the context exactly
        w = torch.nn.functional.one_hot((sse - 1e-12 * logpi).argmin(-1), pr.task.K).to(sse.dtype)
    return (w * torch.einsum("pkd,pd->pk", pr.betas, pr.xq)).sum(-1)


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    d = x.shape[-1]
    A = x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(A, (x.transpose(1, 2) @ y[..., None]))[..., 0]


def ols(pr: RegressionPrompts) -> torch.Tensor | None:
    """Least squares on the context; needs M >= d."""
    if pr.exact:
        return _predict(pr.population_beta(), pr.xq)
    if pr.M < pr.xq.shape[1]:
        return None
    return _predict(_ridge_fit(pr.x, pr.y, 0.0), pr.xq)


def ridge(pr: RegressionPrompts) -> torch.Tensor:
    """Ridge on the context with lambda = d / snr^2 on sum_i (y_i - x_i^T b)^2 + lambda ||b||^2."""
    if pr.exact:
        return _predict(pr.population_beta(), pr.xq)
    d = pr.xq.shape[1]
    return _predict(_ridge_fit(pr.x, pr.y, d / pr.task.snr**2), pr.xq)


def lsa_regressor(params: dict[str, torch.Tensor]) -> Estimator:
    """The regression LSA with given parameters: `W` (= Gamma^T), or `W_PV` and `W_KQ`: `lsa.estimator`
    on the context's h (as V = h^T) or Gram matrix, the one logit out."""
    return lsa.estimator(params, lambda pr, full: pr.gram() if full else pr.h()[:, None, :], lambda out: out[:, 0])


def optimal_lsa(cfg: TrialConfig, cov: Covariance, params: dict[str, torch.Tensor] | None) -> Estimator:
    """`lsa_opt` of one run: the LSA at Gamma* of its training length N (the trained model's target)."""
    return lsa_regressor({"W": gamma_star(cfg.task, cov, cfg.train.N).T})


def _posterior_predict(beta: torch.Tensor, pi: torch.Tensor, sigma: torch.Tensor, pr: RegressionPrompts) -> torch.Tensor:
    """The oracle's rule with given parameters.  Shapes: beta [P, K, d], pi [P, K], sigma [P]."""
    if pr.task.assignment == "sample":
        return _predict(torch.einsum("pk,pkd->pd", pi, beta), pr.xq)
    resid = pr.y[:, None, :] - torch.einsum("pkd,pmd->pkm", beta, pr.x)
    logw = pi.log() - (resid * resid).sum(-1) / (2 * sigma[:, None] ** 2)
    return (torch.softmax(logw, dim=-1) * torch.einsum("pkd,pd->pk", beta, pr.xq)).sum(-1)


def em_estimator(ev: Eval, grad_steps: int = 0) -> Estimator:
    """EM (or gradient EM with `grad_steps` inner steps) fitted on each context; also reports
    `param_error` and `param_failure` (1 where param_error > ||beta_k|| / 2, so its mean is the share
    of failed fits)."""
    def predict(pr: RegressionPrompts):
        task = pr.task
        if pr.exact:  # an infinite context identifies the parameters: the oracle's prediction
            return oracle(pr)
        if pr.M < task.K:
            return None
        P, M, d = pr.x.shape
        n_blocks = -(-P // EVAL_BLOCK)
        key = {"data": task.data_key(), "seed": pr.seed, "em": ev.em_restarts}
        z = torch.cat([torch.randn(EVAL_BLOCK, ev.em_restarts, task.K, d, generator=generator(key, "init", pr.first_block + j), dtype=torch.float64) for j in range(n_blocks)])[:P]
        sigma = task.sigma if ev.em_sigma == "known" else None
        f = em.fit(pr.x, pr.y, em.init_beta(pr.x, pr.y, z.to(pr.x)), sigma, ev.em_iters, ev.em_tol, grad_steps)
        err = em.param_error(f.beta, pr.betas, task.symmetric)
        # a failed fit: further from the truth than half a regressor's norm (a bad start EM never left)
        return _posterior_predict(f.beta, f.pi, f.sigma, pr), {"param_error": err, "param_failure": (err > task.radius / 2).to(err.dtype)}

    return predict


def gradient_em_estimator(ev: Eval) -> Estimator:
    """`gradient_em`: EM whose M-step is `gem_steps` gradient steps."""
    return em_estimator(ev, ev.gem_steps)


def per_prompt(y_hat: torch.Tensor, y_ref: torch.Tensor, pr: RegressionPrompts) -> dict[str, torch.Tensor]:
    """`mse` on the query and `excess_mse` over the oracle, paired per prompt."""
    se = (y_hat - pr.yq) ** 2
    return {"mse": se, "excess_mse": se - (y_ref - pr.yq) ** 2}

