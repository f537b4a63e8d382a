"""Where a command may write: outputs that never destroy what safegeom did not write.

Every command checks its ``--out`` here before any work, with the same rules:

- **Never an input.** An ``--out`` (or a sidecar written beside it) that is the same file or
  folder as any input (a prompt file, a model folder, a carrier file ...) is refused.
- **File outputs** (``capture --out``, ``capture --stats``, ``evaluate --out``, ``sweep --out
  FILE``): never a device node, a FIFO or a socket (:mod:`safegeom.artifacts` refuses them, also
  at the rename), and an existing file is replaced only when safegeom wrote it, or with
  ``--overwrite``. A file is safegeom's when it carries safegeom's marker
  (:func:`is_safegeom_file`): a JSON object whose ``format`` starts with ``safegeom.``, a
  safetensors header with ``safegeom`` metadata, a Parquet schema with the ``safegeom`` key.
- **Folder outputs** (``train``, ``audit``, ``carriers``, ``capture --shard-size``, ``sweep``,
  ``figures``, ``demo``): the run claims the folder (:func:`claim_folder`). It takes an advisory
  lock (``fcntl.flock`` on :data:`LOCK`, which records the pid, the command and the start time),
  held for the run and released on any exit, so a second writer fails at once naming the first.
  The folder must be empty or hold only files safegeom wrote (else ``--overwrite``, which lets
  the run write beside the user's files and never deletes them). What each run wrote is kept in
  the folder's record, :data:`RECORD`: at the end of a run every file not there before it began
  is added; a run killed before its end is accounted for by the next claim. ``--overwrite`` of
  ``train`` and ``audit`` deletes only recorded files (:func:`remove_written`). A sub-folder
  holding its own record is another claimed folder (an audit inside a run folder): it is left
  to its own runs.

Example:
    >>> import tempfile, pathlib
    >>> from safegeom.outputs import claim_folder, written_files
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with claim_folder(folder, command="demo"):
    ...     _ = (folder / "table.csv").write_text("a,b\\n")
    >>> written_files(folder)
    ['table.csv']
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import functools
import inspect
import json
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from safegeom.artifacts import (
    PARQUET_MARK,
    check_output_dir,
    check_output_file,
    read_json,
    write_json,
)
from safegeom.errors import OutputPathError

__all__ = [
    "LOCK",
    "RECORD",
    "check_file_output",
    "claim_folder",
    "claims_folder",
    "inputs_of",
    "is_safegeom_file",
    "remove_written",
    "written_files",
]

LOCK = ".safegeom.lock"
"""The lock file of a claimed folder: there and locked with ``flock`` while a run writes there,
it holds the holder's pid, command and start time (JSON)."""
RECORD = ".safegeom.json"
"""The record of a claimed folder: the files safegeom wrote there, and the run under way."""
RECORD_FORMAT = "safegeom.folder/1"
"""Format tag of :data:`RECORD`."""

P = ParamSpec("P")
T = TypeVar("T")


# --- inputs ------------------------------------------------------------------------------------


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


def _refuse_inputs(targets: Iterable[Path], inputs: Iterable[Any], option: str) -> None:
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


# --- file outputs ------------------------------------------------------------------------------


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
    _refuse_inputs(targets, inputs, option)
    if overwrite:
        return targets[0]
    for target in targets:
        if os.path.exists(target) and not is_safegeom_file(target):
            raise OutputPathError(
                f"{option} {target} exists and safegeom did not write it; choose another "
                f"{option}, or pass --overwrite to replace it"
            )
    return targets[0]


# --- folder outputs: the record ----------------------------------------------------------------


def _files(folder: Path) -> set[str]:
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


def _read_record(folder: Path) -> dict[str, Any]:
    """The folder's record (an empty one when there is none or it is not a record)."""
    try:
        data = read_json(folder / RECORD, what="folder record", format=RECORD_FORMAT)
    except ValueError:  # missing or damaged: nothing is known to be safegeom's
        return {"written": [], "run": None}
    return {"written": list(data.get("written") or []), "run": data.get("run")}


def _write_record(folder: Path, written: Iterable[str], run: dict[str, Any] | None) -> None:
    write_json(folder / RECORD, {"format": RECORD_FORMAT, "written": sorted(written), "run": run})


def _known_written(folder: Path, files: set[str]) -> set[str]:
    """The files of ``files`` safegeom wrote: those recorded, and those a run that never reached
    its end wrote (every file not there when it began)."""
    record = _read_record(folder)
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
    return sorted(_known_written(root, _files(root)))


def remove_written(folder: str | os.PathLike[str]) -> list[str]:
    """Delete the files safegeom wrote in ``folder`` (and the folders they leave empty), nothing
    else: the user's own files stay, however they are named.

    Returns:
        The relative paths deleted, sorted.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    files = _files(root)
    doomed = sorted(_known_written(root, files))
    for rel in doomed:
        (root / rel).unlink(missing_ok=True)
        parent = (root / rel).parent
        while parent != root:
            with contextlib.suppress(OSError):  # not empty: the user's files are there
                parent.rmdir()
            if parent.exists():
                break
            parent = parent.parent
    record = _read_record(root)
    _write_record(root, set(record["written"]) - set(doomed), record["run"])
    return doomed


def _names(paths: Iterable[str], limit: int = 3) -> str:
    items = sorted(paths)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- folder outputs: the claim -----------------------------------------------------------------


@dataclasses.dataclass
class _Claim:
    """A folder this process holds: the open, locked lock file and the files not safegeom's."""

    fd: int
    """The lock file, open and ``flock``-ed."""
    foreign: frozenset[str]
    """The files there when the claim began that safegeom did not write."""
    created: bool = False
    """The claim made the folder (released with nothing written, it is removed again)."""
    depth: int = 1
    """How many nested claims of this process hold it (the outermost releases it)."""


_HELD: dict[str, _Claim] = {}
"""Folders this process has claimed, by real path (a nested claim of one is re-entrant)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _holder(fd: int) -> str:
    """Who holds the lock whose file is open as ``fd``, in words."""
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return (
            f"pid {data['pid']} on {data.get('host', '?')}, safegeom {data['command']}, "
            f"started {data['started']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


def _lock(folder: Path, command: str, option: str) -> int:
    """Open and ``flock`` the folder's lock file, recording who holds it; returns its fd.

    The holder deletes the file when it lets go; a lock won on a file deleted meanwhile is not
    the folder's lock, so the claim tries again on the file now there.
    """
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputPathError(
                f"{option} {folder} is in use by another safegeom run ({holder}); wait for it "
                f"to finish or choose another {option}"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "argv": sys.argv,
        "started": _now(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
    return fd


def _claim(folder: Path, command: str, overwrite: bool, inputs: Iterable[Any], option: str) -> None:
    """Check, lock and record ``folder`` for this process (see :func:`claim_folder`)."""
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key].depth += 1
        return
    created = not folder.exists()
    check_output_dir(folder, option=option)
    _refuse_inputs([folder], inputs, option)
    fd = _lock(folder, command, option)
    try:
        files = _files(folder)
        written = _known_written(folder, files)
        foreign = files - written
        if foreign and not overwrite:
            raise OutputPathError(
                f"{option} {folder} holds files safegeom did not write ({_names(foreign)}); "
                f"choose an empty folder, or pass --overwrite to write beside them (they are "
                "kept)"
            )
        run = {"pid": os.getpid(), "command": command, "started": _now()}
        _write_record(folder, written, {**run, "foreign": sorted(foreign)})
    except BaseException:
        _unlock(folder, fd, created)
        raise
    _HELD[key] = _Claim(fd=fd, foreign=frozenset(foreign), created=created)


def _unlock(folder: Path, fd: int, made_here: bool) -> None:
    """Delete the lock file and release the lock; a folder this claim made that holds nothing
    else is removed."""
    empty = made_here and not _files(folder)
    if empty:
        (folder / RECORD).unlink(missing_ok=True)
    (folder / LOCK).unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    if empty:
        with contextlib.suppress(OSError):  # something appeared meanwhile: keep it
            folder.rmdir()


def _release(folder: Path) -> None:
    """Record what this process wrote in ``folder`` and unlock it (the outermost claim only)."""
    key = os.path.realpath(folder)
    claim = _HELD.get(key)
    if claim is None:
        return
    claim.depth -= 1
    if claim.depth:
        return
    try:
        if folder.is_dir():
            _write_record(folder, _files(folder) - claim.foreign, None)
    finally:
        del _HELD[key]
        _unlock(folder, claim.fd, claim.created)


@contextlib.contextmanager
def claim_folder(
    path: str | os.PathLike[str],
    *,
    command: str,
    overwrite: bool = False,
    inputs: Iterable[Any] = (),
    option: str = "--out",
) -> Iterator[Path]:
    """Hold the folder ``path`` for one run: checked, locked, and its writes recorded.

    The folder is made when missing. Nested claims of one folder by one process are one claim.
    Under a launcher rank 0 alone claims (the others write nothing), and a refusal stops every
    rank. The lock is released when the block ends, however it ends (a killed process releases
    it too: the kernel drops the ``flock``).

    Yields:
        ``path`` as a Path.

    Raises:
        OutputPathError: ``path`` is a file, a device node, a FIFO or a socket, or not writable;
            it is one of ``inputs``; another run holds it (the message names it: pid, command,
            start time); or it holds files safegeom did not write and ``overwrite`` is off.
    """
    from safegeom.distributed import all_or_none, is_main

    folder = Path(path)
    main = is_main()
    inputs = tuple(inputs)
    all_or_none(lambda: _claim(folder, command, overwrite, inputs, option) if main else None)
    try:
        yield folder
    finally:
        if main:
            _release(folder)


def claims_folder(
    command: str,
    *,
    out: str = "out",
    overwrite: str | None = "overwrite",
    inputs: tuple[str, ...] = (),
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a function that writes a folder so that each call holds it (:func:`claim_folder`).

    Args:
        command: the command's name, recorded in the lock.
        out: the parameter that names the folder.
        overwrite: the parameter that allows writing beside files safegeom did not write.
        inputs: the parameters that name inputs (refused as the folder).

    Returns:
        The decorator.
    """

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            named = [given.get(name) for name in inputs]
            values = [v for x in named for v in (x if isinstance(x, (list, tuple)) else [x])]
            allow = bool(given.get(overwrite)) if overwrite else False
            with claim_folder(given[out], command=command, overwrite=allow, inputs=values):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
