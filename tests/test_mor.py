"""Family mor: the sampler, and the closed-form population optimum Gamma* against Monte Carlo."""

import pytest
import torch

from study.config import ConfigError, MORTask
from study.covariance import covariance
from study.mor import context_h, pool, sample_prompts
from study.theory import gamma_star

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
