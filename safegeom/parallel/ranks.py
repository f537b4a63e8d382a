"""One job over several processes: who am I, my share of the work, and the results back in order.

Started by a launcher (``accelerate launch``, ``torchrun``: anything that sets ``WORLD_SIZE`` > 1
and the ``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` environment), the process group
comes from :class:`accelerate.PartialState` (NCCL between GPUs, gloo on CPUs). Without a launcher
the job is a single process: every function here is then the identity or a plain call, and
``torch.distributed`` is never touched.

- :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`device`: who am I, and where.
- :func:`shard`: this rank's items of ``n`` (round robin, so items sorted longest first are spread
  evenly); :func:`deal`: this rank's batches, the very batches one process would run.
- :func:`collect` (every rank's value, in rank order) and :func:`gather` (values back in input
  order, tensors concatenated); objects travel over a gloo group on the CPU, whatever the
  default backend.
- :func:`broadcast`: rank 0's value on every rank (a decision made once, a result shared).
- :func:`all_or_none`: a failure on one rank stops every rank with that rank's message, instead
  of leaving the others waiting forever in the next collective; :func:`main_only`: rank 0 runs a
  write (the others write nothing), a failure there stops every rank.
- :func:`alone`: inside the block this rank works as a job of one process (its own unit of work,
  e.g. one audit checkpoint, whose capture and evaluation then shard nothing and wait for no one).

Every rank must make the same collective calls in the same order. The rule that keeps a job from
hanging: no collective inside an :func:`all_or_none` body, and every step between two collectives
inside one. A rank waits in a collective at most ``SAFEGEOM_DIST_TIMEOUT_S`` seconds
(:data:`TIMEOUT_ENV`; PyTorch's default, 30 minutes, when unset), then fails with a message that
says so; :func:`close` tears the group down (it also runs at exit, so a script need not call it).
The process group itself lives in :mod:`safegeom.parallel.process_group`.

Launch (the library picks the processes up by itself; one process needs no launcher)::

    accelerate launch --num_processes 2 -m safegeom.cli capture MODEL --prompts SPEC --out FILE
    torchrun --nproc_per_node 2 -m safegeom.cli evaluate MODEL --prompts SPEC --out FILE

On a machine without GPUs pass ``--multi_gpu`` too (``accelerate launch --multi_gpu
--num_processes 2 ...``: there a plain ``--num_processes 2``, with or without ``--cpu``, starts one
process), or use ``torchrun``; set ``OMP_NUM_THREADS`` (1 or 2 per process). Under a launcher each
rank's model belongs on :func:`device` (``cuda:LOCAL_RANK``), which the first call here selects as
the current CUDA device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import wraps
from typing import Any, Literal, ParamSpec, TypeVar

import torch
from torch import Tensor

from safegeom.errors import SafegeomError
from safegeom.parallel.process_group import (
    TIMEOUT_ENV,
    close,
    launched,
    object_group,
    state,
    waiting,
)

__all__ = [
    "TIMEOUT_ENV",
    "all_or_none",
    "alone",
    "broadcast",
    "close",
    "collect",
    "deal",
    "device",
    "gather",
    "is_main",
    "main_only",
    "rank",
    "shard",
    "world_size",
]

P = ParamSpec("P")
T = TypeVar("T")
_ALONE = [0]
"""How many :func:`alone` blocks this process is inside (0: none)."""


def world_size() -> int:
    """Number of processes in this job (1 without a launcher, and inside :func:`alone`)."""
    if _ALONE[0]:
        return 1
    return int(state().num_processes) if launched() else 1


def rank() -> int:
    """This process's index in the job, 0 to ``world_size() - 1`` (0 without a launcher, and
    inside :func:`alone`)."""
    if _ALONE[0]:
        return 0
    return int(state().process_index) if launched() else 0


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block, this rank works as a job of one process.

    :func:`world_size` is 1 and :func:`rank` 0 there, so :func:`shard`, :func:`deal`,
    :func:`collect`, :func:`gather`, :func:`all_or_none` and :func:`main_only` are plain calls,
    and capture and evaluation run every batch themselves instead of sharding them: for a unit of
    work one rank does by itself (one audit checkpoint) while the other ranks do others. Nothing
    in the block may wait for another rank, nor write a file another rank also writes
    (:func:`is_main` is true there on every rank); :func:`device` is unchanged. Blocks nest; a
    no-op in one process.
    """
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under a launcher on GPUs (made the current CUDA
    device), the CPU under a launcher on CPUs; without one, CUDA when available, else the CPU."""
    if launched():
        where = torch.device(state().device)
        return torch.device("cpu") if where.type == "cpu" else where  # accelerate says cpu:0
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shard(n: int) -> range:
    """This rank's indices of ``n`` items: ``rank, rank + world, ...`` (round robin).

    Every item goes to exactly one rank, the counts differ by at most one, and the split depends
    on ``n`` and the number of processes only. Round robin rather than blocks: items sorted
    longest first (as batches are) then give every rank a similar amount of work.

    Returns:
        ``range(rank(), n, world_size())`` (``range(n)`` in one process).
    """
    if n < 0:
        raise SafegeomError(f"cannot shard a negative number of items ({n})")
    return range(rank(), n, world_size())


def deal(batches: Iterable[Sequence[int]]) -> list[list[int]]:
    """This rank's share of a batch plan (:func:`shard` over the batches, not the items).

    Each rank runs exactly the batches one process would run, so a batched computation gives the
    same numbers bit for bit, and items are spread by the plan's order (longest first).

    Returns:
        The batches of this rank, in plan order (every batch in one process).
    """
    plan = [list(b) for b in batches]
    return [plan[i] for i in shard(len(plan))]


def _to_cpu(value: Any) -> Any:
    """``value`` with its tensors on the CPU (objects travel as CPU bytes)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def collect(value: T, *, to: Literal["main", "all"] = "all") -> list[T] | None:
    """Every rank's ``value`` (picklable; tensors are moved to the CPU), in rank order.

    A collective: every rank calls it. ``to="main"`` sends the values to rank 0 only.

    Returns:
        The list of ``world_size()`` values on every rank (``to="all"``) or on rank 0 (``"main"``;
        ``None`` on the others); ``[value]`` in one process.
    """
    if world_size() == 1:
        return [value]
    dist = torch.distributed
    state()
    out: list[Any] = [None] * dist.get_world_size()
    with waiting():
        if to == "all":
            dist.all_gather_object(out, _to_cpu(value), group=object_group())
            return out
        dist.gather_object(_to_cpu(value), out if is_main() else None, dst=0, group=object_group())
    return out if is_main() else None


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (picklable; tensors are moved to the CPU) on every rank.

    A collective: every rank calls it; the other ranks' ``value`` is ignored (pass ``None``).

    Returns:
        Rank 0's ``value`` on every rank (a copy on the others); ``value`` itself in one process.
    """
    if world_size() == 1:
        return value
    dist = torch.distributed
    state()
    box: list[Any] = [_to_cpu(value) if is_main() else None]
    with waiting():
        dist.broadcast_object_list(box, src=0, group=object_group())
    return box[0]


def gather(
    values: Sequence[Any] | Tensor,
    indices: Sequence[int],
    n: int,
    *,
    to: Literal["main", "all"] = "main",
) -> Any:
    """Each rank's ``values`` (for its ``indices`` of ``n`` items) back in input order.

    ``values`` is a sequence (any picklable items) or a tensor whose first dimension runs over
    ``indices``. A collective: every rank calls it.

    Returns:
        On rank 0 (every rank with ``to="all"``): a list of ``n`` items in input order, or for
        tensors one tensor ``[n, ...]`` concatenated in input order; ``None`` on the other ranks.
        In one process with ``indices == range(n)``: ``values`` itself.

    Raises:
        SafegeomError: ``values`` and ``indices`` differ in length, or the ranks' indices do not
            cover ``0 .. n-1`` exactly once.
    """
    idx = [int(i) for i in indices]
    if len(values) != len(idx):
        raise SafegeomError(f"gather: {len(values)} values for {len(idx)} indices")
    parts = collect((idx, values), to=to)
    if to == "main":  # only rank 0 checks and orders: a failure there must stop every rank
        return all_or_none(lambda: None if parts is None else _in_order(parts, values, n))
    assert parts is not None
    return _in_order(parts, values, n)


def _in_order(parts: list[Any], values: Sequence[Any] | Tensor, n: int) -> Any:
    """The collected ``(indices, values)`` of every rank as one input-ordered list or tensor."""
    order = [i for part_idx, _ in parts for i in part_idx]
    if sorted(order) != list(range(n)):
        raise SafegeomError(
            f"gather: the ranks hold {len(order)} items ({len(set(order))} distinct) but should "
            f"cover 0..{n - 1} once each; every rank must shard the same plan"
        )
    if len(parts) == 1 and order == list(range(n)):
        return values
    if isinstance(values, Tensor):
        joined = torch.cat([v for _, v in parts])
        out = torch.empty_like(joined)
        out[torch.tensor(order, dtype=torch.long)] = joined
        return out
    items: list[Any] = [None] * n
    for part_idx, part in parts:
        for i, item in zip(part_idx, part, strict=True):
            items[i] = item
    return items


def _failure(err: BaseException) -> str:
    text = str(err)
    return text if isinstance(err, SafegeomError) else f"{type(err).__name__}: {text}"


def all_or_none(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on every rank; if it fails on any rank, every rank raises.

    After the call every rank reports success or its error message to every other (a collective:
    every rank calls it, and ``fn`` itself must make no collective call).

    Returns:
        What ``fn`` returned on this rank.

    Raises:
        SafegeomError: on each rank where ``fn`` succeeded but another rank's failed, naming the
            failing rank and its message (``rank 1 of 2 failed: ...``).
        Exception: on a rank where ``fn`` failed, its own exception, unchanged (a bug keeps its
            traceback).
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    result: Any = None
    error: Exception | None = None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # reported to every rank below, then raised here again
        error = err
    statuses = collect(None if error is None else _failure(error), to="all") or []
    failed = [(r, msg) for r, msg in enumerate(statuses) if msg is not None]
    if error is not None:
        raise error
    if failed:
        first, message = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise SafegeomError(f"rank {first} of {len(statuses)} failed{more}: {message}")
    return result


def main_only(fn: Callable[P, T]) -> Callable[P, T | None]:
    """``fn`` run by rank 0 alone (for writes: the others write nothing), as a collective.

    Every rank calls the wrapped function; rank 0 runs ``fn`` (write atomically through
    :mod:`safegeom.artifacts`), the others wait for it, and a failure on rank 0 stops every rank
    (:func:`all_or_none`). In one process it is a plain call.

    Returns:
        A function returning ``fn``'s value on rank 0 and ``None`` on the others.
    """

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | None:
        return all_or_none(lambda: fn(*args, **kwargs) if is_main() else None)

    return wrapper
