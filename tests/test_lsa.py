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


@pytest.mark.parametrize("c", [2, 3])
def test_closed_form_gradients_equal_autograd(c):
    Z, V, G, xq, n_label = _prompts(B=11, c=c)
    d, D = xq.shape[1], Z.shape[1]
    y = torch.randint(c, (11,), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    W = torch.randn(1, d, d, generator=g, dtype=torch.float64, requires_grad=True)
    loss, dlogits = lsa.cross_entropy(lsa.reduced_logits(W, V[None], xq[None]), y[None])
    loss.sum().backward()
    torch.testing.assert_close(lsa.reduced_grad(dlogits.detach(), V[None], xq[None]), W.grad)

    P = torch.randn(1, n_label, D, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(1, D, d, generator=g, dtype=torch.float64, requires_grad=True)
    logits, _, h = lsa.full_logits(P, K, G[None], xq[None])
    loss, dlogits = lsa.cross_entropy(logits, y[None])
    loss.sum().backward()
    dP, dK = lsa.full_grad(dlogits.detach(), P.detach(), G[None], xq[None], h.detach())
    torch.testing.assert_close(dP, P.grad)
    torch.testing.assert_close(dK, K.grad)


def test_cross_entropy_matches_torch():
    logits = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    loss, _ = lsa.cross_entropy(logits, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    s = torch.randn(7, 1, dtype=torch.float64)
    yb = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    loss, _ = lsa.cross_entropy(s, yb)
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(s[:, 0], yb.double(), reduction="none"))
    torch.testing.assert_close(lsa.probabilities(s)[:, 1], torch.sigmoid(s[:, 0]))
