"""The Ray adapter: one Ray Tune trial per bundle, each writing its own files to the store.

`execute_bundle` is the whole job of a trial and needs no Ray (tests call it directly);
`pipelines.trainable.BundleTrial` wraps it for Tune on reused workers; `run_sweep` launches the
bundles in chunks of Tuner runs, shows progress and summarises. Tune only schedules:
trials report a few scalars, the data goes to Parquet. On a multi-node cluster the store must be
one every node sees: a shared path (NFS) or an object store (`s3://`, `gs://`).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pipelines.progress import Progress
from pipelines.store import SCHEMA_VERSION, Store, to_table
from pipelines.sweep import Bundle, Sweep

# Tune settings for many small trials (see the README): set before Ray is imported
TUNE_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_GLOBAL_CHECKPOINT_S": "120",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "TUNE_RESULT_BUFFER_LENGTH": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
}
CHUNK_TRIALS = 1000  # trials per Tuner.fit(): Tune's driver keeps every finished trial of a fit


def code_version() -> str:
    """The package version and, in a git checkout, the commit (with '+dirty' for local changes)."""
    from importlib.metadata import version

    v = version("icl-study")
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
            v += f"+g{sha.stdout.strip()}" + (".dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


class LaunchError(RuntimeError):
    """Bad input found when the sweep is launched: no cluster at the address, no GPU to size for."""


ADDRESS_TIMEOUT_S = 10.0


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> str:
    """The host:port of a running Ray cluster at `address` ('auto' finds the local one), or LaunchError.

    Ray's own connect retries for a minute or more against an address that does not answer; this
    asks the cluster's GCS port for a TCP connection and gives up after `timeout` seconds.
    """
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    target = address.removeprefix("ray://")
    try:
        hostport = canonicalize_bootstrap_address(target)
    except (ConnectionError, ValueError) as err:
        raise LaunchError(f"--address {address}: {err}") from None
    if hostport is None:
        raise LaunchError(f"--address {address}: no running Ray cluster found (start one with `ray start --head` or `ray up`)")
    host, _, port = hostport.rpartition(":")
    where = f"{hostport}" if hostport.startswith(target.split(":")[0]) else f"{hostport} ({target})"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise LaunchError(f"--address {address}: no Ray cluster answers at {where} within {timeout:.0f} s ({err.strerror or err})") from None
    failure: list[BaseException] = []

    def ask_gcs() -> None:  # something answers on the port: is it a Ray GCS?
        try:
            import ray._raylet

            ray._raylet.GcsClient(address=hostport)
        except BaseException as err:  # noqa: BLE001 - reported below
            failure.append(err)

    probe = threading.Thread(target=ask_gcs, daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.is_alive() or failure:
        why = f"{type(failure[0]).__name__}: {str(failure[0]).splitlines()[0][:200]}" if failure else "no answer"
        raise LaunchError(f"--address {address}: no Ray cluster answers at {where} within {timeout:.0f} s ({why})")
    return hostport


def gpu_memory(option: str = "auto", timeout: float = 120.0) -> int:
    """The memory of one of the cluster's GPUs, asked of the GPU itself by a one-GPU Ray task."""
    import ray

    if not ray.cluster_resources().get("GPU"):
        raise LaunchError(f"--gpus-per-trial {option}: the Ray cluster has no GPU; give --gpus-per-trial 0 to run on CPUs")

    @ray.remote(num_gpus=1)
    def probe() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return int(ray.get(probe.remote(), timeout=timeout))


def pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _device_name(device: Any) -> str:
    """The trials table's `device`: the GPU's name, or `cpu`, `cpu+fused` where the fused C step was built (study/fused.py)."""
    import torch

    from study import fused

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu+fused" if fused.library() is not None else "cpu"


def _provenance(bundle: Bundle, sweep: str, code: str) -> dict[str, dict[str, Any]]:
    now = dt.datetime.now(dt.timezone.utc)
    return {
        r.run_id: dict(
            run_id=r.run_id,
            config_id=r.config.config_id,
            bundle_id=bundle.bundle_id,
            sweep=sweep,
            **{k: v for k, v in r.config.to_flat().items() if k != "family"},
            seed=r.seed,
            created_at=now,
            code_version=code,
            schema_version=SCHEMA_VERSION,
        )
        for r in bundle.runs
    }


def execute_bundle(payload: list[list[Any]], store: str, sweep: str, code: str, device: str = "cpu") -> dict[str, Any]:
    """Train, evaluate and store one bundle (its stacks in turn, one commit); returns a summary."""
    from study.rng import forget_drawn
    from study.trial import run_bundle

    bundle = Bundle.from_payload(payload)
    dev = pick_device(device)
    outs = [run_bundle(stack, dev) for stack in bundle.stacks()]
    forget_drawn()  # the kept training blocks serve this bundle's stacks (a B sweep shares one): a reused worker does not carry them on
    base = _provenance(bundle, sweep, code)
    trials = [{**base[row["run_id"]], **row, "device": _device_name(dev)} for out in outs for row in out.trials]
    tables = {"trials": to_table("trials", trials)}
    for name in ("curves", "evals", "params"):
        tables[name] = to_table(name, [row for out in outs for row in getattr(out, name)])
    rows = Store(store).write_bundle(bundle.family, bundle.bundle_id, tables)
    status = [t["status"] for t in trials]
    return {"runs": len(trials), "ok": status.count("ok"), "diverged": status.count("diverged"), "rows": rows, "wall_s": sum(t["wall_s"] for t in trials)}


def record_failure(bundle: Bundle, store: Store, sweep: str, code: str, error: str) -> None:
    base = _provenance(bundle, sweep, code)
    rows = [{**row, "status": "failed", "steps_done": 0, "error": error[-2000:]} for row in base.values()]
    store.write_failed(bundle.family, bundle.bundle_id, to_table("trials", rows))


@dataclass
class Summary:
    bundles: int = 0
    runs: int = 0
    ok: int = 0
    diverged: int = 0
    failed: int = 0
    rows: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0
    gpus_per_trial: float | None = None  # what `auto` chose
    errors: list[str] = field(default_factory=list)


def run_sweep(
    sweep: Sweep,
    store: Store,
    bundles: list[Bundle],
    address: str | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float | None = 0,
    max_concurrent: int | None = None,
    device: str = "auto",
    num_cpus: int | None = None,
    chunk_trials: int = CHUNK_TRIALS,
    cost: Callable[[Bundle], float] = lambda b: float(len(b.runs)),
    progress: Progress | None = None,
    execute: Callable[..., dict[str, Any]] = execute_bundle,
) -> Summary:
    """Run the bundles as Ray Tune trials (embedded local Ray unless `address` is given).

    `gpus_per_trial=None` sizes the GPU share from the largest stack's memory and the cluster's
    GPU memory (`pipelines.cost.gpu_fraction`).

    The bundles go to Tune in chunks of at most `chunk_trials`, one `Tuner.fit()` each, so that
    the driver's memory (Tune keeps every finished trial of a run) stays flat however long the
    sweep. Workers are reused across the trials of a chunk. `cost` estimates a bundle's compute
    for the ETA; `execute` is the trial's work (`execute_bundle`; a benchmark may pass another).
    """
    os.environ.update(TUNE_ENV)
    import ray
    from ray import tune

    from pipelines.trainable import BundleTrial, ProgressCallback

    # with the default loggers off, the result grid cannot re-read metrics from disk and says so
    # once per trial; the metrics it needs are in memory
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    summary = Summary(bundles=len(bundles))
    if not bundles:
        return summary
    code = code_version()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            # a new local Ray, whatever RAY_ADDRESS or a cluster started on this host say
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    progress_made = progress is None
    try:
        if gpus_per_trial is None or gpus_per_trial > 0:
            from pipelines.cost import check_gpu_share, gpu_fraction, run_bytes

            largest = max(sum(run_bytes(r.config) for r in stack) for b in bundles for stack in b.stacks())
            option = "auto" if gpus_per_trial is None else f"{gpus_per_trial:g}"
            try:
                if gpus_per_trial is None:
                    gpus_per_trial = summary.gpus_per_trial = gpu_fraction(largest, gpu_memory(option))
                else:
                    check_gpu_share(gpus_per_trial, largest, gpu_memory(option))
            except ValueError as err:
                raise LaunchError(f"--gpus-per-trial {option}: {err}") from None
        costs = {b.bundle_id: cost(b) for b in bundles}
        progress = progress or Progress(len(bundles), sum(len(b.runs) for b in bundles), sum(costs.values()))
        callback = ProgressCallback(progress, {b.bundle_id: (len(b.runs), costs[b.bundle_id]) for b in bundles})
        by_id = {b.bundle_id: b for b in bundles}
        storage_path, storage_fs = store.tune_storage()
        trainable = tune.with_resources(tune.with_parameters(BundleTrial, execute=execute), {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
        chunks = [bundles[i : i + chunk_trials] for i in range(0, len(bundles), chunk_trials)]

        def fit(chunk: list[Bundle], name: str) -> dict[str, BaseException]:
            space = [
                {"bundle_id": b.bundle_id, "bundle": b.to_payload(), "store": store.uri, "sweep": sweep.name, "code": code, "device": device, "threads": max(1, int(cpus_per_trial))}
                for b in chunk
            ]
            tuner = tune.Tuner(
                trainable,
                param_space={"job": tune.grid_search(space)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=max_concurrent, reuse_actors=True, trial_dirname_creator=_bundle_of, trial_name_creator=_bundle_of
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    storage_filesystem=storage_fs,
                    failure_config=tune.FailureConfig(max_failures=2),
                    checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                    callbacks=[callback],
                    verbose=0,
                ),
            )
            failed = _collect(tuner.fit(), summary)
            del tuner, space
            gc.collect()
            return failed

        for k, chunk in enumerate(chunks):
            name = f"{sweep.name}-{stamp}" + (f"-chunk{k:04d}" if len(chunks) > 1 else "")
            failed = fit(chunk, name)
            # a worker lost with its node can fail a trial for good despite its retries: in Tune
            # 2.60, when a reused actor dies during the trial's reset, the actor's failure requeues
            # the trial and the failed reset then arrives for a pending trial, which is final. One
            # more round for bundles whose worker was lost, in a fresh Tuner, before a failure is
            # recorded; a trial that raised is not run again.
            lost = [i for i, err in failed.items() if isinstance(err, ray.exceptions.RayActorError)]
            if lost:
                failed = {i: err for i, err in failed.items() if i not in lost} | fit([by_id[i] for i in lost], f"{name}-again")
            for i, err in failed.items():
                record_failure(by_id[i], store, sweep.name, code, repr(err))
                summary.failed += len(by_id[i].runs)
                summary.errors.append(f"bundle {i[:8]}: {err!r}"[:500])
        # an attempt that died mid-write (its node lost, its worker killed) left hidden temporaries
        # or files of a bundle its retry then committed afresh: the store this run leaves holds none
        store.recover()
    finally:
        if progress_made and progress is not None:
            progress.close()
        if started_here:
            ray.shutdown()
    summary.runs += summary.failed
    summary.wall_s = time.perf_counter() - t0
    return summary


def _bundle_of(trial: Any) -> str:
    """A trial's name and directory: its bundle's id, so that `_tune/` reads by bundle."""
    return trial.config["job"]["bundle_id"]


def _collect(results: Any, summary: Summary) -> dict[str, BaseException]:
    """Add a chunk's results to the summary; return the errors of the bundles whose trial failed
    for good, by bundle id.

    A result's bundle is read from its trial directory's name (`_bundle_of`): `res.config` comes
    from the last reported metrics and is None for a trial that failed before it reported anything
    (its node lost, say).
    """
    failed = {}
    for res in results:
        if res.error is not None:
            failed[PurePosixPath(res.path).name] = res.error
        elif res.metrics:
            for k in ("runs", "ok", "diverged", "rows"):
                setattr(summary, k, getattr(summary, k) + int(res.metrics.get(k, 0)))
            summary.compute_s += float(res.metrics.get("wall_s", 0.0))
    return failed
