"""The report: a Markdown document and the self-contained HTML page rendered from it, built from the store alone.

    from analysis.report import build, default_out
    built = build("results", "results/report")   # reads the tables and the `fits` table
    built = build("s3://bucket/prefix", default_out("s3://bucket/prefix"))   # ./report-bucket-prefix

Sections: the sweeps covered, the verdict table, every claim's fits (fitted value, interval and
theory side by side), the claims skipped and why, and the figures of `analysis.plots` (PNG files
in `<out>/figures/`, embedded in the HTML, linked from the Markdown).

The report is one Markdown document (report.md), rendered once to the HTML page with the figures
embedded and the verdicts coloured. The figures are independent: on Linux, `workers` forked processes draw them side by side
(default: 2, or fewer CPUs; the environment's ICL_REPORT_WORKERS sets another default); elsewhere,
or with 1, this process draws them one after another. Each is drawn and encoded once: the same
PNG bytes go to the file and into the HTML.
"""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from markdown_it import MarkdownIt

from analysis import plots
from analysis.claims import BY_NAME
from analysis.fits import rate_ratio
from analysis.fits_table import SKIPPED, VERDICTS, read_fits, verdict_table
from analysis.load import list_files, load, open_store
from pipelines.location import write_atomic

RATE_ROWS = 12  # rate claims have a row per run: the report shows a summary and this many rows
DPI = 110
WORKERS = 2  # processes drawing figures; more gains little: one figure (local_slope) is a third of the work
FIRST = ("local_slope",)  # the longest figures, started first


@dataclass
class Built:
    html: Path
    markdown: Path
    figures: dict[str, Path]
    skipped_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # stale or partial fits


def _groups(rows: pd.DataFrame) -> pd.Series:
    """Each row's group as 'k=v ...' over the fields that vary among the rows (all of them if none do)."""
    parsed = rows["group"].map(json.loads)
    keys = sorted({k for g in parsed for k in g})
    vary = [k for k in keys if len({json.dumps(g.get(k)) for g in parsed}) > 1] or keys
    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731  (2.0 -> 2)
    return parsed.map(lambda g: " ".join(f"{k}={show(g.get(k))}" for k in vary if k != "run_id") or "-")


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def claim_table(rows: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """One claim's fits for display: group, estimate [CI], plain slope, theory, verdict, window, points, excluded, note."""
    fmt = lambda x: _fmt(x, digits)  # noqa: E731
    table = pd.DataFrame(
        {
            "group": _groups(rows).to_numpy(),
            "estimate": rows["estimate"].map(fmt).to_numpy(),
            "95% CI": [f"[{fmt(lo)}, {fmt(hi)}]" for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
            "plain slope": rows["plain_slope"].map(fmt).to_numpy(),
            "theory": rows["theory"].map(fmt).to_numpy(),
            "verdict": rows["verdict"].to_numpy(),
            "window": rows["window"].to_numpy(),
            "points": rows["n_points"].to_numpy(),
            "excluded": rows["excluded"].to_numpy(),
            "note": rows["note"].fillna("").to_numpy(),
        }
    )
    keep = [c for c in table.columns if c not in ("plain slope", "note") or (table[c] != "nan").any() and (table[c] != "").any()]
    return table[keep]


def per_run_summary(rows: pd.DataFrame) -> str:
    """A per-run claim in one sentence: a rate's agreement with its prediction, or a curve's."""
    counts = ", ".join(f"{v} {n}" for v, n in rows["verdict"].value_counts().items())
    if rows["claim"].iloc[0] == "mor-3-rate":
        dev = rows["estimate"].abs()
        return (
            f"{len(rows)} curves ({counts}); the largest |log(measured / predicted subopt)| along a curve: median {dev.median():.2e}, "
            f"largest {dev.max():.2e} (the prediction: the initial error's components in the Hessian's eigenbasis, each contracting by (1 - lr lambda)^2 per step)."
        )
    ratio = np.log(rows["estimate"]) / np.log(rows["theory"])
    if rows["theory"].ge(1).all():
        return f"{len(rows)} curves ({counts}); fitted rho: median {rows['estimate'].median():.5f}, largest {rows['estimate'].max():.5f}; median R^2 {rows['r2'].median():.6f}."
    width = pd.Series([np.subtract(*rate_ratio(t, hi, lo)) for t, lo, hi in zip(rows["theory"], rows["ci_low"], rows["ci_high"])])
    return (
        f"{len(rows)} curves ({counts}); fitted log rho / predicted log rho: median {ratio.median():.5f}, "
        f"5-95% {ratio.quantile(0.05):.5f} to {ratio.quantile(0.95):.5f} (1 = the Hessian's local rate; > 1 faster), "
        f"interval width median {width.abs().median():.1e}; median R^2 {rows['r2'].median():.6f}."
    )


def coverage(trials: pd.DataFrame) -> pd.DataFrame:
    """Runs per family, sweep and status."""
    table = trials.value_counts(["family", "sweep", "status"], dropna=False).unstack("status", fill_value=0).reset_index()
    table.columns.name = None
    return table


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return buf.getvalue()


Inputs = tuple[dict[str, pd.DataFrame], pd.DataFrame]  # the loaded tables and the fits
_INPUTS: Inputs | None = None  # a worker's, from _start_worker


def _start_worker(inputs: Inputs) -> None:
    global _INPUTS
    _INPUTS = inputs


def _draw(name: str, inputs: Inputs | None = None) -> bytes | None:
    """One figure of `analysis.plots` as PNG bytes, or None when the store has no data for it."""
    tables, fits = inputs or _INPUTS
    fig = plots.FIGURES[name](tables, fits)
    return None if fig is None else _png(fig)


def _workers(workers: int | None) -> int:
    """How many processes draw the figures: 1 (this one, one figure after another) where forking is
    not safe or not possible. Fork is the start method used: the workers inherit the loaded tables
    and the imported modules, where a spawned worker would import matplotlib and unpickle the
    tables again (seconds of a report that takes a few; spawned, this report took twice as long as
    forked); Linux only (macOS's system libraries are not fork-safe); not from a daemonic process
    (multiprocessing lets those have no children)."""
    if workers is None:
        try:
            workers = int(os.environ.get("ICL_REPORT_WORKERS", WORKERS))
        except ValueError:
            workers = WORKERS
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(workers, cpus)
    forkable = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    if workers > 1 and (not forkable or multiprocessing.current_process().daemon):
        return 1
    return max(1, workers)


@contextmanager
def _drawing(inputs: Inputs, workers: int) -> Iterator[Callable[[str], bytes | None]]:
    """A function from a figure's name to its PNG bytes (or None). With workers > 1, every figure is
    started at once in that many forked processes, the longest first, and the function waits for
    one; with 1, or where the processes cannot start or die, it draws the figure here."""
    futures: dict[str, Future] = {}
    pool = None
    if workers > 1:
        try:  # forked, the workers share the inputs as they are (initargs are pickled only to spawn)
            pool = ProcessPoolExecutor(min(workers, len(plots.FIGURES)), multiprocessing.get_context("fork"), _start_worker, (inputs,))
            for name in sorted(plots.FIGURES, key=lambda n: n not in FIRST):
                futures[name] = pool.submit(_draw, name)
        except (OSError, ImportError, NotImplementedError, BrokenProcessPool):  # no processes here (limits, a sandbox)
            futures = {}

    def png(name: str) -> bytes | None:
        if name in futures:
            try:
                return futures[name].result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): drawn here instead
                pass
        return _draw(name, inputs)

    try:
        yield png
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # nothing left but on an error


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}
.consistent,.within{color:#1a7f37}.steeper{color:#bc4c00}.shallower{color:#8250df}.violated{color:#cf222e;font-weight:bold}.inconclusive{color:#57606a}"""


def default_out(store: str | os.PathLike) -> Path:
    """Where the report goes by default: `<store>/report` for a local store; for an object store a
    local folder in the working directory named after it (`s3://bkt/runs/a` -> `report-bkt-runs-a`)."""
    loc = open_store(store)
    if loc.local:
        return Path(loc.path) / "report"
    return Path("report-" + loc.path.replace("/", "-")).absolute()


def build(store: str | os.PathLike, out: str | os.PathLike, workers: int | None = None) -> Built:
    """Write `<out>/report.html`, `<out>/report.md` and `<out>/figures/*.png`; returns their paths.

    The store may be local or on an object store; the report is always written to a local folder.
    `workers`: processes drawing the figures (default: ICL_REPORT_WORKERS, else 2, at most the CPUs;
    1 where the process cannot fork).

    Raises analysis.load.StoreReadError for a store that cannot be analysed or has no fits yet.
    """
    loc = open_store(store)
    loaded = load(loc)
    fits, skipped = read_fits(loc)
    trials = loaded["trials"]
    notes = list(loaded.notes)
    if len(fits):
        gone = sorted(set(fits["family"]) - set(trials["family"]))
        if gone:  # fitted, then the family's runs left the store
            fits = fits[~fits["family"].isin(gone)]
            notes.append(f"fits of {', '.join(gone)} left out: the store has no such runs now")
    newest = max((i.mtime_ns for i in list_files(loc, "trials")), default=0)
    if newest > loc.fs.get_file_info(loc.join(*SKIPPED)).mtime_ns:
        notes.append(f"the store has runs newer than its fits: run `icl-study fit --store {loc.uri}` again")
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    pngs: dict[str, bytes] = {}  # each figure drawn and encoded once: the file and the HTML share the bytes
    with _drawing((loaded.tables, fits), _workers(workers)) as png_of:
        for name in plots.FIGURES:
            png = png_of(name)
            if png is not None:
                figures[name], pngs[name] = out / "figures" / f"{name}.png", png
                write_atomic(figures[name], png)
    for old in (out / "figures").glob("*.png"):
        if old not in figures.values():
            old.unlink()  # a figure of an earlier report that this store no longer supports

    md = _markdown(loc.uri, trials, notes, fits, skipped, loaded.skipped, figures)
    write_atomic(out / "report.md", md)
    write_atomic(out / "report.html", _html(md, pngs))
    return Built(out / "report.html", out / "report.md", figures, loaded.skipped, notes)


LEGEND = (
    "Each claim is a bound or an equality (theory.md section 5). A bound (an O() claim) is judged on "
    "the leading exponent of y = A x^beta (1 + c/x), the law with its first correction (|c| / x_min <= 1), fitted "
    "per group with a 95% t interval from the seed bootstrap's standard error: `within` when the whole interval is at or below the "
    "theory + tolerance, `violated` when it lies wholly above, `inconclusive` when it straddles that "
    "edge, is wider than the claim's limit, or the window has too few points for the corrected law "
    "(the plain slope is then reported beside it). An equality (a predicted exponent, rate or curve) "
    "is `consistent` when the whole interval lies within theory +- tolerance, `steeper` or "
    "`shallower` when it lies wholly beyond one side, `inconclusive` otherwise. A GD rate is judged on "
    "log rho / log rho_theory; a comparison on log(model / baseline) against a margin. `against the "
    "bound` counts `violated` fits only. Windows are fixed in the registry before the data; the "
    "`local_slope` figure shows where each claim's asymptote begins. Runs that are not `ok` or gave "
    "NaN or non-positive values are left out of a fit and counted in its `excluded` column."
)
FOLD = 40  # a claim's fits table longer than this is folded (<details>) on the page


def _markdown(uri: str, trials: pd.DataFrame, notes: list[str], fits: pd.DataFrame, skipped: list[tuple[str, str]], unreadable: list[str], figures: dict[str, Path]) -> str:
    """The report as one Markdown document: report.md, and the HTML page rendered from it."""
    versions = ", ".join(sorted(trials["code_version"].dropna().unique()))
    verdicts = verdict_table(fits) if len(fits) else pd.DataFrame()
    md = [f"# icl-study report: {_text(uri)}", "", f"{len(trials)} runs; code {_text(versions)}.", "", *[f"**Note:** {n}.\n" for n in notes]]
    md += ["## Sweeps covered", "", _table_md(coverage(trials)), ""]
    md += ["## Verdicts", "", LEGEND, "", _table_md(verdicts) if len(verdicts) else "No fits.", ""]
    if "verdicts" in figures:
        md += ["![verdicts](figures/verdicts.png)", ""]
    md += ["## Claims", ""]
    for name, rows in fits.groupby("claim", sort=False) if len(fits) else []:
        claim = BY_NAME.get(name)
        rate = claim is not None and claim.law in ("rate", "curve")
        table = claim_table(rows, digits=6 if rate else 4)  # rates agree to the 4th digit: show where they differ
        md += [f"### {name} ({claim.kind}): {claim.description}" if claim else f"### {name}", ""]
        if rate:
            md += [per_run_summary(rows), "", f"First {RATE_ROWS} of {len(rows)} rows (all in the `fits` table):", ""]
            table = table.head(RATE_ROWS)
        if len(table) > FOLD:
            md += [f"<details><summary>{len(table)} fits</summary>", "", _table_md(table), "", "</details>", ""]
        else:
            md += [_table_md(table), ""]
    if skipped:
        md += ["## Claims skipped", "", *[f"- **{n}**: {r}" for n, r in skipped], ""]
    if unreadable:
        md += ["## Unreadable files (skipped)", "", *[f"- {_text(s)}" for s in unreadable], ""]
    md += ["## Figures", ""]
    for name, path in figures.items():
        if name != "verdicts":
            md += [f"**{name}**: {(plots.FIGURES[name].__doc__ or name).strip()}", "", f"![{name}](figures/{path.name})", ""]
    return "\n".join(md)


_SPECIAL = re.compile(r"([\\`*_\[\]<>|&#!~])")


def _text(value: object) -> str:
    """A value shown literally in Markdown (a sweep's name, a file, a group): every character that
    Markdown or a table cell would read as syntax is escaped, and a line break becomes a space."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def _table_md(table: pd.DataFrame) -> str:
    """A table of values (never of Markdown): every header and cell shown literally."""
    literal = table.astype(str).map(_text).rename(columns=_text)
    return literal.to_markdown(index=False, disable_numparse=True)


_VERDICT_CELL = re.compile(r"<td([^>]*)>(" + "|".join(VERDICTS) + r")</td>")
_FIGURE = re.compile(r'src="figures/([^"/]+)\.png"')
_RENDER = MarkdownIt("commonmark", {"html": True}).enable("table")


def _html(md: str, pngs: dict[str, bytes]) -> str:
    """The page: the Markdown rendered once, verdicts coloured, the figures embedded (the same PNG bytes)."""
    body = _RENDER.render(md)
    body = _VERDICT_CELL.sub(r"<td\1 class='\2'>\2</td>", body)
    body = _FIGURE.sub(lambda m: f'src="data:image/png;base64,{base64.b64encode(pngs[m.group(1)]).decode()}"', body)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>icl-study report</title><style>{CSS}</style></head><body>{body}</body></html>"
