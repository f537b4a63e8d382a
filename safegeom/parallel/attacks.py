"""An attack over several processes: behaviours dealt to the ranks, the set saved in order.

The sharded twin of :func:`safegeom.attacks.runner.attack_units` (installed by
:func:`safegeom.parallel.dispatch.sharding`, so ``accelerate launch --multi_gpu --num_processes 2
-m safegeom.cli attack ...`` shards by itself). The units (one behaviour each, or one universal
attack of them all) are dealt round robin, one per rank per round: in round ``k`` rank ``r`` runs
unit ``k·N + r`` by itself (:func:`~safegeom.parallel.ranks.alone`: nothing inside shards), every
rank gets the round's records back in unit order, and rank 0 saves the set so far. Each
behaviour's attack is seeded by its index and judged on its own, so the set equals one process's
record for record, bit for bit on CPU (timings aside), and ``--resume`` continues after the saved
prefix whatever the number of processes. A failure on one rank keeps (and saves) the round's
records before it, then stops every rank with its message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from safegeom.parallel.ranks import all_or_none, alone, collect, main_only, rank, world_size

__all__ = ["attack_units_dealt"]

T = TypeVar("T")


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


def attack_units_dealt(
    n: int, run: Callable[[int], Sequence[T]], save: Callable[[list[T]], None]
) -> list[T]:
    """:func:`~safegeom.attacks.runner.attack_units` over every process of the job.

    A collective: every rank calls it with the same ``n``. ``run(k)`` gives unit ``k``'s
    records; ``save(records so far)`` runs on rank 0 alone after each round.

    Returns:
        Every unit's records, in unit order, on every rank.

    Raises:
        Exception: ``run``'s error on the rank where it failed, ``rank R of N failed: ...`` on the
            others, once the round's records before the failure are saved.
    """
    world, me = world_size(), rank()
    records: list[T] = []
    for first in range(0, n, world):
        k, result, error = first + me, None, None
        if k < n:
            try:
                with alone():
                    result = list(run(k))
            except Exception as err:  # reported to every rank once the round is saved
                error = err
        got = collect(result, to="all") or [result]
        done = len(records)
        for item in got[: n - first]:
            if item is None:
                break
            records.extend(item)
        if len(records) > done:  # the same on every rank: the collected records decide it
            main_only(save)(list(records))
        all_or_none(_raise, error)
    return records
