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

import torch
import torch.nn.functional as F


def reduced_logits(W: torch.Tensor, V: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Shapes: W [S, d, d], V [S, B, c', d], xq [S, B, d] -> logits [S, B, c']."""
    u = torch.bmm(xq, W.transpose(1, 2))  # W x_q for every prompt: one batched GEMM
    return torch.einsum("sbjd,sbd->sbj", V, u)


def reduced_grad(g: torch.Tensor, V: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """d(summed loss)/dW from dloss/dlogits g [S, B, c'].  Shapes: -> [S, d, d]."""
    gv = torch.einsum("sbj,sbjd->sbd", g, V)
    return torch.bmm(gv.transpose(1, 2), xq)


def full_logits(P: torch.Tensor, K: torch.Tensor, G: torch.Tensor, xq: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shapes: P [S, c', D], K [S, D, d], G [S, B, D, D], xq [S, B, d] -> logits [S, B, c'] (+ saved)."""
    a = torch.bmm(xq, K.transpose(1, 2))  # K x_q: [S, B, D]
    h = torch.einsum("sbij,sbj->sbi", G, a)  # G K x_q
    return torch.bmm(h, P.transpose(1, 2)), a, h


def full_grad(g: torch.Tensor, P: torch.Tensor, G: torch.Tensor, xq: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the summed loss w.r.t. P and K.  Shapes: g [S, B, c'] -> [S, c', D], [S, D, d]."""
    dP = torch.bmm(g.transpose(1, 2), h)
    dh = torch.bmm(g, P)  # [S, B, D]
    da = torch.einsum("sbij,sbi->sbj", G, dh)  # G is symmetric
    dK = torch.bmm(da.transpose(1, 2), xq)
    return dP, dK


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


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt CE and its gradient w.r.t. the logits; binary when logits have one column.

    Shapes: logits [..., c'], y [...] (class index) -> loss [...], dloss/dlogits [..., c'].
    """
    if logits.shape[-1] == 1:
        s = logits[..., 0]
        ytil = 2.0 * y.to(s.dtype) - 1.0
        return F.softplus(-ytil * s), (torch.sigmoid(s) - (ytil + 1.0) / 2.0)[..., None]
    logp = torch.log_softmax(logits, dim=-1)
    loss = -logp.gather(-1, y[..., None])[..., 0]
    grad = logp.exp()
    grad.scatter_add_(-1, y[..., None], -torch.ones_like(grad[..., :1]))
    return loss, grad


def squared_error(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt (pred - y)^2 / 2 and its gradient.  Shapes: pred [..., 1], y [...] -> [...], [..., 1]."""
    r = pred[..., 0] - y
    return 0.5 * r * r, r[..., None]


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
