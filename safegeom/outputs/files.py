"""File outputs: what may be replaced, told by safegeom's marker in the file itself."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safegeom.artifacts import PARQUET_MARK, check_output_file
from safegeom.errors import OutputPathError
from safegeom.outputs.inputs import refuse_inputs

__all__ = ["check_file_output", "is_safegeom_file"]


def _safetensors_metadata(head: bytes, path: Path) -> dict[str, Any] | None:
    """The ``__metadata__`` of a safetensors file whose first 8 bytes are ``head``, or ``None``."""
    (size,) = struct.unpack("<Q", head)
    if not 2 <= size <= 100_000_000 or size > path.stat().st_size:
        return None
    with open(path, "rb") as handle:
        handle.seek(8)
        try:
            header = json.loads(handle.read(size).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def is_safegeom_file(path: str | os.PathLike[str]) -> bool:
    """Whether the regular file ``path`` carries safegeom's marker (module docstring).

    Returns:
        ``True`` for a JSON object whose ``format`` starts with ``safegeom.``, a safetensors file
        with ``safegeom`` metadata, a Parquet file whose schema has the ``safegeom`` key; else
        ``False`` (a file of any other kind, or one that cannot be read).
    """
    target = Path(path)
    try:
        with open(target, "rb") as handle:
            head = handle.read(8)
        if head[:4] == b"PAR1":
            import pyarrow.parquet as pq

            return PARQUET_MARK in (pq.read_schema(target).metadata or {})
        if head.lstrip()[:1] == b"{":
            data = json.loads(target.read_text(encoding="utf-8"))
            tag = data.get("format") if isinstance(data, dict) else None
            return isinstance(tag, str) and tag.startswith("safegeom.")
        if len(head) == 8:
            return "safegeom" in (_safetensors_metadata(head, target) or {})
    except (OSError, ValueError):  # unreadable, not JSON, not Parquet: not safegeom's
        return False
    return False


def check_file_output(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[Any] = (),
    overwrite: bool = False,
    sidecars: Iterable[str | os.PathLike[str]] = (),
    option: str = "--out",
) -> Path:
    """Check, before any work, that a file output (and its ``sidecars``) may be written.

    Returns:
        ``path`` as a Path.

    Raises:
        OutputPathError: a target is a folder, a device node, a FIFO or a socket, or its folder
            is not writable; a target is one of ``inputs``; or a target exists and safegeom did
            not write it (:func:`is_safegeom_file`) and ``overwrite`` is off.
    """
    targets = [Path(path), *(Path(s) for s in sidecars)]
    for target in targets:
        check_output_file(target, option=option)
    refuse_inputs(targets, inputs, option)
    if overwrite:
        return targets[0]
    for target in targets:
        if os.path.exists(target) and not is_safegeom_file(target):
            raise OutputPathError(
                f"{option} {target} exists and safegeom did not write it; choose another "
                f"{option}, or pass --overwrite to replace it"
            )
    return targets[0]
