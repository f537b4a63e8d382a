"""Where safegeom may write: what kind of file is at a path, whether an output place is usable,
and the mode a file safegeom writes gets.

safegeom writes only regular files: :func:`refuse_special` stops a write over a device node, a FIFO
or a socket (as root, renaming over ``/dev/null`` would replace the device). Files follow the
user's umask (:func:`file_mode`); :func:`follow_umask` gives the files another library wrote
through its own ``0o600`` temporary files the same mode. :func:`check_output_file` and
:func:`check_output_dir` check an output place before any work (a real write, not permission bits).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from safegeom.errors import OutputPathError

__all__ = [
    "check_output_dir",
    "check_output_file",
    "file_mode",
    "follow_umask",
    "refuse_special",
    "special_kind",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the current umask: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def follow_umask(folder: str | os.PathLike[str]) -> None:
    """Give every regular file under ``folder`` the mode of :func:`file_mode`.

    Libraries that write through their own temporary files (safetensors under ``save_pretrained``)
    leave them ``0o600``; the files safegeom writes follow the umask instead.
    """
    mode = file_mode()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, mode)


_KINDS = {
    stat.S_ISCHR: "character device",
    stat.S_ISBLK: "block device",
    stat.S_ISFIFO: "FIFO (named pipe)",
    stat.S_ISSOCK: "socket",
}


def special_kind(target: Path) -> str | None:
    """What ``target`` is when it exists and is neither a regular file nor a folder, else ``None``."""
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return None
    return next((kind for test, kind in _KINDS.items() if test(mode)), None)


def refuse_special(target: Path, option: str | None = None) -> None:
    """Raise :class:`OutputPathError` when ``target`` is a device node, a FIFO or a socket."""
    kind = special_kind(target)
    if kind is not None:
        where = f"{option} {target}" if option else str(target)
        raise OutputPathError(f"{where} is a {kind}, not a regular file; give a file path")


def check_output_file(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Check, before any work, that a file can be written at ``path``; returns it as a Path.

    Raises:
        OutputPathError: ``path`` is a folder, a device node, a FIFO or a socket, or its nearest
            existing parent is a file or is not writable.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{option} {target} is a folder; give a file path")
    refuse_special(target, option)
    _check_parent_writable(target, option)
    return target


def check_output_dir(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Check, before any work, that ``path`` is (or can be made) a writable folder (it is made).

    Raises:
        OutputPathError: ``path`` is a file, or the folder or its nearest parent is not writable.
    """
    target = Path(path)
    kind = special_kind(target)
    if kind is not None:
        raise OutputPathError(f"{option} {target} is a {kind}; give a folder")
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{option} {target} is a file; give a folder")
    _check_parent_writable(target / ".probe", option)
    return target


def _check_parent_writable(target: Path, option: str) -> None:
    """Create ``target``'s parent folders and write (then remove) a probe file there.

    Permission bits alone do not tell (root ignores them; some file systems are read-only or
    refuse new entries), so the check is a real write.
    """
    parent = target.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{option} {target}: {existing} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".safegeom-probe-"):
            pass
    except OSError as err:
        reason = "is not writable" if isinstance(err, PermissionError) else f"({err.strerror})"
        raise OutputPathError(f"{option} {target}: cannot write in {parent} {reason}") from None
