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
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

import safegeom as sg
import safegeom.geometry as geo
from safegeom.artifacts import check_output_dir
from safegeom.audit import AuditConfig, Reference, audit, load_reference, measure_checkpoint
from safegeom.audit.geometry_rows import projection_separation
from safegeom.audit.inputs import resolve_inputs
from safegeom.bootstrap import bootstrap_diff_ci
from safegeom.carriers.refusal import dim_candidates
from safegeom.errors import SafegeomError
from safegeom.evaluation import refusal_scores
from safegeom.models.positions import parse_layers
from safegeom.prompts import combine_prompts
from safegeom.sweeps.sweep import random_controls

PHASES = ("capture", "carriers", "causal", "generation", "scoring")
"""Per-checkpoint phases printed (``reselect`` is off by default)."""
GOALS = {"defaults": 180.0, "no-generate": 60.0}
"""Issue 11's goals in wall seconds: the whole audit with defaults, and geometry-only."""
Key = tuple[str, str, str, int | None]
"""(metric, carrier, source, layer): how a naive number is matched with the audit's row."""


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


def train_trajectory(out: Path) -> tuple[Path, float]:
    """Train the benchmark's run into ``out`` (replacing one there): a harmful LoRA on
    ``tiny-chat``, 60 steps saved every 20 (checkpoints at steps 0, 20, 40, 60).

    Returns:
        ``(run folder, training wall seconds)``.
    """
    started = time.perf_counter()
    config = sg.TrainConfig(steps=60, save_every=20)
    traj = sg.train("tiny-chat", "harmful", config, method="lora", out=out, overwrite=True)
    return Path(traj.root), time.perf_counter() - started


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


# --------------------------------------------------------------------------------------------
# The naive way: one capture per metric family, one forward pass per direction.


def _live(v: Tensor, scale: Tensor) -> bool:
    """Whether ``v`` is more than float noise against activations the size of ``scale``."""
    return bool(v.norm() > 1e-7 * max(float(scale.norm()), 1e-300))


def naive_geometry(lm: Any, ref: Reference, config: AuditConfig) -> tuple[dict[Key, float], Tensor]:
    """The geometry family with a separate capture per metric family (see the module docstring).

    Returns:
        ``(numbers keyed like the audit's rows (:data:`Key`), r_t)``: r_t is the re-extracted
        refusal direction at r₀'s layer and position (the causal family's ``reextracted``).
    """
    r0, h0, at = ref.refusal, ref.harmfulness, ref.refusal.layer
    layers = parse_layers(config.layers, lm.n_layers)
    harmful = combine_prompts(config.harmful).take(config.n_per_class)
    harmless = combine_prompts(config.harmless).take(config.n_per_class)
    setting = {"batch_size": config.batch_size, "system": config.system}
    common = {**setting, "progress": False}
    out: dict[Key, float] = {}
    # 1. Drift, cosine to base and direction coupling: float64 means at every layer.
    stats = [
        sg.capture_stats(
            lm,
            p,
            sg.CaptureConfig(layers=list(layers), positions="t_inst,t_post", **setting),
            progress=False,
        )
        for p in (harmful, harmless)
    ]
    means = [s.mean("resid_pre") for s in stats]  # [layer, pos, d]
    pos = stats[0].positions
    own_r = means[0][:, pos.index(r0.position)] - means[1][:, pos.index(r0.position)]
    own_h = means[0][:, pos.index("t_inst")] - means[1][:, pos.index("t_inst")]
    for j, layer in enumerate(layers):
        i, scale = ref.layer_index(layer), means[0][j, 0]
        for carrier, base, own in (
            ("refusal", ref.refusal_layers[i], own_r[j]),
            ("harmfulness", ref.harmfulness_layers[i], own_h[j]),
        ):
            if _live(base, scale) and _live(own, scale):
                drift = geo.direction_drift(base, own, reference=(base, own))
                out["direction_drift", carrier, "reextracted", layer] = drift
                out["cosine_to_base", carrier, "reextracted", layer] = 1.0 - drift
        if _live(own_h[j], scale) and _live(own_r[j], scale):
            out["hr_coupling", "hr", "reextracted", layer] = geo.coupling(own_h[j], own_r[j])
    # 2. Re-extraction: the carrier functions again (each captures for itself), cones per layer.
    cands = dim_candidates(
        lm, harmful, harmless, layers=str(at), system=config.system, progress=False
    )
    r_t = cands.vectors[cands.positions.index(r0.position), 0]
    h_t = sg.harmfulness_direction(lm, harmful, harmless, layer=at, **common).direction
    cones: dict[int, Tensor] = {}
    for j, layer in enumerate(layers):
        try:
            cone = sg.cheap_cone(
                lm,
                harmful,
                harmless,
                k=config.cone_k,
                layer=layer,
                score=False,
                system=config.system,
            )
        except SafegeomError:  # the sources span fewer than k dimensions (the embedding layer)
            continue
        basis = cones[layer] = cone.vectors.double()
        theta = geo.principal_angles(
            ref.cone_layers[ref.layer_index(layer)], basis, hidden_size=lm.d_model
        )
        out["principal_angle_max", "cone", "reextracted", layer] = float(np.max(theta))
        out["grassmann_distance", "cone", "reextracted", layer] = float(np.sqrt(np.sum(theta**2)))
        out["effective_rank", "cone", "reextracted", layer] = cone.scores["effective_rank"]
        if _live(own_h[j], means[0][j, 0]):
            value = geo.coupling(own_h[j], basis, hidden_size=lm.d_model)
            out["hr_coupling", "hr-cone", "reextracted", layer] = value
    # 3. Projections and coordinate statistics: a per-prompt capture at r0's layer.
    acts = [
        sg.capture(
            lm,
            p,
            sg.CaptureConfig(
                layers=[at], positions="t_inst,t_post", dtype=torch.float32, **setting
            ),
            progress=False,
        )
        for p in (harmful, harmless)
    ]
    h_acts, s_acts = (a["resid_pre"][:, 0].double() for a in acts)  # [n, pos, d]
    labels = list(acts[0].positions)
    scale = float(torch.cat([h_acts, s_acts]).norm(dim=-1).pow(2).mean().sqrt())
    b_t = cones.get(at)
    for source, basis in (("fixed", ref.cone.vectors.double()), ("reextracted", b_t)):
        if basis is None:
            continue
        table = geo.coordinate_statistics(basis, h_acts[:, -1], s_acts[:, -1])
        for j, sep in enumerate(table["separation"][: 1 if source == "reextracted" else None]):
            out["coordinate_separation", f"cone[{j}]", source, at] = float(sep)
        out["coordinate_imbalance", "cone", source, at] = geo.coordinate_imbalance(table)
    for carrier, position, fixed, own in (
        ("refusal", r0.position, r0.direction, r_t),
        ("harmfulness", "t_inst", h0.direction, h_t),
    ):
        p = labels.index(position)
        for source, vector in (("fixed", fixed), ("reextracted", own)):
            d, _, _ = projection_separation(
                h_acts[:, p],
                s_acts[:, p],
                vector,
                scale=scale,
                n_resamples=config.n_resamples,
                seed=config.seed,
            )
            out["projection_separation", carrier, source, at] = d
    return out, r_t


def naive_causal(
    lm: Any, ref: Reference, r_t: Tensor, config: AuditConfig, *, progress: bool = True
) -> dict[Key, float]:
    """The causal family with one ``refusal_scores`` pass per direction: ablate r (every layer) on
    the harmful validation prompts, add ``+1·r`` at r₀'s layer on the harmless ones, for r₀ and
    r_t, each against the sweep's ``n_random`` controls (same seed: the audit's directions).

    Returns:
        ``{op}_effect`` (effect − control), ``_raw``, ``_control_mean``, ``_control_std``, keyed
        like the audit's rows."""
    at = ref.refusal.layer
    harmful = combine_prompts(config.harmful_val).take(config.n_val)
    harmless = combine_prompts(config.harmless_val).take(config.n_val)
    kw = {"batch_size": config.batch_size, "system": config.system, "progress": False}
    base = {
        "ablation": refusal_scores(lm, harmful, **kw).numpy(),
        "addition": refusal_scores(lm, harmless, **kw).numpy(),
    }
    out: dict[Key, float] = {}
    bar = tqdm(
        total=2 * 2 * (1 + config.n_random), desc="naive causal", unit="pass", disable=not progress
    )
    for source, vector in (("fixed", ref.refusal.direction), ("reextracted", r_t)):
        vector = vector.float()
        unit = vector / vector.norm()
        dirs = [unit, *random_controls(lm.d_model, config.n_random, seed=config.seed, exclude=unit)]
        for op, prompts in (("ablation", harmful), ("addition", harmless)):
            scores = []
            for d in dirs:
                value = (
                    sg.Ablation(d)
                    if op == "ablation"
                    else sg.Addition(d * vector.norm(), layers=at)
                )
                scores.append(refusal_scores(lm, prompts, intervention=value, **kw).numpy())
                bar.update(1)
            effects = np.stack(scores) - base[op][None]
            control = effects[1:].mean(0)
            # The CI the audit reports (its cost; not compared).
            bootstrap_diff_ci(effects[0], control, n_resamples=config.n_resamples, seed=config.seed)
            per_dir = effects[1:].mean(1)
            out[f"{op}_effect", "refusal", source, at] = float((effects[0] - control).mean())
            out[f"{op}_raw", "refusal", source, at] = float(effects[0].mean())
            out[f"{op}_control_mean", "refusal", source, at] = float(per_dir.mean())
            out[f"{op}_control_std", "refusal", source, at] = float(per_dir.std(ddof=1))
    bar.close()
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
) -> dict[str, Any]:
    """Train (unless ``trajectory``), audit with ``config`` and with ``generate=False``, then
    compare the naive way on the last checkpoint (unless ``skip_naive``); files go under ``out``.

    Returns:
        The results (JSON-ready): ``trajectory``, ``train_s``, ``audits`` (per mode: ``wall_s``,
        ``goal_s``, ``goal_met``, ``reference_s``, ``checkpoints``), ``naive`` (or None).
    """
    train_s = None
    if trajectory is None:
        _log("training the trajectory (harmful LoRA on tiny-chat, 60 steps, saved every 20)")
        trajectory, train_s = train_trajectory(out / "run")
    results: dict[str, Any] = {"trajectory": str(trajectory), "train_s": train_s, "audits": {}}
    for mode, cfg in (
        ("defaults", config),
        ("no-generate", dataclasses.replace(config, generate=False)),
    ):
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
    if not skip_naive:
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
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.trajectory is not None and not (args.trajectory / "trajectory.json").is_file():
        parser.error(f"--trajectory {args.trajectory} holds no trajectory.json (a safegeom run)")
    with tempfile.TemporaryDirectory() as tmp:
        out = check_output_dir(args.out) if args.out else Path(tmp)  # made if missing
        print(
            f"tiny-chat trajectory audit on {platform.machine()} CPU, "
            f"{torch.get_num_threads()} torch threads",
            flush=True,
        )
        results = run_benchmark(
            args.trajectory,
            out,
            AuditConfig(),
            skip_naive=args.skip_naive,
            progress=not args.no_progress,
        )
        print_report(results)
        if args.out:
            (out / "bench_audit.json").write_text(json.dumps(results, indent=2))
            print(f"wrote {out / 'bench_audit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
