"""Decisions made once for every rank: a result agreed, a folder claimed, who prints, placement.

The small twins of :mod:`safegeom.execution` (installed by
:func:`safegeom.parallel.dispatch.sharding` under a launcher):

- :func:`agreed`: ``fn`` run on every rank, rank 0's result on every rank (a failure on any rank
  stops every rank);
- :func:`claimed_on_main`: rank 0 alone holds an output folder (the others write nothing), a
  refusal there stops every rank;
- :func:`shows_progress`: rank 0 alone draws progress bars;
- :func:`refuse_device_map`: a device map is refused when several processes would each spread
  their copy of the model over the same devices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from safegeom.errors import ConfigError
from safegeom.parallel import ranks
from safegeom.parallel.ranks import all_or_none, broadcast, is_main

__all__ = ["agreed", "claimed_on_main", "refuse_device_map", "shows_progress"]

P = ParamSpec("P")
T = TypeVar("T")


def agreed(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on every rank; rank 0's result on every rank (a collective).

    Returns:
        Rank 0's result (a copy on the other ranks).

    Raises:
        SafegeomError: ``fn`` failed on another rank (the message names it).
    """
    return broadcast(all_or_none(fn, *args, **kwargs))


@contextlib.contextmanager
def claimed_on_main(hold: Callable[[], None], release: Callable[[], None]) -> Iterator[None]:
    """Rank 0 runs ``hold()`` before the block and ``release()`` after it, however it ends; the
    other ranks wait for the hold (a collective), and a failure there stops every rank."""
    main = is_main()
    all_or_none(lambda: hold() if main else None)
    try:
        yield
    finally:
        if main:
            release()


def shows_progress() -> bool:
    """Whether this rank draws progress bars: rank 0 alone."""
    return is_main()


def refuse_device_map(device_map: Any) -> None:
    """Refuse ``device_map`` under a launcher with several processes.

    Raises:
        ConfigError: always, naming the number of processes and the fix.
    """
    raise ConfigError(
        f"--device-map under a launcher ({ranks.world_size()} processes): each process would spread "
        "its own copy over the same devices; run one process with --device-map, or launch "
        "without it (one model per device)"
    )
