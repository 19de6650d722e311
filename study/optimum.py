"""The minimiser of the reduced LSA's empirical loss, by damped Newton's method.

The reduced prediction V W x_q is linear in W, so the empirical loss (cross-entropy, or squared
error, where one Newton step solves the normal equations) is convex in vec(W) with features
f = vec(V_j x_q^T), and Newton's method reaches its minimiser to float64 precision in a few
iterations. The Hessian at the minimiser also gives the theory's local GD rate
max_i |1 - lr lambda_i(H)| (theory.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from study.lsa import LOSSES

CHUNK = 8192  # prompts per chunk when forming the d^2 x d^2 Hessian
SEPARABLE_LOSS = 1e-8  # a CE optimum this small means the training prompts are separable


@dataclass
class Optimum:
    """Shapes: W [d, d], hess [d*d, d*d] (at W), hess_eigs [d*d]."""

    W: torch.Tensor
    loss: float
    hess: torch.Tensor
    hess_eigs: torch.Tensor
    converged: bool
    iterations: int


def _features(V: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """f_j = vec(V_j x_q^T), row-major like W.  Shapes: V [b, c', d], xq [b, d] -> [b, c', d*d]."""
    b, c, d = V.shape
    return (V[..., :, None] * xq[:, None, None, :]).reshape(b, c, d * d)


def _loss_grad_hess(w: torch.Tensor, V: torch.Tensor, xq: torch.Tensor, y: torch.Tensor, hess: bool, loss_name: str):
    B = V.shape[0]
    loss = torch.zeros((), dtype=w.dtype, device=w.device)
    grad = torch.zeros_like(w)
    H = torch.zeros(w.numel(), w.numel(), dtype=w.dtype, device=w.device) if hess else None
    for s in range(0, B, CHUNK):
        f = _features(V[s : s + CHUNK], xq[s : s + CHUNK])
        logits = f @ w
        ls, g = LOSSES[loss_name](logits, y[s : s + CHUNK])
        loss += ls.sum()
        grad += torch.einsum("bj,bjk->k", g, f)
        if hess:
            if loss_name == "squared":
                H += f[:, 0].T @ f[:, 0]
            elif f.shape[1] == 1:
                p = torch.sigmoid(logits[:, 0])
                fw = f[:, 0] * (p * (1 - p))[:, None]
                H += fw.T @ f[:, 0]
            else:
                p = torch.softmax(logits, dim=-1)
                fbar = torch.einsum("bj,bjk->bk", p, f)
                for j in range(f.shape[1]):  # c' plain GEMMs: far faster than one einsum here
                    H += (f[:, j] * p[:, j, None]).T @ f[:, j]
                H -= fbar.T @ fbar
    return loss / B, grad / B, (H / B if hess else None)


def empirical_optimum(
    V: torch.Tensor,
    xq: torch.Tensor,
    y: torch.Tensor,
    W0: torch.Tensor | None = None,
    loss: str = "ce",
    tol: float = 1e-14,
    max_iter: int = 100,
) -> Optimum:
    """Minimise the mean loss of V W x_q over W by damped Newton, from W0 (default 0).

    Stops one full Newton step after the squared Newton decrement falls below 2 tol (quadratic
    convergence then leaves the iterate at float64 precision), or when no step decreases the loss. Shapes: V [B, c', d], xq [B, d], y [B], W0 [d, d].
    """
    V, xq = V.double(), xq.double()
    d = xq.shape[1]
    w = torch.zeros(d * d, dtype=torch.float64, device=V.device) if W0 is None else W0.double().reshape(-1).clone()
    if not torch.isfinite(w).all():
        w.zero_()
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        value, grad, H = _loss_grad_hess(w, V, xq, y, True, loss)
        jitter = 1e-12 * H.diagonal().mean().clamp(min=1e-300)
        step = torch.linalg.solve(H + jitter * torch.eye(len(w), dtype=w.dtype, device=w.device), grad)
        decrement = float(grad @ step)  # squared Newton decrement
        if decrement / 2 <= tol:
            # inside the region of quadratic convergence: one full step reaches float64 precision
            w, converged = w - step, True
            break
        t = 1.0
        while t > 1e-6:  # Armijo backtracking keeps every iterate a descent
            trial, _, _ = _loss_grad_hess(w - t * step, V, xq, y, False, loss)
            if trial <= value - 1e-4 * t * decrement:
                break
            t /= 2
        else:
            break  # no step decreases the loss any more: float64 precision is reached
        w = w - t * step
    value, _, H = _loss_grad_hess(w, V, xq, y, True, loss)
    eigs = torch.linalg.eigvalsh(H)
    if loss == "ce" and (float(value) < SEPARABLE_LOSS or float(eigs[0]) <= 1e-12 * float(eigs[-1])):
        converged = False  # separable data: the infimum is at infinity, the iterate is arbitrary
    return Optimum(w.reshape(d, d), float(value), H, eigs, converged, it)


RANGE_TOL = 1e-12  # eigenvalues below this fraction of the largest are the Hessian's null space


def local_rate(hess_eigs: torch.Tensor, lr: float) -> float:
    """GD's contraction per step near the optimum: max_i |1 - lr lambda_i(H)| over the Hessian's range.

    Both LSA losses are functions of <W, f_p> for per-prompt features f_p, so every gradient, and
    the Hessian's range, lies in span(f_p): GD from W = 0 never moves along the null space (B < d^2
    prompts leave one), whose eigenvalue 0 would otherwise give a spurious rate of 1.
    """
    live = hess_eigs[hess_eigs > RANGE_TOL * hess_eigs.abs().max()]
    return float((1.0 - lr * live).abs().max()) if len(live) else float("nan")


def quadratic_subopt(hess: torch.Tensor, e0: torch.Tensor, lr: float, steps: list[int]) -> torch.Tensor:
    """GD's loss gap on a quadratic loss, predicted from the start: 0.5 sum_i lambda_i (1 - lr lambda_i)^(2t) a_i^2.

    a = Q^T e0 are the initial error's components in the Hessian's eigenbasis (H = Q diag(lambda) Q^T),
    so the whole curve, not only its slowest rate, follows from the Hessian and the start ([J] claim 3:
    the regression LSA's loss is exactly quadratic). Shapes: hess [p, p], e0 [p] -> [len(steps)].
    """
    lam, Q = torch.linalg.eigh(hess.double())
    a2 = (Q.T @ e0.double().reshape(-1)) ** 2
    t = torch.tensor(steps, dtype=torch.float64, device=lam.device)[:, None]
    return 0.5 * (lam * ((1.0 - lr * lam) ** 2)[None] ** t * a2).sum(-1)
