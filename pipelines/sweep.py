"""Sweep files: a YAML spec expands to trial configurations, runs and bundles.

    name: gmm-n-scaling
    family: gmm
    fixed: {model: lsa, param: reduced, cov: diag, kappa: 4, lr: 1.0, steps: 2000, B: 8192,
            M: [16, 64, 256, inf], n_eval: 4096}
    grid: {d: [4, 8], c: [2, 3], snr: [1.0, 2.0], N: [25, 50, 100, 200, 400]}
    seeds: 4            # a count (seeds 0..3) or a list of seeds
    bundle_size: 32     # optional: at most this many runs train as one stack

Instead of family/fixed/grid, `parts:` may list several {family, fixed, grid, bundle_size}
mappings (e.g. one per family); the configurations are the union of the parts', and a part's
bundle_size overrides the sweep's for its runs.

Every configuration is validated before anything runs; the first bad one raises `SweepError`
naming the file, the field and what is allowed. Runs that share shapes train as one vectorised
stack; stacks are packed into Ray trials (bundles) that each carry seconds of estimated compute.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from pipelines.cost import flops, run_bytes, shared_flops
from study.config import ConfigError, Run, TrialConfig, prompts_key, shape_key, stable_hash

PART_KEYS = ("family", "fixed", "grid", "bundle_size")
TOP_LEVEL = {"name", "description", "seeds", "bundle_size", "parts", *PART_KEYS}
DEFAULT_BUNDLE_SIZE = 32
STACK_BYTES = 1 << 30  # training tensors of one stack stay under about 1 GiB
TRIAL_S = 10.0  # estimated compute a Ray trial should carry (seconds)
UNIT_TRIALS = 4  # stacks that share evaluation prompts stay in one trial up to this many TRIAL_S
MIN_TRIALS = 32  # ... unless the sweep then spreads over fewer trials than this


class SweepError(ValueError):
    """A sweep that cannot run: the message names the file, the field and what is allowed."""


@dataclass(frozen=True)
class Bundle:
    """The runs of one Ray trial and one commit to the store: one or more stacks, run in turn."""

    runs: tuple[Run, ...]

    def stacks(self) -> list[list[Run]]:
        """The runs grouped by shape, in order: each group trains as one vectorised stack."""
        groups: dict[tuple, list[Run]] = {}
        for r in self.runs:
            groups.setdefault(shape_key(r.config), []).append(r)
        return list(groups.values())

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

    @functools.cached_property
    def runs(self) -> tuple[Run, ...]:
        return tuple(Run(c, s) for c in self.configs for s in self.seeds)

    def stacks(self, skip: set[str] = frozenset()) -> list[tuple[Run, ...]]:
        """Stacks of the runs whose ids are not in `skip`: runs of one shape that train together.

        A stack holds at most `bundle_size` runs (a part's own where it sets one) and about
        `STACK_BYTES` of training tensors. Inside a shape, runs that share evaluation prompts sit
        next to each other so that one stack evaluates them in one pass; across shapes, stacks
        whose runs share evaluation prompts (a B sweep) come one after the other.
        """
        groups: dict[tuple, list[Run]] = {}
        for r in self.runs:
            if r.run_id not in skip:
                groups.setdefault(shape_key(r.config), []).append(r)
        sizes = dict(self.part_sizes)
        prompts = self._prompts
        out = []
        for runs in groups.values():
            runs.sort(key=lambda r: (prompts[r.config.config_id], r.seed))
            wanted = min(sizes.get(r.config.config_id, self.bundle_size) for r in runs)
            size = max(1, min(wanted, STACK_BYTES // run_bytes(runs[0].config)))
            out += [tuple(runs[i : i + size]) for i in range(0, len(runs), size)]
        out.sort(key=lambda st: prompts[st[0].config.config_id])  # stable: shapes keep their order
        return out

    @functools.cached_property
    def _prompts(self) -> dict[str, str]:
        """Per configuration, its `prompts_key` (with the seed, what decides its baselines' rows)."""
        return {c.config_id: prompts_key(c) for c in self.configs}

    def units(self, skip: set[str] = frozenset(), seconds: Callable[[Run], float] | None = None, trial_s: float = TRIAL_S, shared: Callable[[Run], float] | None = None) -> list[tuple[Run, ...]]:
        """Stacks grouped into the units that `bundles` packs: consecutive stacks whose runs share
        evaluation prompts form one unit, so that one trial fits their baselines once, unless the
        unit's estimate exceeds UNIT_TRIALS x trial_s (then each stack is a unit); with `trial_s`
        0 every stack is a unit. `seconds` and `shared` as in `bundles`."""
        seconds, shared = self._estimators(seconds, shared)
        units: list[list[tuple[Run, ...]]] = []
        for stack in self.stacks(skip):
            keys = {self._key(r) for r in stack}
            if units and trial_s > 0 and keys & {self._key(r) for st in units[-1] for r in st}:
                units[-1].append(stack)
            else:
                units.append([stack])
        out = []
        for unit in units:
            if len(unit) > 1 and self.cost([r for st in unit for r in st], seconds, shared) > UNIT_TRIALS * trial_s:
                out += list(unit)
            else:
                out.append(tuple(r for st in unit for r in st))
        return out

    def bundles(
        self,
        skip: set[str] = frozenset(),
        seconds: Callable[[Run], float] | None = None,
        trial_s: float = TRIAL_S,
        min_trials: int = MIN_TRIALS,
        shared: Callable[[Run], float] | None = None,
    ) -> list[Bundle]:
        """The Ray trials of the runs not in `skip`: units of stacks packed until a trial carries `trial_s`.

        `seconds` estimates a run's compute (`pipelines.cost`; by default a flop count at a nominal
        1 Gflop/s) and `shared` the part of it that its baselines take, which runs sharing
        evaluation prompts pay once (`study.trial.SHARED_ROWS`). Consecutive units (`units`:
        stacks that share evaluation prompts stay together) are packed into one trial until its
        estimate reaches min(trial_s, total / min_trials): each trial carries seconds of work,
        which amortises Tune's per-trial cost, while the sweep still spreads over at least
        min(min_trials, units) trials for the workers of a cluster. A unit is never split. The
        trials come largest first, so that the last ones to start are the short ones.
        `trial_s` 0 gives one stack per trial.
        """
        seconds, shared = self._estimators(seconds, shared)
        units = self.units(skip, seconds, trial_s, shared)
        costs = [self.cost(u, seconds, shared) for u in units]
        target = min(trial_s, sum(costs) / max(1, min_trials))
        while True:
            out, runs, acc = [], [], 0.0
            for unit, c in zip(units, costs):
                runs += unit
                acc += c
                if acc >= target:
                    out.append((acc, Bundle(tuple(runs))))
                    runs, acc = [], 0.0
            if runs:
                out.append((acc, Bundle(tuple(runs))))
            if len(out) >= min(min_trials, len(units)) or target <= 0:
                break
            target /= 2  # uneven units packed into too few trials: pack less
        out.sort(key=lambda x: -x[0])
        return [b for _, b in out]

    @staticmethod
    def _estimators(seconds, shared):
        if seconds is None:
            return (lambda r: flops(r) * 1e-9), (lambda r: shared_flops(r.config) * 1e-9)
        return seconds, shared or (lambda r: 0.0)

    def _key(self, r: Run) -> tuple[str, int]:
        return self._prompts[r.config.config_id], r.seed

    def cost(self, runs, seconds: Callable[[Run], float], shared: Callable[[Run], float]) -> float:
        """Estimated compute of runs in one trial: their baselines once per set of evaluation prompts."""
        once = {self._key(r): shared(r) for r in runs}
        return sum(seconds(r) - shared(r) for r in runs) + sum(once.values())


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


def load_sweep(spec: str | Path) -> Sweep:
    """Read, expand and validate a sweep; raises `SweepError` before anything runs."""
    path = resolve(spec)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    return parse_sweep(doc, str(path))


def _fail(where: str, field: str, message: str) -> SweepError:
    return SweepError(f"{where}: field '{field}': {message}")


def parse_sweep(doc: Any, where: str = "<sweep>") -> Sweep:
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
