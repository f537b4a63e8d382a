"""The entry points' switch to the sharded twins: :func:`sharding` and the twin of each leaf.

The library is single-process; its batched leaves look a twin up in :mod:`safegeom.execution`.
:func:`sharding` installs :func:`sharded_twin` as that lookup: under a launcher with several
processes each leaf then runs its twin here (:data:`TWINS`), so the composites built on the
leaves (carrier fits, sweeps, the audit's measurements) shard by themselves; in one process, and
inside :func:`~safegeom.parallel.ranks.alone`, no twin is returned and every leaf runs itself.
``device`` is the exception: under a launcher this rank's device stays ``cuda:LOCAL_RANK``
inside :func:`~safegeom.parallel.ranks.alone` too.

The command line (:func:`safegeom.cli.main`) and the audit and train runners enter it; a script
launched with ``torchrun``/``accelerate launch`` that calls the library directly enters it too to
share the work::

    from safegeom.parallel.dispatch import sharding

    with sharding():
        acts = sg.capture(lm, prompts)  # each rank its share of the batches, all of it back

Example:
    >>> from safegeom.execution import twin
    >>> with sharding():  # one process: every leaf runs itself
    ...     twin("capture") is None
    True
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from safegeom import execution
from safegeom.parallel import agreement, ranks
from safegeom.parallel.attacks import attack_units_dealt
from safegeom.parallel.capture import (
    capture_sharded,
    capture_stats_sharded,
    capture_to_disk_sharded,
)
from safegeom.parallel.evaluation import generate_sharded, refusal_scores_sharded
from safegeom.parallel.process_group import launched
from safegeom.parallel.row_scores import row_scores_dealt
from safegeom.parallel.sweeps import generated_refusals_dealt

__all__ = ["TWINS", "sharded_twin", "sharding", "shards"]

P = ParamSpec("P")
T = TypeVar("T")

TWINS: dict[str, Callable[..., Any]] = {
    "agreed": agreement.agreed,
    "attack_units": attack_units_dealt,
    "capture": capture_sharded,
    "capture_stats": capture_stats_sharded,
    "capture_to_disk": capture_to_disk_sharded,
    "claim_folder": agreement.claimed_on_main,
    "device": ranks.device,
    "device_map": agreement.refuse_device_map,
    "generate": generate_sharded,
    "generated_refusals": generated_refusals_dealt,
    "refusal_scores": refusal_scores_sharded,
    "row_scores": row_scores_dealt,
    "shows_progress": agreement.shows_progress,
}
"""The sharded twin of every leaf of :data:`safegeom.execution.LEAVES`."""


def sharded_twin(name: str) -> Callable[..., Any] | None:
    """The twin of the leaf ``name`` for this process: its sharded twin when the job has several
    processes (``device``: whenever a launcher started several), else ``None``.

    Returns:
        A callable from :data:`TWINS`, or ``None`` (the leaf runs itself).
    """
    if name == "device":
        return TWINS[name] if launched() else None
    return TWINS[name] if ranks.world_size() > 1 else None


@contextlib.contextmanager
def sharding() -> Iterator[None]:
    """Inside the block, the library's leaves run their sharded twins when a launcher started
    several processes (every rank must then make the same calls in the same order: they are
    collectives). Blocks nest; nothing changes in one process."""
    with execution.installed(sharded_twin):
        yield


def shards(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorate an entry point so that each call runs inside :func:`sharding`.

    Returns:
        The wrapped function.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with sharding():
            return fn(*args, **kwargs)

    return wrapper
