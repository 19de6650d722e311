"""What differs between the task families, behind one interface that `trial.run_bundle` uses.

A family gives: its training loss, its training statistics, the theory's target for the trained
W (`dist_theory`), the population excess risk of a trained model where a closed form exists, its
evaluation (estimators, reference and metrics), and the names under which parameters are stored. The LSA itself is shared: the regression LSA y_hat = x_q^T Gamma h is the
reduced LSA with V = h^T and W = Gamma^T, and its full form is the LSA with label row y.
"""

from __future__ import annotations

from typing import Any

import torch

from study import classifiers, estimators, evaluation, gmm, lsa, mor, regressors
from study.config import TrialConfig
from study.covariance import Covariance
from study.rng import TRAIN_BLOCK
from study.theory import excess_risk, gamma_star
from study.training import TrainStats


class GMM:
    """In-context classification of Gaussian mixtures [S]."""

    loss = "ce"
    reference = "bayes"

    @staticmethod
    def sample_train(cfg: TrialConfig, cov: Covariance, seed: int) -> TrainStats:
        return gmm.sample_train(cfg.task, cov, cfg.train.N, cfg.train.B, seed, gram=cfg.model.param == "full")

    @staticmethod
    def target(cfg: TrialConfig, cov: Covariance) -> tuple[torch.Tensor, float]:
        """dist_theory = ||W / c'' - Lam^-1||_max with c'' = 2 (binary) or c."""
        return cov.inv, 2.0 if cfg.task.c == 2 else float(cfg.task.c)

    @staticmethod
    def excess_risk(cfg: TrialConfig, cov: Covariance, params: dict[str, torch.Tensor]) -> float:
        return float("nan")  # no closed-form population risk for the cross-entropy LSA

    lsa_estimator = staticmethod(classifiers.lsa_classifier)

    @staticmethod
    def raw_train(cfg: TrialConfig, cov: Covariance, seed: int, P: int, stream: str, prefix: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
        """P raw training prompts: x [P, N, d], ytil [P, N, c'], xq [P, d], and the query's class [P].

        With a `prefix` (an online step) the P prompts are one random block; otherwise blocks of
        TRAIN_BLOCK, so that prompt i of a fixed set does not depend on B."""
        x, y, t = gmm.sample_prompts(cfg.task, cov, cfg.train.N, P, seed, stream, prefix, block=P if prefix else TRAIN_BLOCK)
        return x, gmm.label_embedding(cfg.task.c)[y], t.xq, t.yq

    @staticmethod
    def context(pr: classifiers.ClassificationPrompts) -> tuple[torch.Tensor, ...] | None:
        """An evaluation context as raw examples (x, ytil, xq); None at M = inf."""
        if pr.ctx.x is None:
            return None
        return pr.ctx.x, gmm.label_embedding(pr.c).to(pr.ctx.x)[pr.ctx.y], pr.xq

    @staticmethod
    def output(readout: torch.Tensor) -> torch.Tensor:
        """A model's read-out at the query [P, c'] as the estimator's prediction: class probabilities."""
        return lsa.probabilities(readout)

    @staticmethod
    def evaluate(cfg: TrialConfig, cov: Covariance, seed: int, own: dict[str, Any], device: Any, shared: bool = True) -> list[dict[str, Any]]:
        """Rows of the run-bound estimators `own` and, with `shared`, of the configuration's shared ones (study.estimators)."""
        ests = {**(estimators.shared(cfg) if shared else {}), **own}
        within = any(getattr(e, "needs_within", False) for e in ests.values())
        rows = []
        for shift in ("none", *cfg.eval.shifts):
            batches = evaluation.gmm_batches(cfg.task, cov, seed, cfg.eval, within, device, shift)
            rows += evaluation.evaluate_estimators(batches, ests, classifiers.bayes, classifiers.per_prompt, classifiers.versus_limit, shift)
        return rows

    @staticmethod
    def export(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(params)


class MOR:
    """In-context mixtures of linear regressions [J], [P]."""

    loss = "squared"
    reference = "oracle"

    @staticmethod
    def sample_train(cfg: TrialConfig, cov: Covariance, seed: int) -> TrainStats:
        return mor.sample_train(cfg.task, cov, cfg.train.N, cfg.train.B, seed, gram=cfg.model.param == "full")

    @staticmethod
    def target(cfg: TrialConfig, cov: Covariance) -> tuple[torch.Tensor, float]:
        """dist_theory = ||W - Gamma*^T||_max (W plays Gamma^T), Gamma* at the training length N."""
        return gamma_star(cfg.task, cov, cfg.train.N).T, 1.0

    @staticmethod
    def excess_risk(cfg: TrialConfig, cov: Covariance, params: dict[str, torch.Tensor]) -> float:
        """R(Gamma) - R(Gamma*) of the trained reduced LSA at its training length (claim 2 of [J]).

        The full form is left out (NaN): its prediction is x_q^T Gamma h only while the blocks
        outside the [Z] parametrisation stay zero, which finite-B GD does not guarantee.
        """
        if "W" not in params:
            return float("nan")
        return float(excess_risk(cfg.task, cov, cfg.train.N, params["W"].double().cpu().T))

    lsa_estimator = staticmethod(regressors.lsa_regressor)

    @staticmethod
    def raw_train(cfg: TrialConfig, cov: Covariance, seed: int, P: int, stream: str, prefix: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
        """P raw training prompts: x [P, N, d], ytil [P, N, 1] (the labels), xq [P, d], yq [P]."""
        p = mor.sample_prompts(cfg.task, cov, cfg.train.N, P, seed, stream, prefix, block=P if prefix else TRAIN_BLOCK)
        return p.x, p.y[..., None], p.xq, p.yq

    @staticmethod
    def context(pr: regressors.RegressionPrompts) -> tuple[torch.Tensor, ...] | None:
        """An evaluation context as raw examples (x, y as a column, xq); None at M = inf."""
        if pr.x is None:
            return None
        return pr.x, pr.y[..., None], pr.xq

    @staticmethod
    def output(readout: torch.Tensor) -> torch.Tensor:
        """A model's read-out at the query [P, 1] as the estimator's prediction [P]."""
        return readout[:, 0]

    @staticmethod
    def evaluate(cfg: TrialConfig, cov: Covariance, seed: int, own: dict[str, Any], device: Any, shared: bool = True) -> list[dict[str, Any]]:
        """Rows of the run-bound estimators `own` and, with `shared`, of the configuration's shared ones (study.estimators)."""
        ests = {**(estimators.shared(cfg) if shared else {}), **own}
        rows = []
        for shift in ("none", *cfg.eval.shifts):
            batches = evaluation.mor_batches(cfg.task, cov, seed, cfg.eval, device, shift=shift)
            rows += evaluation.evaluate_estimators(batches, ests, regressors.oracle, regressors.per_prompt, shift=shift)
        return rows

    @staticmethod
    def export(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reduced W is stored as Gamma = W^T, the papers' parametrisation."""
        out = {}
        for name, v in params.items():
            if name in ("W", "W_opt"):
                out["Gamma" + name[1:]] = v.transpose(-1, -2)
            else:
                out[name] = v
        return out


FAMILIES = {"gmm": GMM, "mor": MOR}
