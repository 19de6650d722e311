"""The set-up's bytecode step (pipelines.bytecode): it compiles what the processes import, and only that."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

from pipelines.bytecode import PACKAGES, PROCESSES, compile_imports


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pkg/a imports pkg/b; pkg/c is imported by nothing; dyn/sub/x is loaded by name only."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "X = 1\n",
        "pkg/c.py": "Y = 2\n",
        "dyn/__init__.py": "",
        "dyn/sub/__init__.py": "",
        "dyn/sub/x.py": "Z = 3\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def compiled(path: Path) -> bool:
    return Path(importlib.util.cache_from_source(str(path))).exists()


def env_for(tree: Path) -> dict[str, str]:
    # bytecode writing off, as on the machines the step is for: the step must turn it on
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}


def test_compiles_the_imports_and_the_packages_and_nothing_else(tree):
    compile_imports({"one": ("pkg.a",)}, ("dyn.sub",), env=env_for(tree))
    assert all(compiled(tree / f) for f in ("pkg/__init__.py", "pkg/a.py", "pkg/b.py", "dyn/sub/__init__.py", "dyn/sub/x.py"))
    assert not compiled(tree / "pkg/c.py")
    assert not compiled(tree / "dyn/__init__.py")  # only the named package is compiled whole


def test_a_missing_module_is_reported_and_the_rest_compiled(tree, capfd):
    compile_imports({"one": ("pkg.gone", "notinstalled.x", "pkg.a")}, ("dyn.nothing",), env=env_for(tree))
    err = capfd.readouterr().err
    assert "pkg.gone not compiled: ModuleNotFoundError" in err  # a module gone from an installed package
    assert "notinstalled" not in err  # a package not installed: passed over
    assert "package dyn.nothing not found" in err
    assert compiled(tree / "pkg/b.py")


def test_every_named_module_exists():
    """A renamed module (a Ray upgrade) would silently leave its process to compile at every start."""
    names = [m.partition(":") for mods in PROCESSES.values() for m in mods]
    missing = [m for m, _, _ in names if importlib.util.find_spec(m) is None]
    missing += [f"{m}:{f}" for m, _, f in names if f and not callable(getattr(importlib.import_module(m), f, None))]
    missing += [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    assert not missing


def test_a_named_function_is_called_once_its_module_is_imported(tree):
    """`module:function` entries run after the import (the trial's process builds the fused kernels so)."""
    (tree / "pkg/d.py").write_text(f"def build():\n    open({str(tree / 'built')!r}, 'w').write('yes')\n")
    compile_imports({"one": ("pkg.d:build",)}, (), env=env_for(tree))
    assert (tree / "built").read_text() == "yes" and compiled(tree / "pkg/d.py")
