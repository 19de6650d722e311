"""The single-layer linear self-attention model (theory.md section 2), from sufficient statistics.

Full form: f(Z) = Z + W_PV Z (Z^T W_KQ Z) / N; the prediction is the label rows of f(Z)'s query
column. Because the query's label slot is 0 the residual adds nothing there, and the prediction is

    full:     P G K x_q     with P = W_PV[d:, :], K = W_KQ[:, :d], G = Z Z^T / N,
    reduced:  V W x_q       with V = (1/N) sum_i ytil_i x_i^T  (W_PV = [[0,0],[0,I]], W_KQ = [[W,0],[0,0]]).

A GD step then costs O(B d^2) instead of the O(B N^2 d) of the literal formula, which is kept here
only as a test oracle (`literal_prediction`).

Parameters are stacked over the members of a bundle (configurations x seeds) in a leading
dimension S, and every function works on that stack.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch


def reduced_logits(W: torch.Tensor, V: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Shapes: W [S, d, d], V [S, B, c', d], xq [S, B, d] -> logits [S, B, c']."""
    u = torch.bmm(xq, W.transpose(1, 2))  # W x_q for every prompt: one batched GEMM
    return torch.einsum("sbjd,sbd->sbj", V, u)


def full_logits(P: torch.Tensor, K: torch.Tensor, G: torch.Tensor, xq: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shapes: P [S, c', D], K [S, D, d], G [S, B, D, D], xq [S, B, d] -> logits [S, B, c'] (+ saved)."""
    a = torch.bmm(xq, K.transpose(1, 2))  # K x_q: [S, B, D]
    h = torch.einsum("sbij,sbj->sbi", G, a)  # G K x_q
    return torch.bmm(h, P.transpose(1, 2)), a, h


def estimator(params: dict[str, torch.Tensor], statistic: Callable[[Any, bool], torch.Tensor], output: Callable[[torch.Tensor], torch.Tensor], needs_within: bool = False) -> Callable:
    """The LSA with parameters `W` (reduced) or `W_PV` and `W_KQ` (full) as an estimator of a family.

    The family gives `statistic(prompts, full)`: the context's V [P, c', d] (reduced) or its Gram
    matrix Z Z^T / M [P, D, D] (full), and `output(logits [P, c'])`: its prediction. `needs_within`:
    the full form's Gram matrix needs the context's within-class scatter (gmm).
    """

    def predict(pr: Any) -> torch.Tensor:
        xq = pr.xq
        if "W" in params:
            logits = reduced_logits(params["W"][None].to(xq), statistic(pr, False)[None], xq[None])[0]
        else:
            d = xq.shape[1]
            P, K = params["W_PV"][None, d:, :].to(xq), params["W_KQ"][None, :, :d].to(xq)
            logits = full_logits(P, K, statistic(pr, True)[None], xq[None])[0][0]
        return output(logits)

    predict.needs_within = needs_within and "W" not in params
    return predict


# ----------------------------------------------------------------------------------------------
# training kernels: one chunk of prompts, laid out prompts last
#
# GD reads every training prompt's statistics twice a step (logits, then gradient), so the step is
# bound by memory bandwidth at small d. With the prompt index last, each statistic of a chunk is a
# row of b contiguous numbers, and the per-prompt contractions over d and c' (each a handful of
# numbers) become a few fused multiply-adds over whole rows instead of b tiny matrix products.

SMALL = 8  # up to this many terms a per-prompt contraction is a loop of row multiply-adds


def _rows_dot(A: torch.Tensor, u: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_a A[..., a, ..., :] * u[..., a, ..., :] over dimension `dim` (u broadcast to A).

    Shapes: A [S, ..., b] with the contracted dimension at `dim`; u broadcastable to A.
    """
    n = A.shape[dim]
    if n > SMALL:
        return (A * u).sum(dim)
    out = A.select(dim, 0) * u.select(dim, 0)
    for a in range(1, n):
        out.addcmul_(A.select(dim, a), u.select(dim, a))
    return out


def reduced_loss_grad(W: torch.Tensor, V: torch.Tensor, xq: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of V W x_q over a chunk of prompts, and its gradient w.r.t. W.

    Shapes: W [S, d, d], V [S, c', d, b], xq [S, d, b], y [S, b] -> [S], [S, d, d].
    """
    u = torch.bmm(W, xq)  # W x_q for every prompt: one GEMM per member
    logits = _rows_dot(V, u[:, None], 2)  # [S, c', b]
    ls, g = LOSSES[loss](logits, y)
    gv = _rows_dot(V, g[:, :, None], 1)  # g^T V: [S, d, b]
    return ls, torch.bmm(gv, xq.transpose(1, 2))


def full_loss_grad(P: torch.Tensor, K: torch.Tensor, G: torch.Tensor, xq: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed loss of P G K x_q over a chunk of prompts, and its gradients w.r.t. P and K.

    Shapes: P [S, c', D], K [S, D, d], G [S, D, D, b] (symmetric), xq [S, d, b], y [S, b]
    -> [S], [S, c', D], [S, D, d].
    """
    a = torch.bmm(K, xq)  # K x_q: [S, D, b]
    h = _rows_dot(G, a[:, None], 2)  # G K x_q
    ls, g = LOSSES[loss](torch.bmm(P, h), y)
    dP = torch.bmm(g, h.transpose(1, 2))
    da = _rows_dot(G, torch.bmm(P.transpose(1, 2), g)[:, :, None], 1)  # G (P^T g), G symmetric
    return ls, dP, torch.bmm(da, xq.transpose(1, 2))


def line_coefficient(W: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """<W, T>_F / ||T||_F^2: W's projection on the line of T is this times T.  Shapes: [..., d, d] -> [...]."""
    return (W * T).sum((-2, -1)) / (T * T).sum((-2, -1))


def block_init(d: int, n_label: int, S: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """W_PV = [[0,0],[0,I_c']] and W_KQ = 0: the full LSA at the reduced model's W = 0."""
    D = d + n_label
    W_PV = torch.zeros(S, D, D, dtype=dtype)
    W_PV[:, d:, d:] = torch.eye(n_label, dtype=dtype)
    return W_PV, torch.zeros(S, D, D, dtype=dtype)


def effective_W(W_PV: torch.Tensor, W_KQ: torch.Tensor, d: int) -> torch.Tensor:
    """The W that the full model plays in the block structure: mean(diag P_y) * K_x.  Shapes: [S, d, d]."""
    py = torch.diagonal(W_PV[:, d:, d:], dim1=1, dim2=2).mean(-1)
    return py[:, None, None] * W_KQ[:, :d, :d]


# ----------------------------------------------------------------------------------------------
# loss


def _sum_log(t: torch.Tensor, bound: float) -> torch.Tensor:
    """sum of log t over the last dimension, for t in [1, bound] (or non-finite, which propagates).

    Logarithms cost several times an exponential on the CPU, so the sum is taken as the log of
    products of groups small enough never to overflow: one log per group instead of one per prompt,
    with the same rounding (sqrt(n) ulps either way).  Shapes: [..., n] -> [...].
    """
    k = max(1, int(0.9 * math.log(torch.finfo(t.dtype).max) / math.log(bound)))
    n = t.shape[-1]
    whole = n // k * k
    out = t[..., :whole].reshape(*t.shape[:-1], -1, k).prod(-1).log().sum(-1)
    return out + t[..., whole:].prod(-1).log() if whole < n else out


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query's cross-entropy summed over the prompts, and its gradient w.r.t. the logits.

    Binary when there is one logit (sigmoid), softmax otherwise. Shapes (prompts last): logits
    [..., c', b], y [..., b] (class index) -> loss [...], dloss/dlogits [..., c', b].
    """
    if logits.shape[-2] == 1:
        # z = -ytil s; loss softplus(z) = max(z, 0) + log(1 + exp(-|z|)), dloss/ds = -ytil sigma(z)
        s = logits[..., 0, :]
        sign = y.to(s.dtype).mul_(-2.0).add_(1.0)  # -ytil
        z = s * sign
        loss = z.clamp(min=0).sum(-1) + _sum_log(z.abs().neg_().exp_().add_(1.0), 2.0)
        return loss, (torch.sigmoid(z) * sign).unsqueeze(-2)
    # softmax by hand: the max over c' classes as c' - 1 elementwise maxima (a reduction over a
    # handful of classes costs more than the exponentials), then one exp and one sum
    c = logits.shape[-2]
    m = logits.amax(-2) if c > SMALL else functools.reduce(torch.maximum, logits.unbind(-2))
    p = (logits - m.unsqueeze(-2)).exp_()
    total = p.sum(-2, keepdim=True)  # in [1, c']
    idx = y.unsqueeze(-2)
    loss = (m - logits.gather(-2, idx).squeeze(-2)).sum(-1) + _sum_log(total.squeeze(-2), c)
    grad = p / total  # out of place: autograd (tests) may still need exp's output
    grad.scatter_add_(-2, idx, torch.full_like(idx, -1, dtype=p.dtype))
    return loss, grad


def squared_error(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred - y)^2 / 2 summed over the prompts, and its gradient.  Shapes: pred [..., 1, b], y [..., b] -> [...], [..., 1, b]."""
    r = pred[..., 0, :] - y
    return 0.5 * (r * r).sum(-1), r.unsqueeze(-2)


LOSSES = {"ce": cross_entropy, "squared": squared_error}


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from c' logits (binary: sigmoid).  Shapes: [..., c'] -> [..., c]."""
    if logits.shape[-1] == 1:
        p1 = torch.sigmoid(logits)
        return torch.cat([1.0 - p1, p1], dim=-1)
    return torch.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# test oracle


def embed(x: torch.Tensor, ytil: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """The papers' prompt matrix Z.  Shapes: x [B, N, d], ytil [B, N, c'], xq [B, d] -> [B, d+c', N+1]."""
    ctx = torch.cat([x, ytil], dim=-1)
    q = torch.cat([xq, torch.zeros_like(ytil[:, 0])], dim=-1)
    return torch.cat([ctx, q[:, None]], dim=1).transpose(1, 2)


def literal_prediction(W_PV: torch.Tensor, W_KQ: torch.Tensor, Z: torch.Tensor, n_label: int) -> torch.Tensor:
    """The label rows of the query column of Z + W_PV Z (Z^T W_KQ Z) / N, formed literally.

    Shapes: W_PV, W_KQ [D, D], Z [B, D, N+1] -> [B, c'].
    """
    N = Z.shape[-1] - 1
    attn = Z.transpose(1, 2) @ W_KQ @ Z  # [B, N+1, N+1]: the matrix the efficient form avoids
    out = Z + W_PV @ Z @ attn / N
    return out[:, -n_label:, -1]
