"""``safegeom demo``: behaviour, carriers, ablation check and a harmful LoRA trajectory of a model
(tiny-chat by default; ``--model smol-chat`` for the real one, at its own preset sizes)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from safegeom.cli.json_output import emit_json
from safegeom.cli.options import add_config, config_from_args
from safegeom.demo import DemoConfig, run_demo


@dataclass(frozen=True)
class DemoCommand:
    """Where the demo writes, and how it reports."""

    out: str = "runs/demo"
    """Run folder (outside the package): report.md, summary.json, tables, carriers, trajectory."""
    json: bool = False
    """Print summary.json to stdout instead of the report."""
    overwrite: bool = False
    """Write into a --out folder that holds files safegeom did not write (they are kept)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="the whole story on tiny-chat (a few minutes on CPU) or smol-chat (about 22 min)",
        description="Behaviour of a model (tiny-chat by default) on held-out prompts, its "
        "refusal and harmfulness carriers, an ablation check against matched random directions, "
        "and a harmful LoRA fine-tuning trajectory with its audit; writes report.md, "
        "summary.json and tables into --out. Sizes left unset come from the model's preset "
        "(safegeom.demo.DEMO_PRESETS: tiny-chat's, smol-chat's; other models get tiny-chat's); "
        "each flag given overrides its preset value.",
    )
    add_config(parser, DemoCommand, title="output")
    add_config(parser, DemoConfig, title="demo")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``safegeom demo``."""
    command = config_from_args(DemoCommand, args)
    summary = run_demo(
        command.out,
        config_from_args(DemoConfig, args),
        echo=not command.json,
        overwrite=command.overwrite,
    )
    if command.json:
        emit_json(summary)
    return 0
