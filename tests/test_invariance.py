"""Permuting a prompt's context examples changes no estimator's prediction: every estimator (and
the LSA, trained or at its limit) reads the context as a set."""

import torch

from study import classifiers, gmm, regressors
from study.config import Eval, GMMTask, MORTask
from study.covariance import covariance
from study.em import fit as em_fit, init_beta
from study.estimators import ESTIMATORS

TOL = dict(rtol=1e-9, atol=1e-12)


def _shared(family: str) -> dict:
    """The family's estimators of the prompts alone (EM's is checked on its own below)."""
    return {name: e.resolve() for name, e in ESTIMATORS[family].items() if e.built == "shared"}


def _perm(P: int, M: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.stack([torch.randperm(M, generator=g) for _ in range(P)])


def test_gmm_estimators_read_the_context_as_a_set():
    task, cov = GMMTask(d=3, c=3, snr=1.5), covariance("diag", 3, 2.0)
    (chunk,) = list(gmm.eval_chunks(task, cov, 0, 64, [24], True))
    ctx = chunk.contexts[-1]
    idx = _perm(64, 24)
    x, y = torch.gather(ctx.x, 1, idx[..., None].expand(-1, -1, 3)), torch.gather(ctx.y, 1, idx)
    (shuffled,) = gmm._prefix_contexts(3, x, y, [24], True)
    W = {"W": 2.5 * cov.inv}
    full = {"W_PV": torch.eye(6, dtype=torch.float64), "W_KQ": torch.block_diag(cov.inv, torch.zeros(3, 3, dtype=torch.float64))}
    for name, est in {**_shared("gmm"), "lsa": classifiers.lsa_classifier(W), "lsa_full": classifiers.lsa_classifier(full)}.items():
        a = est(classifiers.ClassificationPrompts(chunk.tasks, ctx, cov, 3))
        b = est(classifiers.ClassificationPrompts(chunk.tasks, shuffled, cov, 3))
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_mor_estimators_and_em_read_the_context_as_a_set():
    task, cov = MORTask(d=3, K=2, snr=2.0, sigma=0.5), covariance("identity", 3)
    from study.mor import sample_prompts

    p = sample_prompts(task, cov, 16, 64, 0, "eval")
    idx = _perm(64, 16)
    xs, ys = torch.gather(p.x, 1, idx[..., None].expand(-1, -1, 3)), torch.gather(p.y, 1, idx)
    pr = lambda x, y: regressors.RegressionPrompts(16.0, x, y, p.xq, p.yq, p.betas, p.zq, task, cov)  # noqa: E731
    ests = {**_shared("mor"), "lsa": regressors.lsa_regressor({"W": 0.7 * torch.eye(3, dtype=torch.float64)})}
    for name, est in ests.items():
        torch.testing.assert_close(est(pr(p.x, p.y)), est(pr(xs, ys)), **TOL, msg=name)
    z = torch.randn(64, 2, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ev = Eval(M=[16])
    a = em_fit(p.x, p.y, init_beta(p.x, p.y, z), 0.5, ev.em_iters, ev.em_tol)
    b = em_fit(xs, ys, init_beta(xs, ys, z), 0.5, ev.em_iters, ev.em_tol)
    torch.testing.assert_close(a.beta, b.beta, rtol=1e-6, atol=1e-8)  # EM's sums reorder: equal to its tolerance
