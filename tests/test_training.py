import math

import numpy as np
import pytest
import torch

from study.config import GMMTask, Run, TrialConfig
from study.covariance import covariance
from study.gmm import sample_train
from study.optimum import empirical_optimum
from study.training import Problem, gd, init_params, train
from study.trial import run_bundle
from tests import configs


def problem(task, N, B, lr, seeds=(0,), gram=False, cov=None):
    cov = cov or covariance(task.cov, task.d, task.kappa, task.cov_seed)
    st = [sample_train(task, cov, N, B, s, gram=gram) for s in seeds]
    return Problem(
        V=torch.stack([s.V for s in st]),
        xq=torch.stack([s.xq for s in st]),
        yq=torch.stack([s.yq for s in st]),
        gram=torch.stack([s.gram for s in st]) if gram else None,
        lr=torch.full((len(st),), lr, dtype=torch.float64),
        target=cov.inv.expand(len(st), task.d, task.d).clone(),
        scale=2.0 if task.c == 2 else float(task.c),
    )


@pytest.mark.parametrize("c", [2, 3])
def test_newton_reaches_a_stationary_point(c):
    task = GMMTask(d=3, c=c, snr=1.0, cov="diag", kappa=2.0)
    prob = problem(task, N=10, B=4000, lr=1.0)
    opt = empirical_optimum(prob.V[0], prob.xq[0], prob.yq[0])
    assert opt.converged
    from study.training import step

    _, grad = step({"W": opt.W[None]}, prob)
    assert float(grad["W"].abs().max()) < 1e-9
    assert float(opt.hess_eigs.min()) > 0  # strictly convex here


def test_gd_converges_linearly_at_the_predicted_rate():
    """Claim 1: log dist_opt falls linearly, with slope log(max |1 - lr lambda(H)|)."""
    task = GMMTask(d=2, c=2, snr=1.5, cov="diag", kappa=2.0)
    prob = problem(task, N=20, B=3000, lr=4.0)
    res = train(prob, "reduced", steps=400, log_every=10)
    steps = np.array(res.curves.steps)
    dist = res.curves.dist_opt[:, 0].numpy()
    window = (steps >= 100) & (dist > 1e-10)
    slope = np.polyfit(steps[window], np.log(dist[window]), 1)[0]
    rho_fit, rho_theory = math.exp(slope), float(res.rho_theory[0])
    assert 0.5 < rho_theory < 0.999
    assert rho_fit == pytest.approx(rho_theory, abs=2e-3)
    subopt = res.curves.subopt[:, 0].numpy()
    assert subopt[0] > 1e4 * max(subopt[-1], 1e-300)  # several decades, monotone in the window
    assert np.all(np.diff(subopt[window]) <= 1e-15)


@pytest.mark.parametrize("c, scale", [(2, 2.0), (3, 3.0)])
def test_optimum_approaches_the_theory_limit_as_N_grows(c, scale):
    """Claim 2: W* / c'' -> Lam^-1, the gap shrinking roughly like 1/N."""
    task = GMMTask(d=2, c=c, snr=1.0, cov="diag", kappa=2.0)
    cov = covariance("diag", 2, 2.0)
    gaps = []
    for N in (10, 40, 160):
        st = sample_train(task, cov, N, 100_000, seed=0)
        W = empirical_optimum(st.V, st.xq, st.yq).W
        gaps.append(float((W / scale - cov.inv).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.15
    assert gaps[0] / gaps[2] > 4  # 16x more context: at least a quarter of the 1/N improvement


def test_divergent_lr_marks_the_run_diverged_and_others_go_on():
    task = GMMTask(d=2, c=2, snr=1.0)
    prob = problem(task, N=10, B=200, lr=0.5, seeds=(0, 1), gram=True)
    prob.lr[1] = 1e4  # the bilinear full form blows up within a few steps
    _, diverged_at, log = gd(init_params(prob, "full"), prob, steps=50, log_every=5)
    assert int(diverged_at[0]) == -1 and 0 < int(diverged_at[1]) < 50
    assert math.isfinite(float(log[-1][1][0])) and not math.isfinite(float(log[-1][1][1]))


def test_bundle_with_divergent_member_reports_it():
    cfg = configs.gmm(steps=30)
    runs = [Run(TrialConfig.from_flat({**cfg, "param": "full", "lr": lr}), 0) for lr in (0.5, 1e6)]
    out = run_bundle(runs)
    status = {r["run_id"]: r["status"] for r in out.trials}
    assert status[runs[0].run_id] == "ok" and status[runs[1].run_id] == "diverged"
    steps_done = {r["run_id"]: r["steps_done"] for r in out.trials}
    assert 0 < steps_done[runs[1].run_id] < 30
    estimators = {(e["run_id"], e["estimator"]) for e in out.evals}
    assert (runs[0].run_id, "lsa") in estimators and (runs[1].run_id, "lsa") not in estimators
    assert (runs[1].run_id, "bayes") in estimators  # the baselines are still measured


@pytest.mark.parametrize("family", ["gmm", "mor"])
def test_kept_baseline_rows_equal_a_fresh_evaluation(family, monkeypatch):
    """A stack that meets evaluation prompts seen before (here: another B) takes the baselines'
    rows from the process's memory: the same rows as evaluating them again, the models' own rows
    still computed, and other prompts (another seed) not served from memory."""
    from study import trial

    base = configs.flat(family, snr=1.0, steps=5, log_every=5, M=[8, 32, "inf"])
    base.update(dict(c=3) if family == "gmm" else dict(estimators=["oracle", "ridge", "em", "lsa_opt"], em_iters=10))
    first = [Run(TrialConfig.from_flat({**base, "B": 128, "lr": 0.5}), s) for s in (0, 1)]
    later = [Run(TrialConfig.from_flat({**base, "B": 256, "lr": 0.5}), s) for s in (0, 2)]

    def rows(out):
        return sorted((e["run_id"], e["estimator"], e["M"], e["metric"], e["value"], e["stderr"], e["n_prompts"]) for e in out.evals)

    trial.forget_kept()
    fresh = rows(run_bundle(later))
    trial.forget_kept()
    run_bundle(first)
    assert len(trial._shared_rows) == 2
    calls = []
    evaluate = trial.FAMILIES[family].evaluate

    def spy(*args, shared=True, **kw):
        calls.append(shared)
        return evaluate(*args, shared=shared, **kw)

    monkeypatch.setattr(trial.FAMILIES[family], "evaluate", staticmethod(spy))
    kept = rows(run_bundle(later))
    assert kept == fresh
    assert sorted(calls) == [False, True]  # seed 0 from memory (its model only), seed 2 evaluated in full
    trial.forget_kept()


def test_full_param_first_step_is_the_reduced_step_and_training_decreases_the_loss():
    task = GMMTask(d=2, c=3, snr=1.0)
    prob = problem(task, N=10, B=500, lr=1.0, gram=True)
    full1, _, _ = gd(init_params(prob, "full"), prob, steps=1)
    red1, _, _ = gd(init_params(prob, "reduced"), prob, steps=1)
    # at the block initialisation P gets no gradient and K's x-block gets exactly the reduced one
    torch.testing.assert_close(full1["W_KQ"][:, :2, :2], red1["W"], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(full1["W_PV"], init_params(prob, "full")["W_PV"])
    res = train(prob, "full", steps=40, log_every=20)
    assert float(res.curves.train_loss[-1, 0]) < float(res.curves.train_loss[0, 0])
    assert int(res.diverged_at[0]) == -1


def test_finite_but_unstable_runs_are_diverged():
    """A too-large step on the bounded-gradient CE loss never overflows, but it ends above its start."""
    task = GMMTask(d=2, c=2, snr=1.0)
    prob = problem(task, N=10, B=300, lr=1.0, seeds=(0, 1))
    prob.lr[1] = 1000.0
    res = train(prob, "reduced", steps=100, log_every=10)
    assert torch.isfinite(res.final_loss).all()
    assert int(res.diverged_at[0]) == -1 and int(res.diverged_at[1]) > 0
    assert float(res.rho_theory[1]) > 1 > float(res.rho_theory[0])


def test_separable_training_set_has_no_converged_optimum():
    task = GMMTask(d=6, c=2, snr=2.0)
    prob = problem(task, N=10, B=20, lr=1.0)
    opt = empirical_optimum(prob.V[0], prob.xq[0], prob.yq[0])
    assert not opt.converged


def test_same_seed_same_trained_parameters_and_metrics():
    cfg = TrialConfig.from_flat(configs.gmm(c=3, lr=2.0))
    a, b = run_bundle([Run(cfg, 0), Run(cfg, 1)]), run_bundle([Run(cfg, 0), Run(cfg, 1)])
    assert [p["values"] for p in a.params] == [p["values"] for p in b.params]
    strip = lambda rows: [repr({k: v for k, v in r.items() if k != "wall_s"}) for r in rows]  # noqa: E731  (repr: NaN equals NaN)
    assert strip(a.evals) == strip(b.evals) and strip(a.curves) == strip(b.curves) and strip(a.trials) == strip(b.trials)
    assert a.params[0]["values"] != a.params[2]["values"]  # seeds 0 and 1 differ


def test_golden_training_step():
    """Golden values of the trained W after 5 GD steps on a fixed tiny problem.

    Update these numbers only when the sampler or the training step is changed on purpose (and say
    so in the commit): any other change in them means the science changed.
    """
    task = GMMTask(d=2, c=2, snr=1.0)
    prob = problem(task, N=4, B=64, lr=1.0)
    W, _, _ = gd({"W": torch.zeros(1, 2, 2, dtype=torch.float64)}, prob, steps=5)
    golden = torch.tensor(GOLDEN_W, dtype=torch.float64)
    torch.testing.assert_close(W["W"][0], golden, rtol=1e-10, atol=1e-12)


GOLDEN_W = [[0.25135517932866025, -0.22424699279303484], [0.19205037241174103, 0.43294359785756464]]


@pytest.mark.parametrize("c", [2, 3])
def test_trained_W_approaches_the_theory_limit_as_N_grows(c):
    """The GD-trained W (not only the minimiser) gets closer to c'' Lam^-1 as N grows."""
    base = configs.gmm(c=c, cov="diag", kappa=2.0, B=20000, lr=4.0, steps=400, log_every=400, M=["inf"], n_eval=16, estimators=[])
    runs = [Run(TrialConfig.from_flat({**base, "N": N}), 0) for N in (5, 40, 320)]
    out = run_bundle(runs)
    final = {r["run_id"]: r["dist_theory"] for r in out.curves if r["step"] == 400}
    gaps = [final[r.run_id] for r in runs]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.15, gaps


def test_local_rate_ignores_the_null_space_of_a_singular_hessian():
    """B < d^2 prompts leave the Hessian a null space that GD from W = 0 never enters."""
    from study.optimum import local_rate

    assert local_rate(torch.tensor([1e-17, -2e-16, 0.5, 2.0], dtype=torch.float64), 0.5) == pytest.approx(0.75)
    cfg = TrialConfig.from_flat(configs.mor(d=4, N=5, B=8, lr=0.1, M=["inf"], n_eval=16, estimators=[]))
    (trial,) = run_bundle([Run(cfg, 0)]).trials
    assert trial["status"] == "ok" and trial["rho_theory"] < 1.0


@pytest.mark.parametrize("family", ["gmm", "mor"])
@pytest.mark.parametrize("param", ["reduced", "full"])
def test_float32_training_matches_float64(family, param):
    base = configs.flat(family, param=param, snr=2.0, N=5, B=64, lr=0.1, M=[4, "inf"], n_eval=16)
    single, double = (run_bundle([Run(TrialConfig.from_flat({**base, "dtype": dt}), 0)]) for dt in ("float32", "float64"))
    assert single.trials[0]["status"] == double.trials[0]["status"] == "ok"
    assert single.trials[0]["final_train_loss"] == pytest.approx(double.trials[0]["final_train_loss"], rel=1e-5)
    assert len(single.evals) == len(double.evals)


def test_the_quadratic_loss_gap_is_predicted_from_the_hessian_and_the_start():
    """[J] claim 3: on the regression LSA's quadratic loss, GD's whole curve follows from the
    initial error's components in the Hessian's eigenbasis (not only its slowest rate)."""
    cfg = TrialConfig.from_flat(configs.mor(d=3, N=8, B=2048, lr=0.3, steps=200, M=["inf"], n_eval=16, estimators=[]))
    out = run_bundle([Run(cfg, 0)])
    sub = np.array([c["subopt"] for c in out.curves])
    pred = np.array([c["subopt_theory"] for c in out.curves])
    above = sub > 1e-10  # float noise of a loss near 0.5 is about 1e-16
    assert above.sum() >= 5 and np.abs(np.log(sub[above] / pred[above])).max() < 1e-6
    slowest = float(out.trials[0]["rho_theory"]) ** (2 * np.array([c["step"] for c in out.curves]))
    assert np.abs(np.log(sub[above] / (sub[0] * slowest[above]))).max() > 0.1  # the slowest mode alone would not do
    from study.optimum import quadratic_subopt

    wrong = quadratic_subopt(torch.eye(2), torch.ones(2), 0.5, [0, 1, 2])  # a known answer: 0.5 * 2 * 0.25^t
    torch.testing.assert_close(wrong, torch.tensor([1.0, 0.25, 0.0625], dtype=torch.float64))
    gmm_cfg = TrialConfig.from_flat(configs.gmm(N=8, M=["inf"], n_eval=16))
    assert all(math.isnan(c["subopt_theory"]) for c in run_bundle([Run(gmm_cfg, 0)]).curves)  # CE is not quadratic


def test_no_gd_steps_give_the_empirical_minimiser_alone():
    base = configs.gmm(c=3, N=20, B=4096, log_every=50, M=["inf"], estimators=["bayes"])
    newton = run_bundle([Run(TrialConfig.from_flat({**base, "steps": 0}), 0)])
    long_gd = run_bundle([Run(TrialConfig.from_flat({**base, "steps": 3000}), 0)])
    assert newton.curves == [] and newton.trials[0]["status"] == "ok" and newton.trials[0]["opt_converged"]
    p = {r["name"]: np.array(r["values"]) for r in newton.params}
    np.testing.assert_array_equal(p["W"], p["W_opt"])  # the run's model is the minimiser
    q = {r["name"]: np.array(r["values"]) for r in long_gd.params}
    np.testing.assert_allclose(q["W_opt"], p["W_opt"], atol=1e-10)  # the same minimiser as after GD
    assert abs(long_gd.trials[0]["opt_g"] - newton.trials[0]["opt_g"]) < 1e-10
    assert newton.trials[0]["final_dist_theory"] == newton.trials[0]["opt_dist_theory"]


def test_the_signed_projection_and_its_residual():
    """g and the residual split W/c'' into the target's line and the rest; the residual is the
    finite-B sampling noise: it shrinks like 1/sqrt(B) (theory.md section 5)."""
    from study.training import projection

    task = GMMTask(d=3, c=2, snr=1.0, cov="diag", kappa=2.0)
    prob = problem(task, N=20, B=64, lr=1.0)
    W = prob.scale * (0.8 * prob.target + 0.05 * torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float64))
    g, resid = projection(W, prob)
    T = prob.target[0]
    off = 0.05 * torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float64)  # orthogonal to diagonal T
    assert float(g) == pytest.approx(-0.2) and float(resid) == pytest.approx(float(off.norm() / T.norm()))
    base = configs.gmm(N=50, steps=0, M=["inf"], n_eval=16, estimators=["bayes"])
    noise = {B: np.mean([t["opt_noise"] for t in run_bundle([Run(TrialConfig.from_flat({**base, "B": B}), s) for s in range(6)]).trials]) for B in (2048, 32768)}
    assert 2.5 < noise[2048] / noise[32768] < 6.5, noise  # sqrt(16) = 4
