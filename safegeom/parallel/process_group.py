"""The process group of a launched job: forming it, its timeout, its teardown, failed waits.

:mod:`safegeom.parallel.ranks` is the API (ranks, shards, collectives); this module holds what sits
under it. The group comes from :class:`accelerate.PartialState` (NCCL between GPUs, gloo on
CPUs) on first use; objects travel over a gloo group on the CPU whatever the default backend.

- :data:`TIMEOUT_ENV` (``SAFEGEOM_DIST_TIMEOUT_S``): how long a rank waits in a collective for
  the others before it fails, in seconds (PyTorch's default: 30 minutes). An audit whose
  checkpoints take longer than that apart needs more: ``SAFEGEOM_DIST_TIMEOUT_S=14400 torchrun
  ...``. Read when the group forms; give every rank the same value.
- :func:`close` tears the group down; it is also registered to run at exit once the group is
  used, so a script that never calls it does not abort at exit.
- :func:`waiting` turns gloo's bare ``RuntimeError`` of a wait that ran out, or of a peer that
  left, into a :class:`~safegeom.errors.SafegeomError` that says which.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch

from safegeom.errors import SafegeomError

__all__ = ["TIMEOUT_ENV", "close", "launched", "object_group", "state", "timeout", "waiting"]

TIMEOUT_ENV = "SAFEGEOM_DIST_TIMEOUT_S"
"""Environment variable: seconds a rank waits in a collective for the others before it fails
(default: PyTorch's 30 minutes). Read when the process group forms; give every rank the same."""
_GROUP: dict[str, Any] = {}
"""The gloo group objects travel over (made once, on the first collective), and whether
:func:`close` is registered to run at exit."""


def timeout() -> timedelta | None:
    """The collective timeout set by :data:`TIMEOUT_ENV` (``None``: PyTorch's default, 30 min).

    Raises:
        SafegeomError: the variable is not a positive, finite number of seconds.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise SafegeomError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def launched() -> bool:
    """Whether a launcher started several processes (or a caller set up the process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state() -> Any:
    """The accelerate state (the process group is formed on first use, with :func:`timeout`)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # On a machine without GPUs accelerate forms a CPU (gloo) group only when asked for the CPU.
    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    wait = timeout()
    formed = PartialState(cpu=cpu, **({} if wait is None else {"timeout": wait}))
    if not _GROUP.get("atexit"):
        # A script that never calls close() still tears the group down while the interpreter is
        # alive: left to its finalisation, gloo's threads at times abort the process (status -6).
        atexit.register(close)
        _GROUP["atexit"] = True
    return formed


def object_group() -> Any:
    """The gloo group objects travel over (``None``: the default group, when it is gloo)."""
    dist = torch.distributed
    if "group" not in _GROUP:
        cpu = dist.get_backend() == "gloo"
        wait = timeout()  # new_group does not inherit the default group's timeout
        _GROUP["group"] = None if cpu else dist.new_group(backend="gloo", timeout=wait)
    return _GROUP["group"]


def close() -> None:
    """Tear down the process group (and the gloo group objects travel over), if any.

    Left to the interpreter's exit, a gloo group at times aborts the process ("terminate called
    without an active exception", status −6) after all its work is done, so this also runs at
    exit in any process that used the group (registered on first use). A no-op in one process,
    and once the group is gone.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = _GROUP.pop("group", None)
    if group is not None and group is not dist.group.WORLD:
        dist.destroy_process_group(group)
    dist.destroy_process_group()


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Around a collective: a wait that ran out, or a peer that left, as a :class:`SafegeomError`
    that says so (gloo raises a bare ``RuntimeError`` naming its source line)."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        detail = text.split("] ", 1)[-1].splitlines()[0] if text else type(err).__name__
        me = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if "Timed out" in text:
            wait = timeout()
            limit = "PyTorch's default of 30 min" if wait is None else f"{wait.total_seconds():g} s"
            raise SafegeomError(
                f"rank {me} waited longer than {limit} for the other ranks in a collective "
                f"(set {TIMEOUT_ENV} to wait longer): {detail}"
            ) from err
        if "Connection closed by peer" in text or "Connection reset by peer" in text:
            raise SafegeomError(
                f"rank {me}: another rank left the job (it failed or was killed; see its "
                f"output): {detail}"
            ) from err
        raise
