"""Where the library's batched leaves run: in this process, or shared out by an installed twin.

Library functions are single-process: they never ask which rank they are on, and nothing here
does either. A few *leaves* (the batched loops that composite functions such as carrier fits,
sweeps and the audit are built from) look up a **twin** by name before they run themselves:

- ``capture``, ``capture_stats``, ``capture_to_disk``: :mod:`safegeom.activations`;
- ``generate`` (the completions of :func:`~safegeom.evaluation.evaluate` and of RDO's targets)
  and ``refusal_scores``: :mod:`safegeom.evaluation`;
- ``row_scores``: :mod:`safegeom.carriers.row_scores` (carrier selection, cone scoring, sweeps);
- ``generated_refusals``: :mod:`safegeom.sweeps.generated`;
- ``attack_units``: :mod:`safegeom.attacks.runner` (an attack's behaviours);
- ``agreed``: a computation whose result must be one value for every process (RDO's training);
- ``claim_folder``: :mod:`safegeom.outputs.claim` (one writer claims a folder);
- ``shows_progress``: whether this process draws progress bars;
- ``device`` (this process's default device) and ``device_map`` (refuses a device map that
  several processes would each spread over the same devices): :mod:`safegeom.models`.

No twin is installed by default, so every leaf runs its one-process code. The entry points, the
command line (:mod:`safegeom.cli`) and the audit and train runners, enter
:func:`safegeom.parallel.dispatch.sharding`, which installs the sharded twins of
:mod:`safegeom.parallel` when a launcher started several processes: the twins run each rank's
share of the very batches one process would run, so the numbers are one process's, bit for bit.
The library never imports :mod:`safegeom.parallel` (that package imports the library).

Example:
    >>> from safegeom.execution import installed, twin
    >>> twin("capture") is None  # nothing installed: the leaf runs itself
    True
    >>> with installed(lambda name: (lambda: "shared") if name == "capture" else None):
    ...     twin("capture")()
    'shared'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

from safegeom.errors import SafegeomError

__all__ = ["LEAVES", "Lookup", "agreed", "installed", "shows_progress", "twin"]

LEAVES = (
    "agreed",
    "attack_units",
    "capture",
    "capture_stats",
    "capture_to_disk",
    "claim_folder",
    "device",
    "device_map",
    "generate",
    "generated_refusals",
    "refusal_scores",
    "row_scores",
    "shows_progress",
)
"""The leaves that look up a twin (see the module docstring)."""

Lookup = Callable[[str], Callable[..., Any] | None]
"""``lookup(leaf) -> twin``: the function that runs ``leaf`` instead, or ``None`` (run it here)."""

P = ParamSpec("P")
T = TypeVar("T")
_LOOKUP: ContextVar[Lookup | None] = ContextVar("safegeom_twin_lookup", default=None)


def twin(name: str) -> Callable[..., Any] | None:
    """The twin installed for the leaf ``name``, or ``None`` when the leaf runs in this process.

    Returns:
        The callable that replaces the leaf (its arguments are the leaf's), or ``None``.

    Raises:
        SafegeomError: ``name`` is not one of :data:`LEAVES`.
    """
    if name not in LEAVES:
        raise SafegeomError(f"unknown leaf {name!r}: expected one of {', '.join(LEAVES)}")
    lookup = _LOOKUP.get()
    return None if lookup is None else lookup(name)


@contextlib.contextmanager
def installed(lookup: Lookup | None) -> Iterator[None]:
    """Inside the block, :func:`twin` asks ``lookup`` (``None``: no twin, every leaf runs here).

    Blocks nest; the previous lookup is back when the block ends, however it ends.
    """
    token = _LOOKUP.set(lookup)
    try:
        yield
    finally:
        _LOOKUP.reset(token)


def shows_progress() -> bool:
    """Whether this process draws progress bars (``False`` where a twin says another process
    draws them; ``True`` without one).

    Example:
        >>> shows_progress()
        True
    """
    quiet = twin("shows_progress")
    return True if quiet is None else bool(quiet())


def agreed(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``, one result for every process that runs it.

    Without a twin a plain call; the sharded twin runs ``fn`` on every rank and hands every rank
    rank 0's result (for a computation whose result may differ by rank, e.g. on GPUs).

    Returns:
        What ``fn`` returned (rank 0's under the twin).

    Example:
        >>> agreed(max, 2, 3)
        3
    """
    shared = twin("agreed")
    return fn(*args, **kwargs) if shared is None else shared(fn, *args, **kwargs)
