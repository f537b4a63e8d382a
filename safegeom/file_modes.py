"""What kind of file is at a path, and the mode a file safegeom writes gets.

safegeom writes only regular files: :func:`refuse_special` stops a write over a device node, a FIFO
or a socket (as root, renaming over ``/dev/null`` would replace the device). Files follow the
user's umask (:func:`file_mode`); :func:`follow_umask` gives the files another library wrote
through its own ``0o600`` temporary files the same mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from safegeom.errors import OutputPathError

__all__ = ["file_mode", "follow_umask", "refuse_special", "special_kind"]


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
