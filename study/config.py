"""Trial configuration: one frozen, validated type per component, composed into a `TrialConfig`.

Every field has a flat name that is the same in sweep files, in Ray's param space and in the
Parquet columns. `TrialConfig.from_flat(d)` is the one way in; `to_flat()` the one way out, and
`config_id` is a hash of its canonical JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from study import estimators as estimator_registry, shifts


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"field '{field}': {message}")


class _Component(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------------------------
# task families


def _parse_cov(value: Any) -> Any:
    # accept the spec form "diag(4)" as well as the flat pair {cov: diag, kappa: 4}
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(identity|diag|rotated)\s*(?:\(\s*([0-9.eE+-]+)\s*\))?\s*", value)
        if m and m.group(2) is not None:
            return {"cov": m.group(1), "kappa": float(m.group(2))}
    return value


CovSpec = Literal["identity", "diag", "rotated"]


class _Task(_Component):
    """A task family: accepts the covariance spec form "diag(4)" for {cov: diag, kappa: 4}."""

    @model_validator(mode="before")
    @classmethod
    def _cov_spec(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("cov"), str):
            parsed = _parse_cov(data["cov"])
            if isinstance(parsed, dict):
                if "kappa" in data and float(data["kappa"]) != parsed["kappa"]:
                    raise ValueError("cov: the spec's kappa and the field kappa disagree")
                data = {**data, **parsed}
        return data

    def data_key(self) -> dict[str, Any]:
        """The fields that fix the data distribution (not the model, not the training)."""
        return self.model_dump()


class GMMTask(_Task):
    """Family `gmm`: c-class Gaussian mixtures with a shared covariance Lam (theory.md section 2)."""

    family: Literal["gmm"] = "gmm"
    d: int = Field(ge=1, description="input dimension")
    c: int = Field(default=2, ge=2, description="number of classes")
    snr: float = Field(gt=0, description="Mahalanobis norm of every class mean")
    cov: CovSpec = Field(default="identity", description="covariance spec of Lam")
    kappa: float = Field(default=1.0, ge=1, description="condition number of Lam (diag, rotated)")
    cov_seed: int = Field(default=0, ge=0, description="seed of the rotation of Lam (rotated)")
    symmetric: bool = Field(default=False, description="binary only: mu_1 = -mu_0")

    @model_validator(mode="after")
    def _consistent(self) -> GMMTask:
        if self.symmetric and self.c != 2:
            raise ConfigError("symmetric", f"applies to c = 2 only, got c = {self.c}")
        if self.cov == "identity" and self.kappa != 1.0:
            raise ConfigError("kappa", "applies to cov diag or rotated; identity has kappa = 1")
        return self

    @property
    def n_label(self) -> int:
        """c': the number of label rows in the prompt (1 for binary, c otherwise)."""
        return 1 if self.c == 2 else self.c


class MORTask(_Task):
    """Family `mor`: mixtures of linear regressions (theory.md section 3).

    """

    family: Literal["mor"] = "mor"
    d: int = Field(ge=1, description="input dimension")
    K: int = Field(default=2, ge=1, description="number of components")
    pi: tuple[float, ...] | None = Field(default=None, description="mixing weights (default uniform)")
    sigma: float = Field(default=0.0, ge=0, description="label noise std")
    snr: float = Field(gt=0, description="||beta_k|| / sigma (||beta_k|| when sigma = 0)")
    cov: CovSpec = Field(default="identity", description="covariance spec of x")
    kappa: float = Field(default=1.0, ge=1, description="condition number of Sx (diag, rotated)")
    cov_seed: int = Field(default=0, ge=0, description="seed of the rotation of Sx (rotated)")
    components: Literal["fresh", "pool"] = Field(default="fresh", description="beta_k per prompt or one pool")
    pool_seed: int = Field(default=0, ge=0, description="seed of the pool (components: pool)")
    assignment: Literal["sample", "prompt"] = Field(default="sample", description="component per example or per prompt")
    symmetric: bool = Field(default=False, description="K = 2 only: beta_2 = -beta_1")

    @model_validator(mode="after")
    def _consistent(self) -> MORTask:
        if self.pi is not None:
            if len(self.pi) != self.K:
                raise ConfigError("pi", f"needs K = {self.K} weights, got {len(self.pi)}")
            if any(p < 0 for p in self.pi) or abs(sum(self.pi) - 1.0) > 1e-9:
                raise ConfigError("pi", f"non-negative weights summing to 1, got {list(self.pi)}")
        if self.symmetric and self.K != 2:
            raise ConfigError("symmetric", f"applies to K = 2 only, got K = {self.K}")
        if self.assignment == "prompt" and self.components == "fresh":
            raise ConfigError(
                "assignment",
                "assignment: prompt with components: fresh gives every prompt one fresh regressor, i.e. plain "
                "linear regression (use K = 1); use components: pool",
            )
        if self.cov == "identity" and self.kappa != 1.0:
            raise ConfigError("kappa", "applies to cov diag or rotated; identity has kappa = 1")
        return self

    @property
    def n_label(self) -> int:
        """One label row: the regression target."""
        return 1

    @property
    def weights(self) -> tuple[float, ...]:
        return self.pi if self.pi is not None else (1.0 / self.K,) * self.K

    @property
    def radius(self) -> float:
        """||beta_k||: snr * sigma, or snr when sigma = 0."""
        return self.snr * self.sigma if self.sigma > 0 else self.snr


# ----------------------------------------------------------------------------------------------
# models


class LSAModel(_Component):
    """Single-layer linear self-attention (theory.md section 2)."""

    model: Literal["lsa"] = "lsa"
    param: Literal["reduced", "full"] = Field(default="reduced")
    init_scale: float = Field(
        default=0.0, ge=0, description="full only: s0 of the Zhang-Frei-Bartlett initialisation (0: the block structure at W = 0)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> LSAModel:
        if self.param == "reduced" and self.init_scale != 0.0:
            raise ConfigError("init_scale", "applies to param full; reduced starts at W = 0")
        return self

    # what the planner needs of a model (`shape_key`, `pipelines.cost`), without torch

    def shape(self, cfg: TrialConfig) -> tuple:
        """The fields beside the task's and training's shapes that runs of one stack share."""
        return (self.param, self.init_scale)

    def flops(self, cfg: TrialConfig) -> float:
        """A rough count of training (GD, the optimum) and evaluation, the baselines excluded."""
        t, tr, ev = cfg.task, cfg.train, cfg.eval
        d, c1, B = t.d, t.n_label, tr.B
        D = d + c1
        if self.param == "reduced":
            # small steps are bound by per-prompt elementwise work, not the d^2 products: the 36 is
            # that work in flop-equivalents (measured on a 2-core CPU: d = 2 costs a third of d = 6)
            train = 4 * B * (c1 * d * d + 36) * tr.steps + 15 * 2 * B * c1 * d**4
        else:
            train = 4 * B * (D * D + 2 * D * d) * tr.steps * 10 + 2 * B * tr.N * D * D
        m_max = max(ev.finite_M, default=0)
        return float(train + (1 + len(ev.shifts)) * ev.n_eval * m_max * d * (c1 + d))

    def run_bytes(self, cfg: TrialConfig) -> int:
        """Memory of one run's training tensors in a stack: data, logits and gradients in flight."""
        d, c = cfg.task.d, cfg.task.n_label
        per_prompt = (c + 1) * d + (d + c) ** 2 * (self.param == "full")
        return 8 * cfg.train.B * per_prompt * 3


class TransformerModel(_Component):
    """A multi-layer transformer trained by AdamW (theory.md section 4; `study.transformer`)."""

    model: Literal["transformer"] = "transformer"
    layers: int = Field(default=3, ge=1, description="blocks (attention and optional MLP)")
    width: int = Field(default=64, ge=1, description="model width D (a multiple of heads)")
    heads: int = Field(default=4, ge=1, description="attention heads")
    mlp: bool = Field(default=True, description="a GELU MLP of width 4 D in every block")
    attention: Literal["softmax", "linear", "relu"] = Field(default="softmax", description="attention kind")
    positions: Literal["none", "learned"] = Field(default="none", description="position embeddings")
    norm: bool = Field(default=True, description="pre-norm LayerNorms (false: none, as the LSA's block structure)")
    online: bool = Field(default=True, description="fresh prompts every step (false: a fixed set of B prompts)")
    batch: int = Field(default=64, ge=1, description="prompts per AdamW step")
    warmup: int = Field(default=0, ge=0, description="steps of linear learning-rate warm-up")
    clip: float = Field(default=1.0, ge=0, description="gradient-norm clipping per run (0: none)")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's decoupled weight decay")

    @model_validator(mode="after")
    def _consistent(self) -> TransformerModel:
        if self.width % self.heads:
            raise ConfigError("heads", f"must divide width, got width = {self.width}, heads = {self.heads}")
        return self

    # what the planner needs of a model (`shape_key`, `pipelines.cost`), without torch

    def shape(self, cfg: TrialConfig) -> tuple:
        """The architecture and training fields that runs of one stack share (not lr or clip), and N."""
        return (self.layers, self.width, self.heads, self.mlp, self.attention, self.positions, self.norm, self.online, self.batch, self.warmup, self.weight_decay, cfg.train.N)

    def _forward(self, cfg: TrialConfig, tokens: int) -> float:
        """One forward pass over a prompt of `tokens` tokens: projections, scores, MLP, embedding."""
        w = self.width
        per_layer = 2 * tokens * (4 * w * w + (8 * w * w if self.mlp else 0)) + 4 * tokens * tokens * w
        return float(self.layers * per_layer + 2 * tokens * (cfg.task.d + cfg.task.n_label) * w)

    def flops(self, cfg: TrialConfig) -> float:
        """Training (forward and backward, about 3 forwards, per prompt of each step) and evaluation."""
        tr, ev = cfg.train, cfg.eval
        train = 3 * tr.steps * self.batch * self._forward(cfg, tr.N + 1)
        return train + (1 + len(ev.shifts)) * ev.n_eval * sum(self._forward(cfg, m + 1) for m in ev.finite_M)

    def run_bytes(self, cfg: TrialConfig) -> int:
        """Weights, gradients and AdamW's two moments, the activations kept for the backward pass, the fixed set."""
        tr, d, c = cfg.train, cfg.task.d, cfg.task.n_label
        size = 4 if tr.dtype == "float32" else 8
        weights = self.layers * (4 + 8 * self.mlp) * self.width**2 + (self.positions == "learned") * (tr.N + 1) * self.width
        T = tr.N + 1
        activations = self.batch * self.layers * T * (12 * self.width + 2 * self.heads * T)
        data = 0 if self.online else (tr.B or 0) * T * (d + c)
        return size * (4 * weights + activations + data)


# ----------------------------------------------------------------------------------------------
# training and evaluation


class Train(_Component):
    """Full-batch gradient descent on B fixed training prompts of length N."""

    N: int = Field(ge=1, description="training prompt length")
    B: int | None = Field(default=4096, ge=1, description="number of training prompts")
    lr: float = Field(gt=0, description="step size (lsa: GD; transformer: AdamW's peak)")
    steps: int = Field(ge=0, description="training steps; lsa 0: no GD, the run is the empirical minimiser (Newton, reduced only)")
    log_every: int = Field(default=10, ge=1, description="curve resolution in steps")
    dtype: Literal["float64", "float32"] = "float64"


def _parse_lengths(value: Any) -> Any:
    if isinstance(value, (int, float, str)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return value
    out = []
    for v in value:
        if isinstance(v, str) and v.strip().lower() in {"inf", ".inf", "infinity"}:
            v = math.inf
        if isinstance(v, float) and math.isinf(v) and v > 0:
            out.append(math.inf)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v >= 1:
            out.append(float(v))
        else:
            raise ValueError(f"test lengths are integers >= 1 or inf, got {v!r}")
    if not out:
        raise ValueError("needs at least one test length")
    return sorted(set(out))


TestLengths = Annotated[list[float], BeforeValidator(_parse_lengths)]


class Eval(_Component):
    """Evaluation prompts: n_eval per test length M (inf: the exact context expectation)."""

    M: TestLengths = Field(description="test prompt lengths, inf allowed")
    n_eval: int = Field(default=2048, ge=1, description="evaluation prompts per M")
    estimators: tuple[str, ...] | None = Field(
        default=None, description="estimators compared with the model (default: all of the family)"
    )

    shifts: tuple[str, ...] = Field(default=(), description="test distributions besides the training one (study.shifts), e.g. cov_scale(2)")
    em_iters: int = Field(default=50, ge=1, description="mor: EM iteration budget")
    em_restarts: int = Field(default=4, ge=1, description="mor: EM random restarts (the best likelihood is kept)")
    em_tol: float = Field(default=1e-8, ge=0, description="mor: EM stops when no log-likelihood moves more")
    em_sigma: Literal["known", "estimated"] = Field(default="known", description="mor: EM's noise level")
    gem_steps: int = Field(default=1, ge=1, description="mor: gradient steps per M-step of gradient_em")

    @field_validator("estimators")
    @classmethod
    def _canonical(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # order and repeats do not change the science, so they must not change the run id
        return None if v is None else tuple(sorted(set(v)))

    @property
    def finite_M(self) -> list[int]:
        return [int(m) for m in self.M if math.isfinite(m)]


# ----------------------------------------------------------------------------------------------
# the trial config

TASK_CONFIGS: dict[str, type[_Component]] = {"gmm": GMMTask, "mor": MORTask}  # family -> its config (study.families.FAMILIES: its behaviour)
MODEL_CONFIGS: dict[str, type[_Component]] = {"lsa": LSAModel, "transformer": TransformerModel}  # model -> its config (study.models.MODELS: its training)
COMPONENTS = ("task", "model", "train", "eval")


def _lookup(registry: dict[str, Any], field: str, name: Any) -> Any:
    if name not in registry:
        raise ConfigError(field, f"unknown {field} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def _first_error(err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or "config"
    msg = e["msg"].removeprefix("Value error, ")
    if isinstance(e.get("ctx", {}).get("error"), ConfigError):
        cerr = e["ctx"]["error"]
        return ConfigError(cerr.field, str(cerr).split(": ", 1)[1])
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    elif e["type"] == "missing":
        msg = "required field is missing"
    return ConfigError(field, msg)


class TrialConfig(BaseModel):
    """One configuration of the study: task x model x training x evaluation (seeds excluded)."""

    model_config = ConfigDict(frozen=True)
    task: GMMTask | MORTask
    model: LSAModel | TransformerModel
    train: Train
    eval: Eval

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrialConfig:
        """Build from a flat dict; raises `ConfigError` naming the first bad field."""
        flat = dict(flat)
        if flat.get("estimators") is None:
            family = flat.get("family", "gmm")
            flat["estimators"] = estimator_registry.names(family) if family in estimator_registry.ESTIMATORS else None
        task_cls = _lookup(TASK_CONFIGS, "family", flat.get("family", "gmm"))
        model_cls = _lookup(MODEL_CONFIGS, "model", flat.get("model", "lsa"))
        owners = {"task": task_cls, "model": model_cls, "train": Train, "eval": Eval}
        parts: dict[str, dict[str, Any]] = {k: {} for k in owners}
        for key, value in flat.items():
            owner = next((k for k, c in owners.items() if key in c.model_fields), None)
            other = next((n for n, c in MODEL_CONFIGS.items() if key in c.model_fields and c is not model_cls), None)
            if owner is None and other is not None:
                raise ConfigError(key, f"applies to model {other}, not {model_cls.model_fields['model'].default}")
            if owner is None:
                allowed = sorted({f for c in owners.values() for f in c.model_fields})
                raise ConfigError(key, f"unknown field; allowed: {', '.join(allowed)}")
            parts[owner][key] = value
        if parts["eval"].get("shifts") is not None:
            try:
                parts["eval"]["shifts"] = shifts.canonical(_as_list(parts["eval"]["shifts"]), task_cls.model_fields["family"].default)
            except ValueError as err:
                raise ConfigError("shifts", str(err)) from None
        try:
            built = {k: owners[k](**v) for k, v in parts.items()}
        except ValidationError as err:
            raise _first_error(err) from None
        except ConfigError:
            raise
        cfg = cls(**built)
        cfg._check()
        return cfg

    def _check(self) -> None:
        known = estimator_registry.names(self.task.family)
        for name in self.eval.estimators or ():
            if name not in known:
                raise ConfigError(
                    "estimators", f"unknown estimator {name!r} for family {self.task.family}; known: {', '.join(sorted(known))}"
                )
        if self.task.family != "mor":
            defaults = Eval.model_fields
            for name in ("em_iters", "em_restarts", "em_tol", "em_sigma", "gem_steps"):
                if getattr(self.eval, name) != defaults[name].default:
                    raise ConfigError(name, "applies to family mor (EM) only")
        if self.model.model == "transformer":
            if self.model.online and self.train.B is not None:
                raise ConfigError("B", "online training draws fresh prompts every step; set B: null, or online: false for a fixed set of B prompts")
            if not self.model.online and self.train.B is None:
                raise ConfigError("B", "online: false trains on a fixed set of B prompts; give an integer B >= 1")
            if self.train.steps < 1:
                raise ConfigError("steps", "a transformer needs at least 1 AdamW step")
            return
        if self.train.B is None:
            raise ConfigError("B", "the LSA trains by full-batch GD on B fixed prompts; give an integer B >= 1")
        if self.train.steps == 0 and self.model.param != "reduced":
            raise ConfigError("steps", "0 (no GD: the empirical minimiser by Newton's method) needs param reduced, whose loss is convex")

    @property
    def estimators(self) -> tuple[str, ...]:
        return self.eval.estimators

    def to_flat(self) -> dict[str, Any]:
        """All fields of all components in one dict (the Parquet columns)."""
        out: dict[str, Any] = {}
        for part in COMPONENTS:
            out.update(getattr(self, part).model_dump())
        out["estimators"] = list(out["estimators"])
        out["shifts"] = list(out["shifts"])
        return out

    @functools.cached_property
    def config_id(self) -> str:
        return stable_hash(_identity(self.to_flat()))  # cached: a sweep asks for it once per run and more

    def run_id(self, seed: int) -> str:
        return stable_hash({"config_id": self.config_id, "seed": int(seed)})


# fields added after stores existed, at the default that gives the earlier behaviour: left out of the
# ids there, so that every earlier run keeps its run_id (and a rerun finds it done)
NEUTRAL_DEFAULTS: dict[str, Any] = {"shifts": []}


def _identity(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if not (k in NEUTRAL_DEFAULTS and list(v) == NEUTRAL_DEFAULTS[k])}


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def canonical_json(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, tuple):
            return list(o)
        raise TypeError(f"not JSON-serialisable: {o!r}")

    # inf is not JSON; spell it so that the hash is stable and readable
    def fix(o: Any) -> Any:
        if isinstance(o, float) and math.isinf(o):
            return "inf" if o > 0 else "-inf"
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        return o

    return json.dumps(fix(obj), sort_keys=True, separators=(",", ":"), default=default)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of the canonical JSON of `obj` (stable across processes and machines)."""
    return hashlib.blake2b(canonical_json(obj).encode(), digest_size=n // 2).hexdigest()


@dataclass(frozen=True)
class Run:
    """One run: a configuration and a seed."""

    config: TrialConfig
    seed: int

    @functools.cached_property
    def run_id(self) -> str:
        return self.config.run_id(self.seed)


def shape_key(cfg: TrialConfig) -> tuple:
    """Runs with equal keys can train in one stack: the model's architecture and the tensors'
    shapes agree (the step size, clipping and data may differ per run)."""
    t, m, tr = cfg.task, cfg.model, cfg.train
    return (t.family, m.model, *m.shape(cfg), t.d, t.n_label, tr.B, tr.steps, tr.log_every, tr.dtype)


def prompts_key(cfg: TrialConfig) -> str:
    """Runs of one seed with equal keys are evaluated on the same prompts by the same baselines:
    their data, evaluation settings and estimator list (not B or N, which are training fields)."""
    return canonical_json([cfg.task.family, cfg.task.data_key(), _identity(cfg.eval.model_dump()), list(cfg.estimators)])
