"""Evaluation of a trained model and the estimators on the same prompts at every test length.

Metrics (theory.md section 2): `tv_error` = mean of 0.5 sum_k |p_hat - p*|, `accuracy` on the
query label, `bayes_accuracy` (the Bayes rule's accuracy on the same queries, repeated on every
estimator's rows for reference), `excess_ce` = CE(estimator) - CE(bayes), paired per prompt.
Each comes with the standard error over prompts.
"""

from __future__ import annotations

from typing import Any

import torch

from study import classifiers
from study.classifiers import Estimator, Prompts
from study.config import Eval, GMMTask
from study.covariance import Covariance
from study.gmm import eval_chunks

METRICS = ("tv_error", "accuracy", "bayes_accuracy", "excess_ce")


def _per_prompt(p: torch.Tensor, p_star: torch.Tensor, yq: torch.Tensor) -> dict[str, torch.Tensor]:
    idx = yq[:, None]
    ce = -p.gather(1, idx)[:, 0].clamp(min=1e-300).log()
    ce_star = -p_star.gather(1, idx)[:, 0].clamp(min=1e-300).log()
    return {
        "tv_error": 0.5 * (p - p_star).abs().sum(-1),
        "accuracy": (p.argmax(-1) == yq).double(),
        "bayes_accuracy": (p_star.argmax(-1) == yq).double(),
        "excess_ce": ce - ce_star,
    }


def evaluate(
    task: GMMTask, cov: Covariance, seed: int, ev: Eval, estimators: dict[str, Estimator], device: torch.device | str = "cpu"
) -> list[dict[str, Any]]:
    """Rows of the `evals` table (without run_id) for every estimator, M and metric."""
    cov_d = cov.to(device)
    within = any(getattr(e, "needs_within", False) for e in estimators.values())
    sums: dict[tuple[str, float, str], torch.Tensor] = {}
    n_prompts = 0
    for chunk in eval_chunks(task, cov, seed, ev.n_eval, ev.M, within, device=device):
        n_prompts += chunk.tasks.yq.shape[0]
        for ctx in chunk.contexts:
            pr = Prompts(chunk.tasks, ctx, cov_d, task.c)
            p_star = classifiers.bayes(pr)
            for name, est in estimators.items():
                for metric, v in _per_prompt(est(pr), p_star, chunk.tasks.yq).items():
                    acc = sums.setdefault((name, ctx.M, metric), torch.zeros(2, dtype=torch.float64, device=device))
                    acc += torch.stack([v.sum(), (v * v).sum()])
    rows = []
    for (name, M, metric), (s1, s2) in sums.items():
        mean = float(s1) / n_prompts
        var = max(float(s2) / n_prompts - mean * mean, 0.0) * n_prompts / max(n_prompts - 1, 1)
        rows.append(
            dict(estimator=name, M=float(M), shift="none", metric=metric, value=mean, n_prompts=n_prompts, stderr=(var / n_prompts) ** 0.5)
        )
    return rows
