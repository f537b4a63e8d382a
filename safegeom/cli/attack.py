"""``safegeom attack``: optimise adversarial prompts against a source model, saved as an attack set.

``safegeom attack MODEL --method gcg|autodan|prefill --prompts SPEC --out DIR`` writes
``DIR/attack_set.json`` (an :class:`~safegeom.attacks.AttackSet`) after every behaviour, so
``--resume`` continues an interrupted run where it stopped; the folder is then a prompt spec for
``safegeom evaluate --prompts DIR``. The options are derived from :class:`AttackCommand`, the
method configs (:class:`~safegeom.attacks.gcg.GCGConfig`,
:class:`~safegeom.attacks.autodan.AutoDANConfig`, :class:`~safegeom.attacks.prefill.PrefillConfig`),
:class:`~safegeom.attacks.AttackOptions` and :class:`~safegeom.models.LoadConfig`; ``--seed``,
``--early-stop`` and ``--batch-size`` apply to GCG and AutoDAN alike.

Under a launcher (``accelerate launch --multi_gpu --num_processes 2 -m safegeom.cli attack ...``)
the behaviours are dealt over the ranks (:mod:`safegeom.parallel.attacks`); rank 0 alone writes
and prints, and the set is the one one process makes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Literal

from safegeom.attacks import AttackOptions, AttackSet, autodan, gcg, prefill, run_attack
from safegeom.attacks.targets import behaviours_and_targets
from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.outputs import claim_folder, inputs_of
from safegeom.parallel.ranks import is_main

__all__ = ["AttackCommand", "attack_from_command", "register", "run"]


@dataclass(frozen=True)
class AttackCommand:
    """What ``safegeom attack`` attacks and where the attack set goes."""

    model: str = field(metadata={"positional": True})
    """tiny-chat, a checkpoint or adapter dir, or a hub id: the source model."""
    prompts: str = field(metadata={"metavar": "SPEC"})
    """Behaviours: bundled set[:split] with targets, or a CSV/JSON/JSONL file with --target-column."""
    out: str = field(metadata={"metavar": "DIR"})
    """Folder of the attack set (DIR/attack_set.json)."""
    method: Literal["gcg", "autodan", "prefill"] = "gcg"
    """The attack."""
    column: str | None = None
    """Behaviour column of a user file."""
    target_column: str | None = None
    """Target column of a user file (bundled sets bring their targets)."""
    limit: int | None = None
    """Attack the first N behaviours."""
    resume: bool = False
    """Continue the attack set already in --out, behaviour by behaviour."""
    overwrite: bool = False
    """Use an --out folder holding files safegeom did not write."""
    json: bool = False
    """Print a summary as JSON."""
    progress: bool = True
    """Show a progress bar (loss, best so far)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``attack`` subcommand."""
    parser = subparsers.add_parser(
        "attack",
        help="GCG, AutoDAN-style or prefilling attacks saved as an attack set",
        description="Optimise adversarial prompts against a source model (GCG: Zou et al. 2023; "
        "AutoDAN-style genetic search: Liu et al. 2024; prefilling: Andriushchenko et al. 2024) "
        "and save them with the source's verdicts as DIR/attack_set.json, a prompt spec for "
        "evaluate.",
    )
    add_config(parser, AttackCommand, title="what to attack")
    add_config(
        parser, gcg.GCGConfig, title="GCG (--seed, --early-stop, --batch-size: every method)"
    )
    add_config(parser, autodan.AutoDANConfig, title="AutoDAN-style search")
    add_config(parser, prefill.PrefillConfig, title="prefilling")
    add_config(parser, AttackOptions, title="chat and judging on the source")
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run)


def _method_config(method: str, args: argparse.Namespace) -> Any:
    """The chosen method's config; AutoDAN takes the shared GCG options."""
    if method == "gcg":
        return config_from_args(gcg.GCGConfig, args)
    if method == "prefill":
        return config_from_args(prefill.PrefillConfig, args)
    shared = config_from_args(gcg.GCGConfig, args)
    batch = {"batch_size": shared.batch_size} if shared.batch_size is not None else {}
    return config_from_args(
        autodan.AutoDANConfig, args, early_stop=shared.early_stop, seed=shared.seed, **batch
    )


def attack_from_command(
    lm: LoadedModel, command: AttackCommand, config: Any, options: AttackOptions
) -> AttackSet:
    """Run the command's attack on ``lm``, saving into ``command.out`` after every behaviour.

    Returns:
        The finished :class:`~safegeom.attacks.AttackSet`.
    """
    prompts, targets = behaviours_and_targets(
        command.prompts,
        column=command.column,
        target_column=command.target_column,
        limit=command.limit,
    )
    module = {"gcg": gcg, "autodan": autodan, "prefill": prefill}[command.method]
    together = gcg.attack_universal if command.method == "gcg" and config.universal else None
    return run_attack(
        lm,
        command.method,
        prompts.prompts,
        targets,
        config,
        module.attack_one,
        options=options,
        together=together,
        out=command.out,
        resume=command.resume,
        progress=command.progress,
        name=f"{command.method}:{prompts.name}",
        prompt_sets={prompts.name: prompts.content_hash},
    )


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom attack``; returns the exit status."""
    command = config_from_args(AttackCommand, args)
    config = _method_config(command.method, args)
    options = config_from_args(AttackOptions, args)
    load = config_from_args(LoadConfig, args)
    # bad prompt specs and targets fail before the model loads
    behaviours_and_targets(
        command.prompts,
        column=command.column,
        target_column=command.target_column,
        limit=command.limit,
    )
    with claim_folder(
        command.out,
        command="attack",
        overwrite=command.overwrite or command.resume,
        inputs=inputs_of(command, load),
    ):
        lm = load_model(command.model, load)
        result = attack_from_command(lm, command, config, options)
    if not is_main():
        return 0
    summary = {
        "method": result.method,
        "name": result.name,
        "n": len(result),
        "success_rate": result.success_rate,
        "judge": result.judge,
        "mean_final_loss": sum(r.final_loss for r in result.records) / len(result),
        "seconds": sum(r.seconds for r in result.records),
        "out": command.out,
    }
    if command.json:
        emit_json(summary)
    else:
        rate = "--" if result.success_rate is None else f"{result.success_rate:.3f}"
        print(
            f"{result.name}: {len(result)} behaviours, success on the source {rate} "
            f"(judge {result.judge or 'none'}), mean final loss {summary['mean_final_loss']:.3f} "
            f"nats/token\nwrote {command.out}/attack_set.json"
        )
    return 0
