"""The claim of a folder output: one writer at a time (an ``flock``), its writes recorded.

The lock file, :data:`LOCK`, is there and locked while a run writes in the folder and holds the
holder's pid, command and start time; the holder deletes it when it lets go (a killed process
leaves the file, but the kernel drops the lock).
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
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from safegeom.artifacts import check_output_dir
from safegeom.errors import OutputPathError
from safegeom.execution import twin
from safegeom.outputs.inputs import refuse_inputs
from safegeom.outputs.record import (
    LOCK,
    RECORD,
    files_of,
    known_written,
    some_names,
    write_record,
)

__all__ = ["LOCK", "claim_folder", "claims_folder"]

P = ParamSpec("P")
T = TypeVar("T")


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
    refuse_inputs([folder], inputs, option)
    fd = _lock(folder, command, option)
    try:
        files = files_of(folder)
        written = known_written(folder, files)
        foreign = files - written
        if foreign and not overwrite:
            raise OutputPathError(
                f"{option} {folder} holds files safegeom did not write ({some_names(foreign)}); "
                f"choose an empty folder, or pass --overwrite to write beside them (they are "
                "kept)"
            )
        run = {"pid": os.getpid(), "command": command, "started": _now()}
        write_record(folder, written, {**run, "foreign": sorted(foreign)})
    except BaseException:
        _unlock(folder, fd, created)
        raise
    _HELD[key] = _Claim(fd=fd, foreign=frozenset(foreign), created=created)


def _unlock(folder: Path, fd: int, made_here: bool) -> None:
    """Delete the lock file and release the lock; a folder this claim made that holds nothing
    else is removed."""
    empty = made_here and not files_of(folder)
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
            write_record(folder, files_of(folder) - claim.foreign, None)
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
    Under a launcher, with the sharded twins installed by the entry points
    (:mod:`safegeom.execution`), rank 0 alone claims (the others write nothing) and a refusal stops
    every rank (:func:`safegeom.parallel.agreement.claimed_on_main`). The lock is released when the block ends, however it ends (a killed process releases
    it too: the kernel drops the ``flock``).

    Yields:
        ``path`` as a Path.

    Raises:
        OutputPathError: ``path`` is a file, a device node, a FIFO or a socket, or not writable;
            it is one of ``inputs``; another run holds it (the message names it: pid, command,
            start time); or it holds files safegeom did not write and ``overwrite`` is off.
    """
    folder = Path(path)
    hold = functools.partial(_claim, folder, command, overwrite, tuple(inputs), option)
    with (twin("claim_folder") or _held)(hold, functools.partial(_release, folder)):
        yield folder


@contextlib.contextmanager
def _held(hold: Callable[[], None], release: Callable[[], None]) -> Iterator[None]:
    """``hold()`` before the block, ``release()`` after it, however it ends (one process)."""
    hold()
    try:
        yield
    finally:
        release()


def claims_folder(
    command: str,
    *,
    out: str = "out",
    overwrite: str | None = "overwrite",
    inputs: tuple[str, ...] = (),
    precheck: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a function that writes a folder so that each call holds it (:func:`claim_folder`).

    Args:
        command: the command's name, recorded in the lock.
        out: the parameter that names the folder.
        overwrite: the parameter that allows writing beside files safegeom did not write.
        inputs: the parameters that name inputs (refused as the folder).
        precheck: called with the call's arguments (by name) before the folder is claimed (and
            so made): a check that must see the folder as the user left it.

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
            if precheck is not None:
                precheck(given)
            with claim_folder(given[out], command=command, overwrite=allow, inputs=values):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
