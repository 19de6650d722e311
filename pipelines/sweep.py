"""Sweep files: a YAML spec expands to trial configurations, runs and bundles.

    name: gmm-n-scaling
    family: gmm
    fixed: {model: lsa, param: reduced, cov: diag, kappa: 4, lr: 1.0, steps: 2000, B: 8192,
            M: [16, 64, 256, inf], n_eval: 4096}
    grid: {d: [4, 8], c: [2, 3], snr: [1.0, 2.0], N: [25, 50, 100, 200, 400]}
    seeds: 4            # a count (seeds 0..3) or a list of seeds
    bundle_size: 32     # optional: at most this many runs per Ray trial

Instead of family/fixed/grid, `parts:` may list several {family, fixed, grid, bundle_size}
mappings (e.g. one per family); the configurations are the union of the parts', and a part's
bundle_size overrides the sweep's for its runs.

Every configuration is validated before anything runs; the first bad one raises `SweepError`
naming the file, the field and what is allowed. Runs that share shapes are bundled into one Ray
trial (one vectorised training stack).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from study.config import ConfigError, TrialConfig, canonical_json, stable_hash
from study.trial import Run, shape_key

PART_KEYS = ("family", "fixed", "grid", "bundle_size")
TOP_LEVEL = {"name", "description", "seeds", "bundle_size", "parts", *PART_KEYS}
DEFAULT_BUNDLE_SIZE = 32
BUNDLE_BYTES = 1 << 30  # training tensors of one bundle stay under about 1 GiB


class SweepError(ValueError):
    """A sweep that cannot run: the message names the file, the field and what is allowed."""


@dataclass(frozen=True)
class Bundle:
    """Runs that train as one stack in one Ray trial."""

    runs: tuple[Run, ...]

    @property
    def bundle_id(self) -> str:
        return stable_hash(sorted(r.run_id for r in self.runs))

    @property
    def family(self) -> str:
        return self.runs[0].config.task.family

    def to_payload(self) -> list[list[Any]]:
        """A plain-data form for Ray's param space: [[flat config, seed], ...]."""
        return [[r.config.to_flat(), r.seed] for r in self.runs]

    @staticmethod
    def from_payload(payload: list[list[Any]]) -> Bundle:
        return Bundle(tuple(Run(TrialConfig.from_flat(flat), int(seed)) for flat, seed in payload))


@dataclass(frozen=True)
class Sweep:
    name: str
    path: str
    configs: tuple[TrialConfig, ...]
    seeds: tuple[int, ...]
    bundle_size: int  # the sweep's default
    part_sizes: tuple[tuple[str, int], ...] = ()  # (config_id, bundle size) where a part sets its own

    @property
    def runs(self) -> list[Run]:
        return [Run(c, s) for c in self.configs for s in self.seeds]

    def bundles(self, skip: set[str] = frozenset()) -> list[Bundle]:
        """Bundles of the runs whose ids are not in `skip`.

        Runs are grouped by shape; inside a group, runs that share evaluation prompts sit next to
        each other so that one bundle evaluates them in one pass.
        """
        groups: dict[tuple, list[Run]] = {}
        for r in self.runs:
            if r.run_id not in skip:
                groups.setdefault(shape_key(r.config), []).append(r)
        out = []
        for runs in groups.values():
            runs.sort(key=lambda r: (canonical_json([r.config.task.data_key(), r.config.eval.model_dump()]), r.seed))
            sizes = dict(self.part_sizes)
            wanted = min(sizes.get(r.config.config_id, self.bundle_size) for r in runs)
            size = max(1, min(wanted, BUNDLE_BYTES // _bytes_per_run(runs[0].config)))
            out += [Bundle(tuple(runs[i : i + size])) for i in range(0, len(runs), size)]
        return out


def _bytes_per_run(cfg: TrialConfig) -> int:
    d, c = cfg.task.d, cfg.task.n_label
    per_prompt = (c + 1) * d + (d + c) ** 2 * (cfg.model.param == "full")
    return 8 * cfg.train.B * per_prompt * 3  # data, logits and gradients in flight


def shipped() -> dict[str, Path]:
    """Sweeps that ship with the package, by name."""
    root = resources.files("pipelines") / "sweeps"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve(spec: str | Path) -> Path:
    """A path to a sweep file, or the name of a shipped sweep."""
    p = Path(spec)
    if p.is_file():
        return p
    known = shipped()
    if str(spec) in known:
        return known[str(spec)]
    raise SweepError(f"{spec}: no such file and no shipped sweep of that name; shipped: {', '.join(sorted(known))}")


def load(spec: str | Path) -> Sweep:
    """Read, expand and validate a sweep; raises `SweepError` before anything runs."""
    path = resolve(spec)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    return parse(doc, str(path))


def _fail(where: str, field: str, message: str) -> SweepError:
    return SweepError(f"{where}: field '{field}': {message}")


def parse(doc: Any, where: str = "<sweep>") -> Sweep:
    if not isinstance(doc, dict):
        raise SweepError(f"{where}: a sweep is a mapping with keys {', '.join(sorted(TOP_LEVEL))}")
    for key in doc:
        if key not in TOP_LEVEL:
            raise _fail(where, str(key), f"unknown sweep key; allowed: {', '.join(sorted(TOP_LEVEL))}")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, "name", "required: a non-empty string")
    seeds = _seeds(doc.get("seeds", 1), where)
    bundle_size = _bundle_size(doc.get("bundle_size", DEFAULT_BUNDLE_SIZE), where, "bundle_size")
    if "parts" in doc:
        if any(k in doc for k in PART_KEYS if k != "bundle_size"):
            raise _fail(where, "parts", f"give {', '.join(PART_KEYS)} inside each part, not beside parts")
        parts = doc["parts"]
        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            raise _fail(where, "parts", "a non-empty list of mappings with keys family, fixed, grid")
    else:
        parts = [{k: doc[k] for k in PART_KEYS if k in doc and k != "bundle_size"}]

    configs, seen, sizes = [], set(), []
    for i, part in enumerate(parts):
        prefix = f"parts[{i}]." if "parts" in doc else ""
        size = _bundle_size(part["bundle_size"], where, prefix + "bundle_size") if "bundle_size" in part else None
        for cfg in _expand(part, where, prefix):
            if cfg.config_id not in seen:
                seen.add(cfg.config_id)
                configs.append(cfg)
                if size is not None:
                    sizes.append((cfg.config_id, size))
    return Sweep(name.strip(), where, tuple(configs), seeds, bundle_size, tuple(sizes))


def _bundle_size(value: Any, where: str, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(where, field, f"an integer >= 1, got {value!r}")
    return value


def _expand(part: dict[str, Any], where: str, prefix: str) -> list[TrialConfig]:
    """The configurations of one part: the product of its grid, each merged with its fixed fields."""
    for key in part:
        if key not in PART_KEYS:
            raise _fail(where, prefix + str(key), f"unknown key of a part; allowed: {', '.join(PART_KEYS)}")
    fixed, grid = part.get("fixed") or {}, part.get("grid") or {}
    part = {k: v for k, v in part.items() if k != "bundle_size"}
    for field, value in (("fixed", fixed), ("grid", grid)):
        if not isinstance(value, dict):
            raise _fail(where, prefix + field, "must be a mapping of config fields")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(where, f"{prefix}grid.{key}", "must be a non-empty list of values")
        if key in fixed:
            raise _fail(where, key, "given in both fixed and grid; give it in one")
    if "family" in fixed or "family" in grid:
        raise _fail(where, "family", "give the family beside fixed and grid, not inside them")
    out = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        flat = {"family": part.get("family", "gmm"), **fixed, **dict(zip(keys, values))}
        try:
            out.append(TrialConfig.from_flat(flat))
        except ConfigError as err:
            raise SweepError(f"{where}: {err}") from None
    return out


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise _fail(where, "seeds", "a count >= 1 or a non-empty list of integers")
    if isinstance(value, int):
        if value < 1:
            raise _fail(where, "seeds", f"a count >= 1, got {value}")
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        return tuple(dict.fromkeys(value))
    raise _fail(where, "seeds", f"a count >= 1 or a non-empty list of integers >= 0, got {value!r}")


def estimate_flops(run: Run) -> float:
    """A rough count of the floating-point work of one run (training, optimum, evaluation)."""
    cfg = run.config
    t, tr, ev = cfg.task, cfg.train, cfg.eval
    d, c1, B = t.d, t.n_label, tr.B
    D = d + c1
    if cfg.model.param == "reduced":
        train = 4 * B * c1 * d * d * tr.steps + 15 * 2 * B * c1 * d**4
    else:
        train = 4 * B * (D * D + 2 * D * d) * tr.steps * 10 + 2 * B * tr.N * D * D
    m_max = max(ev.finite_M, default=0)
    per_prompt = m_max * d * (c1 + d)
    if "logreg" in cfg.estimators:
        k = t.c * (d + 1)
        per_prompt += sum(10 * m * k * k for m in ev.finite_M)
    for name in ("em", "gradient_em"):
        if name in cfg.estimators:
            per_prompt += sum(4 * ev.em_iters * ev.em_restarts * t.K * m * d * d for m in ev.finite_M)
    return float(train + ev.n_eval * per_prompt)
