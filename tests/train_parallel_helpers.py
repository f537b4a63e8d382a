"""What the two-process training tests (DDP and FSDP) share: recording a rank's writes, launching
the job, and comparing checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.launch_helpers import launch
from tests.train_helpers import saved_weights


def record_every_write(log: list[str]) -> None:
    """Log every path this process writes through the artifact layer, every folder it makes and
    every rename's target (what rank 1 must never do)."""
    from tests.distributed_worker import _record_made, _record_writes

    _record_writes(log)
    _record_made(log)
    real_rename = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        log.append(str(dst))
        real_rename(src, dst, *args, **kwargs)

    os.rename = rename  # type: ignore[assignment]


def trajectory_row(traj: Any) -> dict[str, Any]:
    """The JSON-ready facts of a trajectory that every rank must agree on."""
    return {
        "steps": list(traj.steps),
        "losses": list(traj.losses),
        "hashes": [c.weight_hash for c in traj.checkpoints],
    }


def launch_job(module: str, ckpt: Path, work: Path, logs: Path) -> list[dict[str, Any]]:
    """Run ``python -m MODULE CKPT WORK`` as two ranks; every rank must exit 0. Returns each
    rank's ``WORK/rank{r}.json``."""
    for code, out, err in launch(module, [str(ckpt), str(work)], logs):
        assert code == 0, f"a rank failed:\n{out}\n{err[-4000:]}"
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]


def max_diff(a: Path, b: Path) -> float:
    """Largest |Δ| between the tensors of two checkpoint folders with the same tensor names."""
    wa, wb = saved_weights(a), saved_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def outcome(run: Callable[[], Any]) -> dict[str, Any]:
    """:func:`trajectory_row` of what ``run`` returned, or ``{"error": [type, message]}``."""
    try:
        return trajectory_row(run())
    except Exception as err:
        return {"error": [type(err).__name__, str(err)]}


def finish_rank(work: Path, results: dict[str, Any], writes: list[str]) -> None:
    """Save this rank's results and recorded writes as ``WORK/rank{r}.json``; close the group."""
    from safegeom.parallel import ranks as dist

    results["writes"] = writes
    (work / f"rank{dist.rank()}.json").write_text(json.dumps(results))
    dist.close()
