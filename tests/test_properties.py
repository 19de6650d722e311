"""Properties over random inputs (hypothesis): the flat config round trip, and the expansion of
sweeps into configurations, runs, stacks and bundles.

- Every valid flat config, of either family and either model, survives `to_flat` -> `from_flat`
  (and the JSON of Ray's param space) with the same config id; the id does not depend on the order
  of keys, test lengths, estimators or shifts. A config broken in one field raises `ConfigError`
  naming that field.
- A sweep has as many configurations as its grid has points (the union of its parts', shared
  configurations once), seeds times as many runs, each run in exactly one stack and one bundle,
  no stack above its bundle size, and run ids that do not depend on the order of the grid.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache, reduce

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipelines import sweep as sweeps
from study.config import ConfigError, TrialConfig, canonical_json, shape_key
from tests import configs

# derandomized: the same examples on every run (a failure reproduces; CI does not flake)
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@lru_cache
def known_estimators(family: str) -> tuple[str, ...]:
    """The family's estimators: a config's default list (whichever registry it comes from)."""
    return TrialConfig.from_flat(configs.flat(family)).estimators


# ----------------------------------------------------------------------------------------------
# random valid flat configs

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
SHIFTS = {
    "gmm": st.sampled_from(["cov_scale(0.5)", "cov_scale(2)", "cov_rotate(0)", "cov_rotate(7)", "mean_norms(1.5)", "mean_norms(3)", "prior(0.25)", "prior(0.6)"]),
    "mor": st.sampled_from(["covariate_scale(0.5)", "covariate_scale(2)", "noise(0)", "noise(1.25)"]),
}


@st.composite
def gmm_task(draw) -> dict:
    c = draw(st.integers(2, 5))
    task = dict(family="gmm", d=draw(st.integers(1, 8)), c=c, snr=draw(positive), symmetric=c == 2 and draw(st.booleans()))
    return {**task, **draw(covariance())}


@st.composite
def mor_task(draw) -> dict:
    K = draw(st.integers(1, 4))
    components = draw(st.sampled_from(["fresh", "pool"]))
    task = dict(family="mor", d=draw(st.integers(1, 8)), K=K, snr=draw(positive), sigma=draw(st.sampled_from([0.0, 0.25, 1.0])), components=components,
                pool_seed=draw(st.integers(0, 99)), assignment="prompt" if components == "pool" and draw(st.booleans()) else "sample",
                symmetric=K == 2 and draw(st.booleans()))  # fmt: skip
    if draw(st.booleans()):
        w = draw(st.lists(st.integers(0, 5), min_size=K, max_size=K).filter(any))
        task["pi"] = [x / sum(w) for x in w]
    return {**task, **draw(covariance())}


@st.composite
def covariance(draw) -> dict:
    cov = draw(st.sampled_from(["identity", "diag", "rotated"]))
    if cov == "identity":
        return dict(cov=cov)
    return dict(cov=cov, kappa=draw(st.floats(1.0, 50.0)), cov_seed=draw(st.integers(0, 99)))


@st.composite
def lsa_model(draw) -> dict:
    param = draw(st.sampled_from(["reduced", "full"]))
    model = dict(model="lsa", param=param, B=draw(st.integers(1, 5000)))
    if param == "full":
        model.update(init_scale=draw(st.floats(0.0, 2.0)), steps=draw(st.integers(1, 500)))
    else:
        model.update(steps=draw(st.integers(0, 500)))  # 0: the empirical minimiser, reduced only
    return model


@st.composite
def transformer_model(draw) -> dict:
    heads = draw(st.integers(1, 4))
    online = draw(st.booleans())
    return dict(model="transformer", layers=draw(st.integers(1, 4)), heads=heads, width=heads * draw(st.integers(1, 8)), mlp=draw(st.booleans()),
                attention=draw(st.sampled_from(["softmax", "linear", "relu"])), positions=draw(st.sampled_from(["none", "learned"])),
                norm=draw(st.booleans()), online=online, B=None if online else draw(st.integers(1, 5000)), batch=draw(st.integers(1, 256)),
                warmup=draw(st.integers(0, 100)), clip=draw(st.floats(0.0, 5.0)), weight_decay=draw(st.floats(0.0, 0.1)), steps=draw(st.integers(1, 500)))  # fmt: skip


@st.composite
def flat_configs(draw, family: str | None = None, model: str | None = None) -> dict:
    family = family or draw(st.sampled_from(["gmm", "mor"]))
    model = model or draw(st.sampled_from(["lsa", "transformer"]))
    flat = draw(gmm_task() if family == "gmm" else mor_task())
    flat.update(draw(lsa_model() if model == "lsa" else transformer_model()))
    lengths = draw(st.lists(st.integers(1, 512), min_size=0, max_size=4))
    inf = draw(st.sampled_from([[], ["inf"], [math.inf], [".inf"]]))
    flat.update(N=draw(st.integers(1, 400)), lr=draw(positive), log_every=draw(st.integers(1, 50)), dtype=draw(st.sampled_from(["float64", "float32"])),
                M=lengths + inf or [16], n_eval=draw(st.integers(1, 4096)))  # fmt: skip
    if draw(st.booleans()):
        flat["estimators"] = draw(st.lists(st.sampled_from(known_estimators(family)), unique=True))
    if draw(st.booleans()):
        flat["shifts"] = draw(st.lists(SHIFTS[family], unique=True, max_size=3))
    if family == "mor" and draw(st.booleans()):
        flat.update(em_iters=draw(st.integers(1, 100)), em_restarts=draw(st.integers(1, 8)), em_tol=draw(st.floats(0.0, 1e-3)),
                    em_sigma=draw(st.sampled_from(["known", "estimated"])), gem_steps=draw(st.integers(1, 5)))  # fmt: skip
    return flat


# ----------------------------------------------------------------------------------------------
# the flat config round trip


@SETTINGS
@given(flat=flat_configs())
def test_a_valid_flat_config_round_trips_with_its_id(flat):
    cfg = TrialConfig.from_flat(flat)
    again = TrialConfig.from_flat(cfg.to_flat())
    assert again == cfg and again.config_id == cfg.config_id and again.to_flat() == cfg.to_flat()
    via_json = TrialConfig.from_flat(json.loads(canonical_json(cfg.to_flat())))  # Ray's param space, a Parquet row: inf spelled "inf"
    assert via_json == cfg and via_json.config_id == cfg.config_id
    assert cfg.run_id(0) == again.run_id(0) != cfg.run_id(1)


@SETTINGS
@given(flat=flat_configs(), data=st.data())
def test_the_id_ignores_the_order_of_keys_lengths_estimators_and_shifts(flat, data):
    cfg = TrialConfig.from_flat(flat)
    keys = data.draw(st.permutations(list(flat)))
    shuffled = {k: flat[k] for k in keys}
    for field in ("M", "estimators", "shifts"):
        if shuffled.get(field):
            shuffled[field] = data.draw(st.permutations(shuffled[field]))
    if flat["M"]:
        shuffled["M"] = shuffled["M"] + [shuffled["M"][0]]  # a repeat changes nothing either
    assert TrialConfig.from_flat(shuffled).config_id == cfg.config_id


# one field broken at a time: (the change, the field the error must name); each applies where it says
BREAKS = [
    ("any", lambda f: {**f, "d": 0}, "d"),
    ("any", lambda f: {**f, "snr": 0.0}, "snr"),
    ("any", lambda f: {**f, "N": 0}, "N"),
    ("any", lambda f: {**f, "lr": -1.0}, "lr"),
    ("any", lambda f: {**f, "M": [16, 2.5]}, "M"),
    ("any", lambda f: {**f, "M": []}, "M"),
    ("any", lambda f: {**f, "n_eval": 0}, "n_eval"),
    ("any", lambda f: {**f, "estimators": ["nope"]}, "estimators"),
    ("any", lambda f: {**f, "typo": 1}, "typo"),
    ("any", lambda f: {**f, "cov": "identity", "kappa": 2.0, "cov_seed": 0}, "kappa"),
    ("gmm", lambda f: {**f, "c": 3, "symmetric": True}, "symmetric"),
    ("gmm", lambda f: {**f, "c": 1, "symmetric": False}, "c"),
    ("gmm", lambda f: {**f, "shifts": ["noise(1)"]}, "shifts"),  # a mor shift on gmm
    ("gmm", lambda f: {**f, "em_iters": 3}, "em_iters"),  # EM's budget is mor's
    ("gmm", lambda f: {**f, "estimators": [known_estimators("mor")[0]]}, "estimators"),
    ("mor", lambda f: {**f, "shifts": ["cov_scale(2)"]}, "shifts"),  # a gmm shift on mor
    ("mor", lambda f: {**f, "K": 0, "pi": None}, "K"),
    ("mor", lambda f: {**f, "K": 3, "pi": [0.5, 0.5], "symmetric": False}, "pi"),
    ("mor", lambda f: {**f, "components": "fresh", "assignment": "prompt"}, "assignment"),
    ("mor", lambda f: {**f, "estimators": [known_estimators("gmm")[0]]}, "estimators"),
    ("lsa", lambda f: {**f, "heads": 2}, "heads"),  # a transformer field on the LSA
    ("lsa", lambda f: {**f, "param": "reduced", "init_scale": 0.5}, "init_scale"),
    ("lsa", lambda f: {**f, "param": "full", "init_scale": 0.0, "steps": 0}, "steps"),
    ("lsa", lambda f: {**f, "B": None}, "B"),
    ("transformer", lambda f: {**f, "heads": 3, "width": 3 * 5 + 1}, "heads"),  # width % heads != 0
    ("transformer", lambda f: {**f, "layers": 0}, "layers"),
    ("transformer", lambda f: {**f, "param": "full"}, "param"),  # an LSA field on the transformer
    ("transformer", lambda f: {**f, "steps": 0}, "steps"),
    ("transformer", lambda f: {**f, "online": True, "B": 64}, "B"),
    ("transformer", lambda f: {**f, "online": False, "B": None}, "B"),
]


@pytest.mark.parametrize("where, broken, field", BREAKS, ids=[f"{w}-{f}-{i}" for i, (w, _, f) in enumerate(BREAKS)])
@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_a_config_broken_in_one_field_names_it(where, broken, field, data):
    family = where if where in ("gmm", "mor") else None
    model = where if where in ("lsa", "transformer") else None
    flat = broken(data.draw(flat_configs(family, model)))
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat(flat)
    assert err.value.field == field, err.value
    assert f"'{field}'" in str(err.value)


def test_a_shift_value_survives_the_round_trip():
    """A shift's canonical spelling keeps its value exactly (it once kept 6 significant digits, so
    prior(0.9999999) became the invalid prior(1) and cov_rotate(1234567) the seed 1234570)."""
    for spec in ("prior(0.9999999)", "cov_rotate(1234567)"):
        cfg = TrialConfig.from_flat(configs.gmm(shifts=[spec]))
        assert TrialConfig.from_flat(cfg.to_flat()) == cfg
        assert cfg.eval.shifts == (spec,)


# ----------------------------------------------------------------------------------------------
# sweep expansion

# grid values per field, distinct configurations for distinct values (lists are values too: M)
POOLS = {
    "gmm": {"d": [1, 2, 3, 4], "c": [2, 3, 4], "snr": [0.5, 1.0, 2.0], "N": [5, 10, 20, 40], "B": [64, 128, 256], "lr": [0.1, 0.5, 1.0], "M": [[8], [8, "inf"], [4, 16]]},
    "mor": {"d": [1, 2, 3], "K": [1, 2, 3], "snr": [1.0, 2.0], "sigma": [0.0, 0.5, 1.0], "N": [5, 10, 20], "B": [64, 256], "lr": [0.1, 0.2]},
}


@st.composite
def parts(draw, family: str, keys: list[str]) -> dict:
    """One part: a grid over `keys` (values from POOLS), the canonical config's other fields fixed."""
    grid = {k: draw(st.lists(st.sampled_from(POOLS[family][k]), min_size=1, max_size=3, unique_by=repr)) for k in keys}
    fixed = {k: v for k, v in configs.flat(family, n_eval=16, steps=5).items() if k not in grid and k != "family"}
    part = {"family": family, "fixed": fixed, "grid": grid}
    if draw(st.booleans()):
        part["bundle_size"] = draw(st.integers(1, 6))
    return part


@st.composite
def sweep_docs(draw) -> dict:
    """A sweep of one part (family/fixed/grid at the top) or of several: gmm parts over the same grid
    fields, so that they share configurations where their grids overlap, and maybe a mor part."""
    seeds = draw(st.one_of(st.integers(1, 3), st.lists(st.integers(0, 50), min_size=1, max_size=3)))
    doc = {"name": "prop", "seeds": seeds, "bundle_size": draw(st.integers(1, 8))}
    grid_keys = lambda family, most: st.lists(st.sampled_from(sorted(POOLS[family])), min_size=1, max_size=most, unique=True)  # noqa: E731
    if draw(st.booleans()):  # one part, at the top
        family = draw(st.sampled_from(["gmm", "mor"]))
        part = draw(parts(family, draw(grid_keys(family, 3))))
        part.pop("bundle_size", None)
        return {**doc, **part}
    ps = draw(st.lists(parts("gmm", draw(grid_keys("gmm", 3))), min_size=2, max_size=3))
    if draw(st.booleans()):
        ps.append(draw(parts("mor", draw(grid_keys("mor", 2)))))
    return {**doc, "parts": ps}


def points(part: dict) -> list[tuple]:
    """The part's configurations as hashable merged dicts, by the product of its grid (not by config id)."""
    grid = part["grid"]
    combos = [{}]
    for k, values in grid.items():
        combos = [{**c, k: v} for c in combos for v in values]
    hashable = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    return [tuple(sorted((k, hashable(v)) for k, v in {"family": part["family"], **part["fixed"], **c}.items())) for c in combos]


@SETTINGS
@given(doc=sweep_docs(), trial_s=st.sampled_from([0.0, 1e-4, 1.0, 1e9]), min_trials=st.integers(1, 40))
def test_sweep_expansion_counts_and_packing(doc, trial_s, min_trials):
    sw = sweeps.parse_sweep(doc)
    ps = doc.get("parts") or [{k: doc[k] for k in ("family", "fixed", "grid")}]
    if len(ps) == 1:
        assert len(sw.configs) == reduce(lambda a, v: a * len(v), ps[0]["grid"].values(), 1)
    assert len(sw.configs) == len({p for part in ps for p in points(part)})  # the union: shared configurations once
    seeds = doc["seeds"] if isinstance(doc["seeds"], int) else len(set(doc["seeds"]))
    assert len(sw.runs) == len(sw.configs) * seeds
    ids = [r.run_id for r in sw.runs]
    assert len(set(ids)) == len(ids)

    stacks = sw.stacks()
    in_stacks = [r.run_id for s in stacks for r in s]
    assert sorted(in_stacks) == sorted(ids)  # every run in exactly one stack
    size = {}  # a configuration's bundle size: that of the first part that has it, else the sweep's
    for part in ps:
        for p in points(part):
            size.setdefault(TrialConfig.from_flat(dict(p)).config_id, part.get("bundle_size", doc["bundle_size"]))
    for s in stacks:
        assert len({shape_key(r.config) for r in s}) == 1
        assert len(s) <= min(size[r.config.config_id] for r in s)

    bundles = sw.bundles(trial_s=trial_s, min_trials=min_trials)
    in_bundles = [r.run_id for b in bundles for r in b.runs]
    assert sorted(in_bundles) == sorted(ids)  # every run in exactly one bundle
    where = {r.run_id: i for i, b in enumerate(bundles) for r in b.runs}
    assert all(len({where[r.run_id] for r in s}) == 1 for s in stacks)  # a stack is never split
    assert len(bundles) >= min(min_trials, len(sw.units(trial_s=trial_s)))


@SETTINGS
@given(doc=sweep_docs(), data=st.data())
def test_run_ids_do_not_depend_on_the_order_of_the_grid(doc, data):
    def reorder(part: dict) -> dict:
        keys = data.draw(st.permutations(list(part["grid"])))
        grid = {k: data.draw(st.permutations(part["grid"][k])) for k in keys}
        fixed = {k: part["fixed"][k] for k in data.draw(st.permutations(list(part["fixed"])))}
        return {**part, "grid": grid, "fixed": fixed}

    other = {**doc, "parts": [reorder(p) for p in doc["parts"]]} if "parts" in doc else {**doc, **reorder(doc)}
    a, b = sweeps.parse_sweep(doc), sweeps.parse_sweep(other)
    assert {r.run_id for r in a.runs} == {r.run_id for r in b.runs}
    assert len(a.runs) == len(b.runs)
    assert [r.run_id for r in sweeps.parse_sweep(doc).runs] == [r.run_id for r in a.runs]  # and the same order from the same file
