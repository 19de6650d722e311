"""One bundle of runs, end to end: sample, train as one stack, evaluate, return table rows.

A run is a (configuration, seed). Runs whose configurations share `shape_key` train together as
one vectorised stack; runs that share their evaluation prompts (same data distribution, seed and
evaluation settings, e.g. an N sweep) are evaluated in one pass, so the baselines are computed
once and every model is compared on identical prompts. The baselines' rows are a pure function of
those prompts, so a process also keeps the most recent ones (`SHARED_ROWS`) for the next stack
that meets the same prompts with another shape (a B sweep: B is part of the shape), instead of
fitting EM or logistic regression again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from study.config import Run, TrialConfig, canonical_json, prompts_key, shape_key
from study.covariance import covariance
from study.families import FAMILIES
from study.rng import generator
from study.training import Problem, init_params, train


SHARED_ROWS = 256  # evaluation groups whose shared estimators' rows a process keeps
_shared_rows: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()


def clear_shared_rows() -> None:
    """Forget the kept rows (timings that must not profit from an earlier stack)."""
    _shared_rows.clear()


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


def _yq(yq: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Query labels: class indices stay integers, regression targets take the training precision."""
    return yq.to(device, dtype) if yq.is_floating_point() else yq.to(device)


def stack_problem(runs: list[Run], covs: list[Any], device: torch.device | str = "cpu") -> tuple[Problem, dict[str, torch.Tensor] | None]:
    """The training problem of a stack of runs (one shape) on `device`, and the full form's initial point."""
    cfg0 = runs[0].config
    dtype = getattr(torch, cfg0.train.dtype)
    param = cfg0.model.param
    family = FAMILIES[cfg0.task.family]
    targets = [family.target(r.config, c) for r, c in zip(runs, covs)]
    stats = [family.sample_train(r.config, c, r.seed) for r, c in zip(runs, covs)]
    prob = Problem(
        V=torch.stack([s.V for s in stats]).to(device, dtype),
        xq=torch.stack([s.xq for s in stats]).to(device, dtype),
        yq=_yq(torch.stack([s.yq for s in stats]), device, dtype),
        gram=torch.stack([s.gram for s in stats]).to(device, dtype) if param == "full" else None,
        lr=torch.tensor([r.config.train.lr for r in runs], dtype=dtype, device=device),
        target=torch.stack([t for t, _ in targets]).to(device, dtype),
        scale=targets[0][1],
        loss=family.loss,
    )
    init = None
    if param == "full":
        gens = [generator({"data": r.config.task.data_key(), "seed": r.seed}, "init") for r in runs]
        init = init_params(prob, "full", cfg0.model.init_scale, gens)
    return prob, init


def run_bundle(runs: list[Run], device: torch.device | str = "cpu") -> BundleOutput:
    """Train and evaluate a stack (runs of one shape); a diverged run is a result, not an error."""
    keys = {shape_key(r.config) for r in runs}
    if len(keys) != 1:
        raise ValueError(f"a stack's runs must share their shapes, got {sorted(keys)}")
    t0 = time.perf_counter()
    cfg0 = runs[0].config
    family = FAMILIES[cfg0.task.family]
    covs = [_cov(r.config) for r in runs]
    prob, init = stack_problem(runs, covs, device)
    res = train(prob, cfg0.model.param, cfg0.train.steps, cfg0.train.log_every, init)
    del prob

    out = BundleOutput()
    for i, r in enumerate(runs):
        diverged = int(res.diverged_at[i]) >= 0
        out.trials.append(
            dict(
                run_id=r.run_id,
                status="diverged" if diverged else "ok",
                steps_done=int(res.diverged_at[i]) if diverged else r.config.train.steps,
                final_train_loss=float(res.final_loss[i]),
                final_dist_theory=float(res.final_dist_theory[i]),
                opt_loss=float(res.opt_loss[i]),
                opt_converged=bool(res.opt_converged[i]),
                opt_dist_theory=float(res.opt_dist_theory[i]),
                opt_g=float(res.opt_g[i]),
                opt_noise=float(res.opt_noise[i]),
                rho_theory=float(res.rho_theory[i]),
                excess_risk=float("nan") if diverged else family.excess_risk(r.config, covs[i], {k: v[i] for k, v in res.params.items()}),
            )
        )
        c = res.curves
        for j, step in enumerate(c.steps):
            out.curves.append(
                dict(
                    run_id=r.run_id,
                    step=step,
                    train_loss=float(c.train_loss[j, i]),
                    subopt=float(c.subopt[j, i]),
                    dist_opt=float(c.dist_opt[j, i]),
                    dist_theory=float(c.dist_theory[j, i]),
                    subopt_theory=float(c.subopt_theory[j, i]),
                )
            )
        named = family.export({**res.params, **{f"{k}_opt": v for k, v in res.opt_params.items()}})
        for name, v in named.items():
            out.params.append(dict(run_id=r.run_id, name=name, shape=list(v.shape[1:]), values=v[i].reshape(-1).tolist()))

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
            params = None if int(res.diverged_at[i]) >= 0 else {k: v[i] for k, v in res.params.items()}
            own.update({f"{i}:{name}": e for name, e in family.member_estimators(runs[i].config, covs[i], params).items()})
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
        rows.sort(key=lambda row: (row["estimator"], row["M"], row["metric"]))  # the same order whether kept or not
        for i in members:
            for row in rows:
                owner, _, name = row["estimator"].rpartition(":")
                if owner in ("", str(i)):
                    out.evals.append(dict(run_id=runs[i].run_id, **{**row, "estimator": name}))

    wall = time.perf_counter() - t0
    for row in out.trials:
        row["wall_s"] = wall / len(runs)  # the bundle's wall time, shared equally
    return out
