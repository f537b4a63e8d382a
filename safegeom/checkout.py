"""The source checkout safegeom runs from, for code that uses the repository's own folders.

The notebooks and scripts that read ``analyses/`` or ``figures/`` find them here, relative to
the imported package, so they run from any working directory. Only a checkout has these
folders (an editable install, ``pip install -e .``, imports the package from it); a wheel holds
the package alone.

Example:
    >>> (repository_root("analyses") / "analyses").is_dir()
    True
"""

from __future__ import annotations

from pathlib import Path

from safegeom.errors import NotFoundError

__all__ = ["repository_root"]

_PACKAGE = Path(__file__).resolve().parent


def repository_root(*needed: str) -> Path:
    """The folder above the imported ``safegeom`` package: the root of its source checkout.

    Args:
        needed: folders the caller uses (``"analyses"``, ``"figures"``); each must be there.

    Returns:
        The checkout's root folder.

    Raises:
        NotFoundError: a needed folder is not beside the package (safegeom is installed without
            its checkout); the message names the fix.
    """
    root = _PACKAGE.parent
    missing = [name for name in needed if not (root / name).is_dir()]
    if missing:
        raise NotFoundError(
            f"safegeom is imported from {_PACKAGE}, and {root} has no {', '.join(missing)}/: "
            "these come with the source checkout; install it from a clone (pip install -e .)"
        )
    return root
