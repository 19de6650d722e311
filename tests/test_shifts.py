"""Distribution shifts at evaluation (study/shifts.py): each shift draws what it says, the
unshifted rows do not move, the reference knows the shifted truth, and the LSA's shift floors."""

import math

import pytest
import torch

from study import gmm, mor, shifts
from study.config import ConfigError, Run, TrialConfig
from study.covariance import covariance
from study.families import FAMILIES
from study.trial import _cov, run_bundle
from tests import configs

GMM = configs.gmm(d=3, c=3, snr=2.0, cov="diag", kappa=3.0, N=20, steps=5, M=[16, "inf"], n_eval=256, estimators=["bayes", "lsa_limit", "lda_plugin"])
MOR = configs.mor(d=3, N=20, steps=5, M=[16, "inf"], n_eval=256, estimators=["oracle", "ridge"])


def rows(flat, **kw):
    cfg = TrialConfig.from_flat({**flat, **kw})
    fam = FAMILIES[cfg.task.family]
    out = fam.evaluate(cfg, _cov(cfg), 0, {}, "cpu")
    return {(r["estimator"], r["shift"], r["M"], r["metric"]): r["value"] for r in out}


def test_the_unshifted_rows_do_not_move_and_neutral_shifts_repeat_them():
    plain = rows(GMM)
    shifted = rows(GMM, shifts=["cov_scale(1)", "mean_norms(1)"])
    assert {k: v for k, v in shifted.items() if k[1] == "none"} == plain
    for name in ("cov_scale(1)", "mean_norms(1)"):  # the same random streams: the same prompts
        assert {(e, M, m): v for (e, s, M, m), v in shifted.items() if s == name} == {(e, M, m): v for (e, _, M, m), v in plain.items()}
    assert TrialConfig.from_flat(GMM).config_id != TrialConfig.from_flat({**GMM, "shifts": ["cov_scale(2)"]}).config_id


def test_each_gmm_shift_draws_what_it_says():
    cfg = TrialConfig.from_flat(GMM)
    task, cov = cfg.task, _cov(cfg)
    P, M = 4096, 64

    def draw(shift):
        test = shifts.gmm_setting(shift, task, cov)
        (chunk,) = list(gmm.eval_chunks(task, cov, 0, P, [M], False, budget=1 << 30, test=test))
        ctx = chunk.contexts[-1]
        return chunk.tasks, ctx.x, ctx.y

    t, x, y = draw("cov_scale(2.5)")
    noise = x - torch.gather(t.means, 1, y[..., None].expand(*y.shape, 3))
    emp = torch.einsum("pmi,pmj->ij", noise, noise) / noise.shape[0] / noise.shape[1]
    torch.testing.assert_close(emp, 2.5 * cov.lam, atol=0.05, rtol=0.03)

    t, x, y = draw("prior(0.6)")
    share = (y == 0).double().mean().item()
    assert abs(share - 0.6) < 4 * math.sqrt(0.6 * 0.4 / y.numel())
    assert abs((t.yq == 0).double().mean().item() - 0.6) < 4 * math.sqrt(0.24 / P)

    t, _, _ = draw("mean_norms(3)")
    norms = torch.einsum("pkd,de,pke->pk", t.means, cov.inv, t.means).sqrt()
    torch.testing.assert_close(norms, (2.0 * torch.tensor([1.0, 3**0.5, 3.0], dtype=torch.float64)).expand_as(norms))

    t, x, y = draw("cov_rotate(4)")
    noise = x - torch.gather(t.means, 1, y[..., None].expand(*y.shape, 3))
    emp = torch.einsum("pmi,pmj->ij", noise, noise) / noise.shape[0] / noise.shape[1]
    lam2 = shifts.gmm_setting("cov_rotate(4)", task, cov).cov.lam
    torch.testing.assert_close(emp, lam2, atol=0.05, rtol=0.03)
    assert torch.linalg.eigvalsh(lam2).allclose(torch.linalg.eigvalsh(cov.lam)) and not lam2.allclose(cov.lam, atol=0.05)


def test_each_mor_shift_draws_what_it_says():
    cfg = TrialConfig.from_flat(MOR)
    task, cov = cfg.task, _cov(cfg)
    t2, c2 = shifts.mor_setting("covariate_scale(1.5)", task, cov)
    p = mor.sample_prompts(t2, c2, 64, 2048, 0, "eval")
    emp = torch.einsum("pmi,pmj->ij", p.x, p.x) / p.x.shape[0] / p.x.shape[1]
    torch.testing.assert_close(emp, 2.25 * cov.lam, atol=0.05, rtol=0.03)

    t3, c3 = shifts.mor_setting("noise(1.25)", task, cov)
    assert t3.radius == pytest.approx(task.radius) and t3.sigma == 1.25
    p = next(mor.prompt_blocks(t3, c3, 64, 2048, 0, "eval", key_task=task))  # one block of 1024 prompts
    base = next(mor.prompt_blocks(task, cov, 64, 2048, 0, "eval"))
    torch.testing.assert_close(p.betas, base.betas)  # the same regressors, drawn from the original's streams
    beta = torch.gather(p.betas, 1, p.z[..., None].expand(*p.z.shape, 3))
    resid = p.y - (beta * p.x).sum(-1)
    assert resid.var().item() == pytest.approx(1.25**2, rel=0.03)


def test_the_reference_knows_the_shifted_truth_and_the_lsa_keeps_a_floor():
    """At M = inf the LSA's limit is the Bayes rule without a shift (tv 0); a test covariance
    a Lam or means of unequal norms leave it a floor ([S] claim 5), a prior shift too (no intercept)."""
    r = rows({**GMM, "cov": "identity", "kappa": 1.0}, shifts=["cov_scale(3)", "mean_norms(2)", "prior(0.7)"])
    assert r[("lsa_limit", "none", math.inf, "tv_error")] < 1e-12
    for s in ("cov_scale(3)", "mean_norms(2)", "prior(0.7)"):
        assert r[("bayes", s, math.inf, "tv_error")] == 0.0  # the reference is the shifted truth
        assert r[("lsa_limit", s, math.inf, "tv_error")] > 0.01, s
    # with the prior known, bayes is more accurate than under uniform classes
    assert r[("bayes", "prior(0.7)", 16.0, "bayes_accuracy")] > r[("bayes", "none", 16.0, "bayes_accuracy")]

    m = rows(MOR, shifts=["noise(1.5)", "covariate_scale(2)"])
    assert m[("oracle", "noise(1.5)", 16.0, "mse")] == pytest.approx(m[("oracle", "none", 16.0, "mse")] + 1.5**2 - 0.5**2, rel=0.1)
    assert m[("ridge", "covariate_scale(2)", 16.0, "excess_mse")] > 0


def test_shifts_reach_every_model_and_row_and_bad_ones_name_the_field():
    cfg = TrialConfig.from_flat({**GMM, "shifts": ["cov_scale(2)"]})
    out = run_bundle([Run(cfg, 0)])
    assert {r["shift"] for r in out.evals} == {"none", "cov_scale(2)"}
    assert {r["estimator"] for r in out.evals if r["shift"] == "cov_scale(2)"} == {"lsa", "bayes", "lsa_limit", "lda_plugin"}
    for bad, message in [(["noise(1)"], "applies to family mor"), (["cov_scale"], "needs a value"), (["cov_scale(0)"], "a > 0"), (["tilt(1)"], "unknown shift")]:
        with pytest.raises(ConfigError, match=message) as err:
            TrialConfig.from_flat({**GMM, "shifts": bad})
        assert err.value.field == "shifts"
    assert covariance("identity", 2).lam.equal(torch.eye(2, dtype=torch.float64))
