"""Frozen values that hold read-only mappings, and how they cross process boundaries.

A frozen dataclass that stores a mapping as :class:`types.MappingProxyType` cannot be pickled
(``cannot pickle 'mappingproxy'``), and pickling is how a value is broadcast between ranks. A value
that inherits :class:`Picklable` pickles as its class and its constructor's fields, with every
read-only mapping given as a plain dict, so unpickling runs ``__init__`` and ``__post_init__``
again and the copy is checked and frozen as the original was.

Example:
    >>> from dataclasses import dataclass
    >>> from types import MappingProxyType
    >>> @dataclass(frozen=True)
    ... class Scores(Picklable):
    ...     by_name: dict
    ...     def __post_init__(self):
    ...         object.__setattr__(self, "by_name", MappingProxyType(dict(self.by_name)))
    >>> rebuild, (cls, values) = Scores({"a": 1.0}).__reduce__()
    >>> values, type(rebuild(cls, values).by_name).__name__
    ({'by_name': {'a': 1.0}}, 'mappingproxy')
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

__all__ = ["Picklable"]


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    return cls(**values)


class Picklable:
    """Mixin for frozen dataclasses with read-only mappings: pickled through the constructor."""

    def __reduce__(self) -> tuple[Any, tuple[type, dict[str, Any]]]:
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.init
        }
        plain = {k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in values.items()}
        return _rebuild, (type(self), plain)
