"""The store on S3 (a moto server on 127.0.0.1, configured through the standard AWS variables) and
write faults on any file system: bundles, done runs, recovery, failed records, the lease, a disk
that fills or an upload that fails mid-bundle, bad addresses, and one sweep through Ray."""

import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import yaml
from typer.testing import CliRunner

from pipelines import lease
from pipelines.cli import app
from pipelines.runner import execute_bundle, record_failure
from pipelines.store import SCHEMA_VERSION, Store, StoreError, to_table
from pipelines.sweep import parse_sweep
from tests import configs

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

SWEEP = {
    "name": "remote",
    "family": "gmm",
    "fixed": {"d": 2, "snr": 1.0, "lr": 2.0, "steps": 10, "log_every": 5, "B": 128, "M": [4, "inf"], "n_eval": 32},
    "grid": {"N": [5, 10]},
    "seeds": 2,
    "bundle_size": 2,
}
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


class StrictMotoServer(moto_server.ThreadedMotoServer):
    """moto's server with one more rule of the real S3: an unsigned request to a private bucket is refused.

    (moto alone accepts anonymous requests, so a missing credential would go unnoticed.)
    """

    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)

        def strict(environ, start_response):
            if "HTTP_AUTHORIZATION" not in environ and "X-Amz-Signature" not in environ.get("QUERY_STRING", ""):
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"]
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, strict, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = StrictMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(endpoint, monkeypatch, tmp_path):
    """The standard AWS variables pointing at the moto server (no config files, no instance metadata)."""
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return endpoint


@pytest.fixture
def bucket(aws):
    name = f"icl-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(bucket):
    return f"s3://{bucket}/runs/a"


def keys(bucket: str) -> list[str]:
    """The bucket's objects, less the empty directory markers pyarrow leaves when it deletes a folder's last file."""
    return sorted(k for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", []) if not (k := o["Key"]).endswith("/"))


@pytest.fixture
def sweep():
    return parse_sweep(SWEEP, "remote.yaml")


def test_address_is_normalised_and_tune_follows_the_store(s3, bucket, tmp_path):
    st = Store(s3 + "/")
    assert st.uri == s3 and str(st) == s3 and not st.local
    path, fs = st.tune_storage()
    assert path == f"{bucket}/runs/a/_tune" and isinstance(fs, pafs.S3FileSystem)
    local = Store(tmp_path / "x")
    assert local.uri == str(tmp_path / "x") and local.root == tmp_path / "x" and local.tune_storage() == (str(tmp_path / "x" / "_tune"), None)
    assert Store(f"file://{tmp_path}/x").uri == local.uri
    with pytest.raises(StoreError, match="unknown scheme 'ftp://'.*s3://bucket/prefix"):
        Store("ftp://host/x")
    with pytest.raises(StoreError, match="credentials do not belong"):
        Store("s3://key:secret@bkt/x")


def test_bundles_round_trip_and_rerun_skips_them(s3, bucket, sweep):
    st = Store(s3)
    st.check_writable()
    for b in sweep.bundles():
        execute_bundle(b.to_payload(), s3, sweep.name, "test", "cpu")
    assert st.done_runs() == {r.run_id for r in sweep.runs} and sweep.bundles(skip=st.done_runs()) == []
    assert not [k for k in keys(bucket) if k.endswith(".tmp") or ".probe-" in k]  # straight to the final keys
    # plain pandas with the file system pyarrow resolves from the URI (it reads AWS_ENDPOINT_URL)
    fs, path = pafs.FileSystem.from_uri(s3)
    trials = pd.read_parquet(f"{path}/trials", filesystem=fs)
    assert len(trials) == 4 and set(trials.family) == {"gmm"} and set(trials.status) == {"ok"}
    evals = st.read("evals").to_pandas()
    assert set(evals.run_id) == set(trials.run_id) and evals.M.max() == float("inf")


def test_interrupted_bundle_is_recovered_and_rerun(s3, bucket, sweep, monkeypatch):
    """A run killed between two uploads: complete files without their `trials` file, which recover() removes."""
    b = sweep.bundles()[0]
    real_write, calls = Store._write, []

    def killed_on_third(self, path, table):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed after curves and evals were uploaded
        real_write(self, path, table)

    monkeypatch.setattr(Store, "_write", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        execute_bundle(b.to_payload(), s3, sweep.name, "test", "cpu")
    monkeypatch.setattr(Store, "_write", real_write)
    st = Store(s3)
    assert st.done_runs() == set() and st.read("trials").num_rows == 0
    assert {k.split("/")[2] for k in keys(bucket)} == {"curves", "evals"}
    removed = st.recover()
    assert len(removed) == 2 and keys(bucket) == []
    execute_bundle(b.to_payload(), s3, sweep.name, "test", "cpu")
    assert st.done_runs() == {r.run_id for r in b.runs} and st.recover() == []


def test_failed_runs_are_recorded_then_retried(s3, sweep):
    st = Store(s3)
    record_failure(sweep.bundles()[0], st, sweep.name, "test", "RuntimeError('boom')")
    trials = st.read("trials").to_pandas()
    assert set(trials.status) == {"failed"} and trials.error.str.contains("boom").all()
    assert st.done_runs() == set() and st.forget_failed() == 1 and st.read("trials").num_rows == 0


# ----------------------------------------------------------------------------------------------
# a disk that fills, an upload that fails


class FailingHandler(pafs.FileSystemHandler):
    """Delegates to a real file system; the `fail_at`-th output stream fails with ENOSPC.

    A file system fails mid-file (the bytes before the failure are on disk); an object store fails
    the upload (a failed PUT leaves nothing), so there the bytes are held back until a close that fails.
    """

    def __init__(self, fs: pafs.FileSystem, fail_at: int, object_store: bool):
        self.fs, self.fail_at, self.object_store, self.opened = fs, fail_at, object_store, 0

    def open_output_stream(self, path, metadata):
        self.opened += 1
        if self.opened != self.fail_at:
            return self.fs.open_output_stream(path, metadata=metadata)
        return pa.PythonFile(_Full(None if self.object_store else self.fs.open_output_stream(path)), mode="w")

    def get_type_name(self):
        return "failing-" + self.fs.type_name

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)

    def equals(self, other):
        return self is other


class _Full:
    """A stream that takes 8 bytes and then reports a full device."""

    def __init__(self, real):
        self.real, self.written, self.closed = real, 0, False

    def write(self, data):
        data = bytes(data)
        if self.real is None or self.written + len(data) <= 8:
            self.written += len(data)
            if self.real is not None:
                self.real.write(data)
            return len(data)
        self.real.write(data[: 8 - self.written])
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.real is not None:
            self.real.close()
        else:
            raise OSError(errno.ENOSPC, "upload failed: quota exceeded")

    def flush(self):
        pass


def _bundle_tables(run_ids):
    rows = [dict(run_id=r, config_id="c", bundle_id="b", sweep="s", seed=0, status="ok", schema_version=SCHEMA_VERSION) for r in run_ids]
    return {
        "trials": to_table("trials", rows),
        "curves": to_table("curves", [dict(run_id=r, step=s, train_loss=1.0 / (s + 1)) for r in run_ids for s in range(3)]),
        "evals": to_table("evals", [dict(run_id=r, estimator="lsa", M=4.0, metric="mse", value=0.5) for r in run_ids]),
        "params": to_table("params", [dict(run_id=r, name="W", shape=[1], values=[0.1]) for r in run_ids]),
    }


@pytest.mark.parametrize("fail_at", [2, 4], ids=["evals", "trials"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_write_that_fails_mid_bundle_leaves_nothing_half_written(where, fail_at, request, tmp_path):
    uri = request.getfixturevalue("s3") if where == "s3" else str(tmp_path / "store")
    real = Store(uri)
    handler = FailingHandler(real.fs, fail_at, object_store=where == "s3")
    st = Store(uri, filesystem=pafs.PyFileSystem(handler))
    tables = _bundle_tables(["r1", "r2"])
    with pytest.raises(OSError) as err:
        st.write_bundle("gmm", "b1", tables)
    assert err.value.errno == errno.ENOSPC and handler.opened == fail_at
    assert real.done_runs() == set() and real.read("trials").num_rows == 0  # no trials row
    for table in ("curves", "evals", "params"):  # each table reads whole, or has no file yet
        assert real.read(table).num_rows in (0, tables[table].num_rows)
    if where == "local":  # every table is staged before any is renamed: nothing visible, no temporary left
        assert all(real.read(t).num_rows == 0 for t in ("curves", "evals", "params"))
        assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    real.recover()
    assert all(real.read(t).num_rows == 0 for t in ("curves", "evals", "params"))
    assert real.write_bundle("gmm", "b1", tables) == sum(t.num_rows for t in tables.values())  # the next attempt
    assert real.done_runs() == {"r1", "r2"} and real.recover() == []


# ----------------------------------------------------------------------------------------------
# the lease


@pytest.fixture(params=["conditional", "best-effort"])
def backend(request, monkeypatch):
    """Both S3 lease backends: boto3's conditional writes, and pyarrow's check-write-read-back."""
    if request.param == "best-effort":
        monkeypatch.setattr(lease, "_s3_client", lambda loc: None)
        monkeypatch.setattr(lease, "SETTLE_S", 0.3)
    return request.param


def test_lease_refuses_a_second_holder_then_frees(s3, bucket, backend):
    st = Store(s3)
    kind = lease._Conditional if backend == "conditional" else lease._BestEffort
    assert isinstance(lease.Lease(st.loc).backend, kind)
    with st.lock():
        assert keys(bucket) == ["runs/a/.lock"]
        with pytest.raises(StoreError, match=f"store {s3} is in use by a run on {socket.gethostname()} \\(pid {os.getpid()}\\)"):
            with Store(s3).lock():
                pass
    assert keys(bucket) == []
    with Store(s3).lock():
        pass


def test_server_without_conditional_writes_falls_back_to_best_effort(s3, bucket, monkeypatch):
    from botocore.exceptions import ClientError

    real = lease._s3_client

    class NoConditions:
        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            return getattr(self.client, name)

        def put_object(self, **kwargs):
            if "IfNoneMatch" in kwargs or "IfMatch" in kwargs:
                raise ClientError({"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
            return self.client.put_object(**kwargs)

    monkeypatch.setattr(lease, "_s3_client", lambda loc: NoConditions(real(loc)))
    monkeypatch.setattr(lease, "SETTLE_S", 0.1)
    with Store(s3).lock():
        assert keys(bucket) == ["runs/a/.lock"]
        with pytest.raises(StoreError, match="in use"):
            with Store(s3).lock():
                pass
    assert keys(bucket) == []


def test_racing_runs_get_one_lease(s3, backend):
    barrier, won, refused = threading.Barrier(4), [], []

    def contend():
        barrier.wait()
        try:
            lock = Store(s3).lock()
            lock.__enter__()
            won.append(lock)
        except StoreError:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    won[0].__exit__(None, None, None)


def test_stale_leases_are_taken_over(s3, bucket, monkeypatch):
    """A killed run's lease: at once on this host (its pid is gone), after STALE_S from another host."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s3c = boto3.client("s3")
    s3c.put_object(Bucket=bucket, Key="runs/a/.lock", Body=f"{socket.gethostname()} {dead.pid} 2026-01-01T00:00:00Z t0".encode())
    with Store(s3).lock():
        assert s3c.get_object(Bucket=bucket, Key="runs/a/.lock")["Body"].read().split()[1] == str(os.getpid()).encode()
    s3c.put_object(Bucket=bucket, Key="runs/a/.lock", Body=b"node-7 4242 2026-01-01T00:00:00Z t1")
    with pytest.raises(StoreError, match="in use by a run on node-7 \\(pid 4242\\).*lapses after 300s"):
        with Store(s3).lock():
            pass
    monkeypatch.setattr(lease, "_now", lambda: time.time() + lease.STALE_S + 1)  # five minutes without a heartbeat
    with Store(s3).lock():
        pass
    assert keys(bucket) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_heartbeat_keeps_a_lease_live(where, request, tmp_path, monkeypatch):
    uri = request.getfixturevalue("s3") if where == "s3" else str(tmp_path / "store")
    Store(uri).check_writable()
    stale = 2.5 if where == "s3" else 0.6  # S3's Last-Modified has whole seconds
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(lease, "STALE_S", stale)
    with Store(uri).lock():
        time.sleep(stale + 1)  # past STALE_S: only the renewals keep it live
        with pytest.raises(StoreError, match="in use"):
            with Store(uri).lock():
                pass
    if where == "local":  # the control: without renewals the same lease lapses and is taken over
        monkeypatch.setattr(lease, "HEARTBEAT_S", 3600.0)
        with Store(uri).lock():
            time.sleep(stale + 0.2)
            with Store(uri).lock():
                pass


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_on_a_store_in_use_exits_2(where, request, tmp_path):
    uri = request.getfixturevalue("s3") if where == "s3" else str(tmp_path / "store")
    sweep = tmp_path / "remote.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    with Store(uri).lock():
        result = CliRunner().invoke(app, ["run", str(sweep), "--store", uri])
    assert result.exit_code == 2 and "in use" in result.output and result.output.count("error:") == 1


# ----------------------------------------------------------------------------------------------
# bad addresses: one line, status 2, before anything runs


def _invoke(verb, store, tmp_path):
    sweep = tmp_path / "remote.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    args = [verb, str(sweep)] if verb in ("run", "plan") else [verb]
    return CliRunner().invoke(app, [*args, "--store", store])


VERBS = ["run", "plan", "status", "fit", "report"]


@pytest.mark.parametrize("verb", VERBS)
def test_unknown_scheme_exits_2(verb, tmp_path):
    result = _invoke(verb, "ftp://host/results", tmp_path)
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "unknown scheme 'ftp://'" in result.output and "s3://bucket/prefix" in result.output


@pytest.mark.parametrize("verb", VERBS)
def test_missing_bucket_exits_2(verb, aws, tmp_path):
    result = _invoke(verb, "s3://no-such-bucket/runs", tmp_path)
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "bucket 'no-such-bucket' does not exist" in result.output


@pytest.mark.parametrize("verb", VERBS)
def test_missing_credentials_exit_2(verb, s3, bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    t0 = time.perf_counter()
    result = _invoke(verb, s3, tmp_path)
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "access denied" in result.output and "no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.output
    assert time.perf_counter() - t0 < 10
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert keys(bucket) == []  # nothing was written


# ----------------------------------------------------------------------------------------------
# analysis and the report read the same store


def test_fit_and_report_on_s3(s3, bucket, sweep, tmp_path, monkeypatch):
    from analysis.load import load

    for b in sweep.bundles():
        execute_bundle(b.to_payload(), s3, sweep.name, "test", "cpu")
    loaded = load(s3, filters={"N": 5})
    assert set(loaded["trials"].N) == {5} and not loaded.skipped and set(loaded["evals"].N) == {5}
    runner = CliRunner()
    fit = runner.invoke(app, ["fit", "--store", s3])
    assert fit.exit_code == 0, fit.output
    assert "runs/a/fits_skipped/skipped.parquet" in keys(bucket)
    monkeypatch.chdir(tmp_path)
    report = runner.invoke(app, ["report", "--store", s3])
    assert report.exit_code == 0, report.output
    out = tmp_path / f"report-{bucket}-runs-a"
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in report.output
    assert s3 in (out / "report.md").read_text()


# ----------------------------------------------------------------------------------------------
# end to end through Ray: workers inherit the driver's environment (embedded local Ray)

SMOKE = configs.smoke("smoke-s3")


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_through_ray_into_s3_then_rerun_plan_status_fit(s3, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a new embedded Ray even if /tmp/ray names another machine's cluster
    path = tmp_path / "smoke-s3.yaml"
    path.write_text(yaml.safe_dump(SMOKE))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--store", s3, "--num-cpus", "2"])
    assert result.exit_code == 0, result.output
    assert "8 ok, 0 diverged, 0 failed of 8 runs" in result.output
    stored = keys(bucket)
    assert any(k.startswith("runs/a/_tune/") for k in stored)  # Tune's own state follows the store
    assert "runs/a/.lock" not in stored and not [k for k in stored if k.endswith(".tmp")]
    data = [k for k in stored if not k.startswith("runs/a/_tune/")]
    assert Store(s3).done_runs() == {r.run_id for r in parse_sweep(SMOKE).runs}

    again = runner.invoke(app, ["run", str(path), "--store", s3, "--num-cpus", "2"])
    assert again.exit_code == 0 and "nothing to run" in again.output, again.output
    assert [k for k in keys(bucket) if not k.startswith("runs/a/_tune/")] == data

    plan = runner.invoke(app, ["plan", str(path), "--store", s3])
    assert plan.exit_code == 0 and f"already done    8  (in {s3})" in plan.output, plan.output
    status = runner.invoke(app, ["status", "--store", s3])
    assert status.exit_code == 0 and "smoke-s3" in status.output and "trials 8" in status.output, status.output
    fit = runner.invoke(app, ["fit", "--store", s3])
    assert fit.exit_code == 0, fit.output
