"""The minimiser of the reduced LSA's empirical loss, by damped Newton's method.

The reduced prediction V W x_q is linear in W, so the empirical loss (cross-entropy, or squared
error, where one Newton step solves the normal equations) is convex in vec(W) with features
f_j = vec(V_j x_q^T), and Newton's method reaches its minimiser to float64 precision in a few
iterations. The Hessian sum_p sum_jk A_jk f_j f_k^T (A = d^2 loss / d logits^2) is formed without
the features: per prompt it is the Kronecker product (V^T A V) (x) (x_q x_q^T) of two d x d matrices,
so the sum over prompts is one GEMM of their d^2-vectors ([d^2, B] x [B, d^2]), c' times fewer flops
and no [B, c', d^2] temporary. The Hessian at the minimiser also gives the theory's local GD rate
max_i |1 - lr lambda_i(H)| (theory.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from study.lsa import LOSSES

CHUNK = 8192  # prompts per chunk of the loss, gradient and Hessian
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


def _loss_grad_hess(W: torch.Tensor, V: torch.Tensor, xq: torch.Tensor, y: torch.Tensor, hess: bool, loss_name: str):
    """Mean loss, gradient [d, d] and Hessian [d*d, d*d] (row-major vec(W)) of V W x_q.

    Shapes: V [c', d, B], xq [d, B] (prompts last), y [B].
    """
    c, d, B = V.shape
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    grad = torch.zeros_like(W)
    H = torch.zeros(d * d, d * d, dtype=W.dtype, device=W.device) if hess else None  # [(a, a'), (e, e')] until the end
    for s in range(0, B, CHUNK):
        Vc, xc = V[..., s : s + CHUNK], xq[:, s : s + CHUNK]
        logits = (Vc * (W @ xc)[None]).sum(1)  # [c', b]
        ls, g = LOSSES[loss_name](logits, y[s : s + CHUNK])
        loss += ls
        grad += (g[:, None] * Vc).sum(0) @ xc.T
        if hess:
            if loss_name == "squared":
                m = Vc[0][:, None] * Vc[0][None]  # V^T V: [d, d, b]
            elif c == 1:
                p = torch.sigmoid(logits[0])
                m = (Vc[0] * (p * (1 - p)))[:, None] * Vc[0][None]
            else:
                p = torch.softmax(logits, dim=0)
                pv = p[:, None] * Vc  # [c', d, b]
                vbar = pv.sum(0)
                m = -vbar[:, None] * vbar[None]  # V^T (diag p - p p^T) V, one class at a time
                for j in range(c):
                    m.addcmul_(pv[j][:, None], Vc[j][None])
            x2 = xc[:, None] * xc[None]  # x_q x_q^T: [d, d, b]
            H += m.reshape(d * d, -1) @ x2.reshape(d * d, -1).T
    if hess:
        H = H.reshape(d, d, d, d).permute(0, 2, 1, 3).reshape(d * d, d * d) / B
    return loss / B, grad.reshape(-1) / B, H


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
    V, xq = V.double().permute(1, 2, 0).contiguous(), xq.double().T.contiguous()  # prompts last (no copy when stored so, as Problem does)
    d = xq.shape[0]
    w = torch.zeros(d * d, dtype=torch.float64, device=V.device) if W0 is None else W0.double().reshape(-1).clone()
    if not torch.isfinite(w).all():
        w.zero_()
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        value, grad, H = _loss_grad_hess(w.reshape(d, d), V, xq, y, True, loss)
        jitter = 1e-12 * H.diagonal().mean().clamp(min=1e-300)
        step = torch.linalg.solve(H + jitter * torch.eye(len(w), dtype=w.dtype, device=w.device), grad)
        decrement = float(grad @ step)  # squared Newton decrement
        if decrement / 2 <= tol:
            # inside the region of quadratic convergence: one full step reaches float64 precision
            w, converged = w - step, True
            break
        t = 1.0
        while t > 1e-6:  # Armijo backtracking keeps every iterate a descent
            trial, _, _ = _loss_grad_hess((w - t * step).reshape(d, d), V, xq, y, False, loss)
            if trial <= value - 1e-4 * t * decrement:
                break
            t /= 2
        else:
            break  # no step decreases the loss any more: float64 precision is reached
        w = w - t * step
    value, _, H = _loss_grad_hess(w.reshape(d, d), V, xq, y, True, loss)
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
