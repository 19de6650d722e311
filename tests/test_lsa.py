import pytest
import torch

from study import lsa


def _prompts(B=6, N=9, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    y = torch.randint(c, (B, N), generator=g)
    xq = torch.randn(B, d, generator=g, dtype=torch.float64)
    E = torch.tensor([[-1.0], [1.0]], dtype=torch.float64) if c == 2 else torch.eye(c, dtype=torch.float64)
    ytil = E[y]
    Z = lsa.embed(x, ytil, xq)
    V = ytil.transpose(1, 2) @ x / N  # [B, c', d]
    G = Z @ Z.transpose(1, 2) / N
    return Z, V, G, xq, ytil.shape[-1]


@pytest.mark.parametrize("c", [2, 3])
def test_reduced_equals_full_equals_literal(c):
    """The three forms of the LSA give identical logits when the full matrices have block structure."""
    Z, V, G, xq, n_label = _prompts(c=c)
    d = xq.shape[1]
    W = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W_PV, W_KQ = lsa.block_init(d, n_label)
    W_KQ[0, :d, :d] = W
    reduced = lsa.reduced_logits(W[None], V[None], xq[None])[0]
    full = lsa.full_logits(W_PV[:, d:, :], W_KQ[:, :, :d], G[None], xq[None])[0][0]
    literal = lsa.literal_prediction(W_PV[0], W_KQ[0], Z, n_label)
    torch.testing.assert_close(reduced, literal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full, literal, rtol=1e-12, atol=1e-12)


def test_full_form_equals_literal_for_arbitrary_matrices():
    Z, V, G, xq, n_label = _prompts(c=3)
    D, d = Z.shape[1], xq.shape[1]
    g = torch.Generator().manual_seed(2)
    W_PV, W_KQ = torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(D, D, generator=g, dtype=torch.float64)
    full = lsa.full_logits(W_PV[None, d:, :], W_KQ[None, :, :d], G[None], xq[None])[0][0]
    torch.testing.assert_close(full, lsa.literal_prediction(W_PV, W_KQ, Z, n_label), rtol=1e-12, atol=1e-12)


def _torch_loss(logits, y, loss):
    """The summed loss by torch's own functions (an independent reference).  logits [B, c']."""
    if loss == "squared":
        return 0.5 * ((logits[:, 0] - y) ** 2).sum()
    if logits.shape[1] == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.double(), reduction="sum")
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


@pytest.mark.parametrize("c, loss", [(2, "ce"), (3, "ce"), (12, "ce"), (2, "squared")])
def test_training_kernels_equal_autograd(c, loss):
    """The prompts-last GD kernels' loss and closed-form gradients against autograd on the
    prompts-first logits (c = 12 takes the kernels' wide-contraction branch)."""
    Z, V, G, xq, n_label = _prompts(B=11, c=c)
    d, D = xq.shape[1], Z.shape[1]
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(c, (11,), generator=gen) if loss == "ce" else torch.randn(11, generator=gen, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(1, d, d, generator=g, dtype=torch.float64, requires_grad=True)
    ref = _torch_loss(lsa.reduced_logits(W, V[None], xq[None])[0], y, loss)
    ref.backward()
    Vt, xt = V.permute(1, 2, 0)[None], xq.T[None]  # prompts last
    value, grad = lsa.reduced_loss_grad(W.detach(), Vt, xt, y[None], loss)
    torch.testing.assert_close(value[0], ref.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, W.grad, rtol=1e-12, atol=1e-12)

    P = torch.randn(1, n_label, D, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(1, D, d, generator=g, dtype=torch.float64, requires_grad=True)
    ref = _torch_loss(lsa.full_logits(P, K, G[None], xq[None])[0][0], y, loss)
    ref.backward()
    value, dP, dK = lsa.full_loss_grad(P.detach(), K.detach(), G.permute(1, 2, 0)[None], xt, y[None], loss)
    torch.testing.assert_close(value[0], ref.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dP, P.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dK, K.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B", [7, 5000])  # 5000: more prompts than one product group of the summed log
def test_cross_entropy_matches_torch(B):
    """Summed loss and gradient (prompts last) against torch's cross-entropy and autograd,
    including logits far in both tails, where the binary loss is softplus's linear regime or ~0."""
    g = torch.Generator().manual_seed(0)
    for c in (1, 3, 12):
        logits = 8 * torch.randn(2, c, B, generator=g, dtype=torch.float64)
        logits[:, :, :3] *= 100  # |logit| up to ~1e3
        logits.requires_grad_(True)
        y = torch.randint(max(c, 2), (2, B), generator=g)
        if c == 1:
            ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.double(), reduction="none")
        else:
            ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2).reshape(-1, c), y.reshape(-1), reduction="none").reshape(2, B)
        ref.sum().backward()
        loss, grad = lsa.cross_entropy(logits.detach(), y)
        torch.testing.assert_close(loss, ref.sum(-1).detach(), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, logits.grad, rtol=1e-13, atol=1e-15)
    s = torch.randn(7, 1, dtype=torch.float64)
    torch.testing.assert_close(lsa.probabilities(s)[:, 1], torch.sigmoid(s[:, 0]))


def test_cross_entropy_propagates_non_finite_logits():
    """A diverged member's loss is non-finite (GD marks it diverged), its neighbours' stay finite."""
    for c in (1, 3):
        logits = torch.randn(3, c, 2000, dtype=torch.float64)
        logits[0, 0, 1500] = float("nan")
        logits[1, 0, 7] = float("inf")
        y = torch.randint(max(c, 2), (3, 2000))
        y[1, 7] = 0 if c == 1 else 2  # an infinite logit against the true class
        loss, _ = lsa.cross_entropy(logits, y)
        assert not torch.isfinite(loss[0]) and not torch.isfinite(loss[1]) and torch.isfinite(loss[2])
