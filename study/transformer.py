"""The multi-layer transformer of theory.md section 4, as an ensemble with batched parameters.

Every parameter carries a leading member dimension S (configurations x seeds of one shape), and
every operation is a batched matrix product over it, so S members train as one network with S
times the width of its tensors: the same arithmetic as `torch.func.stack_module_state` + `vmap`
over S copies, without vmap's dispatch (theory.md names that pair; batched parameters are the
equivalent the issue allows, and `tests/test_transformer.py` checks the ensemble against separate
runs).

A prompt is one token per example, `[x_i; ytil_i]`, and a query token `[x_q; 0]`, last. The query's
label slot is zeroed here, whatever the caller put there, so the read-out cannot see its label.
Blocks are pre-norm (`norm`: LayerNorm before attention, before the MLP and before the read-out;
`norm: false` drops them, which the LSA's block structure needs), attention is bidirectional over
all tokens (no causal mask: only the query is read out, and a context token that sees the query
sees only its x), and the read-out is linear at the query: c' logits or one regression value.

Attention kinds, with n the number of context examples (the query excluded, as the LSA's 1/N):
`softmax`: softmax(q.k / sqrt(d_h)); `linear`: q.k / n; `relu`: ReLU(q.k) / n (the EM
construction of [J]). Learned positions: context position i has embedding P[min(i, N - 1)] and the
query its own, so a context longer than the training length N reuses the last trained position
for the examples beyond it (a rule, not a trained behaviour: the evaluation at M > N measures it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


def init(S: int, d_in: int, d_out: int, layers: int, width: int, mlp: bool, positions: int, gens: list[torch.Generator], dtype: torch.dtype) -> Params:
    """GPT-2-style initialisation of S members, member s from its own generator `gens[s]`.

    Weights N(0, 0.02^2), residual projections N(0, (0.02 / sqrt(2 L))^2), biases 0, norms 1.
    `positions` > 0 adds learned position embeddings: that many context positions and the query's.
    """
    shapes: dict[str, tuple[int, ...]] = {"embed": (d_in, width), "embed_b": (width,)}
    if positions:
        shapes["pos"] = (positions + 1, width)  # the last row is the query's
    for layer in range(layers):
        p = f"l{layer}."
        shapes |= {p + "ln1_g": (width,), p + "ln1_b": (width,), p + "qkv": (width, 3 * width), p + "qkv_b": (3 * width,), p + "out": (width, width), p + "out_b": (width,)}
        if mlp:
            shapes |= {p + "ln2_g": (width,), p + "ln2_b": (width,), p + "fc": (width, 4 * width), p + "fc_b": (4 * width,), p + "proj": (4 * width, width), p + "proj_b": (width,)}
    shapes |= {"lnf_g": (width,), "lnf_b": (width,), "head": (width, d_out), "head_b": (d_out,)}
    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("_g"):
            out[name] = torch.ones(S, *shape, dtype=dtype)
        elif leaf.endswith("_b"):
            out[name] = torch.zeros(S, *shape, dtype=dtype)
        else:
            std = 0.02 / math.sqrt(2 * layers) if leaf in ("out", "proj") else 0.02
            out[name] = torch.stack([torch.randn(*shape, generator=g, dtype=torch.float64) * std for g in gens]).to(dtype)
    return out


def tokens(x: torch.Tensor, ytil: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """The prompt as tokens.  Shapes: x [..., n, d], ytil [..., n, c'], xq [..., d] -> [..., n + 1, d + c']."""
    q = torch.cat([xq, torch.zeros_like(ytil[..., 0, :])], dim=-1)
    return torch.cat([torch.cat([x, ytil], dim=-1), q.unsqueeze(-2)], dim=-2)


def _layer_norm(h: torch.Tensor, g: torch.Tensor, b: torch.Tensor, norm: bool) -> torch.Tensor:
    if not norm:
        return h
    h = F.layer_norm(h, h.shape[-1:])
    return h * g[:, None, None] + b[:, None, None]


def _linear(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h [S, P, T, a] @ W [S, a, c] + b [S, c], one batched GEMM over the members."""
    S, P, T, a = h.shape
    return torch.baddbmm(b[:, None], h.reshape(S, P * T, a), W).reshape(S, P, T, -1)


def _attention(h: torch.Tensor, p: Params, prefix: str, heads: int, kind: str) -> torch.Tensor:
    S, P, T, w = h.shape
    dh = w // heads
    qkv = _linear(h, p[prefix + "qkv"], p[prefix + "qkv_b"]).reshape(S * P, T, 3, heads, dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [S P, H, T, dh]
    n = T - 1  # context examples; the query excluded
    if kind == "softmax":
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        a = q @ k.transpose(-1, -2)
        if kind == "relu":
            a = torch.relu(a)
        o = (a / n) @ v
    o = o.transpose(1, 2).reshape(S, P, T, w)
    return _linear(o, p[prefix + "out"], p[prefix + "out_b"])


def forward(p: Params, Z: torch.Tensor, model: Any, n_label: int) -> torch.Tensor:
    """Read-out at the query of every prompt of every member.

    Shapes: Z [S, P, T, d + c'] (`tokens`, query last; its last `n_label` entries are the label
    slot) -> [S, P, c'] (or [S, P, 1]). `model` is the `TransformerModel` config.
    """
    Z = Z.clone()
    Z[..., -1, Z.shape[-1] - n_label :] = 0.0  # the query's label slot: never seen
    S, P, T, _ = Z.shape
    h = _linear(Z, p["embed"], p["embed_b"])
    if "pos" in p:
        trained = p["pos"].shape[1] - 1
        idx = torch.clamp(torch.arange(T - 1, device=Z.device), max=trained - 1)
        h = h + torch.cat([p["pos"][:, idx], p["pos"][:, -1:]], dim=1)[:, None]  # [S, 1, T, w]
    for layer in range(model.layers):
        pre = f"l{layer}."
        h = h + _attention(_layer_norm(h, p[pre + "ln1_g"], p[pre + "ln1_b"], model.norm), p, pre, model.heads, model.attention)
        if model.mlp:
            u = F.gelu(_linear(_layer_norm(h, p[pre + "ln2_g"], p[pre + "ln2_b"], model.norm), p[pre + "fc"], p[pre + "fc_b"]))
            h = h + _linear(u, p[pre + "proj"], p[pre + "proj_b"])
    hq = _layer_norm(h[:, :, -1:], p["lnf_g"], p["lnf_b"], model.norm)
    return _linear(hq, p["head"], p["head_b"])[:, :, 0]


def clip_(grads: Params, clip: torch.Tensor) -> torch.Tensor:
    """Scale each member's gradient to global norm at most clip[s] (clip 0: no clipping); returns the norms [S]."""
    norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    scale = torch.where(clip > 0, (clip / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    for g in grads.values():
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
    return norm


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with a step size per
    member: lr [S] times a linear warm-up over `warmup` steps.  Weight decay skips biases and norms."""

    def __init__(self, params: Params, lr: torch.Tensor, weight_decay: float, warmup: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.wd, self.warmup, self.betas, self.eps = lr, weight_decay, warmup, betas, eps
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        b1, b2 = self.betas
        ramp = min(1.0, self.t / self.warmup) if self.warmup else 1.0
        with torch.no_grad():
            for k, p in params.items():
                lr = (self.lr * ramp).view(-1, *([1] * (p.dim() - 1)))
                if self.wd and not k.endswith(("_b", "_g")):
                    p.mul_(1 - lr * self.wd)
                m, v = self.m[k], self.v[k]
                m.mul_(b1).add_(grads[k], alpha=1 - b1)
                v.mul_(b2).addcmul_(grads[k], grads[k], value=1 - b2)
                denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
                p.sub_(lr * (m / (1 - b1**self.t)) / denom)
