"""Loading a benchmark or analysis script (not a package module) as a module for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path) -> ModuleType:
    """Import the script at ``path`` under its file stem; returns the module.

    The module is registered in ``sys.modules`` before it runs, as an import would do: a script
    that defines dataclasses needs it (``dataclasses`` looks the defining module up there).
    """
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module
