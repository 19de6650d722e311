"""Golden values: one mor run, one run of the full parametrisation and their evals rows, pinned.

The numbers are this code's own (2026-11-27, torch 2.13 CPU), not an independent answer: the tests
that check the science are elsewhere. They are here so that a refactor that changes any number of
the pipeline (sampling streams, training, evaluation) fails loudly instead of passing on
statistical tests; a change that means to move them must update them in the same commit and say
why. Compared to 1e-9 relative (thread counts and BLAS paths round differently below that).
"""

import pytest

from study.config import Run, TrialConfig
from study.trial import run_bundle

MOR = dict(family="mor", d=3, K=2, snr=2.0, sigma=0.5, N=20, B=256, lr=0.2, steps=20, log_every=10, M=[8, "inf"], n_eval=64, estimators=["oracle", "ridge"])
FULL = dict(family="gmm", d=2, c=2, snr=1.5, N=20, B=256, lr=0.5, steps=20, log_every=10, M=[8, "inf"], n_eval=64, param="full", init_scale=0.1, estimators=["bayes"])
GOLDEN = {
    "mor": dict(final_train_loss=0.5199602910775483, opt_loss=0.5008889650115584, excess_risk=0.09780769555921029, evals=("mse", 0.8732349096573042, 0.15542895276522314)),
    "gmm-full": dict(final_train_loss=0.4741209826906387, evals=("tv_error", 0.129868373537822, 0.014722390115974317)),
}


@pytest.mark.parametrize("name, flat", [("mor", MOR), ("gmm-full", FULL)])
def test_golden_values(name, flat):
    out = run_bundle([Run(TrialConfig.from_flat(flat), 0)])
    want = dict(GOLDEN[name])
    metric, value, stderr = want.pop("evals")
    for column, v in want.items():
        assert out.trials[0][column] == pytest.approx(v, rel=1e-9), column
    (row,) = [e for e in out.evals if e["estimator"] == "lsa" and e["M"] == 8.0 and e["metric"] == metric and e["shift"] == "none"]
    assert (row["value"], row["stderr"]) == (pytest.approx(value, rel=1e-9), pytest.approx(stderr, rel=1e-9))
