"""The `icl-study` command line.

    icl-study plan quickstart                 # validate, count, estimate; runs nothing
    icl-study run quickstart --store results  # embedded local Ray; --address auto joins a cluster
    icl-study status --store results

Bad input (an invalid sweep, a store that cannot be written) exits with status 2 and one message
before any trial starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipelines import sweep as sweeps
from pipelines.store import Store, StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Simulation studies of in-context learning: sweeps, store, fits.")

STORE = typer.Option(Path("results"), "--store", help="directory of the Parquet store")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"icl-study: error: {message}", err=True)
    return typer.Exit(2)


def _load(spec: str) -> sweeps.Sweep:
    try:
        return sweeps.load(spec)
    except sweeps.SweepError as err:
        raise _fail(str(err)) from None


def _plan(sw: sweeps.Sweep, store: Store) -> tuple[list[sweeps.Bundle], set[str]]:
    done = store.done_runs() & {r.run_id for r in sw.runs}
    return sw.bundles(skip=done), done


@app.command()
def plan(sweep: str = typer.Argument(..., help="sweep file or shipped sweep name"), store: Path = STORE) -> None:
    """Validate a sweep and count what it would run; runs nothing."""
    sw = _load(sweep)
    st = Store(store)
    try:
        bundles, done = _plan(sw, st)
    except StoreError as err:
        raise _fail(str(err)) from None
    todo = sum(len(b.runs) for b in bundles)
    flops = sum(sweeps.estimate_flops(r) for b in bundles for r in b.runs)
    typer.echo(f"sweep {sw.name} ({sw.path})")
    typer.echo(f"  configurations  {len(sw.configs)}")
    typer.echo(f"  seeds           {len(sw.seeds)}")
    typer.echo(f"  runs            {len(sw.runs)}")
    typer.echo(f"  already done    {len(done)}  (in {st.root})")
    typer.echo(f"  to run          {todo}")
    typer.echo(f"  bundles         {len(bundles)}  (Ray trials)")
    typer.echo(f"  compute         ~{flops:.2g} flop to run (training, optimum, estimators; rough)")


@app.command()
def run(
    sweep: str = typer.Argument(..., help="sweep file or shipped sweep name"),
    store: Path = STORE,
    address: str = typer.Option(None, "--address", help="Ray address; 'auto' joins a running cluster (default: embedded local Ray)"),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", min=0.0),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", min=0.0, help="e.g. 0.25 packs four trials on a GPU"),
    max_concurrent: int = typer.Option(None, "--max-concurrent", min=1, help="cap on trials in flight"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    num_cpus: int = typer.Option(None, "--num-cpus", min=1, help="CPUs of the embedded local Ray (default: all)"),
) -> None:
    """Run what the store lacks of a sweep, one Ray Tune trial per bundle."""
    if device not in ("auto", "cpu", "cuda"):
        raise _fail(f"--device: one of auto, cpu, cuda; got {device!r}")
    sw = _load(sweep)
    if device == "cuda" and not address:
        import torch

        if not torch.cuda.is_available():
            raise _fail("--device cuda: this machine has no CUDA device (use auto or cpu, or --address to run on a cluster)")
    st = Store(store)
    try:
        st.check_writable()
        with st.lock():
            s = _run_locked(sw, st, address, cpus_per_trial, gpus_per_trial, max_concurrent, device, num_cpus)
    except StoreError as err:
        raise _fail(str(err)) from None
    if s is None:
        return
    typer.echo(
        f"done: {s.ok} ok, {s.diverged} diverged, {s.failed} failed of {s.runs} runs; {s.rows} rows written; "
        f"wall {s.wall_s:.1f}s, trial compute {s.compute_s:.1f}s"
    )
    for e in s.errors:
        typer.echo(f"  failed {e}", err=True)
    if s.failed:
        raise typer.Exit(1)


def _run_locked(sw: sweeps.Sweep, st: Store, *args):
    from pipelines.runner import run_sweep

    leftovers = st.recover()
    retried = st.forget_failed()
    bundles, done = _plan(sw, st)
    todo = sum(len(b.runs) for b in bundles)
    typer.echo(f"sweep {sw.name}: {len(sw.runs)} runs, {len(done)} already in {st.root}, {todo} to run in {len(bundles)} bundles")
    if leftovers or retried:
        typer.echo(f"  cleaned {len(leftovers)} files of interrupted writes; retrying {retried} failed bundles")
    if not bundles:
        typer.echo("nothing to run")
        return None
    return run_sweep(sw, st, bundles, *args)


@app.command()
def status(store: Path = STORE) -> None:
    """Summarise the store: runs by sweep and status, rows per table."""
    st = Store(store)
    if not st.root.is_dir():
        raise _fail(f"store {st.root} does not exist")
    try:
        trials = st.read("trials", ["family", "sweep", "status"]).to_pandas()
        counts = {t: st.read(t, ["run_id"]).num_rows for t in ("curves", "evals", "params")}
    except StoreError as err:
        raise _fail(str(err)) from None
    typer.echo(f"store {st.root}")
    if trials.empty:
        typer.echo("  no runs yet")
    else:
        table = trials.value_counts(["family", "sweep", "status"]).unstack("status", fill_value=0)
        typer.echo(table.to_string())
    typer.echo("  rows: " + ", ".join(f"{k} {v}" for k, v in {"trials": len(trials), **counts}.items()))


@app.command()
def fit(store: Path = STORE) -> None:
    """Fit every claim the store has data for; write the `fits` table and print the verdicts."""
    import pandas as pd

    from analysis.load import StoreReadError, load
    from analysis.verdicts import evaluate, verdict_table, write_fits

    try:
        loaded = load(store)
    except StoreReadError as err:
        raise _fail(str(err)) from None
    for message in loaded.skipped:
        typer.echo(f"skipped unreadable file {message}", err=True)
    for note in loaded.notes:
        typer.echo(f"note: {note}", err=True)
    rows, skipped = evaluate(loaded.tables)
    write_fits(store, rows, skipped)
    if rows.empty:
        typer.echo("no claim had enough data for a fit")
    else:
        with pd.option_context("display.width", 250, "display.max_colwidth", 40, "display.max_columns", 30):
            typer.echo(verdict_table(rows).to_string(index=False))
        typer.echo(f"{len(rows)} fits written to {Path(store) / 'fits'}")
    for name, reason in skipped:
        typer.echo(f"  skipped {name}: {reason}")


@app.command()
def report(store: Path = STORE, out: Path | None = typer.Option(None, "--out", help="output directory [default: <store>/report]")) -> None:
    """Write the HTML report and Markdown summary of the store's fits and figures."""
    from analysis.load import StoreReadError
    from analysis.report import build

    try:
        built = build(store, out or Path(store) / "report")
    except StoreReadError as err:
        raise _fail(str(err)) from None
    for message in built.skipped_files:
        typer.echo(f"skipped unreadable file {message}", err=True)
    for note in built.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"{len(built.figures)} figures in {built.html.parent / 'figures'}")
    typer.echo(f"summary: {built.markdown}")
    typer.echo(f"report: {built.html}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
