import math

import pytest

from study.config import ConfigError, TrialConfig
from tests import configs


def make(**kw):
    """Some valid gmm config with `kw` changed (the canonical one, tests/configs.py)."""
    return TrialConfig.from_flat(configs.gmm(**kw))


def test_flat_round_trip_and_stable_ids():
    cfg = make(cov="diag", kappa=4.0, M=[16, "inf", 64])
    again = TrialConfig.from_flat(cfg.to_flat())
    assert again == cfg
    assert again.config_id == cfg.config_id
    assert cfg.run_id(0) != cfg.run_id(1)
    assert make().config_id != make(N=11).config_id


def test_test_lengths_accept_inf_spellings_and_sort():
    for spelling in ["inf", ".inf", math.inf, "Infinity"]:
        assert make(M=[64, spelling, 16]).eval.M == [16.0, 64.0, math.inf]
    assert make(M=[16, 16.0]).eval.M == [16.0]


def test_cov_spec_string_form():
    cfg = make(cov="rotated(9)")
    assert (cfg.task.cov, cfg.task.kappa) == ("rotated", 9.0)


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(d=0), "d"),
        (dict(c=1), "c"),
        (dict(snr=0.0), "snr"),
        (dict(snr=-1.0), "snr"),
        (dict(N=0), "N"),
        (dict(M=[]), "M"),
        (dict(M=[0]), "M"),
        (dict(M=[2.5]), "M"),
        (dict(lr=0.0), "lr"),
        (dict(cov="diag", kappa=0.5), "kappa"),
        (dict(kappa=4.0), "kappa"),  # identity has no kappa
        (dict(steps=-1), "steps"),
        (dict(steps=0, param="full"), "steps"),
        (dict(family="nope"), "family"),
        (dict(model="nope"), "model"),
        (dict(estimators=["bayes", "nope"]), "estimators"),
        (dict(symmetric=True, c=3), "symmetric"),
        (dict(init_scale=0.1), "init_scale"),
        (dict(param="half"), "param"),
        (dict(typo=1), "typo"),
        (dict(B=None), "B"),
    ],
)
def test_bad_fields_are_named(gmm_flat, bad, field):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({**gmm_flat, **bad})
    assert err.value.field == field
    assert f"'{field}'" in str(err.value)


def test_the_claims_sweeps_are_shipped():
    """Each sweep the README and the claims' `needs` name ships (that each is valid: test_cli)."""
    from pipelines import sweep

    names = sweep.shipped()
    assert {
        *("quickstart", "gmm-n-scaling", "gmm-m-scaling", "gmm-b-ladder", "gmm-b-ladder-small", "gmm-c-scaling", "gmm-length"),
        *("mor-cluster", "mor-em-regimes", "mor-em-regimes-small", "mor-full-small"),
        *("gmm-depth", "gmm-depth-small", "mor-transformer", "mor-transformer-small"),
    } <= set(names)


def test_the_estimator_registry_is_the_one_list_of_estimators():
    """Every name the configs accept resolves to an implementation of the kind its entry says, and a
    configuration's default list is the family's registry."""
    import inspect

    from study.estimators import ESTIMATORS

    for family, entries in ESTIMATORS.items():
        base = {"family": family, "d": 3, "snr": 1.0, "N": 8, "lr": 0.1, "steps": 1, "M": [8]}
        assert set(TrialConfig.from_flat(base).estimators) == set(entries)
        for name, entry in entries.items():
            params = [p for p, v in inspect.signature(entry.resolve()).parameters.items() if v.default is inspect.Parameter.empty]
            assert len(params) == {"shared": 1, "eval": 1, "run": 3}[entry.built], (family, name, params)
        other = next(f for f in ESTIMATORS if f != family)
        with pytest.raises(ConfigError) as err:
            TrialConfig.from_flat({**base, "estimators": [next(iter(ESTIMATORS[other]))]})
        assert err.value.field == "estimators"
