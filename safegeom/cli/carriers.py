"""``safegeom carriers``: refusal direction, harmfulness direction and refusal cone of a model.

Under a launcher the captures and scoring passes are shared out over the ranks
(:mod:`safegeom.carriers`); rank 0 alone checks ``--out``, writes and prints.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from safegeom.carriers import SelectionConfig
from safegeom.carriers.suite import CarriersConfig, extract_carriers
from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.models.loading import LoadConfig, load_model
from safegeom.outputs import claim_folder, inputs_of
from safegeom.parallel.ranks import is_main, main_only

__all__ = ["CarriersCommand", "register", "run"]


@dataclass(frozen=True)
class CarriersCommand:
    """The options of ``safegeom carriers`` that are not library settings."""

    model: str = field(metadata={"positional": True})
    """tiny-chat, a checkpoint or adapter folder, or a hub id."""
    out: str = field(metadata={"metavar": "DIR"})
    """Output folder (checked before any work starts)."""
    overwrite: bool = False
    """Write into a --out folder that holds files safegeom did not write (they are kept)."""
    json: bool = False
    """Print summary.json to stdout."""
    progress: bool = True
    """Show progress bars (--no-progress hides them)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``carriers`` subcommand."""
    parser = subparsers.add_parser(
        "carriers",
        help="extract refusal/harmfulness carriers",
        description="Diff-in-means refusal direction at t_post with bypass/induce/KL selection "
        "(Arditi et al.), harmfulness direction at t_inst, cheap refusal cone; writes carriers "
        "(safetensors + JSON), candidates.parquet and summary.json into --out.",
    )
    add_config(parser, CarriersCommand, title="command")
    add_config(parser, CarriersConfig, title="prompt sets and cone")
    add_config(parser, SelectionConfig, title="selection")
    add_config(parser, LoadConfig, title="model loading")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom carriers``; returns the exit status."""
    command = config_from_args(CarriersCommand, args)
    carriers = config_from_args(CarriersConfig, args)
    selection = config_from_args(SelectionConfig, args)
    # under a launcher rank 0 alone checks and writes (safegeom.parallel.ranks); the others print nothing
    inputs = inputs_of(command, carriers, selection, config_from_args(LoadConfig, args))
    with claim_folder(
        command.out, command="carriers", overwrite=command.overwrite, inputs=inputs
    ) as out:
        lm = load_model(command.model, config_from_args(LoadConfig, args))
        suite = extract_carriers(
            lm,
            carriers.harmful,
            carriers.harmless,
            carriers.harmful_val,
            carriers.harmless_val,
            selection,
            cone_k=carriers.cone_k,
            progress=command.progress,
        )
        main_only(suite.save)(out)
        if not is_main():
            return 0
    summary = suite.summary()
    if command.json:
        emit_json(summary)
    else:
        r = summary["refusal"]
        print(
            f"refusal direction: layer {r['layer']} {r['position']}  bypass {r['bypass']:.3f}  "
            f"induce {r['induce']:.3f}  KL {r['kl']:.4f}\n"
            f"H/R coupling |cos| {summary['hr_coupling']:.3f}\nwrote {out}/summary.json and the "
            "carriers beside it"
        )
    return 0
