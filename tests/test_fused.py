"""The fused C step (study/fused.py) against the torch kernels it replaces, and its build."""

import itertools
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from study import classifiers, em, fused, gmm, lsa, training
from study.config import GMMTask
from study.covariance import covariance

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler: training takes the torch path")


def _torch_step(W, V, xq, y, loss, chunk=300):
    """lsa.reduced_loss_grad over chunks of prompts (what training.step runs without the kernel)."""
    out, grad = W.new_zeros(W.shape[0]), torch.zeros_like(W)
    for s in range(0, V.shape[-1], chunk):
        ls, g = lsa.reduced_loss_grad(W, V[..., s : s + chunk], xq[..., s : s + chunk], y[:, s : s + chunk], loss)
        out += ls
        grad += g
    return out, grad


def _stack(S, d, c, B, loss, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(S, c, d, B, generator=g, dtype=torch.float64)
    xq = torch.randn(S, d, B, generator=g, dtype=torch.float64)
    y = torch.randn(S, B, generator=g, dtype=torch.float64) if loss == "squared" else torch.randint(max(c, 2), (S, B), generator=g)
    W = torch.randn(S, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return W, V, xq, y


@needs_cc
def test_the_kernel_builds_where_a_compiler_is():
    """Where there is a C compiler the fused step is built, so the tests below compare two paths."""
    assert fused.library() is not None


@needs_cc
@pytest.mark.parametrize(
    "d, c, loss",
    [(1, 1, "ce"), (2, 1, "ce"), (4, 3, "ce"), (3, 2, "ce"), (8, 10, "ce"), (16, 1, "ce"), (32, 5, "ce"), (4, 1, "squared"), (32, 1, "squared"), (fused.MAX_D, fused.MAX_C, "ce")],
)
def test_fused_step_equals_the_torch_kernels(d, c, loss):
    """Loss and gradient to 1e-12 for binary, softmax and squared losses, every d and c' the kernel
    takes; B = 1000 is not a multiple of the kernel's tile, and each member has its own prompts."""
    W, V, xq, y = _stack(3, d, c, 1000, loss)
    want_loss, want_grad = _torch_step(W, V, xq, y, loss)
    got_loss, got_grad = fused.reduced_step(W, V, xq, y.double(), loss)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12 * float(want_grad.abs().max()))


@needs_cc
def test_training_takes_the_fused_step_and_trains_the_same_W(monkeypatch):
    """training.gd through the kernel and through the torch kernels: the same W after 50 steps to 1e-12."""
    W, V, xq, y = _stack(2, 4, 3, 3000, "ce", seed=1)
    prob = training.Problem(V.permute(0, 3, 1, 2), xq.transpose(1, 2), y, None, torch.tensor([2.0, 4.0], dtype=torch.float64), torch.zeros(2, 4, 4, dtype=torch.float64), 3.0)
    calls = []
    monkeypatch.setattr(fused, "reduced_step", lambda *a: calls.append(1) or _kernel(*a))
    fast, _, _ = training.gd({"W": W.clone()}, prob, steps=50)
    assert len(calls) == 51
    monkeypatch.setattr(fused, "reduced_applies", lambda W, V: False)
    slow, _, _ = training.gd({"W": W.clone()}, prob, steps=50)
    torch.testing.assert_close(fast["W"], slow["W"], rtol=1e-12, atol=1e-14)


_kernel = fused.reduced_step


@needs_cc
@pytest.mark.parametrize("c, loss", [(1, "ce"), (3, "ce"), (1, "squared")])
def test_non_finite_parameters_give_a_non_finite_loss(c, loss):
    """A diverged member's loss stays non-finite through the kernel (no fast-math), as in torch, and
    the other members are untouched."""
    W, V, xq, y = _stack(2, 3, c, 700, loss)
    W[1, 0, 0] = math.nan
    got, _ = fused.reduced_step(W, V, xq, y.double(), loss)
    want, _ = _torch_step(W, V, xq, y, loss)
    assert not math.isfinite(float(got[1])) and not math.isfinite(float(want[1]))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    W[1, 0, 0] = math.inf
    got, _ = fused.reduced_step(W, V, xq, y.double(), loss)
    assert not math.isfinite(float(got[1]))


def test_shapes_beyond_the_kernel_and_other_devices_or_dtypes_take_the_torch_path():
    W = torch.zeros(1, 2, 2, dtype=torch.float64)
    assert not fused.reduced_applies(torch.zeros(1, fused.MAX_D + 1, fused.MAX_D + 1, dtype=torch.float64), torch.zeros(1, 1, fused.MAX_D + 1, 8, dtype=torch.float64))
    assert not fused.reduced_applies(W, torch.zeros(1, fused.MAX_C + 1, 2, 8, dtype=torch.float64))
    assert not fused.reduced_applies(W.float(), torch.zeros(1, 1, 2, 8, dtype=torch.float32))
    assert not fused.reduced_applies(W.clone().requires_grad_(), torch.zeros(1, 1, 2, 8, dtype=torch.float64))  # autograd: torch
    P, G = torch.zeros(1, 1, fused.FULL_MAX_D + 1, dtype=torch.float64), torch.zeros(1, fused.FULL_MAX_D + 1, fused.FULL_MAX_D + 1, 8, dtype=torch.float64)
    assert not fused.full_applies(P, G)


@needs_cc
def test_the_library_is_built_once_per_cache_and_switched_off_by_the_environment(tmp_path):
    """A fresh process builds the library into the cache, whole; the next one loads it; with
    ICL_STUDY_FUSED=0, or no compiler, there is no library and training takes the torch path."""
    probe = "from study import fused; print(fused.library() is not None)"
    env = {**os.environ, "ICL_STUDY_CACHE": str(tmp_path)}
    run = lambda **extra: subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    assert run() == "True"
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("fused-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert run() == "True" and [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == [stamp]
    assert run(ICL_STUDY_FUSED="0") == "False"
    assert run(CC=str(tmp_path / "no-such-compiler")) == "False"


@needs_cc
@pytest.mark.parametrize("d, c", [(1, 2), (2, 2), (4, 3), (3, 4), (fused.LOGREG_MAX_D, fused.LOGREG_MAX_C)])
def test_fused_logreg_equals_the_torch_newton(d, c):
    """logreg's Newton fits in C against the torch iteration, every context on its own: the same
    minimiser to 1e-12 at M below d, around a tile (257) and beyond it, with unseen classes."""
    g = torch.Generator().manual_seed(d * 10 + c)
    for M in (1, 3, 257, 600):
        x = torch.randn(6, M, d, generator=g, dtype=torch.float64) + torch.randn(6, 1, d, generator=g, dtype=torch.float64)
        y = torch.randint(c, (6, M), generator=g)
        y[0] = 0  # one class only
        want = classifiers._newton(x, y, c, None)
        got = fused.logreg_newton(x, y, c, classifiers.LOGREG_L2, classifiers.LOGREG_TOL, classifiers.LOGREG_ITERS)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * max(1.0, float(want.abs().max())), msg=f"M={M}")


@needs_cc
def test_fused_logreg_non_finite_data_gives_nan_weights_for_that_context_only():
    x = torch.randn(3, 20, 2, dtype=torch.float64)
    y = torch.randint(3, (3, 20))
    x[1, 4, 0] = math.nan
    w = fused.logreg_newton(x, y, 3, 1.0, 1e-10, 25)
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2]]).all()
    torch.testing.assert_close(w[[0, 2]], classifiers._newton(x[[0, 2]], y[[0, 2]], 3, None), rtol=0, atol=1e-12)


def test_logreg_beyond_the_kernel_takes_the_torch_path():
    x = torch.zeros(1, 4, fused.LOGREG_MAX_D + 1, dtype=torch.float64)
    assert not fused.logreg_applies(x, 3)
    assert not fused.logreg_applies(x[..., :2], fused.LOGREG_MAX_C + 1)
    assert not fused.logreg_applies(x[..., :2].float(), 3)


def _mixture(P, M, d, K, R, snr, seed):
    g = torch.Generator().manual_seed(seed)
    betas = torch.randn(P, K, d, generator=g, dtype=torch.float64)
    betas = snr * betas / betas.norm(dim=-1, keepdim=True)
    x = torch.randn(P, M, d, generator=g, dtype=torch.float64)
    lab = torch.randint(K, (P, M), generator=g)
    y = (betas[torch.arange(P)[:, None], lab] * x).sum(-1) + 0.5 * torch.randn(P, M, generator=g, dtype=torch.float64)
    return x, y, em.init_beta(x, y, torch.randn(P, R, K, d, generator=g, dtype=torch.float64))


@needs_cc
@pytest.mark.parametrize("d, K, R, sigma", [(4, 2, 4, 0.5), (4, 2, 4, None), (2, 3, 2, 0.0), (3, 3, 3, None), (fused.EM_MAX_D, 2, 1, 0.5)])
def test_fused_em_equals_the_torch_em(d, K, R, sigma, monkeypatch):
    """EM in C against the torch iteration: the same log-likelihoods (1e-9, 1e-12 relative) and iterations, and the
    same fits up to the order of the components (restarts that reach one optimum tie to 1e-16 in
    log-likelihood, with their components in any order, and rounding decides which is kept), at
    M around and beyond a tile. At M = 8 (8 examples for up to 3 components) the likelihood has
    near-flat directions, where rounding moves the point EM stops at without moving the
    likelihood: there only the likelihoods and iterations are compared. Where the estimated sigma
    collapses onto an exact fit (at em.SIGMA_FLOOR, 1e-6), the log-likelihood scales the residuals'
    rounding by 1 / sigma^2: there it is compared to 1e-8 relative (a build for another CPU's
    vector width moved one by 2.6e-9 of 12.2)."""
    for M in (8, 37, 300):
        x, y, b0 = _mixture(64, M, d, K, R, snr=3.0, seed=M + d)
        got = em.fit(x, y, b0, sigma, 50, 1e-8)
        monkeypatch.setattr(fused, "em_applies", lambda x, K: False)
        want = em.fit(x, y, b0, sigma, 50, 1e-8)
        monkeypatch.undo()
        assert got.iterations == want.iterations
        fit = want.sigma > 1e3 * em.SIGMA_FLOOR
        torch.testing.assert_close(got.loglik[fit], want.loglik[fit], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got.loglik[~fit], want.loglik[~fit], rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(got.sigma, want.sigma, rtol=1e-6, atol=1e-9)
        if M == 8:
            continue
        perms = torch.tensor(list(itertools.permutations(range(K))))
        gap = lambda p: torch.maximum((got.beta[:, p] - want.beta).abs().amax((1, 2)), (got.pi[:, p] - want.pi).abs().amax(1))  # noqa: E731
        assert float(torch.stack([gap(p) for p in perms]).amin(0).max()) < 1e-5, f"M={M}"


@needs_cc
def test_fused_em_keeps_a_non_finite_fit_visible(monkeypatch):
    """A NaN in one context's data gives that prompt a NaN log-likelihood and sigma on both paths
    (the floors keep NaN, as torch's clamp does), and leaves the other prompts' fits alone."""
    x, y, b0 = _mixture(3, 20, 2, 2, 2, snr=2.0, seed=5)
    y[1, 3] = math.nan
    got = em.fit(x, y, b0, None, 20, 1e-8)
    monkeypatch.setattr(fused, "em_applies", lambda x, K: False)
    want = em.fit(x, y, b0, None, 20, 1e-8)
    for f in (got, want):
        assert math.isnan(float(f.loglik[1])) and math.isnan(float(f.sigma[1]))
    torch.testing.assert_close(got.loglik[[0, 2]], want.loglik[[0, 2]], rtol=1e-12, atol=1e-9)


@needs_cc
def test_fused_em_is_chosen_for_em_only_and_within_its_limits(monkeypatch):
    x, y, b0 = _mixture(4, 10, 2, 2, 2, snr=2.0, seed=1)
    calls = []
    monkeypatch.setattr(fused, "em_fit", lambda *a: calls.append(1) or pytest.fail("gradient EM must stay in torch"))
    em.fit(x, y, b0, 0.5, 5, 1e-8, grad_steps=3)
    assert calls == []
    assert not fused.em_applies(torch.zeros(1, 4, fused.EM_MAX_D + 1, dtype=torch.float64), 2)
    assert not fused.em_applies(torch.zeros(1, 4, 2, dtype=torch.float64), fused.EM_MAX_K + 1)


@needs_cc
def test_the_kernels_refuse_tensors_they_would_read_out_of_bounds():
    """Each kernel takes its sizes from one tensor and walks the others by them, so every other
    tensor is checked first: a wrong dtype or shape is a ValueError naming it, not a read past its
    end (found with AddressSanitizer before the checks)."""
    W, V, xq, y = _stack(1, 4, 1, 100, "ce")
    y = y.double()
    with pytest.raises(ValueError, match="xq must be a float64"):
        fused.reduced_step(W, V, xq.float(), y, "ce")
    with pytest.raises(ValueError, match="y must be"):
        fused.reduced_step(W, V, xq, y[:, :50], "ce")
    with pytest.raises(ValueError, match="c' = 1 for the squared loss"):
        fused.reduced_step(W, torch.cat([V, V], 1), xq, y, "squared")
    P, K, G = torch.zeros(1, 1, 5, dtype=torch.float64), torch.zeros(1, 5, 4, dtype=torch.float64), torch.zeros(1, 5, 5, 100, dtype=torch.float64)
    with pytest.raises(ValueError, match="K must be"):
        fused.full_step(P, K[:, :, :3], G, xq, y, "ce")
    x = torch.zeros(2, 10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="y must be"):
        fused.logreg_newton(x, torch.zeros(2, 9), 3, 1e-3, 1e-10, 20)
    with pytest.raises(ValueError, match="beta0 must be"):
        fused.em_fit(x, torch.zeros(2, 10), torch.zeros(2, 1, 2, 4), 0.5, 5, 1e-8, em.RIDGE, em.SIGMA_FLOOR)
    assert not fused.em_applies(torch.zeros(1, 0, 2, dtype=torch.float64), 2) and not fused.em_applies(x, 0)


def _torch_full(P, K, G, xq, y, loss, chunk=300):
    out, dP, dK = P.new_zeros(P.shape[0]), torch.zeros_like(P), torch.zeros_like(K)
    for s in range(0, G.shape[-1], chunk):
        ls, gP, gK = lsa.full_loss_grad(P, K, G[..., s : s + chunk], xq[..., s : s + chunk], y[:, s : s + chunk], loss)
        out, dP, dK = out + ls, dP + gP, dK + gK
    return out, dP, dK


@needs_cc
@pytest.mark.parametrize("d, c, loss", [(1, 1, "ce"), (4, 1, "ce"), (4, 3, "ce"), (16, 1, "ce"), (3, 1, "squared"), (fused.FULL_MAX_D - fused.MAX_C, fused.MAX_C, "ce")])
def test_fused_full_step_equals_the_torch_kernels(d, c, loss):
    """The full form's loss and gradients to 1e-12, on Gram matrices Z Z^T / n of random Z (as
    training stores them), B = 1000 (not a multiple of the tile)."""
    S, B, D = 2, 1000, d + c
    g = torch.Generator().manual_seed(d + 7 * c)
    Z = torch.randn(S, B, D, D + 2, generator=g, dtype=torch.float64)
    G = (Z @ Z.transpose(-1, -2) / (D + 2)).permute(0, 2, 3, 1).contiguous()
    xq = torch.randn(S, d, B, generator=g, dtype=torch.float64)
    y = torch.randn(S, B, generator=g, dtype=torch.float64) if loss == "squared" else torch.randint(max(c, 2), (S, B), generator=g)
    P = torch.randn(S, c, D, generator=g, dtype=torch.float64) / D
    K = torch.randn(S, D, d, generator=g, dtype=torch.float64) / D
    want = _torch_full(P, K, G, xq, y, loss)
    got = fused.full_step(P, K, G, xq, y.double(), loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


@needs_cc
def test_training_the_full_form_takes_the_fused_step_and_trains_the_same_parameters(monkeypatch):
    task = GMMTask(d=3, c=3, snr=1.5)
    cov = covariance(task.cov, task.d, task.kappa, task.cov_seed)
    st = [gmm.sample_train(task, cov, 20, 700, s, gram=True) for s in (0, 1)]
    stats = [torch.stack([getattr(s, f) for s in st]) for f in ("V", "xq", "yq", "gram")]
    prob = training.Problem(*stats, torch.tensor([1.0, 2.0], dtype=torch.float64), cov.inv.expand(2, 3, 3).clone(), 3.0)
    calls = []
    monkeypatch.setattr(fused, "full_step", lambda *a: calls.append(1) or _full_kernel(*a))
    fast, _, _ = training.gd(training.init_params(prob, "full"), prob, steps=30)
    assert len(calls) == 31
    monkeypatch.setattr(fused, "full_applies", lambda P, G: False)
    slow, _, _ = training.gd(training.init_params(prob, "full"), prob, steps=30)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-11, atol=1e-13)


_full_kernel = fused.full_step


@needs_cc
def test_the_kernels_give_the_same_bits_on_any_number_of_threads():
    """With torch's thread count above 1 the members or prompts are split between threads, each
    computed alone: the same numbers, bit for bit, as on one thread."""
    W, V, xq, y = _stack(5, 3, 2, 700, "ce")
    xc = torch.randn(7, 30, 3, dtype=torch.float64)
    yc = torch.randint(3, (7, 30))
    xm, ym, b0 = _mixture(7, 30, 3, 2, 2, snr=2.0, seed=3)
    runs = lambda: (fused.reduced_step(W, V, xq, y.double(), "ce"), fused.logreg_newton(xc, yc, 3, 1.0, 1e-10, 25), fused.em_fit(xm, ym, b0, None, 30, 1e-8, em.RIDGE, em.SIGMA_FLOOR))  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = runs()
        torch.set_num_threads(3)
        three = runs()
    finally:
        torch.set_num_threads(before)
    flat = lambda out: [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(one), flat(three)))
    assert one[2][-1] == three[2][-1]
