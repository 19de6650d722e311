"""The store loader and the claims registry (analysis reads Parquet only)."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis import claims
from analysis.load import SCHEMA_VERSION, StoreReadError, load
from pipelines import store as store_mod
from pipelines.runner import execute_bundle
from pipelines.sweep import parse


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    sweep = parse(
        {
            "name": "a",
            "seeds": 2,
            "parts": [
                {"family": "gmm", "fixed": {"d": 2, "snr": 1.0, "lr": 2.0, "steps": 10, "B": 128, "M": [4, "inf"], "n_eval": 32}, "grid": {"N": [5, 10]}},
                {"family": "mor", "fixed": {"d": 2, "snr": 2.0, "sigma": 0.5, "lr": 0.1, "steps": 5, "B": 64, "M": [4], "n_eval": 16, "em_iters": 3}, "grid": {"N": [5]}},
            ],
        }
    )
    for b in sweep.bundles():
        execute_bundle(b.to_payload(), str(root), "a", "test", "cpu")
    return root


def test_schema_versions_agree():
    assert SCHEMA_VERSION == store_mod.SCHEMA_VERSION


def test_load_joins_runs_and_pushes_filters_down(store):
    all_ = load(store)
    assert len(all_["trials"]) == 6 and set(all_["trials"].family) == {"gmm", "mor"}
    ev = all_["evals"]
    assert {"d", "snr", "N", "seed", "status"} <= set(ev.columns) and ev["M"].dtype == float  # evals.M, not trials.M
    gmm = load(store, filters={"family": "gmm", "N": 5})
    assert set(gmm["trials"].N) == {5} and set(gmm["evals"].family) == {"gmm"} and set(gmm["curves"].N) == {5}


def test_corrupt_file_is_skipped_by_name(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    bad = next((copy / "evals").glob("family=gmm/part-*.parquet"))
    bad.write_bytes(b"not parquet")
    out = load(copy)
    assert len(out.skipped) == 1 and str(bad) in out.skipped[0]
    assert len(out["evals"]) < len(load(store)["evals"])


def test_missing_empty_or_foreign_stores_are_errors(store, tmp_path):
    with pytest.raises(StoreReadError, match="not a store"):
        load(tmp_path / "nothing")
    (tmp_path / "empty" / "trials").mkdir(parents=True)
    with pytest.raises(StoreReadError, match="no readable runs"):
        load(tmp_path / "empty")
    import pyarrow.parquet as pq

    src = next((store / "trials").glob("family=gmm/part-*.parquet"))
    table = pq.read_table(src)
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("schema_version"), "schema_version", pa.array([99] * table.num_rows, pa.int64()))
    (tmp_path / "old" / "trials" / "family=gmm").mkdir(parents=True)
    pq.write_table(table, tmp_path / "old" / "trials" / "family=gmm" / src.name)
    with pytest.raises(StoreReadError, match="schema version"):
        load(tmp_path / "old")


def _synthetic(b, status="ok"):
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(6):
        for N in (50, 100, 200, 400, 800):
            rows.append(dict(family="gmm", run_id=f"{seed}-{N}", seed=seed, N=N, d=2, c=2, snr=1.0, cov="identity", kappa=1.0, symmetric=False, B=100, param="reduced", status=status, opt_converged=True, opt_dist_theory=3 * N**b * np.exp(0.05 * rng.standard_normal())))
    return pd.DataFrame(rows)


def test_claims_fit_known_exponents_and_say_what_they_skip():
    trials = pd.concat([_synthetic(-1.0), _synthetic(-1.0, status="diverged").assign(seed=lambda d: d.seed + 10)])
    rows, skipped = claims.evaluate({"trials": trials, "evals": pd.DataFrame()})
    (row,) = rows.to_dict("records")
    assert row["claim"] == "gmm-2-optimum-vs-N" and row["verdict"] == "consistent" and row["theory"] == -1.0
    assert row["excluded"] == 30 and row["n_points"] == 5 and row["window"] == "50..800"
    assert json.loads(row["group"])["d"] == 2
    names = {name for name, _ in skipped}
    assert {"gmm-3-error-vs-N", "mor-1-em-vs-M-high-snr"} <= names  # no evals: said, not faked
    shallow, _ = claims.evaluate({"trials": _synthetic(-0.5), "evals": pd.DataFrame()})
    assert shallow.verdict.tolist() == ["shallower"]


def test_claims_run_on_a_real_store(store):
    rows, skipped = claims.evaluate(load(store).tables)
    assert isinstance(rows, pd.DataFrame) and skipped  # a tiny store: mostly too few points, each said why
    assert all(reason for _, reason in skipped)


def test_fit_verb_writes_the_fits_table(store, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from pipelines.cli import app

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    trials = pd.read_parquet(copy / "trials")
    extra = _synthetic(-1.0).assign(family=None)  # enough points for one real fit, in its own file
    extra = extra.reindex(columns=[c for c in trials.columns if c != "family"]).assign(
        run_id=lambda d: "syn-" + d.index.astype(str), status="ok", schema_version=SCHEMA_VERSION, opt_converged=True, opt_dist_theory=_synthetic(-1.0).opt_dist_theory
    )
    extra.to_parquet(copy / "trials" / "family=gmm" / "part-synthetic.parquet", index=False, schema=None)
    result = CliRunner().invoke(app, ["fit", "--store", str(copy)])
    assert result.exit_code == 0, result.output
    fits_table = pd.read_parquet(copy / "fits")
    assert {"claim", "estimate", "ci_low", "ci_high", "theory", "verdict", "window", "n_points", "method", "group", "family"} <= set(fits_table.columns)
    assert "skipped" in result.output
    assert CliRunner().invoke(app, ["fit", "--store", str(tmp_path / "none")]).exit_code == 2
