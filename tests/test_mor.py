"""Family mor: the sampler, and the closed-form population optimum Gamma* against Monte Carlo."""

import math

import pytest
import torch

from study import regressors
from study.config import ConfigError, MORTask, Run, TrialConfig
from study.covariance import covariance
from study.mor import context_h, pool, sample_prompts
from study.theory import excess_risk, gamma_star
from study.trial import run_bundle
from tests import configs

VARIANTS = {
    "linear-regression": dict(d=2, K=1, sigma=0.0, snr=1.0),
    "fresh-sample": dict(d=2, K=2, sigma=0.5, snr=2.0, cov="diag", kappa=2.0),
    "fresh-sample-weighted": dict(d=3, K=3, sigma=0.3, snr=2.0, pi=(0.5, 0.3, 0.2), cov="rotated", kappa=3.0),
    "fresh-symmetric-weighted": dict(d=2, K=2, sigma=0.2, snr=3.0, pi=(0.7, 0.3), symmetric=True),
    "pool-sample": dict(d=2, K=3, sigma=0.3, snr=2.0, components="pool", cov="diag", kappa=2.0),
    "pool-prompt": dict(d=3, K=3, sigma=0.3, snr=2.0, components="pool", assignment="prompt", cov="rotated", kappa=2.0),
    "pool-prompt-symmetric-noiseless": dict(d=2, K=2, sigma=0.0, snr=1.5, components="pool", assignment="prompt", symmetric=True),
}


def _cov(task):
    return covariance(task.cov, task.d, task.kappa, task.cov_seed)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gamma_star_equals_monte_carlo_least_squares(name):
    """Gamma* minimises E[(y_q - x_q^T Gamma h)^2]: compare with least squares on 300k sampled prompts."""
    task = MORTask(**VARIANTS[name])
    cov, N = _cov(task), 4
    p = sample_prompts(task, cov, N, 300_000, seed=1)
    h = context_h(p)
    f = (p.xq[:, :, None] * h[:, None, :]).reshape(len(h), -1)  # y_hat = <vec Gamma, vec(x_q h^T)>
    sol = torch.linalg.lstsq(f, p.yq[:, None]).solution[:, 0]
    # heteroscedasticity-robust (sandwich) standard errors of the least-squares coefficients
    resid = p.yq - f @ sol
    bread = torch.linalg.inv(f.T @ f)
    stderr = (bread @ (f.T * resid**2) @ f @ bread).diagonal().sqrt()
    z = (sol - gamma_star(task, cov, N).reshape(-1)) / stderr
    assert float(z.abs().max()) < 5, z  # 5 sigma: a wrong closed form is off by far more here
    assert float(stderr.max()) < 0.05 * max(float(gamma_star(task, cov, N).abs().max()), 0.1)


@pytest.mark.parametrize("name", ["fresh-sample-weighted", "pool-prompt"])
def test_excess_risk_equals_monte_carlo(name):
    """Claim 2's excess risk R(Gamma) - R(Gamma*) in closed form against the paired Monte Carlo mean."""
    task = MORTask(**VARIANTS[name])
    cov, N = _cov(task), 5
    star = gamma_star(task, cov, N)
    gamma = star + 0.3 * torch.randn(star.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = sample_prompts(task, cov, N, 400_000, seed=2)
    h = context_h(p)
    loss = lambda g: (p.yq - torch.einsum("pi,ij,pj->p", p.xq, g, h)) ** 2  # noqa: E731
    diff = loss(gamma) - loss(star)
    closed = float(excess_risk(task, cov, N, gamma))
    assert abs(float(diff.mean()) - closed) < 5 * float(diff.std()) / len(diff) ** 0.5, (float(diff.mean()), closed)
    assert closed > 0 and float(excess_risk(task, cov, N, star)) == pytest.approx(0.0, abs=1e-12)
    # batched over a leading dimension
    torch.testing.assert_close(excess_risk(task, cov, N, torch.stack([star, gamma])), torch.tensor([0.0, closed], dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_zhang_frei_bartlett_optimum():
    """K = 1, sigma = 0, x ~ N(0, Lam): Gamma* = ((1 + 1/N) Lam + tr(Lam)/N I)^-1."""
    for N in (1, 5, 50):
        task = MORTask(d=4, K=1, snr=1.3, cov="rotated", kappa=5.0)
        lam = _cov(task).lam
        zfb = torch.linalg.inv((1 + 1 / N) * lam + torch.trace(lam) / N * torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(gamma_star(task, _cov(task), N), zfb)


def test_symmetric_sample_optimum_is_zero():
    """Claim 5: with beta_2 = -beta_1, equal weights and per-example components, the mean regressor is 0."""
    task = MORTask(d=3, K=2, snr=2.0, sigma=0.5, symmetric=True)
    assert float(gamma_star(task, _cov(task), 10).abs().max()) == 0.0


def test_sampler_regressors_and_noise():
    task = MORTask(d=3, K=3, snr=2.0, sigma=0.5)
    p = sample_prompts(task, _cov(task), 7, 2000, seed=0)
    norms = p.betas.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1.0))  # snr * sigma
    resid = p.y - torch.einsum("pnd,pnd->pn", p.x, torch.gather(p.betas, 1, p.z[..., None].expand(-1, -1, 3)))
    assert abs(float(resid.std()) - 0.5) < 0.02
    assert torch.equal(sample_prompts(task, _cov(task), 7, 2000, seed=0).y, p.y)  # determinism
    short = sample_prompts(task, _cov(task), 3, 2000, seed=0)
    assert torch.equal(short.x, p.x[:, :3]) and torch.equal(short.xq, p.xq)  # prefix-stable in N


def test_pool_is_shared_and_prompt_assignment_is_constant():
    task = MORTask(d=2, K=3, snr=1.0, components="pool", assignment="prompt", pool_seed=4)
    p = sample_prompts(task, _cov(task), 5, 300, seed=0)
    assert torch.equal(p.betas[0], pool(task)) and torch.equal(p.betas[-1], pool(task))
    assert (p.z == p.zq[:, None]).all()
    q = sample_prompts(task, _cov(task), 5, 300, seed=1)
    assert torch.equal(q.betas[0], p.betas[0]) and not torch.equal(q.x, p.x)  # same pool, other prompts


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(K=2, pi=(0.5, 0.6)), "pi"),
        (dict(K=3, pi=(0.5, 0.5)), "pi"),
        (dict(K=3, symmetric=True), "symmetric"),
        (dict(K=2, assignment="prompt"), "assignment"),
    ],
)
def test_bad_mor_configs(bad, field):
    with pytest.raises(Exception) as err:
        MORTask(d=2, snr=1.0, **bad)
    cause = err.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, ConfigError) and cause.field == field


# ----------------------------------------------------------------------------------------------
# the mor pipeline: training, estimators, evaluation


BASE = configs.mor(components="pool", N=8, B=40000, steps=300, log_every=100, M=[1, 4, "inf"], n_eval=256)


def test_trained_lsa_reaches_gamma_star():
    """Claim 3: GD on the reduced LSA reaches the empirical optimum, which is near Gamma*; the full
    LSA from the Zhang-Frei-Bartlett initialisation reaches the same optimum (fresh components)."""
    base = {**BASE, "components": "fresh", "B": 8000, "M": ["inf"], "n_eval": 16, "estimators": []}
    red = run_bundle([Run(TrialConfig.from_flat({**base, "steps": 300}), 0)])
    full = run_bundle([Run(TrialConfig.from_flat({**base, "param": "full", "init_scale": 0.5, "steps": 600, "log_every": 100}), 0)])
    assert red.trials[0]["status"] == full.trials[0]["status"] == "ok"
    assert red.trials[0]["opt_dist_theory"] < 0.05  # ||Gamma_hat - Gamma*||_max: finite-B noise only
    assert red.curves[-1]["dist_opt"] < 1e-6
    assert {p["name"] for p in red.params} == {"Gamma", "Gamma_opt"}
    params = {p["name"]: torch.tensor(p["values"], dtype=torch.float64).reshape(p["shape"]) for p in full.params}
    gamma_full = (params["W_PV"][2, 2] * params["W_KQ"][:2, :2]).T  # the W it plays, transposed
    gamma_opt = {p["name"]: torch.tensor(p["values"], dtype=torch.float64).reshape(p["shape"]) for p in red.params}["Gamma_opt"]
    # equal up to what the finite sample's asymmetry lets the blocks outside the structure absorb
    torch.testing.assert_close(gamma_full, gamma_opt, atol=5e-3, rtol=0)
    off = max(float(params["W_PV"][2, :2].abs().max()), float(params["W_KQ"][2, :2].abs().max()))
    assert off < 0.05 * float(params["W_PV"][2, 2])  # the blocks the theory keeps at 0 stay small


def test_estimators_and_metrics_in_a_bundle():
    cfg = TrialConfig.from_flat({**BASE, "d": 3, "B": 512, "steps": 20, "log_every": 10})
    out = run_bundle([Run(cfg, 0), Run(cfg, 1)])
    rows = {(r["run_id"], r["estimator"], r["M"], r["metric"]): r for r in out.evals}
    rid = Run(cfg, 0).run_id
    assert (rid, "ols", 1.0, "mse") not in rows and (rid, "ols", 4.0, "mse") in rows  # ols needs M >= d
    assert rows[rid, "oracle", 4.0, "excess_mse"]["value"] == 0.0
    for est in ("ols", "ridge"):  # an infinite context identifies the population regression
        assert abs(rows[rid, est, math.inf, "excess_mse"]["value"]) < 1e-12
    assert {e for (_, e, _, _) in rows} == {"lsa", "lsa_opt", "oracle", "ols", "ridge", "em", "gradient_em"}
    assert (rid, "em", 4.0, "param_error") in rows and (rid, "ols", 4.0, "param_error") not in rows
    assert all(t["excess_risk"] > 0 for t in out.trials)  # the trained Gamma is not exactly Gamma*


def test_oracle_posterior_mean_tends_to_the_argmin_rule():
    task = MORTask(d=3, K=3, snr=2.0, sigma=1e-9, components="pool", assignment="prompt")
    cov = _cov(task)
    p = sample_prompts(task, cov, 6, 200, seed=0, stream="eval")
    pr = regressors.RegressionPrompts(6.0, p.x, p.y, p.xq, p.yq, p.betas, p.zq, task, cov)
    soft = regressors.oracle(pr)  # weights exp(-sse / 2 sigma^2): overflow unless in log space
    hard = regressors.oracle(regressors.RegressionPrompts(6.0, p.x, p.y, p.xq, p.yq, p.betas, p.zq, task.model_copy(update={"sigma": 0.0}), cov))
    assert torch.isfinite(soft).all()
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(hard, (p.beta_q * p.xq).sum(-1))  # noise 1e-9: the right component


# ----------------------------------------------------------------------------------------------
# EM


def _em_fit(task, M, P, seed=0, restarts=4, grad_steps=0, iters=100):
    from study import em

    cov = _cov(task)
    p = sample_prompts(task, cov, M, P, seed=seed, stream="eval")
    z = torch.randn(P, restarts, task.K, task.d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return p, em.fit(p.x, p.y, em.init_beta(p.x, p.y, z), task.sigma, iters, 0.0, grad_steps)


@pytest.mark.parametrize("grad_steps", [0, 3])
def test_em_recovers_well_separated_components(grad_steps):
    from study.em import param_error

    task = MORTask(d=2, K=3, snr=6.0, sigma=0.3, components="pool", pool_seed=1)
    p, f = _em_fit(task, M=600, P=64, grad_steps=grad_steps, iters=150)
    err = param_error(f.beta, p.betas, symmetric=False)
    assert float(err.median()) < 0.1 * task.radius, err  # sqrt(d / M) scale, not the prior's
    if grad_steps == 0:
        torch.testing.assert_close(f.pi.sort(-1).values.median(0).values, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.05, rtol=0)


def test_vectorised_em_equals_a_per_prompt_loop():
    from study import em

    task = MORTask(d=3, K=2, snr=3.0, sigma=0.5)
    p, f = _em_fit(task, M=50, P=12, iters=30)
    z = torch.randn(12, 4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(12):
        x, y = p.x[i : i + 1], p.y[i : i + 1]
        one = em.fit(x, y, em.init_beta(x, y, z[i : i + 1]), task.sigma, 30, 0.0)
        torch.testing.assert_close(one.beta[0], f.beta[i], rtol=1e-9, atol=1e-12)


def _em_reference(x, y, beta0, sigma, iters, tol):
    """EM on ONE prompt with the textbook formulas, restart by restart and component by component.

    x [M, d], y [M], beta0 [R, K, d]; sigma known or None (estimated). Each iteration: E-step at
    the current parameters, M-step (weighted least squares with em.RIDGE, weights pi, sigma), then
    stop once no restart's log-likelihood moved by tol. Returns beta [R, K, d], the final
    log-likelihood of every restart [R] and the iterations run.
    """
    from study.em import RIDGE, SIGMA_FLOOR

    M, d = x.shape
    R, K, _ = beta0.shape
    beta = beta0.clone()
    pi = torch.full((R, K), 1.0 / K, dtype=x.dtype)
    sig = torch.full((R,), sigma if sigma is not None else float(y.std().clamp(min=SIGMA_FLOOR)), dtype=x.dtype)

    def e_step():
        s2 = sig.clamp(min=SIGMA_FLOOR)[:, None, None] ** 2
        logw = pi.log()[:, :, None] - (y - beta @ x.T) ** 2 / (2 * s2) - torch.log(2 * math.pi * s2) / 2  # [R, K, M]
        lse = torch.logsumexp(logw, dim=1)
        return lse.mean(-1), torch.exp(logw - lse[:, None])

    prev = torch.full((R,), -math.inf, dtype=x.dtype)
    it = 0
    for it in range(1, iters + 1):
        loglik, r = e_step()
        for j in range(R):
            for k in range(K):
                w = r[j, k]
                beta[j, k] = torch.linalg.solve(x.T @ (w[:, None] * x) + RIDGE * torch.eye(d, dtype=x.dtype), x.T @ (w * y))
        pi = (r.sum(-1) / M).clamp(min=1e-12)
        if sigma is None:
            sig = ((r * (y - beta @ x.T) ** 2).sum((1, 2)) / M).sqrt().clamp(min=SIGMA_FLOOR)
        if float((loglik - prev).abs().max()) < tol:
            break
        prev = loglik
    return beta, e_step()[0], it


@pytest.mark.parametrize("sigma", [0.5, None])
def test_em_with_converging_prompts_equals_a_plain_reference(sigma):
    """With tol > 0 prompts stop at different iterations and the vectorised fit drops them from its
    working set as they do; every prompt's fit must still be the plain algorithm's on that prompt alone."""
    from study import em

    task = MORTask(d=3, K=2, snr=3.0, sigma=0.5)
    P, M, R, iters, tol = 48, 40, 3, 200, 1e-6
    p = sample_prompts(task, _cov(task), M, P, seed=1, stream="eval")
    z = torch.randn(P, R, task.K, task.d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    beta0 = em.init_beta(p.x, p.y, z)
    f = em.fit(p.x, p.y, beta0, sigma, iters, tol)
    used, compared = [], 0
    for i in range(P):
        beta, loglik, it = _em_reference(p.x[i], p.y[i], beta0[i], sigma, iters, tol)
        used.append(it)
        top = loglik.topk(2).values
        if float(top[0] - top[1]) < 1e-12:  # two restarts on one optimum: which is "best" is a rounding matter
            continue
        compared += 1
        best = int(loglik.argmax())
        torch.testing.assert_close(f.beta[i], beta[best], rtol=0, atol=1e-10)
        torch.testing.assert_close(f.loglik[i], loglik[best], rtol=0, atol=1e-10)
    assert compared >= P // 2, compared
    assert min(used) < max(used) < iters and f.iterations == max(used), used  # the working set did shrink


@pytest.mark.parametrize("grad_steps, sigma", [(0, 0.5), (0, None), (2, 0.5), (2, None)])
def test_em_with_a_tolerance_equals_a_per_prompt_loop(grad_steps, sigma):
    """EM and gradient EM, sigma known or estimated, with prompts converging at different iterations:
    the vectorised fit equals em.fit on one prompt at a time (one restart, so no ties between restarts)."""
    from study import em

    task = MORTask(d=3, K=2, snr=3.0, sigma=0.5)
    P, M, iters, tol = 40, 32, 80, 1e-7
    p = sample_prompts(task, _cov(task), M, P, seed=2, stream="eval")
    z = torch.randn(P, 1, task.K, task.d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    beta0 = em.init_beta(p.x, p.y, z)
    f = em.fit(p.x, p.y, beta0, sigma, iters, tol, grad_steps)
    used = []
    for i in range(P):
        one = em.fit(p.x[i : i + 1], p.y[i : i + 1], beta0[i : i + 1], sigma, iters, tol, grad_steps)
        used.append(one.iterations)
        for name in ("beta", "pi", "sigma", "loglik"):
            torch.testing.assert_close(getattr(one, name)[0], getattr(f, name)[i], rtol=0, atol=1e-10)
    assert min(used) < max(used) and f.iterations == max(used), used


def test_param_error_handles_permutations_and_sign():
    from study.em import param_error

    beta = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=torch.float64)
    assert float(param_error(beta.flip(1), beta, symmetric=False)) == 0.0
    rotated = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]], dtype=torch.float64)
    assert float(param_error(rotated, beta, symmetric=True)) == pytest.approx(2**0.5)
    shifted = beta + 0.1
    assert float(param_error(-shifted, beta, symmetric=True)) == pytest.approx(0.1 * 2**0.5)


def test_em_rows_need_M_at_least_K():
    cfg = TrialConfig.from_flat({**BASE, "K": 3, "B": 256, "steps": 5, "M": [2, 8], "n_eval": 64, "estimators": ["em", "gradient_em"], "em_iters": 5})
    out = run_bundle([Run(cfg, 0)])
    got = {(r["estimator"], r["M"], r["metric"]) for r in out.evals}
    assert ("em", 8.0, "param_error") in got and ("gradient_em", 8.0, "mse") in got
    assert not any(e in ("em", "gradient_em") and m == 2.0 for e, m, _ in got)


def test_symmetric_sample_predictions_are_zero_and_runs_are_deterministic():
    """Claim 5: symmetric K = 2, sample assignment, equal weights: the oracle and lsa_opt predict 0."""
    cfg = TrialConfig.from_flat({**BASE, "components": "fresh", "symmetric": True, "B": 256, "steps": 10, "M": [4, "inf"], "n_eval": 64, "estimators": ["oracle", "lsa_opt", "em"], "em_iters": 5})
    task = cfg.task
    p = sample_prompts(task, _cov(task), 4, 64, seed=0, stream="eval")
    pr = regressors.RegressionPrompts(4.0, p.x, p.y, p.xq, p.yq, p.betas, p.zq, task, _cov(task))
    assert float(regressors.oracle(pr).abs().max()) < 1e-12
    a, b = run_bundle([Run(cfg, 0)]), run_bundle([Run(cfg, 0)])
    assert [r["value"] for r in a.evals] == [r["value"] for r in b.evals]
    assert [p["values"] for p in a.params] == [p["values"] for p in b.params]
    rows = {(r["estimator"], r["M"], r["metric"]): r["value"] for r in a.evals}
    assert rows["lsa_opt", 4.0, "mse"] == pytest.approx(rows["oracle", 4.0, "mse"])  # both predict 0
    assert ("em", 4.0, "param_error") in rows


def test_em_estimates_sigma_when_asked():
    from study import em

    task = MORTask(d=2, K=2, snr=6.0, sigma=0.4, components="pool", pool_seed=2)
    p = sample_prompts(task, _cov(task), 800, 32, seed=0, stream="eval")
    z = torch.randn(32, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = em.fit(p.x, p.y, em.init_beta(p.x, p.y, z), None, 200, 0.0)
    assert abs(float(f.sigma.median()) - 0.4) < 0.03


def test_em_failure_is_the_share_of_fits_off_by_more_than_half_a_regressor():
    """[J] claim 4's 'EM suffers from bad initialisations': one start fails often, more starts less."""
    task = MORTask(d=4, K=2, snr=2.0, sigma=1.0, symmetric=True)
    p = sample_prompts(task, _cov(task), 32, 128, seed=0, stream="eval")
    pr = regressors.RegressionPrompts(32.0, p.x, p.y, p.xq, p.yq, p.betas, p.zq, task, _cov(task))
    share = {}
    for restarts in (1, 4):
        ev = TrialConfig.from_flat({**BASE, **task.model_dump(), "B": 64, "M": [32], "em_restarts": restarts, "em_iters": 50}).eval
        _, extra = regressors.em_estimator(ev)(pr)
        torch.testing.assert_close(extra["param_failure"], (extra["param_error"] > task.radius / 2).double())
        share[restarts] = float(extra["param_failure"].mean())
    assert 0.2 < share[1] < 0.7 and share[4] < share[1] / 2, share


def test_kept_blocks_are_counted_and_the_least_recent_leave_first(monkeypatch):
    """rng.drawn_blocks keeps at most DRAWN_BYTES of blocks, its running count equal to what it
    holds, and evicts the least recently used block first."""
    from study import rng

    block = lambda b: (torch.full((100,), float(b), dtype=torch.float64), None)  # noqa: E731  800 bytes a block
    monkeypatch.setattr(rng, "DRAWN_BYTES", 2500)  # three blocks fit
    rng.forget_drawn()
    held = lambda: sorted(int(ts[0][0]) for ts in rng._drawn.values())  # noqa: E731
    for key in ("a", "b", "c"):
        rng.drawn_blocks([key], 100, 100, lambda b, k=key: block(ord(k)))
    rng.drawn_blocks(["a"], 100, 100, lambda b: block(-1))  # kept: not drawn again, now the most recent
    assert held() == [ord("a"), ord("b"), ord("c")] and rng._drawn_bytes == 2400
    rng.drawn_blocks(["d"], 100, 100, lambda b: block(ord("d")))  # "b" is the least recent
    assert held() == [ord("a"), ord("c"), ord("d")]
    assert rng._drawn_bytes == sum(rng._nbytes(ts) for ts in rng._drawn.values()) == 2400
    rng.forget_drawn()
    assert not rng._drawn and rng._drawn_bytes == 0


@pytest.mark.parametrize("family, gram", [("gmm", False), ("gmm", True), ("mor", False), ("mor", True)])
def test_kept_training_blocks_change_nothing(family, gram, monkeypatch):
    """A trial draws each training block once (rng.drawn_blocks): a B sweep's larger B reuse the
    smaller B's blocks, and what comes back is what a fresh process draws, bit for bit."""
    from study import gmm, mor, rng
    from study.config import GMMTask

    module = gmm if family == "gmm" else mor
    task = GMMTask(d=3, c=3, snr=1.0) if family == "gmm" else MORTask(**VARIANTS["fresh-sample-weighted"])
    cov = _cov(task)
    fields = ("V", "xq", "yq", "gram")

    def fresh(B):
        rng.forget_drawn()
        return module.sample_train(task, cov, 70, B, seed=4, gram=gram)

    cold = {B: fresh(B) for B in (300, 1024, 2500)}
    draws = []
    real = module._train_block
    monkeypatch.setattr(module, "_train_block", lambda *a: draws.append(a[4]) or real(*a))
    rng.forget_drawn()
    for B in (2500, 300, 1024, 2500):
        warm = module.sample_train(task, cov, 70, B, seed=4, gram=gram)
        for f in fields:
            a, b = getattr(cold[B], f), getattr(warm, f)
            assert (a is None and b is None) or torch.equal(a, b), (B, f)
        warm.V.add_(1.0)  # the caller's tensors are its own: the kept blocks stay as drawn
    assert draws == [0, 1, 2]  # each block drawn once
    monkeypatch.setattr(rng, "DRAWN_BYTES", 1)  # nothing fits: every call draws again, the same numbers
    rng.forget_drawn()
    for _ in range(2):
        assert torch.equal(module.sample_train(task, cov, 70, 2500, seed=4, gram=gram).V, cold[2500].V)
    assert draws[3:] == [0, 1, 2, 0, 1, 2]
    rng.forget_drawn()
