"""Compile the bytecode of what icl-study's processes import: the set-up's last step.

`pip install` byte-compiles every module of the environment, one after another: 12,883 modules,
about 85 s of a 150 s set-up on 2 cores, three quarters of which no process of the study ever
imports (the libraries' tests, sympy, pip itself). Some machines also set PYTHONDONTWRITEBYTECODE,
and there a module not compiled at install is compiled again by every process that imports it:
the CLI, each Ray worker, Ray's own processes, `fit` and `report`. So the README's set-up installs
with `pip install --no-compile` and then runs

    python -m pipelines.bytecode

which imports the entry modules of every process the study runs (the CLI and Tune's driver, a
trial, Ray's workers and its own processes, `fit` and `report`) with bytecode writing on, in a few
processes at once (`PROCESSES`, grouped so that no two import the same large library): exactly
the modules imported are compiled (about 3,500 files), on every core; the trial's process also builds
the fused C kernels (`study.fused.library`, about 2 s), which trials would otherwise build on first
use. Modules that a process
imports by name at run time are compiled whole, by package (`PACKAGES`). A module missing from an
installed package (a renamed Ray module, say) is reported and left out, a package not installed
(the dev extra's tools in a plain install) passed over: compiling is only a speed-up.
"""

from __future__ import annotations

import compileall
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

PROCESSES: dict[str, tuple[str, ...]] = {  # the study's entry modules, grouped so that no two processes import the same large library
    "torch": ("study.trial", "study.fused:library"),  # a trial's science: torch, numpy; and the fused C kernels, built
    "ray": (
        "pipelines.cli", "pipelines.runner", "pipelines.trainable",  # the driver and Tune, pandas and pyarrow
        "ray._private.workers.default_worker", "ray._private.log_monitor", "ray.autoscaler._private.monitor",  # Ray's workers and its own processes
        "ray.dashboard.dashboard", "ray.dashboard.agent", "ray._private.runtime_env.agent.main", "ray.util.state", "pydantic.v1",
        "ray.air.integrations.wandb", "ray.air.integrations.mlflow", "ray.air.integrations.comet", "ray.tune.logger.aim",  # Tune's driver looks for these
    ),
    "analysis": ("analysis.report", "analysis.verdicts"),  # fit and report: matplotlib, seaborn, scipy
    "tests": ("pytest", "hypothesis", "moto.server", "boto3", "duckdb", "polars"),  # the dev extra's tools, where installed
}
PACKAGES = ("ray.dashboard.modules",)  # the dashboard imports every module below it by name

# run in each process: import every module (and call `module:function` entries once imported),
# report those that fail, never stop at one; a package not installed at all (the dev extra's tools
# in a plain install) is passed over in silence
_IMPORT = """
import importlib, sys
for name in sys.argv[1:]:
    name, _, call = name.partition(":")
    try:
        module = importlib.import_module(name)
        if call:
            getattr(module, call)()
    except ModuleNotFoundError as err:
        if err.name != name.split(".")[0]:
            print(f"pipelines.bytecode: {name} not compiled: {type(err).__name__}: {err}", file=sys.stderr)
    except Exception as err:
        print(f"pipelines.bytecode: {name} not compiled: {type(err).__name__}: {err}", file=sys.stderr)
"""


def compile_imports(processes: dict[str, tuple[str, ...]] = PROCESSES, packages: tuple[str, ...] = PACKAGES, env: dict[str, str] | None = None) -> None:
    """Import each group's modules in a process of its own, all at once, with bytecode writing on,
    and compile the packages whole meanwhile. `env`: the processes' environment (default: this one's)."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONDONTWRITEBYTECODE"}
    procs = [subprocess.Popen([sys.executable, "-c", _IMPORT, *modules], env=env) for modules in processes.values()]
    for name in packages:
        top, *below = name.split(".")
        spec = importlib.util.find_spec(top)  # the top package's folder, found without importing it
        where = [Path(p, *below) for p in (spec.submodule_search_locations or [])] if spec else []
        where = [w for w in where if w.is_dir()]
        if not where:
            print(f"pipelines.bytecode: package {name} not found", file=sys.stderr)
        for w in where:
            compileall.compile_dir(w, quiet=1)
    for p in procs:
        p.wait()


if __name__ == "__main__":
    t0 = time.perf_counter()
    compile_imports()
    print(f"pipelines.bytecode: the study's imports compiled in {time.perf_counter() - t0:.1f} s")
