"""What the geometry rows' bootstrap CIs and noise floors cost per audit checkpoint.

On ``tiny-chat`` with the default :class:`~safegeom.audit.AuditConfig` (64 carrier prompts per
class, 1000 resamples, every layer), one torch thread, this times
:func:`~safegeom.audit.measure_checkpoint` on the base twice each way, alternating: with the CIs
and floors, and with them switched off (the bootstrap samples and floor rows replaced by none, which
is the audit before they existed: the other rows are the same numbers). It prints the seconds per
phase, the best total of each way and their ratio (issue 21's budget: at most 1.5).

Usage::

    python benchmarks/bench_audit_uncertainty.py [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch

from safegeom.audit import AuditConfig, measure_checkpoint
from safegeom.audit import geometry_rows as geometry_module
from safegeom.audit.reference import build_reference
from safegeom.models import load_model


def _timed(lm, ref, config: AuditConfig, with_uncertainty: bool) -> tuple[float, dict]:
    """One checkpoint measured; ``(seconds, seconds per phase)``."""
    saved = geometry_module.geometry_samples, geometry_module.floor_rows
    if not with_uncertainty:
        geometry_module.geometry_samples = lambda *a, **k: {}
        geometry_module.floor_rows = lambda *a, **k: []
    try:
        started = time.perf_counter()
        measured = measure_checkpoint(lm, ref, config, base=lm, progress=False)
        return time.perf_counter() - started, dict(measured.seconds)
    finally:
        geometry_module.geometry_samples, geometry_module.floor_rows = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print one JSON line per measurement, then the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="measurements of each way")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lm = load_model("tiny-chat")
    config = AuditConfig()
    ref = build_reference(lm, config, progress=False)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.reps):
        for way in (False, True):
            seconds, phases = _timed(lm, ref, config, way)
            best[way] = min(best[way], seconds)
            phases = {k: round(v, 3) for k, v in phases.items()}
            print(json.dumps({"cis_and_floors": way, "seconds": round(seconds, 2), **phases}))
    ratio = best[True] / best[False]
    print(
        f"best of {args.reps}: without {best[False]:.2f} s, with {best[True]:.2f} s, "
        f"ratio {ratio:.2f} (budget 1.5: {'met' if ratio <= 1.5 else 'missed'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
