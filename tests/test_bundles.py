"""Packing stacks into Ray trials, and the progress line's ETA."""

import io

import pytest

from pipelines.progress import Progress, duration
from pipelines.sweep import parse_sweep

DOC = {
    "name": "pack",
    "family": "gmm",
    "fixed": {"snr": 1.0, "lr": 1.0, "steps": 50, "B": 512, "M": [8, "inf"], "n_eval": 32},
    "grid": {"d": [2, 3, 4], "c": [2, 3], "N": [5, 10, 20, 40, 80]},
    "seeds": 4,
    "bundle_size": 4,
}


def seconds(run):  # a made-up cost: larger d costs more
    return 0.1 * run.config.task.d**2


@pytest.mark.parametrize("trial_s, min_trials", [(0.0, 32), (5.0, 1), (5.0, 8), (1e9, 8), (1e9, 1)])
def test_packing_keeps_every_run_once_and_never_splits_a_stack(trial_s, min_trials):
    sw = parse_sweep(DOC)
    stacks = sw.stacks()
    bundles = sw.bundles(seconds=seconds, trial_s=trial_s, min_trials=min_trials)
    runs = [r.run_id for b in bundles for r in b.runs]
    assert sorted(runs) == sorted(r.run_id for r in sw.runs)  # each run in exactly one trial
    of = {r.run_id: i for i, s in enumerate(stacks) for r in s}
    members = {}  # stack -> the trials holding its runs: exactly one
    for k, b in enumerate(bundles):
        for r in b.runs:
            members.setdefault(of[r.run_id], set()).add(k)
    assert all(len(v) == 1 for v in members.values())
    assert len(bundles) >= min(min_trials, len(sw.units(seconds=seconds, trial_s=trial_s)))
    cost = [sum(seconds(r) for r in b.runs) for b in bundles]
    assert cost == sorted(cost, reverse=True)  # largest first


def test_packing_amortises_small_stacks_up_to_the_target():
    sw = parse_sweep(DOC)
    n_stacks = len(sw.stacks())  # 30 stacks of 4 runs (6 shapes x 20 runs)
    total = sum(seconds(r) for r in sw.runs)
    bundles = sw.bundles(seconds=seconds, trial_s=total / 10, min_trials=1)
    assert len(bundles) < n_stacks / 2
    assert all(sum(seconds(r) for r in b.runs) >= total / 10 for b in bundles[:-1])
    assert len(sw.bundles(seconds=seconds, trial_s=0)) == n_stacks  # trial_s 0: one stack a trial


def test_stacks_that_share_evaluation_prompts_go_to_one_trial():
    """A B sweep: B is part of a stack's shape, not of its evaluation prompts. The stacks of one
    set of prompts form one unit, so one trial fits their baselines (EM) once, and the estimate
    counts the baselines once; a unit estimated above UNIT_TRIALS x trial_s is cut into stacks."""
    from pipelines import sweep as sweeps

    doc = {"name": "bs", "family": "mor", "fixed": {"d": 2, "K": 2, "N": 10, "lr": 0.1, "steps": 10, "M": [8, "inf"], "n_eval": 32, "estimators": ["oracle", "em"]},
           "grid": {"snr": [1.0, 5.0], "B": [64, 128, 256]}, "seeds": 2, "bundle_size": 2}
    sw = parse_sweep(doc)
    assert len(sw.stacks()) == 6  # 3 shapes (B) x 2 snr, each stack 2 seeds
    own, base = (lambda r: 1.0), (lambda r: 0.75)  # a run alone: 1 s, of which its baselines 0.75 s
    units = sw.units(seconds=own, shared=base, trial_s=10.0)
    assert len(units) == 2 and all(len({r.config.task.snr for r in u}) == 1 and len({r.config.train.B for r in u}) == 3 for u in units)
    bundles = sw.bundles(seconds=own, shared=base, trial_s=10.0, min_trials=32)
    assert sorted(len(b.runs) for b in bundles) == [6, 6]
    # the estimate: 6 runs of 0.25 s own work, and the baselines of 2 seeds once: 3 s, not 6 s
    assert sw.cost(units[0], own, base) == 6 * 0.25 + 2 * 0.75
    assert len(sw.units(seconds=own, shared=base, trial_s=3.0 / sweeps.UNIT_TRIALS - 1e-9)) == 6
    assert len(sw.units(seconds=own, shared=base, trial_s=0)) == 6


def test_eta_scales_the_elapsed_time_by_the_estimated_work_left():
    out = io.StringIO()
    p = Progress(bundles=3, runs=30, cost=10.0, stream=out, tty=False, every=0)
    p.t0 -= 4.0  # 4 s have passed
    p.finished("a" * 16, 10, 2.0, "10 runs")
    assert p.eta() == pytest.approx(4.0 * 8.0 / 2.0, rel=0.01)
    p.finished("b" * 16, 10, 3.0, "boom", failed=True)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[2/3 bundles] 20/30 runs, 10 failed, ETA ") and "bundle bbbbbbbb: boom" in line
    p.finished("b" * 16, 10, 3.0, "10 runs, run again")  # a later round replaces the failure
    assert out.getvalue().splitlines()[-1].startswith("[2/3 bundles] 20/30 runs, 0 failed, ETA ")
    assert duration(59) == "59s" and duration(61) == "1m01s" and duration(7500) == "2h05m" and duration(float("nan")) == "?"
