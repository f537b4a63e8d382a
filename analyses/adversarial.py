"""The SFT-vs-R2D2 study (issue 24, item 3) on ``tiny-chat`` (or ``--model smol-chat``): matched
SFT and R2D2 trajectories from the same base and data budget, audited with fixed-source attack
sets made on the base, and Lan et al.'s qualitative findings judged claim by claim
(:mod:`analyses.adversarial_claims`).

Protocol (fixed here; the sizes in :mod:`analyses.adversarial_settings`: tiny-chat's are
:class:`Settings`' defaults, smol-chat's :data:`~analyses.adversarial_settings.SMOL`, one seed by
default, trained from its adapter merged into its base, :func:`base_model`):

- Attack sets, made once on the base (``safegeom.attacks``), on the first ``n_attack`` HarmBench
  *validation* behaviours (``harmbench:val``; R2D2 trains on ``harmbench-train``, and the SFT run
  on the same training behaviours, so neither sees them): GCG (``gcg_tokens``-token suffix,
  ``gcg_steps`` steps of ``gcg_width`` candidates, early stop), the AutoDAN-style genetic search
  and prefilling, each judged by the substring judge on ``attack_tokens`` tokens.
- Utility data: the first ``n_utility`` ``alpaca:train`` instructions answered by the base itself
  (greedy, ``answer_tokens`` tokens, as R2D2's default utility answers are made), written once as
  ``WORK/utility.jsonl``; both recipes read that file.
- R2D2: ``safegeom train r2d2`` (LoRA, :class:`~safegeom.training.methods.r2d2.R2D2Config`) on
  the first ``n_behaviours`` ``harmbench-train`` behaviours with their refusal ("Sorry, I can't do
  that."), ``attacked`` of them attacked and trained per step by ``r2d2_gcg_steps`` GCG steps of
  ``r2d2_width`` candidates on ``suffix_tokens``-token suffixes, 20% of the pool reset every
  ``reset_every`` steps, utility batch ``batch``, ``--utility-answers task`` on the utility file
  (the base's answers, so both recipes train on the same text).
- SFT: ``safegeom train lora`` on one task holding the same behaviours answered with the same
  refusal (no adversarial suffix) and the same utility examples, batch ``batch + attacked``; the
  behaviours : utility ratio of the task is ``n_behaviours : n_utility`` = ``attacked : batch``,
  so a step sees the same number of each in expectation. This is SFT rather than the R2D2 trainer
  with its attack off, because the trainer always attacks (``gcg_steps`` ≥ 1) and its toward
  loss reads the adversarial prompts: without the pool it would still not be plain SFT. The loss
  weights differ: R2D2's ``0.5 · away + 0.5 · toward + 1 · utility`` against SFT's one
  cross-entropy over every answer token.
- Both: the same steps, lr, cosine schedule, LoRA settings and seeds; a checkpoint every
  ``save_every`` steps.
- Audit (``safegeom.audit.audit``, :class:`AuditConfig` sizes in :class:`Settings`): every
  trajectory, every checkpoint: the clean held-out behaviour sets (AdvBench, JBB, DirectHarm4
  ``:test``; Alpaca ``:test``), XSTest (safe: over-refusal), GSM8K ``:test`` cross-entropy
  (utility), KL to the base, the geometry (H/R coupling, drift) and causal rows, the three attack
  sets replayed (``--attacks``), and as anchors the final checkpoints of the recipe's other seeds
  (``--anchor``; the base is the default anchor).
- Claims: :func:`analyses.adversarial_claims.judge_claims` per seed, at the first checkpoint after
  the base (``E``) and the last (``L``).

Measured (``analyses/results/adversarial.md``; one thread on a shared 2-core machine: 21.6 min
wall, 17.6 min CPU; a second run from scratch gave the same 972 table rows bit for bit). Attack
success on the base: GCG 0.750, AutoDAN-style 1.000, prefilling 1.000. At step 80, over the three
seeds, R2D2: GCG ASR 0.000, AutoDAN 0.000–0.125, prefilling 0.750–0.875; SFT: 0.438–0.750,
0.625–1.000, 0.875–1.000. R2D2's H/R coupling peaks at 0.379, 0.251, 0.250 (steps 30, 10, 20;
the base 0.118), SFT ends at 0.060–0.156. Claims at E = step 10: (a) does not appear on any seed
(XSTest-safe over-refusal falls, 0.083–0.333 at step 80, instead of saturating); (b) does not
appear on seeds 0 and 2, cannot tell on seed 1; (c) cannot tell on every seed (prefilling
overlaps). R2D2's own pool ASR is 0 at every checkpoint.

Everything is cached under ``--work`` (attack sets, runs, audits), read back through the library,
so a rerun resumes. One process, one torch thread.

Usage::

    OMP_NUM_THREADS=1 python analyses/adversarial.py [--model tiny-chat|smol-chat] [--work DIR]
        [--seeds 0,1,2] [--quick] [--json analyses/results/adversarial.json]
        [--md analyses/results/adversarial.md] [--figure figures/adversarial_tiny-chat.png]

(the default paths are tiny-chat's; another model's carry its name, :func:`output_paths`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses.adversarial_settings import QUICK, Settings, default_seeds, study_settings
from analyses.study_base import base_model
from safegeom.artifacts import write_text

__all__ = [
    "ATTACKS",
    "MODEL",
    "QUICK",
    "RECIPES",
    "Settings",
    "attack_sets",
    "audit_config",
    "data_files",
    "output_paths",
    "run_study",
    "train_run",
    "training_log",
]

MODEL = "tiny-chat"
"""The default base of every run (``--model``)."""
RECIPES: tuple[str, ...] = ("sft", "r2d2")
"""The two recipes, in table order."""
ATTACKS: tuple[str, ...] = ("gcg", "autodan", "prefill")
"""The fixed-source attack sets, in table order."""
REFUSAL = "Sorry, I can't do that."
"""The refusal both recipes train toward (every ``harmbench-train`` safe response)."""


TIMINGS = "timings.json"
"""The file under ``--work`` recording each computed item's wall and CPU seconds (kept across
reruns, so the report's times are those of the run that computed each item)."""
PHASES: dict[str, str] = {
    "attack": "attack sets and data",
    "train": "training",
    "audit": "audits",
}
"""Item key prefix → the phase it is summed into."""


@contextmanager
def timed(work: Path, key: str) -> Iterator[None]:
    """Record the body's wall and CPU seconds under ``key`` in ``work/timings.json``, and print
    the wall time."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    path = work / TIMINGS
    spent = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    spent[key] = {"wall": round(wall, 2), "cpu": round(cpu, 2)}
    write_text(path, json.dumps(spent, indent=1))
    print(f"{key}: {wall:.0f} s", flush=True)


def phase_timings(work: Path) -> dict[str, float]:
    """Wall and CPU seconds per phase, and in all, summed over the recorded items.

    Returns:
        ``{"PHASE (wall)": s, "PHASE (CPU)": s, ..., "total (wall)": s, "total (CPU)": s}``.
    """
    path = work / TIMINGS
    spent = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    out: dict[str, float] = {}
    for prefix, phase in PHASES.items():
        items = [v for k, v in spent.items() if k.split(":")[0] == prefix]
        for kind in ("wall", "cpu"):
            out[f"{phase} ({kind})"] = sum(v[kind] for v in items)
    for kind in ("wall", "cpu"):
        out[f"total ({kind})"] = sum(v[kind] for v in spent.values())
    return out


def _behaviours(n: int) -> list[str]:
    """The first ``n`` ``harmbench-train`` behaviours (R2D2's pool, SFT's refused prompts)."""
    from safegeom.prompts import load_prompts

    return list(load_prompts("harmbench-train", n=n).prompts)


def _write_jsonl(path: Path, prompts: list[str], responses: list[str]) -> Path:
    """Write the task file atomically (a rerun trusts any file that exists)."""
    lines = [
        json.dumps({"prompt": p, "response": r}) for p, r in zip(prompts, responses, strict=True)
    ]
    return write_text(path, "\n".join(lines) + "\n")


def data_files(settings: Settings, work: Path, lm: Any) -> tuple[Path, Path]:
    """The utility file (``alpaca:train`` instructions with the base's greedy answers) and the
    SFT task file (the training behaviours with the refusal, then the utility rows), written once.

    Returns:
        ``(utility.jsonl, sft.jsonl)`` under ``work``.
    """
    from safegeom.generation import generate
    from safegeom.prompts import load_prompts

    utility, sft = work / "utility.jsonl", work / "sft.jsonl"
    if not utility.is_file():
        prompts = list(load_prompts("alpaca:train", n=settings.n_utility).prompts)
        answers = generate(lm, prompts, max_new_tokens=settings.answer_tokens, progress=False)
        answers = [a if a.strip() else "." for a in answers]  # a task row needs an answer
        _write_jsonl(utility, prompts, answers)
    if not sft.is_file():
        rows = [json.loads(line) for line in utility.read_text(encoding="utf-8").splitlines()]
        behaviours = _behaviours(settings.n_behaviours)
        _write_jsonl(
            sft,
            behaviours + [r["prompt"] for r in rows],
            [REFUSAL] * len(behaviours) + [r["response"] for r in rows],
        )
    return utility, sft


def attack_sets(settings: Settings, work: Path, lm: Any) -> dict[str, Path]:
    """The three fixed-source attack sets on the base, made once (``work/attacks/NAME``).

    Returns:
        Attack name → its folder; each set's success on the source is printed.
    """
    from safegeom.attacks import AttackOptions, autodan, gcg, load_attack_set, prefill
    from safegeom.attacks.targets import behaviours_and_targets

    behaviours, targets = behaviours_and_targets("harmbench:val", limit=settings.n_attack)
    options = AttackOptions(max_new_tokens=settings.attack_tokens)
    configs = {
        "gcg": (
            gcg,
            gcg.GCGConfig(
                n_tokens=settings.gcg_tokens,
                steps=settings.gcg_steps,
                search_width=settings.gcg_width,
                top_k=settings.gcg_width,
            ),
        ),
        "autodan": (
            autodan,
            autodan.AutoDANConfig(
                population=settings.autodan_population,
                generations=settings.autodan_generations,
            ),
        ),
        "prefill": (prefill, prefill.PrefillConfig()),
    }
    folders = {}
    for name, (module, config) in configs.items():
        folder = work / "attacks" / name
        if not (folder / "attack_set.json").is_file():
            with timed(work, f"attack:{name}"):
                made = module.attack(lm, behaviours.prompts, targets, config, options=options)
                made.save(folder)
        print(f"attack {name}: ASR on the base {load_attack_set(folder).success_rate:.3f}")
        folders[name] = folder
    return folders


def train_run(recipe: str, seed: int, settings: Settings, work: Path, model: str = MODEL) -> Path:
    """Train (or resume, or read back) one recipe's run from ``model`` (a spec, as
    :func:`base_model` gives it); its folder ``work/runs/RECIPE-sSEED``.

    Returns:
        The run folder.
    """
    from safegeom.errors import SafegeomError
    from safegeom.training import TrainConfig, load_trajectory

    folder = work / "runs" / f"{recipe}-s{seed}"
    try:
        traj = load_trajectory(folder)
        if traj.steps and traj.steps[-1] >= settings.steps:
            return folder
    except SafegeomError:
        pass
    config = TrainConfig(
        steps=settings.steps,
        save_every=settings.save_every,
        lr=settings.lr,
        seed=seed,
        batch_size=settings.batch if recipe == "r2d2" else settings.batch + settings.attacked,
        progress=False,
    )
    resume = folder.exists()  # an interrupted run continues
    with timed(work, f"train:{folder.name}"):
        _train(recipe, folder, config, settings, work, resume, model)
    return folder


def _train(
    recipe: str,
    folder: Path,
    config: Any,
    settings: Settings,
    work: Path,
    resume: bool,
    model: str,
) -> None:
    """One recipe's training call (:func:`train_run`'s body)."""
    from safegeom.training import train
    from safegeom.training.methods.r2d2 import R2D2Config

    if recipe == "r2d2":
        r2d2 = R2D2Config(
            n_behaviours=settings.n_behaviours,
            refusal=REFUSAL,
            gcg_steps=settings.r2d2_gcg_steps,
            suffix_tokens=settings.suffix_tokens,
            search_width=settings.r2d2_width,
            top_k=settings.r2d2_width,
            attacked_per_step=settings.attacked,
            reset_every=settings.reset_every,
            utility_answers="task",
        )
        train(
            model,
            str(work / "utility.jsonl"),
            config,
            method="r2d2",
            settings=r2d2,
            out=folder,
            resume=resume,
        )
    else:
        train(model, str(work / "sft.jsonl"), config, method="lora", out=folder, resume=resume)


def final_checkpoint(folder: Path) -> Path:
    """A run's last checkpoint folder."""
    from safegeom.training import load_trajectory

    return Path(load_trajectory(folder).paths[-1])


def training_log(folder: Path, every: int) -> list[dict[str, float]]:
    """A run's manifest log (``step``, ``loss`` and its terms) at the steps ``every``, ``2 ·
    every``, ... and its last step: for R2D2 ``away``, ``toward``, ``utility``, ``attack``
    (nats per target token), ``pool_loss`` (nats per token) and ``pool_asr`` (fraction).

    Returns:
        One dict per kept step.
    """
    from safegeom.training import load_trajectory

    log = load_trajectory(folder).log
    last = log[-1]["step"] if log else 0
    return [dict(e) for e in log if e["step"] % every == 0 or e["step"] == last]


def audit_config(settings: Settings, attacks: dict[str, Path], anchors: dict[str, str]) -> Any:
    """The study's :class:`~safegeom.audit.AuditConfig`: the library's sets and families at the
    study's sizes, the attack sets replayed and the anchors.

    Returns:
        The config.
    """
    from safegeom.audit import AuditConfig

    return AuditConfig(
        n_per_class=settings.n_per_class,
        n_val=settings.n_val,
        n_behaviour=settings.n_behaviour,
        n_resamples=settings.n_resamples,
        max_new_tokens=settings.attack_tokens,
        attacks=tuple(f"{name}={folder}" for name, folder in attacks.items()),
        anchors=anchors,
        interference=False,
    )


def audit_run(folder: Path, config: Any) -> Any:
    """Audit a run's trajectory into ``folder/audit`` (resumed or read back when done).

    Returns:
        The :class:`~safegeom.audit.AuditResult`.
    """
    from safegeom.audit import audit, load_audit
    from safegeom.errors import SafegeomError

    try:
        return load_audit(folder / "audit")
    except SafegeomError:
        with timed(folder.parent.parent, f"audit:{folder.name}"):
            result = audit(folder, folder / "audit", config, progress=False)
        return result


def run_study(
    settings: Settings, seeds: list[int], work: Path, model: str = MODEL
) -> dict[str, Any]:
    """Make the attack sets on ``model`` (``smol-chat``: its adapter merged, :func:`base_model`),
    train and audit every run from it, and read the tables.

    Returns:
        ``{"settings", "seeds", "attacks" (name → success on the base), "rows" (the
        :func:`~analyses.adversarial_claims.study_rows` of every run, concatenated),
        "tables" ((recipe, seed) → its audit table), "pool" (seed → R2D2's manifest terms
        every ``save_every`` steps, :func:`training_log`), "timings" (:func:`phase_timings`),
        "steps", "model"}``.
    """
    import pandas as pd
    import torch

    from analyses.adversarial_claims import study_rows
    from safegeom.attacks import load_attack_set
    from safegeom.models import load_model

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    base = base_model(model, work)
    lm = load_model(base)
    attacks = attack_sets(settings, work, lm)
    if (work / "sft.jsonl").is_file():
        data_files(settings, work, lm)
    else:
        with timed(work, "attack:data"):
            data_files(settings, work, lm)
    folders = {(r, s): train_run(r, s, settings, work, base) for s in seeds for r in RECIPES}
    tables, audits = [], {}
    for (recipe, seed), folder in folders.items():
        anchors = {
            f"{recipe}-s{other}": str(final_checkpoint(folders[recipe, other]))
            for other in seeds
            if other != seed
        }
        result = audit_run(folder, audit_config(settings, attacks, anchors))
        audits[recipe, seed] = result.table
        tables.append(study_rows(result.table, recipe, seed))
    rows = pd.concat(tables, ignore_index=True)
    pool = {seed: training_log(folders["r2d2", seed], settings.save_every) for seed in seeds}
    steps = sorted(int(s) for s in rows["step"].unique())
    return {
        "settings": settings,
        "seeds": seeds,
        "attacks": {n: load_attack_set(f).success_rate for n, f in attacks.items()},
        "rows": rows,
        "tables": audits,
        "pool": pool,
        "timings": phase_timings(work),
        "steps": steps,
        "model": model,
    }


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="tiny-chat (default) or smol-chat")
    parser.add_argument("--work", type=Path, default=Path("/tmp/safegeom-adversarial"))
    parser.add_argument("--seeds", default=None, help="default: 0,1,2 (tiny-chat), 0 (smol-chat)")
    parser.add_argument(
        "--early", type=int, default=None, help="step E (default: the first after the base)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: QUICK sizes")
    parser.add_argument("--json", type=Path, default=None, help="default: output_paths")
    parser.add_argument("--md", type=Path, default=None, help="default: output_paths")
    parser.add_argument("--figure", type=Path, default=None, help="default: output_paths")
    return parser.parse_args()


def output_paths(model: str) -> tuple[Path, Path, Path]:
    """The default results JSON, markdown and figure of ``model``'s study (tiny-chat's keep their
    first names: ``analyses/results/adversarial.{json,md}``).

    Returns:
        ``(json, md, figure)`` paths relative to the repository root.
    """
    stem = "adversarial" if model == "tiny-chat" else f"adversarial_{model}"
    results = Path("analyses/results")
    return (
        results / f"{stem}.json",
        results / f"{stem}.md",
        Path(f"figures/adversarial_{model}.png"),
    )


def main() -> None:
    """Run the study and write the results file, its JSON and the figure."""
    from analyses.adversarial_report import write_outputs

    args = _parse()
    settings = study_settings(args.model, args.quick)
    seeds = [int(s) for s in (args.seeds or default_seeds(args.model)).split(",")]
    json_path, md_path, figure = output_paths(args.model)
    json_path, md_path, figure = args.json or json_path, args.md or md_path, args.figure or figure
    study = run_study(settings, seeds, args.work, args.model)
    study["quick"] = args.quick
    write_outputs(study, early=args.early, json_path=json_path, md_path=md_path, figure=figure)
    print(f"wrote {json_path}, {md_path} and {figure}", flush=True)


if __name__ == "__main__":
    main()
