"""The `icl-study` command line.

    icl-study plan quickstart                 # validate, count, estimate; runs nothing
    icl-study run quickstart --store results  # embedded local Ray; --address auto joins a cluster
    icl-study status --store results
    icl-study run quickstart --store s3://bucket/prefix   # or gs://; AWS_* variables (docs/store.md)

Bad input (an invalid sweep, a store that cannot be written) exits with status 2 and one message
before any trial starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from pipelines import launch, sweep as sweeps
from pipelines.location import explain
from pipelines.runner import CHUNK_TRIALS
from pipelines.store import Store, StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Simulation studies of in-context learning: sweeps, store, fits.")

STORE = typer.Option("results", "--store", help="the Parquet store: a directory (an NFS mount is one), s3://bucket/prefix or gs://bucket/prefix (docs/store.md)")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"icl-study: error: {message}", err=True)
    return typer.Exit(2)


def _open(store: str) -> Store:
    """The store at an address; an unknown scheme, a missing bucket or no access exits with status 2."""
    try:
        st = Store(store)
        st.check_bucket()
    except StoreError as err:
        raise _fail(str(err)) from None
    return st


def _load(spec: str) -> sweeps.Sweep:
    try:
        return sweeps.load_sweep(spec)
    except sweeps.SweepError as err:
        raise _fail(str(err)) from None


TRIAL_S_OPTION = typer.Option(sweeps.TRIAL_S, "--trial-seconds", min=0.0, help="estimated compute a Ray trial should carry; stacks are packed up to it")
MIN_TRIALS_OPTION = typer.Option(sweeps.MIN_TRIALS, "--min-trials", min=1, help="spread the sweep over at least this many trials where it has the stacks")


def _plan(sw: sweeps.Sweep, store: Store, cal, trial_s: float, min_trials: int) -> tuple[list[sweeps.Bundle], set[str]]:
    done = store.done_runs() & {r.run_id for r in sw.runs}
    return sw.bundles(skip=done, seconds=cal.seconds, trial_s=trial_s, min_trials=min_trials, shared=cal.shared_seconds), done


@app.command()
def plan(
    sweep: str = typer.Argument(..., help="sweep file or shipped sweep name"),
    store: str = STORE,
    trial_s: float = TRIAL_S_OPTION,
    min_trials: int = MIN_TRIALS_OPTION,
    chunk_trials: int = typer.Option(CHUNK_TRIALS, "--chunk-trials", min=1, help="trials per Tuner run"),
    calibrate: bool = typer.Option(False, "--calibrate", help="measure this machine's rates again instead of using the cache"),
) -> None:
    """Validate a sweep and count what it would run, with chunks and estimated seconds; runs nothing."""
    from pipelines import cost

    sw = _load(sweep)
    st = _open(store)
    before = cost.cached()
    cal = cost.for_kind("cpu", measure=True, refresh=calibrate)
    try:
        bundles, done = _plan(sw, st, cal, trial_s, min_trials)
    except StoreError as err:
        raise _fail(str(err)) from None
    todo = [r for b in bundles for r in b.runs]
    chunks = -(-len(bundles) // chunk_trials)
    typer.echo(f"sweep {sw.name} ({sw.path})")
    typer.echo(f"  configurations  {len(sw.configs)}")
    typer.echo(f"  seeds           {len(sw.seeds)}")
    typer.echo(f"  runs            {len(sw.runs)}")
    typer.echo(f"  already done    {len(done)}  (in {st.uri})")
    typer.echo(f"  to run          {len(todo)}")
    typer.echo(f"  bundles         {len(bundles)}  (Ray trials, {chunks} chunk{'s' * (chunks != 1)} of at most {chunk_trials})")
    typer.echo(f"  compute         ~{sum(cost.flops(r) for r in todo):.2g} flop to run (training, optimum, estimators; rough)")
    kinds = {cal.device: cal, **{c.device: c for c in cost.cached().values() if c.device != cal.device}}
    for i, c in enumerate(kinds.values()):
        secs = sum(sw.cost(b.runs, c.seconds, c.shared_seconds) for b in bundles)
        source = "cached calibration" if c in before.values() and not (c is cal and calibrate) else f"calibrated in {c.took_s:.1f}s"
        label = "  estimate        " if i == 0 else " " * 18
        typer.echo(f"{label}{c.device} ({c.threads} thread{'s' * (c.threads != 1)}): ~{_seconds(secs)} of trial compute ({source}, code {c.code})")
    cpus = os.cpu_count() or 1
    wall = sum(sw.cost(b.runs, cal.seconds, cal.shared_seconds) for b in bundles) / cpus
    typer.echo(f"  here            ~{_seconds(wall)} of wall on this machine's {cpus} CPUs, one trial per CPU, plus Ray's start")


def _seconds(s: float) -> str:
    from pipelines.progress import duration

    return f"{s:.0f} s" if s < 600 else f"{s:.0f} s ({duration(s)})"


@app.command()
def run(
    sweep: str = typer.Argument(..., help="sweep file or shipped sweep name"),
    store: str = STORE,
    address: str = typer.Option(None, "--address", help="Ray address; 'auto' joins a running cluster (default: embedded local Ray)"),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", min=0.0),
    gpus_per_trial: str = typer.Option("0", "--gpus-per-trial", help="GPU share of a trial: 0.25 packs four trials on a GPU; auto sizes it from the largest stack's memory"),
    max_concurrent: int = typer.Option(None, "--max-concurrent", min=1, help="cap on trials in flight"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    num_cpus: int = typer.Option(None, "--num-cpus", min=1, help="CPUs of the embedded local Ray (default: all)"),
    trial_s: float = TRIAL_S_OPTION,
    min_trials: int = MIN_TRIALS_OPTION,
    chunk_trials: int = typer.Option(CHUNK_TRIALS, "--chunk-trials", min=1, help="trials per Tuner run (bounds the driver's memory)"),
) -> None:
    """Run what the store lacks of a sweep: stacks packed into Ray Tune trials, with progress."""
    from pipelines import cost
    from pipelines.runner import LaunchError, check_address

    if device not in ("auto", "cpu", "cuda"):
        raise _fail(f"--device: one of auto, cpu, cuda; got {device!r}")
    try:
        gpus = None if gpus_per_trial == "auto" else float(gpus_per_trial)
    except ValueError:
        raise _fail(f"--gpus-per-trial: a number >= 0 or auto; got {gpus_per_trial!r}") from None
    if gpus is not None and not gpus >= 0:
        raise _fail(f"--gpus-per-trial: a number >= 0 or auto; got {gpus_per_trial!r}")
    sw = _load(sweep)
    if address:
        try:
            check_address(address)
        except LaunchError as err:
            raise _fail(str(err)) from None
    if device == "cuda" and not address:
        import torch

        if not torch.cuda.is_available():
            raise _fail("--device cuda: this machine has no CUDA device (use auto or cpu, or --address to run on a cluster)")
    st = _open(store)
    try:
        st.check_writable()
        with st.lock():
            kind = "cuda" if device == "cuda" or (device == "auto" and gpus != 0) else "cpu"
            cal = cost.for_kind(kind, max(1, int(cpus_per_trial)), measure=False)
            s = _run_locked(sw, st, cal, trial_s, min_trials, address, cpus_per_trial, gpus, max_concurrent, device, num_cpus, chunk_trials)
    except (StoreError, LaunchError) as err:
        raise _fail(str(err)) from None
    if s is None:
        return
    if s.gpus_per_trial is not None:
        typer.echo(f"--gpus-per-trial auto: {s.gpus_per_trial:g} of a GPU per trial")
    typer.echo(
        f"done: {s.ok} ok, {s.diverged} diverged, {s.failed} failed of {s.runs} runs; {s.rows} rows written; "
        f"wall {s.wall_s:.1f}s, trial compute {s.compute_s:.1f}s"
    )
    for e in s.errors:
        typer.echo(f"  failed {e}", err=True)
    if s.failed:
        raise typer.Exit(1)


def _run_locked(sw: sweeps.Sweep, st: Store, cal, trial_s: float, min_trials: int, *args):
    from pipelines.runner import run_sweep

    leftovers = st.recover()
    retried = st.forget_failed()
    bundles, done = _plan(sw, st, cal, trial_s, min_trials)
    todo = sum(len(b.runs) for b in bundles)
    typer.echo(f"sweep {sw.name}: {len(sw.runs)} runs, {len(done)} already in {st.uri}, {todo} to run in {len(bundles)} bundles")
    if leftovers or retried:
        typer.echo(f"  cleaned {len(leftovers)} files of interrupted writes; retrying {retried} failed bundles")
    if not bundles:
        typer.echo("nothing to run")
        return None
    return run_sweep(sw, st, bundles, *args, cost=lambda b: sw.cost(b.runs, cal.seconds, cal.shared_seconds))


@app.command()
def status(store: str = STORE) -> None:
    """Summarise the store: runs by sweep and status, rows per table."""
    st = _open(store)
    try:
        if not st.exists():
            raise _fail(f"store {st.uri} does not exist")
        trials = st.read("trials", ["family", "sweep", "status"]).to_pandas()
        counts = {t: st.read(t, ["run_id"]).num_rows for t in ("curves", "evals", "params")}
    except StoreError as err:
        raise _fail(str(err)) from None
    typer.echo(f"store {st.uri}")
    if trials.empty:
        typer.echo("  no runs yet")
    else:
        table = trials.value_counts(["family", "sweep", "status"]).unstack("status", fill_value=0)
        typer.echo(table.to_string())
    typer.echo("  rows: " + ", ".join(f"{k} {v}" for k, v in {"trials": len(trials), **counts}.items()))


@app.command("fit")
def fit_claims(store: str = STORE) -> None:
    """Fit every claim the store has data for; write the `fits` table and print the verdicts."""
    import pandas as pd

    from analysis.fits_table import verdict_table, write_fits
    from analysis.load import StoreReadError, load, open_store
    from analysis.verdicts import evaluate

    try:
        loc = open_store(store)
        loaded = load(loc)
    except StoreReadError as err:
        raise _fail(str(err)) from None
    for message in loaded.skipped:
        typer.echo(f"skipped unreadable file {message}", err=True)
    for note in loaded.notes:
        typer.echo(f"note: {note}", err=True)
    rows, skipped = evaluate(loaded.tables)
    try:
        write_fits(loc, rows, skipped)
    except OSError as err:
        raise _fail(f"store {loc.uri}: cannot write the fits: {explain(err, loc.scheme)}") from None
    if rows.empty:
        typer.echo("no claim had enough data for a fit")
    else:
        with pd.option_context("display.width", 250, "display.max_colwidth", 40, "display.max_columns", 30):
            typer.echo(verdict_table(rows).to_string(index=False))
        typer.echo(f"{len(rows)} fits written to {loc.join('fits') if loc.local else loc.uri.split('?')[0] + '/fits'}")
    for name, reason in skipped:
        typer.echo(f"  skipped {name}: {reason}")


@app.command()
def report(
    store: str = STORE,
    out: Path | None = typer.Option(None, "--out", help="local output directory [default: <store>/report; for an object store ./report-<bucket>-<prefix>]"),
) -> None:
    """Write the HTML report and Markdown summary of the store's fits and figures."""
    from analysis.load import StoreReadError
    from analysis.report import build, default_out

    try:
        built = build(store, out or default_out(store))
    except StoreReadError as err:
        raise _fail(str(err)) from None
    for message in built.skipped_files:
        typer.echo(f"skipped unreadable file {message}", err=True)
    for note in built.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"{len(built.figures)} figures in {built.html.parent / 'figures'}")
    typer.echo(f"summary: {built.markdown}")
    typer.echo(f"report: {built.html}")


app.add_typer(launch.cluster_app, name="cluster")


def main() -> None:  # pragma: no cover
    sys.exit(app())
