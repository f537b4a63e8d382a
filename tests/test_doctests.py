"""Docstring examples are tests: pytest collects the package with --doctest-modules, safely."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "safegeom"

# Imports every module of the package, as doctest collection does, and reports the global state
# a module could change on import.
IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
import torch
import safegeom

def state():
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "dtype": str(torch.get_default_dtype()),
        "grad": torch.is_grad_enabled(),
        "env": sorted(os.environ),
    }

before = state()
names = [m.name for m in pkgutil.walk_packages(safegeom.__path__, "safegeom.")]
for name in names:
    importlib.import_module(name)
files = {n: sys.modules[n].__file__ for n in names}
print(json.dumps({"before": before, "after": state(), "files": files}))
"""


def _pytest_option(name: str) -> str:
    """The value of ``name`` in pyproject.toml's ``[tool.pytest.ini_options]`` (as written)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    found = re.search(rf"^{name} = (.+)$", block, re.MULTILINE)
    assert found is not None, f"pyproject.toml sets no pytest {name}"
    return found.group(1)


def test_pytest_runs_the_package_doctests() -> None:
    assert "--doctest-modules" in _pytest_option("addopts").strip('"').split()
    assert '"safegeom"' in _pytest_option("testpaths")
    make_test = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pytest" in line]
    assert any(" safegeom " in f" {line} " for line in make_test), make_test


def test_data_and_assets_hold_no_modules() -> None:
    """Doctest collection walks the package: its data folders must not hold importable code."""
    for folder in ("data", "assets"):
        assert list((PACKAGE / folder).rglob("*.py")) == []


def test_importing_every_module_changes_no_global_state() -> None:
    """What collection does: import each module once, from this checkout; nothing runs on import
    (``python -m safegeom.cli`` runs only as a script)."""
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["after"] == report["before"]
    assert "safegeom.cli.__main__" in report["files"]
    outside = [
        n for n, f in report["files"].items() if not Path(f).resolve().is_relative_to(PACKAGE)
    ]
    assert outside == []
