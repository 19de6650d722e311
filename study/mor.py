"""Family `mor`: prompts of in-context mixtures of linear regressions (theory.md section 3).

Each beta_k is uniform on the sphere of radius snr * sigma (snr when sigma = 0), drawn per prompt
(`components: fresh`) or once per configuration from `pool_seed` (`components: pool`). Each example
(`assignment: sample`) or the whole prompt (`assignment: prompt`) draws its component z ~ pi;
x ~ N(0, Sx) and y = <beta_z, x> + sigma * eps. Blocks of prompts and of examples have their own
generators (study/rng.py), so a prompt's draws do not depend on how many are drawn beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from study.config import MORTask
from study.covariance import Covariance
from study.rng import EXAMPLE_BLOCK, TRAIN_BLOCK, blocks, drawn_blocks, generator
from study.training import TrainStats


def _sphere(n: int, K: int, d: int, radius: float, symmetric: bool, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(n, K, d, generator=g, dtype=torch.float64)
    u = radius * u / u.norm(dim=-1, keepdim=True)
    if symmetric:
        u[:, 1] = -u[:, 0]
    return u


def pool(task: MORTask) -> torch.Tensor:
    """The configuration's K regressors (components: pool), shared by every prompt and run.  Shapes: [K, d]."""
    g = generator({"pool": task.pool_seed, "d": task.d, "K": task.K, "symmetric": task.symmetric}, "task")
    return _sphere(1, task.K, task.d, task.radius, task.symmetric, g)[0]


@dataclass
class MixturePrompts:
    """Raw regression prompts.

    Shapes: x [P, N, d], y [P, N], z [P, N] (components), xq [P, d], yq [P], zq [P],
    betas [P, K, d] (the prompt's regressors).
    """

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    zq: torch.Tensor
    betas: torch.Tensor

    @property
    def beta_q(self) -> torch.Tensor:
        """The query's regression vector.  Shapes: [P, d]."""
        return self.betas[torch.arange(len(self.zq)), self.zq]


def _key(task: MORTask, seed: int) -> dict[str, Any]:
    return {"data": task.data_key(), "seed": int(seed)}


def prompt_blocks(
    task: MORTask, cov: Covariance, N: int, P: int, seed: int, stream: str, block: int = TRAIN_BLOCK, prefix: tuple[int, ...] = (), key_task: MORTask | None = None
) -> Iterator[MixturePrompts]:
    """P prompts of N context examples each, plus a query, one random block of prompts at a time.

    `prefix`: indices that come before the block index in every generator's key (the step of an
    online stream), so that each prefix draws its own prompts. `key_task`: the task whose random
    streams are used (default `task`): a shifted task draws the same numbers as its original.
    """
    key = _key(key_task or task, seed)
    for b, n_cut in blocks(P, block):
        p = _draw_block(task, cov, N, block, key, stream, prefix, b)
        yield MixturePrompts(*(getattr(p, f)[:n_cut] for f in MixturePrompts.__dataclass_fields__))


def _draw_block(task: MORTask, cov: Covariance, N: int, n: int, key: dict[str, Any], stream: str, prefix: tuple[int, ...], b: int) -> MixturePrompts:
    """Block b of n prompts, whole: a block is always drawn whole and then cut, so prompt i does not depend on P."""
    pi = torch.tensor(task.weights, dtype=torch.float64)
    g = generator(key, stream, *prefix, b)
    betas = pool(task).expand(n, task.K, task.d) if task.components == "pool" else _sphere(n, task.K, task.d, task.radius, task.symmetric, g)
    zq = torch.multinomial(pi, n, replacement=True, generator=g)
    xq = torch.randn(n, task.d, generator=g, dtype=torch.float64) @ cov.half
    yq = (betas[torch.arange(n), zq] * xq).sum(-1) + task.sigma * torch.randn(n, generator=g, dtype=torch.float64)
    xs, ys, zs = [], [], []
    for e, m in blocks(N, EXAMPLE_BLOCK):
        ge = generator(key, stream, *prefix, b, e)
        # draw whole blocks so that example i is the same whatever N is
        z = torch.multinomial(pi, n * EXAMPLE_BLOCK, replacement=True, generator=ge).reshape(n, EXAMPLE_BLOCK)[:, :m]
        if task.assignment == "prompt":
            z = zq[:, None].expand(n, m)
        x = (torch.randn(n, EXAMPLE_BLOCK, task.d, generator=ge, dtype=torch.float64) @ cov.half)[:, :m]
        eps = torch.randn(n, EXAMPLE_BLOCK, generator=ge, dtype=torch.float64)[:, :m]
        beta = torch.gather(betas, 1, z[..., None].expand(n, m, task.d))
        xs.append(x)
        ys.append((beta * x).sum(-1) + task.sigma * eps)
        zs.append(z)
    empty = torch.zeros(n, 0, dtype=torch.float64)
    cat = lambda t, like: torch.cat(t, 1) if t else like  # noqa: E731
    return MixturePrompts(cat(xs, empty[..., None].expand(n, 0, task.d)), cat(ys, empty), cat(zs, empty.long()), xq, yq, zq, betas.clone())


def sample_prompts(task: MORTask, cov: Covariance, N: int, P: int, seed: int, stream: str = "train", prefix: tuple[int, ...] = (), block: int = TRAIN_BLOCK) -> MixturePrompts:
    """P prompts of N context examples each, plus a query (in random blocks of `block` prompts)."""
    parts = list(prompt_blocks(task, cov, N, P, seed, stream, block, prefix))
    return MixturePrompts(*(torch.cat([getattr(p, f) for p in parts]) for f in MixturePrompts.__dataclass_fields__))


def sample_train(task: MORTask, cov: Covariance, N: int, B: int, seed: int, gram: bool = False) -> TrainStats:
    """B training prompts as the LSA's statistics: V = h^T (so that V W x_q = x_q^T W^T h), x_q, y_q,
    and with `gram` Z Z^T / N (label row y, query column included). Each block's statistics are
    computed once per trial (`rng.drawn_blocks`): a B sweep reuses the smaller B's blocks."""
    key = _key(task, seed)
    return TrainStats(*drawn_blocks(["mor", key, N, gram], B, TRAIN_BLOCK, lambda b: _train_block(task, cov, N, key, b, gram)))


def _train_block(task: MORTask, cov: Covariance, N: int, key: dict[str, Any], b: int, gram: bool) -> tuple[torch.Tensor | None, ...]:
    """The statistics (V, xq, yq, G) of training block b, whole."""
    p = _draw_block(task, cov, N, TRAIN_BLOCK, key, "train", (), b)
    G = None
    if gram:
        z = torch.cat([p.x, p.y[..., None]], dim=-1)
        G = z.transpose(1, 2) @ z
        G[:, : task.d, : task.d] += p.xq[:, :, None] * p.xq[:, None, :]
        G = G / N
    return context_h(p)[:, None, :], p.xq, p.yq, G


def context_h(p: MixturePrompts) -> torch.Tensor:
    """The LSA's statistic h = (1/N) sum_i y_i x_i.  Shapes: [P, d]."""
    return torch.einsum("pn,pnd->pd", p.y, p.x) / p.x.shape[1]
