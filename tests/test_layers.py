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


# the family modules' common interface: the same role in gmm.py and mor.py, classifiers.py and regressors.py
FAMILY_INTERFACE = {"sample_train", "sample_prompts", "per_prompt"}


def test_a_public_name_has_one_home():
    """No two modules of study/, pipelines/ and analysis/ define the same public top-level name
    (a class, function or constant), but for the family modules' common interface."""
    import ast
    import collections
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    homes = collections.defaultdict(list)
    for path in sorted(p for layer in ("study", "pipelines", "analysis") for p in (root / layer).glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                names = []
            for name in names:
                if not name.startswith("_"):
                    homes[name].append(f"{path.parent.name}/{path.name}")
    shared = {name: where for name, where in homes.items() if len(where) > 1 and name not in FAMILY_INTERFACE}
    assert not shared, shared
