"""Modules that can be called like the function they are named after.

The package face exports ``capture``, ``evaluate`` and ``train``, which are also the names of the
modules that define them. Python binds a package's attribute to its submodule when that
submodule is imported, so ``safegeom.capture`` cannot be the function without breaking
``import safegeom.capture.loop`` and ``import safegeom.train.benign as benign``. Instead those
three modules are made callable: ``sg.capture(lm, prompts)`` runs
:func:`safegeom.capture.loop.capture`, and the module is still a module for every import.

Example:
    >>> import safegeom as sg
    >>> import inspect
    >>> str(inspect.signature(sg.train)).startswith("(model")
    True
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["CallableModule", "make_callable"]


class CallableModule(types.ModuleType):
    """A module whose call runs the function it is named after (``__wrapped__``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__wrapped__"](*args, **kwargs)


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make the (imported) module ``module_name`` callable as ``function``.

    ``inspect.signature(module)`` then gives the function's signature (through ``__wrapped__``),
    so notebooks and IDEs show the right arguments.
    """
    module = sys.modules[module_name]
    module.__wrapped__ = function  # type: ignore[attr-defined]
    module.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
    module.__class__ = CallableModule
