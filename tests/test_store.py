import os
from types import SimpleNamespace

import pandas as pd
import pytest

from pipelines import store as store_mod
from pipelines.runner import Summary, _collect, execute_bundle, record_failure
from pipelines.store import Store
from pipelines.sweep import parse_sweep
from study import rng

SWEEP = {
    "name": "unit",
    "family": "gmm",
    "fixed": {"d": 2, "snr": 1.0, "lr": 2.0, "steps": 10, "log_every": 5, "B": 128, "M": [4, "inf"], "n_eval": 32},
    "grid": {"N": [5, 10], "c": [2, 3]},
    "seeds": 2,
    "bundle_size": 4,
}


@pytest.fixture
def sweep():
    return parse_sweep(SWEEP, "unit.yaml")


def test_bundle_rows_round_trip_through_pandas(tmp_path, sweep):
    st = Store(tmp_path)
    bundles = sweep.bundles()
    assert sum(len(b.runs) for b in bundles) == 8
    for b in bundles:
        execute_bundle(b.to_payload(), str(tmp_path), sweep.name, "test", "cpu")
        assert not rng._drawn, "a bundle's kept training blocks outlive it in a reused worker"
    trials = pd.read_parquet(tmp_path / "trials")  # plain pandas, no project code
    assert len(trials) == 8 and trials.run_id.is_unique
    assert set(trials.status) == {"ok"} and set(trials.family) == {"gmm"}
    assert trials.M.iloc[0].tolist() == [4.0, float("inf")]
    evals = pd.read_parquet(tmp_path / "evals")
    assert evals.M.dtype == "float64" and evals.M.max() == float("inf")
    assert set(evals["shift"]) == {"none"}
    assert {"lsa", "bayes", "lsa_limit", "lda_plugin", "lda_pooled", "logreg"} <= set(evals.estimator)
    params = pd.read_parquet(tmp_path / "params")
    w = params[params.name == "W"].iloc[0]
    assert list(w["shape"]) == [2, 2] and len(w["values"]) == 4
    assert st.done_runs() == set(trials.run_id)
    assert sweep.bundles(skip=st.done_runs()) == []


def test_interrupted_write_leaves_no_visible_file(tmp_path, sweep, monkeypatch):
    """A crash between the renames of a bundle leaves nothing that counts, and recover() cleans up."""
    b = sweep.bundles()[0]
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed between two renames
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        execute_bundle(b.to_payload(), str(tmp_path), sweep.name, "test", "cpu")
    monkeypatch.setattr(store_mod.os, "replace", real_replace)

    st = Store(tmp_path)
    assert st.done_runs() == set()  # trials is written last: the bundle did not happen
    visible = [p for p in tmp_path.rglob("*.parquet") if not p.name.startswith(".")]
    assert len(visible) == 1 and visible[0].parts[-3] == "curves"  # one complete, orphaned file
    assert len(pd.read_parquet(tmp_path / "curves")) > 0  # readers skip the temporaries
    removed = st.recover()
    assert removed, "the committed-but-orphaned file and the temporaries are removed"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    # a rerun completes exactly the missing runs
    execute_bundle(b.to_payload(), str(tmp_path), sweep.name, "test", "cpu")
    assert st.done_runs() == {r.run_id for r in b.runs}


def test_failed_runs_are_recorded_then_retried(tmp_path, sweep):
    st = Store(tmp_path)
    b = sweep.bundles()[0]
    record_failure(b, st, sweep.name, "test", "RuntimeError('boom')")
    trials = st.read("trials").to_pandas()
    assert set(trials.status) == {"failed"} and trials.error.str.contains("boom").all()
    assert st.done_runs() == set()  # failed runs are not done
    assert st.forget_failed() == 1
    assert st.read("trials").num_rows == 0


def test_a_trial_that_never_reported_is_found_by_its_directory(tmp_path, sweep):
    """Tune's Result.config is None for a trial whose node died before it reported: its bundle is
    read from the trial directory (named by the bundle id)."""
    bundles = sweep.bundles()
    ok, lost = bundles[0], bundles[1]
    err = RuntimeError("node died")
    results = [
        SimpleNamespace(path=f"{tmp_path}/_tune/x/{ok.bundle_id}", config={"job": {}}, error=None, metrics={"runs": 4, "ok": 4, "rows": 9}),
        SimpleNamespace(path=f"{tmp_path}/_tune/x/{lost.bundle_id}", config=None, error=err, metrics={}),
    ]
    summary = Summary(bundles=2)
    assert _collect(results, summary) == {lost.bundle_id: err}
    assert (summary.ok, summary.rows, summary.failed) == (4, 9, 0)


def test_unwritable_store_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(store_mod.StoreError, match="not writable"):
        Store(blocker / "store").check_writable()


def test_schema_has_every_config_field():
    names = set(store_mod.SCHEMAS["trials"].names)
    cfg = parse_sweep(SWEEP).configs[0]
    assert set(cfg.to_flat()) - {"family"} <= names


def test_every_table_reads_the_same_in_pandas_pyarrow_duckdb_and_polars(tmp_path, sweep):
    """Each table, the fits and the skipped claims included, globbed as `<table>/**/*.parquet`
    with hive partitioning where it has it: the same rows and the partition column `family`, while
    a write is under way (a temporary beside each file, as `write_atomic` leaves it before its rename)."""
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds

    from analysis import fits_table

    for b in sweep.bundles():
        execute_bundle(b.to_payload(), str(tmp_path), sweep.name, "test", "cpu")
    (tmp_path / "fits").mkdir()
    pd.DataFrame({"claim": ["old"], "reason": ["old"]}).to_parquet(tmp_path / "fits" / "_skipped.parquet")  # an earlier fit's layout
    fits = pd.DataFrame([dict(family=f, claim=f"{f}-claim", kind="bound", estimate=-1.0, ci_low=-1.1, ci_high=-0.9, verdict="within", group='{"N": 5}', N=5.0) for f in ("gmm", "mor")])
    fits_table.write_fits(str(tmp_path), fits, [("gmm-1-rate", "no curves")])
    for done in list(tmp_path.glob("*/**/*.parquet")):  # a copy of every file, written under its temporary name
        (done.parent / f".{done.name}.{'0' * 32}.tmp").write_bytes(done.read_bytes())
    for table in ("trials", "curves", "evals", "params", "fits", "fits_skipped"):
        root = tmp_path / table
        hive = table != "fits_skipped"
        n = len(pd.read_parquet(root))
        arrow = ds.dataset(root, format="parquet", partitioning="hive" if hive else None).to_table()
        duck = duckdb.sql(f"select * from read_parquet('{root}/**/*.parquet', hive_partitioning={str(hive).lower()})").df()
        polar = pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=hive).collect()
        assert n > 0 and arrow.num_rows == len(duck) == polar.height == n, table
        if hive:
            assert set(arrow.column("family").to_pylist()) == set(duck["family"]) == set(polar["family"].to_list()) == ({"gmm", "mor"} if table == "fits" else {"gmm"}), table
    assert not (tmp_path / "fits" / "_skipped.parquet").exists()  # the earlier layout is gone


def test_a_fit_deletes_what_a_killed_fit_left_and_keeps_a_running_one(tmp_path):
    """Temporaries of the fits older than `ABANDONED_S` were left by a killed `fit`: the next fit deletes
    them; a fresh one may be another fit's write in progress and stays."""
    import os
    import time

    from analysis import fits_table

    fits = pd.DataFrame([dict(family="gmm", claim="gmm-claim", kind="bound", tolerance=0.0, estimate=-1.0, ci_low=-1.1, ci_high=-0.9, verdict="within")])
    fits_table.write_fits(str(tmp_path), fits, [])
    stale = [tmp_path / "fits" / "family=gmm" / f".fits.parquet.{'1' * 32}.tmp", tmp_path / "fits_skipped" / f".skipped.parquet.{'2' * 32}.tmp"]
    fresh = tmp_path / "fits" / "family=mor" / f".fits.parquet.{'3' * 32}.tmp"
    fresh.parent.mkdir()
    for f in [*stale, fresh]:
        f.write_bytes(b"half a file")
    old = time.time() - fits_table.ABANDONED_S - 60
    for f in stale:
        os.utime(f, (old, old))
    fits_table.write_fits(str(tmp_path), fits, [])
    assert not any(f.exists() for f in stale) and fresh.exists()
    assert fits_table.read_fits(str(tmp_path))[0]["claim"].tolist() == ["gmm-claim"]
