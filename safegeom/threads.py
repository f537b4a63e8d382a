"""How many torch CPU threads a long job uses: one per free core, unless the user chose.

torch's intra-op threads wait for each other at every operation, so one thread whose core is
shared with another busy process sets the pace of all of them: on a loaded machine two threads
can be several times slower than one. :func:`free_cores` counts the cores this process may run
on (``os.sched_getaffinity``) less the 1-minute load average, rounded, at least 1 and at most
the cores.

Whose choice wins (:func:`choose_threads`), first match:

1. a count given explicitly (``AuditConfig.threads``, ``safegeom audit --threads N``);
2. the user's own: ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set in the environment, or
   ``torch.set_num_threads`` called after safegeom was imported (torch's count then differs from
   the one this module saw at import): torch's current count is kept;
3. one thread per free core.

A ``torch.set_num_threads`` made before importing safegeom cannot be told from torch's own
default: give the count explicitly then. :func:`torch_threads` sets a count for a block and
restores the previous one afterwards. The load average counts every busy thread, this process's
too: a job that has been computing for the last minute sees its own load.

Reductions split across threads add in another order, so numbers computed with different thread
counts agree to float rounding, not always bit for bit; give the count for bit-identical reruns.

Example:
    >>> with torch_threads(1) as n:
    ...     print(n, torch.get_num_threads())
    1 1
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from safegeom.errors import ConfigError

__all__ = ["ThreadChoice", "choose_threads", "cores", "free_cores", "torch_threads", "user_threads"]

_AT_IMPORT = torch.get_num_threads()
"""torch's intra-op thread count when safegeom was first imported."""
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables by which a user sets torch's thread count."""


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and whose choice it was."""

    threads: int
    """torch intra-op threads to use."""
    source: str
    """``config`` (given explicitly), ``user`` (the environment or torch's own count, kept) or
    ``free cores`` (chosen from the load)."""


def cores() -> int:
    """The number of CPU cores this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else max(1, os.cpu_count() or 1)


def free_cores(n_cores: int | None = None, load: float | None = None) -> int:
    """Cores not busy with other work: ``n_cores`` (default :func:`cores`) less ``load`` (default
    the 1-minute load average; 0 where the OS reports none), rounded half up.

    Returns:
        The count, at least 1 and at most ``n_cores``.
    """
    n = cores() if n_cores is None else int(n_cores)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this OS
            load = 0.0
    return max(1, min(n, int(n - float(load) + 0.5)))


def user_threads() -> int | None:
    """torch's current thread count when the user chose it (the environment names one, or it
    changed since safegeom was imported), else ``None``."""
    current = torch.get_num_threads()
    if any(os.environ.get(name, "").strip() for name in _ENV_VARS) or current != _AT_IMPORT:
        return current
    return None


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count of a job: ``requested`` when given, else the user's, else the free cores
    (module docstring).

    Returns:
        The :class:`ThreadChoice`.

    Raises:
        ConfigError: ``requested`` is below 1.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ConfigError(
                f"threads (--threads) must be at least 1, got {requested}; leave it unset for "
                "one thread per free core"
            )
        return ThreadChoice(int(requested), "config")
    own = user_threads()
    if own is not None:
        return ThreadChoice(own, "user")
    return ThreadChoice(free_cores(), "free cores")


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run a block with ``n`` torch intra-op threads; the previous count is restored after it.

    Yields:
        ``n``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(before)
