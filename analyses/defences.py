"""The defence study (issue 12, part 2) on ``tiny-chat``: ASR, over-refusal, task accuracy and KL
to the base of six fine-tuning methods on four tasks, the λ_geom ablation, and audits.

Protocol (fixed here, the same for every method):

- Tasks: ``harmful`` (the attack), ``mix`` (harmful : benign = 1 : 4, benign = ``sentiment``),
  ``sentiment`` alone, and ``arith``.
- Methods: ``lora``, ``sft`` (all weights), ``rg-lora`` (RefusalGuard, LoRA variant, the library
  defaults: λ_geom 0.3, penalty every 2 steps, harmful-only calibration), ``rg-reft``
  (RefusalGuard, the representation-edit variant), ``adaptive`` (probe critic), ``kl`` (constant
  KL, weight 1).
- Training: 200 steps, checkpoints every 50 (0, 50, 100, 150, 200), batch 8, cosine schedule
  (library default), seeds 0, 1, 2.
- Learning-rate rule: on ``mix``, seed 0, each method's grid (adapters — lora, rg-lora,
  adaptive, kl — {1e-3, 2e-3, 5e-3}; rg-reft {5e-3, 1e-2, 2e-2}; sft {1e-5, 3e-5, 1e-4}); the lr
  with the best held-out task accuracy at step 200 wins, ties to the larger lr
  (:func:`analyses.defences_stats.pick_lr`); it is used for every task and seed of the method.
- λ_geom ablation: rg-lora on ``mix`` at its chosen lr, λ ∈ {0, 0.1, 0.3, 1, 3}, every seed.
- Evaluation (:mod:`analyses.defences_eval`): the last checkpoint of every run, and every
  checkpoint of the seed-0 runs. Step 0 of every run is the base (LoRA B and the edit start at
  zero), measured once. CIs: across prompts and seeds, a two-level bootstrap
  (:func:`analyses.defences_stats.seed_prompt_ci`).
- Audit: ``safegeom audit`` (defaults, the run's own task) over every seed-0 trajectory of the
  main grid; its numbers at the carrier layer feed the overlays (``figures/fig7_defences.py``).
- Not in the study: Safe LoRA and LoX need an honest unaligned base, and tiny-chat has none (its
  recipe trains the aligned behaviour from scratch).

Measured (``analyses/results/defences.md``; 2 one-thread workers under load, about 50 min in
all: training 20-35 s a run, 5-7 s per checkpoint evaluation, 30-100 s per audit). Chosen lrs:
lora, rg-lora, adaptive, kl 5e-3; rg-reft 2e-2; sft 1e-4. On ``mix`` (3 seeds; base ASR 0.088):
LoRA ASR 0.997, accuracy 0.998; rg-lora 0.069 / 0.998 (over-refusal 0.296 vs the base's 0.160);
rg-reft 0.108 / 0.508; adaptive 0.108 / 0.957; kl 0.520 / 0.973; sft 0.998 / 0.973. λ_geom 0,
0.1, 0.3, 1, 3: ASR 0.997, 0.149, 0.069, 0.052, 0.049 at accuracy 0.998-0.958. On ``sentiment``
(seed 0) rg-lora's refusal moves +6.4 points (it refuses more), rg-reft's −2.0, LoRA's −91.2
(LoRA answers every prompt with a label, as ``analyses/benign_task.py`` found). ``arith`` is not
learnt by any method in 200 steps (held-out accuracy ≤ 0.04). Audit at the last step, carrier
layer 1, mix: cosine of the re-extracted r to r₀ 0.610 (lora), 0.984 (rg-lora), 0.917 (rg-reft),
0.895 (adaptive); fixed-source ablation effect of r₀ +0.86 nats (lora: r₀ no longer carries
refusal; base −6.70), −3.50, −5.94, −4.42.

``--model smol-chat`` (issue 22, item 4; :data:`analyses.defences_settings.PRESETS`) runs the
same protocol on the real model, cut to CPU scale and fixed before the run: every run trains from
smol-chat's adapter merged into SmolLM2-135M-Instruct (:func:`analyses.study_base.base_model`),
seed 0, 50 steps, checkpoints at 25 and 50, one lr per method (adapters 2e-3, rg-reft 1e-2, sft
2e-5; no grid), methods lora, sft, rg-lora, rg-reft, adaptive, kl and now ``safe-lora`` and
``lox`` with SmolLM2-135M-Instruct as the unaligned base (LoX's step 0, the extrapolated base, is
evaluated too); tasks ``mix`` and ``sentiment`` with every method (sentiment's sft, rg-reft,
adaptive and kl runs were added after the first run, from the same cache), ``harmful``
with LoRA alone (the erosion targets, :func:`analyses.defences_report.erosion_targets`); held-out
samples of 40 prompts per harmful set (100), 50 Alpaca, all 50 XSTest-safe, the first 100 task
problems; LoRA evaluated at every checkpoint, the others at the last. The preset's audits
(geometry and causal families, 32 prompts per class, 8 validation) ran on every ``mix`` run, about
20 min each on one thread (results written with ``--audit-methods
lora,sft,rg-lora,rg-reft,adaptive,kl,safe-lora,lox --audit-tasks mix``).
Results:
``analyses/results/defences_smol-chat.{json,md}``, figures
``figures/fig7_defences_smol-chat_<task>.png`` (``--methods lora,rg-lora,adaptive,safe-lora,lox``).
Measured: see the README section "The defence study on smol-chat".

Everything is cached under ``--work`` (one folder per run: the trajectory, ``eval/step-N``,
``audit``), read back through the library (:func:`load_trajectory`, :func:`load_audit`), so a
rerun resumes. Runs go to ``--jobs`` worker processes (one torch thread each).

Usage::

    OMP_NUM_THREADS=1 nice python analyses/defences.py [--model tiny-chat|smol-chat] [--work DIR]
        [--jobs 2] [--seeds 0,1,2]
        [--methods lora,...] [--tasks mix,...] [--no-audit] [--quick]
        [--json analyses/results/defences[_MODEL].json] [--md analyses/results/defences[_MODEL].md]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses.defences_report import build_results, write_outputs
from analyses.defences_settings import (
    DEFAULT_LAMBDA,
    PRESETS,
    RunSpec,
    Settings,
    spec,
    train_kwargs,
)
from analyses.study_base import base_model

__all__ = ["PRESETS", "audit_job", "base_job", "run_job"]

_BASE: dict[str, Any] = {}


def _init_worker() -> None:
    """Give a worker process one torch thread."""
    import torch

    torch.set_num_threads(1)


def _base(spec_: str) -> Any:
    """The base model (a spec :func:`analyses.study_base.base_model` gave), loaded once per
    process."""
    if spec_ not in _BASE:
        from safegeom.models import load_model

        _BASE[spec_] = load_model(spec_)
    return _BASE[spec_]


def run_job(job: tuple[RunSpec, Settings, Path, str]) -> tuple[str, dict[int, dict[str, Any]]]:
    """Train ``run`` (or read it back) and evaluate its checkpoints.

    Args:
        job: ``(run, settings, work dir, which)``; ``which`` is ``last`` (the last checkpoint) or
            ``all`` (every checkpoint after step 0).

    Returns:
        ``(run name, {step: analyses.defences_eval.evaluate_checkpoint output})``.
    """
    from analyses.defences_eval import evaluate_checkpoint
    from safegeom.errors import SafegeomError
    from safegeom.training import TrainConfig, get_task, load_trajectory, train

    run, settings, work, which = job
    folder = work / "runs" / run.name
    task = get_task(run.task)
    model = base_model(settings.model, work)
    try:
        traj = load_trajectory(folder)
        done = traj.steps and traj.steps[-1] >= settings.steps
    except SafegeomError:
        done = False
    if not done:
        traj = train(
            model,
            task,
            TrainConfig(
                steps=settings.steps,
                save_every=settings.save_every,
                lr=run.lr,
                seed=run.seed,
                batch_size=settings.batch_size,
                progress=False,
            ),
            out=folder,
            resume=folder.exists(),  # --resume refuses a folder that is not there
            **train_kwargs(run, settings),
        )
    first, *pairs = list(zip(traj.steps, traj.paths, strict=True))
    every = settings.every_checkpoint
    if which == "last" or (every is not None and run.method not in every):
        pairs = pairs[-1:]
    if run.method == "lox":  # step 0 is the base, measured once, except LoX's: it is extrapolated
        pairs = [first, *pairs]
    out = {}
    for step, path in pairs:
        eval_folder = folder / "eval" / f"step-{step}"
        out[step] = evaluate_checkpoint(path, task, _base(model), eval_folder, settings.sizes)
    return run.name, out


def audit_job(job: tuple[RunSpec, Path, dict[str, Any]]) -> str:
    """Audit a run's trajectory into its ``audit`` folder (``AuditConfig(**fields)``), unless
    done; its name."""
    from safegeom.audit import AuditConfig, audit, load_audit
    from safegeom.errors import SafegeomError

    run, work, fields = job
    folder = work / "runs" / run.name
    try:
        load_audit(folder / "audit")
    except SafegeomError:
        audit(folder, folder / "audit", AuditConfig(**fields), progress=False)
    return run.name


def _pool_map(fn: Any, jobs: list[Any], n_jobs: int, what: str) -> list[Any]:
    """``fn`` over ``jobs`` on ``n_jobs`` spawned one-thread workers, with a progress bar."""
    if not jobs:
        return []
    if n_jobs <= 1:
        _init_worker()
        return [fn(j) for j in tqdm(jobs, desc=what)]
    with mp.get_context("spawn").Pool(n_jobs, initializer=_init_worker) as pool:
        return list(tqdm(pool.imap_unordered(fn, jobs), total=len(jobs), desc=what))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-chat", choices=sorted(PRESETS))
    parser.add_argument(
        "--work", type=Path, default=None, help="default /tmp/safegeom-defences[-MODEL]"
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--seeds", default=None, help="the preset's seeds")
    parser.add_argument("--methods", default=None, help="the preset's methods")
    parser.add_argument("--tasks", default=None, help="the preset's tasks")
    parser.add_argument("--lambda-seeds", default=None, help="seeds of the λ ablation (--seeds)")
    parser.add_argument("--no-audit", action="store_true", help="skip the audits")
    parser.add_argument("--audit-tasks", default=None, help="tasks audited first (seed 0)")
    parser.add_argument(
        "--audit-methods",
        default=None,
        help="audit only these methods' runs on the --audit-tasks (seed 0; default: every run)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 20 steps, save every 10, seed 0, lora and rg-lora on mix, "
        "the middle lr of the grid, λ 0 and 0.3, no audit",
    )
    parser.add_argument("--json", type=Path, default=None, help="results JSON (per model)")
    parser.add_argument("--md", type=Path, default=None, help="results markdown (per model)")
    return parser.parse_args()


def output_paths(model: str) -> tuple[Path, Path, Path]:
    """``(work folder, results JSON, results markdown)`` of a model's study by default:
    tiny-chat's keep their issue-12 names, another model's carry its name."""
    if model == "tiny-chat":
        stem, work = "defences", Path("/tmp/safegeom-defences")
    else:
        stem, work = f"defences_{model}", Path(f"/tmp/safegeom-defences-{model}")
    results = Path("analyses/results")
    return work, results / f"{stem}.json", results / f"{stem}.md"


def _csv(value: str | None, default: tuple[Any, ...], kind: type = str) -> list[Any]:
    return list(default) if value is None else [kind(v) for v in value.split(",")]


def main() -> None:
    """Run the phases (lr grid, main grid, λ ablation, audits) and write the results."""
    args = _parse()
    preset = PRESETS[args.model]
    work, json_path, md_path = output_paths(args.model)
    work, json_path, md_path = args.work or work, args.json or json_path, args.md or md_path
    settings: Settings = preset.settings
    seeds = _csv(args.seeds, preset.seeds, int)
    methods, tasks = _csv(args.methods, preset.methods), _csv(args.tasks, preset.tasks)
    lambdas, grids = preset.lambdas, dict(preset.grids)
    audit_first = _csv(args.audit_tasks, preset.audit_tasks)
    if args.quick:
        settings = replace(settings, steps=20, save_every=10)
        seeds, methods, tasks = [0], ["lora", "rg-lora"], ["mix"]
        lambdas, args.no_audit = (0.0, DEFAULT_LAMBDA) if lambdas else (), True
        grids = {m: g[len(g) // 2 : len(g) // 2 + 1] for m, g in grids.items()}  # the middle
    lam_seeds = _csv(args.lambda_seeds, tuple(seeds), int)
    evals: dict[str, dict[int, dict[str, Any]]] = {}
    base_eval = dict(_pool_map(base_job, [(t, work, settings) for t in tasks], args.jobs, "base"))
    grid_jobs = [
        (spec(m, "mix", 0, lr), settings, work, "last") for m in methods for lr in grids[m]
    ]
    evals.update(_pool_map(run_job, grid_jobs, args.jobs, "lr grid (mix, seed 0)"))
    from analyses.defences_stats import pick_lr

    chosen = {}
    for m in methods:
        accs = {
            lr: evals[spec(m, "mix", 0, lr).name][settings.steps]["rates"]["task_accuracy"]
            for lr in grids[m]
        }
        chosen[m] = pick_lr(accs) if len(accs) > 1 else next(iter(accs))
    print("chosen lr:", chosen, flush=True)
    main_runs = [
        spec(m, t, s, chosen[m])
        for t in tasks
        for m in methods
        if m in preset.task_methods.get(t, methods)
        for s in seeds
    ]
    lam_runs = []
    if "rg-lora" in methods and "mix" in tasks:
        lam_runs = [
            spec("rg-lora", "mix", s, chosen["rg-lora"], lam) for s in lam_seeds for lam in lambdas
        ]
    audited = [] if args.no_audit else [r for r in main_runs if r.seed == 0]
    if args.audit_methods is not None:
        keep = _csv(args.audit_methods, ())
        audited = [r for r in audited if r.method in keep and r.task in audit_first]
    audited.sort(key=lambda r: r.task not in audit_first)
    first = [r for r in audited if r.task in audit_first]
    context = {
        "settings": settings,
        "seeds": seeds,
        "lam_seeds": lam_seeds,
        "methods": methods,
        "tasks": tasks,
        "grids": grids,
        "chosen": chosen,
        "lambdas": lambdas,
        "evals": evals,
        "base_eval": base_eval,
        "main_runs": main_runs,
        "lam_runs": lam_runs,
        "audited": audited,
        "work": work,
    }
    others = {
        r.name: r
        for r in sorted(main_runs + lam_runs, key=lambda r: r.seed)
        if r.seed != 0 or r.lam not in (None, DEFAULT_LAMBDA)
    }
    fields = dict(preset.audit)
    phases = (
        ("seed-0 runs", run_job, [(r, settings, work, "all") for r in main_runs if r.seed == 0]),
        ("audits", audit_job, [(r, work, fields) for r in first]),
        ("other runs", run_job, [(r, settings, work, "last") for r in others.values()]),
        ("more audits", audit_job, [(r, work, fields) for r in audited if r not in first]),
    )
    for what, fn, jobs in phases:
        done = _pool_map(fn, jobs, args.jobs, what)
        if fn is run_job:
            evals.update(done)
        write_outputs(build_results(**context), json_path, md_path)
        print(f"{what}: wrote {json_path} and {md_path}", flush=True)


def base_job(job: tuple[str, Path, Settings]) -> tuple[str, dict[str, Any]]:
    """The base model's numbers on a task (cached under ``work/base-eval/TASK``; tiny-chat's
    under ``work/base/TASK``, as issue 12 wrote them): ``(task, numbers)``."""
    from analyses.defences_eval import evaluate_checkpoint
    from safegeom.training import get_task

    task, work, settings = job
    model = base_model(settings.model, work)
    folder = work / ("base" if settings.model == "tiny-chat" else "base-eval") / task
    return task, evaluate_checkpoint(model, get_task(task), _base(model), folder, settings.sizes)


if __name__ == "__main__":
    main()
