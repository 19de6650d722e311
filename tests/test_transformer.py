"""The multi-layer transformer (theory.md section 4): the network, its ensemble training, its
configuration and its place in a trial."""

import math

import pytest
import torch

from pipelines.cost import check_gpu_share, run_bytes
from study import lsa, transformer
from study.config import ConfigError, Run, TrialConfig, shape_key
from study.models import LSA_COLUMNS, Transformer
from study.rng import generator
from study.trial import _cov, run_bundle
from tests import configs

NET = dict(model="transformer", layers=2, width=16, heads=2, N=12, B=None, lr=3e-3, steps=40, M=[6, 12, 24, "inf"])
GMM = configs.gmm(d=3, c=3, snr=2.0, **NET, estimators=["bayes"])
MOR = configs.mor(d=3, K=1, snr=3.0, sigma=0.3, **NET, estimators=["oracle", "ridge"])


def cfg(**kw):
    return TrialConfig.from_flat({**GMM, **kw})


def params(c: TrialConfig, S: int = 1, dtype=torch.float64):
    m, t = c.model, c.task
    gens = [generator({"test": s}, "init") for s in range(S)]
    return transformer.init(S, t.d + t.n_label, t.n_label, m.layers, m.width, m.mlp, c.train.N if m.positions == "learned" else 0, gens, dtype)


def prompts(S, P, n, d, c1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, P, n, d, generator=g, dtype=torch.float64)
    yt = torch.randn(S, P, n, c1, generator=g, dtype=torch.float64)
    xq = torch.randn(S, P, d, generator=g, dtype=torch.float64)
    return transformer.tokens(x, yt, xq)


@pytest.mark.parametrize("attention", ["softmax", "linear", "relu"])
@pytest.mark.parametrize("positions", ["none", "learned"])
def test_shapes_are_right_and_the_output_finite(attention, positions):
    c = cfg(attention=attention, positions=positions, mlp=attention != "linear")
    p = params(c, S=3)
    for n in (12, 30):  # the training length, and longer: positions beyond N reuse the last trained one
        out = transformer.forward(p, prompts(3, 5, n, 3, 3), c.model, 3)
        assert out.shape == (3, 5, 3) and torch.isfinite(out).all()


def test_the_query_cannot_see_its_own_label_slot():
    c = cfg(attention="softmax", positions="learned")
    p = params(c)
    Z = prompts(1, 4, 12, 3, 3)
    W = Z.clone()
    W[..., -1, 3:] = torch.randn(1, 4, 3, dtype=torch.float64) * 5
    torch.testing.assert_close(transformer.forward(p, W, c.model, 3), transformer.forward(p, Z, c.model, 3), rtol=0, atol=0)
    W = Z.clone()
    W[..., 0, 3:] += 1.0  # a context label does change the read-out
    assert not torch.allclose(transformer.forward(p, W, c.model, 3), transformer.forward(p, Z, c.model, 3))


def test_permuting_the_context_changes_nothing_without_positions():
    c = cfg(attention="softmax")
    p = params(c)
    Z = prompts(1, 4, 12, 3, 3)
    perm = torch.cat([torch.randperm(12, generator=torch.Generator().manual_seed(1)), torch.tensor([12])])
    torch.testing.assert_close(transformer.forward(p, Z[:, :, perm], c.model, 3), transformer.forward(p, Z, c.model, 3))


def test_one_linear_layer_with_the_lsa_block_structure_is_the_lsa():
    """width = d + c', one head, no norms or MLP, identity embedding and read-out of the label
    rows, W_q = W_KQ, W_k = I, W_v = W_PV, W_o = I: the read-out is the LSA's P G K x_q."""
    d, c1, N, P = 3, 3, 12, 7
    D = d + c1
    c = cfg(layers=1, width=D, heads=1, mlp=False, norm=False, attention="linear")
    g = torch.Generator().manual_seed(3)
    W_PV, W_KQ = torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(D, D, generator=g, dtype=torch.float64)
    p = params(c)
    eye = torch.eye(D, dtype=torch.float64)
    p["embed"][0], p["l0.out"][0] = eye, eye
    p["l0.qkv"][0] = torch.cat([W_KQ.T, eye, W_PV.T], dim=1)  # h @ qkv: q = W_KQ z, k = z, v = W_PV z
    p["head"][0] = eye[:, d:]
    Z = prompts(1, P, N, d, c1)
    got = transformer.forward(p, Z, c.model, c1)[0]
    want = lsa.literal_prediction(W_PV, W_KQ, Z[0].transpose(1, 2), c1)
    torch.testing.assert_close(got, want)


def test_an_ensemble_equals_separate_runs():
    runs = [Run(cfg(steps=6, log_every=2, lr=1e-2), s) for s in range(3)]
    covs = [_cov(r.config) for r in runs]
    together = Transformer.fit(runs, covs, "cpu")
    for i, r in enumerate(runs):
        alone = Transformer.fit([r], covs[i : i + 1], "cpu")
        assert alone.trials[0]["final_train_loss"] == pytest.approx(together.trials[i]["final_train_loss"], rel=1e-10)
        assert [row["train_loss"] for row in alone.curves[0]] == pytest.approx([row["train_loss"] for row in together.curves[i]], rel=1e-10)


@pytest.mark.parametrize("flat", [GMM, MOR], ids=["gmm", "mor"])
def test_short_training_lowers_the_loss_and_evaluates_at_every_M(flat):
    c = TrialConfig.from_flat({**flat, "steps": 150, "log_every": 150, "dtype": "float32", "online": False, "B": 512})
    out = run_bundle([Run(c, 0)])
    first = out.curves[0]["train_loss"]
    assert out.trials[0]["status"] == "ok" and out.trials[0]["final_train_loss"] < 0.9 * first
    assert not set(LSA_COLUMNS) & set(out.trials[0])  # the LSA's columns stay null
    rows = [e for e in out.evals if e["estimator"] == "transformer"]
    assert sorted({e["M"] for e in rows}) == [6.0, 12.0, 24.0]  # M = inf has no context to read
    assert all(math.isfinite(e["value"]) for e in rows)


def test_bad_transformer_configs_name_their_field():
    bad = [(dict(width=10, heads=3), "heads"), (dict(layers=0), "layers"), (dict(attention="cosine"), "attention"), (dict(param="full"), "param")]
    for kw, field in [*bad, (dict(B=100), "B"), (dict(online=False), "B")]:
        with pytest.raises(ConfigError) as err:
            cfg(**kw)
        assert err.value.field == field, (kw, err.value)
    with pytest.raises(ConfigError, match="applies to model transformer"):
        TrialConfig.from_flat({k: v for k, v in {**GMM, "model": "lsa", "B": 256}.items() if k not in ("layers", "heads")})


def test_shape_key_separates_architectures_and_the_gpu_share_is_checked():
    assert shape_key(cfg()) == shape_key(cfg(lr=1e-2, clip=0.5))  # per-run values share a stack
    assert shape_key(cfg()) != shape_key(cfg(layers=3)) and shape_key(cfg()) != shape_key(cfg(attention="relu"))
    gib = 1 << 30
    big = run_bytes(cfg(width=512, heads=8, layers=6, N=200, batch=256))
    check_gpu_share(1.0, big, 80 * gib)
    with pytest.raises(ValueError, match="give at least"):
        check_gpu_share(0.01, big, 80 * gib)


def test_a_trained_two_layer_softmax_transformer_nears_ridge_on_linear_regression():
    """Garg et al.'s result at toy size: mor with K = 1 is linear regression, and a 2-layer softmax
    transformer trained online reaches an mse within 1.5x of ridge's at M = N (about 30 s)."""
    c = TrialConfig.from_flat(
        dict(family="mor", d=3, K=1, snr=2.0, sigma=0.5, model="transformer", layers=2, width=32, heads=4, N=12, B=None, lr=2e-3, warmup=50, batch=128,
             steps=1000, log_every=100, M=[12], n_eval=512, dtype="float32", estimators=["oracle", "ridge"])
    )
    out = run_bundle([Run(c, 0)])
    mse = {e["estimator"]: e["value"] for e in out.evals if e["metric"] == "mse"}
    assert mse["transformer"] < 1.5 * mse["ridge"], mse
    assert mse["transformer"] > mse["oracle"]  # and no better than knowing beta


def test_a_transformer_run_is_priced_by_its_own_calibration_and_its_baselines_by_its_familys():
    """`Calibration.seconds`: the model's own flops at the family/model rate when the calibration
    has timed it, at the family's rate otherwise; the baselines' flops at the family's rate."""
    from pipelines.cost import Calibration, flops, shared_flops, work_kind
    from study.config import Run

    run = Run(TrialConfig.from_flat(configs.mor(model="transformer", layers=1, width=16, heads=2, B=None, lr=1e-3, steps=4, batch=8, M=[8, 32])), 0)
    own, shared = flops(run) - shared_flops(run.config), shared_flops(run.config)
    assert work_kind(run.config) == "mor/transformer" and own > 0 and shared > 0
    timed = Calibration("cpu:x", 1, "-", {"mor": 0.5, "mor/transformer": 0.25}, {"mor": 1e-9, "mor/transformer": 4e-9}, 0.0)
    assert timed.seconds(run) == pytest.approx(0.25 + 4e-9 * own + 1e-9 * shared, rel=1e-12)
    untimed = Calibration("cpu:x", 1, "-", {"mor": 0.5}, {"mor": 1e-9}, 0.0)
    assert untimed.seconds(run) == pytest.approx(0.5 + 1e-9 * (own + shared), rel=1e-12)
    lsa = Run(TrialConfig.from_flat(configs.mor()), 0)
    assert work_kind(lsa.config) == "mor" and timed.seconds(lsa) == pytest.approx(0.5 + 1e-9 * flops(lsa), rel=1e-12)
