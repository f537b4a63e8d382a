"""The record of a claimed folder: which of its files safegeom wrote, and the run under way.

:data:`RECORD` holds ``written`` (relative paths) and ``run`` (the run now writing: pid, command,
start, and ``foreign``, the files there when it began that safegeom did not write). A run that
ends records every file but the foreign ones; one killed first is accounted for by the next
reader the same way. A sub-folder with a record of its own is left to its own runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safegeom.artifacts import read_json, write_json

__all__ = [
    "RECORD",
    "RECORD_FORMAT",
    "files_of",
    "known_written",
    "read_record",
    "remove_written",
    "some_names",
    "write_record",
    "written_files",
]

RECORD = ".safegeom.json"
"""The record of a claimed folder: the files safegeom wrote there, and the run under way."""
RECORD_FORMAT = "safegeom.folder/1"
"""Format tag of :data:`RECORD`."""
LOCK = ".safegeom.lock"
"""The lock file (:mod:`~safegeom.outputs.claim`), never counted among a folder's files."""


def files_of(folder: Path) -> set[str]:
    """Every file (and link) under ``folder``, relative, but the lock, the record and the
    sub-folders that hold their own record (claimed folders of their own)."""
    found: set[str] = set()
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        rel = here.relative_to(folder)
        if rel != Path(".") and (here / RECORD).is_file():
            dirs[:] = []
            continue
        links = [d for d in dirs if (here / d).is_symlink()]
        for name in [*names, *links]:
            found.add((rel / name).as_posix())
    found.discard(LOCK)
    found.discard(RECORD)
    return found


def read_record(folder: Path) -> dict[str, Any]:
    """The folder's record (an empty one when there is none or it is not a record)."""
    try:
        data = read_json(folder / RECORD, what="folder record", format=RECORD_FORMAT)
    except ValueError:  # missing or damaged: nothing is known to be safegeom's
        return {"written": [], "run": None}
    return {"written": list(data.get("written") or []), "run": data.get("run")}


def write_record(folder: Path, written: Iterable[str], run: dict[str, Any] | None) -> None:
    write_json(folder / RECORD, {"format": RECORD_FORMAT, "written": sorted(written), "run": run})


def known_written(folder: Path, files: set[str]) -> set[str]:
    """The files of ``files`` safegeom wrote: those recorded, and those a run that never reached
    its end wrote (every file not there when it began)."""
    record = read_record(folder)
    written = set(record["written"])
    run = record["run"]
    if isinstance(run, dict):
        written |= files - set(run.get("foreign") or [])
    return written & files


def written_files(folder: str | os.PathLike[str]) -> list[str]:
    """The files safegeom wrote in ``folder``, relative to it, sorted (those still there)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(known_written(root, files_of(root)))


def remove_written(folder: str | os.PathLike[str]) -> list[str]:
    """Delete the files safegeom wrote in ``folder`` (and the folders they leave empty), nothing
    else: the user's own files stay, however they are named.

    Returns:
        The relative paths deleted, sorted.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    files = files_of(root)
    doomed = sorted(known_written(root, files))
    for rel in doomed:
        (root / rel).unlink(missing_ok=True)
        parent = (root / rel).parent
        while parent != root:
            with contextlib.suppress(OSError):  # not empty: the user's files are there
                parent.rmdir()
            if parent.exists():
                break
            parent = parent.parent
    record = read_record(root)
    write_record(root, set(record["written"]) - set(doomed), record["run"])
    return doomed


def some_names(paths: Iterable[str], limit: int = 3) -> str:
    items = sorted(paths)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
