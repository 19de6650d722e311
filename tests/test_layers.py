"""The layers: `analysis` reads the store without torch or Ray, the configs (and so `plan` and the
sweep files' validation) need no torch, and `study` never imports Ray. Checked in a fresh
interpreter, since this one has imported everything by now."""

import subprocess
import sys

import pytest

LEAKS = """
import sys, importlib
for name in {modules}:
    importlib.import_module(name)
print(",".join(sorted(m for m in {banned} if m in sys.modules)))
"""


@pytest.mark.parametrize(
    "modules, banned",
    [
        (["analysis.load", "analysis.claims", "analysis.fits", "analysis.fits_table", "analysis.verdicts", "analysis.plots", "analysis.report"], ["torch", "ray"]),
        (["study.config", "study.estimators", "study.shifts", "pipelines.sweep", "pipelines.store", "pipelines.cost"], ["torch", "ray"]),
        (["study.trial", "study.models", "study.families", "study.transformer"], ["ray"]),
    ],
    ids=["analysis", "configs-and-store", "study"],
)
def test_a_layer_imports_only_what_it_may(modules, banned):
    code = LEAKS.format(modules=modules, banned=banned)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{modules} imported {out.stdout.strip()}"
