"""The models a trial can train, one adapter each behind `MODELS`.

An adapter trains a stack of runs (one `shape_key`, so one architecture and tensor shapes) and
gives, per run, its `trials` columns, its curve, its stored parameters and its estimator. The
estimator has every estimator's call signature (`study.evaluation`), so evaluation does not know
which model it meets. The model's torch-free half is its config class in `study.config`: its
fields and their validation, `shape` (what its stacks share, for `shape_key`), and `flops` and
`run_bytes` (what `pipelines.cost` plans with), because the planner must not import torch.

A new model is a config class in `study.config.MODEL_CONFIGS` and an adapter here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from study import transformer
from study.config import Run
from study.covariance import Covariance
from study.families import FAMILIES
from study.rng import generator
from study.training import Problem, init_params, train

NAN = float("nan")
# trials columns that only the LSA's training fills; other models leave them null
LSA_COLUMNS = ("final_dist_theory", "opt_loss", "opt_converged", "opt_dist_theory", "opt_g", "opt_noise", "rho_theory", "excess_risk")
EVAL_SCORES = 1 << 24  # attention scores a transformer evaluation chunk may hold


@dataclass
class StackFit:
    """Per run of a stack: its trials columns, curve rows, stored parameters, estimator (None if
    diverged) and the LSA parameters that the family's own estimators read (`lsa_projected`; None
    if diverged or for another model)."""

    trials: list[dict[str, Any]] = field(default_factory=list)
    curves: list[list[dict[str, Any]]] = field(default_factory=list)
    params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    estimators: list[Any] = field(default_factory=list)
    lsa: list[dict[str, torch.Tensor] | None] = field(default_factory=list)


def _yq(yq: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Query labels: class indices stay integers, regression targets take the training precision."""
    return yq.to(device, dtype) if yq.is_floating_point() else yq.to(device)


def _init_gens(runs: list[Run]) -> list[torch.Generator]:
    return [generator({"data": r.config.task.data_key(), "seed": r.seed}, "init") for r in runs]


class LSA:
    """The single-layer linear self-attention, trained by full-batch GD from sufficient statistics."""

    name = "lsa"

    @staticmethod
    def problem(runs: list[Run], covs: list[Covariance], device: torch.device | str = "cpu") -> tuple[Problem, dict[str, torch.Tensor] | None]:
        """The training problem of a stack of runs on `device`, and the full form's initial point."""
        cfg0 = runs[0].config
        dtype = getattr(torch, cfg0.train.dtype)
        family = FAMILIES[cfg0.task.family]
        targets = [family.target(r.config, c) for r, c in zip(runs, covs)]
        stats = [family.sample_train(r.config, c, r.seed) for r, c in zip(runs, covs)]
        full = cfg0.model.param == "full"
        prob = Problem(
            V=torch.stack([s.V for s in stats]).to(device, dtype),
            xq=torch.stack([s.xq for s in stats]).to(device, dtype),
            yq=_yq(torch.stack([s.yq for s in stats]), device, dtype),
            gram=torch.stack([s.gram for s in stats]).to(device, dtype) if full else None,
            lr=torch.tensor([r.config.train.lr for r in runs], dtype=dtype, device=device),
            target=torch.stack([t for t, _ in targets]).to(device, dtype),
            scale=targets[0][1],
            loss=family.loss,
        )
        init = init_params(prob, "full", cfg0.model.init_scale, _init_gens(runs)) if full else None
        return prob, init

    @classmethod
    def fit(cls, runs: list[Run], covs: list[Covariance], device: torch.device | str) -> StackFit:
        cfg0 = runs[0].config
        family = FAMILIES[cfg0.task.family]
        prob, init = cls.problem(runs, covs, device)
        res = train(prob, cfg0.model.param, cfg0.train.steps, cfg0.train.log_every, init)
        del prob
        out = StackFit()
        named = family.export({**res.params, **{f"{k}_opt": v for k, v in res.opt_params.items()}})
        for i, r in enumerate(runs):
            diverged = int(res.diverged_at[i]) >= 0
            params = None if diverged else {k: v[i] for k, v in res.params.items()}
            out.trials.append(
                dict(
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
                    excess_risk=NAN if diverged else family.excess_risk(r.config, covs[i], {k: v[i] for k, v in res.params.items()}),
                )
            )
            c = res.curves
            out.curves.append(
                [
                    dict(step=step, **{name: float(getattr(c, name)[j, i]) for name in ("train_loss", "subopt", "dist_opt", "dist_theory", "subopt_theory")})
                    for j, step in enumerate(c.steps)
                ]
            )
            out.params.append({name: v[i] for name, v in named.items()})
            out.estimators.append(None if params is None else family.lsa_estimator(params))
            out.lsa.append(params)
        return out


class Transformer:
    """The multi-layer transformer (`study.transformer`), trained by AdamW as one ensemble per stack.

    `online: true` draws `batch` fresh prompts per run and step (stream `online`, prefixed by the
    step); `online: false` draws B prompts once (stream `train`) and minibatches of `batch` from
    them (stream `batch`, without replacement within a step). The loss is the family's (cross-
    entropy on c' logits, binary: one logit; squared error / 2), averaged over the batch.
    """

    name = "transformer"

    @staticmethod
    def loss(readout: torch.Tensor, target: torch.Tensor, family: str) -> torch.Tensor:
        """Mean loss per run.  Shapes: readout [S, P, c'], target [S, P] -> [S]."""
        if family == "mor":
            return 0.5 * ((readout[..., 0] - target) ** 2).mean(-1)
        if readout.shape[-1] == 1:
            return F.binary_cross_entropy_with_logits(readout[..., 0], target.to(readout.dtype), reduction="none").mean(-1)
        return F.cross_entropy(readout.transpose(1, 2), target, reduction="none").mean(-1)

    @classmethod
    def fit(cls, runs: list[Run], covs: list[Covariance], device: torch.device | str) -> StackFit:
        cfg0 = runs[0].config
        m, tr, fam_name = cfg0.model, cfg0.train, cfg0.task.family
        family = FAMILIES[fam_name]
        dtype = getattr(torch, tr.dtype)
        S, d, c1 = len(runs), cfg0.task.d, cfg0.task.n_label
        p = transformer.init(S, d + c1, c1, m.layers, m.width, m.mlp, tr.N if m.positions == "learned" else 0, _init_gens(runs), dtype)
        p = {k: v.to(device).requires_grad_() for k, v in p.items()}
        opt = transformer.AdamW(p, torch.tensor([r.config.train.lr for r in runs], dtype=dtype, device=device), m.weight_decay, m.warmup)
        clip = torch.tensor([r.config.model.clip for r in runs], dtype=dtype, device=device)

        def prompts(rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
            Z = torch.stack([transformer.tokens(x, yt, xq) for x, yt, xq, _ in rows]).to(device, dtype)
            return Z, _yq(torch.stack([t for *_, t in rows]), device, dtype)

        if not m.online:
            Zall, yall = prompts([family.raw_train(r.config, cov, r.seed, tr.B, "train") for r, cov in zip(runs, covs)])
        diverged_at = torch.full((S,), -1, dtype=torch.long)
        curves: list[tuple[int, torch.Tensor]] = []
        loss = torch.full((S,), NAN, dtype=dtype)
        for step in range(tr.steps):
            if m.online:
                Z, y = prompts([family.raw_train(r.config, cov, r.seed, m.batch, "online", (step,)) for r, cov in zip(runs, covs)])
            else:
                idx = torch.stack([torch.randperm(tr.B, generator=generator({"data": r.config.task.data_key(), "seed": r.seed}, "batch", step))[: m.batch] for r in runs]).to(device)
                Z, y = torch.stack([Zall[s, idx[s]] for s in range(S)]), torch.stack([yall[s, idx[s]] for s in range(S)])
            loss = cls.loss(transformer.forward(p, Z, m, c1), y, fam_name)
            # the members share no operation, so a member that diverged (NaN) touches only its own slice
            grads = dict(zip(p, torch.autograd.grad(loss.sum(), list(p.values()))))
            bad = ~torch.isfinite(loss.detach()).cpu()
            diverged_at[bad & (diverged_at < 0)] = step
            transformer.clip_(grads, clip)
            opt.step(p, grads)
            if step % tr.log_every == 0:
                curves.append((step, loss.detach().cpu()))
        loss = loss.detach().cpu()
        params = {k: v.detach() for k, v in p.items()}
        out = StackFit()
        for i, r in enumerate(runs):
            diverged = int(diverged_at[i]) >= 0
            own = {k: v[i] for k, v in params.items()}
            out.trials.append(dict(status="diverged" if diverged else "ok", steps_done=int(diverged_at[i]) if diverged else tr.steps, final_train_loss=float(loss[i])))
            out.curves.append([dict(step=st, train_loss=float(ls[i])) for st, ls in curves])
            out.params.append({})  # weights are not stored: 10^4 to 10^6 numbers a run, and nothing reads them
            out.estimators.append(None if diverged else cls.estimator(own, m, family, c1))
            out.lsa.append(None)
        return out

    @staticmethod
    def estimator(params: dict[str, torch.Tensor], model: Any, family: Any, n_label: int) -> Any:
        """One trained run as an estimator: its read-out on the evaluation contexts, in chunks of
        prompts small enough for the attention scores; None at M = inf (no context to read)."""
        one = {k: v[None] for k, v in params.items()}

        @torch.no_grad()
        def predict(pr: Any) -> torch.Tensor | None:
            ctx = family.context(pr)
            if ctx is None:
                return None
            x, yt, xq = ctx
            dt = one["embed"].dtype
            Z = transformer.tokens(x, yt.to(x.dtype), xq).to(dt)
            P, T = Z.shape[0], Z.shape[1]
            size = max(1, EVAL_SCORES // (model.heads * T * T))
            out = torch.cat([transformer.forward({k: v.to(Z.device) for k, v in one.items()}, Z[None, a : a + size], model, n_label)[0] for a in range(0, P, size)])
            return family.output(out.to(x.dtype))

        return predict


MODELS: dict[str, Any] = {"lsa": LSA, "transformer": Transformer}
