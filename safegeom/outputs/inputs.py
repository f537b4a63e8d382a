"""An output that is also an input (a prompt file, a model folder, a carrier file) is refused."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safegeom.errors import OutputPathError

__all__ = ["inputs_of", "refuse_inputs"]


def _candidates(value: str) -> list[str]:
    """The paths a spec may name: itself, ``FILE`` of ``FILE:split``, ``PATH`` of ``NAME=PATH``
    and of ``kind:PATH#LABEL``."""
    out = [value]
    if "=" in value:
        out.append(value.split("=", 1)[1])
    if ":" in value:
        head, tail = value.rsplit(":", 1)[0], value.split(":", 1)[1]
        out += [head, tail.split("#", 1)[0]]
    return out


def inputs_of(*configs: Any, skip: Iterable[str] = ("out",)) -> tuple[str, ...]:
    """Every string (or string in a tuple) of the configs' fields but ``skip``: the inputs a
    command names, for :func:`check_file_output` and :func:`claim_folder`.

    Returns:
        The values, in field order (those that name no path are harmless: they match nothing).
    """
    skipped = set(skip)
    found: list[str] = []
    for config in configs:
        for f in dataclasses.fields(config):
            if f.name in skipped:
                continue
            value = getattr(config, f.name)
            values = value if isinstance(value, (tuple, list)) else (value,)
            found += [str(v) for v in values if isinstance(v, (str, os.PathLike))]
    return tuple(found)


def refuse_inputs(targets: Iterable[Path], inputs: Iterable[Any], option: str) -> None:
    """Raise when one of ``targets`` (an output and its sidecars) is the same as an input."""
    existing = [t for t in targets if os.path.lexists(t)]
    if not existing:
        return
    for value in inputs:
        if not isinstance(value, (str, os.PathLike)):
            continue  # a model or task object, not a path
        for candidate in _candidates(os.fspath(value)):
            if not candidate or not os.path.exists(candidate):
                continue
            for target in existing:
                if os.path.exists(target) and os.path.samefile(target, candidate):
                    raise OutputPathError(
                        f"{option} {target} is also an input ({value}); choose another {option}"
                    )
