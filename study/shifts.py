"""Distribution shifts at evaluation (theory.md sections 2 and 4): what a shift is, and what it does.

A run trains on its configuration's distribution and is evaluated on it (`none`) and, for every
entry of the `shifts` field, on a shifted test distribution, at every M; each row of `evals`
names its shift. A shift is a string, `kind` or `kind(value)`:

gmm
- `cov_scale(a)`: the examples' and the query's noise covariance is Lam' = a Lam (the class means
  stay Lam^{1/2} u_k);
- `cov_rotate(s)`: Lam' = R Lam R^T with R Haar-random from seed s (a no-op for `cov: identity`);
- `mean_norms(r)`: class k's mean is scaled by r^(k / (c - 1)), so the norms run from snr to r snr
  (the theory needs equal norms; unequal ones leave an intercept the LSA cannot represent);
- `prior(p)`: class 0 has prior p, the others (1 - p) / (c - 1) each, for the context and the query.
mor
- `covariate_scale(a)`: x ~ N(0, a^2 Sx), context and query;
- `noise(s)`: label noise sigma' = s, the regressors unchanged.

The reference estimators know the shifted truth (`bayes` uses Lam', the means and the prior;
`oracle` and EM's known sigma use sigma'); every other estimator and the trained models see only
the shifted prompts, and the LSA's limit (`lsa_limit`) keeps the training Lam. The evaluation
prompts of a shift are drawn from the same random streams as the unshifted ones, so the rows of a
shift are paired with those of `none` wherever the draws allow (a prior shift draws its labels
differently).

This module's parsing is free of torch (the config validates with it); the samplers import it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# kind -> (the families it applies to, the check of its value, what is allowed); every kind takes a value
KINDS: dict[str, tuple[tuple[str, ...], Any, str]] = {
    "cov_scale": (("gmm",), lambda v: v > 0, "a > 0"),
    "cov_rotate": (("gmm",), lambda v: v >= 0 and float(v).is_integer(), "a seed, an integer >= 0"),
    "mean_norms": (("gmm",), lambda v: v > 0, "r > 0"),
    "prior": (("gmm",), lambda v: 0 < v < 1, "0 < p < 1"),
    "covariate_scale": (("mor",), lambda v: v > 0, "a > 0"),
    "noise": (("mor",), lambda v: v >= 0, "sigma' >= 0"),
}
NONE = "none"
_FORM = re.compile(r"\s*([a-z_]+)\s*(?:\(\s*([0-9.eE+-]+)\s*\))?\s*")


@dataclass(frozen=True)
class Shift:
    kind: str
    value: float

    @property
    def name(self) -> str:
        """The canonical spelling, as stored in `evals.shift`: the value in 6 significant digits where
        they hold it exactly (`cov_scale(2)`), else in as many as it takes (`prior(0.9999999)`)."""
        short = f"{self.value:g}"
        return f"{self.kind}({short if float(short) == self.value else repr(self.value).removesuffix('.0')})"


def parse_shift(spec: str, family: str) -> Shift:
    """A shift from its string; ValueError says what is wrong and what is allowed."""
    m = _FORM.fullmatch(spec) if isinstance(spec, str) else None
    known = ", ".join(f"{k}(value)" for k, (fams, _, _) in KINDS.items() if family in fams)
    if m is None or m.group(1) not in KINDS:
        raise ValueError(f"unknown shift {spec!r}; for family {family}: {known}")
    kind, value = m.group(1), m.group(2)
    fams, ok, allowed = KINDS[kind]
    if family not in fams:
        raise ValueError(f"shift {kind} applies to family {', '.join(fams)}, not {family}; for {family}: {known}")
    if value is None:
        raise ValueError(f"shift {kind} needs a value: {kind}(value) with {allowed}")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"shift {spec!r}: the value must be a number, {allowed}") from None
    if not math.isfinite(v) or not ok(v):
        raise ValueError(f"shift {spec!r}: needs {allowed}")
    return Shift(kind, v)


def canonical(specs: Any, family: str) -> tuple[str, ...]:
    """The field's value: canonical names, sorted, without repeats (order does not change the science)."""
    return tuple(sorted({parse_shift(s, family).name for s in specs}))


# ----------------------------------------------------------------------------------------------
# what a shift does to the evaluation distribution (torch from here on)


@dataclass
class GMMSetting:
    """The test distribution of a gmm evaluation: the noise covariance, the scale of each class
    mean ([c] or None) and the class prior ([c] or None: uniform)."""

    cov: Any
    mean_scale: Any = None
    prior: Any = None


def gmm_setting(shift: str, task: Any, cov: Any) -> GMMSetting:
    import torch

    from study.covariance import Covariance, rotation

    if shift == NONE:
        return GMMSetting(cov)
    s = parse_shift(shift, "gmm")
    c = task.c
    if s.kind == "cov_scale":
        a = s.value
        return GMMSetting(Covariance(a * cov.lam, math.sqrt(a) * cov.half, cov.inv / a))
    if s.kind == "cov_rotate":
        R = rotation(task.d, 1_000_003 + int(s.value))  # not the configuration's own cov_seed rotation
        return GMMSetting(Covariance(R @ cov.lam @ R.T, R @ cov.half @ R.T, R @ cov.inv @ R.T))
    if s.kind == "mean_norms":
        return GMMSetting(cov, mean_scale=torch.tensor([s.value ** (k / (c - 1)) for k in range(c)], dtype=torch.float64))
    prior = torch.full((c,), (1 - s.value) / (c - 1), dtype=torch.float64)
    prior[0] = s.value
    return GMMSetting(cov, prior=prior)


def mor_setting(shift: str, task: Any, cov: Any) -> tuple[Any, Any]:
    """The task and covariance of a mor evaluation under `shift`."""
    from study.covariance import Covariance

    if shift == NONE:
        return task, cov
    s = parse_shift(shift, "mor")
    if s.kind == "covariate_scale":
        a = s.value
        return task, Covariance(a * a * cov.lam, a * cov.half, cov.inv / (a * a))
    # the regressors keep their radius: snr is ||beta|| / sigma, so it moves with sigma
    radius = task.radius
    return task.model_copy(update={"sigma": s.value, "snr": radius / s.value if s.value > 0 else radius}), cov
