"""The claims of theory.md as data: what each one measures, in which regime and window, and how it
is judged. `analysis.verdicts` evaluates them against the store.

A claim names its family, table and metric, its variable x, the fields that name a group, its
kind and its numbers:

- kind `bound`: an O() upper bound on an exponent (or, for a comparison, on a log ratio): verdict
  `within | violated | inconclusive`, judged on the leading exponent of the law with its first
  correction, y = A x^beta (1 + c x^-correction);
- kind `equality`: a predicted value (an exponent, a GD rate, a whole training curve): verdict
  `consistent | steeper | shallower | inconclusive`, an equivalence test. An exponent equality is
  the plain log-log slope on a window where the corrections are small (noise against B: its
  corrections are O(1/B); the context fluctuation from M = 32): a corrected law's extra parameter
  would widen its interval past any useful tolerance.

`tolerance` is the allowed departure (theory + tolerance for a bound, theory +- tolerance for an
equality; for a rate on log rho / log rho_theory - 1); `limit` the interval half-width above which
the verdict is `inconclusive`. By default an exponent bound allows 10% of its exponent (at least
0.05: -1 + 0.1 for O(1/N), -1/2 + 0.05 for O(1/sqrt(M))), an equality 0.05, and the limit is 1.5
tolerances (at least 0.15, the half-width of a 2-seed interval is far above it). The window of x is part of the definition, fixed here before the
data: a window chosen after seeing the slopes is a fit to the answer. The report shows each
exponent claim's local slope against the window's start, so a reader sees where the asymptote
begins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from study.config import MODEL_CONFIGS, TASK_CONFIGS, Eval, Train

GMM_TASK = ("d", "c", "snr", "cov", "kappa", "symmetric", "B", "param")
MOR_TASK = ("d", "K", "snr", "sigma", "components", "assignment", "cov", "kappa")
GROUPS = {"gmm": GMM_TASK, "mor": MOR_TASK}  # the task fields that label a run (rates are per run)
# every model's fields and training's (from the config classes): what a baseline's error does not depend on
TRAIN_FIELDS = tuple(dict.fromkeys(f for cls in (*MODEL_CONFIGS.values(), Train) for f in cls.model_fields))
EVAL_FIELDS = ("M", "n_eval", "estimators", "shifts", "em_iters", "em_restarts", "em_tol", "em_sigma", "gem_steps")
GD_FIELDS = ("lr", "steps", "log_every")  # the empirical minimiser does not depend on how GD approached it
# the configuration columns, from the config classes themselves (every task's and model's fields,
# training's and evaluation's), and evals' own shift: the only columns a group is made of, so that a
# new result column can never become a grouping field
CONFIG = frozenset(f for cls in (*TASK_CONFIGS.values(), *MODEL_CONFIGS.values(), Train, Eval) for f in cls.model_fields if f != "family") | {"shift"}

EXPONENT_LAWS = ("power", "excess")  # laws whose estimate is an exponent of x


def _model_is(model: str) -> Callable[[pd.Series], pd.Series]:
    return lambda s: s == model


def _unshifted(s: pd.Series) -> pd.Series:
    return s == "none"


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One testable claim: `metric` of `table` against `x`, per group, in the regime `where` and
    the window of x, judged as a `kind` with `tolerance` and inconclusive `limit`.

    law: `power` (the leading exponent of y), `excess` (of y - y(x = inf), the floor measured per
    seed), `monotone` (the largest step-to-step log increase of y along x: <= 0 for a curve that
    does not rise), `rate` (per run: the linear rate of a training curve, against the run's
    `rho_theory` or, with theory 1, against no contraction), `curve` (per run: a training curve
    against its prediction `subopt_theory`) or `compare` (log of `estimator`'s seed-mean metric
    over `baseline`'s on the same prompts).
    """

    name: str
    family: str
    description: str
    table: str  # trials, evals or curves
    metric: str  # a column of trials or curves, or an evals metric
    x: str
    kind: str  # bound | equality
    theory: float  # NaN for a rate against each run's own rho_theory
    group: tuple[str, ...]
    law: str = "power"
    tolerance: float | None = None  # default: a bound max(0.05, 0.1 |theory|) (10% of the exponent), an equality 0.05
    limit: float | None = None  # default: max(0.15, 1.5 tolerance)
    correction: float | None = 1.0  # gamma of the first correction x^-gamma; None: the plain slope (an equality, or too few x levels by design)
    x_min: float | str = 0.0  # a field's name: x >= that field (M >= N)
    x_max: float = math.inf
    estimator: str | None = None  # evals: whose rows
    baseline: str | None = None  # compare: the estimator `estimator` is set against (pair_by shift: the reference shift)
    pair_by: str = "estimator"  # compare: the evals column whose values are paired (shift: every shift against `baseline`)
    where: dict[str, Callable[[pd.Series], pd.Series]] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()  # configuration fields averaged over rather than grouped by
    signed: bool = False  # the metric may be negative: its sign (that of the group's mean) is fitted out
    differences: bool = False  # an excess over a baseline on the same prompts: a seed's value may be <= 0 and is kept (the law needs a positive seed mean)
    needs: str = ""  # what a sweep must give for a fit, said when the claim is skipped

    def __post_init__(self) -> None:
        if self.tolerance is None:
            object.__setattr__(self, "tolerance", round(max(0.05, 0.1 * abs(self.theory)), 10) if self.kind == "bound" else 0.05)
        if self.limit is None:
            object.__setattr__(self, "limit", round(max(0.15, 1.5 * self.tolerance), 10))
        if self.table == "evals" and "shift" not in self.where and self.pair_by != "shift":  # a claim about the training distribution
            object.__setattr__(self, "where", {**self.where, "shift": _unshifted})
        if self.model is not None and "model" not in self.where:  # another model's runs are not this claim's, nor its exclusions
            object.__setattr__(self, "where", {**self.where, "model": _model_is(self.model)})

    @property
    def model(self) -> str | None:
        """Whose runs the claim is about: the LSA for the training curves, the optimum and the
        LSA's estimators; the transformer for its own; None for a baseline's (EM's error)."""
        if self.table in ("trials", "curves") or self.estimator in ("lsa", "lsa_projected"):
            return "lsa"
        return "transformer" if self.estimator == "transformer" else None

    @property
    def window(self) -> str:
        lo = self.x_min if isinstance(self.x_min, str) else f"{self.x_min:g}"
        hi = "" if math.isinf(self.x_max) else f" <= {self.x_max:g}"
        return f"{self.x} >= {lo}{hi}" if lo != "0" or hi else f"all {self.x}"


def snr_regime(df: pd.DataFrame) -> pd.Series:
    """[K]'s regime of each (eta = snr, d, M) point of the symmetric two-component model: `low`
    where eta <= (d/M)^(1/4), `high` where eta >= 1, `middle` between (NaN at M = inf)."""
    eta, edge = df["snr"].astype(float), (df["d"] / df["M"]) ** 0.25
    out = np.where(eta >= 1, "high", np.where(eta <= edge, "low", "middle"))
    return pd.Series(np.where(np.isfinite(df["M"]), out, None), index=df.index)


DERIVED: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "regime": snr_regime,
    "M_per_d": lambda df: df["M"] / df["d"],
    "M_per_N": lambda df: df["M"] / df["N"],  # the test length against the training length
}

_inf = {"M": lambda s: np.isinf(s)}
_finite = {"M": lambda s: np.isfinite(s)}
_reduced = {"param": lambda s: s == "reduced"}
_converged = {"opt_converged": lambda s: s.astype(bool)}
# [K]'s model: the symmetric two-component mixture with a component per example; N >= 16 d (EM at N ~ d is in neither regime)
_kwon = {"symmetric": lambda s: s.astype(bool), "K": lambda s: s == 2, "assignment": lambda s: s == "sample", "M_per_d": lambda s: s >= 16}
_regime = lambda r: {"regime": lambda s: s == r}  # noqa: E731

_transformer = {"model": lambda s: s == "transformer"}
_erm = {**_transformer, "online": lambda s: ~s.astype(bool)}  # a fixed set of B training prompts
_high = {"snr": lambda s: s.astype(float) >= 1.0}  # [J]'s high SNR (||beta|| / sigma >= 1)
_seen = {"M_per_N": lambda s: s <= 1.0}  # test lengths the transformer was trained for
_at_N = {"M_per_N": lambda s: s == 1.0}
_asym = {"symmetric": lambda s: ~s.astype(bool)}  # not [J] claim 5's degenerate model
TRANSFORMER = ("layers", "width", "heads", "mlp", "attention", "positions")  # the architecture labels a group
FLOOR = math.log(2.0)  # a shift's floor: the unshifted error at most half the shifted one

_not_c = tuple(g for g in (*GMM_TASK, "N") if g != "c")
_not_d = (*(g for g in MOR_TASK if g != "d"), "M")
_not_B = tuple(g for g in GMM_TASK if g != "B")

CLAIMS: tuple[Claim, ...] = (
    # gmm [S], theory.md section 2
    Claim(
        name="gmm-1-rate", family="gmm", description="GD converges linearly at rho = max|1 - lr lambda(H)| of the Hessian at the optimum (|log rho / log rho_H - 1| <= 2%)",
        table="curves", metric="subopt", x="step", kind="equality", theory=float("nan"), group=(), law="rate", tolerance=0.02, limit=0.02, ignore=EVAL_FIELDS,
        needs="GD curves (steps > 0) with at least 3 logged points above float noise",
    ),
    Claim(
        name="gmm-2-optimum-vs-N", family="gmm", description="W* = c''(Lam^-1 + G) with G = O(1/N): the signed projection g_N of W_opt/c'' - Lam^-1 on Lam^-1, seed-averaged, is O(1/N)",
        table="trials", metric="opt_g", x="N", kind="bound", theory=-1.0, group=GMM_TASK, x_min=50, where=_converged, ignore=(*EVAL_FIELDS, *GD_FIELDS), signed=True,
        needs="4 or more values of N >= 50 (theory.md: the asymptotic window)",
    ),
    Claim(
        name="gmm-2-noise-vs-B", family="gmm", description="the rest of W_opt/c'', off the line of Lam^-1 (opt_noise), is finite-B sampling noise: it falls like B^-1/2 (averaged over N, whose value sets only its level)",
        table="trials", metric="opt_noise", x="B", kind="equality", theory=-0.5, group=_not_B, correction=None, x_min=1024, where=_converged, ignore=(*EVAL_FIELDS, *GD_FIELDS, "N"),
        needs="4 or more values of B >= 1024 (the gmm-b-ladder sweep)",
    ),
    Claim(
        name="gmm-2-optimum-vs-c", family="gmm", description="||G|| = O(c/N): N g_N grows at most like c at fixed N",
        table="trials", metric="opt_g", x="c", kind="bound", theory=1.0, group=_not_c, where=_converged, ignore=(*EVAL_FIELDS, *GD_FIELDS), signed=True,
        needs="4 or more values of c at a fixed N (the gmm-c-scaling sweep)",
    ),
    Claim(
        name="gmm-3-error-vs-N", family="gmm", description="tv_error at M = inf (no context noise) of the trained LSA's B -> inf limit (lsa_projected: its W on the line of Lam^-1) is O(1/N)",
        table="evals", metric="tv_error", x="N", kind="bound", theory=-1.0, group=GMM_TASK, estimator="lsa_projected", x_min=50, where=_inf,
        needs="lsa_projected in the estimators, M = inf in the M grid and 4 or more values of N >= 50",
    ),
    Claim(
        name="gmm-3-excess-vs-M", family="gmm", description="tv_error(M) - tv_error(inf) of the trained LSA's B -> inf limit (lsa_projected) is O(1/sqrt(M)) at fixed N (the M = inf error measured per seed)",
        table="evals", metric="tv_error", x="M", kind="bound", theory=-0.5, group=(*GMM_TASK, "N"), estimator="lsa_projected", law="excess", x_min=32,
        needs="M = inf and 4 or more finite M >= 32 in the M grid",
    ),
    Claim(
        name="gmm-3-fluctuation-vs-M", family="gmm", description="tv_limit (the trained LSA at M against itself at M = inf: the context's fluctuation, no bias) falls exactly like 1/sqrt(M)",
        table="evals", metric="tv_limit", x="M", kind="equality", theory=-0.5, group=(*GMM_TASK, "N"), estimator="lsa", correction=None, x_min=32, where=_finite,
        needs="M = inf and 4 or more finite M >= 32 in the M grid",
    ),
    Claim(
        name="gmm-3-error-vs-c", family="gmm", description="tv_error at M = inf (lsa_projected) is O(c^2/N): grows at most like c^2 at fixed N",
        table="evals", metric="tv_error", x="c", kind="bound", theory=2.0, group=_not_c, estimator="lsa_projected", where=_inf,
        needs="M = inf and 4 or more values of c at a fixed N (the gmm-c-scaling sweep)",
    ),
    Claim(
        name="gmm-3-fluctuation-vs-c", family="gmm", description="the 1/sqrt(M) term is O(c^(3/2)/sqrt(M)): tv_limit grows at most like c^(3/2) at fixed N and M",
        table="evals", metric="tv_limit", x="c", kind="bound", theory=1.5, group=(*_not_c, "M"), estimator="lsa", where=_finite,
        needs="M = inf in the M grid and 4 or more values of c (the gmm-c-scaling sweep)",
    ),
    Claim(
        name="gmm-4-length-generalisation", family="gmm", description="the LSA normalises by the prompt length, so its tv_error does not rise for M beyond the training N (largest log increase <= 0.02)",
        table="evals", metric="tv_error", x="M", kind="bound", theory=0.0, group=(*GMM_TASK, "N"), estimator="lsa", law="monotone", tolerance=0.02, x_min="N", where=_finite,
        needs="3 or more finite M >= N (the gmm-length sweep: M from N/4 to 16 N)",
    ),
    Claim(
        name="gmm-4-transformer-length", family="gmm", description="a transformer's tv_error beyond its training length N: the LSA's does not rise (gmm-4-length-generalisation); a softmax transformer with learned positions need not ([S] reports a 3-layer GPT-2 deviating), so either verdict is a finding (largest log increase <= 0.02)",
        table="evals", metric="tv_error", x="M", kind="bound", theory=0.0, group=(*GMM_TASK, "N", *TRANSFORMER), estimator="transformer", law="monotone", tolerance=0.02, x_min="N", where=_finite,
        needs="transformer runs and 3 or more finite M >= N (the gmm-depth sweeps)",
    ),
    *(
        Claim(
            name=f"gmm-5-shift-floor-{who}", family="gmm", description=f"a test distribution unlike the training one (Lam' != Lam, means of unequal norms, a skewed prior) leaves the {who} a tv_error that does not vanish as M grows: at M >= N its unshifted error is at most half the shifted one, per shift (log ratio of seed means <= -log 2)",
            table="evals", metric="tv_error", x="M", kind="bound", theory=-FLOOR, group=(*GMM_TASK, "N", *extra), estimator=who, baseline="none", pair_by="shift", law="compare", tolerance=0.0, limit=2.0, x_min="N",
            where={**_finite, **({} if who == "lsa" else _transformer)}, needs=f"{who} rows under shift none and at least one shift, at M >= N (the gmm-depth sweeps)",
        )
        for who, extra in (("lsa", ()), ("transformer", TRANSFORMER))
    ),
    # mor [J], [K], theory.md section 3
    *(
        Claim(
            name=f"mor-1-em-vs-M-{regime}", family="mor", description=f"EM's parameter error is {rate} in [K]'s {regime}-SNR regime (symmetric K = 2, a component per example, M >= 16 d)",
            table="evals", metric="param_error", x="M", kind="bound", theory=-slope, group=MOR_TASK, estimator="em", where={**_finite, **_kwon, **_regime(regime)}, ignore=TRAIN_FIELDS,
            needs=f"[K]'s model (symmetric: true, K: 2, assignment: sample) with 4 or more M >= 16 d in the {regime} regime (the mor-em-regimes sweeps)",
        )
        for regime, rate, slope in (("low", "O((d/M)^(1/4))", 0.25), ("middle", "O(sqrt(d/M) / eta)", 0.5), ("high", "O(sqrt(d/M))", 0.5))
    ),
    *(
        Claim(
            name=f"mor-1-em-vs-d-{regime}", family="mor", description=f"EM's parameter error grows at most like d^{slope:g} at fixed M in [K]'s {regime}-SNR regime (M >= 16 d)",
            table="evals", metric="param_error", x="d", kind="bound", theory=slope, group=_not_d, estimator="em", where={**_finite, **_kwon, **_regime(regime)}, ignore=TRAIN_FIELDS,
            needs=f"[K]'s model with 4 or more d at a fixed M >= 16 d in the {regime} regime (the mor-em-regimes sweeps; with 3 the plain slope is reported, inconclusive)",
        )
        for regime, slope in (("low", 0.25), ("middle", 0.5), ("high", 0.5))
    ),
    Claim(
        name="mor-2-excess-risk-vs-B", family="mor", description="the ERM-trained LSA's population excess risk over Gamma* is O(1/sqrt(B))",
        table="trials", metric="excess_risk", x="B", kind="bound", theory=-0.5, group=(*MOR_TASK, "N"), x_min=256, where=_reduced, ignore=EVAL_FIELDS,
        needs="the reduced LSA at 4 or more values of B >= 256",
    ),
    Claim(
        name="mor-3-rate", family="mor", description="GD on the quadratic LSA loss follows the curve the Hessian predicts from the start (|log(subopt / predicted)| <= 1%)",
        table="curves", metric="subopt", x="step", kind="equality", theory=0.0, group=(), law="curve", tolerance=0.01, limit=math.inf, where=_reduced, ignore=EVAL_FIELDS,
        needs="GD curves of the reduced LSA (steps > 0) with at least 3 logged points above float noise",
    ),
    Claim(
        name="mor-3-optimum-vs-B", family="mor", description="the empirical optimum approaches Gamma* like 1/sqrt(B) (finite-B noise only)",
        table="trials", metric="opt_dist_theory", x="B", kind="equality", theory=-0.5, group=(*MOR_TASK, "N"), correction=None, x_min=256, where={**_converged, **_reduced}, ignore=(*EVAL_FIELDS, *GD_FIELDS),
        needs="the reduced LSA at 4 or more values of B >= 256",
    ),
    Claim(
        name="mor-3-full-vs-B", family="mor", description="the full LSA trained by GD from the Zhang-Frei-Bartlett start reaches Gamma*: its final distance falls like 1/sqrt(B) (a stationary point elsewhere would leave a floor)",
        table="trials", metric="final_dist_theory", x="B", kind="equality", theory=-0.5, group=(*MOR_TASK, "N", "init_scale"), correction=None, x_min=256, where={"param": lambda s: s == "full"}, ignore=EVAL_FIELDS,
        needs="the full LSA at 4 or more values of B >= 256 (the mor-full sweeps)",
    ),
    Claim(
        name="mor-3-full-vs-steps", family="mor", description="the full LSA's GD contracts to its limit point: dist_opt falls linearly in the step (the interval of rho below 1)",
        table="curves", metric="dist_opt", x="step", kind="bound", theory=1.0, group=(), law="rate", tolerance=0.0, limit=0.05, where={"param": lambda s: s == "full"}, ignore=EVAL_FIELDS,
        needs="GD curves of the full LSA with at least 3 logged points above float noise",
    ),
    Claim(
        name="mor-4-lsa-vs-em", family="mor", description="the trained LSA is not worse than EM: its excess_mse over the oracle, on the same prompts, at most 10% above EM's (log ratio of the seed means <= 0.1; intervals up to +-2, a factor 7 either way, decide); not in the symmetric model, where every prediction metric is degenerate ([J] claim 5)",
        table="evals", metric="excess_mse", x="M", kind="bound", theory=0.0, group=(*MOR_TASK, "N", "B", "param"), estimator="lsa", baseline="em", law="compare", tolerance=0.1, limit=2.0,
        where={**_finite, "symmetric": lambda s: ~s.astype(bool)},
        needs="rows of both lsa and em at finite M",
    ),
    # mor with transformers [J], theory.md section 4
    Claim(
        name="mor-1-transformer-vs-M", family="mor", description="a trained transformer's prediction error is O(sqrt(d/n)) at high SNR: its excess_mse over the oracle (the error squared) falls at least like 1/M in the test length M <= N it was trained for",
        table="evals", metric="excess_mse", x="M", kind="bound", theory=-1.0, group=(*MOR_TASK, "N", "B", *TRANSFORMER), estimator="transformer", differences=True, x_min=4, where={**_finite, **_high, **_seen, **_asym},
        needs="transformer runs at snr >= 1 with 4 or more finite M <= N (the mor-transformer sweeps)",
    ),
    Claim(
        name="mor-1-transformer-vs-d", family="mor", description="a trained transformer's excess_mse at its training length grows at most like d at high SNR (the error O(sqrt(d/n)) squared)",
        table="evals", metric="excess_mse", x="d", kind="bound", theory=1.0, group=(*(g for g in MOR_TASK if g != "d"), "N", "B", *TRANSFORMER), estimator="transformer", differences=True, where={**_finite, **_high, **_at_N, **_asym},
        needs="transformer runs at 4 or more values of d, evaluated at M = N (the mor-transformer sweeps)",
    ),
    Claim(
        name="mor-2-transformer-vs-B", family="mor", description="the excess risk of a transformer trained by ERM on B prompts is O(L / sqrt(B)): its excess_mse at M = N falls at least like 1/sqrt(B)",
        table="evals", metric="excess_mse", x="B", kind="bound", theory=-0.5, group=(*MOR_TASK, "N", *TRANSFORMER), estimator="transformer", differences=True, x_min=256, where={**_finite, **_erm, **_at_N, **_asym},
        needs="transformer runs with online: false at 4 or more values of B >= 256, evaluated at M = N (the mor-transformer sweeps)",
    ),
    Claim(
        name="mor-2-transformer-vs-L", family="mor", description="the ERM excess risk O(L / sqrt(B)) grows at most like the depth L at fixed B",
        table="evals", metric="excess_mse", x="layers", kind="bound", theory=1.0, group=(*MOR_TASK, "N", "B", *(g for g in TRANSFORMER if g != "layers")), estimator="transformer", differences=True, where={**_finite, **_erm, **_at_N, **_asym},
        needs="transformer runs with online: false at 4 or more depths at a fixed B, evaluated at M = N (the mor-transformer sweeps)",
    ),
    Claim(
        name="mor-4-transformer-vs-em", family="mor", description="a trained transformer matches or beats EM, most of all at small N and low SNR: its excess_mse over the oracle, on the same prompts, at most 10% above EM's (log ratio of the seed means <= 0.1; intervals up to +-2 decide)",
        table="evals", metric="excess_mse", x="M", kind="bound", theory=0.0, group=(*MOR_TASK, "N", "B", *TRANSFORMER), estimator="transformer", baseline="em", law="compare", tolerance=0.1, limit=2.0, where={**_finite, **_asym},
        needs="rows of both transformer and em at finite M (the mor-transformer sweeps)",
    ),
)

BY_NAME = {c.name: c for c in CLAIMS}
