"""The report's figures (seaborn; log axes where the law is a power), drawn from the store alone.

Every figure function takes the loaded tables and the `fits` table and returns a matplotlib
Figure, or None when the store has no data for it. Lines are configurations (the fields that vary
among the plotted runs, at most `MAX_LINES` of them); bands are 95% bootstrap intervals over seeds;
dashed black lines are the theory's slope (anchored at the middle of the data) or rate.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.claims import BY_NAME, CLAIMS, CONFIG, EVAL_FIELDS, EXPONENT_LAWS, TRAIN_FIELDS, snr_regime  # noqa: E402
from analysis.verdicts import local_slopes, varying  # noqa: E402

MAX_LINES = 8
N_BOOT = 1000  # seaborn's lineplot default
BOOT_SEED = 0
Tables = dict[str, pd.DataFrame]


def _ci95(vals: pd.Series) -> tuple[float, float]:
    """seaborn's `errorbar=("ci", 95)` for the mean (the 2.5 and 97.5 percentiles of N_BOOT means of
    resamples with replacement; NaN-aware when the values hold NaN), with the resamples drawn in one
    array operation rather than seaborn's Python loop of N_BOOT draws, which took most of the
    report's time. The same numbers as seaborn's bootstrap with seed=BOOT_SEED (the same random
    stream); seeded, a report's bands are the same from one build to the next (unseeded before)."""
    a = np.asarray(vals, dtype=float)
    n = len(a)
    mean = np.nanmean if np.isnan(a).any() else np.mean
    rng = np.random.default_rng(BOOT_SEED)
    per = max(1, min(N_BOOT, 2**22 // max(n, 1)))  # resamples per block: at most ~4M indices at once
    boots = np.concatenate([mean(a[rng.integers(0, n, (min(per, N_BOOT - i), n))], axis=1) for i in range(0, N_BOOT, per)])
    lo, hi = np.nanpercentile(boots, (2.5, 97.5))
    return float(lo), float(hi)


BAND = _ci95  # 95% bootstrap interval of the mean over seeds


def _share_mathtext_parses() -> None:
    """One mathtext cache for every Agg renderer. Agg makes a renderer per figure size and dpi, each
    with a parser of its own, and matplotlib keys its parse cache on the parser: tight_layout,
    savefig's tight bounding box and the final drawing each parsed every log axis's tick labels
    (10^-2, 2x10^1 in mathtext: pyparsing, ~10 ms each) again, a fifth of the figures' time. A
    parse depends only on the text, dpi, font, flags and the output type (the parser's one state),
    so they are shared; the glyphs drawn are the same. Left as it is where matplotlib's private
    `MathTextParser._parse_cached` is not the one this was written for."""
    from matplotlib.mathtext import MathTextParser

    inner = getattr(MathTextParser._parse_cached, "__wrapped__", None)
    if inner is None or list(inspect.signature(inner).parameters) != ["self", "s", "dpi", "prop", "antialiased", "load_glyph_flags"]:
        return
    parsers = {p._output_type: p for p in (MathTextParser("path"), MathTextParser("agg"))}
    shared = functools.lru_cache(1024)(lambda output_type, *args: inner(parsers[output_type], *args))
    MathTextParser._parse_cached = lambda self, *args: shared(self._output_type, *args)
    # a parse holds its fonts (FreeType faces reading an open file): a forked child must not share
    # them with its siblings (one file offset, concurrent reads: FT_Load_Glyph fails), so it starts
    # with an empty cache, as matplotlib's own font cache does
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=shared.cache_clear)


_share_mathtext_parses()


def _label(df: pd.DataFrame, skip: tuple[str, ...] = ()) -> pd.Series:
    """'d=2 c=3' from the configuration fields that vary in df (one line when none does)."""
    vary = varying(df, skip)
    if not vary:
        return pd.Series("mean over seeds", index=df.index)
    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731  (3.0 -> 3)
    return df[vary].apply(lambda r: " ".join(f"{k}={show(v)}" for k, v in r.items()), axis=1)


def _evals(tables: Tables, family: str, metric: str, estimators: list[str] | None = None) -> pd.DataFrame:
    """The evals rows of one family and metric, on the training distribution (shift none)."""
    ev = tables.get("evals", pd.DataFrame())
    if ev.empty or "family" not in ev:
        return pd.DataFrame()
    ev = ev[(ev["family"] == family) & (ev["metric"] == metric) & (ev["status"] == "ok") & np.isfinite(ev["value"]) & (ev["shift"] == "none")]
    return ev[ev["estimator"].isin(estimators)] if estimators is not None else ev


def _largest(df: pd.DataFrame, column: str) -> pd.DataFrame:
    return df[df[column] == df[column].max()] if len(df) else df


def _reference(ax, x: np.ndarray, y: np.ndarray, slope: float, text: str) -> None:
    """A dashed line of the theory's slope through the geometric middle of the data."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return
    x0, y0 = np.exp(np.log(x[ok]).mean()), np.exp(np.log(y[ok]).mean())
    xs = np.array([x[ok].min(), x[ok].max()])
    ax.plot(xs, y0 * (xs / x0) ** slope, "k--", lw=1, label=text)


def _log_ticks(ax, x: pd.Series) -> None:
    """A log x axis labelled at the data's own levels (up to 10), without the minor labels that a
    log axis spanning less than a decade or two would crowd together."""
    levels = np.sort(pd.unique(x.astype(float)))
    levels = levels[np.isfinite(levels) & (levels > 0)]
    if 0 < len(levels) <= 10:
        ax.set_xticks(levels, [f"{v:g}" for v in levels])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if len(levels) > 5:
            ax.tick_params(axis="x", labelrotation=45)


def _scaling(df: pd.DataFrame, x: str, y: str, slope: float | None, slope_text: str, title: str, col: str | None = None, ylabel: str | None = None, ignore: tuple[str, ...] = ()) -> plt.Figure | None:
    """y against x on log-log axes, one line per configuration, a facet per value of `col`."""
    if df.empty or df[x].nunique() < 2:
        return None
    df = df.assign(config=_label(df.drop(columns=["run_id"], errors="ignore"), skip=(x, col or "", *ignore)))
    keep = sorted(df["config"].unique())[:MAX_LINES]
    df = df[df["config"].isin(keep)]
    cols = sorted(df[col].unique()) if col else [None]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.5 * len(cols), 3.6), squeeze=False, sharey=True)
    for ax, value in zip(axes[0], cols):
        part = df if value is None else df[df[col] == value]
        sns.lineplot(data=part, x=x, y=y, hue="config", errorbar=BAND, marker="o", ax=ax, legend=ax is axes[0][-1])
        if slope is not None:
            means = part.groupby([x, "config"])[y].mean().reset_index()
            _reference(ax, means[x], means[y], slope, slope_text)
        ax.set(xscale="log", yscale="log", ylabel=ylabel or y, title=title if value is None else f"{title}, {col}={value:g}")
        _log_ticks(ax, part[x])
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if axes[0][-1].get_legend():
        axes[0][-1].get_legend().remove()
    for ax in axes[0][:-1]:
        h, lab = ax.get_legend_handles_labels()
        handles += [hh for hh, ll in zip(h, lab) if ll not in labels]
        labels += [ll for ll in lab if ll not in labels]
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def gmm_error_vs_N(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Claim 3 of [S]: tv_error at M = inf against N of the trained LSA's B -> inf limit (lsa_projected,
    the claim's subject; the trained LSA itself where the store has no lsa_projected rows), at the
    largest B, slope -1 for reference."""
    ev = _evals(tables, "gmm", "tv_error", ["lsa_projected"])
    name = "lsa_projected"
    if ev.empty:
        ev, name = _evals(tables, "gmm", "tv_error", ["lsa"]), "lsa"
    ev = _largest(ev[np.isinf(ev["M"])], "B") if len(ev) else ev
    return _scaling(ev, "N", "value", -1.0, "theory: slope -1", f"{name} tv_error at M = inf", col="snr", ylabel="tv_error")


def gmm_error_vs_M(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Claim 3 of [S]: tv_error against the test length M at the largest N, slope -1/2 for reference."""
    ev = _largest(_evals(tables, "gmm", "tv_error", ["lsa"]), "N")
    ev = ev[np.isfinite(ev["M"])] if len(ev) else ev
    return _scaling(ev, "M", "value", -0.5, "theory: slope -1/2", "LSA tv_error at the largest N", col="snr", ylabel="tv_error")


def _one_configuration(ev: pd.DataFrame, keep: tuple[str, ...] = ()) -> tuple[pd.DataFrame, str]:
    """The rows of the first configuration (over every field that varies but `keep`), and its label."""
    fields = varying(ev, ("M", *keep))
    if not fields:
        return ev, ""
    key = ev[fields].map(repr)
    first = key.sort_values(fields).iloc[0]
    chosen = ev[(key == first).all(axis=1)]
    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return chosen, ", ".join(f"{f}={show(chosen[f].iloc[0])}" for f in fields)


def gmm_estimators(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """The trained LSA beside the Bayes posterior and the plug-in classifiers: accuracy against M
    (the first configuration at the largest N; the others are in the store)."""
    ev = _largest(_evals(tables, "gmm", "accuracy"), "N")
    ev = ev[np.isfinite(ev["M"])] if len(ev) else ev
    if ev.empty:
        return None
    ev, label = _one_configuration(ev.drop(columns=["run_id"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sns.lineplot(data=ev, x="M", y="value", hue="estimator", errorbar=BAND, marker="o", ax=ax)
    ax.set(xscale="log", ylabel="accuracy", title=f"gmm estimators, N={ev.N.iloc[0]:g}\n{label}")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return fig


def gd_curves(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Claims [S] 1 and [J] 3: subopt against the step for a few runs; gmm: the fitted rate (thick)
    and the Hessian's local rate (dashed); mor: the curve predicted from the Hessian and the start (dashed)."""
    cu = tables.get("curves", pd.DataFrame())
    per_run = fits[fits["claim"].isin(["gmm-1-rate", "mor-3-rate"])] if len(fits) else pd.DataFrame()
    if cu.empty or per_run.empty:
        return None
    per_run = per_run.assign(run_id=per_run["group"].map(lambda g: json.loads(g)["run_id"]), seed=per_run["group"].map(lambda g: json.loads(g)["seed"]))
    first = per_run[per_run["seed"] == per_run["seed"].min()].sort_values(["theory", "estimate"])
    picks = {f: p.iloc[np.linspace(0, len(p) - 1, min(3, len(p))).astype(int)] for f, p in first.groupby("family")}  # fastest, middle, slowest
    fig, axes = plt.subplots(1, len(picks), figsize=(5.5 * len(picks), 3.8), squeeze=False)
    for ax, (family, part) in zip(axes[0], picks.items()):
        for color, (_, fit) in zip(sns.color_palette(n_colors=len(part)), part.iterrows()):
            curve = cu[cu["run_id"] == fit["run_id"]].sort_values("step")
            curve = curve[curve["subopt"] > 0]
            lo, hi = (float(v) for v in fit["window"].split(".."))
            if not (curve["step"] >= lo).any():
                continue  # the run's curve is no longer in the store
            if fit["claim"] == "mor-3-rate":
                ax.plot(curve["step"], curve["subopt"], color=color, lw=3, alpha=0.35, label=f"run {fit['run_id'][:6]}: largest |log(measured / predicted)| {abs(fit['estimate']):.1e}")
                ax.plot(curve["step"], curve["subopt_theory"], "k--", lw=1)
                continue
            ax.plot(curve["step"], curve["subopt"], color=color, lw=1.5, label=f"run {fit['run_id'][:6]}: fit {fit['estimate']:.4f}, theory {fit['theory']:.4f}")
            at = curve[curve["step"] >= lo].iloc[0]
            t = np.linspace(lo, hi, 20)
            ax.plot(t, at["subopt"] * fit["estimate"] ** (2 * (t - lo)), color=color, lw=3, alpha=0.35)
            ax.plot(t, at["subopt"] * fit["theory"] ** (2 * (t - lo)), "k--", lw=1)
        what = "measured (thick) and predicted (dashed) curves" if family == "mor" else "fitted (thick) and predicted (dashed) rates"
        ax.set(yscale="log", xlabel="GD step", ylabel="subopt", title=f"{family}: {what}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mor_estimators(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """EM, the oracle, OLS, ridge and the trained LSA: mse against M, at the largest N and B (the
    first configuration there, per SNR)."""
    ev = _largest(_largest(_evals(tables, "mor", "mse"), "N"), "B")
    ev = ev[np.isfinite(ev["M"])] if len(ev) else ev
    if ev.empty:
        return None
    ev, label = _one_configuration(ev.drop(columns=["run_id"]), keep=("snr",))
    fig, axes = plt.subplots(1, ev["snr"].nunique(), figsize=(5 * ev["snr"].nunique(), 3.8), squeeze=False, sharey=False)
    for i, (ax, (snr, part)) in enumerate(zip(axes[0], ev.groupby("snr"))):
        sns.lineplot(data=part, x="M", y="value", hue="estimator", errorbar=BAND, marker="o", ax=ax, legend=i == 0)
        ax.set(xscale="log", yscale="log", ylabel="mse", title=f"mor estimators, snr={snr:g}, N={part.N.iloc[0]:g}\n{label}")
        ax.title.set_fontsize(8)
    fig.tight_layout()
    return fig


def mor_em_vs_M(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Claim 1 of [J] in [K]'s model (symmetric K = 2, a component per example): EM's parameter
    error against M per SNR eta, for M >= 16 d; dashed: slope -1/4 where [K]'s regime is low at most
    points, -1/2 otherwise (the middle regime's sqrt(d/M)/eta and the high regime's sqrt(d/M))."""
    ev = _evals(tables, "mor", "param_error", ["em"])
    if ev.empty or "symmetric" not in ev:
        return None
    ev = ev[np.isfinite(ev["M"]) & ev["symmetric"].astype(bool) & (ev["K"] == 2) & (ev["assignment"] == "sample") & (ev["M"] >= 16 * ev["d"])]
    if ev.empty:
        return None
    scalar = [c for c in ev.columns if c in CONFIG and c not in TRAIN_FIELDS and not ev[c].map(lambda v: isinstance(v, (list, np.ndarray))).any()]
    ev = ev.drop_duplicates(["seed", *scalar])  # one row per evaluation, not one per trained model
    fig = _scaling(ev, "M", "value", None, "", "EM param_error", col="snr", ylabel="param_error", ignore=TRAIN_FIELDS)
    if fig is not None:
        for ax in fig.axes:
            if "snr=" not in ax.get_title():
                continue
            snr = float(ax.get_title().rsplit("snr=", 1)[1])  # each facet names its SNR
            part = ev[np.isclose(ev["snr"], snr)]
            slope = -0.25 if (snr_regime(part) == "low").mean() > 0.5 else -0.5
            means = part.groupby("M")["value"].mean()
            _reference(ax, means.index, means.values, slope, f"theory: slope {slope:g}")
            ax.legend(fontsize=7)
    return fig


def mor_em_failure(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """[J] claim 4's 'EM suffers from bad initialisations': the share of prompts whose EM estimate is
    further than ||beta|| / 2 from the truth (param_failure), against M, by restarts and SNR eta."""
    ev = _evals(tables, "mor", "param_failure", ["em"])
    if ev.empty:
        return None
    ev = ev[np.isfinite(ev["M"])]
    ev = ev.drop_duplicates(["seed", "M", "snr", "d", "K", "em_restarts", "symmetric", "sigma", "em_iters"])
    etas = sorted(ev["snr"].unique())[:6]
    fig, axes = plt.subplots(1, len(etas), figsize=(3.6 * len(etas), 3.2), squeeze=False, sharey=True)
    for ax, eta in zip(axes[0], etas):
        part = ev[ev["snr"] == eta].assign(restarts=lambda d: d["em_restarts"].astype(int).astype(str), dimension=lambda d: "d=" + d["d"].astype(int).astype(str))
        sns.lineplot(data=part, x="M", y="value", hue="restarts", style="dimension", errorbar=BAND, marker="o", ax=ax, legend=ax is axes[0][-1])
        ax.set(xscale="log", ylabel="share of failed fits", title=f"EM failures, snr={eta:g}")
    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def mor_excess_risk_vs_B(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Claim 2 of [J]: the trained LSA's population excess risk against B, slope -1/2 for reference."""
    tr = tables.get("trials", pd.DataFrame())
    if tr.empty or "excess_risk" not in tr:
        return None
    tr = tr[(tr["family"] == "mor") & (tr["status"] == "ok") & np.isfinite(tr["excess_risk"]) & (tr["excess_risk"] > 0)]
    return _scaling(tr, "B", "excess_risk", -0.5, "theory bound: slope -1/2", "LSA excess risk over Gamma*", col="snr", ignore=EVAL_FIELDS)


def mor_lsa_vs_em(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Claim 4 of [J]: log(excess_mse of the trained LSA / excess_mse of EM), paired by prompt, by
    test length, training N and SNR (the `mor-4-lsa-vs-em` fits, averaged over their other group
    fields; below 0, in blue, the LSA wins; the claim's margin is +0.1)."""
    rows = fits[fits["claim"] == "mor-4-lsa-vs-em"] if len(fits) else pd.DataFrame()
    if rows.empty:
        return None
    g = rows["group"].map(json.loads)
    rows = rows.assign(M=g.map(lambda v: v["M"]), N=g.map(lambda v: v.get("N")), snr=g.map(lambda v: v.get("snr")))
    snrs = sorted(rows["snr"].unique())
    fig, axes = plt.subplots(1, len(snrs), figsize=(4.5 * len(snrs), 3.2), squeeze=False)
    bound = float(np.nanmax(np.abs(rows["estimate"]))) or 1.0
    for ax, snr in zip(axes[0], snrs):
        table = rows[rows["snr"] == snr].pivot_table(index="N", columns="M", values="estimate", aggfunc="mean")
        table.columns = [f"{m:g}" for m in table.columns]
        sns.heatmap(table, annot=True, fmt=".2f", cmap="coolwarm", vmin=-bound, vmax=bound, ax=ax, cbar=ax is axes[0][-1])
        ax.set(title=f"log(excess LSA / excess EM), snr={snr:g}", xlabel="test length M", ylabel="training N")
    fig.tight_layout()
    return fig


COLOURS = {"within": "tab:green", "consistent": "tab:green", "violated": "tab:red", "steeper": "tab:orange", "shallower": "tab:purple", "inconclusive": "tab:gray"}


def verdicts(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Every exponent fit with its 95% interval, coloured by verdict, beside the theory (black tick)
    and its tolerance (grey band: up to theory + tolerance for a bound, +- tolerance for an
    equality); every fitted GD rate against its prediction (right)."""
    if fits.empty:
        return None
    law = fits["claim"].map({c.name: c.law for c in CLAIMS}).fillna("power")
    exps, rates = fits[law.isin(EXPONENT_LAWS) & np.isfinite(fits["estimate"])], fits[law == "rate"]
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3.5, 0.12 * len(exps) + 1.5)), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    if len(exps):
        exps = exps.sort_values(["claim", "group"]).reset_index(drop=True)
        for claim, rows in exps.groupby("claim", sort=False):
            th, tol = rows["theory"].iloc[0], rows["tolerance"].iloc[0]
            lo = th - tol if rows["kind"].iloc[0] == "equality" else min(th - 1, rows["ci_low"].min())
            ax.fill_betweenx([rows.index.min() - 0.5, rows.index.max() + 0.5], lo, th + tol, color="0.9", lw=0)
        # a row's interval, then its estimate, then the theory's tick, as three calls per row would
        # draw them (rows do not overlap), in a few lines: NaN breaks a line between rows
        colours = exps["verdict"].map(lambda v: COLOURS.get(v, "gray"))
        gap = np.full(len(exps), np.nan)
        for colour, rows in exps.groupby(colours, sort=False):
            ax.plot(np.column_stack([rows["ci_low"], rows["ci_high"], gap[: len(rows)]]).ravel(), np.repeat(rows.index.to_numpy(float), 3), color=colour, lw=2)
        for colour, rows in exps.groupby(colours, sort=False):
            ax.plot(rows["estimate"], rows.index, "o", color=colour, ms=3)
        ax.plot(exps["theory"], exps.index, "k|", ms=8)
        starts = exps.groupby("claim").head(1)
        ax.set_yticks(starts.index, starts["claim"], fontsize=7)
        ax.invert_yaxis()
        handles = [plt.Line2D([], [], color=c, lw=2, label=v) for v, c in COLOURS.items() if v in set(exps["verdict"])]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
        ax.set(xlabel="leading exponent (bounds) or slope (equalities): fit and 95% CI, theory (black tick)", title="exponent fits")
    if len(rates) and (rates["theory"] < 1).any():
        rates = rates[rates["theory"] < 1]
        sns.scatterplot(data=rates, x="theory", y="estimate", hue="verdict", palette=COLOURS, s=12, ax=axes[1])
        lims = [min(rates.theory.min(), rates.estimate.min()), max(rates.theory.max(), rates.estimate.max())]
        axes[1].plot(lims, lims, "k--", lw=1)
        axes[1].set(xlabel="predicted rho (Hessian at the optimum)", ylabel="fitted rho", title="GD rates, one point per run")
    fig.tight_layout()
    return fig


def local_slope(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """Each exponent claim's plain log-log slope on [x_k, the largest x] against the start x_k, over
    all the data in its regime (thin: each group; thick: the median), beside the theory (dashed) and
    the claim's fixed window start (dotted): where the local slope settles, the asymptote begins."""
    slopes = local_slopes(tables)
    if slopes.empty:
        return None
    names = list(dict.fromkeys(slopes["claim"]))
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        part = slopes[slopes["claim"] == name]
        for _, g in part.groupby("group"):
            ax.plot(g["start"], g["slope"], color="tab:blue", lw=0.6, alpha=0.3)
        med = part.groupby("start")["slope"].median()
        ax.plot(med.index, med.values, color="tab:blue", lw=2.5, marker="o", ms=3)
        ax.axhline(part["theory"].iloc[0], color="k", ls="--", lw=1)
        ax.axvline(part["window_start"].iloc[0], color="k", ls=":", lw=1)
        ax.set(xscale="log", title=name, xlabel=f"window start ({BY_NAME[name].x})", ylabel="local slope")
        ax.title.set_fontsize(8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def gmm_b_ladder(tables: Tables, fits: pd.DataFrame) -> plt.Figure | None:
    """[S] claim 2 on the population quantity: the leading N-exponent of the signed projection g_N
    at each B (left: the corrected fit and its interval, the plain slope as crosses; the bound -1
    dashed), and the residual off the line of Lam^-1 against B (right: finite-B noise, slope -1/2)."""
    rows = fits[fits["claim"] == "gmm-2-optimum-vs-N"] if len(fits) else pd.DataFrame()
    tr = tables.get("trials", pd.DataFrame())
    if rows.empty or "B" not in rows or rows["B"].nunique() < 2 or tr.empty or "opt_noise" not in tr:
        return None
    rows = rows.assign(config=_label(rows[[k for k in ("d", "c", "snr", "N") if k in rows]]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (config, part) in enumerate(rows.groupby("config")):
        part = part.sort_values("B")
        jitter = part["B"] * 1.04**i
        axes[0].errorbar(jitter, part["estimate"], yerr=[part["estimate"] - part["ci_low"], part["ci_high"] - part["estimate"]], fmt="o-", ms=3, lw=1, label=config)
        axes[0].plot(jitter, part["plain_slope"], "x", color=axes[0].lines[-1].get_color(), ms=4)
    axes[0].axhline(-1, color="k", ls="--", lw=1)
    axes[0].set(xscale="log", xlabel="B (training prompts)", ylabel="N-exponent of g_N", title="leading exponent (o) and plain slope (x)")
    axes[0].legend(fontsize=6)
    tr = tr[(tr["family"] == "gmm") & (tr["status"] == "ok") & np.isfinite(tr["opt_noise"]) & (tr["opt_noise"] > 0)]
    if tr["B"].nunique() >= 2:
        tr = tr.assign(config=_label(tr[[k for k in ("d", "c", "snr") if k in tr]]))
        sns.lineplot(data=tr, x="B", y="opt_noise", hue="config", errorbar=BAND, marker="o", ax=axes[1], legend=False)
        means = tr.groupby("B")["opt_noise"].mean()
        _reference(axes[1], means.index, means.values, -0.5, "theory: slope -1/2")
        axes[1].set(xscale="log", yscale="log", xlabel="B", ylabel="opt_noise", title="residual off Lam^-1 (all N)")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable[[Tables, pd.DataFrame], plt.Figure | None]] = {
    "verdicts": verdicts,
    "local_slope": local_slope,
    "gmm_b_ladder": gmm_b_ladder,
    "gmm_error_vs_N": gmm_error_vs_N,
    "gmm_error_vs_M": gmm_error_vs_M,
    "gmm_estimators": gmm_estimators,
    "gd_curves": gd_curves,
    "mor_estimators": mor_estimators,
    "mor_em_vs_M": mor_em_vs_M,
    "mor_em_failure": mor_em_failure,
    "mor_lsa_vs_em": mor_lsa_vs_em,
    "mor_excess_risk_vs_B": mor_excess_risk_vs_B,
}
