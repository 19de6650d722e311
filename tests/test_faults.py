"""Faults through Ray: a node lost mid-sweep, the driver killed ten times, a write that fails.

Each ends the same way: the store holds every run exactly once, every table agrees with `trials`,
and nothing half-written is visible.
"""

import errno
import random
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipelines import sweep as sweeps
from pipelines.cli import app
from pipelines.store import Store
from tests.processes import kill_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # each a minute or more (the two shortest: 61 and 100 s on 2 shared cores)

BASE = {"d": 2, "lr": 0.5, "log_every": 10, "B": 256, "M": [8, "inf"], "n_eval": 64, "estimators": ["bayes", "lda_plugin"]}


def _doc(name, steps, grid, bundle_size=2):
    return {"name": name, "family": "gmm", "fixed": {**BASE, "steps": steps}, "grid": grid, "seeds": 2, "bundle_size": bundle_size}


def assert_exactly_once(store, runs):
    trials = pd.read_parquet(store / "trials")
    assert len(trials) == runs and trials.run_id.is_unique, "a run is missing or stored twice"
    assert set(trials.status) == {"ok"}
    steps = trials.set_index("run_id").steps_done // BASE["log_every"] + 1
    curves = pd.read_parquet(store / "curves")
    assert set(curves.run_id) == set(trials.run_id)
    sizes = curves.groupby("run_id").size()
    assert (sizes == steps.reindex(sizes.index)).all(), "a curve was stored twice"
    for table in ("evals", "params"):
        assert set(pd.read_parquet(store / table).run_id) == set(trials.run_id)
    assert not list(store.rglob(".*.tmp")), "a temporary was left visible"
    assert not list(store.glob("trials/*/failed-*")), "a failure record was left"


def test_a_sweep_leaves_no_temporary_of_an_attempt_that_died(tmp_path):
    """A trial whose node is lost mid-write leaves its staged files; its retry commits the bundle
    afresh. The run's end clears what such an attempt left (the node-loss test above met it when
    the node went while a bundle was staged). Here the dead attempt's temporary is put in place
    first, deterministically."""
    from pipelines.runner import run_sweep

    store = Store(tmp_path / "store")
    sw = sweeps.parse_sweep(_doc("stale", 20, {"c": [2], "N": [5, 10], "snr": [1.0]}))
    bundles = sw.bundles(trial_s=0)
    stale = tmp_path / "store" / "curves" / "family=gmm" / f".part-{bundles[0].bundle_id}.parquet.{'0' * 32}.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    summary = run_sweep(sw, store, bundles, num_cpus=2)
    assert summary.failed == 0 and summary.ok == len(sw.runs)
    assert_exactly_once(store.root, len(sw.runs))


def test_ten_driver_kills_then_a_rerun_store_every_run_once(tmp_path):
    """Three kills at random moments of the start (import, Ray's start, the first trials), seven
    just after a bundle commits (mid-write of the next ones): moments tied to events, not to this
    machine's speed."""
    doc = _doc("killed-ten", 1500, {"c": [2, 3], "N": [5, 10, 20, 40], "snr": [1.0, 2.0]}, bundle_size=1)
    path, store = tmp_path / "sweep.yaml", tmp_path / "store"
    path.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-c", "from pipelines.cli import app; app()", "run", str(path), "--store", str(store), "--num-cpus", "2", "--trial-seconds", "0"]
    rng = random.Random(9)
    moments = ["start"] * 3 + ["after a commit"] * 7
    rng.shuffle(moments)
    done = []
    for moment in moments:
        before = len(list(store.glob("trials/*/part-*.parquet")))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if moment == "start":
            time.sleep(rng.uniform(0.5, 8.0))
        else:
            deadline = time.time() + 120
            while time.time() < deadline and len(list(store.glob("trials/*/part-*.parquet"))) <= before:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.3))
        kill_session(proc)  # the driver, Ray and every worker at once
        done.append(len(Store(store).done_runs()) if store.exists() else 0)
    assert 0 < done[-1] < 32, f"kills should land mid-sweep; runs done after each: {done}"

    result = CliRunner().invoke(app, ["run", str(path), "--store", str(store), "--num-cpus", "2"])
    assert result.exit_code == 0, result.output
    assert f"{done[-1]} already in" in result.output
    assert_exactly_once(store, 32)


def test_a_write_that_fails_mid_bundle_is_retried_and_leaves_nothing_half_written(tmp_path):
    """The second Parquet write of the first attempt of every bundle raises ENOSPC (a full disk)."""
    from pipelines.runner import execute_bundle, run_sweep

    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def full_disk_once(payload, store, sweep, code, device):
        import pyarrow.parquet as pq

        bundle = sweeps.Bundle.from_payload(payload)
        mark = attempts / bundle.bundle_id
        first = not mark.exists()
        mark.write_text(mark.read_text() + "x" if mark.exists() else "x")
        real, calls = pq.write_table, []

        def write_table(*args, **kwargs):
            calls.append(1)
            if first and len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        pq.write_table = write_table
        try:
            return execute_bundle(payload, store, sweep, code, device)
        finally:
            pq.write_table = real

    sw = sweeps.parse_sweep(_doc("full-disk", 20, {"c": [2, 3], "N": [5, 20], "snr": [1.5]}))
    store = Store(tmp_path / "store")
    bundles = sw.bundles(trial_s=0)
    summary = run_sweep(sw, store, bundles, num_cpus=2, execute=full_disk_once)
    assert summary.failed == 0 and summary.ok == 8, summary
    assert sorted(p.read_text() for p in attempts.iterdir()) == ["xx"] * len(bundles), "each bundle: one failed attempt, one retry"
    store.recover()  # what the next `run` does first: the failed attempts' temporaries go
    assert_exactly_once(store.root, 8)


def test_a_worker_lost_past_its_retries_gets_one_more_round_and_an_error_does_not(tmp_path):
    """One bundle's worker process dies on its first three attempts (Tune's retries used up), another
    bundle raises every time: the first is run once more and stored, the second recorded as failed."""
    from pipelines.runner import execute_bundle, run_sweep

    sw = sweeps.parse_sweep(_doc("lost-worker", 20, {"c": [2, 3], "N": [5, 20], "snr": [1.5]}))
    bundles = sw.bundles(trial_s=0)
    dies, raises = bundles[0].bundle_id, bundles[1].bundle_id
    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def flaky(payload, store, sweep, code, device):
        import os

        bundle_id = sweeps.Bundle.from_payload(payload).bundle_id
        mark = attempts / bundle_id
        mark.write_text((mark.read_text() if mark.exists() else "") + "x")
        if bundle_id == dies and len(mark.read_text()) <= 3:
            os._exit(1)  # the worker process is lost, as with its node
        if bundle_id == raises:
            raise RuntimeError("a bug in the trial")
        return execute_bundle(payload, store, sweep, code, device)

    store = Store(tmp_path / "store")
    summary = run_sweep(sw, store, bundles, num_cpus=2, execute=flaky)
    assert (attempts / dies).read_text() == "xxxx" and (attempts / raises).read_text() == "xxx"
    assert summary.failed == len(bundles[1].runs) and summary.ok == 8 - summary.failed, summary
    trials = pd.read_parquet(store.root / "trials")
    assert set(trials[trials.status == "failed"].run_id) == {r.run_id for r in bundles[1].runs}
    assert set(trials[trials.status == "ok"].run_id) == {r.run_id for b in bundles if b.bundle_id != raises for r in b.runs}


def test_a_node_lost_mid_sweep_costs_retries_not_runs(tmp_path):
    """A three-node cluster (ray.cluster_utils) loses a worker node while trials run on it."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.runner import run_sweep

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    store = Store(tmp_path / "store")
    sw = sweeps.parse_sweep(_doc("node-loss", 200, {"c": [2, 3], "N": [5, 10, 20, 40], "snr": [1.0, 2.0]}))
    bundles = sw.bundles(trial_s=0)

    def remove_when_committed():
        deadline = time.time() + 120
        while time.time() < deadline and not list(store.root.glob("trials/*/part-*.parquet")):
            time.sleep(0.2)
        cluster.remove_node(workers[0])  # its running trial dies with it

    killer = threading.Thread(target=remove_when_committed)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        killer.start()
        summary = run_sweep(sw, store, bundles)
        killer.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.failed == 0 and summary.ok == 32, summary
    assert_exactly_once(store.root, 32)
