"""Closed forms of the theory: the population optimum of the regression LSA (theory.md section 3).

The reduced LSA predicts y_hat = x_q^T Gamma h with h = (1/N) sum_i y_i x_i. Because x_q is
independent of (beta_q, h) with E[x_q x_q^T] = Sx, the normal equations of the population squared
loss give Gamma* = E[beta_q h^T] (E[h h^T])^{-1}. With y x = x x^T beta + sigma eps x and Gaussian x,

    E[h h^T]      = (1/N) (2 Sx A Sx + tr(A Sx) Sx + sigma^2 Sx) + (1 - 1/N) Sx C Sx,
    E[beta_q h^T] = C Sx,

where A = E[beta_z beta_z^T] (one example's regressor) and C = E[beta_z beta_z'^T] for two
different examples, or the query and an example, of one prompt:
    assignment sample:  C = sum_{k,l} pi_k pi_l E[beta_k beta_l^T]   (independent components)
    assignment prompt:  C = A                                        (one component per prompt)
with E[beta_k beta_l^T] = the pool's beta_k beta_l^T (components: pool), or for fresh components
r^2/d I if k = l, -r^2/d I for the symmetric pair, 0 otherwise (r = ||beta_k||).
K = 1, sigma = 0, beta ~ uniform gives Zhang-Frei-Bartlett's ((1 + 1/N) Sx + tr(Sx)/N I)^{-1}.
"""

from __future__ import annotations

import torch

from study.config import MORTask
from study.covariance import Covariance
from study.mor import pool


def regressor_moments(task: MORTask) -> tuple[torch.Tensor, torch.Tensor]:
    """A = E[beta_z beta_z^T] and C (see the module docstring).  Shapes: [d, d] each."""
    d, K = task.d, task.K
    pi = torch.tensor(task.weights, dtype=torch.float64)
    if task.components == "pool":
        betas = pool(task)
        second = torch.einsum("kd,le->klde", betas, betas)  # E[beta_k beta_l^T]
    else:
        coef = torch.eye(K, dtype=torch.float64)
        if task.symmetric:
            coef = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
        second = coef[:, :, None, None] * (task.radius**2 / d) * torch.eye(d, dtype=torch.float64)
    A = torch.einsum("k,kkde->de", pi, second)
    C = A if task.assignment == "prompt" else torch.einsum("k,l,klde->de", pi, pi, second)
    return A, C


def _moments(task: MORTask, cov: Covariance, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E[h h^T] and E[beta_q h^T] at prompt length N.  Shapes: [d, d] each."""
    A, C = regressor_moments(task)
    S = cov.lam
    Ehh = (2 * S @ A @ S + torch.trace(A @ S) * S + task.sigma**2 * S) / N + (1 - 1 / N) * S @ C @ S
    return Ehh, C @ S


def gamma_star(task: MORTask, cov: Covariance, N: int) -> torch.Tensor:
    """The population optimum Gamma* of the reduced regression LSA at prompt length N.  Shapes: [d, d]."""
    Ehh, EbH = _moments(task, cov, N)
    return torch.linalg.solve(Ehh, EbH.T).T  # EbH @ Ehh^{-1}; Ehh is symmetric


def excess_risk(task: MORTask, cov: Covariance, N: int, gamma: torch.Tensor) -> torch.Tensor:
    """Population excess risk R(Gamma) - R(Gamma*) of the reduced regression LSA at length N.

    R is quadratic with its minimum at Gamma*, and x_q is independent of h, so
    R(Gamma) - R(Gamma*) = E[(x_q^T (Gamma - Gamma*) h)^2] = tr(Sx D E[h h^T] D^T), D = Gamma - Gamma*.
    gamma: [..., d, d]; returns [...].
    """
    Ehh, EbH = _moments(task, cov, N)
    D = gamma.to(Ehh.dtype) - torch.linalg.solve(Ehh, EbH.T).T
    return torch.einsum("ij,...jk,kl,...il->...", cov.lam, D, Ehh, D)
