"""The Ray adapter: one Ray Tune trial per bundle, each writing its own files to the store.

`execute_bundle` is the whole job of a trial and needs no Ray (tests call it directly);
`trainable` wraps it for Tune; `run_sweep` plans, launches and summarises. Tune only schedules:
trials report a few scalars, the data goes to Parquet. On a multi-node cluster the store must be
a path every node sees (NFS or similar).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


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
    """Train, evaluate and store one bundle; returns a summary (counts and rows written)."""
    from study.trial import run_bundle

    bundle = Bundle.from_payload(payload)
    dev = pick_device(device)
    out = run_bundle(list(bundle.runs), dev)
    base = _provenance(bundle, sweep, code)
    trials = [{**base[row["run_id"]], **row, "device": _device_name(dev)} for row in out.trials]
    tables = {"trials": to_table("trials", trials)}
    for name in ("curves", "evals", "params"):
        tables[name] = to_table(name, getattr(out, name))
    rows = Store(store).write_bundle(bundle.family, bundle.bundle_id, tables)
    status = [t["status"] for t in trials]
    return {"runs": len(trials), "ok": status.count("ok"), "diverged": status.count("diverged"), "rows": rows, "wall_s": sum(t["wall_s"] for t in trials)}


def record_failure(bundle: Bundle, store: Store, sweep: str, code: str, error: str) -> None:
    base = _provenance(bundle, sweep, code)
    rows = [{**row, "status": "failed", "steps_done": 0, "error": error[-2000:]} for row in base.values()]
    store.write_failed(bundle.family, bundle.bundle_id, to_table("trials", rows))


def trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one bundle per trial."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config["job"]["threads"])))
    job = config["job"]
    summary = execute_bundle(job["bundle"], job["store"], job["sweep"], job["code"], job["device"])
    tune.report(summary)


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
    errors: list[str] = field(default_factory=list)


def run_sweep(
    sweep: Sweep,
    store: Store,
    bundles: list[Bundle],
    address: str | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    max_concurrent: int | None = None,
    device: str = "auto",
    num_cpus: int | None = None,
    progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Summary:
    """Run the bundles as Ray Tune trials (embedded local Ray unless `address` is given)."""
    os.environ.update(TUNE_ENV)
    import ray
    from ray import tune

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
            ray.init(num_cpus=num_cpus, **kwargs)
    by_id = {b.bundle_id: b for b in bundles}
    done_count = [0]

    class Progress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            done_count[0] += 1
            b = by_id[trial.config["job"]["bundle_id"]]
            progress(
                f"[{done_count[0]}/{len(bundles)}] bundle {b.bundle_id[:8]}: {result['runs']} runs "
                f"({result['ok']} ok, {result['diverged']} diverged) in {result['wall_s']:.1f}s"
            )

    space = [
        {"bundle_id": b.bundle_id, "bundle": b.to_payload(), "store": store.uri, "sweep": sweep.name, "code": code, "device": device, "threads": max(1, int(cpus_per_trial))}
        for b in bundles
    ]
    storage_path, storage_fs = store.tune_storage()
    resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"job": tune.grid_search(space)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent, reuse_actors=False, trial_dirname_creator=lambda t: t.trial_id, trial_name_creator=lambda t: t.trial_id
        ),
        run_config=tune.RunConfig(
            name=f"{sweep.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=tune.FailureConfig(max_failures=2),
            callbacks=[Progress()],
            verbose=0,
        ),
    )
    try:
        results = tuner.fit()
        for res in results:
            b = by_id[res.config["job"]["bundle_id"]]
            if res.error is not None:
                record_failure(b, store, sweep.name, code, repr(res.error))
                summary.failed += len(b.runs)
                summary.errors.append(f"bundle {b.bundle_id[:8]}: {res.error!r}"[:500])
            elif res.metrics:
                for k in ("runs", "ok", "diverged", "rows"):
                    setattr(summary, k, getattr(summary, k) + int(res.metrics.get(k, 0)))
                summary.compute_s += float(res.metrics.get("wall_s", 0.0))
    finally:
        if started_here:
            ray.shutdown()
    summary.runs += summary.failed
    summary.wall_s = time.perf_counter() - t0
    return summary
