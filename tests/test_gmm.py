import math

import pytest
import torch

from study.classifiers import context_gram, context_V
from study.config import GMMTask
from study.covariance import covariance
from study.gmm import _draw_tasks, eval_chunks, label_embedding, sample_train
from study.lsa import embed
from study.rng import generator


@pytest.mark.parametrize("spec", ["diag", "rotated"])
def test_covariance_spectrum(spec):
    cov = covariance(spec, 6, kappa=9.0, cov_seed=3)
    ev = torch.linalg.eigvalsh(cov.lam)
    assert float(ev.sum()) == pytest.approx(6.0)
    assert float(ev.max() / ev.min()) == pytest.approx(9.0)
    torch.testing.assert_close(cov.half @ cov.half, cov.lam)
    torch.testing.assert_close(cov.inv @ cov.lam, torch.eye(6, dtype=torch.float64))
    assert torch.equal(covariance(spec, 6, 9.0, 3).lam, cov.lam)  # shared by every task and run
    if spec == "rotated":
        assert not torch.equal(covariance(spec, 6, 9.0, 4).lam, cov.lam)


def test_means_have_equal_mahalanobis_norms():
    task = GMMTask(d=5, c=4, snr=1.7, cov="rotated", kappa=5.0)
    cov = covariance("rotated", 5, 5.0)
    t = _draw_tasks(task, cov, 100, generator("x", "eval"))
    norms = torch.einsum("pkd,de,pke->pk", t.means, cov.inv, t.means).sqrt()
    torch.testing.assert_close(norms, torch.full_like(norms, 1.7))


def test_symmetric_means():
    task = GMMTask(d=3, c=2, snr=1.0, symmetric=True)
    t = _draw_tasks(task, covariance("identity", 3), 10, generator("x", "eval"))
    torch.testing.assert_close(t.means[:, 0], -t.means[:, 1])


def test_same_seed_same_prompts():
    task = GMMTask(d=3, c=3, snr=1.0, cov="diag", kappa=2.0)
    cov = covariance("diag", 3, 2.0)
    a, b = sample_train(task, cov, 20, 1500, seed=7), sample_train(task, cov, 20, 1500, seed=7)
    assert torch.equal(a.V, b.V) and torch.equal(a.xq, b.xq) and torch.equal(a.yq, b.yq)
    assert not torch.equal(a.V, sample_train(task, cov, 20, 1500, seed=8).V)
    # the two training paths share tasks and queries
    g = sample_train(task, cov, 20, 1500, seed=7, gram=True)
    assert torch.equal(a.xq, g.xq) and torch.equal(a.yq, g.yq)
    torch.testing.assert_close(g.V, g.gram[:, 3:, :3])


def _conditional_moments(task, cov, means, N):
    """E[V | means] and E_means[Cov(V | means)] in closed form.  V: [P, c', d]."""
    E = label_embedding(task.c)
    c = task.c
    mean = torch.einsum("kj,pkd->pjd", E, means) / c
    # per example: ytil x has E[(ytil x)(ytil x)^T | means] = sum_k pi_k E_k E_k^T (Lam + mu_k mu_k^T)
    second = torch.einsum("kj,kl,pkd,pke->pjlde", E, E, means, means) / c
    second = second + torch.einsum("kj,kl->jl", E, E)[None, :, :, None, None] * cov.lam / c
    outer = torch.einsum("pjd,ple->pjlde", mean, mean)
    return mean, ((second - outer) / N).mean(0)


@pytest.mark.parametrize("c, gram", [(2, False), (2, True), (3, False), (3, True)])
def test_training_statistics_have_the_exact_distribution(c, gram):
    """Both samplers of V against the closed-form conditional mean and covariance."""
    task = GMMTask(d=3, c=c, snr=1.5, cov="diag", kappa=3.0)
    cov = covariance("diag", 3, 3.0)
    N, B = 12, 40000
    st = sample_train(task, cov, N, B, seed=0, gram=gram)
    # recover the per-prompt means: they are drawn first, from the same generator calls
    means = torch.cat([_draw_tasks(task, cov, 1024, generator({"data": task.data_key(), "seed": 0}, "train", b)).means for b in range(40)])[:B]
    mean, cov_expected = _conditional_moments(task, cov, means, N)
    r = st.V - mean
    assert float(r.mean(0).abs().max()) < 4 * math.sqrt(float(cov_expected.diagonal(dim1=2, dim2=3).max()) / B) + 1e-3
    emp = torch.einsum("pjd,ple->jlde", r, r) / B
    torch.testing.assert_close(emp, cov_expected, rtol=0.06, atol=0.06 * float(cov_expected.abs().max()))


def test_eval_prompts_do_not_depend_on_the_grid_or_count():
    task = GMMTask(d=2, c=3, snr=1.0)
    cov = covariance("identity", 2)

    def first(lengths, n_eval):
        chunk = next(eval_chunks(task, cov, 3, n_eval, lengths, within=True))
        return chunk.tasks, next(c for c in chunk.contexts if c.M == 8)

    t1, c1 = first([8, math.inf], 100)  # 100 = a full block and part of a second one
    t2, c2 = first([8, 300], 200)
    assert torch.equal(t1.xq, t2.xq[:100]) and torch.equal(t1.means, t2.means[:100])
    assert torch.equal(c1.x, c2.x[:100]) and torch.equal(c1.frac, c2.frac[:100])
    a, b = sample_train(task, cov, 5, 1500, seed=0), sample_train(task, cov, 5, 2048, seed=0)
    assert torch.equal(a.V, b.V[:1500])  # training prompts do not depend on B either


def test_context_statistics_match_the_raw_prompt():
    """V and Z Z^T / M from the class statistics equal the literal ones from the raw examples."""
    task = GMMTask(d=3, c=3, snr=1.0)
    cov = covariance("identity", 3)
    chunk = next(eval_chunks(task, cov, 0, 64, [5, 40], within=True))
    for ctx in chunk.contexts:
        E = label_embedding(3)
        Z = embed(ctx.x, E[ctx.y], chunk.tasks.xq)
        G = Z @ Z.transpose(1, 2) / ctx.M
        torch.testing.assert_close(context_gram(ctx, chunk.tasks.xq, 3), G)
        torch.testing.assert_close(context_V(ctx, 3), G[:, 3:, :3])


def test_exact_context_is_the_large_M_limit():
    task = GMMTask(d=2, c=2, snr=1.0)
    cov = covariance("identity", 2)
    chunk = next(eval_chunks(task, cov, 0, 8, [20000, math.inf], within=True))
    big, exact = chunk.contexts
    torch.testing.assert_close(big.means, exact.means, atol=0.05, rtol=0)
    torch.testing.assert_close(big.within, exact.within, atol=0.05, rtol=0)
