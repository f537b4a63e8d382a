"""What the trajectory audit costs, per checkpoint and per phase, against the naive way.

For a 4-checkpoint ``tiny-chat`` trajectory (a harmful LoRA run trained here, 60 steps saved
every 20, or ``--trajectory DIR``) this prints:

1. the wall seconds per checkpoint split by phase (capture, carriers, causal, generation,
   scoring) and the forward passes per checkpoint, from the audit's own manifest (the
   :class:`~safegeom.audit.Measured` numbers of every checkpoint), for the audit with defaults
   and with ``generate=False`` (``--no-generate``, geometry-only);
2. the whole-audit wall time of both, against the goals of issue 11 (defaults ≤ 3 minutes on 2
   cores; geometry-only well under a minute: < 60 s), as "goal met" / "goal missed";
3. for the last checkpoint, the geometry and causal families done "the naive way" with the
   public API (one capture per metric family: float64 means for drift and coupling, the carrier
   functions again for re-extraction, a per-prompt capture for projections and coordinate
   statistics; one ``refusal_scores`` pass per direction, ``Ablation``/``Addition`` of r₀, r_t and
   each random control) beside the audit's batched rows on the same checkpoint: seconds, the
   ratio naive / audit and forward passes (a forward-pre-hook on the model); ``max |d|`` checks
   that both ways computed the same numbers.

Usage::

    python benchmarks/bench_audit.py                       # trains the run; about 2 minutes in all
    python benchmarks/bench_audit.py --threads 1 --out /tmp/bench-audit
    python benchmarks/bench_audit.py --trajectory RUN_DIR --skip-naive
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import safegeom as sg
from safegeom.artifacts import check_output_dir
from safegeom.audit import AuditConfig, Reference, audit, load_reference, measure_checkpoint
from safegeom.audit.inputs import resolve_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_naive import naive_causal, naive_geometry

PHASES = ("capture", "carriers", "causal", "generation", "scoring")
"""Per-checkpoint phases printed (``reselect`` is off by default)."""
GOALS = {"defaults": 180.0, "no-generate": 60.0}
"""Issue 11's goals in wall seconds: the whole audit with defaults, and geometry-only."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def count_forwards(*models: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of ``models`` (each distinct module once) with forward-pre-hooks.

    Yields:
        A one-item list holding the running count.
    """
    count = [0]
    unique = {id(m): m for m in models}.values()
    hook = lambda *_: count.__setitem__(0, count[0] + 1)  # noqa: E731
    handles = [m.register_forward_pre_hook(hook) for m in unique]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


@dataclasses.dataclass(frozen=True)
class Run:
    """The LoRA trajectory the benchmark trains and audits."""

    model: str
    """The model trained: ``tiny-chat`` or ``smol-chat`` (an adapter: merged first, as train()
    asks, into ``merged/`` beside the run)."""
    task: str
    """The task spec trained on."""
    steps: int
    """Optimizer steps (batch 8, train()'s defaults otherwise)."""
    save_every: int
    """Checkpoint interval in steps (checkpoints at 0, save_every, ..., steps)."""
    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)
    """The audit's settings (default: ``AuditConfig()``)."""


RUNS: dict[str, Run] = {
    "tiny-chat": Run("tiny-chat", "harmful", steps=60, save_every=20),
    # 2 checkpoints (steps 0 and 6), a CPU-sized audit: the base's selection scores every
    # candidate (174 on smol-chat's 30 layers) on n_val prompts per class, 3.6 rows/s on one
    # loaded core (the defaults' 32: about an hour for the bypass scores alone).
    "smol-chat": Run(
        "smol-chat", "mix", steps=6, save_every=6, audit=AuditConfig(n_val=4, n_behaviour=8)
    ),
}
"""The trajectory per ``--model``."""


def _jsonable(value: Any) -> Any:
    """``value`` with what JSON lacks (tuples, layer specs) made lists and text."""
    return json.loads(json.dumps(value, default=str))


def train_trajectory(out: Path, run: Run = RUNS["tiny-chat"]) -> tuple[Path, float, list[float]]:
    """Train ``run`` into ``out`` (replacing one there): a LoRA on ``run.model`` (the tiny-chat
    default: a harmful LoRA, 60 steps saved every 20, checkpoints at steps 0, 20, 40, 60).

    Returns:
        ``(run folder, training wall seconds, LoRA step seconds)``: the latter from one
        optimizer step's end to the next's, each a whole step of train()'s loop (the first step,
        and the steps that end by writing a checkpoint, left out).
    """
    model = run.model
    if model == "smol-chat":  # a LoRA adapter: train() trains from the merged model
        merged = out.parent / f"{out.name}-merged"
        lm = sg.load_model(model, sg.LoadConfig(merge_adapter=True, device="cpu"))
        lm.model.save_pretrained(merged)
        lm.tokenizer.save_pretrained(merged)
        del lm
        model = str(merged)
    ends: list[tuple[int, float]] = []
    config = sg.TrainConfig(steps=run.steps, save_every=run.save_every, batch_size=8)
    started = time.perf_counter()
    traj = sg.train(
        model,
        run.task,
        config,
        method="lora",
        out=out,
        overwrite=True,
        callback=lambda step, _: ends.append((step, time.perf_counter())),
    )
    took = time.perf_counter() - started
    saves = set(range(0, run.steps + 1, run.save_every)) | {run.steps}
    steps = [b - a for (_, a), (j, b) in itertools.pairwise(ends) if j not in saves]
    return Path(traj.root), took, steps


def timed_audit(
    run: Path, out: Path, config: AuditConfig, *, progress: bool = True
) -> tuple[float, dict[str, Any]]:
    """Audit ``run`` into ``out`` from scratch (``overwrite``).

    Returns:
        ``(whole-audit wall seconds, the audit's manifest as a dict)``."""
    started = time.perf_counter()
    audit(run, out, config, overwrite=True, progress=progress)
    return time.perf_counter() - started, json.loads((out / "manifest.json").read_text())


def checkpoint_table(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per checkpoint: label, step, load and phase seconds, their total and forward passes."""
    out = []
    for c in manifest["checkpoints"]:
        secs = {p: float(c["seconds"].get(p, 0.0)) for p in ("load", *PHASES)}
        out.append(
            {
                "label": c["label"],
                "step": c["step"],
                **secs,
                "total": sum(secs.values()),
                "forward_passes": int(c["forward_passes"]),
            }
        )
    return out


def naive_versus_audit(
    lm: Any, base: Any, ref: Reference, config: AuditConfig, *, progress: bool = True
) -> dict[str, Any]:
    """The geometry and causal families of one checkpoint, the audit's way then the naive way.

    Returns:
        ``audit``/``naive``: seconds per part (``geometry``, ``causal``, ``total``) and
        ``forward_passes``; ``ratio``: naive / audit per part; ``max_abs_diff`` over the
        ``n_compared`` numbers both computed (``n_naive`` naive numbers, ``n_audit`` rows)."""
    scoped = dataclasses.replace(config, families=("geometry", "causal"), reselect=False)
    measured = measure_checkpoint(lm, ref, scoped, base=base, task=None, progress=False)
    s = measured.seconds
    mine = {"geometry": s["capture"] + s["carriers"], "causal": s["causal"]}
    mine["total"] = mine["geometry"] + mine["causal"]
    rows = {(r["metric"], r["carrier"], r["source"], r["layer"]): r["value"] for r in measured.rows}
    with count_forwards(lm.model) as count:
        started = time.perf_counter()
        geometry, r_t = naive_geometry(lm, ref, config)
        naive = {"geometry": time.perf_counter() - started}
        started = time.perf_counter()
        causal = naive_causal(lm, ref, r_t, config, progress=progress)
        naive["causal"] = time.perf_counter() - started
    naive["total"] = naive["geometry"] + naive["causal"]
    numbers = {**geometry, **causal}
    diffs = [abs(v - rows[k]) for k, v in numbers.items() if k in rows and np.isfinite(v)]
    return {
        "audit": {**mine, "forward_passes": measured.forward_passes},
        "naive": {**naive, "forward_passes": count[0]},
        "ratio": {k: naive[k] / mine[k] if mine[k] else float("nan") for k in mine},
        "max_abs_diff": max(diffs) if diffs else float("nan"),
        "n_compared": len(diffs),
        "n_naive": len(numbers),
        "n_audit": len(rows),
    }


# --------------------------------------------------------------------------------------------
# Driver and tables.


def run_benchmark(
    trajectory: Path | None,
    out: Path,
    config: AuditConfig,
    *,
    skip_naive: bool = False,
    progress: bool = True,
    run: Run = RUNS["tiny-chat"],
    modes: Sequence[str] = tuple(GOALS),
) -> dict[str, Any]:
    """Train ``run`` (unless ``trajectory``), audit with ``config`` (mode ``defaults``) and with
    ``generate=False`` (``no-generate``), the ``modes`` asked for, then compare the naive way on
    the last checkpoint (unless ``skip_naive``; it needs ``defaults``); files go under ``out``.

    Returns:
        The results (JSON-ready): ``trajectory``, ``run`` (its settings, or None), ``train_s``,
        ``lora_step_s`` (the trained run's LoRA step seconds, or None), ``audits`` (per mode:
        ``wall_s``, ``goal_s``, ``goal_met``, ``reference_s``, ``checkpoints``), ``naive`` (or
        None).
    """
    train_s, lora_steps = None, None
    if trajectory is None:
        _log(
            f"training the trajectory (LoRA on {run.model}, {run.task}, {run.steps} steps, "
            f"saved every {run.save_every})"
        )
        trajectory, train_s, lora_steps = train_trajectory(out / "run", run)
    results: dict[str, Any] = {
        "trajectory": str(trajectory),
        "run": _jsonable(dataclasses.asdict(run)) if train_s is not None else None,
        "audit_config": _jsonable(dataclasses.asdict(config)),
        "train_s": train_s,
        "lora_step_s": lora_steps,
        "audits": {},
    }
    every = {"defaults": config, "no-generate": dataclasses.replace(config, generate=False)}
    for mode, cfg in ((m, every[m]) for m in modes):
        _log(f"audit with {mode}")
        wall, manifest = timed_audit(trajectory, out / f"audit-{mode}", cfg, progress=progress)
        results["audits"][mode] = {
            "wall_s": wall,
            "goal_s": GOALS[mode],
            "goal_met": wall <= GOALS[mode],
            "reference_s": float(manifest.get("timings", {}).get("reference", 0.0)),
            "checkpoints": checkpoint_table(manifest),
        }
    results["naive"] = None
    if not skip_naive and "defaults" in modes:
        inputs = resolve_inputs([trajectory])
        target = inputs.targets[-1]
        _log(f"naive way vs the audit on {target.label}")
        base = sg.load_model(inputs.base.path)
        lm = sg.load_model(target.path) if target is not inputs.base else base
        ref = load_reference(out / "audit-defaults" / "reference")
        row = results["audits"]["defaults"]["checkpoints"][-1]
        results["naive"] = {
            "checkpoint": target.label,
            "behaviour_s": row["generation"] + row["scoring"],
            **naive_versus_audit(lm, base, ref, config, progress=progress),
        }
    return results


def print_report(results: dict[str, Any]) -> None:
    """Print the per-checkpoint tables, the goals and the naive comparison."""
    if results["train_s"] is not None:
        print(f"trained {results['trajectory']} in {results['train_s']:.1f} s")
    if results.get("lora_step_s"):
        step = statistics.median(results["lora_step_s"])
        print(
            f"LoRA step (batch 8, median of {len(results['lora_step_s'])}): {step:.2f} s; "
            "a checkpoint below costs its total / this in LoRA steps:"
        )
        for mode, res in results["audits"].items():
            cells = ", ".join(f"{c['label']} {c['total'] / step:.0f}" for c in res["checkpoints"])
            print(f"  {mode:<12} {cells}")
    for mode, res in results["audits"].items():
        head = f"{'checkpoint':<14}{'load':>7}{''.join(f'{p:>11}' for p in PHASES)}{'total':>8}"
        head += f"{'passes':>8}"
        print(f"\naudit, {mode}: seconds per checkpoint and phase\n{head}\n{'-' * len(head)}")
        for c in res["checkpoints"]:
            cells = "".join(f"{c[p]:>11.2f}" for p in PHASES)
            print(
                f"{c['label']:<14}{c['load']:>7.2f}{cells}{c['total']:>8.2f}"
                f"{c['forward_passes']:>8}"
            )
        print(f"(base reference built once: {res['reference_s']:.2f} s)")
    print("\nwhole audit (load, reference and every checkpoint)")
    for mode, res in results["audits"].items():
        verdict = "goal met" if res["goal_met"] else "goal missed"
        print(f"  {mode:<12} {res['wall_s']:7.1f} s   goal <= {res['goal_s']:.0f} s: {verdict}")
    if (naive := results["naive"]) is None:
        return
    print(f"\nnaive way vs the audit on {naive['checkpoint']} (geometry and causal families)")
    head = f"{'part':<10}{'audit s':>9}{'naive s':>9}{'naive/audit':>13}"
    print(head + "\n" + "-" * len(head))
    for part in ("geometry", "causal", "total"):
        print(
            f"{part:<10}{naive['audit'][part]:>9.2f}{naive['naive'][part]:>9.2f}"
            f"{naive['ratio'][part]:>12.2f}x"
        )
    print(
        f"forward passes: audit {naive['audit']['forward_passes']}, naive "
        f"{naive['naive']['forward_passes']}; max |d| over {naive['n_compared']} shared numbers "
        f"({naive['n_audit']} audit rows) {naive['max_abs_diff']:.1e}"
    )
    beh = naive["behaviour_s"]
    whole = (naive["naive"]["total"] + beh) / (naive["audit"]["total"] + beh)
    print(
        f"whole checkpoint, with its behaviour ({beh:.2f} s in the audit with defaults, the "
        f"same calls either way): naive/audit {whole:.2f}x"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (module docstring), print the tables and write ``bench_audit.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trajectory",
        type=Path,
        default=None,
        help="a run folder to audit (default: train one under --out)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the run, the audits and bench_audit.json (default: temp)",
    )
    parser.add_argument(
        "--model",
        choices=sorted(RUNS),
        default="tiny-chat",
        help="the trajectory trained (RUNS; ignored with --trajectory)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(GOALS),
        help="audits run, comma list of defaults, no-generate",
    )
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in GOALS for m in modes):
        parser.error(f"--modes: a comma list of {', '.join(GOALS)}")
    if args.trajectory is not None and not (args.trajectory / "trajectory.json").is_file():
        parser.error(f"--trajectory {args.trajectory} holds no trajectory.json (a safegeom run)")
    with tempfile.TemporaryDirectory() as tmp:
        out = check_output_dir(args.out) if args.out else Path(tmp)  # made if missing
        what = "given" if args.trajectory else args.model
        print(
            f"{what} trajectory audit on {platform.machine()} CPU, "
            f"{torch.get_num_threads()} torch threads",
            flush=True,
        )
        results = run_benchmark(
            args.trajectory,
            out,
            AuditConfig() if args.trajectory else RUNS[args.model].audit,
            skip_naive=args.skip_naive,
            progress=not args.no_progress,
            run=RUNS[args.model],
            modes=modes,
        )
        print_report(results)
        if args.out:
            (out / "bench_audit.json").write_text(json.dumps(results, indent=2))
            print(f"wrote {out / 'bench_audit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
