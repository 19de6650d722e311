"""Family `gmm`: prompts of in-context classification of Gaussian mixtures (theory.md section 2).

A prompt has its own class means mu_k = Lam^{1/2} u_k, u_k uniform on the sphere of radius snr,
labels y ~ Uniform{0..c-1}, inputs x = mu_y + Lam^{1/2} xi. Two samplers:

- `sample_train(..., gram=False)` draws the reduced LSA's sufficient statistic
  V = (1/N) sum_i ytil_i x_i^T directly from its exact distribution (class counts are multinomial,
  each class sum is Gaussian), in O(c d) per prompt instead of O(N d);
- the raw sampler draws every context example; it feeds the full LSA (which needs the Gram
  matrix Z Z^T / N) and every evaluation, where estimators such as logistic regression need the
  examples themselves.

Both draw the tasks and queries of a prompt from the same generator calls, so the two training
paths see the same tasks and queries and contexts that are equal in distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from study.config import GMMTask
from study.covariance import Covariance
from study.rng import EVAL_BLOCK, EXAMPLE_BLOCK, TRAIN_BLOCK, blocks, drawn_blocks, generator
from study.training import TrainStats


def label_embedding(c: int) -> torch.Tensor:
    """ytil of each class: -1/+1 for binary, one-hot otherwise.  Shapes: [c, c']."""
    if c == 2:
        return torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    return torch.eye(c, dtype=torch.float64)


@dataclass
class Tasks:
    """The hidden task and the query of each prompt.  Shapes: means [P, c, d], xq [P, d], yq [P]."""

    means: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    def to(self, device: torch.device | str) -> Tasks:
        return Tasks(self.means.to(device), self.xq.to(device), self.yq.to(device))


def _key(task: GMMTask, seed: int) -> dict[str, Any]:
    return {"data": task.data_key(), "seed": int(seed)}


def _labels(task: GMMTask, shape: tuple[int, ...], g: torch.Generator, prior: torch.Tensor | None) -> torch.Tensor:
    if prior is None:
        return torch.randint(task.c, shape, generator=g)
    return torch.multinomial(prior, math.prod(shape), replacement=True, generator=g).reshape(shape)


def _draw_tasks(task: GMMTask, cov: Covariance, n: int, g: torch.Generator, test: Any = None) -> Tasks:
    """Tasks and queries; `test` (a `study.shifts.GMMSetting`) shifts the query's distribution."""
    u = torch.randn(n, task.c, task.d, generator=g, dtype=torch.float64)
    u = task.snr * u / u.norm(dim=-1, keepdim=True)
    if task.symmetric:
        u[:, 0] = -u[:, 1]
    means = u @ cov.half  # half is symmetric: rows are Lam^{1/2} u_k, so ||mu_k||_{Lam^-1} = snr
    if test is not None and test.mean_scale is not None:
        means = means * test.mean_scale[:, None]
    yq = _labels(task, (n,), g, None if test is None else test.prior)
    noise = cov if test is None else test.cov
    xq = means[torch.arange(n), yq] + torch.randn(n, task.d, generator=g, dtype=torch.float64) @ noise.half
    return Tasks(means, xq, yq)


def _draw_examples(task: GMMTask, cov: Covariance, means: torch.Tensor, n: int, g: torch.Generator, test: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n of a block of EXAMPLE_BLOCK context examples per prompt.  Shapes: x [P, n, d], y [P, n]."""
    p = means.shape[0]
    # draw the whole block so that example i is the same whatever the prompt length
    y = _labels(task, (p, EXAMPLE_BLOCK), g, None if test is None else test.prior)[:, :n]
    xi = torch.randn(p, EXAMPLE_BLOCK, task.d, generator=g, dtype=torch.float64)[:, :n]
    x = torch.gather(means, 1, y[..., None].expand(p, n, task.d)) + xi @ (cov if test is None else test.cov).half
    return x, y


def sample_train(task: GMMTask, cov: Covariance, N: int, B: int, seed: int, gram: bool = False) -> TrainStats:
    """B training prompts of length N, as sufficient statistics (raw examples only if `gram`).
    Each block's statistics are computed once per trial (`rng.drawn_blocks`): a B sweep reuses
    the smaller B's blocks."""
    key = _key(task, seed)
    return TrainStats(*drawn_blocks(["gmm", key, N, gram], B, TRAIN_BLOCK, lambda b: _train_block(task, cov, N, key, b, gram)))


def _train_block(task: GMMTask, cov: Covariance, N: int, key: Any, b: int, gram: bool) -> tuple[torch.Tensor | None, ...]:
    """The statistics (V, xq, yq, G) of training block b, whole: a block is always drawn whole and
    then cut, so prompt i does not depend on B."""
    E = label_embedding(task.c)
    g = generator(key, "train", b)
    t = _draw_tasks(task, cov, TRAIN_BLOCK, g)
    if gram:
        G = _raw_gram(task, cov, t, N, key, b, E)
        return G[:, task.d :, : task.d], t.xq, t.yq, G
    sums = _exact_class_sums(task, cov, t.means, N, g)
    return torch.einsum("kj,pkd->pjd", E, sums) / N, t.xq, t.yq, None


def sample_prompts(task: GMMTask, cov: Covariance, N: int, P: int, seed: int, stream: str, prefix: tuple[int, ...] = (), block: int = TRAIN_BLOCK) -> tuple[torch.Tensor, torch.Tensor, Tasks]:
    """P raw prompts of N examples (for models that read the examples, such as the transformer).

    `prefix`: indices before the block index in every generator's key (the step of an online
    stream); prompts come in random blocks of `block`.  Shapes: x [P, N, d], y [P, N] (class
    indices), and the prompts' `Tasks`.
    """
    key = _key(task, seed)
    xs, ys, ts = [], [], []
    for b, n in blocks(P, block):
        t = _draw_tasks(task, cov, n, generator(key, stream, *prefix, b))
        ex = [_draw_examples(task, cov, t.means, k, generator(key, stream, *prefix, b, e)) for e, k in blocks(N, EXAMPLE_BLOCK)]
        xs.append(torch.cat([x for x, _ in ex], dim=1))
        ys.append(torch.cat([y for _, y in ex], dim=1))
        ts.append(t)
    tasks = Tasks(*(torch.cat(z) for z in zip(*((t.means, t.xq, t.yq) for t in ts))))
    return torch.cat(xs), torch.cat(ys), tasks


def _exact_class_sums(task: GMMTask, cov: Covariance, means: torch.Tensor, N: int, g: torch.Generator) -> torch.Tensor:
    """sum_{i: y_i = k} x_i for N uniform labels, drawn exactly.  Shapes: [P, c, d]."""
    p, c, d = means.shape
    counts = torch.empty(p, c, dtype=torch.float64)
    left = torch.full((p,), float(N), dtype=torch.float64)
    for k in range(c - 1):  # multinomial counts as a chain of binomials
        counts[:, k] = torch.binomial(left, torch.full_like(left, 1.0 / (c - k)), generator=g)
        left = left - counts[:, k]
    counts[:, c - 1] = left
    xi = torch.randn(p, c, d, generator=g, dtype=torch.float64)
    return counts[..., None] * means + counts.sqrt()[..., None] * (xi @ cov.half)


def _raw_gram(task: GMMTask, cov: Covariance, t: Tasks, N: int, key: Any, b: int, E: torch.Tensor) -> torch.Tensor:
    p, d = t.xq.shape
    D = d + E.shape[1]
    G = torch.zeros(p, D, D, dtype=torch.float64)
    for e, n in blocks(N, EXAMPLE_BLOCK):
        x, y = _draw_examples(task, cov, t.means, n, generator(key, "train", b, e))
        z = torch.cat([x, E[y]], dim=-1)
        G += z.transpose(1, 2) @ z
    G[:, :d, :d] += t.xq[:, :, None] * t.xq[:, None, :]
    return G / N


# ----------------------------------------------------------------------------------------------
# evaluation prompts


@dataclass
class Context:
    """What an estimator may see of a context of length M, as per-class statistics.

    Shapes: frac [P, c] (class counts / M), means [P, c, d] (class means, 0 for an empty class),
    within [P, d, d] (pooled within-class scatter / M, or None if not asked for), x [P, M, d] and
    y [P, M] (the raw examples; None when M = inf, where the statistics are exact expectations).
    """

    M: float
    frac: torch.Tensor
    means: torch.Tensor
    within: torch.Tensor | None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return math.isinf(self.M)


@dataclass
class EvalChunk:
    """A chunk of evaluation prompts and their contexts at every test length of the grid."""

    tasks: Tasks
    contexts: list[Context]


def exact_context(task: GMMTask, cov: Covariance, tasks: Tasks, within: bool, prior: torch.Tensor | None = None) -> Context:
    """The M = inf context: class frequencies, means and scatter replaced by their true values."""
    p = tasks.means.shape[0]
    dev = tasks.means.device
    if prior is None:
        frac = torch.full((p, task.c), 1.0 / task.c, dtype=torch.float64, device=dev)
    else:
        frac = prior.to(dev, torch.float64).expand(p, task.c)
    lam = cov.lam.to(dev).expand(p, task.d, task.d) if within else None
    return Context(math.inf, frac, tasks.means, lam)


def eval_chunks(
    task: GMMTask,
    cov: Covariance,
    seed: int,
    n_eval: int,
    lengths: list[float],
    within: bool,
    device: torch.device | str = "cpu",
    budget: int = 1 << 22,
    test: Any = None,
) -> Iterator[EvalChunk]:
    """Evaluation prompts in chunks of whole random blocks, each with its contexts at every M.

    Contexts are nested: the context at M is the first M examples of the longest one, so every
    estimator and every M is compared on the same tasks and queries. The exact (M = inf) context
    comes first. `test` (a `study.shifts.GMMSetting`) draws them from a shifted distribution with
    the same random streams.
    """
    finite = sorted(int(m) for m in lengths if math.isfinite(m))
    m_max = max(finite, default=0)
    key = _key(task, seed)
    per_block = EVAL_BLOCK * max(m_max, 1) * task.d
    blocks_per_chunk = max(1, budget // per_block)
    block_list = list(blocks(n_eval, EVAL_BLOCK))
    for start in range(0, len(block_list), blocks_per_chunk):
        tasks, xs, ys = [], [], []
        for b, n in block_list[start : start + blocks_per_chunk]:
            t = _draw_tasks(task, cov, EVAL_BLOCK, generator(key, "eval", b), test)  # whole block, then cut
            tasks.append(Tasks(t.means[:n], t.xq[:n], t.yq[:n]))
            if m_max:
                ex = [_draw_examples(task, cov, t.means, k, generator(key, "eval", b, e), test) for e, k in blocks(m_max, EXAMPLE_BLOCK)]
                xs.append(torch.cat([x for x, _ in ex], dim=1)[:n])
                ys.append(torch.cat([y for _, y in ex], dim=1)[:n])
        t = Tasks(*(torch.cat(z) for z in zip(*((t.means, t.xq, t.yq) for t in tasks)))).to(device)
        contexts = []
        if any(math.isinf(m) for m in lengths):  # first: every finite context is compared with it
            contexts.append(exact_context(task, cov if test is None else test.cov, t, within, None if test is None else test.prior))
        if m_max:
            x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
            contexts += _prefix_contexts(task.c, x, y, finite, within)
        yield EvalChunk(t, contexts)


def _prefix_contexts(c: int, x: torch.Tensor, y: torch.Tensor, lengths: list[int], within: bool) -> list[Context]:
    """Class statistics of every prefix length, accumulated block by block.  x: [P, M_max, d]."""
    p, _, d = x.shape
    counts = torch.zeros(p, c, dtype=x.dtype, device=x.device)
    sums = torch.zeros(p, c, d, dtype=x.dtype, device=x.device)
    xx = torch.zeros(p, d, d, dtype=x.dtype, device=x.device) if within else None
    classes = torch.arange(c, device=y.device)
    out, prev = [], 0
    for m in lengths:
        xb = x[:, prev:m]
        onehot = (y[:, prev:m, None] == classes).to(x.dtype)
        counts += onehot.sum(1)
        sums += onehot.transpose(1, 2) @ xb
        if within:
            xx += xb.transpose(1, 2) @ xb
        prev = m
        means = sums / counts.clamp(min=1.0)[..., None]
        frac = counts / m
        w = None
        if within:
            w = xx / m - torch.einsum("pk,pki,pkj->pij", frac, means, means)
        out.append(Context(float(m), frac, means, w, x[:, :m], y[:, :m]))
    return out
