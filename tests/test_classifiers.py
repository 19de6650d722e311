import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from study import classifiers
from study.classifiers import ClassificationPrompts
from study.config import Eval, GMMTask
from study.covariance import covariance
from study.estimators import ESTIMATORS
from study.evaluation import evaluate_estimators, gmm_batches
from study.gmm import Context, Tasks, eval_chunks
from tests import configs


def test_bayes_posterior_by_hand():
    """Two classes in d = 1 with Lam = 4: p*(1|x) = sigmoid((mu1 - mu0) x / 4) when |mu0| = |mu1|."""
    cov = covariance("diag", 1, 1.0)
    lam = torch.tensor([[4.0]], dtype=torch.float64)
    cov = type(cov)(lam, lam.sqrt(), 1 / lam)
    means = torch.tensor([[[-2.0], [2.0]]], dtype=torch.float64)
    xq = torch.tensor([[1.0]], dtype=torch.float64)
    ctx = Context(math.inf, torch.full((1, 2), 0.5, dtype=torch.float64), means, None)
    p = classifiers.bayes(ClassificationPrompts(Tasks(means, xq, torch.tensor([1])), ctx, cov, 2))
    expected = 1 / (1 + math.exp(-(2.0 - -2.0) * 1.0 / 4.0))
    assert float(p[0, 1]) == pytest.approx(expected, rel=1e-14)
    # three classes with unequal norms: the -mu^T Lam^-1 mu / 2 terms matter
    means3 = torch.tensor([[[0.0], [1.0], [3.0]]], dtype=torch.float64)
    ctx3 = Context(math.inf, torch.full((1, 3), 1 / 3, dtype=torch.float64), means3, None)
    p3 = classifiers.bayes(ClassificationPrompts(Tasks(means3, xq, torch.tensor([0])), ctx3, cov, 3))
    scores = np.array([m * 1.0 / 4 - m * m / 8 for m in (0.0, 1.0, 3.0)])
    np.testing.assert_allclose(p3[0].numpy(), np.exp(scores) / np.exp(scores).sum(), rtol=1e-14)


def _prompts(task, M, n=64, seed=0):
    cov = covariance(task.cov, task.d, task.kappa, task.cov_seed)
    chunk = next(eval_chunks(task, cov, seed, n, [M], within=True))
    return ClassificationPrompts(chunk.tasks, chunk.contexts[0], cov, task.c)


@pytest.mark.parametrize("c", [2, 4])
def test_limits_equal_bayes_at_infinite_context(c):
    """At M = inf lsa_limit (W = c'' Lam^-1, equal norms) is Bayes; plug-in, pooled LDA and logreg tend to it."""
    task = GMMTask(d=3, c=c, snr=1.3, cov="rotated", kappa=3.0)
    pr = _prompts(task, math.inf)
    torch.testing.assert_close(classifiers.lsa_limit(pr), classifiers.bayes(pr), rtol=1e-10, atol=1e-12)
    # the context-fitted estimators get there from finite contexts: a long one is close
    pr = _prompts(task, 3000, n=32)
    for name in ("lda_plugin", "lda_pooled", "logreg"):
        tv = 0.5 * (ESTIMATORS["gmm"][name].resolve()(pr) - classifiers.bayes(pr)).abs().sum(-1).mean()
        assert float(tv) < 0.03, name


def test_estimators_approach_bayes_with_context_length():
    task = GMMTask(d=2, c=3, snr=2.0)
    for name in ("lda_plugin", "lda_pooled", "logreg", "lsa_limit"):
        tv = [float((ESTIMATORS["gmm"][name].resolve()(pr := _prompts(task, M)) - classifiers.bayes(pr)).abs().sum(-1).mean() / 2) for M in (8, 512)]
        assert tv[1] < tv[0] / 3, name


def test_logreg_matches_scipy_on_one_prompt():
    pr = _prompts(GMMTask(d=2, c=3, snr=1.0), 30, n=64)
    p = classifiers.logreg(pr)
    x, y = pr.ctx.x[0].numpy(), pr.ctx.y[0].numpy()
    xt = np.hstack([x, np.ones((len(x), 1))])

    def objective(w):
        w = w.reshape(3, 3)
        s = xt @ w.T
        s = s - s.max(1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(1, keepdims=True))
        return -logp[np.arange(len(y)), y].sum() + 0.5 * classifiers.LOGREG_L2 * (w * w).sum()

    w = minimize(objective, np.zeros(9), method="BFGS", options={"gtol": 1e-10}).x.reshape(3, 3)
    s = w @ np.append(pr.xq[0].numpy(), 1.0)
    np.testing.assert_allclose(p[0].numpy(), np.exp(s) / np.exp(s).sum(), atol=1e-6)


def test_paired_metrics_and_bayes_reference():
    task = GMMTask(d=2, c=2, snr=1.0)
    cov = covariance("identity", 2)
    batches = gmm_batches(task, cov, 0, Eval(M=[4, math.inf], n_eval=200), False, "cpu")
    rows = evaluate_estimators(batches, {"bayes": classifiers.bayes, "lda_plugin": classifiers.lda_plugin}, classifiers.bayes, classifiers.per_prompt)
    get = {(r["estimator"], r["M"], r["metric"]): r for r in rows}
    assert get["bayes", 4.0, "tv_error"]["value"] == 0.0
    assert get["bayes", 4.0, "excess_ce"]["value"] == 0.0
    assert get["lda_plugin", math.inf, "tv_error"]["value"] < 1e-12
    assert get["lda_plugin", 4.0, "excess_ce"]["value"] > 0
    assert get["lda_plugin", 4.0, "bayes_accuracy"]["value"] == get["bayes", 4.0, "accuracy"]["value"]
    assert all(r["n_prompts"] == 200 for r in rows)
    assert get["lda_plugin", 4.0, "tv_error"]["stderr"] > 0


def test_pooled_covariance_counts_only_present_classes():
    """With many classes and a short context the unbiased pooled scatter uses M - (classes seen)."""
    task = GMMTask(d=2, c=10, snr=1.0)
    cov = covariance("identity", 2)
    traces = []
    for seed in range(40):
        chunk = next(eval_chunks(task, cov, seed, 64, [14], within=True))
        ctx = chunk.contexts[0]
        S = classifiers.pooled_covariance(ctx, 2)  # shrinking towards (tr S / d) I keeps the trace
        traces.append(torch.diagonal(S, dim1=1, dim2=2).mean(-1))
    assert abs(float(torch.cat(traces).mean()) - 1.0) < 0.05  # unbiased for Lam = I


def test_tv_limit_compares_each_estimator_with_itself_at_M_inf():
    """The context's fluctuation alone: 0 for Bayes, shrinking with M, absent at M = inf or without it."""
    import pandas as pd

    from study.config import Run, TrialConfig
    from study.trial import run_bundle

    base = configs.gmm(N=40, B=512, lr=2.0, n_eval=512)
    ev = pd.DataFrame(run_bundle([Run(TrialConfig.from_flat({**base, "M": [16, 256, "inf"]}), 0)]).evals)
    lim = ev[ev.metric == "tv_limit"].pivot_table(index="estimator", columns="M", values="value")
    assert list(lim.columns) == [16.0, 256.0] and (lim.loc["bayes"] == 0).all()
    for est in ("lsa", "lda_plugin", "logreg"):
        assert 2.5 < lim.loc[est, 16.0] / lim.loc[est, 256.0] < 6  # sqrt(256 / 16) = 4
    none = pd.DataFrame(run_bundle([Run(TrialConfig.from_flat({**base, "M": [16, 256]}), 0)]).evals)
    assert "tv_limit" not in set(none.metric)


def test_the_projected_lsa_keeps_g_and_drops_the_noise_off_the_line_of_lam_inv():
    """lsa_projected: the trained W on the line of Lam^-1, c''(1 + g) Lam^-1, the population
    minimiser's form (theory.md section 5); its M = inf error has no finite-B floor."""
    from study.classifiers import projected_W
    from study.config import Run, TrialConfig
    from study.covariance import covariance
    from study.trial import run_bundle

    cov = covariance("diag", 3, 2.0)
    off = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(projected_W(1.7 * cov.inv + 0.3 * off, cov.inv), 1.7 * cov.inv)
    base = configs.gmm(d=4, N=400, steps=0, M=["inf"], n_eval=2048, estimators=["lsa_projected"])
    tv = {}
    for B in (16384, 131072):
        out = run_bundle([Run(TrialConfig.from_flat({**base, "B": B}), s) for s in range(2)])
        rows = [r for r in out.evals if r["metric"] == "tv_error"]
        tv[B] = {e: np.mean([r["value"] for r in rows if r["estimator"] == e]) for e in ("lsa", "lsa_projected")}
        assert tv[B]["lsa_projected"] < tv[B]["lsa"]  # the noise off the line only adds error
    drop = {e: tv[16384][e] / tv[131072][e] for e in tv[16384]}
    assert drop["lsa"] > 1.5 and drop["lsa_projected"] < drop["lsa"] / 1.3, drop  # the floor falls with B; the projection had less to lose


def _newton_reference(x: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """The logreg objective minimised for one prompt by a plain Newton loop: the Hessian as
    sum_m (diag p - p p^T) kron x x^T, one example at a time.  x [M, d], y [M] -> w [c, d+1]."""
    xt = np.hstack([x, np.ones((len(x), 1))])
    e = xt.shape[1]
    Y = np.eye(c)[y]
    w = np.zeros((c, e))
    for _ in range(100):
        s = xt @ w.T
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - Y).T @ xt + classifiers.LOGREG_L2 * w
        H = classifiers.LOGREG_L2 * np.eye(c * e)
        for m in range(len(xt)):
            H += np.kron(np.diag(p[m]) - np.outer(p[m], p[m]), np.outer(xt[m], xt[m]))
        step = np.linalg.solve(H, g.reshape(-1)).reshape(c, e)
        w -= step
        if np.abs(step).max() < 1e-14:
            break
    return w


def _objective_grad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Autograd gradient of sum_m CE + L2 / 2 ||w||^2 at w, per prompt.  x [P, M, d] -> [P, c, d+1]."""
    w = w.clone().requires_grad_(True)
    xt = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    logp = torch.log_softmax(torch.einsum("pmi,pki->pmk", xt, w), -1)
    loss = -logp.gather(-1, y[..., None]).sum() + 0.5 * classifiers.LOGREG_L2 * (w * w).sum()
    return torch.autograd.grad(loss, w)[0]


@pytest.mark.parametrize("d,c,snr", [(3, 2, 1.0), (3, 3, 1.0), (2, 4, 3.0)])
def test_logreg_matches_a_plain_newton_per_prompt(d, c, snr):
    """The batched fit (pair weights, x_i x_j products, per-prompt stopping) against one prompt at a
    time, at M < d, small and larger M, and on a context with an empty class."""
    task = GMMTask(d=d, c=c, snr=snr)
    for M in (2, 5, 40, 300):
        pr = _prompts(task, M, n=8, seed=M)
        x, y = pr.ctx.x.clone(), pr.ctx.y.clone()
        y[0] = torch.where(y[0] == c - 1, 0, y[0])  # prompt 0: the last class never seen
        y[1] = torch.where(y[1] == 0, 1, y[1])  # prompt 1: the first class never seen
        pr.ctx.x, pr.ctx.y = x, y
        w = classifiers.logreg_fit(x, y, c)
        p = classifiers.logreg(pr)
        for i in range(8):
            ref = _newton_reference(x[i].numpy(), y[i].numpy(), c)
            np.testing.assert_allclose(w[i].numpy(), ref, rtol=0, atol=1e-10 * max(1.0, np.abs(ref).max()), err_msg=f"M={M} prompt {i}")
            s = ref @ np.append(pr.xq[i].numpy(), 1.0)
            np.testing.assert_allclose(p[i].numpy(), np.exp(s - s.max()) / np.exp(s - s.max()).sum(), rtol=0, atol=1e-10)
        assert float(w[0, c - 1].abs().max()) > 0  # an unseen class still gets (shrunk) weights


@pytest.mark.parametrize("d,c", [(2, 2), (4, 3)])
def test_logreg_gradient_vanishes_at_the_fit(d, c):
    """At the returned weights the objective's gradient (by autograd, independent of the fit's own
    formulas) is zero to rounding, on quickstart-like contexts up to M = 1024."""
    task = GMMTask(d=d, c=c, snr=2.0, cov="diag", kappa=2.0)
    for M in (4, 64, 1024):
        pr = _prompts(task, M, n=32)
        w = classifiers.logreg_fit(pr.ctx.x, pr.ctx.y, c)
        g = _objective_grad(pr.ctx.x, pr.ctx.y, w)
        assert float(g.abs().max()) < 1e-12 * M, (M, float(g.abs().max()))
        # and a step away from it is not: the check can fail
        g_off = _objective_grad(pr.ctx.x, pr.ctx.y, w + 1e-6)
        assert float(g_off.abs().max()) > 1e-7


def test_logreg_does_not_depend_on_the_prompts_beside_it():
    """Each prompt stops on its own step: fitting in chunks of 1, 3 or all prompts (which drops
    converged prompts at different times) gives the same weights, and so does a subset."""
    task = GMMTask(d=3, c=3, snr=1.5)
    pr = _prompts(task, 50, n=40)
    x, y = pr.ctx.x, pr.ctx.y
    full = classifiers.logreg_fit(x, y, 3)
    T = 10  # elements per example at d = 3: [x; 1] and the 6 products x_i x_j
    for chunk in (1, 3 * 50 * T, 40 * 50 * T):
        torch.testing.assert_close(classifiers.logreg_fit(x, y, 3, chunk_elems=chunk), full, rtol=0, atol=1e-13)
    sub = torch.tensor([5, 17, 33])
    torch.testing.assert_close(classifiers.logreg_fit(x[sub], y[sub], 3), full[sub], rtol=0, atol=1e-13)


def test_logreg_unseen_classes_tie_exactly():
    """Classes absent from a context have equal weights at the minimiser (the objective is symmetric
    in them): the fit makes them bitwise equal, so their probabilities tie and argmax takes the first."""
    task = GMMTask(d=3, c=4, snr=2.0, cov="rotated", kappa=4.0)
    pr = _prompts(task, 6, n=64)
    pr.ctx.y = pr.ctx.y % 2  # classes 2 and 3 never seen
    w = classifiers.logreg_fit(pr.ctx.x, pr.ctx.y, 4)
    assert torch.equal(w[:, 2], w[:, 3]) and not torch.equal(w[:, 0], w[:, 1])
    p = classifiers.logreg(pr)
    assert torch.equal(p[:, 2], p[:, 3])
    for i in range(4):
        ref = _newton_reference(pr.ctx.x[i].numpy(), pr.ctx.y[i].numpy(), 4)
        np.testing.assert_allclose(w[i].numpy(), ref, rtol=0, atol=1e-10)
