"""The estimators each family compares with its trained model: one registry per family, torch-free.

Every name a configuration may list in `estimators` is an entry here. `study.config` validates the
list and takes its default from this registry; `shared` and `per_run` import each implementation
(`Entry.resolve`: `module:attribute`) only when a trial evaluates, so the configs stay free of torch. An entry is
built one of three ways:

- `shared`: the attribute is the estimator, a function of the evaluation prompts alone;
- `eval`: the attribute builds it from the configuration's `Eval` (EM's budget, say);
- `run`: the attribute builds it from one run (its configuration, covariance and trained
  parameters, or None), because it depends on that run's W or training length N; it may decline
  (None) where the run has nothing it needs.

Every estimator has one call signature, `estimator(prompts) -> prediction` (or `(prediction,
extra metrics)`, or None where it cannot run at that M), so evaluation never branches on which it is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

Estimator = Callable[[Any], Any]  # evaluation prompts of one M -> prediction (see the module docstring)


@dataclass(frozen=True)
class Entry:
    impl: str  # "module:attribute"
    built: Literal["shared", "eval", "run"]
    about: str  # one line: what it is

    def resolve(self) -> Callable[..., Any]:
        module, attribute = self.impl.split(":")
        return getattr(importlib.import_module(module), attribute)


ESTIMATORS: dict[str, dict[str, Entry]] = {
    "gmm": {
        "bayes": Entry("study.classifiers:bayes", "shared", "the posterior given the prompt's true means, Lam and prior"),
        "lsa_projected": Entry("study.classifiers:projected_lsa", "run", "the run's trained W projected on the line of Lam^-1 (reduced LSA only)"),
        "lsa_limit": Entry("study.classifiers:lsa_limit", "shared", "the LSA at its theoretical limit W = c'' Lam^-1"),
        "lda_plugin": Entry("study.classifiers:lda_plugin", "shared", "class means from the context, the true Lam"),
        "lda_pooled": Entry("study.classifiers:lda_pooled", "shared", "class means and a pooled, shrunk covariance from the context"),
        "logreg": Entry("study.classifiers:logreg", "shared", "softmax regression with intercepts and ridge 1, fitted on the context"),
    },
    "mor": {
        "oracle": Entry("study.regressors:oracle", "shared", "the posterior mean given the prompt's regressors, weights and sigma"),
        "ols": Entry("study.regressors:ols", "shared", "least squares on the context (M >= d)"),
        "ridge": Entry("study.regressors:ridge", "shared", "ridge on the context, lambda = d / snr^2"),
        "lsa_opt": Entry("study.regressors:optimal_lsa", "run", "the LSA at Gamma* of the run's training length N"),
        "em": Entry("study.regressors:em_estimator", "eval", "EM with em_restarts starts and em_iters iterations (M >= K)"),
        "gradient_em": Entry("study.regressors:gradient_em_estimator", "eval", "EM with gem_steps gradient steps as its M-step"),
    },
}


def names(family: str) -> tuple[str, ...]:
    """The family's estimators in registry order: the default `estimators` of a configuration."""
    return tuple(ESTIMATORS[family])


def shared(cfg: Any) -> dict[str, Estimator]:
    """The configuration's estimators that do not depend on a run, in the order it lists them."""
    entries = ESTIMATORS[cfg.task.family]
    out = {}
    for name in cfg.estimators:
        entry = entries[name]
        if entry.built == "shared":
            out[name] = entry.resolve()
        elif entry.built == "eval":
            out[name] = entry.resolve()(cfg.eval)
    return out


def per_run(cfg: Any, cov: Any, params: dict[str, Any] | None) -> dict[str, Estimator]:
    """The configuration's estimators that belong to one run (`params`: its trained LSA, or None)."""
    entries = ESTIMATORS[cfg.task.family]
    built = {name: entries[name].resolve()(cfg, cov, params) for name in cfg.estimators if entries[name].built == "run"}
    return {name: est for name, est in built.items() if est is not None}
