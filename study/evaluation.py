"""Evaluation of trained models and estimators on the same prompts at every test length.

`evaluate` is family-agnostic: it takes batches of prompts (one test length each), the
estimators, the reference estimator (gmm: `bayes`, mor: `oracle`) and the family's per-prompt
metrics, and returns the mean and standard error over prompts of every (estimator, M, metric).

Metrics: gmm (theory.md section 2) `tv_error` = mean of 0.5 sum_k |p_hat - p*|, `accuracy`,
`bayes_accuracy` (the Bayes rule's accuracy on the same queries, repeated on every estimator's
rows), `excess_ce` = CE(estimator) - CE(bayes), `tv_limit` = the TV distance between the
estimator at M and the same estimator at M = inf (the context fluctuation alone, no bias); mor (section 3) `mse` on the query and
`excess_mse` = mse - oracle mse. Excess metrics are paired per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from study import classifiers, gmm, mor, regressors, shifts
from study.config import Eval, GMMTask, MORTask
from study.covariance import Covariance
from study.rng import EVAL_BLOCK


def evaluate_estimators(
    batches: Iterable[tuple[float, Any]],
    estimators: dict[str, Callable],
    reference: Callable,
    per_prompt: Callable[[torch.Tensor, torch.Tensor, Any], dict[str, torch.Tensor]],
    versus_limit: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    shift: str = "none",
) -> list[dict[str, Any]]:
    """Rows of the `evals` table (without run_id) for every estimator, M and metric, under `shift`.

    `versus_limit(out, out_inf)`: metrics of an estimator at finite M against its own prediction
    at M = inf on the same queries (gmm: `tv_limit`), for batches whose chunk yields its M = inf
    batch first (`gmm_batches`); a batch's chunk is recognised by its `tasks`.
    """
    sums: dict[tuple[str, float, str], list] = {}
    limits: dict[str, tuple[Any, torch.Tensor]] = {}  # estimator -> (its chunk's tasks, its M = inf output)
    for M, pr in batches:
        ref = reference(pr)
        for name, est in estimators.items():
            out = est(pr)
            if out is None:  # the estimator does not apply at this context length
                continue
            extra: dict[str, torch.Tensor] = {}
            if isinstance(out, tuple):  # (prediction, metrics only this estimator has, e.g. param_error)
                out, extra = out
            if versus_limit is not None:
                if math.isinf(M):
                    limits[name] = (pr.tasks, out)
                elif name in limits and limits[name][0] is pr.tasks:
                    extra = {**extra, **versus_limit(out, limits[name][1])}
            for metric, v in {**per_prompt(out, ref, pr), **extra}.items():
                acc = sums.setdefault((name, M, metric), [0.0, 0.0, 0])
                acc[0] += float(v.sum())
                acc[1] += float((v * v).sum())
                acc[2] += v.numel()
    rows = []
    for (name, M, metric), (s1, s2, n) in sums.items():
        mean = s1 / n
        var = max(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1)
        rows.append(dict(estimator=name, M=float(M), shift=shift, metric=metric, value=mean, n_prompts=n, stderr=math.sqrt(var / n)))
    return rows


def gmm_batches(task: GMMTask, cov: Covariance, seed: int, ev: Eval, within: bool, device: torch.device | str, shift: str = "none") -> Iterator[tuple[float, classifiers.ClassificationPrompts]]:
    """Evaluation prompts under `shift` (`study.shifts`), with the training covariance beside the test one."""
    test = shifts.gmm_setting(shift, task, cov)
    cov_d, test_d = cov.to(device), test.cov.to(device)
    log_prior = None if test.prior is None else test.prior.log().to(device)
    for chunk in gmm.eval_chunks(task, cov, seed, ev.n_eval, ev.M, within, device=device, test=test):
        for ctx in chunk.contexts:
            yield ctx.M, classifiers.ClassificationPrompts(chunk.tasks, ctx, test_d, task.c, cov_d, log_prior)


def mor_batches(task: MORTask, cov: Covariance, seed: int, ev: Eval, device: torch.device | str, budget: int = 1 << 22, shift: str = "none") -> Iterator[tuple[float, regressors.RegressionPrompts]]:
    """Evaluation prompts in chunks of whole random blocks; the context at M is a prefix of the longest.

    Under `shift` the prompts come from the shifted task and covariance, drawn from the original
    task's random streams."""
    original = task
    task, cov = shifts.mor_setting(shift, task, cov)
    finite = ev.finite_M
    m_max = max(finite, default=0)
    cov_d = cov.to(device)
    blocks_per_chunk = max(1, budget // (EVAL_BLOCK * max(m_max, 1) * task.d))

    def contexts(parts: list[mor.MixturePrompts], first_block: int) -> Iterator[tuple[float, regressors.RegressionPrompts]]:
        p = mor.MixturePrompts(*(torch.cat([getattr(q, f) for q in parts]).to(device) for f in mor.MixturePrompts.__dataclass_fields__))
        for M in ev.M:
            m = int(M) if math.isfinite(M) else m_max
            x, y = (p.x[:, :m], p.y[:, :m]) if math.isfinite(M) else (None, None)
            yield M, regressors.RegressionPrompts(M, x, y, p.xq, p.yq, p.betas, p.zq, task, cov_d, seed, first_block)

    buf: list[mor.MixturePrompts] = []
    for i, block in enumerate(mor.prompt_blocks(task, cov, m_max, ev.n_eval, seed, "eval", block=EVAL_BLOCK, key_task=original)):
        buf.append(block)
        if len(buf) == blocks_per_chunk:
            yield from contexts(buf, i + 1 - len(buf))
            buf = []
    if buf:
        yield from contexts(buf, ev.n_eval // EVAL_BLOCK + (ev.n_eval % EVAL_BLOCK > 0) - len(buf))
