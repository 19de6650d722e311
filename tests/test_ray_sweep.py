"""End to end through Ray Tune: a smoke sweep into a temporary store, a rerun that adds nothing,
and a run killed with SIGKILL mid-way whose rerun completes exactly the missing runs."""

import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.store import SCHEMA_VERSION
from study import fused
from tests import configs
from tests.processes import kill_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # whole sweeps through Ray: 30 to 60 s each on 2 shared cores, by load

SMOKE = configs.smoke("smoke", param=["reduced", "full"])


def _sweep(tmp_path, doc):
    path = tmp_path / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


MOR_PART = configs.part({"N": [5, 20]}, "mor", M=[4, "inf"], em_iters=5)


TRANSFORMER_PART = {
    "family": "gmm",
    "fixed": {"d": 2, "c": 2, "snr": 1.5, "model": "transformer", "layers": 1, "width": 8, "heads": 2, "N": 8, "B": None, "lr": 1e-3, "steps": 10, "log_every": 5,
              "M": [8, 16, "inf"], "n_eval": 64, "dtype": "float32", "estimators": ["bayes"]},
}


def test_smoke_sweep_then_rerun_adds_nothing(tmp_path):
    doc = {"name": "smoke", "seeds": 2, "bundle_size": 4, "parts": [{k: SMOKE[k] for k in ("family", "fixed", "grid")}, MOR_PART, TRANSFORMER_PART]}
    path, store = _sweep(tmp_path, doc), tmp_path / "store"
    result = CliRunner().invoke(app, ["run", str(path), "--store", str(store), "--num-cpus", "2", "--chunk-trials", "2", "--trial-seconds", "0"])
    assert result.exit_code == 0, result.output
    assert "22 ok, 0 diverged, 0 failed of 22 runs" in result.output
    assert "[6/6 bundles] 22/22 runs, 0 failed, ETA 0s" in result.output  # progress across 3 chunks of Tuner runs
    assert len(list((store / "_tune").iterdir())) == 3
    trials = pd.read_parquet(store / "trials")
    assert len(trials) == 22 and trials.run_id.is_unique and set(trials.status) == {"ok"}
    assert set(trials.device) == {"cpu+fused" if fused.library() else "cpu"} and (trials.schema_version == SCHEMA_VERSION).all()
    assert trials.groupby("family", observed=True).size().to_dict() == {"gmm": 18, "mor": 4}
    tf = trials[trials.model == "transformer"]
    assert len(tf) == 2 and (tf.layers == 1).all() and tf.param.isna().all() and tf.opt_loss.isna().all() and trials[trials.model == "lsa"].layers.isna().all()
    evals = pd.read_parquet(store / "evals")
    assert set(evals[evals.run_id.isin(tf.run_id) & (evals.estimator == "transformer")].M) == {8.0, 16.0}
    assert set(evals.run_id) == set(trials.run_id)
    assert {"mse", "excess_mse", "param_error", "tv_error"} <= set(evals.metric)
    assert set(pd.read_parquet(store / "params").name) == {"W", "W_opt", "W_PV", "W_KQ", "W_PV_opt", "W_KQ_opt", "Gamma", "Gamma_opt"}
    files = sorted(p.name for p in store.rglob("*.parquet") if "_tune" not in p.parts)

    again = CliRunner().invoke(app, ["run", str(path), "--store", str(store)])
    assert again.exit_code == 0 and "nothing to run" in again.output
    assert sorted(p.name for p in store.rglob("*.parquet") if "_tune" not in p.parts) == files

    status = CliRunner().invoke(app, ["status", "--store", str(store)])
    assert status.exit_code == 0 and "smoke" in status.output and "trials 22" in status.output


def test_killed_run_resumes_exactly_the_missing_runs(tmp_path):
    doc = {**SMOKE, "name": "killed", "grid": {"c": [2, 3], "N": [5, 10, 20, 40], "snr": [1.0, 2.0]}, "bundle_size": 2}
    doc["fixed"] = {**{k: v for k, v in SMOKE["fixed"].items() if k != "snr"}, "steps": 300}
    path, store = _sweep(tmp_path, doc), tmp_path / "store"
    cmd = [sys.executable, "-c", "from pipelines.cli import app; app()", "run", str(path), "--store", str(store), "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(store.glob("trials/*/part-*.parquet")):
            time.sleep(0.2)
        assert list(store.glob("trials/*/part-*.parquet")), "no bundle finished in time"
    finally:
        kill_session(proc)  # the driver, Ray and every worker at once
    done_before = set(pd.read_parquet(store / "trials").run_id)
    assert 0 < len(done_before) < 32

    result = CliRunner().invoke(app, ["run", str(path), "--store", str(store), "--num-cpus", "2"])
    assert result.exit_code == 0, result.output
    assert f"{len(done_before)} already in" in result.output
    trials = pd.read_parquet(store / "trials")
    assert len(trials) == 32 and trials.run_id.is_unique  # every run once, none twice
    for table in ("curves", "evals", "params"):
        rows = pd.read_parquet(store / table)
        assert set(rows.run_id) == set(trials.run_id)
    assert not [p for p in store.rglob(".*.tmp")]
