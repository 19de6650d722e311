"""The suite's canonical flat configurations (`TrialConfig.from_flat` takes them): one small gmm run
and one small mor run, each a second or two. A test states only what it changes:
`gmm(c=3, lr=2.0)`. The fixtures `gmm_flat` and `mor_flat` (tests/conftest.py) give the same dicts;
these functions serve where a fixture cannot (module level, `parametrize`). `part` and `smoke` build
sweep documents from them (the smoke sweep that the Ray tests run).
"""

from __future__ import annotations

import copy
from typing import Any

GMM: dict[str, Any] = dict(family="gmm", d=2, c=2, snr=1.0, N=10, B=256, lr=1.0, steps=20, log_every=10, M=[8, "inf"], n_eval=64)
MOR: dict[str, Any] = dict(family="mor", d=2, K=2, snr=2.0, sigma=0.5, N=10, B=256, lr=0.2, steps=20, log_every=10, M=[8, "inf"], n_eval=64)
BASES = {"gmm": GMM, "mor": MOR}


def flat(family: str, **overrides: Any) -> dict[str, Any]:
    """A fresh copy of the family's canonical flat config with `overrides` applied."""
    return {**copy.deepcopy(BASES[family]), **overrides}


def gmm(**overrides: Any) -> dict[str, Any]:
    return flat("gmm", **overrides)


def mor(**overrides: Any) -> dict[str, Any]:
    return flat("mor", **overrides)


def part(grid: dict[str, list], family: str = "gmm", **overrides: Any) -> dict[str, Any]:
    """A sweep part: `grid` over the family's canonical config (changed by `overrides`), the rest fixed."""
    fixed = {k: v for k, v in flat(family, **overrides).items() if k != "family" and k not in grid}
    return {"family": family, "fixed": fixed, "grid": grid}


def smoke(name: str, **grid: list) -> dict[str, Any]:
    """The Ray tests' smoke sweep: c 2, 3 x N 5, 20 (and `grid`) of gmm at snr 1.5, lr 0.5, 2 seeds, bundles of 4."""
    return {"name": name, **part({"c": [2, 3], "N": [5, 20], **grid}, snr=1.5, lr=0.5), "seeds": 2, "bundle_size": 4}
