"""What the interference rows cost per audit checkpoint.

On ``tiny-chat`` with the default :class:`~safegeom.audit.AuditConfig` (generation on, 64 carrier
prompts per class, 1000 resamples, every layer, ``interference_n`` 32), one torch thread, this
times :func:`~safegeom.audit.measure_checkpoint` on a checkpoint (tiny-chat with its weights
perturbed by 1e-3 × their RMS, so the representation share has a change to measure) with the
``arith`` task, twice each way, alternating: with ``interference`` on and off. It prints the
seconds per phase, the best total of each way and the ratio of the interference phase to the
rest (issue 21's rule: on by default only if it costs at most about 20% of a checkpoint).

Usage::

    python benchmarks/bench_audit_interference.py [--reps 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence

import torch

from safegeom.audit import AuditConfig, measure_checkpoint
from safegeom.audit.reference import build_reference
from safegeom.models import load_model
from safegeom.training.tasks import get_task


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print one JSON line per measurement, then the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="measurements of each way")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base, lm = load_model("tiny-chat"), load_model("tiny-chat")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            rms = p.pow(2).mean().sqrt()
            p.add_(1e-3 * rms * torch.randn(p.shape, generator=generator))
    config = AuditConfig()
    task = get_task("arith")
    ref = build_reference(base, config, progress=False)
    best = {True: float("inf"), False: float("inf")}
    spent = float("inf")
    for _ in range(args.reps):
        for way in (False, True):
            started = time.perf_counter()
            measured = measure_checkpoint(
                lm,
                ref,
                dataclasses.replace(config, interference=way),
                base=base,
                task=task,
                progress=False,
            )
            seconds = time.perf_counter() - started
            best[way] = min(best[way], seconds)
            if way:
                spent = min(spent, measured.seconds["interference"])
            phases = {k: round(v, 3) for k, v in measured.seconds.items()}
            print(json.dumps({"with_interference": way, "seconds": round(seconds, 2), **phases}))
    share = spent / best[False]
    print(
        f"best of {args.reps}: without {best[False]:.2f} s, with {best[True]:.2f} s; the "
        f"interference phase {spent:.2f} s = {100 * share:.0f}% of a checkpoint without it "
        f"(rule: about 20% at most: {'met' if share <= 0.2 else 'missed'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
