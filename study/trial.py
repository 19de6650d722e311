"""One bundle of runs, end to end: sample, train as one stack, evaluate, return table rows.

A run is a (configuration, seed). Runs whose configurations share `shape_key` train together as
one vectorised stack; runs that share their evaluation prompts (same data distribution, seed and
evaluation settings, e.g. an N sweep) are evaluated in one pass, so the baselines are computed
once and every model is compared on identical prompts. The baselines' rows are a pure function of
those prompts, so a process also keeps the most recent ones (`SHARED_ROWS`) for the next stack
that meets the same prompts with another shape (a B sweep: B is part of the shape), instead of
fitting EM or logistic regression again; the samplers likewise keep the training blocks they have
drawn for the rest of the trial (`rng.drawn_blocks`), which the larger B of such a sweep share
with the smaller.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from study import estimators
from study.config import Run, TrialConfig, canonical_json, prompts_key, shape_key
from study.covariance import covariance
from study.families import FAMILIES
from study.models import MODELS
from study.rng import forget_drawn

SHARED_ROWS = 256  # evaluation groups whose shared estimators' rows a process keeps
_shared_rows: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()


def forget_kept() -> None:
    """Forget what this process keeps between stacks, the baselines' rows and the drawn training
    blocks (`rng.drawn_blocks`): timings that must not profit from an earlier stack."""
    _shared_rows.clear()
    forget_drawn()


@dataclass
class BundleOutput:
    """Rows of each table, keyed by run_id (the pipeline adds sweep and provenance columns)."""

    trials: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)


def _cov(cfg: TrialConfig):
    t = cfg.task
    return covariance(t.cov, t.d, t.kappa, t.cov_seed)


def run_bundle(runs: list[Run], device: torch.device | str = "cpu") -> BundleOutput:
    """Train and evaluate a stack (runs of one shape); a diverged run is a result, not an error."""
    keys = {shape_key(r.config) for r in runs}
    if len(keys) != 1:
        raise ValueError(f"a stack's runs must share their shapes, got {sorted(keys)}")
    t0 = time.perf_counter()
    cfg0 = runs[0].config
    family = FAMILIES[cfg0.task.family]
    covs = [_cov(r.config) for r in runs]
    fit = MODELS[cfg0.model.model].fit(runs, covs, device)

    out = BundleOutput()
    for i, r in enumerate(runs):
        out.trials.append(dict(run_id=r.run_id, **fit.trials[i]))
        out.curves.extend(dict(run_id=r.run_id, **row) for row in fit.curves[i])
        for name, v in fit.params[i].items():
            out.params.append(dict(run_id=r.run_id, name=name, shape=list(v.shape), values=v.reshape(-1).tolist()))

    # one evaluation pass per distinct set of evaluation prompts; the configuration's own estimators
    # (baselines) are evaluated once per process and prompts, the runs' models every time
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        key = canonical_json([prompts_key(r.config), r.seed, str(device)])
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        r0, cov0 = runs[members[0]], covs[members[0]]
        own = {}  # estimators that belong to one run (its trained model, ...), keyed "i:name"
        for i in members:
            est = {} if fit.estimators[i] is None else {cfg0.model.model: fit.estimators[i]}
            est |= estimators.per_run(runs[i].config, covs[i], fit.lsa[i])
            own.update({f"{i}:{name}": e for name, e in est.items()})
        kept = _shared_rows.get(key)
        rows = family.evaluate(r0.config, cov0, r0.seed, own, device, shared=kept is None) if own or kept is None else []
        if kept is None:
            kept = [row for row in rows if ":" not in row["estimator"]]
            _shared_rows[key] = kept
            while len(_shared_rows) > SHARED_ROWS:
                _shared_rows.popitem(last=False)
        else:
            _shared_rows.move_to_end(key)
            rows = rows + kept
        rows.sort(key=lambda row: (row["estimator"], row["shift"] != "none", row["shift"], row["M"], row["metric"]))  # the same order whether kept or not
        for i in members:
            for row in rows:
                owner, _, name = row["estimator"].rpartition(":")
                if owner in ("", str(i)):
                    out.evals.append(dict(run_id=runs[i].run_id, **{**row, "estimator": name}))

    wall = time.perf_counter() - t0
    for row in out.trials:
        row["wall_s"] = wall / len(runs)  # the bundle's wall time, shared equally
    return out
