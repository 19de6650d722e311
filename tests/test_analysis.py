"""The store loader and the claims registry (analysis reads Parquet only)."""

import html
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis import claims, verdicts
from analysis.load import SCHEMA_VERSION, StoreReadError, load
from pipelines import store as store_mod
from pipelines.runner import execute_bundle
from pipelines.sweep import parse_sweep


def _execute(root, sweep: dict):
    """Run every bundle of a sweep into the store at root, in this process (no Ray)."""
    for b in parse_sweep(sweep).bundles():
        execute_bundle(b.to_payload(), str(root), sweep["name"], "test", "cpu")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    gmm = {"family": "gmm", "fixed": {"d": 2, "snr": 1.0, "lr": 2.0, "steps": 10, "B": 128, "M": [4, "inf"], "n_eval": 32}, "grid": {"N": [5, 10]}}
    mor = {"family": "mor", "fixed": {"d": 2, "snr": 2.0, "sigma": 0.5, "lr": 0.1, "steps": 5, "B": 64, "M": [4], "n_eval": 16, "em_iters": 3}, "grid": {"N": [5]}}
    return _execute(tmp_path_factory.mktemp("store"), {"name": "a", "seeds": 2, "parts": [gmm, mor]})


def test_schema_versions_agree():
    assert SCHEMA_VERSION == store_mod.SCHEMA_VERSION


def test_load_joins_runs_and_pushes_filters_down(store):
    all_ = load(store)
    assert len(all_["trials"]) == 6 and set(all_["trials"].family) == {"gmm", "mor"}
    ev = all_["evals"]
    assert {"d", "snr", "N", "seed", "status"} <= set(ev.columns) and ev["M"].dtype == float  # evals.M, not trials.M
    gmm = load(store, filters={"family": "gmm", "N": 5})
    assert set(gmm["trials"].N) == {5} and set(gmm["evals"].family) == {"gmm"} and set(gmm["curves"].N) == {5}


def test_corrupt_file_is_skipped_by_name(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    bad = next((copy / "evals").glob("family=gmm/part-*.parquet"))
    bad.write_bytes(b"not parquet")
    out = load(copy)
    assert len(out.skipped) == 1 and str(bad) in out.skipped[0]
    assert len(out["evals"]) < len(load(store)["evals"])


def test_missing_empty_or_foreign_stores_are_errors(store, tmp_path):
    with pytest.raises(StoreReadError, match="not a store"):
        load(tmp_path / "nothing")
    (tmp_path / "empty" / "trials").mkdir(parents=True)
    with pytest.raises(StoreReadError, match="no readable runs"):
        load(tmp_path / "empty")
    import pyarrow.parquet as pq

    src = next((store / "trials").glob("family=gmm/part-*.parquet"))
    table = pq.read_table(src)
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("schema_version"), "schema_version", pa.array([99] * table.num_rows, pa.int64()))
    (tmp_path / "old" / "trials" / "family=gmm").mkdir(parents=True)
    pq.write_table(table, tmp_path / "old" / "trials" / "family=gmm" / src.name)
    with pytest.raises(StoreReadError, match="schema version"):
        load(tmp_path / "old")


def _synthetic(b, status="ok", correction=0.0, seeds=6, levels=(25, 50, 100, 200, 400, 800)):
    """trials rows of a gmm N sweep whose opt_g is -3 N^b (1 + correction / N) with seed noise."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(seeds):
        for N in levels:
            g = -3 * N**b * (1 + correction / N) * np.exp(0.02 * rng.standard_normal())
            config = dict(d=2, c=2, snr=1.0, cov="identity", kappa=1.0, symmetric=False, B=100, param="reduced")
            rows.append(dict(family="gmm", run_id=f"{status}-{seed}-{N}", seed=seed, N=N, **config, status=status, opt_converged=True, opt_g=g))
    return pd.DataFrame(rows)


def test_claims_fit_known_exponents_and_say_what_they_skip():
    trials = pd.concat([_synthetic(-1.0, correction=-25.0), _synthetic(-1.0, status="diverged").assign(seed=lambda d: d.seed + 10)])
    rows, skipped = verdicts.evaluate({"trials": trials, "evals": pd.DataFrame()})
    (row,) = rows.to_dict("records")
    assert row["claim"] == "gmm-2-optimum-vs-N" and row["kind"] == "bound" and row["theory"] == -1.0
    assert row["verdict"] == "within" and abs(row["estimate"] + 1) < 0.05 and row["plain_slope"] > -0.9  # the bend is the correction's
    assert row["excluded"] == 30 and row["n_points"] == 5 and row["window"] == "50..800"  # the fixed window: N >= 50
    assert json.loads(row["group"])["d"] == 2
    names = {name for name, _ in skipped}
    assert {"gmm-3-error-vs-N", "mor-1-em-vs-M-high"} <= names  # no evals: said, not faked
    slow, _ = verdicts.evaluate({"trials": _synthetic(-0.5), "evals": pd.DataFrame()})
    assert slow.verdict.tolist() == ["violated"]
    two, _ = verdicts.evaluate({"trials": _synthetic(-1.0, seeds=2).assign(opt_g=lambda d: d.opt_g * np.exp(0.2 * np.sin(d.N + d.seed))), "evals": pd.DataFrame()})
    assert two.verdict.tolist() == ["inconclusive"]


def test_a_window_that_excludes_all_data_and_a_sweep_too_small_are_said():
    small = _synthetic(-1.0, levels=(10, 20, 40))
    rows, skipped = verdicts.evaluate({"trials": small, "evals": pd.DataFrame()})
    why = dict(skipped)["gmm-2-optimum-vs-N"]
    assert rows.empty and "no rows in the window N >= 50 (the data has N = 10, 20, 40)" in why and "needs 4 or more values of N >= 50" in why
    few = _synthetic(-1.0, levels=(50, 100, 200))
    (row,) = verdicts.evaluate({"trials": few, "evals": pd.DataFrame()})[0].to_dict("records")
    assert row["verdict"] == "inconclusive" and np.isnan(row["estimate"]) and "the corrected law needs 4" in row["note"]
    assert abs(row["plain_slope"] + 1) < 0.05  # said beside it


def test_the_sign_of_a_signed_metric_is_fitted_out():
    neg, pos = _synthetic(-1.0), _synthetic(-1.0).assign(opt_g=lambda d: -d.opt_g)
    a = verdicts.evaluate({"trials": neg, "evals": pd.DataFrame()})[0]
    b = verdicts.evaluate({"trials": pos, "evals": pd.DataFrame()})[0]
    assert a["estimate"].iloc[0] == pytest.approx(b["estimate"].iloc[0]) and a["verdict"].iloc[0] == "within"
    noise = _synthetic(-1.0).assign(opt_g=lambda d: 0.01 * np.sin(7 * d.index))  # no sign to speak of
    rows, skipped = verdicts.evaluate({"trials": noise, "evals": pd.DataFrame()})
    assert rows.empty and any("not positive" in r or "resamples" in r for n, r in skipped if n == "gmm-2-optimum-vs-N")


def test_claims_run_on_a_real_store(store):
    rows, skipped = verdicts.evaluate(load(store).tables)
    assert isinstance(rows, pd.DataFrame) and skipped  # a tiny store: mostly too few points, each said why
    assert all(reason for _, reason in skipped)


def test_fit_verb_writes_the_fits_table(store, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from pipelines.cli import app

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    trials = pd.read_parquet(copy / "trials")
    extra = _synthetic(-1.0).assign(family=None)  # enough points for one real fit, in its own file
    extra = extra.reindex(columns=[c for c in trials.columns if c != "family"]).assign(
        run_id=lambda d: "syn-" + d.index.astype(str), model="lsa", status="ok", schema_version=SCHEMA_VERSION, opt_converged=True, opt_g=_synthetic(-1.0).opt_g
    )
    extra.to_parquet(copy / "trials" / "family=gmm" / "part-synthetic.parquet", index=False, schema=None)
    result = CliRunner().invoke(app, ["fit", "--store", str(copy)])
    assert result.exit_code == 0, result.output
    fits_table = pd.read_parquet(copy / "fits")
    assert {"claim", "kind", "estimate", "ci_low", "ci_high", "theory", "tolerance", "verdict", "window", "n_points", "method", "group", "family", "plain_slope", "note"} <= set(fits_table.columns)
    row = fits_table[fits_table.claim == "gmm-2-optimum-vs-N"].iloc[0]
    assert row["d"] == json.loads(row["group"])["d"] == 2  # group fields are columns too
    assert "skipped" in result.output
    assert CliRunner().invoke(app, ["fit", "--store", str(tmp_path / "none")]).exit_code == 2


def _curves(rho_true, rho_theory, runs=3, status="ok", steps=300, every=10, floor=1e-15):
    """Synthetic training curves subopt_t = rho^(2t) above a float-noise floor, with their trials rows."""
    rng = np.random.default_rng(5)
    trials, curves = [], []
    for seed in range(runs):
        rid = f"{status}-{rho_true}-{seed}"
        trials.append(dict(family="mor", run_id=rid, seed=seed, N=10, d=2, K=2, snr=1.0, lr=0.1, status=status, rho_theory=rho_theory, opt_loss=1.0))
        t = np.arange(0, steps + 1, every)
        v = rho_true ** (2 * t) * np.exp(0.01 * rng.standard_normal(len(t)))
        curves += [dict(run_id=rid, step=int(s), subopt=float(max(x, floor * rng.random()))) for s, x in zip(t, v)]
    trials = pd.DataFrame(trials)
    return trials, pd.DataFrame(curves).merge(trials, on="run_id")


def test_rate_claim_judges_the_ratio_of_log_rates():
    rate_claim = tuple(c for c in claims.CLAIMS if c.name == "gmm-1-rate")
    good_t, good_c = _curves(0.96, 0.96)
    slow_t, slow_c = _curves(0.98, 0.96)  # slower than predicted: what would contradict the theory
    bad_t, bad_c = _curves(0.96, 0.96, runs=2, status="diverged")
    fast_t, fast_c = _curves(0.5, 0.5, runs=1)  # at the floor within 3 logged points
    data = {"trials": pd.concat([good_t, slow_t, bad_t, fast_t]).assign(family="gmm"), "curves": pd.concat([good_c, slow_c, bad_c, fast_c]).assign(family="gmm")}
    rows, skipped = verdicts.evaluate(data, rate_claim)
    assert len(rows) == 6 and ("gmm-1-rate", "2 runs excluded: not ok, or no predicted rate or optimum") in skipped
    verdict = rows.set_index(rows["group"].map(lambda g: json.loads(g)["run_id"]))["verdict"]
    assert (verdict[verdict.index.str.startswith("ok-0.96")] == "consistent").all()
    assert (verdict[verdict.index.str.startswith("ok-0.98")] == "shallower").all()  # log rate 49% of the prediction
    good = rows[rows["theory"] == 0.96].iloc[0]
    assert abs(good["estimate"] - 0.96) < 1e-3 and good["r2"] > 0.99 and good["window"].startswith("1")
    assert any("1 curves: fewer than 3 logged points" in reason for _, reason in skipped)


def test_curve_claim_sets_each_curve_beside_its_prediction():
    claim = tuple(c for c in claims.CLAIMS if c.name == "mor-3-rate")
    trials, curves = _curves(0.96, 0.96)
    trials, curves = trials.assign(param="reduced"), curves.assign(param="reduced")
    exact = curves.assign(subopt_theory=curves["subopt"])
    off = curves.assign(subopt_theory=curves["subopt"] * 0.9)  # the measured curve 11% above its prediction
    rows, _ = verdicts.evaluate({"trials": trials, "curves": exact}, claim)
    assert (rows["verdict"] == "consistent").all() and (rows["estimate"].abs() < 1e-12).all()
    rows, _ = verdicts.evaluate({"trials": trials, "curves": off}, claim)
    assert (rows["verdict"] == "shallower").all() and rows["estimate"].iloc[0] == pytest.approx(np.log(1 / 0.9))


def test_missing_columns_are_said_not_crashed_on(store, tmp_path):
    trials = _synthetic(-1.0).drop(columns=["opt_g"])
    rows, skipped = verdicts.evaluate({"trials": trials, "evals": pd.DataFrame()})
    why = dict(skipped)["gmm-2-optimum-vs-N"]
    assert rows.empty and why.startswith("the trials table has no column opt_g (a store written before schema 3: re-run the sweep")
    rows, skipped = verdicts.evaluate({"trials": _synthetic(-1.0).drop(columns=["opt_converged", "B"]), "evals": pd.DataFrame()})
    assert rows.empty and dict(skipped)["gmm-2-optimum-vs-N"].startswith("the trials table has no column B, opt_converged")  # never fitted unfiltered
    import pyarrow.parquet as pq

    src = next((store / "trials").glob("family=gmm/part-*.parquet"))
    (tmp_path / "bare" / "trials" / "family=gmm").mkdir(parents=True)
    pq.write_table(pq.read_table(src).drop(["schema_version"]), tmp_path / "bare" / "trials" / "family=gmm" / src.name)
    with pytest.raises(StoreReadError, match="no column schema_version"):
        load(tmp_path / "bare")


def test_a_schema_2_store_is_read_with_its_migration_path(store, tmp_path):
    """A store written before schema 3 still fits the claims it can, and says what re-fitting and
    re-running give; `run` refuses to add to it."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pipelines.cli import app

    old = tmp_path / "old"
    shutil.copytree(store, old)
    for path in (old / "trials").glob("family=*/part-*.parquet"):
        t = pq.read_table(path).drop(["opt_g", "opt_noise", "final_dist_theory"])
        pq.write_table(t.set_column(t.schema.get_field_index("schema_version"), "schema_version", pa.array([2] * t.num_rows, pa.int64())), path)
    loaded = load(old)
    assert "re-run the sweeps into a new --store" in loaded.notes[0]
    result = CliRunner().invoke(app, ["fit", "--store", str(old)])
    assert result.exit_code == 0 and "schema version 2" in result.output and "a store written before schema 3" in result.output
    from pipelines.store import Store, StoreError

    with pytest.raises(StoreError, match="run the sweep into a new --store"):
        Store(old).done_runs()


def test_fits_of_an_earlier_version_ask_for_a_refit(rich_store, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from pipelines.cli import app

    store = tmp_path / "s"
    shutil.copytree(rich_store, store)
    assert CliRunner().invoke(app, ["fit", "--store", str(store)]).exit_code == 0
    for path in (store / "fits").glob("family=*/fits.parquet"):
        pd.read_parquet(path).drop(columns=["kind", "tolerance"]).to_parquet(path)
    result = CliRunner().invoke(app, ["report", "--store", str(store)])
    assert result.exit_code == 2 and "run `icl-study fit" in result.output


def test_nan_values_are_excluded_and_counted():
    trials = _synthetic(-1.0)
    trials.loc[trials.index[trials.N >= 50][:3], "opt_g"] = np.nan  # in the window
    (row,) = verdicts.evaluate({"trials": trials, "evals": pd.DataFrame()})[0].to_dict("records")
    assert row["excluded"] == 3 and row["verdict"] == "within"
    trials["opt_g"] = np.nan
    rows, skipped = verdicts.evaluate({"trials": trials, "evals": pd.DataFrame()})
    assert rows.empty and dict(skipped)["gmm-2-optimum-vs-N"] == "all 30 rows excluded (runs not ok, or NaN or non-positive values)"


@pytest.fixture(scope="module")
def rich_store(tmp_path_factory):
    """A small store with data for every figure: N, M and B levels, both families, logged curves."""
    gmm = {"family": "gmm", "fixed": {"d": 2, "snr": 1.0, "lr": 2.0, "steps": 30, "log_every": 2, "M": [4, 16, 64, "inf"], "n_eval": 64}, "grid": {"N": [5, 50, 100, 200], "B": [256, 512]}}
    kwon = {  # [K]'s model, EM only: the minimiser alone (steps 0) keeps the LSA cheap
        "family": "mor",
        "fixed": {"d": 2, "K": 2, "symmetric": True, "sigma": 1.0, "lr": 0.1, "steps": 0, "N": 5, "B": 64, "M": [32, 64, 128], "n_eval": 32, "estimators": ["em"], "em_iters": 5},
        "grid": {"snr": [0.5, 4.0], "em_restarts": [1, 4]},
    }
    mor = {
        "family": "mor",
        "fixed": {"d": 2, "snr": 2.0, "sigma": 0.5, "lr": 0.1, "steps": 30, "log_every": 2, "N": 5, "M": [4, 8, 16, "inf"], "n_eval": 32, "em_iters": 5},
        "grid": {"B": [64, 128, 256]},
    }
    return _execute(tmp_path_factory.mktemp("rich"), {"name": "rich", "seeds": 2, "parts": [gmm, mor, kwon]})


def test_report_builds_every_figure_from_a_small_store(rich_store, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from analysis.plots import FIGURES
    from pipelines.cli import app

    store = tmp_path / "s"
    shutil.copytree(rich_store, store)
    runner = CliRunner()
    no_fits = runner.invoke(app, ["report", "--store", str(store)])
    assert no_fits.exit_code == 2 and "icl-study fit" in no_fits.output
    assert runner.invoke(app, ["fit", "--store", str(store)]).exit_code == 0
    result = runner.invoke(app, ["report", "--store", str(store), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'rep' / 'report.html'}" in result.output
    for name in FIGURES:
        png = tmp_path / "rep" / "figures" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 5000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES) and "Verdicts" in page and "rich" in page
    assert "`" not in page and "<code>within</code>" in page  # report.md's inline code, as HTML
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| claim" in md and "mor-3-rate" in md and all(f"figures/{n}.png" in md for n in FIGURES)
    assert "## Claims skipped" in md  # the small store cannot support every claim: each is said
    assert runner.invoke(app, ["report", "--store", str(tmp_path / "none")]).exit_code == 2
    # fits outlive their data: the report leaves them out and says so, and draws what it still can
    for table in ("trials", "curves", "evals", "params"):
        shutil.rmtree(store / table / "family=mor")
    shutil.rmtree(store / "curves" / "family=gmm")
    stale = runner.invoke(app, ["report", "--store", str(store), "--out", str(tmp_path / "rep")])
    assert stale.exit_code == 0, stale.output
    assert "fits of mor left out" in (tmp_path / "rep" / "report.md").read_text()
    assert not (tmp_path / "rep" / "figures" / "mor_estimators.png").exists()  # an earlier report's figure is removed


def test_bands_are_seaborns_bootstrap_interval_seeded():
    """The figures' bands (plots._ci95, one array draw) are seaborn's errorbar=("ci", 95) for the
    mean with its bootstrap seeded 0: the same resamples, the same numbers, NaN-aware, in blocks."""
    from seaborn.algorithms import bootstrap

    from analysis.plots import _ci95

    for n in (2, 3, 7, 9000):  # 9000: resampled in blocks of fewer than 1000
        x = np.random.default_rng(n).lognormal(size=n)
        x[1] = np.nan if n == 7 else x[1]
        assert _ci95(pd.Series(x)) == tuple(np.nanpercentile(bootstrap(x, n_boot=1000, func="mean", seed=0), (2.5, 97.5)))


def test_report_is_the_same_drawn_in_workers_or_here(rich_store, tmp_path, monkeypatch):
    """Figures drawn by forked workers, here one after another, or here because the workers cannot
    start: the same Markdown, the same figures byte for byte (the bootstrap bands are seeded), and
    the HTML embeds the very bytes of the files."""
    import base64
    import re
    import shutil

    from typer.testing import CliRunner

    from analysis import report
    from pipelines.cli import app

    store = tmp_path / "s"
    shutil.copytree(rich_store, store)
    assert CliRunner().invoke(app, ["fit", "--store", str(store)]).exit_code == 0
    built = {w: report.build(store, tmp_path / f"w{w}", workers=w) for w in (1, 2)}

    class NoProcesses:
        def __init__(self, *args, **kwargs):
            raise OSError("no processes here")

    monkeypatch.setattr(report, "ProcessPoolExecutor", NoProcesses)
    built["none"] = report.build(store, tmp_path / "wnone", workers=2)
    first = built[1]
    assert len(first.figures) >= 8
    for other in (built[2], built["none"]):
        assert other.markdown.read_text() == first.markdown.read_text()
        assert list(other.figures) == list(first.figures)
        for name, path in first.figures.items():
            assert other.figures[name].read_bytes() == path.read_bytes(), name
    page = built[2].html.read_text()
    embedded = {n: d for d, n in re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="(\w+)"', page)}
    assert {n: base64.b64decode(d) for n, d in embedded.items()} == {n: p.read_bytes() for n, p in built[2].figures.items()}


def test_comparison_claim_pairs_the_model_with_the_baseline_by_seed():
    rng = np.random.default_rng(7)
    rows = []
    config = dict(family="mor", status="ok", d=4, K=2, snr=1.0, sigma=0.5, components="fresh", assignment="sample", symmetric=False, cov="identity", kappa=1.0, N=10, B=64, param="reduced", lr=0.1)
    for seed in range(6):
        for M, factor in ((8, 0.5), (512, 1.5)):  # the model wins at small M and loses at large M
            base = float(np.exp(rng.standard_normal()))
            for est, v in (("em", base), ("lsa", base * factor * np.exp(0.02 * rng.standard_normal()))):
                rows.append(dict(run_id=f"r{seed}", estimator=est, metric="excess_mse", M=float(M), shift="none", value=v, **config, seed=seed))
    evals = pd.DataFrame(rows)
    trials = evals.drop_duplicates("run_id").drop(columns=["estimator", "metric", "M", "shift", "value"])
    trials = pd.concat([trials, trials.iloc[:1].assign(run_id="diverged", seed=99, status="diverged")])
    claim = tuple(c for c in claims.CLAIMS if c.name == "mor-4-lsa-vs-em")
    out, skipped = verdicts.evaluate({"evals": evals, "trials": trials}, claim)
    assert not skipped and out.set_index("window")["verdict"].to_dict() == {"M=8": "within", "M=512": "violated"}  # margin: log ratio 0.1
    assert out.set_index("window").loc["M=512", "estimate"] == pytest.approx(np.log(1.5), abs=0.02)
    assert (out["n_points"] == 6).all() and (out["excluded"] == 1).all()  # the diverged run, at each M
    group = json.loads(out["group"].iloc[0])
    assert group["snr"] == 1 and "lr" not in group  # 1.0 -> 1; constant fields beyond the named ones left out
    lr = evals.assign(lr=np.where(evals.seed < 3, 0.1, 0.2))  # a second configuration: its own groups, never mixed
    split, _ = verdicts.evaluate({"evals": lr, "trials": trials}, claim)
    assert len(split) == 4 and sorted(json.loads(g)["lr"] for g in split["group"]) == [0.1, 0.1, 0.2, 0.2]
    alone, why = verdicts.evaluate({"evals": evals[evals.estimator == "lsa"], "trials": trials}, claim)
    assert alone.empty and "needs rows of both lsa and em" in why[0][1]
    shifted = pd.concat([evals, evals.assign(shift="noise(2)", value=np.where(evals.estimator == "lsa", 10.0, 1.0) * evals.value)])
    same, _ = verdicts.evaluate({"evals": shifted, "trials": trials}, claim)  # a claim about the training distribution ignores shifted rows
    pd.testing.assert_frame_equal(same, out)


def test_kwon_regimes_label_each_point_and_are_fitted_apart():
    """[J] claim 1 in [K]'s model: low where eta <= (d/M)^(1/4), high where eta >= 1, middle between;
    each regime gets its own fit, and a rate slower than the regime's bound is violated."""
    pts = pd.DataFrame({"snr": [0.1, 0.5, 0.5, 4.0, 4.0], "d": [4, 4, 4, 4, 4], "M": [64.0, 64.0, 128.0, 64.0, np.inf]})
    regime = claims.snr_regime(pts)
    assert regime[:4].tolist() == ["low", "low", "middle", "high"] and pd.isna(regime[4])  # M = inf: no regime
    rng = np.random.default_rng(11)
    rows = []
    for eta, law in ((0.1, lambda d, M: (d / M) ** 0.25), (4.0, lambda d, M: (d / M) ** 0.5), (8.0, lambda d, M: (d / M) ** 0.3)):
        for seed in range(6):
            for M in (64, 128, 256, 512, 1024):
                config = dict(family="mor", status="ok", d=4, K=2, snr=eta, sigma=1.0, components="fresh", assignment="sample", symmetric=True, cov="identity", kappa=1.0)
                rows.append(dict(run_id=f"{eta}-{seed}", estimator="em", metric="param_error", M=float(M), shift="none", value=law(4, M) * np.exp(0.01 * rng.standard_normal()), seed=seed, **config))
    evals = pd.DataFrame(rows)
    trials = evals.drop_duplicates("run_id").drop(columns=["estimator", "metric", "M", "shift", "value"])
    kinds = tuple(c for c in claims.CLAIMS if c.name.startswith("mor-1-em-vs-M"))
    out, skipped = verdicts.evaluate({"evals": evals, "trials": trials}, kinds)
    got = {(r["claim"], r["snr"]): r["verdict"] for r in out.to_dict("records")}
    assert got == {("mor-1-em-vs-M-low", 0.1): "within", ("mor-1-em-vs-M-high", 4): "within", ("mor-1-em-vs-M-high", 8): "violated"}
    assert "mor-1-em-vs-M-middle" in dict(skipped)  # no point in the middle regime: said
    asym = evals.assign(symmetric=False)  # outside [K]'s model: not fitted
    assert verdicts.evaluate({"evals": asym, "trials": trials.assign(symmetric=False)}, kinds)[0].empty


def test_a_shift_floor_is_judged_per_shift_against_the_unshifted_rows():
    """gmm-5-shift-floor-lsa: under a shift with a floor the unshifted error is far below the
    shifted one at M >= N (within); a shift that changes nothing is violated; M < N is not read."""
    rng = np.random.default_rng(3)
    config = dict(family="gmm", status="ok", model="lsa", d=4, c=2, snr=2.0, cov="identity", kappa=1.0, symmetric=False, N=40, B=4096, param="reduced")
    rows = []
    for seed in range(6):
        for M in (10.0, 40.0, 160.0, 640.0):
            base = 0.2 / np.sqrt(M) * np.exp(0.05 * rng.standard_normal())
            for shift, v in (("none", base), ("cov_scale(3)", base + 0.05), ("mean_norms(1.01)", base * np.exp(0.01 * rng.standard_normal()))):
                rows.append(dict(run_id=f"r{seed}", estimator="lsa", metric="tv_error", M=M, shift=shift, value=v, seed=seed, **config))
    evals = pd.DataFrame(rows)
    trials = evals.drop_duplicates("run_id").drop(columns=["estimator", "metric", "M", "shift", "value"])
    claim = (claims.BY_NAME["gmm-5-shift-floor-lsa"],)
    out, skipped = verdicts.evaluate({"evals": evals, "trials": trials}, claim)
    assert not skipped, skipped
    got = out.set_index("window")["verdict"].to_dict()
    assert got == {"M=40 cov_scale(3)": "within", "M=160 cov_scale(3)": "within", "M=640 cov_scale(3)": "within",
                   "M=40 mean_norms(1.01)": "violated", "M=160 mean_norms(1.01)": "violated", "M=640 mean_norms(1.01)": "violated"}
    alone, why = verdicts.evaluate({"evals": evals[evals["shift"] == "none"], "trials": trials}, claim)
    assert alone.empty and "at least one shift" in why[0][1]


@pytest.mark.parametrize("slope, verdict", [(-0.5, "within"), (-0.2, "violated")])
def test_the_erm_transformer_bound_in_B_can_fail(slope, verdict):
    """mor-2-transformer-vs-B on synthetic excess_mse = C B^slope (1 + 5/B) with seed noise; only
    transformer rows with online: false at M = N are read."""
    rng = np.random.default_rng(11)
    config = dict(family="mor", status="ok", model="transformer", layers=2, width=32, heads=4, mlp=True, attention="softmax", positions="none", d=4, K=2, snr=2.0,
                  sigma=0.5, components="fresh", assignment="sample", symmetric=False, cov="identity", kappa=1.0, N=20)
    rows = []
    for online in (False, True):
        for seed in range(8):
            for B in (256, 1024, 4096, 16384, 65536):
                for M in (10.0, 20.0):
                    v = 3.0 * B**slope * (1 + 5 / B) * np.exp(0.03 * rng.standard_normal()) * (1 if M == 20 and not online else 50)
                    rows.append(dict(run_id=f"{online}-{seed}-{B}", estimator="transformer", metric="excess_mse", M=M, shift="none", value=v, seed=seed, B=B, online=online, **config))
    evals = pd.DataFrame(rows)
    trials = evals.drop_duplicates("run_id").drop(columns=["estimator", "metric", "M", "shift", "value"])
    out, skipped = verdicts.evaluate({"evals": evals, "trials": trials}, (claims.BY_NAME["mor-2-transformer-vs-B"],))
    assert not skipped and len(out) == 1, skipped
    assert out["verdict"].iloc[0] == verdict and json.loads(out["group"].iloc[0])["layers"] == 2


def test_an_excess_that_is_negative_for_some_seeds_keeps_them():
    """excess_mse over the oracle on the same prompts can fall below 0 for a seed at large B (its
    noise exceeds the excess). Dropping such seeds, as a positive metric's rows are dropped, kept
    the seeds whose noise was high at large B: the tail biased up, B^-0.5 read as violated (7 of
    10 draws). Every finite value is kept; the law needs a positive seed mean."""
    rng = np.random.default_rng(4)
    config = dict(family="mor", status="ok", model="transformer", layers=2, width=32, heads=4, mlp=True, attention="softmax", positions="none", d=4, K=2, snr=2.0,
                  sigma=0.5, components="fresh", assignment="sample", symmetric=False, cov="identity", kappa=1.0, N=20, online=False)
    rows = []
    for seed in range(64):
        for B in (256, 1024, 4096, 16384, 65536):
            v = 3.0 * B**-0.5 * (1 + 5 / B) * np.exp(0.03 * rng.standard_normal()) + 0.015 * rng.standard_normal()
            rows.append(dict(run_id=f"{seed}-{B}", estimator="transformer", metric="excess_mse", M=20.0, shift="none", value=v, seed=seed, B=B, **config))
    evals = pd.DataFrame(rows)
    assert (evals["value"] < 0).any()
    trials = evals.drop_duplicates("run_id").drop(columns=["estimator", "metric", "M", "shift", "value"])
    out, skipped = verdicts.evaluate({"evals": evals, "trials": trials}, (claims.BY_NAME["mor-2-transformer-vs-B"],))
    row = out.iloc[0]
    assert row["excluded"] == 0 and row["verdict"] != "violated" and row["ci_low"] <= -0.5 <= row["ci_high"], row.to_dict()


def test_a_seed_missing_a_run_it_averages_over_is_left_out_at_that_x():
    """gmm-2-noise-vs-B averages opt_noise over N; it is 10x larger at N = 10 than at N = 1000. A
    seed whose N = 10 run failed at the largest B averaged N = 1000 alone there: its point fell
    10x, and with 16 such seeds of 24 the B^-0.5 law read `steeper` (-0.67). That seed's point at
    that B is left out (and counted in `excluded`)."""
    rng = np.random.default_rng(0)
    config = dict(family="gmm", d=2, c=2, snr=1.0, cov="identity", kappa=1.0, symmetric=False, param="reduced", opt_converged=True)
    rows = [dict(run_id=f"{seed}-{N}-{B}", seed=seed, N=N, B=B, status="ok", opt_noise=(1.0 if N == 10 else 0.1) * B**-0.5 * np.exp(0.03 * rng.standard_normal()), **config)
            for seed in range(24) for N in (10, 1000) for B in (1024, 4096, 16384, 65536)]
    trials = pd.DataFrame(rows)
    trials.loc[(trials.seed < 16) & (trials.N == 10) & (trials.B == 65536), "status"] = "diverged"
    out, _ = verdicts.evaluate({"trials": trials, "evals": pd.DataFrame()}, (claims.BY_NAME["gmm-2-noise-vs-B"],))
    row = out.iloc[0]
    assert row["verdict"] == "consistent" and abs(row["estimate"] + 0.5) < 0.01 and row["excluded"] == 32, row.to_dict()


def test_a_log_axis_is_labelled_at_the_data_levels_without_crowded_minor_labels():
    """gmm_error_vs_N's N axis (issue: its labels overlapped): one label per N level, no minor labels."""
    from analysis.plots import _scaling

    df = pd.DataFrame([dict(N=float(N), value=1.0 / N, seed=s, run_id=f"{N}-{s}", snr=1.0) for N in (50, 100, 200, 400) for s in range(2)])
    fig = _scaling(df, "N", "value", -1.0, "slope -1", "t", col="snr")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == ["50", "100", "200", "400"]
    assert not [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHECK = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const markdown = (document.body.innerText.match(/`|\\*\\*|^#{1,6} |\\]\\(/gm) || []);
  document.title = "CHECK" + JSON.stringify({images: imgs.length, broken, markdown});
});</script>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine (Debian: apt-get install chromium)")
def test_the_report_renders_in_a_real_browser(rich_store, tmp_path):
    """report.html in headless Chromium: every figure loads (naturalWidth > 0) and no Markdown
    syntax (backticks, **, # headings, links) shows as text."""
    import json
    import re
    import subprocess

    from typer.testing import CliRunner

    from analysis.plots import FIGURES
    from pipelines.cli import app

    store = tmp_path / "s"
    shutil.copytree(rich_store, store)
    runner = CliRunner()
    assert runner.invoke(app, ["fit", "--store", str(store)]).exit_code == 0
    assert runner.invoke(app, ["report", "--store", str(store), "--out", str(tmp_path / "rep")]).exit_code == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"<title>CHECK(.*?)</title>", dom, re.S)
    assert found, dom[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result == {"images": len(FIGURES), "broken": [], "markdown": []}, result


def test_report_shows_values_literally_and_colours_verdicts():
    """A sweep's name or a group is a value, not Markdown: a pipe does not split its cell, underscores
    do not embolden, a tag is text; verdict cells get their class; figure names are plain words
    (the page embeds each by its name)."""
    from analysis.plots import FIGURES
    from analysis.report import _html, _table_md

    df = pd.DataFrame({"sweep": ["a|b", "__init__", "<b>x", "B=16384 N=40"], "ok": [1, 2, 3, 4], "verdict": ["within", "violated", "inconclusive", "consistent"]})
    page = _html(_table_md(df), {})
    cells = re.findall(r"<td[^>]*>(.*?)</td>", page)
    assert cells[0::3] == ["a|b", "__init__", "&lt;b&gt;x", "B=16384 N=40"] and cells[1::3] == ["1", "2", "3", "4"]
    assert re.findall(r"class='(\w+)'>(\w+)</td>", page) == [(v, v) for v in df["verdict"]]
    assert "<b>" not in page and "<strong>" not in page
    assert all(re.fullmatch(r"\w+", name) for name in FIGURES)


def test_an_lsa_claim_reads_the_lsa_runs_of_a_mixed_store_alone(tmp_path):
    """Transformer runs in the groups of the LSA's claims (the same task, N and M) change none of
    their fits: not the estimates, not the `excluded` counts, not a skip; and the transformer's own
    claims read only transformer runs."""
    tiny = {"model": "transformer", "layers": 1, "width": 8, "heads": 2, "steps": 4, "batch": 8, "B": None, "lr": 1e-3}
    gmm = {"family": "gmm", "fixed": {"d": 2, "snr": 1.0, "B": 256, "lr": 2.0, "steps": 30, "log_every": 2, "M": [4, 16, 64, "inf"], "n_eval": 64}, "grid": {"N": [5, 50, 100, 200]}}
    mor_fixed = {"d": 2, "snr": 2.0, "sigma": 0.5, "N": 5, "lr": 0.1, "steps": 30, "log_every": 2, "M": [4, 8, 16, "inf"], "n_eval": 32, "em_iters": 5}
    mor = {"family": "mor", "fixed": mor_fixed, "grid": {"B": [64, 128, 256]}}
    kwon = {  # [K]'s model, EM's claims: its rows repeat for every run of the same prompts, whichever the model
        "family": "mor",
        "fixed": {"d": 2, "K": 2, "symmetric": True, "sigma": 1.0, "lr": 0.1, "steps": 0, "N": 5, "B": 64, "M": [32, 64, 128], "n_eval": 32, "estimators": ["em"], "em_iters": 5},
        "grid": {"snr": [0.5, 4.0]},
    }
    parts = [gmm, mor, kwon]
    for part in (gmm, mor, kwon):  # the same tasks, N and M, trained as transformers
        fixed = {k: v for k, v in part["fixed"].items() if k not in ("B", "lr", "steps", "log_every")}
        grid = {k: v for k, v in part["grid"].items() if k != "B"} or {"N": [part["fixed"]["N"]]}
        parts.append({"family": part["family"], "fixed": {k: v for k, v in {**fixed, **tiny}.items() if k not in grid}, "grid": grid})
    tables = load(_execute(tmp_path, {"name": "mixed", "seeds": 2, "parts": parts})).tables
    assert set(tables["trials"]["model"]) == {"lsa", "transformer"}
    lsa_only = {name: df[df["model"] == "lsa"] for name, df in tables.items()}
    mixed_rows, mixed_skips = verdicts.evaluate(tables)
    alone_rows, alone_skips = verdicts.evaluate(lsa_only)
    about_lsa = [c.name for c in claims.CLAIMS if c.model == "lsa"]
    pick = lambda rows: rows[rows["claim"].isin(about_lsa)].reset_index(drop=True)  # noqa: E731
    assert len(pick(alone_rows)) >= 20
    alone = pick(alone_rows)
    pd.testing.assert_frame_equal(pick(mixed_rows)[alone.columns], alone)  # the mixed table also has the transformer claims' group columns
    assert [s for s in mixed_skips if s[0] in about_lsa] == [s for s in alone_skips if s[0] in about_lsa]
    baseline = [c.name for c in claims.CLAIMS if c.model is None]  # EM's claims: the same groups and verdicts, the same numbers up to the order of a sum
    em_mixed, em_alone = mixed_rows[mixed_rows["claim"].isin(baseline)].reset_index(drop=True), alone_rows[alone_rows["claim"].isin(baseline)].reset_index(drop=True)
    assert len(em_alone) > 0 and len(em_mixed) == len(em_alone)
    assert (em_mixed[["claim", "group", "verdict", "n_points", "excluded"]] == em_alone[["claim", "group", "verdict", "n_points", "excluded"]]).all().all()
    assert np.allclose(em_mixed["estimate"], em_alone["estimate"], rtol=1e-12, atol=0, equal_nan=True)
    transformer_rows = mixed_rows[mixed_rows["claim"].isin([c.name for c in claims.CLAIMS if c.model == "transformer"])]
    assert len(transformer_rows) and (transformer_rows["excluded"] == 0).all()


def test_local_slopes_seed_averaged_curves_equal_the_per_group_computation(rich_store):
    """verdicts._seed_averaged_curves (two groupbys for all groups) against the plain per-group
    computation it replaced (`_points` on each group's frame, then the mean over seeds), bit for bit,
    on every exponent claim the rich store has data for (signed and excess laws among them)."""
    tables = verdicts._with_model(load(rich_store).tables)
    checked = 0
    for claim in claims.CLAIMS:
        if claim.law not in claims.EXPONENT_LAWS or isinstance(claim.x_min, str):
            continue
        df, _ = verdicts._select(claim, tables, window=False)
        if df.empty:
            continue
        data = df[verdicts._usable(df, claim) & (df[claim.x] <= claim.x_max)]
        group = verdicts._group_fields(claim, data)
        fast = verdicts._seed_averaged_curves(claim, data, group)
        plain = []
        for key, part in data.groupby(group, dropna=False, sort=True) if group else [((), data)]:
            pts = verdicts._points(claim, part)
            if claim.law == "excess":
                floor = pts[np.isinf(pts[claim.x])].set_index("seed")["y"]
                pts = pts[np.isfinite(pts[claim.x]) & pts["seed"].isin(floor.index)]
                pts = pts.assign(y=pts["y"] - pts["seed"].map(floor))
            plain.append((key, pts.groupby(claim.x)["y"].mean()))
        assert len(fast) == len(plain), claim.name
        for (k1, a), (k2, b) in zip(fast, plain):
            assert verdicts._keyed(k1) == verdicts._keyed(k2), claim.name
            pd.testing.assert_series_equal(a.rename("y"), b.rename("y"), check_exact=True, check_names=False, check_index_type=False)
        checked += 1
    assert checked >= 4
