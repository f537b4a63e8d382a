"""What every config dataclass shares: field docs, flag names and range checks that name both.

Configs are frozen dataclasses with a docstring under each field. The command line is derived
from them (:mod:`safegeom.cli.options`), so a field ``n_val`` is the option ``--n-val`` and its
docstring is the help. A bad value fails in ``__post_init__`` with a message naming the field and
its flag, the same whether it came from Python or the command line.

Example:
    >>> from dataclasses import dataclass
    >>> from safegeom.config import check
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     n_val: int = 8
    ...     '''Prompts per class for validation.'''
    ...     def __post_init__(self) -> None:
    ...         check(self.n_val > 0, "n_val", "must be positive", self.n_val)
    >>> Demo(n_val=0)
    Traceback (most recent call last):
    ...
    safegeom.errors.ConfigError: n_val (--n-val) must be positive, got 0
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
from functools import cache
from typing import Any

from safegeom.errors import ConfigError

__all__ = ["check", "check_finite", "config_dict", "field_docs", "flag"]


def flag(name: str) -> str:
    """The command-line option of a config field: ``n_val`` → ``--n-val``."""
    return "--" + name.replace("_", "-")


def check(ok: bool, name: str, message: str, value: Any = dataclasses.MISSING) -> None:
    """Raise :class:`ConfigError` ``"<name> (<flag>) <message>, got <value>"`` unless ``ok``."""
    if ok:
        return
    got = "" if value is dataclasses.MISSING else f", got {value!r}"
    raise ConfigError(f"{name} ({flag(name)}) {message}{got}")


def check_finite(value: float, name: str) -> None:
    """Raise :class:`ConfigError` when ``value`` is NaN or infinite."""
    check(math.isfinite(float(value)), name, "must be a finite number", value)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        statements = body.body
        for this, after in itertools.pairwise(statements):
            target = this.target if isinstance(this, ast.AnnAssign) else None
            if not isinstance(target, ast.Name):
                continue
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready mapping of a config dataclass (values with ``to_dict``/``spec`` rendered)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if hasattr(value, "spec"):
            value = value.spec
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = config_dict(value)
        elif isinstance(value, tuple):
            value = [getattr(v, "spec", v) for v in value]
        out[f.name] = value
    return out
